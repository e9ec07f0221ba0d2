"""Tracking accuracy: edge's tracker against norfair (tuned) on detector-like MOTChallenge boxes.

    .venv/bin/python tools/bench_track.py            # both sequences, full norfair search
    .venv/bin/python tools/bench_track.py --quick    # the reduced search the test runs

Ground truth: the MOTChallenge sequences shipped inside the motmetrics package
(motmetrics/data/TUD-Campus/gt.txt, TUD-Stadtmitte/gt.txt; 640x480, real pedestrian
trajectories). They are turned into what a detector gives, with a fixed seed:
- occlusion by other people: a box whose share still visible behind the boxes in front of
  it (a lower bottom edge is nearer the camera) is under HIDDEN gets no detection, under
  PARTLY a low score (0.1-0.5);
- occlusion bursts: per track, on average one burst per BURST_EVERY frames, each 3-10 frames
  long; the inner frames have no box, the first and last a low score (partly hidden);
- independent misses (MISS of the boxes left);
- a share of the true boxes (LOW_SHARE) with a low score (0.1-0.5) instead of a confident
  one (0.5-0.95);
- box jitter: centre and size with a standard deviation of JITTER of the box's size;
- false positives: FALSE_PER_FRAME boxes per frame on average, sized like the true ones,
  anywhere in the image, scored 0.1-0.7.
Both trackers get the same detections. edge runs with its defaults (the `track:` section of
the configuration), as `edge track --size 640x480` does: offline, a track's frames before its
confirmation and its gaps are filled in. norfair is tuned per sequence on those very
detections: a grid over its distance function and threshold (IoU, mean Euclidean corner
distance, Frigate's size-normalised distance), hit_counter_max, initialization_delay, the
lowest score it is fed and its output (objects with a detection in the frame, every object
it returns, or the first with the gaps filled in as edge's); the best IDF1 (then MOTA) is
reported. "live" rows compare what a live run publishes: edge without filling in
(`--no-fill`), norfair's best without the filled output. The "oracle" row is perfect
association on the same detections (true identities, false positives dropped, gaps filled in
as edge's): how much of what is lost is the trackers' association, not the detections.
Metrics: IDF1, MOTA and ID switches by motmetrics (IoU >= 0.5 to match, its MOTChallenge
setting).
"""

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edge.tracking import mot  # noqa: E402

SEQUENCES = ("TUD-Campus", "TUD-Stadtmitte")
IMAGE_SIZE = (640, 480)
SEED = 14
MISS = 0.10
BURST_EVERY = 60
BURST_LENGTH = (3, 10)
LOW_SHARE = 0.15
JITTER = 0.07
FALSE_PER_FRAME = 1.5
HIDDEN = 0.5
PARTLY = 0.8
MAX_GAP = 30          # frames filled in offline, for both trackers (edge's track.max_lost)

FULL_GRID = {
    "distance": [("iou", 0.5), ("iou", 0.7), ("iou", 0.8), ("iou", 0.9),
                 ("mean_euclidean", 20.0), ("mean_euclidean", 40.0), ("mean_euclidean", 80.0),
                 ("frigate", 1.0), ("frigate", 1.5), ("frigate", 2.5)],
    "hit_counter_max": [5, 10, 15, 30],
    "initialization_delay": [0, 1, 2, 4],
    "min_score": [0.1, 0.5],
    "output": ["matched", "coasting", "filled"],
}
# The test's search: every distance function and the values of the other settings that the
# full search picked for either sequence (docs/tracking.md), so that the test's norfair is the
# one those docs report.
QUICK_GRID = {
    "distance": [("iou", 0.5), ("iou", 0.7), ("mean_euclidean", 40.0), ("frigate", 2.5)],
    "hit_counter_max": [10, 15],
    "initialization_delay": [1, 2],
    "min_score": [0.1],
    "output": ["coasting", "filled"],
}


