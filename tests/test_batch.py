"""Batched engines where no GPU is: the graphs TensorRT would receive, and the real TrtEngine's
batch path on TensorRT stand-ins shaped like 8.2's and 8.5+'s APIs.

A batched graph takes (batch, H, W, 3) frames with a dynamic first dimension; TensorRT builds
it with an optimisation profile of 1..N frames and runs it with the batch's shape set per run.
What runs on a GPU is tests/gpu/test_trt.py's (skipped here).
"""

import ctypes
import json
import os
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge import cards, graph, models
from edge.backends import cache, trt, trtcheck
from edge.frames import Frame
from tests.conftest import np_dtype, run_edge
from tests.test_trt_export import VERSIONS
from tests.test_trt_shim import FakeEngine, FakeExecution, fake_tensorrt_backend


@pytest.fixture(scope="module")
def yolox(model_dir):
    card = cards.load("yolox-nano")
    return card, models.load_onnx(os.path.join(model_dir, "yolox_nano.onnx"), card)


@pytest.mark.parametrize("version, frame_dtype", VERSIONS)
def test_batched_graphs_are_what_tensorrt_imports(yolox, version, frame_dtype):
    card, model = yolox
    release = tuple(int(p) for p in version.split(".")[:2])
    batched = graph.rewrite(model, card, 640, 480, frame_dtype=np.dtype(frame_dtype).name,
                            batched=True)
    onnx.checker.check_model(batched, full_check=True)
    assert trtcheck.problems(batched, release) == []
    (frame,), (out,) = batched.graph.input, batched.graph.output
    dims = lambda info: [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]  # noqa
    assert dims(frame) == ["batch", 480, 640, 3] and dims(out) == ["batch", 200, 6]
    assert np_dtype(frame.type.tensor_type.elem_type) == frame_dtype
    # the letterbox's size comes from the batch's shape (a shape tensor), not a constant
    resize = next(n for n in batched.graph.node if n.op_type == "Resize")
    assert resize.input[3] not in {t.name for t in batched.graph.initializer}


def test_resize_scales_must_be_constant_sizes_may_be_computed():
    def model(scales_constant):
        nodes = [helper.make_node("Shape", ["x"], ["shape"]),
                 helper.make_node("Cast", ["shape"], ["scales"], to=TensorProto.FLOAT)]
        inputs = ["x", "roi", "scales" if not scales_constant else "s"]
        inits = [numpy_helper.from_array(np.array([], np.float32), "roi"),
                 numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")]
        nodes.append(helper.make_node("Resize", inputs, ["y"], name="up", mode="linear"))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [1, 3, 4, 4])], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, [1, 3, 8, 8])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    assert trtcheck.problems(model(True), (8, 2)) == []
    assert trtcheck.problems(model(False), (8, 2)) == [
        "node up (Resize): scales must be an initializer"]


def test_edge_build_exports_the_batched_graph_several_cameras_share(tmp_path, model_dir):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(json.dumps({"sources": [
        {"name": name, "uri": "test://?width=320&height=240"} for name in ("a", "b", "c")] +
        [{"name": "wide", "uri": "test://?width=640&height=360"}]}))
    out = tmp_path / "export"
    code, text, err = run_edge("build", "yolox-nano", "-c", str(cfg), "--model-dir", model_dir,
                               "--export-onnx", str(out), "--tensorrt", "8.2.1.8")
    assert code == 0, text + err
    assert sorted(os.listdir(str(out))) == ["yolox-nano-320x240-b3-float32.onnx",
                                            "yolox-nano-640x360-float32.onnx"]
    assert text.count("ok for TensorRT 8.2.1.8") == 2


