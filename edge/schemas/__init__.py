"""The MQTT API as data: the AsyncAPI document shipped with the package, and its schemas.

`asyncapi.yaml` (next to this file) describes every topic and payload. Here:
- `document()`: the parsed document (loaded once; from asyncapi.json without PyYAML);
- `schema(name)`: a standalone JSON Schema (draft-07) for a message kind (`status`, `depth`,
  `detections`, `matches`, `health`, `reply`, `command`, `events`, `motion`) or a component
  (`SnapshotRequest`);
- `kind_of_topic(topic, prefix)`: the message kind a concrete topic carries (edge.topics);
- `validate(kind, payload)`: ValueError with the path and the reason when a payload is not
  what the API promises; `strict=False` (what a consumer such as edge.client checks) lets
  through keys the document does not list, which a newer device may add compatibly.
- `loads(raw)`: a payload from the wire as strict JSON (no NaN or Infinity, no integer of
  more than 20 digits); `check(kind, payload)`: what `validate` says, without jsonschema,
  in time proportional to the payload and stopping at the first problem (what a robot runs
  on every message: jsonschema took 13 s on an 8 MB detections message). The tests
  hold the two to the same verdict on every message edge publishes.

jsonschema is only needed by `validate` and imported there: devices and robots do not
install it.
"""

import copy
import json
import os
import re
import threading

from edge import topics

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "asyncapi.yaml")
# The same document as JSON (tools/render_schema_json.py writes it; a test keeps the two
# equal): what a robot reads, which has no YAML parser (the client installs paho-mqtt alone).
JSON_PATH = os.path.join(os.path.dirname(PATH), "asyncapi.json")
DRAFT7 = "http://json-schema.org/draft-07/schema#"
COMPONENTS_REF = "#/components/schemas/"

# message kind -> component schema of its payload
KINDS = {
    "status": "Status",
    "detections": "Detections",
    "matches": "Matches",
    "depth": "Depth",
    "health": "Health",
    "reply": "Reply",
    "command": "CommandRequest",
    "events": "Event",
    "motion": "Motion",
}
kind_of_topic = topics.kind_of_topic
JPEG_START = b"\xff\xd8\xff"

_lock = threading.Lock()
_document = None
_schemas = {}
_validators = {}


def document():
    """The AsyncAPI document as a dict (parsed once; do not modify it).

    From asyncapi.yaml, the source, where PyYAML is installed (the daemon's extra); from its
    JSON rendering, the same document, where it is not (a robot with the client alone).
    """
    global _document
    with _lock:
        if _document is None:
            _document = _load()
        return _document


def _load():
    try:
        import yaml
    except ImportError:
        with open(JSON_PATH, "r", encoding="utf-8") as f:
            return json.load(f)
    with open(PATH, "r", encoding="utf-8") as f:
        return yaml.safe_load(f)


def render_json(doc):
    """The text of asyncapi.json for the document `doc` (in the YAML's order)."""
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def names():
    """The component schema names."""
    return sorted(document()["components"]["schemas"])


def _rewrite(node):
    """A copy of a schema with `#/components/schemas/X` refs turned into `#/definitions/X`."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(COMPONENTS_REF):
                out[key] = "#/definitions/" + value[len(COMPONENTS_REF):]
            else:
                out[key] = _rewrite(value)
        return out
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    return node


def schema(name):
    """A standalone draft-07 JSON Schema for a message kind or a component schema name.

    The components are embedded as `definitions`, so the schema needs nothing else.
    """
    component = KINDS.get(name, name)
    with _lock:
        cached = _schemas.get(component)
    if cached is None:
        components = document()["components"]["schemas"]
        if component not in components:
            raise KeyError("no schema {!r}; kinds: {}; components: {}".format(
                name, ", ".join(sorted(KINDS)), ", ".join(sorted(components))))
        cached = {"$schema": DRAFT7, "title": component}
        cached.update(_rewrite(components[component]))
        cached["definitions"] = _rewrite(components)
        with _lock:
            _schemas[component] = cached
    return copy.deepcopy(cached)


def _where(path):
    """`detections[0].box[1]` from a jsonschema error path."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += "[{}]".format(part)
        else:
            text += ("." if text else "") + str(part)
    return text or "(the payload)"


