"""TensorRT backend: the rewritten graph built into an engine and run on the GPU.

Supported: TensorRT 8.2 (JetPack 4.6.1/4.6.2, the Jetson Nano's last), 8.4, 8.5, 8.6 (JetPack 5
and 6.0) and 10.x (JetPack 6.1+, desktops). What differs between them is kept in three plain
functions (`check_version`, `api_for`, `frame_dtype_for`) that CI tests without a GPU.

`tensorrt` and `pycuda` are imported inside functions only: edge.backends imports this module
to ask `available()`, which must answer on machines that have neither.

CUDA context: TensorRT uses the CUDA runtime, and the runtime uses the device's primary
context. pycuda retains that same context (no pycuda.autoinit, which would create a second one
bound to the importing thread) and every call that touches CUDA, from whichever thread
(capture allocates frames, the infer thread runs engines), pushes it and pops it once.

Memory: on an integrated GPU (Jetson) what the GPU reads or writes lives in mapped pinned host
memory, so TensorRT reads the bytes the camera wrote and writes where the CPU reads, without a
copy. On a discrete GPU it lives in pinned host memory and each inference copies it over on
the engine's stream. Where the CPU itself reads the frame (TensorRT < 8.5 takes no uint8, so
the host casts each frame to float32), the frame stays in ordinary, cached memory and only the
float32 copy is pinned: a Nano's CPU does not cache pinned memory (cc 5.3 is not I/O coherent).

Batches: an engine built from a batched graph (edge.graph) has a dynamic first dimension
and an optimisation profile of 1..max_batch frames; several cameras' frames are copied into
its input and run at once (`bind_batch`, `infer_batch`), the batch's shape set per run.

Tactic sources (`engine.tactic_sources`): on a Jetson the builder is kept off cuBLAS and cuDNN
by default (about 650 MiB together on a Nano 2GB), so the build does not load them and its
engines do not need them; docs/tensorrt.md, "Tactic sources and libraries", says what each
version's run time then loads.

Nothing in this module has run on a GPU yet: see docs/tensorrt.md for what was checked
against which documentation and what is UNCONFIRMED.
"""

import logging
import os
import re
import threading
import weakref

import numpy as np

from edge.backends import Backend, Engine, register
from edge.backends.tactics import (LIBRARIES_OFF_BY_DEFAULT, LIBRARY_SOURCES, TACTIC_SOURCES,
                                   parse_tactic_sources, resolve_tactic_sources,
                                   tactic_libraries)
from edge.files import atomic_write
from edge.errors import ConfigError, EdgeError, ModelError

logger = logging.getLogger(__name__)

OLDEST = (8, 2)       # JetPack 4.6.1/4.6.2: the newest a Jetson Nano can run, the oldest checked
NEWEST = (11, 0)      # exclusive: TensorRT 11 removed BuilderFlag.FP16
TENSOR_API = (8, 5)   # num_io_tensors / set_tensor_address / execute_async_v3 appear
UINT8_INPUTS = (8, 5)  # the ONNX parser imports UINT8 network inputs from 8.5 on
MEMORY_POOLS = (8, 4)  # config.set_memory_pool_limit replaces max_workspace_size
NO_EXPLICIT_BATCH_FLAG = (10, 0)   # networks are always explicit batch; the flag is ignored
FP16_QUERY_DEPRECATED = (10, 5)    # builder.platform_has_fast_fp16 deprecated

L4T_RELEASE = "/etc/nv_tegra_release"


