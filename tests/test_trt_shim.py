"""The TensorRT backend where no GPU is: version rules, the reasons users see, lazy imports.

These run in CI. The engine itself is tested in tests/gpu/test_trt.py, which skips here.
"""

import enum
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from edge import backends
from edge.backends import trt
from edge.errors import ConfigError
from tests.conftest import ROOT

# Real version strings: JetPack 4.6.1 (Nano), JetPack 5.0.2, JetPack 5.1, JetPack 6.0,
# JetPack 6.1, the first TensorRT 11, and JetPack 4.4's TensorRT 7.
SUPPORTED = [
    ("8.2.1.8", "bindings", "float32"),
    ("8.4.3.1", "bindings", "float32"),
    ("8.5.2.2", "tensors", "uint8"),
    ("8.6.1", "tensors", "uint8"),
    ("10.3.0", "tensors", "uint8"),
]


@pytest.mark.parametrize("version, api, frame_dtype", SUPPORTED)
def test_supported_versions(version, api, frame_dtype):
    assert trt.check_version(version) is None
    assert trt.api_for(version) == api
    assert trt.frame_dtype_for(version) == frame_dtype


def test_tensorrt_7_asks_for_a_newer_jetpack():
    reason = trt.check_version("7.1.3")
    assert reason == "TensorRT 7.1.3 is older than 8.2: upgrade to JetPack 4.6.1+"


def test_tensorrt_11_says_what_was_removed_and_what_to_do():
    reason = trt.check_version("11.0.0")
    assert "TensorRT 11.0.0" in reason
    assert "FP16 builder flag" in reason and "strong" in reason
    assert "TensorRT 10.x" in reason and "--backend ort" in reason
    assert "\n" not in reason


def test_unreadable_version():
    assert "not understood" in trt.check_version("unknown")
    with pytest.raises(ValueError):
        trt.api_for("unknown")


def test_registered_as_trt_with_engine_files():
    assert backends._cls("trt") is trt.TrtBackend
    assert trt.TrtBackend.name == "trt" and trt.TrtBackend.suffix == ".engine"


@pytest.fixture
def without_tensorrt(monkeypatch):
    """This machine as CI sees it, even where a tensorrt package happens to be installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_select_trt_says_why(without_tensorrt):
    with pytest.raises(ConfigError) as info:
        backends.select("trt")
    message = str(info.value)
    assert "tensorrt is not installed" in message
    assert "\n" not in message


def test_auto_falls_back_to_onnx_runtime(without_tensorrt):
    pytest.importorskip("onnxruntime")
    assert backends.select("auto").name == "ort"


def test_pycuda_without_primary_contexts_is_refused(monkeypatch):
    """pycuda 2019.x (allowed by the `gpu` extra) has no Device.retain_primary_context."""
    driver = types.ModuleType("pycuda.driver")
    driver.Device = type("Device", (), {})
    pycuda = types.ModuleType("pycuda")
    pycuda.driver, pycuda.VERSION_TEXT = driver, "2019.1.2"
    tensorrt = types.ModuleType("tensorrt")
    tensorrt.__version__ = "8.2.1.8"
    for name, module in (("tensorrt", tensorrt), ("pycuda", pycuda), ("pycuda.driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)
    reason = trt.TrtBackend.available()
    assert reason.startswith("pycuda 2019.1.2 cannot retain the primary CUDA context")
    assert "upgrade pycuda" in reason and "\n" not in reason


def test_module_imports_without_tensorrt_or_pycuda():
    code = ("import sys\n"
            "for name in ('tensorrt', 'pycuda', 'pycuda.driver'):\n"
            "    sys.modules[name] = None\n"
            "import edge.backends.trt as t\n"
            "print(t.TrtBackend.available())\n")
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("tensorrt is not installed")


class DataType82(enum.Enum):
    """TensorRT 8.2's DataType members (pyFoundationalTypes.cpp): no UINT8 yet."""
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4