def _open(node):
    """A copy of a schema whose objects accept keys they do not list (`additionalProperties:
    false` left out); maps that constrain their values keep that constraint."""
    if isinstance(node, dict):
        return {key: _open(value) for key, value in node.items()
                if not (key == "additionalProperties" and value is False)}
    if isinstance(node, list):
        return [_open(item) for item in node]
    return node


def _validator(component, strict=True):
    import jsonschema
    with _lock:
        validator = _validators.get((component, strict))
    if validator is None:
        document = schema(component)
        validator = jsonschema.Draft7Validator(document if strict else _open(document))
        with _lock:
            _validators[(component, strict)] = validator
    return validator


def _deepest(error):
    """The most specific error of a oneOf/anyOf failure: the branch that got furthest."""
    while error.context:
        error = max(error.context, key=lambda e: (len(e.absolute_path), -len(e.context)))
    return error


def validate(kind, payload, strict=True):
    """Check a payload (a dict; bytes for `snapshot`) against the API; ValueError if invalid.

    The message names the kind, the path of the first problem and the reason, e.g.
    `detections payload: at detections[0].box: 'x' is not of type 'number'`. `strict=False`
    accepts keys the document does not list (a consumer's view: a newer device may add
    keys compatibly, and `v` changes when a change breaks consumers); every listed key is
    still checked. Beyond what jsonschema checks: every number finite (anywhere in the
    payload), and the rules JSON Schema cannot state (a depth grid of its declared shape).
    """
    if kind == "snapshot":
        if not isinstance(payload, (bytes, bytearray)) or not payload.startswith(JPEG_START):
            raise ValueError("snapshot payload: not JPEG bytes")
        return
    component = _component(kind, payload)
    try:
        _plain(payload)     # numbers finite: jsonschema takes NaN and Infinity for numbers
    except _Invalid as e:
        raise e.error(kind)
    from jsonschema.exceptions import best_match
    error = best_match(_validator(component, strict).iter_errors(payload))
    if error is not None:
        error = _deepest(error)
        raise ValueError("{} payload: at {}: {}".format(kind, _where(error.absolute_path),
                                                        _short(error.message)))
    _rules(kind, component, payload)


def _component(kind, payload):
    component = KINDS.get(kind, kind)
    if component == "Reply" and isinstance(payload, dict) and isinstance(payload.get("ok"), bool):
        # Check against the branch the reply claims to be: its errors are the readable ones.
        component = "ReplyOk" if payload["ok"] else "ReplyError"
    return component


def _short(text, limit=300):
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- strict JSON ---------------------------------------------------------------------------

MAX_INT_DIGITS = 20         # 2**53 - 1, the largest integer the API has, has 16 digits
# 21 digits in a row anywhere (strings included): parse again with integers checked one by
# one. Python before 3.11 converts a long integer in quadratic time (a 1 MB one: minutes).
_LONG_DIGITS = re.compile(b"[0-9]{21}")


def _refuse_constant(name):
    raise ValueError("{} is no JSON number (JSON has no NaN or Infinity)".format(name))


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("an integer of {} digits (at most {})".format(
            len(text.lstrip("-")), MAX_INT_DIGITS))
    return int(text)