def test_the_batch_is_in_the_engine_cache_key(yolox):
    backend = trt.TrtBackend.__new__(trt.TrtBackend)
    backend.workspace_mb = 256
    card = yolox[0]
    assert backend.build_options(card) == {"precision": "fp16", "workspace_mb": 256}
    three = backend.build_options(card, 3)
    assert three == {"precision": "fp16", "workspace_mb": 256, "max_batch": 3}
    keys = {cache.make_key(b"graph", {"backend": "trt"}, options)[0]
            for options in (backend.build_options(card), three, backend.build_options(card, 4))}
    assert len(keys) == 3
    from edge.backends.ort import OrtBackend
    ort = OrtBackend()       # a dynamic batch: its size changes nothing, being batched does
    assert ort.build_options(card, 3) == ort.build_options(card, 4) != ort.build_options(card)


def test_the_build_adds_an_optimisation_profile_of_1_to_n_frames():
    calls = []

    class Profile:
        def set_shape(self, name, low, best, high):
            calls.append((name, low, best, high))

    inputs = [types.SimpleNamespace(name="frame", shape=(-1, 480, 640, 3))]
    network = types.SimpleNamespace(num_inputs=1, get_input=lambda i: inputs[i])
    builder = types.SimpleNamespace(create_optimization_profile=Profile)
    added = []
    config = types.SimpleNamespace(add_optimization_profile=added.append)
    trt._add_batch_profile(builder, network, config, 3)
    assert calls == [("frame", (1, 480, 640, 3), (3, 480, 640, 3), (3, 480, 640, 3))]
    assert len(added) == 1 and isinstance(added[0], Profile)


# -- the real TrtEngine's batch path on a stand-in engine ---------------------------------

class FakeBatchEngine(FakeEngine):
    """A batched engine: frame (-1, 6, 8, 3), output `total` (-1, 1): each frame's sum."""

    def __init__(self, fake, version):
        super().__init__(fake, version)
        frame, total = self.tensors
        self.tensors = [(frame[0], (-1,) + frame[1], frame[2], True),
                        (total[0], (-1, 1), total[2], False)]
        self.shapes = []

    def create_execution_context(self):
        return FakeBatchExecution(self)


class FakeBatchExecution(FakeExecution):
    """Reads the frames of the batch's shape at the address given; writes each one's sum."""

    def __init__(self, engine):
        super().__init__(engine)
        self.shape = None

    def set_binding_shape(self, index, dims):          # 8.2-8.4
        assert index == 0
        self.shape = tuple(dims)
        self.engine.shapes.append(("binding", self.shape))
        return True

    def set_input_shape(self, name, dims):             # 8.5+
        assert name == "frame"
        self.shape = tuple(dims)
        self.engine.shapes.append(("input", self.shape))
        return True

    def _run(self, addresses):
        frame = self.engine.tensors[0]
        ctype = ctypes.c_float if frame[2].name == "FLOAT" else ctypes.c_uint8
        count = int(np.prod(self.shape))
        seen = np.ctypeslib.as_array((ctype * count).from_address(addresses["frame"]))
        rows = seen.reshape(self.shape[0], -1).astype(np.float64).sum(axis=1)
        total = np.ctypeslib.as_array((ctypes.c_float * self.shape[0]).from_address(
            addresses["total"]))
        total[:] = rows
        self.engine.calls.append(dict(addresses))
        return True


class DeviceBuffer:
    """pycuda's DeviceAllocation, in host memory here: int() is its address."""

    def __init__(self, size):
        self.data = np.zeros(size, np.uint8)

    def __int__(self):
        return self.data.ctypes.data

    def free(self):
        pass


def fake_cuda_copies(backend, copies):
    """The copy calls of pycuda.driver, as memmove, each recorded as (kind, size)."""
    def move(kind, dest, source, size):
        copies.append((kind, size))
        ctypes.memmove(int(dest), source, size)
    cuda = backend.cuda
    cuda.mem_alloc = DeviceBuffer
    cuda.memcpy_dtod_async = lambda dest, src, size, stream=None: move("dtod", dest, int(src),
                                                                         size)
    cuda.memcpy_htod_async = lambda dest, src, stream=None: move("htod", dest, src.ctypes.data,
                                                                 src.nbytes)
    cuda.memcpy_htod = lambda dest, src: move("htod sync", dest, src.ctypes.data, src.nbytes)
    cuda.memcpy_dtoh_async = lambda host, device, stream=None: move(
        "dtoh", host.ctypes.data, int(device), host.nbytes)


