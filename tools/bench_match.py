"""Matching benchmark: Middlebury precision (edge vs OpenCV ORB) and synthetic homographies.

    .venv/bin/python tools/bench_match.py [--pairs 12] [--seed 7] [--json out.json]

1. Middlebury Motorcycle (left = reference, right = frame): matches published by the matcher
   at the card's threshold, and their precision (right point within 16 px of the left point
   shifted by its ground-truth disparity, counting points with known disparity), beside ORB
   (2000 features, brute-force Hamming with cross-check) on the same pair.
2. Synthetic pairs: real images warped by a random homography (rotation within +-15 deg,
   scale 0.8-1.2, each corner moved by up to 6% of the image size, shift within 5%). For each:
   matches, inliers, the published homography's corner error (mean distance of the reference
   corners mapped by it vs the true one; `null` counts as failure) and the inlier precision
   (inliers whose frame point is within 8 px of the true mapping).
Runs in-process on the same code path as the daemon (rewritten graph, decode, RANSAC).
"""

import argparse
import glob
import json
import math
import os
import sys
import tempfile

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

from edge import backends, cards, models, tasks  # noqa: E402
from edge.frames import Frame  # noqa: E402
from edge.references import ReferenceStore  # noqa: E402

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")


def matcher(model_dir, mirror, state_dir):
    card = cards.load("coarse-loftr")
    store = ReferenceStore(state_dir)
    task = tasks.create(card, backends.select("ort"), model_dir, mirror=mirror, store=store,
                        max_hz=0)
    return task, store


def match(task, store, reference, image):
    store.put("bench", reference)
    frame = Frame(0, image.shape)
    np.copyto(frame.ensure_shape(*image.shape[:2]), image)
    frame.index, frame.ts = 0, 0.0
    return task.match(frame, "bench", store.get("bench"))


def disparity_precision(rows, disparity, tolerance=16.0):
    rows = np.asarray(rows, np.float64).reshape(-1, 4)
    h, w = disparity.shape
    d = disparity[np.clip(np.round(rows[:, 1]).astype(int), 0, h - 1),
                  np.clip(np.round(rows[:, 0]).astype(int), 0, w - 1)]
    known = np.isfinite(d)
    error = np.hypot(rows[:, 2] - (rows[:, 0] - d), rows[:, 3] - rows[:, 1])
    return float((error[known] <= tolerance).mean()) if known.any() else 0.0, int(known.sum())


def orb_matches(left, right):
    orb = cv2.ORB_create(nfeatures=2000)
    k1, d1 = orb.detectAndCompute(cv2.cvtColor(left, cv2.COLOR_BGR2GRAY), None)
    k2, d2 = orb.detectAndCompute(cv2.cvtColor(right, cv2.COLOR_BGR2GRAY), None)
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(d1, d2)
    return [list(k1[m.queryIdx].pt) + list(k2[m.trainIdx].pt) for m in pairs]


def random_homography(rng, w, h):
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.8, 1.2)
    centre = np.array([w / 2.0, h / 2.0])
    rot = cv2.getRotationMatrix2D(tuple(centre), math.degrees(angle), scale)
    similarity = np.vstack([rot, [0, 0, 1]])
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    moved = cv2.perspectiveTransform(corners[None], similarity)[0]
    moved += rng.uniform(-0.06, 0.06, (4, 2)) * [w, h]
    moved += rng.uniform(-0.05, 0.05, 2) * [w, h]
    return cv2.getPerspectiveTransform(corners, np.float32(moved))


