"""ONNX Runtime backend: the CPU path of development hosts and CI, same graph as TensorRT."""

import logging

import numpy as np

from edge.backends import Backend, Engine, register
from edge.errors import ModelError

logger = logging.getLogger(__name__)

_NUMPY = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int64)": np.int64,
          "tensor(float16)": np.float16, "tensor(int32)": np.int32}


class Binding:
    """One slot bound to the session: the frame's buffer in, preallocated arrays out."""

    __slots__ = ("io", "image", "outputs", "fixed")

    def __init__(self, io, image, outputs, fixed):
        self.io = io
        self.image = image          # the array bound as input; rebound if the slot reallocates
        self.outputs = outputs      # name -> numpy array written by every run
        self.fixed = fixed          # fixed input arrays, kept alive while ONNX Runtime reads them


class BatchBinding:
    """The engine's own input for a batch of frames and outputs with the batch first; one
    IO binding per batch size, made on first use (views of the same arrays)."""

    __slots__ = ("images", "outputs", "runs", "views")

    def __init__(self, images, outputs):
        self.images = images        # (B, H, W, 3): each frame is copied into its row
        self.outputs = outputs      # name -> (B, ...) array, rows [:b] written by a run of b
        self.runs = {}              # b -> IO binding of rows [:b]
        self.views = []             # the row views bound, alive while ONNX Runtime reads them


class OrtEngine(Engine):
    """An InferenceSession whose inputs and outputs are bound once per slot."""

    def __init__(self, session, label, batch=None):
        self.session = session
        self.label = label
        self.batch = batch
        self.inputs = [(i.name, i.shape, _NUMPY[i.type]) for i in session.get_inputs()]
        self.outputs = [(o.name, o.shape, _NUMPY[o.type]) for o in session.get_outputs()]

    def bind_batch(self):
        name, shape, dtype = self.inputs[0]
        images = np.zeros((self.batch,) + tuple(shape[1:]), dtype)
        outputs = {name: np.empty((self.batch,) + tuple(shape[1:]), dtype)
                   for name, shape, dtype in self.outputs}
        return BatchBinding(images, outputs)

    def infer_batch(self, binding, frames):
        count = len(frames)
        for row, frame in enumerate(frames):
            np.copyto(binding.images[row], frame.image, casting="unsafe")
        io = binding.runs.get(count)
        if io is None:
            io = binding.runs[count] = self.session.io_binding()
            images = binding.images[:count]
            io.bind_cpu_input(self.inputs[0][0], images)
            binding.views.append(images)
            for name, _, dtype in self.outputs:
                rows = binding.outputs[name][:count]
                io.bind_output(name, "cpu", 0, dtype, list(rows.shape), rows.ctypes.data)
                binding.views.append(rows)
        self.session.run_with_iobinding(io)

    def bind(self, frame, extra=None):
        io = self.session.io_binding()
        fixed = []
        for name, _, _ in self.inputs[1:]:
            # Fixed inputs (a reference image) are bound once; the frame is input 0.
            fixed.append(np.ascontiguousarray((extra or {})[name]))
            io.bind_cpu_input(name, fixed[-1])
        io.bind_cpu_input(self.inputs[0][0], frame.image)
        outputs = {}
        for name, shape, dtype in self.outputs:
            array = np.empty(shape, dtype)
            io.bind_output(name, "cpu", 0, dtype, list(shape), array.ctypes.data)
            outputs[name] = array
        return Binding(io, frame.image, outputs, fixed)

    def rebind_frame(self, binding, frame):
        """Point the binding at the slot's image again after the slot was reallocated."""
        binding.io.bind_cpu_input(self.inputs[0][0], frame.image)
        binding.image = frame.image

    def infer(self, binding):
        self.session.run_with_iobinding(binding.io)


@register
class OrtBackend(Backend):
    """ONNX Runtime on the CPU; its artefact is the optimised model, cached like an engine."""

    name = "ort"
    suffix = ".onnx"
    limit_address_space = True    # no CUDA here: RLIMIT_AS works in the build child

    def __init__(self, threads=0, **_):
        import onnxruntime
        self.ort = onnxruntime
        self.threads = threads   # 0: ONNX Runtime's default (one per physical core)

    @classmethod
    def available(cls):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return "onnxruntime is not installed ({})".format(e)
        return None

    def fingerprint(self):
        import platform
        return {"backend": self.name, "onnxruntime": self.ort.__version__,
                "machine": platform.machine(), "cpu": _cpu_model()}

    def build_options(self, card, batch=None):
        # The CPU runs FP32 whatever the card asks of the GPU, or a calibrated QDQ graph's
        # INT8 (edge.precision). A batched graph's batch is dynamic, so its size changes
        # nothing here; that it is batched is said all the same, so that no lookup ever
        # takes a one-frame artefact for a batched one.
        options = {"precision": "int8" if card.precision == "int8" else "fp32",
                   "optimization": "all"}
        if batch:
            options["batched"] = True
        return options

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        import onnxruntime
        progress("optimize")
        so = _session_options(onnxruntime, 1)
        so.optimized_model_filepath = out_path
        onnxruntime.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        progress("done", 1.0)

    def load(self, path, label, background=False, batch=None):
        # A background engine on one thread: on two cores, a matcher on both slowed detection
        # by 12% at 1 Hz, on one by 10% (edge bench, docs in README "Performance").
        options = _session_options(self.ort, 1 if background else self.threads)
        # Already optimised by the build; optimising again would only cost start-up time.
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = self.ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for bad graphs
            raise ModelError("{}: ONNX Runtime cannot load {}: {}".format(
                label, path, str(e).splitlines()[0][:300]))
        return OrtEngine(session, label, batch)

    def load_uncached(self, model, label, background=False, batch=None):
        # Optimised in this process, in memory: what the build child would have cached.
        options = _session_options(self.ort, 1 if background else self.threads)
        try:
            session = self.ort.InferenceSession(model.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for bad graphs
            raise ModelError("{}: ONNX Runtime cannot load the rewritten model: {}".format(
                label, str(e).splitlines()[0][:300]))
        return OrtEngine(session, label, batch)

    def describe(self):
        return {"backend": self.name, "onnxruntime": self.ort.__version__, "device": "cpu"}


def _session_options(ort, threads):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # ONNX Runtime's threads spin between runs by default, burning the cores the daemon's
    # other threads need: capture (JPEG decode), tracking, publishing. `edge bench` on the
    # 2-core host, runs of each in turn: the image folder source (a JPEG decode per frame)
    # 16.7-18.0 frames/s spinning, 32.4-42.3 not; tracking against none, medians of 4-5
    # runs, 0.864 spinning, 0.915 not (single runs spread 0.83-1.02); the engine alone in
    # a loop loses a little without (45 against 45-65 frames/s, the host's speed drifting).
    try:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    except Exception:  # noqa: BLE001 (an old ONNX Runtime without the entry: spins)
        pass
    return options


def _cpu_model():
    """The CPU model name: optimised graphs may hold CPU-specific layouts."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