def loads(raw):
    """A payload from the wire (bytes) as strict JSON: ValueError for bytes that are not
    UTF-8, for NaN, Infinity and -Infinity (Python's json takes them), for integers of more
    than MAX_INT_DIGITS digits and for nesting deeper than json can parse. Numbers too
    large for a float (1e400) come back as infinity: check() and validate() refuse those."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        if _LONG_DIGITS.search(raw if isinstance(raw, (bytes, bytearray)) else
                               text.encode("utf-8", "surrogatepass")):
            return json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int)
        return json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8")
    except RecursionError:
        raise ValueError("JSON nested too deeply")


# -- check: the document's schemas, compiled to plain Python --------------------------------

MAX_PLAIN_DEPTH = 32        # levels of nesting in keys the document does not list


class _Invalid(Exception):
    """A problem found by check(): its message, and its path (innermost key first)."""

    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message
        self.path = []

    def at(self, *path):
        """The problem at this path (outermost key first)."""
        self.path = list(reversed(path))
        return self

    def error(self, kind):
        return ValueError("{} payload: at {}: {}".format(kind, _where(reversed(self.path)),
                                                         _short(self.message)))


def _show(value):
    """A short, bounded picture of a value for a message (never the whole of a big one)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else "{}... ({} characters)".format(
            repr(value[:40])[:-1], len(value))
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        digits = len(str(value)) if abs(value) < 10 ** 40 else None
        return repr(value) if digits else "an integer of more than 40 digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return repr(value) if len(value) <= 5 and all(
            isinstance(v, (int, float, type(None))) for v in value) else \
            "an array of {} items".format(len(value))
    if isinstance(value, dict):
        return "an object of {} keys".format(len(value))
    return type(value).__name__


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value):
    # (draft 6 and later: a number with no fraction, 1.0 included, as jsonschema)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "number": _is_number,
    "integer": _is_integer,
}
# keywords check() knows; anything else in the document is refused when it is compiled,
# so that a keyword added to the document cannot be silently ignored by robots
_ANNOTATIONS = {"description", "title", "default", "examples", "format", "contentEncoding",
                "contentMediaType", "$comment", "$schema", "definitions"}
_KEYWORDS = {"type", "const", "enum", "minimum", "maximum", "minLength", "maxLength",
             "pattern", "minItems", "maxItems", "items", "properties", "required",
             "additionalProperties", "allOf", "anyOf", "oneOf", "not", "if", "then", "$ref"}