def corner_error(h_est, h_true, w, h):
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])[None]
    if h_est is None:
        return float("inf")
    a = cv2.perspectiveTransform(corners, np.float64(h_est).reshape(3, 3))[0]
    b = cv2.perspectiveTransform(corners, h_true)[0]
    return float(np.linalg.norm(a - b, axis=1).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    mirror = os.environ.get("EDGE_MODEL_MIRROR") or os.path.join(SHARED, "models")
    state = tempfile.mkdtemp(prefix="edge-bench-")
    task, store = matcher(models.default_model_dir(), mirror, state)

    left, right = (cv2.imread(os.path.join(PAIR, n)) for n in
                   ("motorcycle_left.png", "motorcycle_right.png"))
    disparity = np.load(os.path.join(PAIR, "motorcycle_disp.npz"))["arr_0"]
    msg = match(task, store, left, right)
    edge_p, edge_known = disparity_precision([m[:4] for m in msg["matches"]], disparity)
    orb = orb_matches(left, right)
    orb_p, orb_known = disparity_precision(orb, disparity)
    report = {"middlebury": {
        "edge": {"matches": msg["count"], "known": edge_known, "precision": round(edge_p, 4),
                 "inliers": msg["inliers"], "threshold": task.card.thresholds["score"]},
        "orb": {"matches": len(orb), "known": orb_known, "precision": round(orb_p, 4)}}}
    print("Middlebury Motorcycle (precision: within 16 px of the ground-truth disparity)")
    print("  {:<22} {:>8} {:>10}".format("method", "matches", "precision"))
    print("  {:<22} {:>8} {:>10.3f}".format("edge coarse-loftr", msg["count"], edge_p))
    print("  {:<22} {:>8} {:>10.3f}".format("ORB 2000 + cross-check", len(orb), orb_p))

    rng = np.random.default_rng(args.seed)
    images = sorted(glob.glob(os.path.join(SHARED, "data", "coco8", "images", "*", "*.jpg")))
    images.append(os.path.join(PAIR, "motorcycle_left.png"))
    rows = []
    print("\nSynthetic homographies (rotation +-15 deg, scale 0.8-1.2, corners +-6%, shift +-5%)")
    print("  {:<22} {:>7} {:>7} {:>13} {:>16}".format("image", "matches", "inliers",
                                                       "corner err px", "inlier precision"))
    for i in range(args.pairs):
        path = images[i % len(images)]
        reference = cv2.imread(path)
        h, w = reference.shape[:2]
        h_true = random_homography(rng, w, h)
        warped = cv2.warpPerspective(reference, h_true, (w, h), borderMode=cv2.BORDER_CONSTANT)
        msg = match(task, store, reference, warped)
        pts = np.array([m[:4] for m in msg["matches"]], np.float64).reshape(-1, 4)
        err = corner_error(msg["homography"], h_true, w, h)
        inlier_p = None
        if msg["homography"] is not None and len(pts):
            est = np.array(msg["homography"]).reshape(3, 3)
            mapped = cv2.perspectiveTransform(pts[None, :, :2], est)[0]
            inlier = np.linalg.norm(mapped - pts[:, 2:], axis=1) <= task.card.thresholds[
                "ransac_px"]
            truth = cv2.perspectiveTransform(pts[None, :, :2], h_true)[0]
            good = np.linalg.norm(truth - pts[:, 2:], axis=1) <= 8.0
            inlier_p = float(good[inlier].mean()) if inlier.any() else 0.0
        rows.append({"image": os.path.basename(path), "matches": msg["count"],
                     "inliers": msg["inliers"], "corner_error_px": err,
                     "inlier_precision": inlier_p})
        print("  {:<22} {:>7} {:>7} {:>13} {:>16}".format(
            os.path.basename(path), msg["count"], msg["inliers"],
            "null" if math.isinf(err) else "{:.1f}".format(err),
            "-" if inlier_p is None else "{:.3f}".format(inlier_p)))
    errors = [r["corner_error_px"] for r in rows]
    found = [e for e in errors if not math.isinf(e)]
    summary = {"pairs": len(rows), "homography_found": len(found),
               "median_corner_error_px": float(np.median(found)) if found else None,
               "within_10px": sum(e <= 10 for e in errors),
               "mean_inlier_precision": float(np.mean([r["inlier_precision"] for r in rows
                                                       if r["inlier_precision"] is not None]))}
    print("  homography found {}/{}, median corner error {:.1f} px, {} within 10 px, mean inlier "
          "precision {:.3f}".format(summary["homography_found"], len(rows),
                                    summary["median_corner_error_px"] or float("nan"),
                                    summary["within_10px"], summary["mean_inlier_precision"]))
    report["synthetic"] = {"pairs": rows, "summary": summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=lambda v: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
