"""The fused preprocessing in the rewritten graph against a plain OpenCV/numpy implementation.

Tolerance: the graph resizes in float32 (ONNX Resize, linear, half_pixel); cv2.resize on a
float32 image uses the same sampling positions and weights, so the two agree to float
rounding (we assert 1e-3 of 255). cv2.resize on uint8 input rounds its 11-bit fixed-point
weights and the result to integers, so against that reference the graph differs by at most
1 grey level (asserted <= 1.0), which is the reference's own rounding, not an error of ours.
"""

import copy
import os

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from edge import cards, graph, nodes
from tests.conftest import COCO8_ALL, SHARED, newest_opset

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")


def run(model, feeds, optimise=True):
    options = ort.SessionOptions()
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def reference_preprocess(image, card, float_resize=True):
    """The card's preprocessing written plainly with OpenCV and numpy."""
    inp = card.input
    net_w, net_h = card.input_size
    h, w = image.shape[:2]
    src = image.astype(np.float32) if float_resize else image
    if inp["resize"] == "stretch":
        new_w, new_h = net_w, net_h
    else:
        r = min(net_w / w, net_h / h)
        new_w, new_h = int(w * r), int(h * r)
    resized = cv2.resize(src, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    canvas = np.full((net_h, net_w, 3), inp["pad"]["value"], np.float32)
    if inp["pad"]["position"] == "center":
        top, left = (net_h - new_h) // 2, (net_w - new_w) // 2
    else:
        top = left = 0
    canvas[top:top + new_h, left:left + new_w] = resized
    if inp["color"] == "rgb":
        canvas = canvas[:, :, ::-1]
    elif inp["color"] == "gray":
        canvas = (canvas @ np.array([0.114, 0.587, 0.299], np.float32))[:, :, None]
    channels = canvas.shape[2]
    mean = np.array(inp["mean"][:channels], np.float32)
    std = np.array(inp["std"][:channels], np.float32)
    out = (canvas * inp["scale"] - mean) / std
    return out.transpose(2, 0, 1)[None]


def variant(name, **changes):
    card = cards.load(name)
    data = copy.deepcopy(card.data)
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return cards.Card(data, card.path)


CARDS = {
    "yolox-nano": lambda: cards.load("yolox-nano"),
    "rgb-normalised-centre": lambda: variant(
        "yolox-nano", **{"input.color": "rgb", "input.scale": 1 / 255.0,
                         "input.mean": [0.485, 0.456, 0.406], "input.std": [0.229, 0.224, 0.225],
                         "input.pad.position": "center", "input.size": [320, 256]}),
    "coarse-loftr-gray-stretch": lambda: cards.load("coarse-loftr"),
}


@pytest.mark.parametrize("card_name", sorted(CARDS))
@pytest.mark.parametrize("image_path", COCO8_ALL[:3] + COCO8_ALL[-1:])
def test_fused_preprocessing_matches_opencv(card_name, image_path):
    card = CARDS[card_name]()
    image = cv2.imread(image_path)
    h, w = image.shape[:2]
    got = run(graph.preprocess_model(card, w, h), {"frame": image})
    want = reference_preprocess(image, card)
    assert got.shape == want.shape
    scale = 255.0 * abs(card.input["scale"]) / min(card.input["std"])
    assert np.abs(got - want).max() <= 1e-3 * scale
    # Against OpenCV's integer resize the only difference is its rounding to whole levels.
    rounded = reference_preprocess(image, card, float_resize=False)
    assert np.abs(got - rounded).max() <= 1.0 * scale / 255.0 * 1.001


def test_upscaling_small_frames_and_identity_size():
    card = cards.load("yolox-nano")
    rng = np.random.default_rng(1)
    for w, h in [(100, 60), (416, 416), (416, 300)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = run(graph.preprocess_model(card, w, h), {"frame": image})
        assert np.abs(got - reference_preprocess(image, card)).max() <= 0.26


def test_rewritten_yolox_equals_model_on_reference_preprocessing(model_dir):
    """The whole rewritten graph = original model fed by the reference preprocessing."""
    import onnx
    from edge.families.yolox import grid
    card = cards.load("yolox-nano")
    model = onnx.load(model_dir + "/yolox_nano.onnx")
    image = cv2.imread(COCO8_ALL[0])
    h, w = image.shape[:2]
    fused = run(graph.rewrite(model, card, w, h), {"frame": image})     # (K, 6)
    raw = run(model, {"images": reference_preprocess(image, card)})[0]
    cells, strides = grid(416, 416)
    centre = (raw[:, :2] + cells) * strides
    size = np.exp(raw[:, 2:4]) * strides
    scores = raw[:, 4:5] * raw[:, 5:]
    r = min(416 / w, 416 / h)
    sx, sy = int(w * r) / w, int(h * r) / h
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1) / [sx, sy, sx, sy]
    boxes = np.clip(boxes, 0, [w, h, w, h])
    order = np.argsort(-scores.max(1), kind="stable")[:card.candidates]
    assert fused.shape == (card.candidates, 6)
    np.testing.assert_allclose(fused[:, 4], scores.max(1)[order], atol=2e-3)
    top = fused[:, 4] > 0.3
    assert top.sum() >= 3
    np.testing.assert_allclose(fused[top, :4], boxes[order][top], atol=0.5)
    assert (fused[top, 5] == scores.argmax(1)[order][top]).all()


def test_graph_uses_only_opset_11_operators_tensorrt_8_2_parses(model_dir):
    import onnx
    card = cards.load("yolox-nano")
    model = graph.rewrite(onnx.load(model_dir + "/yolox_nano.onnx"), card, 640, 480)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [11]
    inputs = {i.name: i for i in model.graph.input}
    frame = inputs["frame"].type.tensor_type
    assert frame.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in frame.shape.dim] == [480, 640, 3]
    # Resize, Pad, Slice, TopK parameters are constants, as TensorRT 8.2 requires.
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Resize", "Pad", "TopK", "Slice") and node.name.startswith("") and \
                node.output[0].startswith("edge/"):
            assert all(i in constants or i == "" for i in node.input[1:]), node