def _same(a, b):
    """JSON equality: true is not 1, 1.0 is 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def _plain(value, depth=0):
    """A value the schema does not describe: its numbers finite, its nesting bounded."""
    if isinstance(value, float):
        if value - value != 0.0:
            raise _Invalid("{!r} is not a finite number".format(value))
    elif isinstance(value, (dict, list)):
        if depth >= MAX_PLAIN_DEPTH:
            raise _Invalid("nested deeper than {} levels".format(MAX_PLAIN_DEPTH))
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
            if isinstance(item, (float, dict, list)):
                try:
                    _plain(item, depth + 1)
                except _Invalid as e:
                    e.path.append(key)
                    raise


def _number_leaf(node, names, general):
    """A fast check of a number (or null) with a range: the depth grid's 65 536 cells and
    the matches' 500 000 numbers take one call each. Anything it does not accept at once
    goes to `general`, which raises the readable error (or accepts what only looks odd)."""
    low, high = node.get("minimum"), node.get("maximum")
    null = "null" in names
    fraction = "number" in names       # an integer schema takes 1.0, not 1.5

    def check_leaf(value):
        kind = value.__class__
        if kind is int:
            if (low is None or value >= low) and (high is None or value <= high):
                return
        elif kind is float:
            if value - value == 0.0 and (fraction or value.is_integer()) and \
                    (low is None or value >= low) and (high is None or value <= high):
                return
        elif value is None and null:
            return
        general(value)
    return check_leaf


def _run_all(steps):
    if len(steps) == 1:
        return steps[0]

    def run(value):
        for step in steps:
            step(value)
    return run


class _Compiler:
    """Turns a schema of the document into a function that raises _Invalid."""

    def __init__(self, components, strict):
        self.components = components
        self.strict = strict
        self.refs = {}

    def ref(self, ref):
        if not ref.startswith(COMPONENTS_REF):
            raise ValueError("edge.schemas: unsupported $ref {}".format(ref))
        name = ref[len(COMPONENTS_REF):]
        if name not in self.refs:
            box = []
            self.refs[name] = lambda value: box[0](value)     # (a schema that refers to itself)
            box.append(self.compile(self.components[name]))
            self.refs[name] = box[0]
        return self.refs[name]

    def compile(self, node):
        if not isinstance(node, dict):
            raise ValueError("edge.schemas: a schema is an object, not {!r}".format(node))
        if "$ref" in node:      # draft 7: what stands beside a $ref is not applied
            return self.ref(node["$ref"])
        unknown = [k for k in node if k not in _KEYWORDS and k not in _ANNOTATIONS and
                   not k.startswith("x-")]
        if unknown:
            raise ValueError("edge.schemas: check() does not know the keyword(s) {}".format(
                ", ".join(sorted(unknown))))
        arrays, objects = self.arrays(node), self.objects(node)
        steps = [step for step in (self.type_(node), self.values(node), self.numbers(node),
                                   self.strings(node), arrays, objects) if step is not None]
        combined = self.combined(node)
        steps += combined
        names = node.get("type", ["object", "array"])
        names = names if isinstance(names, list) else [names]
        if arrays is None and objects is None and not combined and \
                {"object", "array"} & set(names):
            steps.append(_plain)    # content the schema does not describe: finite, bounded
        general = _run_all(steps) if steps else _plain
        if set(node) - _ANNOTATIONS <= {"type", "minimum", "maximum"} and \
                set(names) <= {"number", "integer", "null"} and \
                {"number", "integer"} & set(names):
            return _number_leaf(node, names, general)
        return general

    @staticmethod
    def type_(node):
        names = node.get("type")
        if names is None:
            return None
        names = names if isinstance(names, list) else [names]
        tests = [_TYPES[n] for n in names]
        expected = ", ".join(repr(n) for n in names)
        numeric = "number" in names or "integer" in names

        def check_type(value):
            if isinstance(value, float) and value - value != 0.0 and numeric:
                raise _Invalid("{!r} is not a finite number".format(value))
            for test in tests:
                if test(value):
                    return
            raise _Invalid("{} is not of type {}".format(_show(value), expected))
        return check_type

    @staticmethod
    def values(node):
        steps = []
        if "const" in node:
            const = node["const"]

            def check_const(value):
                if not _same(value, const):
                    raise _Invalid("{!r} was expected".format(const))
            steps.append(check_const)
        if "enum" in node:
            enum = node["enum"]
            hashable = all(isinstance(v, str) for v in enum)
            members = frozenset(enum) if hashable else None

            def check_enum(value):
                if hashable and isinstance(value, str):
                    if value in members:
                        return
                elif any(_same(value, v) for v in enum):
                    return
                raise _Invalid("{} is not one of {!r}".format(_show(value), enum))
            steps.append(check_enum)
        return _run_all(steps) if steps else None

    @staticmethod
    def numbers(node):
        low, high = node.get("minimum"), node.get("maximum")
        if low is None and high is None:
            return None

        def check_range(value):
            if not _is_number(value) or value - value != 0.0:
                return
            if low is not None and value < low:
                raise _Invalid("{} is less than the minimum of {!r}".format(_show(value), low))
            if high is not None and value > high:
                raise _Invalid("{} is greater than the maximum of {!r}".format(
                    _show(value), high))
        return check_range

    @staticmethod
    def strings(node):
        shortest, longest = node.get("minLength"), node.get("maxLength")
        pattern = re.compile(node["pattern"]) if "pattern" in node else None
        if shortest is None and longest is None and pattern is None:
            return None

        def check_string(value):
            if not isinstance(value, str):
                return
            if longest is not None and len(value) > longest:
                raise _Invalid("{} is too long (at most {} characters)".format(
                    _show(value), longest))
            if shortest is not None and len(value) < shortest:
                raise _Invalid("{} is too short".format(_show(value)))
            if pattern is not None and not pattern.search(value):
                raise _Invalid("{} does not match {!r}".format(_show(value), pattern.pattern))
        return check_string

    def arrays(self, node):
        fewest, most = node.get("minItems"), node.get("maxItems")
        items = node.get("items")
        if fewest is None and most is None and items is None:
            return None
        if items is not None and not isinstance(items, dict):
            raise ValueError("edge.schemas: check() knows `items` as one schema only")
        each = self.compile(items) if items is not None else None

        def check_array(value):
            if not isinstance(value, list):
                return
            # the length first: an array of a million items fails before any is looked at
            if most is not None and len(value) > most:
                raise _Invalid("{} is too long (at most {} items)".format(_show(value), most))
            if fewest is not None and len(value) < fewest:
                raise _Invalid("{} is too short".format(_show(value)))
            if each is not None:
                index = 0
                try:
                    for index, item in enumerate(value):
                        each(item)
                except _Invalid as e:
                    e.path.append(index)
                    raise
        return check_array

    def objects(self, node):
        properties = {key: self.compile(child)
                      for key, child in (node.get("properties") or {}).items()}
        required = list(node.get("required") or ())
        extra = node.get("additionalProperties", True)
        if extra is False and not self.strict:
            extra = True        # a consumer's view: keys a newer device adds pass
        if not properties and not required and extra is True and "properties" not in node and \
                "additionalProperties" not in node:
            return None
        others = _plain if extra is True else None if extra is False else self.compile(extra)

        def check_object(value):
            if not isinstance(value, dict):
                return
            for key in required:
                if key not in value:
                    raise _Invalid("{!r} is a required property".format(key))
            for key, item in value.items():
                step = properties.get(key, others)
                if step is None:
                    raise _Invalid("Additional properties are not allowed ({} was "
                                   "unexpected)".format(_show(key)))
                try:
                    step(item)
                except _Invalid as e:
                    e.path.append(key)
                    raise
        return check_object

    def combined(self, node):
        steps = []
        for sub in node.get("allOf") or ():
            steps.append(self.compile(sub))
        if "anyOf" in node or "oneOf" in node:
            one = "oneOf" in node
            branches = [self.compile(sub) for sub in node["oneOf" if one else "anyOf"]]

            def check_branches(value):
                errors, passed = [], 0
                for branch in branches:
                    try:
                        branch(value)
                    except _Invalid as e:
                        errors.append(e)
                        continue
                    passed += 1
                    if not one or passed > 1:
                        break
                if passed == 1 or (passed and not one):
                    return
                if passed:
                    raise _Invalid("{} is valid under more than one of the given schemas".format(
                        _show(value)))
                # the branch that got furthest says what is wrong (as _deepest does)
                raise max(errors, key=lambda e: len(e.path))
            steps.append(check_branches)
        if "not" in node:
            forbidden = self.compile(node["not"])

            def check_not(value):
                try:
                    forbidden(value)
                except _Invalid:
                    return
                raise _Invalid("{} should not be valid under {!r}".format(
                    _show(value), _short(json.dumps(node["not"]), 80)))
            steps.append(check_not)
        if "if" in node:
            condition = self.compile(node["if"])
            then = self.compile(node["then"]) if "then" in node else None

            def check_if(value):
                try:
                    condition(value)
                except _Invalid:
                    return
                if then is not None:
                    then(value)
            steps.append(check_if)
        return steps


_checkers = {}


def _checker(component, strict):
    with _lock:
        checker = _checkers.get((component, strict))
    if checker is None:
        components = document()["components"]["schemas"]
        if component not in components:
            raise KeyError("no schema {!r}; kinds: {}; components: {}".format(
                component, ", ".join(sorted(KINDS)), ", ".join(sorted(components))))
        checker = _Compiler(components, strict).ref(COMPONENTS_REF + component)
        with _lock:
            _checkers[(component, strict)] = checker
    return checker


def check(kind, payload, strict=True):
    """What validate() says of a payload (ValueError naming the path and the reason, None
    when it is valid), without jsonschema and in time proportional to the payload: arrays
    and strings past their maxItems and maxLength fail before their content is looked at,
    the first problem ends the check. Numbers must be finite (NaN and Infinity are no JSON),
    in keys the document does not list as well."""
    if kind == "snapshot":
        validate(kind, payload)
        return
    component = _component(kind, payload)
    try:
        _checker(component, strict)(payload)
    except _Invalid as e:
        raise e.error(kind)
    except RecursionError:
        raise ValueError("{} payload: nested too deeply".format(kind))
    _rules(kind, component, payload)


# -- rules JSON Schema cannot state ----------------------------------------------------------

def _depth_grid(payload):
    """A depth grid has `grid.rows` rows of `grid.columns` values (Depth.depth_mm)."""
    columns, rows = payload["grid"]["columns"], payload["grid"]["rows"]
    grid = payload["depth_mm"]
    if len(grid) != rows:
        raise _Invalid("{} rows where grid.rows is {}".format(len(grid), rows)).at("depth_mm")
    for index, row in enumerate(grid):
        if len(row) != columns:
            raise _Invalid("{} values where grid.columns is {}".format(
                len(row), columns)).at("depth_mm", index)


_RULES = {"Depth": _depth_grid}


def _rules(kind, component, payload):
    rule = _RULES.get(component)
    if rule is not None:
        try:
            rule(payload)
        except _Invalid as e:
            raise e.error(kind)
