"""edge.quantize: the card's network as a TensorRT-style QDQ graph, on the real yolox-nano and
real coco8 images: reproducible, symmetric INT8, per-channel weights, the fused preprocessing
and decoding left float, and INT8 detections that agree with FP32 ones on held-out frames."""

import glob
import os
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")
cv2 = pytest.importorskip("cv2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
MODEL = os.path.join(SHARED, "models", "yolox_nano.onnx")
COCO8 = os.path.join(SHARED, "data", "coco8", "images")
COUNT = 8             # calibration frames of the reproducibility and form checks
ACCURACY_COUNT = 120  # calibration frames of the accuracy check (the default)
HELD_OUT = 144        # frames of coco8 val (never calibrated on): 4 images, 12 views, 3 sizes

pytestmark = pytest.mark.skipif(not os.path.isfile(MODEL) or not glob.glob(
    os.path.join(COCO8, "val", "*.jpg")), reason="shared models/coco8 images missing")


@pytest.fixture(scope="module")
def card():
    from edge import cards
    return cards.load("yolox-nano")


@pytest.fixture(scope="module")
def calibrated(card, tmp_path_factory):
    """Two calibrations of the same images (the second from a list of the same files in
    another order): (result, path) each."""
    from edge import quantize
    folder = tmp_path_factory.mktemp("int8")
    train = os.path.join(COCO8, "train")
    first = str(folder / "a.onnx")
    stages = []
    one = quantize.calibrate(card, MODEL, train, COUNT, first,
                             progress=lambda stage, fraction=None: stages.append(stage))
    second = str(folder / "b.onnx")
    paths = sorted(glob.glob(os.path.join(train, "*.jpg")), reverse=True)
    two = quantize.calibrate(card, MODEL, paths, COUNT, second)
    return one, first, two, second, stages


def _initializers(model):
    from onnx import numpy_helper
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_same_images_give_the_same_bytes(calibrated):
    one, first, two, second, stages = calibrated
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
    assert one["frames"] == COUNT and one["images"] == 4
    assert stages[0] == "frames" and "calibrate" in stages and stages[-1] == "done"


def test_symmetric_int8_per_channel_weights_float_bias(calibrated):
    from edge import quantize
    model = calibrated[0]["model"]
    assert quantize.check(model) == []
    values = _initializers(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero = values[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    produced = {o: n for n in model.graph.node for o in n.output}
    quantized = 0
    for conv in convs:
        weight = produced.get(conv.input[1])
        if weight is None or weight.op_type != "DequantizeLinear":
            continue
        quantized += 1
        scales = values[weight.input[1]]
        assert scales.shape == (values[weight.input[0]].shape[0],)   # one per output channel
        assert values[weight.input[0]].dtype == np.int8
        assert len(conv.input) < 3 or conv.input[2] in values          # bias stays float
        assert values[conv.input[2]].dtype == np.float32
    kept = set(quantize.keep_float(_card()))
    assert quantized == len(convs) - len(kept) > 50


def _card():
    from edge import cards
    return cards.load("yolox-nano")


def test_rewrite_leaves_preprocessing_and_decoding_float(card, calibrated):
    from edge.graph import rewrite
    model = calibrated[0]["model"]
    network = {n.name for n in model.graph.node}
    graph = rewrite(model, card, 640, 480)
    onnx.checker.check_model(graph)
    produced = {o: n for n in graph.graph.node for o in n.output}
    added = [n for n in graph.graph.node if n.name not in network]
    assert added and not [n for n in added
                          if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # every Q reads a tensor of the network (its input as the float preprocessing made it,
    # or a node of the network's own)
    network_input = model.graph.input[0].name
    for node in graph.graph.node:
        if node.op_type == "QuantizeLinear":
            assert node.input[0] == network_input or produced[node.input[0]].name in network


def test_a_refusal_names_the_missing_images(card, tmp_path):
    from edge import quantize
    from edge.errors import ConfigError
    with pytest.raises(ConfigError, match="no .jpg"):
        quantize.calibrate(card, MODEL, str(tmp_path), 4)


def test_int8_detections_agree_with_fp32_on_held_out_frames(card):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_int8
    from edge import quantize
    made = quantize.calibrate(card, MODEL, os.path.join(COCO8, "train"), ACCURACY_COUNT)
    frames = bench_int8.held_out_frames(HELD_OUT)
    fp32 = bench_int8.Graphs(card, onnx.load(MODEL))
    int8 = bench_int8.Graphs(card, made["model"])
    result = bench_int8.agreement(card, fp32, int8, frames)
    assert result["fp32"] >= 60, result
    assert result["recall"] >= bench_int8.BAR and result["precision"] >= bench_int8.BAR, result
