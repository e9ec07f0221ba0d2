"""TensorRT's tactic sources (`engine.tactic_sources`) and mapped memory's fallback, without a
GPU: the real TrtBackend, its build and its engines on stand-ins of the tensorrt and pycuda
calls they make, with each TensorRT release's TacticSource members (NvInferRuntime.h at tags
8.2.1, 8.4.1, 8.5.1, v10.0.0)."""

import enum
import logging
import sys
import types

import numpy as np
import pytest
from onnx import TensorProto, helper

from edge import config, daemon, memoryplan
from edge.backends import tactics, trt
from edge.errors import ConfigError
from tests.test_batch import fake_cuda_copies
from tests.test_trt_shim import FakeEngine, fake_tensorrt_backend

MIB = 2 ** 20


class TacticSource82(enum.IntEnum):
    CUBLAS = 0
    CUBLAS_LT = 1
    CUDNN = 2


class TacticSource85(enum.IntEnum):
    CUBLAS = 0
    CUBLAS_LT = 1
    CUDNN = 2
    EDGE_MASK_CONVOLUTIONS = 3
    JIT_CONVOLUTIONS = 4


class PreviewFeature85(enum.IntEnum):
    """8.5.1 NvInfer.h / pyCore.cpp: the preview features (none in 8.2)."""
    FASTER_DYNAMIC_SHAPES_0805 = 0
    DISABLE_EXTERNAL_TACTIC_SOURCES_FOR_CORE_0805 = 1


def tactic_enum(version):
    return TacticSource82 if version.startswith("8.2") else TacticSource85


# -- the setting: what it accepts, what it resolves to --------------------------------------

def test_the_setting_takes_auto_default_or_trtexec_style_edits():
    assert tactics.parse_tactic_sources("auto") == "auto"
    assert tactics.parse_tactic_sources(" Default ") == "default"
    assert tactics.parse_tactic_sources("-cudnn, -CUBLAS,+cublasLt") == (
        ("-", "CUDNN"), ("-", "CUBLAS"), ("+", "CUBLAS_LT"))
    for bad, says in (("CUDNN", "prefixed with +"), ("-CUDNN,,-CUBLAS", "prefixed with +"),
                      ("-TENSORCORES", "'TENSORCORES' is not a tactic source"), ("", "+")):
        with pytest.raises(ValueError) as info:
            tactics.parse_tactic_sources(bad)
        assert says in str(info.value)
    # one spelling, whatever the order and repeats: what the cache key holds
    assert tactics.format_tactic_sources(tactics.parse_tactic_sources(
        "-CUDNN,+CUBLAS,-cublas,-CUBLAS_LT")) == "-CUBLAS,-CUBLAS_LT,-CUDNN"
    assert tactics.format_tactic_sources(()) == "default"


def test_a_bad_setting_is_a_config_error_naming_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(None, {"state_dir": str(tmp_path), "engine.tactic_sources": "CUDNN"},
                    require_task=False)
    message = str(info.value)
    assert "engine.tactic_sources" in message and "-CUDNN,-CUBLAS,-CUBLAS_LT" in message
    assert "\n" not in message
    cfg = config.load(None, {"state_dir": str(tmp_path)}, require_task=False)
    assert cfg["engine"]["tactic_sources"] == "auto"


@pytest.mark.parametrize("version, sources", [
    ((8, 2), ("CUBLAS", "CUBLAS_LT", "CUDNN")),
    ((8, 4), ("CUBLAS", "CUBLAS_LT", "CUDNN", "EDGE_MASK_CONVOLUTIONS")),
    ((8, 5), ("CUBLAS", "CUBLAS_LT", "CUDNN", "EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS")),
    ((8, 6), ("CUBLAS", "CUBLAS_LT", "CUDNN", "EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS")),
    ((10, 3), ("CUBLAS", "CUBLAS_LT", "CUDNN", "EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS")),
])
def test_auto_turns_the_libraries_off_on_a_jetson_only(version, sources):
    assert tactics.tactic_sources_of(version) == sources
    assert tactics.resolve_tactic_sources("auto", version, True) == "-CUBLAS,-CUBLAS_LT,-CUDNN"
    assert tactics.resolve_tactic_sources("auto", version, False) == "default"
    assert tactics.resolve_tactic_sources("default", version, True) == "default"
    assert tactics.resolve_tactic_sources("+CUDNN,-CUBLAS", version, False) == "-CUBLAS,+CUDNN"


def test_a_source_this_tensorrt_lacks_is_refused():
    with pytest.raises(ValueError) as info:
        tactics.resolve_tactic_sources("-JIT_CONVOLUTIONS", (8, 2), True)
    assert str(info.value) == ("TensorRT 8.2 has no tactic source JIT_CONVOLUTIONS (it has "
                               "CUBLAS, CUBLAS_LT, CUDNN); remove it from the list or use auto")
    assert tactics.resolve_tactic_sources("-EDGE_MASK_CONVOLUTIONS", (8, 4), True) == \
        "-EDGE_MASK_CONVOLUTIONS"


