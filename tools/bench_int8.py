"""INT8 (QDQ, edge.quantize) against FP32 for a detector card on ONNX Runtime (CPU).

    .venv/bin/python tools/bench_int8.py                 # yolox-nano, the recipe of edge.quantize
    .venv/bin/python tools/bench_int8.py --count 120 --rounds 7 --threads 2
    .venv/bin/python tools/bench_int8.py --sensitivity   # each Conv quantized alone, ranked

Calibration frames are made from coco8's TRAIN images only; held-out frames from its VAL
images (never seen by calibration), both with edge.quantize.frames (fixed crops, mirrors and
frame sizes). Each held-out frame runs through the FP32 graph and the INT8 graph that
edge.graph.rewrite makes for its size (the card's float preprocessing and decoding around
the network), and DetectTask's selection at the card's thresholds (score, NMS IoU) gives the
published detections. An FP32 detection is found again when an INT8 detection of the same
class overlaps it with IoU >= 0.5 (greedy, best score first, one to one):
recall = found / FP32 detections, precision = found / INT8 detections. Speed: frames/s of
both graphs on one frame size, measured in alternating rounds (medians), so a shared machine's
load falls on both alike.
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
COCO8 = os.path.join(SHARED, "data", "coco8", "images")
MODELS = os.path.join(SHARED, "models")
# held-out frames: the views of edge.quantize at these frame sizes (calibration uses
# edge.quantize.FRAME_SIZES; the held-out sizes differ on purpose)
HELD_OUT_SIZES = ((640, 480), (960, 540), (416, 416))
MATCH_IOU = 0.5
BAR = 0.95


def coco8(split):
    paths = sorted(glob.glob(os.path.join(COCO8, split, "*.jpg")))
    if not paths:
        raise SystemExit("bench_int8: no images in {}".format(os.path.join(COCO8, split)))
    return paths


def held_out_frames(count=None):
    """Frames made from coco8 val: every view of edge.quantize at every HELD_OUT_SIZES."""
    from edge import quantize
    paths = coco8("val")
    total = len(paths) * len(quantize.VIEWS) * len(HELD_OUT_SIZES)
    return quantize.frames(paths, count or total, sizes=HELD_OUT_SIZES)


def session(model, threads=1):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


class Graphs:
    """Rewritten graphs (edge.graph.rewrite) of one network per frame size, made on use."""

    def __init__(self, card, network, threads=1):
        self.card = card
        self.network = network
        self.threads = threads
        self.sessions = {}

    def __call__(self, frame):
        """(n, 6) float32 published detections: x1, y1, x2, y2, score, class."""
        from edge.families.yolo import DETECTIONS
        from edge.graph import rewrite
        from edge.tasks.detect import select
        size = (frame.shape[1], frame.shape[0])
        s = self.sessions.get(size)
        if s is None:
            s = self.sessions[size] = session(rewrite(self.network, self.card, *size),
                                              self.threads)
        rows = s.run([DETECTIONS], {"frame": frame})[0]
        return select(rows, self.card.thresholds["score"], self.card.thresholds["iou"])


def iou(a, b):
    """(n, m) IoU of boxes a (n, 4) and b (m, 4), x1 y1 x2 y2."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def matched(reference, rows, threshold=MATCH_IOU):
    """How many rows (n, 6) find a reference row (m, 6) of their class with IoU >= threshold,
    one to one, best score first."""
    if len(reference) == 0 or len(rows) == 0:
        return 0
    overlap = iou(rows[:, :4], reference[:, :4])
    overlap[rows[:, 5][:, None] != reference[:, 5][None, :]] = 0.0
    used = np.zeros(len(reference), bool)
    found = 0
    for i in np.argsort(-rows[:, 4], kind="stable"):
        candidates = np.where(~used & (overlap[i] >= threshold))[0]
        if candidates.size:
            used[candidates[np.argmax(overlap[i, candidates])]] = True
            found += 1
    return found


def agreement(card, fp32, int8, frames):
    """{"frames", "fp32", "int8", "found", "recall", "precision", "worst"}: INT8's detections
    against FP32's on the frames."""
    totals = {"frames": len(frames), "fp32": 0, "int8": 0, "found": 0}
    worst = []
    for i, frame in enumerate(frames):
        want, got = fp32(frame), int8(frame)
        found = matched(want, got)
        totals["fp32"] += len(want)
        totals["int8"] += len(got)
        totals["found"] += found
        if found < max(len(want), len(got)):
            worst.append((max(len(want), len(got)) - found, i, len(want), len(got)))
    totals["recall"] = totals["found"] / max(totals["fp32"], 1)
    totals["precision"] = totals["found"] / max(totals["int8"], 1)
    totals["worst"] = sorted(worst, reverse=True)[:5]
    return totals


def speed(graphs, frame, rounds=7, per_round=30):
    """{name: median frames/s} of each Graphs on the same frame, in alternating rounds."""
    for g in graphs.values():          # build the session and warm it up
        for _ in range(3):
            g(frame)
    rates = {name: [] for name in graphs}
    for r in range(rounds):
        order = list(graphs.items())
        if r % 2:
            order.reverse()
        for name, g in order:
            started = time.perf_counter()
            for _ in range(per_round):
                g(frame)
            rates[name].append(per_round / (time.perf_counter() - started))
    return {name: statistics.median(v) for name, v in rates.items()}