def ground_truth(name):
    """(n, 6) float64 rows frame, id, x, y, w, h of a sequence shipped with motmetrics."""
    import motmetrics
    path = os.path.join(os.path.dirname(motmetrics.__file__), "data", name, "gt.txt")
    rows = np.loadtxt(path, delimiter=",", usecols=range(7))
    rows = rows[rows[:, 6] > 0]          # every TUD row is valid; keep the rule explicit
    return rows[:, :6]


def visibility(boxes, grid=(8, 16)):
    """(k,) share of each box (k, 4) x, y, w, h not covered by the boxes in front of it (a
    lower bottom edge is nearer the camera), sampled on a grid of points."""
    gx = (np.arange(grid[0]) + 0.5) / grid[0]
    gy = (np.arange(grid[1]) + 0.5) / grid[1]
    bottom = boxes[:, 1] + boxes[:, 3]
    shares = np.ones(boxes.shape[0])
    for i in range(boxes.shape[0]):
        front = boxes[bottom > bottom[i]]
        if front.shape[0] == 0:
            continue
        x = (boxes[i, 0] + gx * boxes[i, 2])[None, :, None]
        y = (boxes[i, 1] + gy * boxes[i, 3])[:, None, None]
        covered = ((x >= front[:, 0]) & (x <= front[:, 0] + front[:, 2]) &
                   (y >= front[:, 1]) & (y <= front[:, 1] + front[:, 3])).any(axis=2)
        shares[i] = 1.0 - covered.mean()
    return shares


def detector_like(gt, seed, with_ids=False):
    """(n, 6) rows frame, x, y, w, h, score: the ground truth as a detector would see it;
    with_ids: also (n,) each box's true identity (0: a false positive), for the oracle."""
    rng = np.random.RandomState(seed)
    out = []
    score = np.empty(gt.shape[0])
    keep = np.ones(gt.shape[0], bool)
    for track in np.unique(gt[:, 1]):
        rows = np.flatnonzero(gt[:, 1] == track)
        rows = rows[np.argsort(gt[rows, 0])]
        low = rng.rand(rows.size) < LOW_SHARE
        score[rows] = np.where(low, rng.uniform(0.1, 0.5, rows.size),
                               rng.uniform(0.5, 0.95, rows.size))
        keep[rows] = rng.rand(rows.size) >= MISS
        for _ in range(rng.poisson(rows.size / float(BURST_EVERY))):
            length = rng.randint(BURST_LENGTH[0], BURST_LENGTH[1] + 1)
            start = rng.randint(0, max(1, rows.size - length))
            burst = rows[start:start + length]
            keep[burst[1:-1]] = False
            score[burst[[0, -1]]] = rng.uniform(0.1, 0.5, 2)
    for frame in np.unique(gt[:, 0]):
        rows = np.flatnonzero(gt[:, 0] == frame)
        visible = visibility(gt[rows, 2:6])
        keep[rows[visible < HIDDEN]] = False
        partly = rows[(visible >= HIDDEN) & (visible < PARTLY)]
        score[partly] = np.minimum(score[partly], rng.uniform(0.1, 0.5, partly.size))
    true = gt[keep]
    w, h = true[:, 4], true[:, 5]
    cx = true[:, 2] + w / 2 + rng.normal(0, JITTER, w.size) * w
    cy = true[:, 3] + h / 2 + rng.normal(0, JITTER, h.size) * h
    w = w * np.exp(rng.normal(0, JITTER, w.size))
    h = h * np.exp(rng.normal(0, JITTER, h.size))
    out.append(np.stack([true[:, 0], cx - w / 2, cy - h / 2, w, h, score[keep]], 1))
    ids = [true[:, 1]]
    for frame in np.unique(gt[:, 0]):
        for _ in range(rng.poisson(FALSE_PER_FRAME)):
            size = gt[rng.randint(gt.shape[0]), 4:6]
            x = rng.uniform(0, IMAGE_SIZE[0] - size[0])
            y = rng.uniform(0, IMAGE_SIZE[1] - size[1])
            out.append(np.array([[frame, x, y, size[0], size[1], rng.uniform(0.1, 0.7)]]))
            ids.append(np.zeros(1))
    dets = np.concatenate(out)
    order = np.argsort(dets[:, 0], kind="stable")
    return (dets[order], np.concatenate(ids)[order]) if with_ids else dets[order]