@pytest.mark.parametrize("version, resolved, libraries", [
    ((8, 2), "default", ("cublas", "cudnn")),
    ((8, 2), "-CUBLAS,-CUBLAS_LT,-CUDNN", ()),
    ((8, 2), "-CUDNN", ("cublas",)),
    ((8, 2), "-CUBLAS,-CUDNN", ("cublas",)),   # cuBLAS LT still loads the cuBLAS figure
    ((8, 6), "-CUBLAS,-CUBLAS_LT,-CUDNN", ()),
    ((10, 0), "default", ("cublas",)),           # CUBLAS_LT still on by default in 10.0
    ((10, 3), "default", ()),
    ((10, 3), "+CUDNN", ("cudnn",)),
])
def test_the_libraries_a_build_loads(version, resolved, libraries):
    assert tactics.tactic_libraries(version, resolved) == libraries


# -- the backend: from the config to the build options and the memory estimate -------------

def fake_gpu(monkeypatch, version, integrated):
    """`tensorrt` and `pycuda.driver` as far as TrtBackend's available() and __init__ use
    them: a Jetson (integrated, mappable memory) or a discrete GPU."""
    tensorrt = types.ModuleType("tensorrt")
    tensorrt.__version__ = version
    tensorrt.TacticSource = tactic_enum(version)
    attribute = types.SimpleNamespace(INTEGRATED="integrated", CAN_MAP_HOST_MEMORY="map")

    class Device:
        def __init__(self, number):
            assert number == 0

        @staticmethod
        def count():
            return 1

        def retain_primary_context(self):
            return object()

        def get_attribute(self, name):
            return int(integrated)

        def name(self):
            return "NVIDIA Tegra X1" if integrated else "NVIDIA GeForce RTX 3060"

        def compute_capability(self):
            return (5, 3) if integrated else (8, 6)

    driver = types.ModuleType("pycuda.driver")
    driver.init = lambda: None
    driver.Device = Device
    driver.device_attribute = attribute
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    for name, module in (("tensorrt", tensorrt), ("pycuda", pycuda), ("pycuda.driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)


def card():
    return types.SimpleNamespace(precision="fp16")


@pytest.mark.parametrize("version", ["8.2.1.8", "8.5.2.2", "10.3.0"])
def test_a_jetson_builds_without_cublas_and_cudnn_by_default(version, monkeypatch, tmp_path):
    """The daemon's engine maker hands engine.tactic_sources to the backend: on a Jetson
    (auto) the build options, so the engine cache key, say the libraries are off and the
    build's memory estimate leaves their ~650 MiB out; a desktop keeps TensorRT's defaults and
    the options it always had."""
    fake_gpu(monkeypatch, version, integrated=True)
    cfg = config.load(None, {"state_dir": str(tmp_path), "backend": "trt"},
                      require_task=False)
    backend = daemon.engine_maker(cfg).backend
    options = backend.build_options(card())
    assert options == {"precision": "fp16", "workspace_mb": 256,
                       "tactic_sources": "-CUBLAS,-CUBLAS_LT,-CUDNN"}
    assert backend.describe()["tactic_sources"] == "-CUBLAS,-CUBLAS_LT,-CUDNN"
    kernels = memoryplan.builder_libraries(trt.parse_version(version), ())   # 8.6+'s library
    assert backend.build_estimate(10 * MIB, options) == memoryplan.trt_build(10 * MIB, 256,
                                                                             kernels)

    fake_gpu(monkeypatch, version, integrated=False)
    desktop = daemon.engine_maker(cfg).backend
    options = desktop.build_options(card())
    assert options == {"precision": "fp16", "workspace_mb": 256}
    libraries = ("cublas", "cudnn") if version.startswith("8.") else ()
    assert desktop.build_estimate(10 * MIB, options) == memoryplan.trt_build(
        10 * MIB, 256, libraries + kernels)


def test_the_setting_reaches_the_backend_and_is_checked_against_its_tensorrt(monkeypatch,
                                                                            tmp_path):
    fake_gpu(monkeypatch, "8.2.1.8", integrated=False)
    overrides = {"state_dir": str(tmp_path), "backend": "trt",
                 "engine.tactic_sources": "-CUDNN"}
    backend = daemon.engine_maker(config.load(None, overrides, require_task=False)).backend
    assert backend.build_options(card())["tactic_sources"] == "-CUDNN"
    assert backend.build_estimate(MIB, backend.build_options(card())) == \
        memoryplan.trt_build(MIB, 256, ("cublas",))
    overrides["engine.tactic_sources"] = "-JIT_CONVOLUTIONS"
    with pytest.raises(ConfigError) as info:
        daemon.engine_maker(config.load(None, overrides, require_task=False))
    assert str(info.value).startswith("engine.tactic_sources: TensorRT 8.2 has no tactic "
                                      "source JIT_CONVOLUTIONS")
    fake_gpu(monkeypatch, "8.5.2.2", integrated=False)
    backend = daemon.engine_maker(config.load(None, overrides, require_task=False)).backend
    assert backend.build_options(card())["tactic_sources"] == "-JIT_CONVOLUTIONS"


# -- the build: the sources TensorRT's builder config is given ------------------------------

class FakeBuilderTensorRT(types.ModuleType):
    """The `tensorrt` calls of TrtBackend.build (pyCore.cpp 8.2.1 / v10.x names): a builder
    config starts from the platform's default sources and the built "engine" records the
    sources it was built with."""

    def __init__(self, version, defaults, accept=True, needs_cudnn=False):
        super().__init__("tensorrt")
        self.__version__ = version
        self.TacticSource = tactic_enum(version)
        if not version.startswith("8.2"):
            self.PreviewFeature = PreviewFeature85
        self.built = []
        self.preview = []
        fake = self

        class ILogger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self):
                pass

        class TimingCache:
            def serialize(self):
                return b"timings"

        class Config:
            def __init__(self):
                self.sources = sum(1 << int(fake.TacticSource[n]) for n in defaults)
                self.max_workspace_size = 0
                self.flags = []
                self.preview = set()

            def set_preview_feature(self, feature, enable):
                (self.preview.add if enable else self.preview.discard)(feature.name)

            def get_tactic_sources(self):
                return self.sources

            def set_tactic_sources(self, mask):
                if accept:
                    self.sources = mask
                return accept

            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                self.flags.append(flag)

            def create_timing_cache(self, data):
                return TimingCache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return TimingCache()

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                names = [s.name for s in fake.TacticSource if config.sources >> int(s) & 1]
                fake.built.append(names)
                fake.preview.append(sorted(config.preview))
                # A layer only cuDNN implements: nothing left to build it with.
                return None if needs_cudnn and "CUDNN" not in names else b"plan"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, model):
                return True

        self.ILogger = ILogger
        self.Builder = Builder
        self.OnnxParser = OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="fp16")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)


