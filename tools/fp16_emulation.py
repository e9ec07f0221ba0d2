"""FP16 emulation: what TensorRT FP16 does to the shipped graphs, measured on the CPU.

    .venv/bin/python tools/fp16_emulation.py [--unfixed]

Each card's rewritten graph as TensorRT 8.2 receives it (`edge build --export-onnx`: float32
frames) is run twice on ONNX Runtime with every graph optimisation off: as it is (FP32), and
with every float tensor rounded to FP16 after the node that makes it (a Cast to float16 and
back after each float output, float initializers and constants rounded too: TensorRT stores
weights in FP16). An overflow becomes inf as on the GPU; TensorRT may run some layers in FP32
or fuse them, so this is the pessimistic case. Prints, for Coarse LoFTR, the largest sum of
the attention normalisers (sum_s K and Q . sum_s K; FP16's largest is 65504) and the share of
the FP32 matches (mutual nearest neighbours: reference cell -> frame cell) that FP16 keeps on
the Middlebury pair and held-out pairs (COCO8 images warped by fixed homographies); for
YOLOX-Nano, the largest distance between FP32 and FP16 boxes (matched one to one, same class)
over the COCO8 images. `--unfixed` also runs the graphs without LoFTR's FP16-safe attention
(edge/families/loftr.py), for comparison.

tests/test_fp16.py runs the same functions with thresholds; this file is their one home so
that the figures a person prints are the figures CI checks.
"""

import argparse
import contextlib
import glob
import os
import sys
from unittest import mock

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

from edge import cards, families, graph  # noqa: E402
from edge.backends import trt  # noqa: E402
from edge.families import loftr  # noqa: E402
from edge.tasks.detect import select  # noqa: E402

MODELS = os.path.join(SHARED, "models")
PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
COCO8 = sorted(glob.glob(os.path.join(SHARED, "data", "coco8", "images", "*", "*.jpg")))
TENSORRT = "8.2.1.8"         # the Jetson Nano's: float32 frames, opset <= 13
FP16_MAX = 65504.0
# (image, rotation degrees, scale, shift x, shift y (share of the size), keystone (share of
# the width the top corners move in)): held-out pairs, never used to tune anything
HELD_OUT = [("000000000009.jpg", 8.0, 1.1, 0.03, -0.02, 0.04),
            ("000000000030.jpg", -12.0, 0.9, -0.04, 0.03, -0.03),
            ("000000000042.jpg", 4.0, 1.0, 0.05, 0.04, 0.05)]
HELD_OUT_SIZE = (640, 480)


# -- the emulation ----------------------------------------------------------------------

