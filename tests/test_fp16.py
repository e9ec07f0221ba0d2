"""The shipped graphs under FP16, emulated on the CPU (tools/fp16_emulation.py).

Every card in engines/ whose model is in ../shared/models, rewritten as TensorRT 8.2 receives
it, runs with every float tensor rounded to FP16 after each node. Coarse LoFTR must keep its
FP32 matches (its attention normaliser overflowed FP16 before edge/families/loftr.py rewrote
it, and the unfixed graph must still be seen to overflow, so the emulation proves something);
the FP16-safe rewrite must not change the FP32 results beyond float rounding; a detector's
FP16 boxes must stay within 3 px of its FP32 ones.
"""

import glob
import os

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge import cards
from tests.conftest import COCO8_ALL, MODELS, ROOT
from tools import fp16_emulation as fp16


def _shipped(task):
    names = []
    for path in sorted(glob.glob(os.path.join(ROOT, "engines", "*.yaml"))):
        card = cards.load(path)
        if card.task == task and os.path.exists(os.path.join(MODELS, card.model["file"])):
            names.append(card.name)
    return names


MATCHERS = _shipped("match")
DETECTORS = _shipped("detect")


def test_every_shipped_card_is_emulated():
    assert "coarse-loftr" in MATCHERS and "yolox-nano" in DETECTORS


@pytest.fixture(scope="module", params=MATCHERS)
def matcher(request):
    runs = fp16.MatcherRuns(cards.load(request.param))
    runs.pairs = [fp16.middlebury_pair()] + fp16.held_out_pairs()
    return runs


def test_matcher_keeps_its_fp32_matches_in_fp16(matcher):
    for name, reference, frame in matcher.pairs:
        full = matcher.outputs(reference, frame, fp16=False)
        half = matcher.outputs(reference, frame, fp16=True)
        share = fp16.agreement(fp16.match_pairs(full), fp16.match_pairs(half))
        _, largest, bad = matcher.normaliser_max(half)
        print("{}: {} FP32 matches, FP16 keeps {:.3f}; normaliser up to {:.4g} in FP16".format(
            name, len(fp16.match_pairs(full)), share, largest))
        assert len(fp16.match_pairs(full)) >= 50, name
        assert bad == 0 and largest < fp16.FP16_MAX / 100, name
        assert share >= 0.98, name


def test_fp16_safe_attention_changes_nothing_in_fp32(matcher):
    """Every attention block is rewritten, its normaliser scaled by 1/S, and the matches and
    scores are those of the model as exported, up to float rounding."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(matcher.model)
    assert matcher.card.family == "loftr-coarse"
    blocks = fp16.loftr.attention_normalisers(matcher.model)
    assert fp16.loftr.fp16_safe_attention(rewritten) == len(blocks) == 8   # 4 layers x 2
    assert fp16.loftr.attention_normalisers(rewritten) == []
    onnx.checker.check_model(rewritten)
    for name, reference, frame in matcher.pairs:
        before = matcher.outputs(reference, frame, fp16=False, fp16_safe=False)
        after = matcher.outputs(reference, frame, fp16=False)
        assert fp16.match_pairs(before) == fp16.match_pairs(after), name
        scores = np.abs(before[fp16.loftr.MATCHES][:, 1] - after[fp16.loftr.MATCHES][:, 1])
        assert scores.max() < 1e-4, name
        ksum, den, _ = matcher.normaliser_max(before)
        ksum_after, den_after, _ = matcher.normaliser_max(after)
        np.testing.assert_allclose([ksum_after, den_after], [ksum / 1200, den / 1200],
                                   rtol=1e-4)


def test_the_unfixed_matcher_overflows_in_fp16(matcher):
    """Without the rewrite, Q . sum_s K passes 65504 on the Middlebury pair: inf in FP16,
    and the matches fall apart; the emulation sees what the GPU would do."""
    name, reference, frame = matcher.pairs[0]
    full = matcher.outputs(reference, frame, fp16=False, fp16_safe=False)
    half = matcher.outputs(reference, frame, fp16=True, fp16_safe=False)
    assert matcher.normaliser_max(full)[1] > fp16.FP16_MAX
    assert matcher.normaliser_max(half)[2] > 0          # inf in the normalisers
    assert fp16.agreement(fp16.match_pairs(full), fp16.match_pairs(half)) < 0.9


@pytest.mark.parametrize("card_name", DETECTORS)
def test_detector_boxes_in_fp16_stay_within_3_px(card_name):
    runs = fp16.DetectorRuns(cards.load(card_name))
    boxes = 0
    for path in COCO8_ALL:
        image = cv2.imread(path)
        full, half = runs.detections(image, fp16=False), runs.detections(image, fp16=True)
        worst, lost, extra = fp16.box_deviation(full, half)
        print("{}: {} boxes, {:.2f} px".format(os.path.basename(path), len(full), worst))
        assert (lost, extra) == ([], []), path
        assert worst <= 3.0, path
        boxes += len(full)
    assert boxes >= 10


def test_the_emulation_rounds_every_float_tensor_to_fp16():
    """Weights and every node's float output take FP16's values: 1/3 is rounded, 1e-9 is 0,
    2 x 4e4 is inf, integers pass as they are."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"]),
         helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
             np.array(1e-9, np.float32))),
         helper.make_node("Add", ["y", "c"], ["z"]),
         helper.make_node("ArgMax", ["z"], ["i"], axis=0, keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [])],
        [numpy_helper.from_array(np.array([1 / 3.0, 4e4, 1.0], np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    x = np.array([1.0, 2.0, 0.1], np.float32)
    z, i = fp16.session(model).run(None, {"x": x})
    assert z[1] == 8e4 and z[0] == np.float32(1 / 3.0) + np.float32(1e-9) and i == 1
    z, i = fp16.session(fp16.emulate_fp16(model)).run(None, {"x": x})
    expected = np.float16(np.float16(1 / 3.0) * np.float16(1.0))
    assert z[0] == np.float32(expected) and np.isinf(z[1]) and i == 1
    assert z[2] == np.float32(np.float16(0.1))
