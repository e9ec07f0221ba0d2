"""Tasks: what the pipeline does with a frame (detect, match), one small module each.

A task owns its engines (one per frame size: the rewritten graph is specialised to the size
of the frames it reads), binds each frame slot once, and turns the outputs into a message.
It works in two steps so that decoding one frame overlaps the inference of the next:
`infer_frames` runs the engines (the task's thread) and `decode` builds the messages from
the outputs bound to the slot (the pipeline's decode thread), before the slot is reused.

Cameras share a task and its engines: one engine per frame size serves every camera of that
size. A task that batches (`batching`) runs the frames several cameras delivered together as
one batch through an engine with a batch dimension, built for as many frames as there are
cameras of that size; per-camera state (sequence numbers, newest messages, trackers) is
keyed by camera name.

This module is the registry, light enough for the command line's parser and the
configuration's schema (no numpy): each kind's declaration (`Kind`: its card's task, the
config key and `edge run` flag naming its card, its own config section) lives here, and its
code in its own module (a `Task` subclass of edge.tasks.base), imported when first asked for.
"""

import collections
import hashlib
import json
import os

from edge.validate import Field

_TASKS = {}

# Engines kept per task: a camera needs one; an image folder of mixed sizes would otherwise
# keep one per size it has seen.
MAX_ENGINES = 4


class Side(collections.namedtuple("Side", "topic message qos")):
    """A message of a task on a topic of its own (tracking's `events`), with its QoS; not a
    result of the frame (snapshots never draw it)."""


class Kind(collections.namedtuple("Kind", "name config_key help example section")):
    """A task kind's declaration: `name` the cards' `task` (and its module in this package),
    `config_key` the config key and `edge run --FLAG` naming its card, `help` that key's and
    flag's help, `example` a card's name, `section` its own config section (key,
    {name: Field}) or None."""


# The task kinds. A new kind is its module and its declaration here: the configuration's
# schema, the command line, the daemon, `edge build`, `edge doctor` and the memory plan ask
# the registry, never a kind by name.
KINDS = (
    Kind("detect", "detector", "detection card name or path", "yolox-nano", None),
    Kind("match", "matcher", "matching card name or path", "coarse-loftr", ("match", {
        "max_hz": Field(float, default=1.0, min=0.0, max=1000.0,
                        help="matching rate on the newest frame; 0: every frame"),
        "every": Field(int, default=0, min=0, help="> 0: match every N-th frame instead"),
        "top_k": Field(int, default=500, min=0, max=100000,
                       help="matches published per message, best first (count is always full)"),
        "max_references": Field(int, default=4, min=1, max=64,
                                help="references held, configured + stored with set_reference "
                                     "(more are refused)"),
    })),
)


def names():
    """The kinds' names (the cards' `task` values)."""
    return [k.name for k in KINDS]


def declared(name):
    """The declaration (Kind) of a kind by its name."""
    for k in KINDS:
        if k.name == name:
            return k
    raise KeyError(name)


def register(cls):
    """Class decorator: register a task class under its `name` (a card's `task`), with its
    declaration's `config_key`. A class of no declared kind (stereo depth, built beside
    detection) is registered as is."""
    if cls.name in names():
        cls.config_key = declared(cls.name).config_key
    _TASKS[cls.name] = cls
    return cls


def kinds():
    """The registered task classes, in KINDS order (their modules imported on first use)."""
    import importlib
    for k in KINDS:
        if k.name not in _TASKS:
            importlib.import_module("edge.tasks." + k.name)
    return [_TASKS[k.name] for k in KINDS]


def kind(name):
    """The task class of a card's `task`."""
    declared(name)
    kinds()
    return _TASKS[name]


def card_names(config):
    """The card names the configuration gives its tasks (each kind's `config_key`)."""
    return [config[k.config_key] for k in KINDS if config.get(k.config_key)]


def create(card, engines, model_dir, mirror=None, **options):
    """The task for a card, with its model fetched and checked.

    The model file's sha256 is checked every time. The ONNX model itself is read (and checked
    against the card) only when no engine made from this card and model is cached: a device
    that starts from its cache never imports onnx (edge.backends.cache, Recipes).
    """
    from edge import models, precision
    card = precision.resolve(card, getattr(engines, "precision", "auto"), engines.backend,
                             engines.cache.folder,
                             lambda original=card: models.ensure(original, model_dir, mirror))
    cls = kind(card.task)
    if card.calibrated:             # engine.precision int8: the calibrated QDQ graph
        path = card.calibrated
    else:
        path = models.ensure(card, model_dir, mirror)
    key = card_key(card, path if card.calibrated else None)
    if engines.knows(key):
        model = _Lazy(lambda: models.load_onnx(path, card))
    else:
        model = _Lazy(None, models.load_onnx(path, card))
    task = cls(card, engines, model, **options)
    task.card_key = key
    return task


def _rewriting_code():
    """sha256 of the modules that rewrite graphs: a change there makes new recipes."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    families = os.path.join(here, "families")
    files = [os.path.join(here, "graph.py"), os.path.join(here, "nodes.py")] + sorted(
        os.path.join(families, n) for n in os.listdir(families) if n.endswith(".py"))
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def card_key(card, calibrated=None):
    """What every engine of a card is made from, before the frame size: the card (its
    precision too), the model file's sha256 (and the calibrated graph's, `calibrated` its
    path), the rewriting code and edge's version."""
    from edge import __version__
    made = {"card": card.data, "model_sha256": card.model["sha256"],
            "rewriting": _rewriting_code(), "edge": __version__}
    if calibrated:
        with open(calibrated, "rb") as f:
            made["calibrated_sha256"] = hashlib.sha256(f.read()).hexdigest()
    text = json.dumps(made, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class _Lazy:
    """A value made on first use (`get`) by `make`, or given."""

    def __init__(self, make, value=None):
        self.make = make
        self.value = value

    def get(self):
        if self.value is None:
            self.value = self.make()
        return self.value


def engine_label(card_name, width, height, reference_size=None, batch=None):
    """The name of a card's engine for frames (and a reference) of a size, and for batches of
    up to `batch` frames: logs, files."""
    label = "{}-{}x{}".format(card_name, width, height)
    if reference_size:
        label += "-ref{}x{}".format(*reference_size)
    if batch:
        label += "-b{}".format(batch)
    return label