# -- the trackers ----------------------------------------------------------------------------

def run_edge(dets):
    """edge's tracker with its defaults, as `edge track --size 640x480`: results rows
    frame, id, x, y, w, h."""
    return mot.track(dets, size=IMAGE_SIZE)


def run_oracle(dets, ids):
    """What perfect association makes of the same detections: every true box under its true
    identity, false positives dropped, gaps filled in as edge's (the same MAX_GAP). Not a
    tracker: the bound any tracker's association works towards on these detections."""
    true = ids > 0
    rows = np.column_stack([dets[true, 0], ids[true], dets[true, 1:5]])
    return mot.interpolate(rows, MAX_GAP)


def frigate_distance(detection, tracked_object):
    """Frigate's norfair distance (frigate/track/norfair_tracker.py): the bottom centres'
    offset relative to the estimate's width and height, and how far the widths and heights
    differ as ratios, as one Euclidean norm."""
    det, est = detection.points, tracked_object.estimate
    det_size = det[1] - det[0]
    est_size = est[1] - est[0]
    dx = ((det[0, 0] + det[1, 0]) - (est[0, 0] + est[1, 0])) / 2.0 / est_size[0]
    dy = (det[:, 1].max() - est[:, 1].max()) / est_size[1]
    ratios = np.maximum(det_size, est_size) / np.minimum(det_size, est_size) - 1.0
    return float(np.sqrt(dx * dx + dy * dy + ratios[0] ** 2 + ratios[1] ** 2))


def run_norfair(dets, distance, hit_counter_max, initialization_delay, min_score, output):
    """norfair on the same detections: results rows frame, id, x, y, w, h.

    output: "matched" (objects with a detection in the frame), "coasting" (every object
    norfair returns, hidden ones at their estimate) or "filled" (matched, with the gaps
    filled in offline as `edge track` does).
    """
    import norfair
    name, threshold = distance
    function = frigate_distance if name == "frigate" else name
    tracker = norfair.Tracker(distance_function=function, distance_threshold=threshold,
                              hit_counter_max=hit_counter_max,
                              initialization_delay=initialization_delay)
    out = []
    frames = dets[:, 0].astype(int)
    for frame in range(1, frames.max() + 1):
        rows = dets[(frames == frame) & (dets[:, 5] >= min_score)]
        detections = [norfair.Detection(
            points=np.array([[r[1], r[2]], [r[1] + r[3], r[2] + r[4]]]),
            scores=np.array([r[5], r[5]])) for r in rows]
        for obj in tracker.update(detections=detections):
            if output != "coasting" and not any(obj.last_detection is d for d in detections):
                continue
            (x1, y1), (x2, y2) = obj.estimate
            out.append((frame, obj.id, x1, y1, x2 - x1, y2 - y1))
    rows = np.array(out, np.float64).reshape(-1, 6)
    return mot.interpolate(rows, MAX_GAP) if output == "filled" else rows


# -- metrics ---------------------------------------------------------------------------------

def _frame(rows):
    import pandas as pd
    df = pd.DataFrame(rows[:, :6], columns=["FrameId", "Id", "X", "Y", "Width", "Height"])
    df["FrameId"] = df["FrameId"].astype(int)
    df["Id"] = df["Id"].astype(int)
    df["Confidence"] = 1.0
    return df.set_index(["FrameId", "Id"])