def parse_version(version_string):
    """(major, minor, patch) of a TensorRT version string such as "8.2.1.8"; None if unreadable."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version_string))
    if not match:
        return None
    return tuple(int(part or 0) for part in match.groups())


def check_version(version_string):
    """None when this TensorRT version is supported, else the reason it is not (one line)."""
    version = parse_version(version_string)
    if version is None:
        return "TensorRT version {!r} is not understood".format(version_string)
    if version[:2] < OLDEST:
        return "TensorRT {} is older than 8.2: upgrade to JetPack 4.6.1+".format(version_string)
    if version[:2] >= NEWEST:
        return ("TensorRT {} removed the FP16 builder flag (strongly typed networks only): "
                "install TensorRT 10.x or use --backend ort".format(version_string))
    return None


def _known(version_string):
    version = parse_version(version_string)
    if version is None:
        raise ValueError("TensorRT version {!r} is not understood".format(version_string))
    return version


def api_for(version_string):
    """The execution API: bindings (8.2-8.4, execute_async_v2) or tensors (8.5+, _v3)."""
    return "bindings" if _known(version_string)[:2] < TENSOR_API else "tensors"


def frame_dtype_for(version_string):
    """The frame dtype of the rewritten graph: float32 before 8.5 (no UINT8 there), else uint8."""
    return "float32" if _known(version_string)[:2] < UINT8_INPUTS else "uint8"



def _apply_tactic_sources(trt, config, resolved):
    """Set the resolved sources on a builder config as edits of its defaults
    (`get_tactic_sources`, `set_tactic_sources(mask)` -> bool: pyCore.cpp 8.2.1 to v10.16);
    the bit of a source is `1 << int(trt.TacticSource.X)` (pyCoreDoc.h, set_tactic_sources)."""
    if resolved == "default":
        return
    mask = int(config.get_tactic_sources())
    for sign, name in parse_tactic_sources(resolved):
        member = getattr(trt.TacticSource, name, None)
        if member is None:
            raise RuntimeError("TensorRT {} has no tactic source {}; set engine.tactic_sources "
                               "to auto".format(trt.__version__, name))
        bit = 1 << int(member)
        mask = mask | bit if sign == "+" else mask & ~bit
    # "will not be updated if the provided value is invalid" (NvInfer.h, setTacticSources)
    if not config.set_tactic_sources(mask):
        raise RuntimeError("TensorRT {} refused the tactic sources {} (engine.tactic_sources); "
                           "set it to default".format(trt.__version__, resolved))
    members = [getattr(trt.TacticSource, name, None) for name, _ in LIBRARY_SOURCES]
    if not any(m is not None and mask >> int(m) & 1 for m in members):
        _core_without_libraries(trt, config)


def _core_without_libraries(trt, config):
    """With cuBLAS, cuBLAS LT and cuDNN all off, also set 8.5's and 8.6's preview feature
    DISABLE_EXTERNAL_TACTIC_SOURCES_FOR_CORE_0805 (NvInfer.h 8.5.1: off by default; v8.6.1:
    on by default; gone in v10.0.0), as NVIDIA's answer for running 8.5 without those
    libraries does (NVIDIA/TensorRT#3376). By the header's words it only keeps the core off
    sources that are off already; it is set because that answer sets it, at no cost."""
    features = getattr(trt, "PreviewFeature", None)
    feature = getattr(features, "DISABLE_EXTERNAL_TACTIC_SOURCES_FOR_CORE_0805", None)
    if feature is not None and hasattr(config, "set_preview_feature"):
        config.set_preview_feature(feature, True)


def timing_cache_path(out_path, version_string):
    """Where the timing cache for engines built into out_path's folder lives."""
    folder = os.path.dirname(os.path.abspath(out_path))
    return os.path.join(folder, "timing-{}.cache".format(version_string))


def l4t_release(path=L4T_RELEASE):
    """First line of /etc/nv_tegra_release (the Jetson's L4T release), or None elsewhere."""
    try:
        with open(path) as f:
            line = f.readline().strip()
    except (IOError, OSError):
        return None
    return line or None


def _one_line(text):
    return " ".join(str(text).split())


# TensorRT DataType member -> numpy dtype, for the I/O types an engine built here can have.
# Not trt.nptype: before 8.6 it reads np.bool, which numpy 1.24 removed, so it raises
# AttributeError for every type (NVIDIA/TensorRT#2557, #2701 on 8.5.3.1; fixed in 8.6).
NUMPY_DTYPES = (("FLOAT", "float32"), ("HALF", "float16"), ("INT8", "int8"), ("INT32", "int32"),
                ("INT64", "int64"), ("BOOL", "bool"), ("UINT8", "uint8"))


def numpy_dtype(trt, data_type):
    """The numpy dtype of a TensorRT DataType, or None (BF16, FP8, ... have none)."""
    for member, dtype in NUMPY_DTYPES:
        # getattr: 8.2 has no UINT8, 8.x no INT64.
        if data_type == getattr(trt.DataType, member, None):
            return np.dtype(dtype)
    return None


def _pycuda_version():
    try:
        import pycuda
        return pycuda.VERSION_TEXT
    except (ImportError, AttributeError):
        return "(unknown version)"


# -- TensorRT logging -----------------------------------------------------------------------

_TRT_LOGGER = None


def _trt_logger(trt):
    """The process's one TensorRT logger, forwarding to Python logging.

    TensorRT 8.0's documentation says the logger is a process-wide singleton that every
    Builder and Runtime must share, so builds and loads in one process use this object.
    """
    global _TRT_LOGGER
    if _TRT_LOGGER is not None:
        return _TRT_LOGGER

    class TrtLog(trt.ILogger):
        """Routes TensorRT messages to the `edge.backends.trt` logger; remembers the last error."""

        def __init__(self):
            trt.ILogger.__init__(self)   # required for Python subclasses (TensorRT API docs)
            self.last_error = None

        def log(self, severity, msg):
            # Called from TensorRT's threads; it must never raise into C++.
            try:
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.last_error = _one_line(msg)
                    logger.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    logger.warning("TensorRT: %s", msg)
                elif severity == trt.ILogger.INFO:
                    logger.debug("TensorRT: %s", msg)
            except Exception:  # noqa: BLE001 (a logging failure must not abort a build)
                pass

    _TRT_LOGGER = TrtLog()
    return _TRT_LOGGER


# -- CUDA context ---------------------------------------------------------------------------

class CudaContext:
    """The device's primary context, made current around a block: one pop for each push.

    TensorRT runs on the CUDA runtime, which uses the primary context; retaining it here
    means TensorRT and pycuda share one context and the same device pointers. It is retained
    (created) at the first block, not before: the daemon builds every engine before it loads
    one, and on TensorRT < 8.5 frames are ordinary memory, so on a Nano the daemon holds no
    CUDA context (its libraries and state, hundreds of MiB: docs/memory.md) while the build
    child needs the memory. Device queries (name, attributes) need no context.
    """

    def __init__(self, cuda, device):
        self._cuda = cuda
        self._device = device
        self._lock = threading.Lock()
        self.context = None

    def __enter__(self):
        if self.context is None:
            with self._lock:
                if self.context is None:
                    # pycuda 2020.1+; retained, not made current
                    self.context = self._device.retain_primary_context()
        self.context.push()
        return self

    def __exit__(self, *exc_info):
        # Reached only when push() succeeded, so pushes and pops stay paired.
        self._cuda.Context.pop()
        return False


# -- Build (runs in the build child) ----------------------------------------------------------

def _progress_monitor(trt, progress):
    """An IProgressMonitor (TensorRT 9+/10.x) reporting the outermost phase's fraction done."""

    class BuildProgress(trt.IProgressMonitor):
        """Reports `progress("build", fraction)` as TensorRT completes optimizer steps."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            # TensorRT calls these from several internal threads (API docs): guard the state.
            self._lock = threading.Lock()
            self._top = None           # (phase name, step count) of the outermost phase

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                if parent_phase is None and num_steps > 0:
                    with self._lock:
                        self._top = (phase_name, num_steps)
                    progress("build", 0.0)
            except Exception:  # noqa: BLE001 (never raise into TensorRT)
                logger.debug("progress report failed", exc_info=True)

        def step_complete(self, phase_name, step):
            try:
                with self._lock:
                    top = self._top
                if top is not None and phase_name == top[0]:
                    progress("build", min(1.0, (step + 1) / float(top[1])))
            except Exception:  # noqa: BLE001
                logger.debug("progress report failed", exc_info=True)
            return True                # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return BuildProgress()


def _fast_fp16(builder, version):
    """Whether to set the FP16 flag: the builder's answer where asking it is not deprecated."""
    # 10.5 deprecated platform_has_fast_fp16 ("query data type support from CUDA directly").
    # The FP16 flag only allows FP16 kernels: TensorRT keeps FP32 ones where they are faster.
    if version[:2] >= FP16_QUERY_DEPRECATED or not hasattr(builder, "platform_has_fast_fp16"):
        return True
    return bool(builder.platform_has_fast_fp16)


def _check_opset(onnx_path, version_string):
    """RuntimeError when the graph's opset is newer than this TensorRT's parser documents:
    past it a parser may import a node in an older form without a word (8.2's ReduceMax
    ignores opset 18's axes input and reduces every axis), so the engine would be wrong."""
    import onnx
    from edge import nodes
    from edge.backends import trtcheck
    opset = nodes.model_opset(onnx.load(onnx_path, load_external_data=False))
    limit = trtcheck.parser_opset(parse_version(version_string))
    if limit is not None and opset > limit:
        raise RuntimeError("{}: opset {}, but TensorRT {} imports up to opset {}; export the "
                           "model at opset {} (e.g. `yolo export format=onnx opset={}`) or use "
                           "--backend ort".format(os.path.basename(onnx_path), opset,
                                                  version_string, limit, limit, limit))


def _add_batch_profile(builder, network, config, batch):
    """The optimisation profile of a batched graph: every input with a dynamic first
    dimension takes 1 to `batch` frames, tuned for `batch` (all cameras at once). The same
    calls from 8.2 to 10.x; without a profile a dynamic input fails the build."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if shape and shape[0] == -1:
            rest = shape[1:]
            profile.set_shape(tensor.name, (1,) + rest, (batch,) + rest, (batch,) + rest)
    config.add_optimization_profile(profile)


def _attach_timing_cache(config, path):
    """Load the timing cache at path into the builder config, or start an empty one."""
    cache = None
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                cache = config.create_timing_cache(f.read())
            # The cache header holds the device's properties: a mismatch is refused (False)
            # rather than mixing timings from another GPU or TensorRT into this build.
            if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
                logger.warning("timing cache %s does not match this device; starting a new one",
                               path)
                cache = None
        except Exception as e:  # noqa: BLE001 (a corrupt cache only costs build time)
            logger.warning("timing cache %s cannot be used (%s); starting a new one", path,
                           _one_line(e))
            cache = None
    if cache is None:
        # "If an empty cache is provided, a new cache will be created" (8.2 docstring).
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, path):
    try:
        atomic_write(path, config.get_timing_cache().serialize())
    except Exception as e:  # noqa: BLE001 (the engine is built; the cache is an optimisation)
        logger.warning("timing cache %s could not be saved: %s", path, _one_line(e))


# -- Memory ---------------------------------------------------------------------------------

class TrtBinding:
    """One frame slot bound to an engine: device addresses for every input and output.

    `outputs` are the arrays the decoders read (mapped on a Jetson: TensorRT writes there).
    """

    __slots__ = ("image", "outputs", "addresses", "pointers", "staging", "uploads",
                 "downloads", "fixed", "frame_device", "owned")

    def __init__(self):
        self.image = None          # the frame array this binding reads (the slot's image)
        self.outputs = {}          # name -> numpy array written by every inference
        self.addresses = {}        # tensor name -> device address bound for it
        self.pointers = []         # device addresses in binding-index order (TensorRT < 8.5)
        self.staging = None        # float32 copy of the frame for TensorRT < 8.5, else None
        self.uploads = []          # (device allocation, host array, pinned) copied in per run
        self.downloads = []        # (host array, device allocation) copied out per run
        self.fixed = []            # host arrays of fixed inputs, alive while TensorRT reads them
        self.frame_device = None   # device buffer for a frame that is not mapped
        self.owned = []            # device allocations freed when the engine closes


class TrtBatchBinding:
    """The input of a batched engine (its own buffer of `batch` frames, each copied into its
    row) and its outputs with the batch first, rows [:b] written by a run of b frames."""

    __slots__ = ("outputs", "addresses", "pointers", "staging", "input_device", "row_bytes",
                 "downloads", "owned")

    def __init__(self):
        self.outputs = {}          # name -> (batch, ...) array written by every inference
        self.addresses = {}        # tensor name -> device address bound for it
        self.pointers = []         # device addresses in binding-index order (TensorRT < 8.5)
        self.staging = None        # TensorRT < 8.5: float32 (batch, H, W, 3) the host casts into
        self.input_device = None   # device buffer of the frames, where the GPU does not map them
        self.row_bytes = 0         # bytes of one frame in the input buffer
        self.downloads = []        # (host array, device allocation) copied out per run
        self.owned = []            # device allocations freed when the engine closes


class TrtEngine(Engine):
    """A deserialized engine with one execution context and one stream."""

    def __init__(self, backend, engine, label, batch=None):
        from edge.nodes import FRAME_INPUT
        trt, cuda = backend.trt, backend.cuda
        self.backend = backend
        self.label = label
        self.batch = batch         # an engine with a batch dimension: at most this many frames
        self.api = backend.api
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            # Not a ModelError: rebuilding the engine would not give the GPU more memory.
            raise EdgeError("{}: TensorRT could not create an execution context (GPU memory "
                            "exhausted?); close other GPU programs or use a smaller model"
                            .format(label))
        self.stream = cuda.Stream()
        self._lock = threading.Lock()      # one execution context: one inference at a time
        self._bindings = []
        self._closed = False

        tensors = self._io_tensors(trt, engine)
        self.order = [name for name, _, _, _ in tensors]          # binding-index order
        inputs = [(n, s, d) for n, s, d, is_input in tensors if is_input]
        self.outputs = [(n, s, d) for n, s, d, is_input in tensors if not is_input]
        frame = [t for t in inputs if t[0] == FRAME_INPUT]
        if not frame:
            raise ModelError("{}: the engine has no {!r} input; delete it so that it is rebuilt "
                             "from the rewritten graph".format(label, FRAME_INPUT))
        self.inputs = frame + [t for t in inputs if t[0] != FRAME_INPUT]
        for name, shape, _ in self.inputs + self.outputs:
            # Static, but for the first dimension of a batched engine (its profile's range).
            fixed = shape[1:] if batch and shape and shape[0] == -1 else shape
            if any(d < 0 for d in fixed) or (batch and (not shape or shape[0] != -1)):
                raise ModelError("{}: tensor {!r} has the shape {}, not what edge builds {}; "
                                 "delete this engine so that it is rebuilt".format(
                                     label, name, shape, "(a dynamic batch first)" if batch
                                     else "(static)"))
        if batch and len(self.inputs) > 1:
            raise ModelError("{}: a batched engine takes frames only; delete it so that it is "
                             "rebuilt".format(label))

    def _io_tensors(self, trt, engine):
        """[(name, shape, numpy dtype, is_input)] in the engine's binding order."""
        tensors = []
        if self.api == "bindings":
            # TensorRT 8.2-8.4: index-based bindings (deprecated in 8.5, removed in 10.0).
            for i in range(engine.num_bindings):
                name = engine.get_binding_name(i)
                tensors.append((name, tuple(engine.get_binding_shape(i)),
                                self._dtype(trt, name, engine.get_binding_dtype(i)),
                                bool(engine.binding_is_input(i))))
        else:
            # TensorRT 8.5+: name-based I/O tensors, the only API in 10.x.
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                tensors.append((name, tuple(engine.get_tensor_shape(name)),
                                self._dtype(trt, name, engine.get_tensor_dtype(name)),
                                engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT))
        return tensors

    def _dtype(self, trt, name, data_type):
        dtype = numpy_dtype(trt, data_type)
        if dtype is None:
            raise ModelError("{}: tensor {!r} has TensorRT type {}, which numpy cannot hold; "
                             "delete the engine so that it is rebuilt from the rewritten graph"
                             .format(self.label, name, data_type))
        return dtype

    def _check_open(self):
        if self._closed:
            raise RuntimeError("{}: engine used after close()".format(self.label))

    def bind(self, frame, extra=None):
        self._check_open()
        with self.backend.context:
            binding = self._bind(frame, extra or {})
        self._bindings.append(binding)
        return binding

    def _bind(self, frame, extra):
        backend, cuda = self.backend, self.backend.cuda
        binding = TrtBinding()
        for name, shape, dtype in self.inputs[1:]:
            if name not in extra:
                raise ValueError("{}: input {!r} needs a fixed array".format(self.label, name))
            source = np.asarray(extra[name])
            if source.shape != shape:
                raise ValueError("{}: input {!r} is {}, the engine was built for {}".format(
                    self.label, name, source.shape, shape))
            # Copied once: the reference image is fixed for the binding's life (uint8 -> float32
            # on TensorRT < 8.5, whose graphs take float inputs).
            host = backend._allocate(shape, dtype)
            np.copyto(host, source, casting="unsafe")
            binding.fixed.append(host)
            address = backend.mapped_pointer(host)
            if address is None:
                device = cuda.mem_alloc(host.nbytes)
                binding.owned.append(device)
                cuda.memcpy_htod_async(device, host, self.stream)
                address = int(device)
            binding.addresses[name] = address
        self._bind_outputs(binding)
        name, shape, dtype = self.inputs[0]
        if dtype != np.uint8:
            # The documented exception (TensorRT < 8.5 has no UINT8): infer casts the frame on
            # the host into this preallocated float32 buffer, which TensorRT then reads.
            binding.staging = backend._allocate(shape, dtype)
        self._point_frame(binding, frame)
        return binding

    def _bind_outputs(self, binding, batch=None):
        """The binding's output arrays (`batch` rows first for a batched engine), mapped on a
        Jetson, else with a device buffer each copied out per run."""
        backend, cuda = self.backend, self.backend.cuda
        for name, shape, dtype in self.outputs:
            # Nano (cc 5.3) is not I/O coherent: mapped memory is uncached for the CPU, so the
            # graph reduces its outputs (top-k boxes, mutual matches) before they land here.
            host = backend._allocate(shape if batch is None else (batch,) + tuple(shape[1:]),
                                     dtype)
            binding.outputs[name] = host
            address = backend.mapped_pointer(host)
            if address is None:
                device = cuda.mem_alloc(host.nbytes)
                binding.owned.append(device)
                binding.downloads.append((host, device))
                address = int(device)
            binding.addresses[name] = address

    def _point_frame(self, binding, frame):
        """Bind the slot's image: its own mapped address when it has one, else a device copy."""
        backend, cuda = self.backend, self.backend.cuda
        name, shape, _ = self.inputs[0]
        image = frame.image
        if image.shape != shape:
            raise ValueError("{}: frame is {}, the engine was built for {}".format(
                self.label, image.shape, shape))
        binding.image = image
        source = binding.staging if binding.staging is not None else image
        address = backend.mapped_pointer(source)
        binding.uploads = []
        if address is None:
            # Discrete GPU, or a frame not allocated by this backend: one copy per inference.
            if binding.frame_device is None:
                binding.frame_device = cuda.mem_alloc(source.nbytes)
                binding.owned.append(binding.frame_device)
            binding.uploads = [(binding.frame_device, source, backend.is_pinned(source))]
            address = int(binding.frame_device)
        binding.addresses[name] = address
        binding.pointers = [binding.addresses[n] for n in self.order]

    def rebind_frame(self, binding, frame):
        self._check_open()
        with self.backend.context:
            self._point_frame(binding, frame)

    # Batches: several cameras' frames in one run of an engine with a dynamic first
    # dimension (built with an optimisation profile of 1..batch frames, TrtBackend.build).

    def bind_batch(self):
        self._check_open()
        with self.backend.context:
            binding = self._bind_batch()
        self._bindings.append(binding)
        return binding

    def _bind_batch(self):
        backend, cuda = self.backend, self.backend.cuda
        binding = TrtBatchBinding()
        name, shape, dtype = self.inputs[0]
        frames = (self.batch,) + tuple(shape[1:])
        binding.row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        address = None
        if dtype != np.uint8:
            # TensorRT < 8.5 (no UINT8): the host casts each frame into its row of a float32
            # batch, mapped on a Jetson, as for single frames.
            binding.staging = backend._allocate(frames, dtype)
            address = backend.mapped_pointer(binding.staging)
        if address is None:
            # uint8 frames: one device buffer, each frame copied into its row on the GPU (from
            # its mapped address on a Jetson, so the CPU never reads it); and the float32
            # batch of a discrete GPU.
            binding.input_device = cuda.mem_alloc(int(np.prod(frames)) *
                                                  np.dtype(dtype).itemsize)
            binding.owned.append(binding.input_device)
            address = int(binding.input_device)
        binding.addresses[name] = address
        self._bind_outputs(binding, self.batch)
        binding.pointers = [binding.addresses[n] for n in self.order]
        return binding

    def infer_batch(self, binding, frames):
        self._check_open()
        cuda = self.backend.cuda
        name, shape, _ = self.inputs[0]
        count = len(frames)
        if not 0 < count <= self.batch:
            raise ValueError("{}: {} frames; the engine takes 1 to {}".format(
                self.label, count, self.batch))
        with self._lock, self.backend.context:
            for row, frame in enumerate(frames):
                self._copy_row(binding, row, frame, shape)
            if binding.staging is not None and binding.input_device is not None:
                cuda.memcpy_htod_async(binding.input_device, binding.staging[:count],
                                       self.stream)
            dims = (count,) + tuple(shape[1:])
            if self.api == "bindings":
                # TensorRT 8.2-8.4: the context's binding dimensions, then pointers by index.
                if not self.context.set_binding_shape(self.order.index(name), dims):
                    raise RuntimeError("{}: TensorRT refused a batch of {} frames".format(
                        self.label, count))
                ok = self.context.execute_async_v2(binding.pointers, self.stream.handle)
            else:
                # TensorRT 8.5+/10.x: the input's shape by name, addresses by name.
                if not self.context.set_input_shape(name, dims):
                    raise RuntimeError("{}: TensorRT refused a batch of {} frames".format(
                        self.label, count))
                for tensor in self.order:
                    self.context.set_tensor_address(tensor, binding.addresses[tensor])
                ok = self.context.execute_async_v3(self.stream.handle)
            if not ok:
                raise RuntimeError("{}: TensorRT could not enqueue the inference ({})".format(
                    self.label, _trt_logger(self.backend.trt).last_error or "see the log"))
            for host, device in binding.downloads:
                cuda.memcpy_dtoh_async(host[:count], device, self.stream)
            self.stream.synchronize()

    def _copy_row(self, binding, row, frame, shape):
        """Frame `row` of a batch into the engine's input (the context is current)."""
        backend, cuda = self.backend, self.backend.cuda
        image = frame.image
        if image.shape != tuple(shape[1:]):
            raise ValueError("{}: frame is {}, the engine was built for {}".format(
                self.label, image.shape, tuple(shape[1:])))
        if binding.staging is not None:
            np.copyto(binding.staging[row], image, casting="unsafe")
            return
        target = int(binding.input_device) + row * binding.row_bytes
        source = backend.mapped_pointer(image)
        if source is not None:
            # Jetson: the copy engine reads the mapped frame; the CPU touches nothing.
            cuda.memcpy_dtod_async(target, source, binding.row_bytes, self.stream)
        elif backend.is_pinned(image):
            cuda.memcpy_htod_async(target, image, self.stream)
        else:
            # Pageable memory cannot be copied asynchronously (see _point_frame).
            cuda.memcpy_htod(target, image)

    def infer(self, binding):
        self._check_open()
        cuda = self.backend.cuda
        with self._lock, self.backend.context:
            if binding.staging is not None:
                np.copyto(binding.staging, binding.image, casting="unsafe")
            for device, host, pinned in binding.uploads:
                if pinned:
                    cuda.memcpy_htod_async(device, host, self.stream)
                else:
                    # Pageable memory cannot be copied asynchronously (pycuda docs); this copy
                    # runs on the legacy default stream, which orders it before our stream.
                    cuda.memcpy_htod(device, host)
            if self.api == "bindings":
                # TensorRT 8.2-8.4: device pointers in binding-index order.
                ok = self.context.execute_async_v2(binding.pointers, self.stream.handle)
            else:
                # TensorRT 8.5+/10.x: addresses by name. Set on every run because the slots'
                # bindings share this one execution context.
                for name in self.order:
                    self.context.set_tensor_address(name, binding.addresses[name])
                ok = self.context.execute_async_v3(self.stream.handle)
            if not ok:
                raise RuntimeError("{}: TensorRT could not enqueue the inference ({})".format(
                    self.label, _trt_logger(self.backend.trt).last_error or "see the log"))
            for host, device in binding.downloads:
                cuda.memcpy_dtoh_async(host, device, self.stream)
            # The CPU reads the outputs (and capture may rewrite the frame) only after this.
            self.stream.synchronize()

    def close(self):
        if self._closed:
            return
        self._closed = True
        with self._lock, self.backend.context:
            for binding in self._bindings:
                for device in binding.owned:
                    device.free()
                binding.owned = []
                if isinstance(binding, TrtBinding):
                    binding.uploads = []
                binding.downloads = []
            self._bindings = []
            # Destroyed here, with the context current: the execution context before the engine.
            self.context = None
            self.engine = None
            self.stream = None


@register
class TrtBackend(Backend):
    """TensorRT on the local NVIDIA GPU (Jetson or desktop), engines cached as `.engine` files."""

    name = "trt"
    suffix = ".engine"
    # Several cameras' frames in one run: one launch of every layer for all of them, which is
    # what DeepStream's nvstreammux batching exploits (UNCONFIRMED on a Nano: docs/tensorrt.md).
    batches = True
    # CUDA reserves far more virtual address space than it uses, so the build child cannot run
    # under RLIMIT_AS (edge.backends.build); the parent's resident-memory watch still applies.
    limit_address_space = False

    # The build's tactic sources, resolved from `engine.tactic_sources`: "default" leaves
    # TensorRT's own (and the build options, so the engine cache key, as they were).
    tactic_sources = "default"

    def __init__(self, threads=0, workspace_mb=256, tactic_sources="auto", **_):
        import pycuda.driver as cuda
        import tensorrt as trt
        self.trt = trt
        self.cuda = cuda
        self.version = trt.__version__
        reason = check_version(self.version)
        if reason:
            raise ConfigError("backend 'trt': " + reason)
        self.threads = threads        # unused: TensorRT schedules its own work on the GPU
        self.workspace_mb = int(workspace_mb)
        self.api = api_for(self.version)
        self.frame_dtype = frame_dtype_for(self.version)
        cuda.init()
        self.device = cuda.Device(0)
        self.context = CudaContext(cuda, self.device)
        attribute = cuda.device_attribute
        self.integrated = bool(self.device.get_attribute(attribute.INTEGRATED))
        # Zero copy only where the GPU shares the host's memory (Jetson); on a discrete GPU a
        # mapped buffer would be read over PCIe on every access.
        self.zero_copy = self.integrated and bool(
            self.device.get_attribute(attribute.CAN_MAP_HOST_MEMORY))
        self.tactic_sources = self._tactic_sources(tactic_sources)
        self._init_state()

    def _tactic_sources(self, setting):
        """The resolved `engine.tactic_sources` for this TensorRT and GPU; ConfigError when it
        names a source this version lacks (the installed enum decides, not a table)."""
        have = [name for name, _ in TACTIC_SOURCES
                if getattr(self.trt.TacticSource, name, None) is not None]
        try:
            resolved = resolve_tactic_sources(setting, parse_version(self.version),
                                              self.integrated, have)
        except ValueError as e:
            raise ConfigError("engine.tactic_sources: {}".format(e))
        edits = () if resolved == "default" else parse_tactic_sources(resolved)
        libraries = dict(LIBRARY_SOURCES)
        if parse_version(self.version)[:2] >= LIBRARIES_OFF_BY_DEFAULT and any(
                sign == "+" and name in libraries for sign, name in edits):
            logger.warning("engine.tactic_sources %s: TensorRT %s deprecates the cuBLAS and "
                           "cuDNN tactic sources", resolved, self.version)
        return resolved

    def _init_state(self):
        self._pinned = {}                  # data address -> (weakref to array, device address)
        self._pinned_lock = threading.RLock()   # RLock: weakref callbacks may run inside it
        self._warned_unmapped = False
        self._runtime = None               # one trt.Runtime for every engine of the process
        self._runtime_lock = threading.Lock()   # two task threads may load engines at once

    @classmethod
    def available(cls):
        try:
            import tensorrt as trt
        except ImportError as e:
            return "tensorrt is not installed ({})".format(e)
        except Exception as e:  # noqa: BLE001 (a broken install raises OSError and others)
            return "tensorrt cannot be imported ({})".format(_one_line(e))
        reason = check_version(getattr(trt, "__version__", "unknown"))
        if reason:
            return reason
        try:
            import pycuda.driver as cuda
        except ImportError as e:
            return "pycuda is not installed ({}); install the `gpu` extra".format(e)
        except Exception as e:  # noqa: BLE001
            return "pycuda cannot be imported ({})".format(_one_line(e))
        if not hasattr(cuda.Device, "retain_primary_context"):
            # Missing from pycuda 2019.x (inducer/pycuda#102, still open in November 2019),
            # which the `gpu` extra allows; without it TensorRT and pycuda share no context.
            return ("pycuda {} cannot retain the primary CUDA context; upgrade pycuda (2022.1 "
                    "is the last for Python 3.6)".format(_pycuda_version()))
        try:
            cuda.init()
            count = cuda.Device.count()
        except Exception as e:  # noqa: BLE001 (no driver, no device node, ...)
            return "CUDA cannot be initialised ({})".format(_one_line(e))
        if count < 1:
            return "no CUDA device found"
        return None

    def fingerprint(self):
        major, minor = self.device.compute_capability()
        return {"backend": self.name, "tensorrt": self.version, "device": self.device.name(),
                "compute_capability": "{}.{}".format(major, minor), "l4t": l4t_release(),
                "workspace_mb": self.workspace_mb}

    def build_options(self, card, batch=None):
        options = {"precision": card.precision, "workspace_mb": self.workspace_mb}
        if self.tactic_sources != "default":
            # Only when restricted: an engine built with TensorRT's defaults keeps its key.
            options["tactic_sources"] = self.tactic_sources
        if batch:
            options["max_batch"] = int(batch)    # the optimisation profile: 1..max_batch frames
        return options

    def int8_problem(self):
        from edge.precision import gpu_int8_problem
        return gpu_int8_problem(self.fingerprint())

    def build_estimate(self, model_size, options):
        from edge import memoryplan
        # The builder loads (and initialises) cuBLAS and cuDNN only where the build's tactic
        # sources enable them: TensorRT's defaults by version, then engine.tactic_sources.
        version = parse_version(self.version)
        libraries = tactic_libraries(version, options.get("tactic_sources", "default"))
        return memoryplan.trt_build(model_size, int(options.get("workspace_mb", 256)),
                                    memoryplan.builder_libraries(version, libraries))

    def describe(self):
        info = dict(self.fingerprint())
        # Not in fingerprint(): that is the key's device part, and the build options carry
        # the sources already. zero_copy is false once a mapping failed (copies since).
        info.update({"zero_copy": self.zero_copy and not self._warned_unmapped,
                     "frame_dtype": self.frame_dtype, "tactic_sources": self.tactic_sources})
        return info

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        # Runs in the build child: TensorRT creates its own CUDA context there.
        import tensorrt as trt
        version_string = trt.__version__
        reason = check_version(version_string)
        if reason:
            raise RuntimeError(reason)
        version = parse_version(version_string)
        log = _trt_logger(trt)
        log.last_error = None

        progress("parse", None)
        _check_opset(onnx_path, version_string)
        builder = trt.Builder(log)
        flags = 0
        if version[:2] < NO_EXPLICIT_BATCH_FLAG:
            # 8.x: the ONNX parser refuses implicit-batch networks. 10.x: deprecated, ignored.
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, log)
        with open(onnx_path, "rb") as f:
            model = f.read()
        if not parser.parse(model):
            # ParserError.__str__: "In node N (function): CODE: description"
            errors = [_one_line(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError("TensorRT {} cannot parse {}: {}".format(
                version_string, os.path.basename(onnx_path),
                "; ".join(errors) or log.last_error or "no reason given"))

        config = builder.create_builder_config()
        workspace = int(options.get("workspace_mb", 256)) << 20
        if version[:2] >= MEMORY_POOLS and hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        else:
            # 8.2/8.3: the workspace defaults to 0 ("no temporary memory"), so always set it.
            config.max_workspace_size = workspace
        precision = options.get("precision")
        if precision in ("fp16", "int8"):
            if _fast_fp16(builder, version):
                config.set_flag(trt.BuilderFlag.FP16)
            elif precision == "fp16":
                logger.warning("%s: this GPU has no fast FP16; building an FP32 engine",
                               os.path.basename(onnx_path))
        if precision == "int8":
            # Explicit quantization: the graph's Q/DQ pairs carry the scales (no calibrator);
            # the flag lets TensorRT run the quantized layers in INT8, FP16 the others.
            config.set_flag(trt.BuilderFlag.INT8)

        sources = options.get("tactic_sources", "default")
        _apply_tactic_sources(trt, config, sources)

        if options.get("max_batch"):
            _add_batch_profile(builder, network, config, int(options["max_batch"]))

        cache_path = timing_cache_path(out_path, version_string)
        _attach_timing_cache(config, cache_path)
        # A refused cache is reported through the logger as an error ("A failure will be
        # reported", set_timing_cache docstring); it must not be blamed for a failed build.
        log.last_error = None

        if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
            # TensorRT 10.x (and 9.x): step-level progress. The config keeps the monitor alive.
            config.progress_monitor = _progress_monitor(trt, progress)
        else:
            progress("build", None)   # 8.x: no progress interface, the phase is all we know
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            hint = ""
            if sources != "default":
                # A layer whose only implementations are cuDNN's or cuBLAS's has none left.
                hint = ("; if no implementation was found for a layer, set "
                        "engine.tactic_sources: default (built with {})".format(sources))
            raise RuntimeError("TensorRT {} could not build {}: {}{}".format(
                version_string, os.path.basename(onnx_path),
                log.last_error or "no reason given (out of memory? lower workspace_mb)", hint))

        progress("serialize", None)
        _save_timing_cache(config, cache_path)
        atomic_write(out_path, serialized)

    def load(self, path, label, background=False, batch=None):
        # `background` changes nothing here: the GPU serialises the engines' kernels anyway.
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (IOError, OSError) as e:
            raise ModelError("{}: engine file {} cannot be read ({}); it will be rebuilt".format(
                label, path, e.strerror or e))
        with self.context:
            with self._runtime_lock:
                if self._runtime is None:
                    # The runtime must outlive every engine it deserialized: kept for the
                    # process, and made once even when two threads load engines together.
                    self._runtime = self.trt.Runtime(_trt_logger(self.trt))
            try:
                engine = self._runtime.deserialize_cuda_engine(data)
            except Exception as e:  # noqa: BLE001 (some versions raise instead of None)
                logger.debug("deserialize_cuda_engine raised: %s", e)
                engine = None
            if engine is None:
                raise ModelError("{}: engine file {} could not be deserialized (built by another "
                                 "TensorRT version or corrupt); it will be rebuilt".format(
                                     label, path))
            return TrtEngine(self, engine, label, batch)

    # Frames and outputs ------------------------------------------------------------------

    def allocate(self, shape, dtype):
        """A frame: pinned (mapped on a Jetson) where the GPU reads it as it is; ordinary
        memory where the host casts it first (TensorRT < 8.5), since the CPU reads it then."""
        if np.dtype(dtype) != np.dtype(self.frame_dtype):
            return np.zeros(shape, dtype)
        with self.context:
            return self._allocate(shape, dtype)

    def _allocate(self, shape, dtype):
        """A zeroed pinned array, mapped into the GPU on a Jetson; the caller pushed the context."""
        cuda = self.cuda
        address = None
        array = None
        if self.zero_copy:
            # UNCONFIRMED whether the primary context always allows mapping. Either step may
            # fail: pycuda turns a failed cuMemHostAlloc / cuMemHostGetDevicePointer into a
            # cuda.Error subclass (wrap_cudadrv.cpp translate_cuda_error, v2022.1: MemoryError
            # for CUDA_ERROR_OUT_OF_MEMORY, LogicError for most other codes). Fall back to a
            # copy per inference rather than fail.
            try:
                array = cuda.pagelocked_empty(shape, dtype,
                                              mem_flags=cuda.host_alloc_flags.DEVICEMAP)
            except cuda.Error as e:
                self._unmapped(e)
            if array is not None:
                try:
                    # cuMemHostGetDevicePointer: where the GPU sees these same bytes.
                    address = int(array.base.get_device_pointer())
                except cuda.Error as e:
                    self._unmapped(e)
        if array is None:
            # Ordinary pinned memory: copied on the engine's stream. An error here (memory
            # really exhausted) is the caller's.
            array = cuda.pagelocked_empty(shape, dtype)
        array.fill(0)
        key = array.__array_interface__["data"][0]

        def forget(ref, key=key, allocation=array.base):
            with self._pinned_lock:
                entry = self._pinned.get(key)
                if entry is not None and entry[0] is ref:
                    del self._pinned[key]
            self._free_pinned(allocation)

        with self._pinned_lock:
            self._pinned[key] = (weakref.ref(array, forget), address)
        return array

    def _unmapped(self, error):
        """Note that mapped memory failed (once in the log): this buffer is copied instead."""
        if not self._warned_unmapped:
            logger.warning("mapped memory unavailable (%s): frames will be copied to the GPU",
                           _one_line(error))
            self._warned_unmapped = True

    def _free_pinned(self, allocation):
        """Free an array's pinned memory when the array dies, with the context current.

        pycuda frees a PagelockedHostAllocation only where its context is current or in the
        thread that retained that context; anywhere else it skips cuMemFreeHost without a word
        (cuda.hpp: scoped_context_activation, CUDAPP_CATCH_CLEANUP_ON_DEAD_CONTEXT). Frames die
        in the capture thread (a resized slot), bindings' outputs wherever the last reference
        goes: without this each of those would leak its pinned memory.
        """
        try:
            with self.context:
                allocation.free()
        except Exception as e:  # noqa: BLE001 (a finalizer must not raise; CUDA may be gone)
            logger.debug("pinned memory not freed: %s", _one_line(e))

    def _entry(self, array):
        key = array.__array_interface__["data"][0]
        with self._pinned_lock:
            entry = self._pinned.get(key)
        if entry is None or entry[0]() is not array:
            return None
        return entry

    def mapped_pointer(self, array):
        """The device address of an array from `allocate` that the GPU reads in place, else None."""
        entry = self._entry(array)
        return None if entry is None else entry[1]

    def is_pinned(self, array):
        """Whether the array is pinned host memory from `allocate` (async copies allowed)."""
        return self._entry(array) is not None