def emulate_fp16(model):
    """A copy of the model whose float tensors are rounded to FP16 wherever they are made:
    float initializers and Constants rounded, Cast to float16 and back after every float
    output of a node and after every float graph input."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    for i, tensor in enumerate(g.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_rounded(tensor))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(shape_inference.infer_shapes(model).graph.value_info) +
             list(g.input) + list(g.output)}
    nodes = []
    renamed = {}        # graph input -> its rounded copy
    for tensor in g.input:
        if tensor.type.tensor_type.elem_type == TensorProto.FLOAT:
            renamed[tensor.name] = tensor.name + "/fp16"
            nodes += _round_trip(tensor.name, renamed[tensor.name])
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                    attribute.t.CopyFrom(_rounded(attribute.t))
            nodes.append(node)
            continue
        after = []
        for i, name in enumerate(node.output):
            if name not in types:
                raise ValueError("no type for {} ({})".format(name, node.op_type))
            if types[name] == TensorProto.FLOAT:
                node.output[i] = name + "/fp32"
                after += _round_trip(node.output[i], name)
        nodes += [node] + after
    del g.node[:]
    g.node.extend(nodes)
    return copy


def _rounded(tensor):
    value = numpy_helper.to_array(tensor)
    with np.errstate(over="ignore"):            # beyond 65504: inf, as FP16 has it
        value = value.astype(np.float16).astype(np.float32)
    return numpy_helper.from_array(value, tensor.name)


def _round_trip(source, target):
    half = target + "/fp16half"
    return [helper.make_node("Cast", [source], [half], to=TensorProto.FLOAT16),
            helper.make_node("Cast", [half], [target], to=TensorProto.FLOAT)]


def session(model, outputs=()):
    """An ONNX Runtime CPU session with every graph optimisation off (no Cast is fused
    away), with the tensors `outputs` added to the graph's outputs."""
    if outputs:
        model = _with_outputs(model, outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _with_outputs(model, names):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def load_model(card):
    return onnx.load(os.path.join(MODELS, card.model["file"]))


def tensorrt_graph(card, model, frame_size, reference_size=None, fp16_safe=True):
    """The card's rewritten graph as `edge build --export-onnx --tensorrt 8.2` writes it;
    `fp16_safe=False`: without the family's rewrite of the model's own nodes."""
    with _family_rewrite(card, fp16_safe):
        return graph.rewrite(model, card, frame_size[0], frame_size[1], reference_size,
                             trt.frame_dtype_for(TENSORRT))


@contextlib.contextmanager
def _family_rewrite(card, enabled):
    family = families.get(card.family)
    if enabled or getattr(family, "rewrite_model", None) is None:
        yield
    else:
        with mock.patch.object(type(family), "rewrite_model", lambda self, model: 0):
            yield


def run(sess, frame, reference=None):
    """The session's outputs by name, for BGR uint8 images (fed as float32)."""
    feeds = {"frame": frame.astype(np.float32)}
    if reference is not None:
        feeds["reference"] = reference.astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


# -- Coarse LoFTR ----------------------------------------------------------------------

def middlebury_pair():
    """(name, reference, frame): the left image as the reference, the right as the frame."""
    return ("middlebury-motorcycle", cv2.imread(os.path.join(PAIR, "motorcycle_left.png")),
            cv2.imread(os.path.join(PAIR, "motorcycle_right.png")))


def held_out_pairs():
    """[(name, reference, frame)]: COCO8 images at 640 x 480 and their warps by HELD_OUT's
    fixed homographies."""
    found = {os.path.basename(p): p for p in COCO8}
    pairs = []
    w, h = HELD_OUT_SIZE
    for name, angle, scale, shift_x, shift_y, keystone in HELD_OUT:
        image = cv2.resize(cv2.imread(found[name]), HELD_OUT_SIZE, interpolation=cv2.INTER_AREA)
        pairs.append((name, image, cv2.warpPerspective(
            image, homography(w, h, angle, scale, shift_x, shift_y, keystone), (w, h))))
    return pairs


def homography(w, h, angle, scale, shift_x, shift_y, keystone):
    """3x3: a rotation and scale about the centre, a shift, the top corners drawn in."""
    similarity = np.vstack([cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale),
                            [0, 0, 1]])
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    moved = cv2.perspectiveTransform(corners[None], similarity)[0]
    moved[0, 0] += keystone * w
    moved[1, 0] -= keystone * w
    moved += np.float32([shift_x * w, shift_y * h])
    return cv2.getPerspectiveTransform(corners, np.float32(moved))


def match_pairs(outputs):
    """{(reference cell, frame cell)}: the mutual nearest neighbours the graph outputs."""
    rows = outputs[loftr.MATCHES]
    kept = np.flatnonzero(rows[:, 1] > 0)
    return set(zip(kept.tolist(), rows[kept, 0].astype(np.int64).tolist()))


def agreement(reference_pairs, pairs):
    """Share of the reference (FP32) matches that `pairs` also has."""
    return len(reference_pairs & pairs) / float(max(len(reference_pairs), 1))


def normaliser_tensors(model):
    """Names of sum_s K and Q . sum_s K of every linear attention block of the model (the
    same names before and after the FP16-safe rewrite, which scales them by 1/S)."""
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    names = []
    for ksum, den, _, _ in loftr.attention_normalisers(model):
        names += [ksum.output[0]] + [i for i in den.input if made_by.get(i) == "ReduceSum"]
    return names


class MatcherRuns:
    """Sessions of the matcher's graphs per (frame size, reference size), built once."""

    def __init__(self, card=None, model=None):
        self.card = card or cards.load("coarse-loftr")
        self.model = model if model is not None else load_model(self.card)
        self.probes = normaliser_tensors(self.model)
        self._sessions = {}

    def outputs(self, reference, frame, fp16, fp16_safe=True):
        """The graph's outputs and the normaliser probes for one pair."""
        sizes = ((frame.shape[1], frame.shape[0]), (reference.shape[1], reference.shape[0]))
        key = sizes + (fp16, fp16_safe)
        if key not in self._sessions:
            model = tensorrt_graph(self.card, self.model, sizes[0], sizes[1], fp16_safe)
            self._sessions[key] = session(emulate_fp16(model) if fp16 else model, self.probes)
        return run(self._sessions[key], frame, reference)

    def normaliser_max(self, outputs):
        """(largest |sum_s K|, largest |Q . sum_s K|, share of non-finite values) over every
        attention block."""
        ksums = [outputs[n] for n in self.probes[0::2]]
        dens = [outputs[n] for n in self.probes[1::2]]
        finite = np.concatenate([d.reshape(-1) for d in ksums + dens])
        return (float(max(np.abs(k).max() for k in ksums)),
                float(max(np.abs(d).max() for d in dens)),
                float(1.0 - np.isfinite(finite).mean()))