def sensitivity(card, model, inputs, probe, recipe=None):
    """[(largest score change, mean box change, Conv name)], worst first: each Conv node of
    the network quantized alone (edge.quantize's recipe, calibrated on `inputs`), run on the
    `probe` network inputs against the float network. Scores: objectness x best class;
    boxes: raw (x, y, log w, log h) of the anchors scoring above 0.1 in float."""
    import tempfile
    import onnx
    from onnxruntime import quantization as q
    from edge import quantize
    recipe = dict(quantize.RECIPE, **(recipe or {}))
    model = quantize.name_nodes(quantize.with_opset(model))
    name = model.graph.input[0].name
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": ["Conv"],
             "CalibStridedMinMax": quantize._step(len(inputs)),
             "CalibPercentile": recipe["percentile"]}
    float_session = session(model)
    reference = [float_session.run(None, {name: x})[0][0] for x in probe]
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-int8.") as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "qdq.onnx")
        cache = os.path.join(tmp, "ranges.json")
        onnx.save(model, src)
        for node in [n for n in model.graph.node if n.op_type == "Conv"]:
            q.quantize_static(
                src, dst, None if os.path.exists(cache) else
                quantize._Reader(name, inputs), quant_format=q.QuantFormat.QDQ,
                op_types_to_quantize=["Conv"], per_channel=True,
                activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                nodes_to_quantize=[node.name],
                calibrate_method=getattr(q.CalibrationMethod, recipe["calibrate_method"]),
                extra_options=extra, calibration_cache_path=cache)
            s = session(onnx.load(dst))
            score, box = [], []
            for x, want in zip(probe, reference):
                got = s.run(None, {name: x})[0][0]
                a, b = want[:, 4] * want[:, 5:].max(1), got[:, 4] * got[:, 5:].max(1)
                score.append(np.abs(a - b).max())
                keep = a > 0.1
                box.append(np.abs(want[keep, :4] - got[keep, :4]).mean() if keep.any() else 0)
            out.append((float(np.mean(score)), float(np.mean(box)), node.name))
    return sorted(out, reverse=True)


def sensitivity_report(args):
    import onnx
    from edge import cards, quantize
    card = cards.load(args.card)
    model = onnx.load(os.path.join(MODELS, card.model["file"]))
    paths = coco8("train")
    inputs = quantize.network_inputs(card, quantize.frames(paths, args.count or 120))
    probe = inputs[-8:]
    for score, box, name in sensitivity(card, model, inputs, probe):
        print("{:12s} score {:.4f} box {:.4f}".format(name, score, box))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", default="yolox-nano")
    parser.add_argument("--count", type=int, default=None,
                        help="calibration frames (default edge.quantize.DEFAULT_COUNT)")
    parser.add_argument("--held-out", type=int, default=None,
                        help="held-out frames (default: every view at every size)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    parser.add_argument("--rounds", type=int, default=7, help="speed rounds per graph")
    parser.add_argument("--recipe", default=None, help="JSON of edge.quantize.RECIPE keys")
    parser.add_argument("--save", default=None, help="write the QDQ network here")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--sensitivity", action="store_true",
                        help="rank the Conv nodes by how much their INT8 input alone moves "
                             "the scores (what edge.quantize.KEEP_FLOAT holds), then stop")
    args = parser.parse_args(argv)
    if args.sensitivity:
        return sensitivity_report(args)

    import onnx
    from edge import cards, quantize
    card = cards.load(args.card)
    model_path = os.path.join(MODELS, card.model["file"])
    recipe = json.loads(args.recipe) if args.recipe else None
    result = quantize.calibrate(card, model_path, coco8("train"),
                                args.count or quantize.DEFAULT_COUNT, args.save, recipe=recipe)
    network = onnx.load(model_path)
    fp32 = Graphs(card, network, args.threads)
    int8 = Graphs(card, result["model"], args.threads)
    frames = held_out_frames(args.held_out)
    acc = agreement(card, fp32, int8, frames)
    fps = speed({"fp32": fp32, "int8": int8}, frames[0], args.rounds)
    report = {"card": card.name, "calibration_frames": result["frames"],
              "calibration_s": round(result["seconds"], 1), "held_out_frames": acc["frames"],
              "fp32_detections": acc["fp32"], "int8_detections": acc["int8"],
              "found": acc["found"], "recall": round(acc["recall"], 4),
              "precision": round(acc["precision"], 4),
              "fps_fp32": round(fps["fp32"], 1), "fps_int8": round(fps["int8"], 1),
              "fps_ratio": round(fps["int8"] / fps["fp32"], 3), "threads": args.threads}
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        for key in sorted(report):
            print("{:20s} {}".format(key, report[key]))
        print("bar {} (recall and precision): {}".format(
            BAR, "met" if min(acc["recall"], acc["precision"]) >= BAR else "NOT met"))
    return 0 if min(acc["recall"], acc["precision"]) >= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