def _rewritten_outputs(model_dir, opset):
    """Outputs of the rewritten detector and matcher graphs, the models converted to `opset`
    with onnx's version converter as a newer exporter would have written them. Without ONNX
    Runtime's graph optimisations, which depend on the opset and its release (onnxruntime 1.10
    fuses LoFTR's layer norms at opset 11 but not at 15, newer releases' basic level rewrites
    opset 17 differently: a float rounding apart), so that only the graphs are compared."""
    import onnx
    from onnx import version_converter
    results = {}
    for card_name, file_name in (("yolox-nano", "yolox_nano.onnx"),
                                 ("coarse-loftr", "coarse_loftr_teacher.onnx")):
        card = cards.load(card_name)
        model = onnx.load(os.path.join(model_dir, file_name))
        if opset != nodes.model_opset(model):
            model = version_converter.convert_version(model, opset)
        frame = cv2.imread(os.path.join(PAIR, "motorcycle_right.png"))
        reference = cv2.imread(os.path.join(PAIR, "motorcycle_left.png"))
        h, w = frame.shape[:2]
        if card.task == "match":
            rewritten = graph.rewrite(model, card, w, h, (w, h))
            assert nodes.model_opset(rewritten) == opset
            results[card_name] = run(rewritten, {"frame": frame, "reference": reference},
                                     optimise=False)
        else:
            for path in COCO8_ALL[:4]:
                image = cv2.imread(path)
                rewritten = graph.rewrite(model, card, image.shape[1], image.shape[0])
                results[path] = run(rewritten, {"frame": image}, optimise=False)
    return results


# Opsets 17 and 19 as far as the installed onnx and ONNX Runtime know them: 15 with
# JetPack 4.6's onnx 1.11 and onnxruntime 1.10 (the test ids say which ran)
@pytest.mark.parametrize("opset", sorted({newest_opset(o, run=True) for o in (13, 17, 19)}),
                         ids="opset{}".format)
def test_models_exported_at_newer_opsets_give_identical_outputs(model_dir, opset):
    """A default YOLOv8/YOLO11 export is opset 17-19: the nodes edge adds take that opset's
    forms (Unsqueeze's axes an input from 13, ReduceMax's from 18), and the results are the
    opset-11 model's, bit for bit."""
    want = _rewritten_outputs(model_dir, 11)
    got = _rewritten_outputs(model_dir, opset)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (want["coarse-loftr"][:, 1] > 0).sum() > 100      # the pair really matches
    assert max(float(v[0, 4]) for k, v in want.items() if k != "coarse-loftr") > 0.5
