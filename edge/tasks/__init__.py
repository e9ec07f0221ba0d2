"""Tasks: what the pipeline does with a frame (detect, match), one small module each.

A task owns its engines (one per frame size: the rewritten graph is specialised to the size
of the frames it reads), binds each frame slot once, and turns the outputs into a message.
It works in two steps so that decoding one frame overlaps the inference of the next:
`infer_frame` runs the engines (the task's thread) and `decode` builds the messages from
the outputs bound to the slot (the pipeline's decode thread), before the slot is reused.
"""

import collections
import hashlib
import json
import logging
import os
import time

from edge import models
from edge.stats import TaskStats

logger = logging.getLogger(__name__)

_TASKS = {}

# Engines kept per task: a camera needs one; an image folder of mixed sizes would otherwise
# keep one per size it has seen.
MAX_ENGINES = 4


class Side(collections.namedtuple("Side", "topic message qos")):
    """A message of a task on a topic of its own (tracking's `events`), with its QoS; not a
    result of the frame (snapshots never draw it)."""


def register(cls):
    """Class decorator: register a task class under its `name` (a card's `task`)."""
    _TASKS[cls.name] = cls
    return cls


def create(card, engines, model_dir, mirror=None, **options):
    """The task for a card, with its model fetched and checked.

    The model file's sha256 is checked every time. The ONNX model itself is read (and checked
    against the card) only when no engine made from this card and model is cached: a device
    that starts from its cache never imports onnx (edge.backends.cache, Recipes).
    """
    from edge.tasks import detect, match  # noqa: F401  (registers)
    cls = _TASKS[card.task]
    path = models.ensure(card, model_dir, mirror)
    key = card_key(card)
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


def card_key(card):
    """What every engine of a card is made from, before the frame size: the card, the model
    file's sha256, the rewriting code and edge's version."""
    from edge import __version__
    text = json.dumps({"card": card.data, "model_sha256": card.model["sha256"],
                       "rewriting": _rewriting_code(), "edge": __version__},
                      sort_keys=True, separators=(",", ":"), default=str)
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


def engine_label(card_name, width, height, reference_size=None):
    """The name of a card's engine for frames (and a reference) of a size: logs, files."""
    label = "{}-{}x{}".format(card_name, width, height)
    if reference_size:
        label += "-ref{}x{}".format(*reference_size)
    return label


class Task:
    """Shared engine handling: an engine per frame size, a binding per slot."""

    name = None
    topic = None
    background = False   # runs at its own rate beside the every-frame task (Backend.load)

    def __init__(self, card, engines, model):
        self.card = card
        self.maker = engines   # EngineMaker: cache, build child, backend
        self._model = model if isinstance(model, _Lazy) else _Lazy(None, model)
        self.card_key = None         # set by `create`: engines are then found by recipe
        self.engines = collections.OrderedDict()   # (width, height) -> Engine, LRU
        self.seq = 0
        self.frames = 0              # frames decoded into messages
        self.stats = TaskStats()
        self.last_message = None     # the newest message, for snapshots

    @property
    def model(self):
        """The original onnx.ModelProto, read on first use."""
        return self._model.get()

    def engine_labels(self):
        """Labels of the engines this task holds (they are ready)."""
        return [self._label(*key) for key in self.engines]

    def _label(self, width, height, reference_size):
        return engine_label(self.card.name, width, height, reference_size)

    def due(self, frame, now):
        """Whether this task runs on this frame (detection: every frame)."""
        return True

    def prepare(self, frame):
        """Build or load the engines frames like this one need, before the pipeline runs."""
        self.engine_for(frame.width, frame.height)

    def engine_for(self, width, height, reference_size=None):
        """The engine for frames of this size, rewriting and loading it on first use."""
        key = (width, height, reference_size)
        engine = self.engines.get(key)
        if engine is not None:
            self.engines.move_to_end(key)
        else:
            started = time.monotonic()
            dtype = self.maker.frame_dtype

            def rewritten():
                from edge import graph      # onnx: only when no engine is cached for this
                return graph.rewrite(self.model, self.card, width, height, reference_size,
                                     dtype)
            recipe = None if self.card_key is None else {
                "card_key": self.card_key, "frame": [width, height], "frame_dtype": dtype,
                "reference": list(reference_size) if reference_size else None}
            label = self._label(width, height, reference_size)
            engine = self.maker.make(rewritten, self.card, label, self.background, recipe)
            self.engines[key] = engine
            while len(self.engines) > MAX_ENGINES:
                self.engines.popitem(last=False)[1].close()
            logger.info("engine %s for %dx%d frames ready in %.1f s", self.card.name, width,
                        height, time.monotonic() - started)
        return engine

    def binding_for(self, frame, key=None, reference=None):
        """This task's binding of the slot (per reference), made once, refreshed on change.

        `reference` is a fixed second image bound with the frame (matching); a binding is
        remade when the engine or the reference array changes.
        """
        size = None if reference is None else (reference.shape[1], reference.shape[0])
        engine = self.engine_for(frame.width, frame.height, size)
        key = key or self.name
        held = frame.outputs.get(key)
        if held is None or held[0] is not engine or held[2] is not reference:
            extra = None if reference is None else {engine.inputs[1][0]: reference}
            held = (engine, engine.bind(frame, extra), reference)
            frame.outputs[key] = held
        elif held[1].image is not frame.image:
            engine.rebind_frame(held[1], frame)
        return held[0], held[1]

    def infer(self, engine, binding):
        """Run the engine; the inference time in milliseconds."""
        started = time.perf_counter()
        engine.infer(binding)
        return (time.perf_counter() - started) * 1000.0

    def infer_frame(self, frame):
        """Run the engines on the frame; what `decode` needs (outputs stay in the slot)."""
        raise NotImplementedError

    def decode(self, frame, inferred):
        """The list of messages to publish for an inferred frame (dicts for the task's
        topic, `Side` for another); counts the frame."""
        raise NotImplementedError

    def health(self):
        """Extra keys of this task in the health report."""
        return {}

    def picture(self):
        """A picture of the task's own newest result for snapshots (a depth map), or None."""
        return None

    def process(self, frame):
        """Infer and decode in the caller's thread (benchmarks, tools)."""
        return self.decode(frame, self.infer_frame(frame))


def envelope(device, model, seq, frame, infer_ms):
    """The fields every result message shares (DESIGN.md, MQTT)."""
    return {
        "v": 1,
        "device": device,
        "model": model,
        "seq": seq,
        "frame": {"index": frame.index, "ts": round(frame.ts, 6), "width": frame.width,
                  "height": frame.height, "name": frame.name},
        "latency_ms": {"total": round((time.time() - frame.ts) * 1000.0, 3),
                       "infer": round(infer_ms, 3)},
    }