def small_onnx(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "model.onnx"
    path.write_bytes(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 11)]).SerializeToString())
    return str(path)


@pytest.mark.parametrize("version, defaults, edited", [
    ("8.2.1.8", ("CUBLAS", "CUDNN"), ["CUBLAS", "CUBLAS_LT"]),   # a Nano: no cuBLAS LT
    ("8.5.2.2", ("CUBLAS", "CUBLAS_LT", "CUDNN", "EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"),
     ["CUBLAS", "CUBLAS_LT", "EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"]),
])
def test_the_builder_is_given_the_resolved_sources(version, defaults, edited, monkeypatch,
                                                   tmp_path):
    fake = FakeBuilderTensorRT(version, defaults)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt, "_TRT_LOGGER", None)
    onnx_path, out = small_onnx(tmp_path), str(tmp_path / "m.engine")
    base = {"precision": "fp16", "workspace_mb": 64}
    trt.TrtBackend.build(onnx_path, out, dict(base, tactic_sources="-CUBLAS,-CUBLAS_LT,-CUDNN"),
                         lambda *a: None)
    assert fake.built[-1] == [s for s in defaults if "CONVOLUTIONS" in s]
    # 8.5: the preview feature too, as NVIDIA's recipe for running without the libraries
    assert fake.preview[-1] == ([] if version.startswith("8.2") else
                                ["DISABLE_EXTERNAL_TACTIC_SOURCES_FOR_CORE_0805"])
    trt.TrtBackend.build(onnx_path, out, base, lambda *a: None)   # TensorRT's defaults
    assert fake.built[-1] == list(defaults) and fake.preview[-1] == []
    trt.TrtBackend.build(onnx_path, out, dict(base, tactic_sources="-CUDNN,+CUBLAS_LT"),
                         lambda *a: None)
    assert fake.built[-1] == edited and fake.preview[-1] == []   # cuBLAS is still on
    with open(out, "rb") as f:
        assert f.read() == b"plan"


