"""What every task kind shares: an engine per frame size, a binding per slot, batches of
several cameras' frames, and the envelope of its messages (edge.tasks has the registry).
"""

import collections
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from edge.stats import TaskStats
from edge.tasks import MAX_ENGINES, _Lazy, engine_label

logger = logging.getLogger(__name__)


class Unbatched:
    """A slot's own copy of its rows of a batch's outputs (`outputs`, as a binding's): the
    batch's buffers are the next batch's, while decoding reads this frame's after it."""

    __slots__ = ("outputs",)

    def __init__(self, outputs):
        self.outputs = outputs


_UNKNOWN = object()


class Task:
    """Shared engine handling: an engine per frame size, a binding per slot.

    A task kind is a subclass in its own module of edge.tasks, registered (`register`) and
    declared in edge.tasks.KINDS (its config key, flag and config section). Besides running
    frames it says, as class attributes and class methods, how it is built from the
    configuration (`options`), which references `edge build` makes its
    engines for (`build_references`), and what `edge doctor` runs it on and checks
    (`samples`, `summarise`, `compare`)."""

    name = None          # the cards' `task` this class runs
    topic = None         # the topic of its results
    config_key = None    # the config key (and `edge run` flag) that names its card: set
                         # by `register` from the kind's declaration (edge.tasks.KINDS)
    background = False   # runs at its own rate beside the every-frame task (Backend.load)
    frame_copies = 1     # images an engine of it reads per run (the memory plan)
    can_batch = False    # runs several cameras' frames as one batch (pipeline.batch)
    samples = (None, None)   # edge doctor: (frame, reference) files in engines/samples/
    thresholds = {}      # the cards' `thresholds` section: key -> edge.validate.Field
    references = False   # matches frames against stored references (the ReferenceStore)

    def draw(self, image: np.ndarray, message: dict) -> None:
        """Draw one of this task's result messages on its frame (snapshots); nothing by
        default."""

    @classmethod
    def options(cls, config: dict, maker: Any, store: Any = None, depth: Any = None) -> dict:
        """The keyword arguments `create` passes this kind for the configuration; `maker`
        the EngineMaker, `store` the ReferenceStore, `depth` the stereo depth task or None."""
        return {"device": config["device_id"]}

    @classmethod
    def build_references(cls, store: Any) -> List[Optional[np.ndarray]]:
        """The references `edge build` makes engines for: [None] (frames alone)."""
        return [None]

    @classmethod
    def reference_sizes(cls, store: Any, width: int,
                        height: int) -> List[Optional[Tuple[int, int]]]:
        """The reference sizes `edge build --export-onnx` writes graphs for, for frames of
        width x height: [None] (frames alone)."""
        return [None]

    @classmethod
    def summarise(cls, card: Any, outputs: Dict[str, np.ndarray]) -> dict:
        """What `edge doctor` compares of one run's outputs (JSON-able)."""
        raise NotImplementedError

    @classmethod
    def compare(cls, card: Any, got: dict, want: dict) -> Tuple[bool, str]:
        """(ok, one line) of two `summarise` results, within FP16's tolerance."""
        raise NotImplementedError

    def __init__(self, card: Any, engines: Any, model: Any, batching: bool = False) -> None:
        self.card = card
        self.maker = engines   # EngineMaker: cache, build child, backend
        self._model = model if isinstance(model, _Lazy) else _Lazy(None, model)
        self.card_key = None         # set by `create`: engines are then found by recipe
        self.engines = collections.OrderedDict()   # (width, height, ref) -> Engine, LRU
        self.seqs = {}               # camera name -> sequence number of its newest message
        self.frames = 0              # frames decoded into messages
        self.stats = TaskStats()
        self.camera_stats = {}       # camera name -> TaskStats of its frames (metrics)
        self.last_messages = {}      # camera name -> its newest message, for snapshots
        self.batching = batching     # several cameras' frames in one run, where possible
        self.sizes = {}              # (width, height) -> cameras delivering that size
        self._batch_problem = _UNKNOWN
        self._batches = {}           # engine key -> (engine, its batch binding)

    def stats_for(self, camera):
        """The figures of one camera's frames in this task (made at its first frame)."""
        stats = self.camera_stats.get(camera)
        if stats is None:
            stats = self.camera_stats[camera] = TaskStats()
        return stats

    @property
    def model(self):
        """The original onnx.ModelProto, read on first use."""
        return self._model.get()

    def engine_labels(self):
        """Labels of the engines this task holds (they are ready)."""
        return [self._label(*key) for key in self.engines]

    @property
    def precision(self):
        """What its engines compute in: the backend's build option for the card
        (edge.precision)."""
        return self.maker.backend.build_options(self.card).get("precision")

    def _label(self, width, height, reference_size):
        batch = None if reference_size else self.batch_for(width, height)
        return engine_label(self.card.name, width, height, reference_size, batch)

    def plan(self, sizes: Dict[Tuple[int, int], int]) -> None:
        """How many cameras deliver each frame size ({(width, height): count}), before the
        engines are made: a batching task builds its engines for that many frames."""
        self.sizes = dict(sizes)

    def batch_for(self, width, height):
        """The most frames one run of the engine for this size takes: the cameras of that
        size where the task batches and its model can (at least 2), else None."""
        count = self.sizes.get((width, height), 0)
        if not self.batching or count < 2:
            return None
        if self._batch_problem is _UNKNOWN:
            from edge import graph          # onnx: reads the model (see the footprint notes)
            self._batch_problem = graph.batch_problem(self.model, self.card)
            if self._batch_problem:
                logger.warning("%s runs one frame at a time: %s (a model exported with a "
                               "fixed batch of 1)", self.card.name, self._batch_problem)
        return None if self._batch_problem else count

    def serves(self, camera: Optional[str]) -> bool:
        """Whether frames of this camera are this task's at all (stereo depth: its pair's)."""
        return True

    def due(self, frame: Any, now: float) -> bool:
        """Whether this task runs on this frame (detection: every frame)."""
        return True

    def build(self, frame: Any) -> None:
        """Build, without loading, the engines `prepare` loads for frames like this one: the
        pipeline builds every task's engines before it loads any, so that no build runs
        beside loaded engines (together they would not fit a Nano 2GB)."""
        self.ensure_engine(frame.width, frame.height)

    def prepare(self, frame: Any) -> None:
        """Build or load the engines frames like this one need, before the pipeline runs."""
        self.engine_for(frame.width, frame.height)

    def ensure_engine(self, width, height, reference_size=None):
        """Build the artefact of `engine_for(width, height, reference_size)` into the cache
        (nothing when it is there or loaded), loading nothing."""
        if (width, height, reference_size) not in self.engines:
            rewritten, label, recipe, batch = self._engine_recipe(width, height, reference_size)
            self.maker.ensure(rewritten, self.card, label, recipe, batch)

    def _engine_recipe(self, width, height, reference_size):
        """(a callable making the rewritten graph, label, recipe, batch) of an engine."""
        dtype = self.maker.frame_dtype
        batch = None if reference_size else self.batch_for(width, height)

        def rewritten():
            from edge import graph      # onnx: only when no engine is cached for this
            return graph.rewrite(self.model, self.card, width, height, reference_size,
                                 dtype, batched=batch is not None)
        recipe = None if self.card_key is None else {
            "card_key": self.card_key, "frame": [width, height], "frame_dtype": dtype,
            "reference": list(reference_size) if reference_size else None,
            "batch": batch}
        return rewritten, self._label(width, height, reference_size), recipe, batch

    def engine_for(self, width, height, reference_size=None):
        """The engine for frames of this size, rewriting and loading it on first use."""
        key = (width, height, reference_size)
        engine = self.engines.get(key)
        if engine is not None:
            self.engines.move_to_end(key)
        else:
            started = time.monotonic()
            rewritten, label, recipe, batch = self._engine_recipe(width, height, reference_size)
            engine = self.maker.make(rewritten, self.card, label, self.background, recipe,
                                     batch=batch)
            self.engines[key] = engine
            while len(self.engines) > MAX_ENGINES:
                old_key, old = self.engines.popitem(last=False)
                self._batches.pop(old_key, None)
                old.close()
            logger.info("engine %s for %dx%d frames%s ready in %.1f s", self.card.name, width,
                        height, " in batches of up to {}".format(batch) if batch else "",
                        time.monotonic() - started)
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

    def infer_frames(self, frames: List[Any]) -> list:
        """Run the engines on frames of one or more cameras; what `decode` needs for each.

        Frames of one size go through that size's engine together where it takes batches
        (one run, the batch's time as each frame's inference time), else one by one.
        """
        if not self.batching:
            return [self.infer_frame(frame) for frame in frames]
        results = [None] * len(frames)
        groups = collections.OrderedDict()
        for i, frame in enumerate(frames):
            groups.setdefault((frame.width, frame.height), []).append(i)
        for (width, height), indices in groups.items():
            engine = self.engine_for(width, height)
            if not engine.batch:
                for i in indices:
                    results[i] = self.infer_frame(frames[i])
                continue
            binding = self._batch_binding(engine, (width, height, None))
            for start in range(0, len(indices), engine.batch):
                chunk = indices[start:start + engine.batch]
                batch = [frames[i] for i in chunk]
                started = time.perf_counter()
                engine.infer_batch(binding, batch)
                infer_ms = (time.perf_counter() - started) * 1000.0
                for row, i in enumerate(chunk):
                    results[i] = (self._unbatched(frames[i], binding, row), infer_ms)
        return results

    def _batch_binding(self, engine, key):
        held = self._batches.get(key)
        if held is None or held[0] is not engine:
            held = self._batches[key] = (engine, engine.bind_batch())
        return held[1]

    def _unbatched(self, frame, binding, row):
        """The slot's copy of its row of the batch's outputs (arrays made once per slot)."""
        key = (self.name, "batch")
        held = frame.outputs.get(key)
        if held is None or any(held.outputs[name].shape != array.shape[1:]
                               for name, array in binding.outputs.items()):
            held = frame.outputs[key] = Unbatched({
                name: np.empty(array.shape[1:], array.dtype)
                for name, array in binding.outputs.items()})
        for name, array in binding.outputs.items():
            np.copyto(held.outputs[name], array[row])
        return held

    def decode(self, frame: Any, inferred: Any) -> list:
        """The list of messages to publish for an inferred frame (dicts for the task's
        topic, `Side` for another); counts the frame."""
        raise NotImplementedError

    def health(self) -> dict:
        """Extra keys of this task in the health report."""
        return {}

    def picture(self) -> Optional[np.ndarray]:
        """A picture of the task's own newest result for snapshots (a depth map), or None."""
        return None

    def process(self, frame):
        """Infer and decode in the caller's thread (benchmarks, tools)."""
        return self.decode(frame, self.infer_frames([frame])[0])

    def new_message(self, frame, infer_ms):
        """The envelope of this task's next message about a frame: sequence numbers count
        per camera, so a robot that follows one camera sees every gap."""
        seq = self.seqs.get(frame.camera, 0) + 1
        self.seqs[frame.camera] = seq
        return envelope(self.device, self.card.name, seq, frame, infer_ms)


def envelope(device, model, seq, frame, infer_ms):
    """The fields every result message shares (DESIGN.md, MQTT); `camera` with named
    cameras."""
    message = {"v": 1, "device": device}
    if frame.camera is not None:
        message["camera"] = frame.camera
    message.update({
        "model": model,
        "seq": seq,
        "frame": {"index": frame.index, "ts": round(frame.ts, 6), "width": frame.width,
                  "height": frame.height, "name": frame.name},
        "latency_ms": {"total": round((time.time() - frame.ts) * 1000.0, 3),
                       "infer": round(infer_ms, 3)},
    })
    return message