# -- YOLOX-Nano ------------------------------------------------------------------------

class DetectorRuns:
    """Sessions of the detector's graph per frame size, FP32 and FP16-emulated."""

    def __init__(self, card=None, model=None):
        self.card = card or cards.load("yolox-nano")
        self.model = model if model is not None else load_model(self.card)
        self._sessions = {}

    def detections(self, image, fp16):
        """(n, 6) x1, y1, x2, y2, score, class after the card's thresholds and NMS."""
        size = (image.shape[1], image.shape[0])
        if (size, fp16) not in self._sessions:
            model = tensorrt_graph(self.card, self.model, size)
            self._sessions[size, fp16] = session(emulate_fp16(model) if fp16 else model)
        from edge.families.yolo import DETECTIONS
        rows = run(self._sessions[size, fp16], image)[DETECTIONS]
        return select(rows, self.card.thresholds["score"], self.card.thresholds["iou"])


def box_deviation(expected, got):
    """(largest corner distance in px over boxes matched one to one within a class, the
    boxes of `expected` left unmatched, the boxes of `got` left unmatched): matched by the
    Hungarian method on the largest corner distance."""
    from scipy.optimize import linear_sum_assignment
    worst, lost, extra = 0.0, [], []
    for cls in sorted(set(expected[:, 5].tolist()) | set(got[:, 5].tolist())):
        a, b = expected[expected[:, 5] == cls], got[got[:, 5] == cls]
        cost = np.abs(a[:, None, :4] - b[None, :, :4]).max(axis=2)
        rows, cols = linear_sum_assignment(cost) if cost.size else ([], [])
        matched = [(r, c) for r, c in zip(rows, cols) if cost[r, c] <= 32.0]
        worst = max([worst] + [float(cost[r, c]) for r, c in matched])
        lost += [a[i] for i in set(range(len(a))) - {r for r, _ in matched}]
        extra += [b[i] for i in set(range(len(b))) - {c for _, c in matched}]
    return worst, lost, extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unfixed", action="store_true",
                        help="also run LoFTR without its FP16-safe attention")
    args = parser.parse_args()
    matcher = MatcherRuns()
    variants = [("fp16-safe", True)] + ([("unfixed", False)] if args.unfixed else [])
    print("Coarse LoFTR, TensorRT {} graph (float32 frames), FP16 emulated".format(TENSORRT))
    print("  {:<10} {:<22} {:>7} {:>10} {:>12} {:>9} {:>9} {:>9}".format(
        "graph", "pair", "fp32", "agreement", "sum K max", "Q.sumK max", "fp16 max",
        "fp16 inf"))
    for label, safe in variants:
        for name, reference, frame in [middlebury_pair()] + held_out_pairs():
            full = matcher.outputs(reference, frame, False, safe)
            half = matcher.outputs(reference, frame, True, safe)
            ksum, den, _ = matcher.normaliser_max(full)
            _, half_den, bad = matcher.normaliser_max(half)
            print("  {:<10} {:<22} {:>7} {:>10.3f} {:>12.4g} {:>9.4g} {:>9.4g} {:>9.3f}".format(
                label, name, len(match_pairs(full)),
                agreement(match_pairs(full), match_pairs(half)), ksum, den, half_den, bad))
    detector = DetectorRuns()
    print("\nYOLOX-Nano, TensorRT {} graph, FP16 emulated vs FP32 (COCO8)".format(TENSORRT))
    for path in COCO8:
        image = cv2.imread(path)
        full, half = detector.detections(image, False), detector.detections(image, True)
        worst, lost, extra = box_deviation(full, half)
        print("  {:<18} {:>3} boxes, max deviation {:.3f} px, lost {} {}, new {} {}".format(
            os.path.basename(path), len(full), worst, len(lost),
            [round(float(r[4]), 3) for r in lost], len(extra),
            [round(float(r[4]), 3) for r in extra]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