def evaluate(gt, results):
    """{"idf1", "mota", "switches"} of results against the ground truth (motmetrics)."""
    import motmetrics as mm
    if not hasattr(np, "asfarray"):
        # motmetrics 1.4.0 (its latest release) calls np.asfarray, which numpy 2 removed
        np.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)
    acc = mm.utils.compare_to_groundtruth(_frame(gt), _frame(results), "iou", distth=0.5)
    summary = mm.metrics.create().compute(acc, metrics=["idf1", "mota", "num_switches"],
                                          name="x")
    return {"idf1": float(summary["idf1"].iloc[0]), "mota": float(summary["mota"].iloc[0]),
            "switches": int(summary["num_switches"].iloc[0])}


def tune_norfair(gt, dets, grid):
    """{"best": (settings, metrics), "live": the same among outputs a live run has (no
    filling), "tried": count}: best IDF1, then MOTA."""
    best = {"best": None, "live": None}
    tried = 0
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values))
        if settings["initialization_delay"] >= settings["hit_counter_max"]:
            continue
        metrics = evaluate(gt, run_norfair(dets, **settings))
        tried += 1
        for key in ("best", "live"):
            if key == "live" and settings["output"] == "filled":
                continue
            if best[key] is None or (metrics["idf1"], metrics["mota"]) > (
                    best[key][1]["idf1"], best[key][1]["mota"]):
                best[key] = (settings, metrics)
    best["tried"] = tried
    return best


def compare(grid=None, seed=SEED, sequences=SEQUENCES):
    """Per sequence: edge's metrics and the tuned norfair's, with its settings; and the same
    for what a live run publishes (edge without filling in, norfair without "filled")."""
    out = {}
    for name in sequences:
        gt = ground_truth(name)
        dets, ids = detector_like(gt, seed, with_ids=True)
        started = time.perf_counter()
        ours = evaluate(gt, run_edge(dets))
        oracle = evaluate(gt, run_oracle(dets, ids))
        live = evaluate(gt, mot.track(dets, size=IMAGE_SIZE, fill_gaps=False))
        tuned = tune_norfair(gt, dets, grid or FULL_GRID)
        out[name] = {"edge": ours, "norfair": tuned["best"][1], "oracle": oracle,
                     "norfair_settings": tuned["best"][0],
                     "edge_live": live, "norfair_live": tuned["live"][1] if tuned["live"]
                     else None,
                     "norfair_live_settings": tuned["live"][0] if tuned["live"] else None,
                     "norfair_settings_tried": tuned["tried"], "frames": int(gt[:, 0].max()),
                     "tracks": int(np.unique(gt[:, 1]).size), "boxes": int(gt.shape[0]),
                     "detections": int(dets.shape[0]),
                     "seconds": round(time.perf_counter() - started, 1)}
    return out


def _settings(s):
    return "{} {:g}, hit_counter_max {}, initialization_delay {}, score >= {:g}, output {}".format(
        s["distance"][0], s["distance"][1], s["hit_counter_max"], s["initialization_delay"],
        s["min_score"], s["output"])


def table(results):
    lines = ["{:16} {:14} {:>6} {:>6} {:>4}  norfair settings".format(
        "sequence", "tracker", "IDF1", "MOTA", "IDs")]
    for name, r in results.items():
        rows = [("edge", r["edge"], ""), ("norfair", r["norfair"], "{} (best of {})".format(
            _settings(r["norfair_settings"]), r["norfair_settings_tried"]))]
        rows.append(("oracle", r["oracle"], "true identities, false positives dropped, "
                     "gaps filled: what perfect association reaches"))
        if r.get("norfair_live"):
            rows += [("edge live", r["edge_live"], ""),
                     ("norfair live", r["norfair_live"], _settings(r["norfair_live_settings"]))]
        for who, m, extra in rows:
            lines.append("{:16} {:14} {:6.3f} {:6.3f} {:4d}  {}".format(
                name, who, m["idf1"], m["mota"], m["switches"], extra))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced norfair search")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = compare(QUICK_GRID if args.quick else FULL_GRID, args.seed)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
