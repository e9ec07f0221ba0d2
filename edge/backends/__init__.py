"""Inference backends behind one small interface: load a rewritten graph, infer a slot.

A backend module registers a class with `register`. `select("auto")` picks TensorRT when
tensorrt, pycuda and a GPU are present, else ONNX Runtime; nothing outside a backend asks
which one it is.
"""

import logging

from edge.errors import ConfigError

logger = logging.getLogger(__name__)

_BACKENDS = {}
_MODULES = {"ort": "edge.backends.ort", "trt": "edge.backends.trt"}


def register(cls):
    """Class decorator: register a backend under its `name`."""
    _BACKENDS[cls.name] = cls
    return cls


class Engine:
    """A loaded graph. `bind(frame, extra)` prepares a slot once; `infer(binding)` runs it.

    `inputs` and `outputs` list (name, shape, numpy dtype); the frame is inputs[0]. Outputs
    are written into preallocated numpy arrays owned by the binding (`binding.outputs`), so a
    slot's results stay valid until the slot is inferred again; `binding.image` is the frame
    array the binding reads.
    """

    inputs = ()
    outputs = ()
    # Engines with a batch dimension (several cameras' frames in one run) take up to `batch`
    # frames through bind_batch/infer_batch instead of bind/infer; None: one frame per run.
    batch = None

    def bind(self, frame, extra=None):
        """A binding of the slot's image (and fixed inputs by name in `extra`) to outputs."""
        raise NotImplementedError

    def rebind_frame(self, binding, frame):
        """Point a binding at the slot's image again after the slot was reallocated."""
        raise NotImplementedError

    def infer(self, binding):
        """Run the graph on a binding; its `outputs` hold the results afterwards."""
        raise NotImplementedError

    def bind_batch(self):
        """A batch binding: the engine's own input buffer for `batch` frames and output
        arrays with the batch first (`binding.outputs`), made once."""
        raise NotImplementedError

    def infer_batch(self, binding, frames):
        """Run the graph on up to `batch` frames, copied into the binding's input in order;
        row i of each of `binding.outputs` holds frame i's results afterwards."""
        raise NotImplementedError

    def close(self):
        """Free what the engine holds (device memory); safe to call twice."""


class Backend:
    """Builds artefacts from rewritten ONNX graphs (in a child process) and loads them.

    A backend's artefact (a TensorRT engine, an optimised ONNX model) is cached under a key
    made of the rewritten model's bytes, `fingerprint()` and the build options: see
    edge.backends.cache and edge.backends.build.
    """

    name = None
    suffix = ".bin"          # file suffix of the built artefact
    frame_dtype = "uint8"    # dtype the rewritten graph takes frames in (TensorRT < 8.5: float32)
    # The build child may cap its own address space (RLIMIT_AS); CUDA reserves far more
    # virtual memory than it uses, so GPU backends rely on the parent's RSS + swap watch.
    limit_address_space = True
    # Whether running several cameras' frames as one batch is faster than one by one here:
    # what `pipeline.batch: auto` follows (edge bench --cameras measures both).
    batches = False

    @classmethod
    def available(cls):
        """None when usable here, else the reason it is not."""
        return None

    def fingerprint(self):
        """Everything about this backend and device that invalidates a built artefact."""
        return {"backend": self.name}

    def build_options(self, card, batch=None):
        """Options passed to `build` in the child (precision, workspace, the most frames of a
        batch, ...): part of the key."""
        return {"precision": card.precision}

    def int8_problem(self):
        """Why INT8 engines (edge.precision) cannot pay here, or None."""
        return None

    def build_estimate(self, model_size, options):
        """Bytes a build of a `model_size`-byte rewritten graph with these options is expected
        to need (edge.memoryplan): what the pre-check asks of the system before it starts."""
        from edge import memoryplan
        return memoryplan.ort_build(model_size)

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        """Build the artefact from the ONNX file into out_path; runs in the build child.

        `progress(phase, fraction)` reports phases ("parse", "build", "serialize") and, where
        the backend can tell, the fraction done (0..1) or None.
        """
        raise NotImplementedError

    def load(self, path, label, background=False, batch=None):
        """An Engine from a built artefact; ModelError when the file is unusable (rebuilt).

        `background`: the engine of a task that runs at its own rate beside the every-frame
        one (matching beside detection); a backend may give it fewer resources so that it
        does not slow the every-frame task down (ONNX Runtime: one thread). `batch`: the
        most frames one run takes, for a graph with a batch dimension (edge.graph).
        """
        raise NotImplementedError

    def load_uncached(self, model, label, background=False, batch=None):
        """An Engine straight from the rewritten graph (an onnx.ModelProto), without a built
        artefact, for when the engine cache cannot be written; None when this backend needs
        its build (TensorRT: minutes, in the build child under the memory budget)."""
        return None

    def allocate(self, shape, dtype):
        """A frame buffer, in the memory the engine reads it from best (mapped on a Jetson)."""
        import numpy as np
        return np.zeros(shape, dtype)

    def describe(self):
        """Versions and device, for health and logs."""
        return dict(self.fingerprint())


def _cls(name):
    import importlib
    if name not in _BACKENDS and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError as e:
            logger.debug("backend %s cannot be imported: %s", name, e)
            return None
    return _BACKENDS.get(name)


def names():
    """Every backend name the config accepts."""
    return ["auto"] + sorted(_MODULES)


def select(name, **options):
    """A Backend instance for `auto`, `ort` or `trt`; ConfigError when it cannot run here."""
    order = ["trt", "ort"] if name == "auto" else [name]
    reasons = []
    for candidate in order:
        if candidate not in _MODULES:
            if name != "auto":
                raise ConfigError("backend {!r}: not available in this version; use one of {}"
                                  .format(name, ", ".join(names())))
            continue
        cls = _cls(candidate)
        reason = cls.available() if cls else "not installed"
        if reason is None:
            return cls(**options)
        reasons.append("{}: {}".format(candidate, reason))
    raise ConfigError("backend {!r}: cannot run here ({}); install the `cpu` extra for ONNX "
                      "Runtime or the `gpu` extra with TensorRT".format(name, "; ".join(reasons)))
