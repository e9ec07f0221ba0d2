"""Model cards: the YAML files in engines/ that say what a model is and how to feed it."""

import copy
import os
import re
import sys

from edge import validate
from edge.errors import ConfigError
from edge.validate import Field

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _safe_file_name(value):
    if "/" in value or "\\" in value or value in (".", "..") or not _NAME.match(value):
        return "a plain file name (letters, digits, . _ -), no folders"
    return None


def _sha256(value):
    return None if _SHA256.match(value) else "64 lowercase hex digits"


def _positive(values):
    return None if all(v > 0 for v in values) else "every value must be > 0"


def _url(value):
    return None if value.startswith(("https://", "http://")) else "an http(s) URL"


def _task_kind(name):
    """None for a registered task kind (edge.tasks.KINDS), else the kinds there are."""
    from edge import tasks
    return None if name in tasks.names() else "one of " + ", ".join(tasks.names())


def _families():
    from edge import families
    return families.names()


SPEC = {
    "name": Field(str, check=_safe_file_name),
    "task": Field(str, check=_task_kind),
    "family": Field(str),
    "description": Field(str, default=""),
    "license": Field(str, default=""),
    "model": {
        "file": Field(str, check=_safe_file_name),
        "url": Field(str, check=_url),
        "sha256": Field(str, check=_sha256),
    },
    "input": {
        "size": Field(list, length=2, check=_positive, help="width, height"),
        "color": Field(str, default="bgr", choices=("bgr", "rgb", "gray")),
        "scale": Field(float, default=1.0),
        "mean": Field(list, default=[0.0, 0.0, 0.0], length=3),
        "std": Field(list, default=[1.0, 1.0, 1.0], length=3, check=_positive),
        "resize": Field(str, default="letterbox", choices=("letterbox", "stretch")),
        "pad": {
            "value": Field(float, default=114.0, min=0, max=255),
            "position": Field(str, default="top-left", choices=("top-left", "center")),
        },
    },
    "labels": Field(str, default=None, nullable=True),
    "thresholds": Field(dict, default={}),
    "candidates": Field(int, default=200, min=1, max=3840,
                        help="boxes the graph returns, best first (TensorRT TopK allows 3840)"),
    "precision": Field(str, default="fp16", choices=("fp16", "fp32"),
                       help="on a GPU, with engine.precision auto"),
    "calibration": {
        "images": Field(str, default=None, nullable=True,
                        help="folder of images (relative to the card) that engine.precision "
                             "int8 calibrates on when `edge calibrate` was not run"),
        "count": Field(int, default=120, min=1, max=100000,
                       help="calibration frames made from them"),
    },
}

class Card:
    """A validated model card; `path` is the file it came from."""

    def __init__(self, data, path):
        self.data = data
        self.path = path
        self.name = data["name"]
        self.task = data["task"]
        self.family = data["family"]
        self.model = data["model"]
        self.input = data["input"]
        self.thresholds = data["thresholds"]
        self.candidates = data["candidates"]
        self.precision = data["precision"]
        self.calibration = dict(data["calibration"])
        if self.calibration["images"]:
            self.calibration["images"] = os.path.join(os.path.dirname(path),
                                                      self.calibration["images"])
        self.calibrated = None      # the calibrated QDQ graph's path, at precision int8
        self.labels = load_labels(data["labels"], path)

    def at_precision(self, precision):
        """A copy of this card whose engines are built at `precision` (edge.precision); the
        precision is part of its data, so of every engine's key."""
        made = copy.copy(self)
        made.data = dict(self.data, precision=precision)
        made.precision = precision
        return made

    @property
    def input_size(self):
        """(width, height) the network expects."""
        return int(self.input["size"][0]), int(self.input["size"][1])

    def label(self, class_id):
        """The class name for an id, or its number as text when the card has no labels."""
        if 0 <= class_id < len(self.labels):
            return self.labels[class_id]
        return str(class_id)

    def __repr__(self):
        return "<Card {} ({})>".format(self.name, self.path)


def search_path():
    """Folders searched for cards by name, first match wins."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = []
    if os.environ.get("EDGE_CARDS"):
        paths.extend(os.environ["EDGE_CARDS"].split(os.pathsep))
    paths.append(os.path.join(os.path.dirname(here), "engines"))       # source tree, editable
    paths.append(os.path.join(sys.prefix, "share", "edge", "engines"))   # pip install
    return [p for p in paths if os.path.isdir(p)]


def available():
    """{name: path} of every card found on the search path."""
    found = {}
    for folder in search_path():
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(".yaml"):
                found.setdefault(entry[:-5], os.path.join(folder, entry))
    return found


def find(name_or_path):
    """The path of a card given by name (`yolox-nano`) or as a file path."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise ConfigError("model card {}: file not found".format(name_or_path))
        return name_or_path
    cards = available()
    if name_or_path not in cards:
        raise ConfigError("model card {!r}: unknown; available cards: {} (or give a path to a "
                          "card file)".format(name_or_path, ", ".join(sorted(cards)) or "none"))
    return cards[name_or_path]


def load(name_or_path):
    """A validated Card; ConfigError naming the card file and key when it is wrong."""
    path = find(name_or_path)
    where = "model card " + path
    raw = validate.load_yaml(path, "model card")
    data = validate.check(raw, SPEC, where)
    families = _families()
    if data["family"] not in families:
        raise ConfigError("{}: family: must be one of {} (got {})".format(
            where, ", ".join(families), validate.shown(data["family"])))
    from edge import families as registry
    expected = registry.get(data["family"]).task
    if expected != data["task"]:
        raise ConfigError("{}: task: family {} is a {} model, not {}".format(
            where, data["family"], expected, data["task"]))
    from edge import tasks
    data["thresholds"] = validate.check(data["thresholds"], tasks.kind(data["task"]).thresholds,
                                        where, "thresholds.")
    return Card(data, path)


def load_labels(labels, card_path):
    """Class names: a name from engines/labels/ (`coco80`) or a text file beside the card."""
    if not labels:
        return []
    candidates = [os.path.join(os.path.dirname(card_path), labels)]
    candidates += [os.path.join(folder, "labels", labels + ".txt") for folder in search_path()]
    for path in candidates:
        if os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
    raise ConfigError("model card {}: labels: {!r} not found; use a name from engines/labels/ "
                      "or a text file beside the card, one class per line".format(
                          card_path, labels))