def test_a_refused_or_missing_source_fails_the_build_with_the_setting_to_change(monkeypatch,
                                                                              tmp_path):
    monkeypatch.setattr(trt, "_TRT_LOGGER", None)
    onnx_path, out = small_onnx(tmp_path), str(tmp_path / "m.engine")
    fake = FakeBuilderTensorRT("8.5.2.2", ("CUBLAS", "CUDNN"), accept=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(RuntimeError) as info:
        trt.TrtBackend.build(onnx_path, out, {"tactic_sources": "-CUDNN"}, lambda *a: None)
    assert str(info.value).endswith("refused the tactic sources -CUDNN "
                                    "(engine.tactic_sources); set it to default")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeBuilderTensorRT("8.2.1.8", ("CUBLAS",)))
    with pytest.raises(RuntimeError) as info:
        trt.TrtBackend.build(onnx_path, out, {"tactic_sources": "-JIT_CONVOLUTIONS"},
                             lambda *a: None)
    assert "has no tactic source JIT_CONVOLUTIONS; set engine.tactic_sources" in \
        str(info.value)


def test_a_build_with_no_implementation_left_says_how_to_get_the_libraries_back(
        monkeypatch, tmp_path):
    monkeypatch.setattr(trt, "_TRT_LOGGER", None)
    fake = FakeBuilderTensorRT("8.2.1.8", ("CUBLAS", "CUDNN"), needs_cudnn=True)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(RuntimeError) as info:
        trt.TrtBackend.build(small_onnx(tmp_path), str(tmp_path / "m.engine"),
                             {"tactic_sources": "-CUBLAS,-CUBLAS_LT,-CUDNN"}, lambda *a: None)
    assert str(info.value).endswith("set engine.tactic_sources: default (built with "
                                    "-CUBLAS,-CUBLAS_LT,-CUDNN)")


# -- mapped memory that cannot be had: pinned memory and a copy per inference ---------------

class LogicError(RuntimeError):
    """pycuda.driver.LogicError: a cuda.Error (the fake's Error is RuntimeError)."""


def test_a_failed_mapped_allocation_falls_back_to_copies(monkeypatch, caplog):
    """pagelocked_empty(..., DEVICEMAP) raising (pycuda: a cuda.Error subclass) must not stop
    the daemon: the frame comes from ordinary pinned memory, each inference copies it to the
    GPU, the engine's result is the same, and the log says so once."""
    from edge.frames import Frame
    backend = fake_tensorrt_backend("8.5.2.2", monkeypatch)
    copies = []
    fake_cuda_copies(backend, copies)
    pinned = backend.cuda.pagelocked_empty
    flags = []

    def pagelocked_empty(shape, dtype, mem_flags=0):
        flags.append(mem_flags)
        if mem_flags:
            raise LogicError("cuMemHostAlloc failed: operation not supported")
        return pinned(shape, dtype)

    backend.cuda.pagelocked_empty = pagelocked_empty
    engine = trt.TrtEngine(backend, FakeEngine(backend.trt, "8.5.2.2"), "fake")
    with caplog.at_level(logging.WARNING, logger="edge.backends.trt"):
        frame = Frame(0, (6, 8, 3), backend.allocate)
        frame.image[...] = np.arange(6 * 8 * 3).reshape(6, 8, 3) % 251
        binding = engine.bind(frame)
        engine.infer(binding)
    assert backend.is_pinned(frame.image) and backend.mapped_pointer(frame.image) is None
    assert flags[0] == backend.cuda.host_alloc_flags.DEVICEMAP and 0 in flags
    assert binding.outputs["total"][0, 0] == float(frame.image.astype(np.float64).sum())
    assert ("htod", frame.image.nbytes) in copies, "the frame went over in a copy"
    assert engine.engine.calls[-1]["frame"] == int(binding.frame_device)
    warnings = [r for r in caplog.records if "mapped memory unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "operation not supported" in warnings[0].getMessage()
    engine.close()


def test_the_daemon_holds_no_cuda_context_until_it_loads_an_engine(monkeypatch, tmp_path):
    """The primary context (CUDA's libraries and state in the daemon) is made at the first
    CUDA call, not with the backend: on TensorRT 8.2 the daemon describes the device and
    allocates its (ordinary) frames without it, so the build children run beside a daemon
    without one; engines are loaded only after every build."""
    fake_gpu(monkeypatch, "8.2.1.8", integrated=True)
    driver = sys.modules["pycuda.driver"]
    pushed = []

    class Context:
        def push(self):
            pushed.append("push")

    monkeypatch.setattr(driver.Device, "retain_primary_context",
                        lambda self: pushed.append("retain") or Context(), raising=False)
    driver.Context = types.SimpleNamespace(pop=lambda: pushed.append("pop"))
    cfg = config.load(None, {"state_dir": str(tmp_path), "backend": "trt"},
                      require_task=False)
    backend = daemon.engine_maker(cfg).backend
    backend.describe()
    frame = backend.allocate((480, 640, 3), "uint8")     # the graph takes float32 on 8.2
    assert pushed == [] and frame.dtype == "uint8"
    for _ in range(2):
        with backend.context:
            pass
    assert pushed == ["retain", "push", "pop", "push", "pop"]