class DataType10(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    BF16 = 7
    INT64 = 8


def test_numpy_dtypes_without_trt_nptype():
    """trt.nptype raises on TensorRT < 8.6 with numpy >= 1.24 (np.bool): the backend maps itself."""
    old = types.SimpleNamespace(DataType=DataType82)
    new = types.SimpleNamespace(DataType=DataType10)
    assert trt.numpy_dtype(old, DataType82.FLOAT) == np.float32
    assert trt.numpy_dtype(old, DataType82.HALF) == np.float16
    assert trt.numpy_dtype(new, DataType10.UINT8) == np.uint8
    assert trt.numpy_dtype(new, DataType10.INT64) == np.int64
    assert trt.numpy_dtype(new, DataType10.BF16) is None


class FakeContext:
    """CudaContext's protocol; remembers whether it is pushed in the calling thread."""

    def __init__(self):
        self._local = threading.local()

    def current(self):
        return getattr(self._local, "depth", 0) > 0

    def __enter__(self):
        self._local.depth = getattr(self._local, "depth", 0) + 1
        return self

    def __exit__(self, *exc_info):
        self._local.depth -= 1
        return False


class FakeAllocation:
    """pycuda's PagelockedHostAllocation: the base of the array pagelocked_empty returns."""

    def __init__(self, shape, dtype, context, freed):
        self._data = np.empty(shape, dtype)
        self.__array_interface__ = self._data.__array_interface__
        self._context = context
        self._freed = freed

    def get_device_pointer(self):
        return self._data.ctypes.data

    def free(self):
        self._freed.append(self._context.current())


def fake_backend():
    context, freed = FakeContext(), []

    def pagelocked_empty(shape, dtype, mem_flags=0):
        return np.asarray(FakeAllocation(shape, dtype, context, freed))

    backend = trt.TrtBackend.__new__(trt.TrtBackend)
    backend.cuda = types.SimpleNamespace(pagelocked_empty=pagelocked_empty, Error=RuntimeError,
                                         host_alloc_flags=types.SimpleNamespace(DEVICEMAP=2))
    backend.context = context
    backend.zero_copy = True
    backend._init_state()
    return backend, freed


def test_pinned_memory_dropped_in_another_thread_is_freed_with_the_context_current():
    """pycuda skips the free of a pinned array that dies outside its context's thread."""
    backend, freed = fake_backend()
    slot = {}

    def run(work):
        worker = threading.Thread(target=work)
        worker.start()
        worker.join(10)

    run(lambda: slot.update(image=backend.allocate((4, 6, 3), np.uint8)))
    assert backend.mapped_pointer(slot["image"]) is not None
    slot["view"] = slot["image"][1:3]         # a view keeps the array, and so its memory
    run(lambda: slot.pop("image"))
    assert freed == []
    run(slot.clear)
    assert freed == [True]
    assert backend._pinned == {}


def test_timing_cache_lives_beside_the_engine(tmp_path):
    out = str(tmp_path / "yolox-nano-abc.engine")
    assert trt.timing_cache_path(out, "8.2.1.8") == str(tmp_path / "timing-8.2.1.8.cache")


def test_atomic_write_replaces_whole_files(tmp_path):
    path = str(tmp_path / "a.engine")
    trt.atomic_write(path, b"old")
    trt.atomic_write(path, memoryview(b"new bytes"))   # engines arrive as buffers
    with open(path, "rb") as f:
        assert f.read() == b"new bytes"
    assert os.listdir(str(tmp_path)) == ["a.engine"]    # no temporary file left behind


def test_l4t_release_is_the_first_line(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref\n"
                       "# KERNEL_VARIANT: oot\n")
    assert trt.l4t_release(str(release)) == (
        "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref")
    assert trt.l4t_release(str(tmp_path / "missing")) is None


def test_float32_frames_compute_what_uint8_frames_do(model_dir, tmp_path):
    """TensorRT < 8.5 gets float32 frames cast on the host: the graph must give the same result."""
    ort = pytest.importorskip("onnxruntime")
    cv2 = pytest.importorskip("cv2")
    import onnx
    from edge import cards, graph, models
    from edge.frames import Frame
    from tests.conftest import COCO8_VAL
    assert ort is not None
    card = cards.load("yolox-nano")
    model = models.load_onnx(models.ensure(card, model_dir, fetch_missing=False), card)
    image = cv2.imread(os.path.join(COCO8_VAL, sorted(os.listdir(COCO8_VAL))[0]))
    height, width = image.shape[:2]
    backend = backends.select("ort")
    results = {}
    for dtype in ("uint8", "float32"):
        path = str(tmp_path / "{}.onnx".format(dtype))
        onnx.save(graph.rewrite(model, card, width, height, frame_dtype=dtype), path)
        engine = backend.load(path, dtype)
        assert engine.inputs[0][2] == np.dtype(dtype)
        frame = Frame(0, image.shape, lambda shape, _, dtype=dtype: np.zeros(shape, dtype))
        np.copyto(frame.image, image, casting="unsafe")   # what TrtEngine.infer does on 8.2
        binding = engine.bind(frame)
        engine.infer(binding)
        results[dtype] = binding.outputs["detections"].copy()
    assert results["uint8"][0, 4] > 0.3            # the image has a confident detection
    np.testing.assert_allclose(results["float32"], results["uint8"], atol=1e-3)


# -- TensorRT engines the shape of 8.2's and 8.5+'s bindings, run by the real TrtEngine ----

class FakeTensorRT(types.SimpleNamespace):
    """The `tensorrt` names TrtBackend.load and TrtEngine use, for one of two versions:
    8.2 (bindings, no UINT8) or 8.5+ (named I/O tensors). Its engine reads the frame through
    the address it was given and writes the sum of the frame's values to its output, so a
    test sees which bytes TensorRT would have read."""

    def __init__(self, version):
        api = trt.api_for(version)
        data_type = DataType82 if api == "bindings" else DataType10
        runtimes = []

        class ILogger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self):
                pass

        fake = self

        class Runtime:
            def __init__(self, logger):
                runtimes.append(self)
                time.sleep(0.2)          # widen the window two loading threads share

            def deserialize_cuda_engine(self, data):
                return FakeEngine(fake, version)

        super().__init__(__version__=version, DataType=data_type, ILogger=ILogger,
                         Runtime=Runtime, runtimes=runtimes, api=api,
                         TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"))


class FakeEngine:
    """An engine with a frame input (H, W, 3) and one (1, 1) float32 output."""

    def __init__(self, fake, version):
        self.fake = fake
        frame_type = "FLOAT" if trt.frame_dtype_for(version) == "float32" else "UINT8"
        self.tensors = [("frame", (6, 8, 3), getattr(fake.DataType, frame_type), True),
                        ("total", (1, 1), fake.DataType.FLOAT, False)]
        self.calls = []
        if fake.api == "bindings":
            self.num_bindings = len(self.tensors)
        else:
            self.num_io_tensors = len(self.tensors)

    # 8.2: by index
    def get_binding_name(self, i):
        return self.tensors[i][0]

    def get_binding_shape(self, i):
        return self.tensors[i][1]

    def get_binding_dtype(self, i):
        return self.tensors[i][2]

    def binding_is_input(self, i):
        return self.tensors[i][3]

    # 8.5+: by name
    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def _by_name(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_shape(self, name):
        return self._by_name(name)[1]

    def get_tensor_dtype(self, name):
        return self._by_name(name)[2]

    def get_tensor_mode(self, name):
        return self.fake.TensorIOMode.INPUT if self._by_name(name)[3] else "output"

    def create_execution_context(self):
        return FakeExecution(self)


class FakeExecution:
    def __init__(self, engine):
        self.engine = engine
        self.addresses = {}

    def _run(self, addresses):
        import ctypes
        frame = self.engine.tensors[0]
        ctype = ctypes.c_float if frame[2].name == "FLOAT" else ctypes.c_uint8
        count = int(np.prod(frame[1]))
        seen = np.ctypeslib.as_array((ctype * count).from_address(addresses["frame"]))
        total = np.ctypeslib.as_array((ctypes.c_float * 1).from_address(addresses["total"]))
        total[0] = float(seen.astype(np.float64).sum())
        self.engine.calls.append(dict(addresses))
        return True

    def execute_async_v2(self, bindings, stream_handle):
        return self._run(dict(zip([t[0] for t in self.engine.tensors], bindings)))

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream_handle):
        return self._run(self.addresses)


def fake_tensorrt_backend(version, monkeypatch):
    """A TrtBackend on a Jetson (zero copy) with this TensorRT version, without a GPU."""
    backend, _ = fake_backend()
    backend.trt = FakeTensorRT(version)
    backend.cuda.Stream = lambda: types.SimpleNamespace(handle=0, synchronize=lambda: None)
    backend.version = version
    backend.api = trt.api_for(version)
    backend.frame_dtype = trt.frame_dtype_for(version)
    monkeypatch.setattr(trt, "_TRT_LOGGER", None)    # the logger of the fake, for this test
    return backend


@pytest.mark.parametrize("version", ["8.2.1.8", "8.5.2.2"])
def test_the_gpu_reads_frames_where_the_cpu_does_not(version, monkeypatch, tmp_path):
    """A Nano's CPU does not cache pinned memory. On 8.2 the host casts each frame to float32,
    so the frame stays in ordinary memory and only the float32 copy is mapped for the GPU;
    from 8.5 the GPU reads the uint8 frame as captured, mapped, and the CPU never does."""
    from edge.frames import Frame
    backend = fake_tensorrt_backend(version, monkeypatch)
    path = tmp_path / "fake.engine"
    path.write_bytes(b"plan")
    engine = backend.load(str(path), "fake")
    frame = Frame(0, (6, 8, 3), backend.allocate)
    frame.image[...] = np.arange(6 * 8 * 3).reshape(6, 8, 3) % 251
    binding = engine.bind(frame)
    engine.infer(binding)
    read = engine.engine.calls[-1]["frame"]
    if version.startswith("8.2"):
        assert not backend.is_pinned(frame.image)            # cached: the CPU reads it
        assert backend.mapped_pointer(binding.staging) == read
        assert binding.staging.dtype == np.float32
    else:
        assert binding.staging is None
        assert backend.mapped_pointer(frame.image) == read  # zero copy, no host work
    assert binding.outputs["total"][0, 0] == float(frame.image.astype(np.float64).sum())
    frame.image[0, 0, 0] += 1                                 # the next frame
    engine.infer(binding)
    assert binding.outputs["total"][0, 0] == float(frame.image.astype(np.float64).sum())


def test_two_threads_loading_engines_share_one_runtime(monkeypatch, tmp_path):
    backend = fake_tensorrt_backend("8.2.1.8", monkeypatch)
    path = tmp_path / "fake.engine"
    path.write_bytes(b"plan")
    threads = [threading.Thread(target=backend.load, args=(str(path), "fake{}".format(i)))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(backend.trt.runtimes) == 1
