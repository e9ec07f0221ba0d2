"""Checking YAML documents (config files, model cards) field by field.

A spec is a dict of key -> Field or nested dict. `check(doc, spec, where)` returns a new dict
with defaults filled in, or raises ConfigError naming the file, the key path and the allowed
values, e.g. `edge.yaml: mqtt.qos: must be one of 0, 1 (got 2)`.
"""

import reprlib

from edge.errors import ConfigError

_MISSING = object()
MAX_EXPANDED = 10000     # values a document's aliases may expand to (a "billion laughs" guard)
SHOWN = 80               # characters of a value an error message shows


def shown(value):
    """A short repr of a value for an error message: never the whole of a huge or deeply
    aliased value (formatting one would take minutes and gigabytes)."""
    short = reprlib.Repr()
    short.maxlevel = 2
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = 4
    short.maxstring = short.maxother = short.maxlong = SHOWN
    text = short.repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


class Field:
    """One key: its type, default, allowed values and an optional extra check."""

    def __init__(self, kind, default=_MISSING, choices=None, min=None, max=None,
                 length=None, check=None, nullable=False, help="", items=None,
                 item_check=None, unique=None):
        self.kind = kind            # a type or tuple of types; float accepts int
        self.default = default
        self.choices = choices
        self.min = min
        self.max = max
        self.length = length        # exact length for lists
        self.check = check          # callable(value) -> error text or None
        self.nullable = nullable
        self.help = help
        # lists: a Field for each item, or a spec (dict) for items that are mappings, checked
        # with their index in the key path (`track.zones[1].points`); item_check(item) ->
        # (key, reason) or None, for rules across an item's keys
        self.items = items
        self.item_check = item_check
        self.unique = unique        # key of mapping items whose values must differ (`name`)

    @property
    def required(self):
        return self.default is _MISSING

    def describe(self):
        """The allowed values in words, for error messages."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                 list: "a list", dict: "a mapping"}
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        text = " or ".join(names.get(k, k.__name__) for k in kinds)
        if isinstance(self.items, dict):
            text = "a list of mappings"
        elif isinstance(self.items, Field):
            text = "a list whose items are each {}".format(self.items.describe())
        if self.length is not None:
            text = "a list of {} {}".format(self.length, "numbers" if self.kind == list else text)
        if self.min is not None and self.max is not None:
            text += " from {} to {}".format(self.min, self.max)
        elif self.min is not None:
            text += " >= {}".format(self.min)
        elif self.max is not None:
            text += " <= {}".format(self.max)
        if self.nullable:
            text += " (or null)"
        return text


def _type_ok(value, kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False   # YAML `yes` must not pass as 1
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, kinds)


def _check_field(value, field, path, where):
    def fail(reason=None):
        raise ConfigError("{}: {}: must be {} (got {}){}".format(
            where, path, field.describe(), shown(value), "; " + reason if reason else ""))

    if value is None:
        if field.nullable:
            return None
        fail()
    if not _type_ok(value, field.kind):
        fail()
    if field.choices is not None and value not in field.choices:
        fail()
    if field.length is not None and len(value) != field.length:
        fail()
    if isinstance(value, list) and field.items is None:
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                if field.kind == list:
                    fail()
    if isinstance(value, list) and isinstance(field.items, dict):
        if not all(isinstance(item, dict) for item in value):
            fail()
        value = [check(item, field.items, where, "{}[{}].".format(path, i))
                 for i, item in enumerate(value)]
        seen = {}
        for i, item in enumerate(value):
            if field.unique is not None:
                first = seen.setdefault(item[field.unique], i)
                if first != i:
                    raise ConfigError("{}: {}[{}].{}: {!r} is already the {} of {}[{}]; each "
                                      "must differ".format(where, path, i, field.unique,
                                                           item[field.unique], field.unique,
                                                           path, first))
            problem = field.item_check(item) if field.item_check else None
            if problem:
                key, reason = problem
                raise ConfigError("{}: {}[{}].{}: {} (got {!r})".format(
                    where, path, i, key, reason, item[key]))
    elif isinstance(value, list) and isinstance(field.items, Field):
        value = [_check_field(item, field.items, "{}[{}]".format(path, i), where)
                 for i, item in enumerate(value)]
    if field.min is not None and isinstance(value, (int, float)) and value < field.min:
        fail()
    if field.max is not None and isinstance(value, (int, float)) and value > field.max:
        fail()
    if field.check is not None:
        reason = field.check(value)
        if reason:
            fail(reason)
    return value


def check(doc, spec, where, prefix=""):
    """Validated copy of `doc` with defaults; ConfigError on unknown or bad keys."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("{}: {}: must be a mapping (got {})".format(
            where, prefix.rstrip(".") or "top level", shown(doc)))
    out = {}
    for key in doc:
        if key not in spec:
            raise ConfigError("{}: {}{}: unknown key; allowed keys here: {}".format(
                where, prefix, key, ", ".join(sorted(spec))))
    for key, field in spec.items():
        path = prefix + key
        if isinstance(field, dict):
            out[key] = check(doc.get(key), field, where, path + ".")
            continue
        if key not in doc:
            if field.required:
                raise ConfigError("{}: {}: missing; it must be {}".format(
                    where, path, field.describe()))
            out[key] = field.default
            continue
        out[key] = _check_field(doc[key], field, path, where)
    return out


class _TooLarge(Exception):
    """A document whose aliases expand past MAX_EXPANDED values, or refer to themselves."""


def _expanded_size(root):
    """How many nodes the document holds with every alias expanded (each node once per
    place it appears); _TooLarge past MAX_EXPANDED. Iterative: nesting costs no recursion."""
    import yaml
    sizes = {}
    active = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            active.discard(key)
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            else:
                children = []
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_EXPANDED:
                raise _TooLarge("aliases expand to more than {} values".format(MAX_EXPANDED))
            continue
        if key in sizes:
            continue
        if key in active:
            raise _TooLarge("an alias refers to the value that holds it")
        active.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            stack.extend((n, False) for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((n, False) for n in node.value)
    return sizes[id(root)]


def _loader():
    """yaml.SafeLoader that refuses aliases expanding past MAX_EXPANDED values."""
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
            return super().compose_node(parent, index)

        def compose_document(self):
            node = super().compose_document()
            if self.aliases and node is not None:
                _expanded_size(node)
            return node
    return Loader


def load_yaml(path, what):
    """A YAML file's content; ConfigError with the line for syntax errors."""
    import yaml
    try:
        with open(path, "r", encoding="utf-8") as f:
            loader = _loader()(f)
            try:
                return loader.get_single_data()
            finally:
                loader.dispose()
    except _TooLarge as e:
        raise ConfigError("{} {}: {}; write the values out instead of using YAML aliases "
                          "(*name)".format(what, path, e))
    except RecursionError:
        raise ConfigError("{} {}: nested too deeply to be a configuration".format(what, path))
    except FileNotFoundError:
        raise ConfigError("{} {}: file not found".format(what, path))
    except PermissionError:
        raise ConfigError("{} {}: this user may not read it; run with sudo (or as a member of "
                          "its group), or give a readable copy".format(what, path))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("{} {}: cannot read: {}".format(what, path, e))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = " line {}".format(mark.line + 1) if mark is not None else ""
        raise ConfigError("{} {}:{}: not valid YAML: {}".format(
            what, path, at, getattr(e, "problem", None) or e))
