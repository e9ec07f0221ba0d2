#!/usr/bin/env python3
"""Depth accuracy on the Middlebury motorcycle pair against its ground truth (issue 15).

Runs what `edge run --source stereo://?left=..&right=.. --calib calib.txt --detector
yolox-nano` runs (the stereo source, the depth task, detection asking it for `spatial`) on
the pair, then compares:
- the depth map with the ground-truth disparity turned into depth with the same calibration
  (Z = f * B / (d + doffs)): density (share of the ground truth's known pixels that get a
  depth), median relative error, share of pixels off by more than 5 %;
- the detected motorcycle's spatial.z with the ground truth's median depth in the central
  half of its box (the same box_scale 0.5 region spatial.z is taken from).
Prints the figures and the targets; --json writes them. Exit 1 when a target is missed.

    tools/depth_accuracy.py [--data ../shared/data/middlebury-motorcycle] [--json OUT]
"""

import argparse
import json
import os
import sys
import tempfile
from urllib.parse import urlencode

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edge import config, daemon, sources  # noqa: E402
from edge.stereo import conversion as depth  # noqa: E402

TARGETS = {"density": (">=", 0.80), "median_error_percent": ("<=", 1.0),
           "over_5_percent_share": ("<=", 0.08), "motorcycle_z_error_percent": ("<=", 5.0)}


def ground_truth_depth(data, calibration):
    """float32 mm of the ground-truth disparity (left-image pixels), 0 where unknown."""
    disparity = np.load(os.path.join(data, "motorcycle_disp.npz"))["arr_0"]
    known = np.isfinite(disparity)
    truth = np.zeros(disparity.shape, np.float32)
    truth[known] = calibration.focal_baseline / (disparity[known] + calibration.doffs)
    return truth


def measure(data, detector="yolox-nano", state_dir=None, model_dir=None, mirror=None):
    """The figures as a dict."""
    left, right = (os.path.join(data, n) for n in ("motorcycle_left.png",
                                                     "motorcycle_right.png"))
    cfg = config.load(None, {"detector": detector, "stereo.calib": os.path.join(data, "calib.txt"),
                             "state_dir": state_dir or tempfile.mkdtemp(prefix="edge-depth-"),
                             "model_dir": model_dir, "model_mirror": mirror})
    source = sources.open_source("stereo://?" + urlencode({"left": left, "right": right}))
    maker = daemon.engine_maker(cfg)
    detect, stereo = daemon.build_tasks(cfg, maker, None, source)
    frame = sources.first_frame(source)
    stereo.prepare(frame)
    stereo.process(frame)
    message = detect.process(frame)[0]
    calibration = stereo.calibration
    estimate = frame.outputs["depth"].depth
    truth = ground_truth_depth(data, calibration)
    known = truth > 0
    both = known & (estimate > 0)
    error = np.abs(estimate[both] - truth[both]) / truth[both]
    figures = {
        "pair": data, "size": [frame.width, frame.height],
        "estimator": stereo.stereo.estimator.describe(),
        "density": round(float(both.sum()) / float(known.sum()), 4),
        "median_error_percent": round(float(np.median(error)) * 100.0, 3),
        "over_5_percent_share": round(float(np.mean(error > 0.05)), 4),
        "detections": message["detections"],
    }
    bikes = [d for d in message["detections"] if d["label"] == "motorcycle"]
    if bikes:
        bike = max(bikes, key=lambda d: d["score"])
        region = depth.box_region(bike["box"], cfg["stereo"]["box_scale"], frame.width,
                                  frame.height)
        part = truth[region[1]:region[3], region[0]:region[2]]
        expected = float(np.median(part[part > 0]))
        figures["motorcycle"] = {"box": bike["box"], "spatial": bike["spatial"],
                                 "ground_truth_z": round(expected, 1)}
        if bike["spatial"] is not None:
            figures["motorcycle_z_error_percent"] = round(
                abs(bike["spatial"]["z"] - expected) / expected * 100.0, 3)
    return figures


def missed(figures):
    """The targets a figure misses (or lacks), as lines."""
    out = []
    for key, (op, limit) in TARGETS.items():
        value = figures.get(key)
        ok = value is not None and (value >= limit if op == ">=" else value <= limit)
        if not ok:
            out.append("{} {} (target {} {})".format(key, value, op, limit))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data",
                                                       "middlebury-motorcycle"))
    parser.add_argument("--detector", default="yolox-nano")
    parser.add_argument("--state-dir")
    parser.add_argument("--model-dir")
    parser.add_argument("--mirror", default=os.environ.get("EDGE_MODEL_MIRROR"))
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    figures = measure(args.data, args.detector, args.state_dir, args.model_dir, args.mirror)
    bike = figures.get("motorcycle")
    print("depth accuracy on {} ({}x{}, {}):".format(os.path.basename(args.data),
                                                      figures["size"][0], figures["size"][1],
                                                      figures["estimator"]))
    print("  density                {:.3f}   (target >= 0.80)".format(figures["density"]))
    print("  median relative error  {:.2f} %  (target <= 1 %)".format(
        figures["median_error_percent"]))
    print("  off by more than 5 %   {:.1%}   (target <= 8 %)".format(
        figures["over_5_percent_share"]))
    if bike:
        print("  motorcycle spatial {}  ground truth z {} mm  error {} %  (target <= 5 %)".format(
            bike["spatial"], bike["ground_truth_z"], figures.get("motorcycle_z_error_percent")))
    else:
        print("  motorcycle: not detected")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1, sort_keys=True)
    problems = missed(figures)
    for line in problems:
        print("  MISSED: " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