@pytest.mark.parametrize("version, zero_copy", [("8.2.1.8", True), ("8.2.1.8", False),
                                                ("8.5.2.2", True), ("10.3.0", False)])
def test_a_batch_of_frames_runs_in_one_call_with_its_shape(version, zero_copy, monkeypatch):
    """Three cameras' frames, then two: each row of the outputs is its own frame's result;
    on a Jetson (zero copy) the GPU copies each mapped uint8 frame into the batch itself
    (8.5+), or reads the float32 batch the host cast into mapped memory (8.2); elsewhere the
    batch goes over in copies."""
    backend = fake_tensorrt_backend(version, monkeypatch)
    backend.zero_copy = zero_copy
    copies = []
    fake_cuda_copies(backend, copies)
    engine = trt.TrtEngine(backend, FakeBatchEngine(backend.trt, version), "fake-b3", batch=3)
    assert engine.batch == 3
    binding = engine.bind_batch()
    frames = []
    for i in range(3):
        frame = Frame(i, (6, 8, 3), backend.allocate)
        frame.image[...] = (np.arange(6 * 8 * 3).reshape(6, 8, 3) * (i + 1)) % 251
        frames.append(frame)
    want = [float(f.image.astype(np.float64).sum()) for f in frames]
    engine.infer_batch(binding, frames)
    np.testing.assert_allclose(binding.outputs["total"][:, 0], want)
    kind = "binding" if version.startswith("8.2") else "input"
    assert engine.engine.shapes[-1] == (kind, (3, 6, 8, 3))
    read = engine.engine.calls[-1]["frame"]
    mapped = backend.mapped_pointer
    if version.startswith("8.2"):
        assert binding.staging.dtype == np.float32 and not backend.is_pinned(frames[0].image)
        if zero_copy:
            assert read == mapped(binding.staging) and copies == []
        else:
            assert read == int(binding.input_device)
            assert ("htod", 3 * 6 * 8 * 3 * 4) in copies      # the batch's rows in use
    elif zero_copy:
        assert binding.staging is None and read == int(binding.input_device)
        assert mapped(frames[0].image) is not None
        assert [k for k, _ in copies] == ["dtod"] * 3, "the GPU copies mapped frames"
    else:
        assert [k for k, _ in copies[:3]] == ["htod"] * 3
    copies[:] = []
    frames[0].image[0, 0, 0] += 1                 # the next round: two cameras delivered
    engine.infer_batch(binding, frames[:2])
    assert engine.engine.shapes[-1] == (kind, (2, 6, 8, 3))
    np.testing.assert_allclose(binding.outputs["total"][:2, 0],
                               [want[0] + 1, want[1]])
    assert binding.outputs["total"][2, 0] == want[2], "row 3 is not written by two frames"
    with pytest.raises(ValueError):
        engine.infer_batch(binding, frames + frames[:1])
    engine.close()


def test_a_batched_engine_with_a_static_shape_is_rebuilt(monkeypatch):
    from edge.errors import ModelError
    backend = fake_tensorrt_backend("8.5.2.2", monkeypatch)
    with pytest.raises(ModelError) as info:
        trt.TrtEngine(backend, FakeEngine(backend.trt, "8.5.2.2"), "fake-b3", batch=3)
    assert "delete this engine so that it is rebuilt" in str(info.value)
    with pytest.raises(ModelError):
        trt.TrtEngine(backend, FakeBatchEngine(backend.trt, "8.5.2.2"), "fake")
