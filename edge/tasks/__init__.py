"""Tasks: what the pipeline does with a frame (detect, match), one small module each.

A task owns its engines (one per frame size: the rewritten graph is specialised to the size
of the frames it reads), binds each frame slot once, and turns the outputs into a message.
"""

import collections
import logging
import time

from edge import graph, models

logger = logging.getLogger(__name__)

_TASKS = {}

# Engines kept per task: a camera needs one; an image folder of mixed sizes would otherwise
# keep one per size it has seen.
MAX_ENGINES = 4


def register(cls):
    """Class decorator: register a task class under its `name` (a card's `task`)."""
    _TASKS[cls.name] = cls
    return cls


def create(card, backend, model_dir, mirror=None, **options):
    """The task for a card, with its model fetched and checked."""
    from edge.tasks import detect  # noqa: F401  (registers)
    cls = _TASKS[card.task]
    path = models.ensure(card, model_dir, mirror)
    return cls(card, backend, models.load_onnx(path, card), **options)


class Task:
    """Shared engine handling: an engine per frame size, a binding per slot."""

    name = None
    topic = None

    def __init__(self, card, backend, model):
        self.card = card
        self.backend = backend
        self.model = model           # the original onnx.ModelProto
        self.engines = collections.OrderedDict()   # (width, height) -> Engine, LRU
        self.seq = 0
        self.frames = 0
        self.infer_ms = 0.0

    def extra_inputs(self):
        """Fixed inputs bound with every slot besides the frame (a reference image)."""
        return None

    def engine_for(self, width, height):
        """The engine for frames of this size, rewriting and loading it on first use."""
        key = (width, height)
        engine = self.engines.get(key)
        if engine is not None:
            self.engines.move_to_end(key)
        else:
            started = time.monotonic()
            rewritten = graph.rewrite(self.model, self.card, width, height)
            engine = self.backend.load(rewritten, "{} for {}x{} frames".format(
                self.card.name, width, height))
            self.engines[key] = engine
            while len(self.engines) > MAX_ENGINES:
                self.engines.popitem(last=False)
            logger.info("engine %s for %dx%d frames ready in %.1f s", self.card.name, width,
                        height, time.monotonic() - started)
        return engine

    def binding_for(self, frame):
        """This task's binding of the slot, made once and refreshed if the slot changed."""
        engine = self.engine_for(frame.width, frame.height)
        held = frame.outputs.get(self.name)
        if held is None or held[0] is not engine:
            held = (engine, engine.bind(frame, self.extra_inputs()))
            frame.outputs[self.name] = held
        elif held[1].image is not frame.image:
            engine.rebind_frame(held[1], frame)
        return held

    def process(self, frame):
        """Infer the frame and return (message, infer_ms)."""
        engine, binding = self.binding_for(frame)
        started = time.perf_counter()
        engine.infer(binding)
        infer_ms = (time.perf_counter() - started) * 1000.0
        self.frames += 1
        self.seq += 1
        return self.message(frame, binding.outputs, infer_ms), infer_ms

    def message(self, frame, outputs, infer_ms):
        raise NotImplementedError


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
