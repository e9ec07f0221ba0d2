"""Each detector family against raw outputs built from known boxes.

The raw tensors are what the model would output for those boxes; they go through the same
post-processing graph the pipeline appends to the model (run by ONNX Runtime) and then the
same CPU selection (thresholds + class-aware NMS).
"""

import copy

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge import cards, graph
from edge.families.yolox import grid
from edge.tasks.detect import nms, select

NET = 416
FRAME_W, FRAME_H = 832, 624          # letterbox scale 0.5, no padding needed on the left
CLASSES = 80

# (x1, y1, x2, y2) in frame pixels, class, score
BOXES = [
    ((100.0, 120.0, 300.0, 400.0), 0, 0.90),     # kept
    ((110.0, 130.0, 310.0, 410.0), 0, 0.60),     # same class, IoU ~0.87 with the first: NMS
    ((105.0, 125.0, 305.0, 405.0), 16, 0.70),    # other class on the same place: kept
    ((500.0, 300.0, 700.0, 500.0), 2, 0.20),     # below the 0.3 score threshold
    ((600.0, 100.0, 900.0, 300.0), 5, 0.80),     # runs past the right edge: clipped to 832
]
EXPECTED = [((100.0, 120.0, 300.0, 400.0), 0, 0.90),
            ((600.0, 100.0, 832.0, 300.0), 5, 0.80),
            ((105.0, 125.0, 305.0, 405.0), 16, 0.70)]


def card_for(family):
    card = cards.load("yolox-nano")
    data = copy.deepcopy(card.data)
    data["family"] = family
    return cards.Card(data, card.path)


def net_box(box):
    """Frame corners -> network centre and size (letterbox scale 0.5, top-left)."""
    x1, y1, x2, y2 = (v * 0.5 for v in box)
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def yolox_raw():
    cells, strides = grid(NET, NET)
    raw = np.zeros((1, cells.shape[0], 5 + CLASSES), np.float32)
    raw[0, :, 2:4] = np.log(4.0 / 8.0)     # tiny background boxes with zero score
    used = set()
    for box, cls, score in BOXES:
        cx, cy, w, h = net_box(box)
        # the stride-32 cell that holds the centre (several boxes may share one: pick free)
        level = np.nonzero(strides[:, 0] == 32)[0]
        index = next(i for i in level[np.argsort(np.hypot(*(cells[level] * 32 + 16 -
                                                           [cx, cy]).T))] if i not in used)
        used.add(index)
        raw[0, index, 0:2] = np.array([cx, cy]) / 32 - cells[index]
        raw[0, index, 2:4] = np.log(np.array([w, h]) / 32)
        raw[0, index, 4] = 1.0
        raw[0, index, 5 + cls] = score
    return raw


def yolov5_raw():
    count = 3 * 3549
    raw = np.zeros((1, count, 5 + CLASSES), np.float32)
    raw[0, :, 2:4] = 2.0
    for i, (box, cls, score) in enumerate(BOXES):
        raw[0, 1000 + 37 * i, 0:4] = net_box(box)
        raw[0, 1000 + 37 * i, 4] = 0.5
        raw[0, 1000 + 37 * i, 5 + cls] = score / 0.5
    return raw


def yolov8_raw():
    count = 3549
    raw = np.zeros((1, 4 + CLASSES, count), np.float32)
    raw[0, 2:4, :] = 2.0
    for i, (box, cls, score) in enumerate(BOXES):
        raw[0, 0:4, 3000 - 11 * i] = net_box(box)
        raw[0, 4 + cls, 3000 - 11 * i] = score
    return raw


@pytest.mark.parametrize("family,make_raw", [("yolox", yolox_raw), ("yolov5", yolov5_raw),
                                             ("yolov8", yolov8_raw)])
def test_family_decodes_known_boxes(family, make_raw):
    card = card_for(family)
    raw = make_raw()
    info = helper.make_tensor_value_info("raw", TensorProto.FLOAT, list(raw.shape))
    model = graph.postprocess_model(card, FRAME_W, FRAME_H, [info])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"raw": raw})[0]
    assert rows.shape == (card.candidates, 6)
    assert (np.diff(rows[:, 4]) <= 0).all(), "candidates come best first"
    kept = select(rows, card.thresholds["score"], card.thresholds["iou"])
    assert len(kept) == len(EXPECTED)
    for row, (box, cls, score) in zip(kept, EXPECTED):
        np.testing.assert_allclose(row[:4], box, atol=0.05)
        assert int(row[5]) == cls
        assert row[4] == pytest.approx(score, abs=1e-5)


def test_nms_is_class_aware_and_keeps_best():
    rows = np.array([[0, 0, 10, 10, 0.9, 1], [1, 1, 11, 11, 0.8, 1], [0, 0, 10, 10, 0.7, 2],
                     [50, 50, 60, 60, 0.6, 1]], np.float32)
    assert nms(rows, 0.45) == [0, 2, 3]
    assert nms(rows, 0.99) == [0, 1, 2, 3]
    assert nms(rows[:0], 0.45) == []


def test_select_uses_threshold_prefix():
    rows = np.array([[0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.5, 1],
                     [40, 40, 50, 50, 0.3, 1], [60, 60, 70, 70, 0.1, 1]], np.float32)
    assert len(select(rows, 0.3, 0.45)) == 3
    assert len(select(rows, 0.95, 0.45)) == 0
