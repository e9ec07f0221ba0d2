"""Tracking under camera motion: ids through zooms, pans and vibration, for edge with and
without compensation and for norfair with its MotionEstimator, on the same detections.

    .venv/bin/python tools/bench_motion.py                  # held-out images (coco8 val)
    .venv/bin/python tools/bench_motion.py --images train   # the development images
    .venv/bin/python tools/bench_motion.py --lost           # how each lost id was lost
    .venv/bin/python tools/bench_motion.py --details        # every steady object's ids
    .venv/bin/python tools/bench_motion.py --tune-norfair   # norfair's settings, searched

Clips: the four images of a coco8 split are set in a 2 x 2 mosaic (each TILE_HEIGHT pixels
high, rows centred on a grey canvas) and a 640 x 480 camera moves over it, one clip of FRAMES
frames per image and motion profile, centred on that image (a frame is the canvas warped by
the camera's similarity: the scene is still and rigid, only the camera moves):
- zoom: in to ZOOM_MAX and back out (a cosine over the clip), with a slow pan of 2 px a frame;
- pan: 12 px a frame to the right for half the clip, then back;
- shake: a slow pan of 2 px a frame, plus, drawn anew each frame (fixed seed), a shift of up
  to +-10 px in x and y and a roll of up to +-1.5 degrees: vibration, not a path.
TILE_HEIGHT and ZOOM_MAX are the values, of those tried, that give every profile at least 10
steady objects on the published boxes (the people of the val images are small).
Detections: yolox-nano through edge's own engine (`edge.tasks`, the backend `backend: auto`
picks: ONNX Runtime on a host without TensorRT) and `DetectTask`'s selection, every box from
track.low_score (0.1) after NMS, as the daemon feeds its tracker; cached per clip under the
temp folder (keyed by the card, model, engine code, selection code, backend and the clip).
Objects: every motion is the camera's, so each detection is mapped back into canvas
coordinates by the inverse of its frame's warp, and detections of one class that overlap
there (IoU >= SAME_OBJECT_IOU, one per object and frame) are one object; a box of two
labelled objects together (`two_together`: two horses side by side boxed as one) is no
object and is set aside, as it would otherwise count as whichever of the two it overlaps at
IoU >= SAME_OBJECT_IOU, and its track as that object's id. A steady object is
detected in at least STEADY of the clip's frames. An object lost its id when its detections
carry more than one track id over the clip (0, not yet confirmed, aside); ID switches count
the changes from one id to another along its detections. Counted twice: on the published
boxes (the card's score threshold: what a user sees with its id) and on every box the
trackers are fed. Objects are counted per clip and summed per profile.
Trackers, on the same detections and frames:
- edge off: `CameraTracking` with `track.motion: off` (a still camera's prediction);
- edge auto: `CameraTracking` with `track.motion: auto` (edge.tracking.motion.ImageMotion on
  each frame, the daemon's code path), its figures (fits, failures, ms per frame) and the
  error of its motion against the true one (pixels, the worst of the frame's corners);
- edge true: the same tracker given the true camera motion (an oracle: what it still loses
  is the tracker's and the detector's, not the motion estimate's);
- norfair: `norfair.Tracker` (IoU distance, per label) with
  `norfair.camera_motion.MotionEstimator` (its homography; detections masked out, and on a
  failed fit its reference points found again without the mask), the coordinate
  transformations passed to `update` as norfair documents; settings NORFAIR, the best of
  NORFAIR_GRID on the development images (`--tune-norfair` searches again).
The still-camera protocol of tools/bench_track.py (edge's IDF1 on its two MOTChallenge
sequences, which never see a motion) is run too: compensation must not change it.
"""

import argparse
import glob
import hashlib
import inspect
import itertools
import json
import math
import os
import sys
import tempfile
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from edge.tracking.tracker import iou_matrix  # noqa: E402  (edge from this checkout)

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
COCO8 = os.path.join(SHARED, "data", "coco8", "images")
MODELS = os.path.join(SHARED, "models")

SIZE = (640, 480)          # camera frames, width x height
FPS = 15.0
FRAMES = 60                # per clip
TILE_HEIGHT = 720          # canvas pixels per mosaic row (= frame pixels at zoom 1)
SEED = 25
PROFILES = ("zoom", "pan", "shake")
SLOW_PAN = 2.0             # px a frame, zoom and shake
PAN = 12.0                 # px a frame, pan
ZOOM_MAX = 1.4             # zoom: in to this and back out
JITTER_PX = 10.0
ROLL_DEG = 1.5
STEADY = 0.6               # share of the clip's frames a steady object is detected in
SAME_OBJECT_IOU = 0.5
# A detection that overlaps the union of two labelled objects of its class (IoU >=
# SAME_OBJECT_IOU) by more than TWO_TOGETHER times its IoU with either of them alone is the detector boxing the two as one
# (two horses side by side): no single object, so it is set aside like an unconfirmed box.
TWO_TOGETHER = 1.2
TWO_SHARE = 0.25           # ... each of the two at least this share of its area (a rider's
                           # box over a far-off person's tiny one is the rider's)
CACHE_VERSION = 1
STILL_IDF1 = 0.79          # edge's still-camera IDF1 (tools/bench_track.py) stays above this

# norfair: IoU distance (1 - IoU) per label, fed every box from `min_score`
NORFAIR = {"distance_threshold": 0.7, "hit_counter_max": 10, "initialization_delay": 4,
           "min_score": 0.1}
NORFAIR_GRID = {"distance_threshold": [0.5, 0.7, 0.9], "hit_counter_max": [10, 15, 30],
                "initialization_delay": [1, 2, 4], "min_score": [0.1, 0.3]}
TRACKERS = ("edge off", "edge auto", "edge true", "norfair")


# -- clips -----------------------------------------------------------------------------------

def image_paths(split):
    paths = sorted(glob.glob(os.path.join(COCO8, split, "*.jpg")))
    if not paths:
        raise SystemExit("bench_motion: no images in {}".format(os.path.join(COCO8, split)))
    return paths


def mosaic(paths, tile_height=TILE_HEIGHT, pad=114):
    """(canvas (H, W, 3) uint8, [(x1, y1, x2, y2) of each image on it]): two rows."""
    tiles = []
    for path in paths:
        image = cv2.imread(path)
        if image is None:
            raise SystemExit("bench_motion: cannot read {}".format(path))
        width = int(round(image.shape[1] * tile_height / float(image.shape[0])))
        tiles.append(cv2.resize(image, (width, tile_height), interpolation=cv2.INTER_AREA))
    rows = [tiles[i:i + 2] for i in range(0, len(tiles), 2)]
    width = max(sum(t.shape[1] for t in row) for row in rows)
    canvas = np.full((tile_height * len(rows), width, 3), pad, np.uint8)
    places = []
    for r, row in enumerate(rows):
        x = (width - sum(t.shape[1] for t in row)) // 2
        for tile in row:
            y = r * tile_height
            canvas[y:y + tile_height, x:x + tile.shape[1]] = tile
            places.append((x, y, x + tile.shape[1], y + tile_height))
            x += tile.shape[1]
    return canvas, places


def label_boxes(paths, places):
    """(boxes (n, 4) in canvas pixels, classes (n,)) of the images' COCO labels (YOLO
    format beside the images: class cx cy w h, normalised) on the mosaic."""
    boxes, classes = [], []
    for path, (x1, y1, x2, y2) in zip(paths, places):
        name = os.path.splitext(os.path.basename(path))[0] + ".txt"
        labels = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))),
                              "labels", os.path.basename(os.path.dirname(path)), name)
        if not os.path.isfile(labels):
            continue
        w, h = x2 - x1, y2 - y1
        for line in open(labels).read().split("\n"):
            if line.strip():
                c, cx, cy, bw, bh = (float(v) for v in line.split())
                boxes.append([x1 + (cx - bw / 2) * w, y1 + (cy - bh / 2) * h,
                              x1 + (cx + bw / 2) * w, y1 + (cy + bh / 2) * h])
                classes.append(int(c))
    return np.array(boxes, np.float64).reshape(-1, 4), np.array(classes, np.int64)


def views(profile, centre, frames=FRAMES, seed=SEED):
    """(frames, 4) float64: the camera per frame, as the canvas point at the frame's centre
    (x, y), its zoom (frame pixels per canvas pixel) and roll (degrees)."""
    t = np.arange(frames, dtype=np.float64)
    out = np.zeros((frames, 4))
    out[:, 0], out[:, 1], out[:, 2] = centre[0], centre[1], 1.0
    if profile == "zoom":
        out[:, 2] = 1.0 + (ZOOM_MAX - 1.0) * 0.5 * (1.0 - np.cos(2 * math.pi * t / (frames - 1)))
        out[:, 0] += SLOW_PAN * (t - (frames - 1) / 2.0)
    elif profile == "pan":
        half = frames // 2
        along = np.where(t <= half, t, 2 * half - t) * PAN     # there, then back
        out[:, 0] += along - half * PAN / 2.0
    elif profile == "shake":
        rng = np.random.RandomState(seed)
        out[:, 0] += SLOW_PAN * (t - (frames - 1) / 2.0) + rng.uniform(-JITTER_PX, JITTER_PX,
                                                                       frames)
        out[:, 1] += rng.uniform(-JITTER_PX, JITTER_PX, frames)
        out[:, 3] = rng.uniform(-ROLL_DEG, ROLL_DEG, frames)
    else:
        raise ValueError(profile)
    return out


def warp(view, size=SIZE):
    """2 x 3 float64: canvas pixels -> frame pixels for a camera view (x, y, zoom, roll)."""
    x, y, zoom, roll = view
    a = math.radians(roll)
    c, s = zoom * math.cos(a), zoom * math.sin(a)
    linear = np.array([[c, -s], [s, c]])
    shift = np.array([size[0] / 2.0, size[1] / 2.0]) - linear @ np.array([x, y])
    return np.column_stack([linear, shift])


def inverse(matrix):
    """The inverse of a 2 x 3 affine."""
    linear = np.linalg.inv(matrix[:, :2])
    return np.column_stack([linear, -linear @ matrix[:, 2]])


def compose(a, b):
    """The 2 x 3 affine of `a` after `b`."""
    return np.column_stack([a[:, :2] @ b[:, :2], a[:, :2] @ b[:, 2] + a[:, 2]])


def render(canvas, view, size=SIZE, pad=114):
    """The camera's frame (H, W, 3) uint8: outside the canvas is the canvas's grey."""
    return cv2.warpAffine(canvas, warp(view, size), size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(pad, pad, pad))


class Clip:
    """One image's clip under one motion profile: its views, frames made on demand."""

    def __init__(self, canvas, place, name, profile, frames=FRAMES, seed=SEED):
        self.canvas = canvas
        self.name = name
        self.profile = profile
        centre = ((place[0] + place[2]) / 2.0, (place[1] + place[3]) / 2.0)
        self.views = views(profile, centre, frames, seed + PROFILES.index(profile))
        self.warps = [warp(v) for v in self.views]

    def __len__(self):
        return len(self.views)

    def frame(self, i):
        return render(self.canvas, self.views[i])

    def true_motion(self, i):
        """Frame i-1 pixels -> frame i pixels (None for the first frame)."""
        return None if i == 0 else compose(self.warps[i], inverse(self.warps[i - 1]))

    def key(self):
        spec = {"name": self.name, "profile": self.profile,
                "views": np.round(self.views, 6).tolist(), "size": SIZE,
                "canvas": hashlib.sha256(self.canvas.tobytes()).hexdigest()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# -- detections ------------------------------------------------------------------------------

def track_settings(motion="auto"):
    """The config's `track` section, defaults but for `motion`."""
    from edge import config, validate
    return validate.check({"motion": motion}, config.SPEC["track"], "bench_motion", "track.")


class Detector:
    """yolox-nano through edge's engine for 640 x 480 frames, selected as DetectTask does for
    its tracker (every box from min(card score, track.low_score), class-aware NMS)."""

    def __init__(self, work, card="yolox-nano", backend=None):
        from edge import cards, config, daemon, tasks
        from edge.frames import Frame
        from edge.tasks import detect
        cfg = config.load(None, {"model_dir": os.path.join(work, "models"),
                                 "model_mirror": MODELS, "backend": backend,
                                 "state_dir": os.path.join(work, "state")},
                          require_task=False)
        maker = daemon.engine_maker(cfg)
        self.card = cards.load(card)
        self.task = tasks.create(self.card, maker, cfg["model_dir"], mirror=MODELS,
                                 device="bench-motion", track=track_settings("off"))
        self.backend = maker.backend.describe()
        self.engine = self.task.engine_for(*SIZE)
        self.slot = Frame(0, (SIZE[1], SIZE[0], 3), maker.allocate)
        self.binding = self.engine.bind(self.slot)
        self.key = hashlib.sha256(json.dumps(
            [self.task.card_key, self.backend, self.task.floor, self.task.iou,
             inspect.getsource(detect.select), inspect.getsource(detect.nms), CACHE_VERSION],
            sort_keys=True, default=str).encode()).hexdigest()
        self.ms = []

    def __call__(self, image):
        """(n, 6) float32 x1, y1, x2, y2, score, class, best first."""
        from edge.families.yolo import DETECTIONS
        from edge.tasks.detect import select
        np.copyto(self.slot.image, image)
        started = time.perf_counter()
        self.engine.infer(self.binding)
        self.ms.append((time.perf_counter() - started) * 1000.0)
        return select(self.binding.outputs[DETECTIONS], self.task.floor, self.task.iou).copy()


def detections(clip, detector, cache):
    """[(n, 6) float32 per frame] of a clip, from the cache where it has them."""
    path = os.path.join(cache, "{}-{}.npz".format(clip.key()[:16], detector.key[:16]))
    if os.path.isfile(path):
        with np.load(path) as f:
            return [f["f{}".format(i)] for i in range(len(clip))]
    rows = [detector(clip.frame(i)) for i in range(len(clip))]
    tmp = path + ".{}.tmp.npz".format(os.getpid())
    np.savez_compressed(tmp, **{"f{}".format(i): r for i, r in enumerate(rows)})
    os.replace(tmp, path)
    return rows


# -- objects ---------------------------------------------------------------------------------

def to_canvas(rows, matrix):
    """Boxes (n, 4) of frame rows in canvas pixels: the centre mapped back by the warp's
    inverse, the size divided by its zoom (a roll of 1.5 degrees is ignored)."""
    back = inverse(matrix)
    zoom = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    centre = (rows[:, :2] + rows[:, 2:4]) / 2.0
    centre = centre @ back[:, :2].T + back[:, 2]
    half = (rows[:, 2:4] - rows[:, :2]) / (2.0 * zoom)
    return np.concatenate([centre - half, centre + half], 1)


def two_together(canvas, classes, labels):
    """(n,) bool: each canvas box (n, 4) of class `classes` (n,) is a box of two of the
    labelled objects `labels` ((m, 4) boxes, (m,) classes) together: its IoU with the union
    of two of them is at least SAME_OBJECT_IOU and TWO_TOGETHER times its IoU with either
    alone, and each of the two is at least TWO_SHARE of its area."""
    boxes, kinds = labels
    out = np.zeros(canvas.shape[0], bool)
    if canvas.shape[0] == 0 or boxes.shape[0] < 2:
        return out
    alone = iou_matrix(canvas, boxes)
    for a, b in itertools.combinations(range(boxes.shape[0]), 2):
        if kinds[a] != kinds[b]:
            continue
        union = np.concatenate([np.minimum(boxes[a, :2], boxes[b, :2]),
                                np.maximum(boxes[a, 2:], boxes[b, 2:])])[None, :]
        both = iou_matrix(canvas, union)[:, 0]
        best = np.maximum(alone[:, a], alone[:, b])
        area = (canvas[:, 2] - canvas[:, 0]) * (canvas[:, 3] - canvas[:, 1])
        smaller = min((boxes[a, 2] - boxes[a, 0]) * (boxes[a, 3] - boxes[a, 1]),
                      (boxes[b, 2] - boxes[b, 0]) * (boxes[b, 3] - boxes[b, 1]))
        out |= (classes == kinds[a]) & (both >= SAME_OBJECT_IOU) & \
            (both > TWO_TOGETHER * best) & (smaller >= TWO_SHARE * area)
    return out


def objects(clip, frames_rows, min_score=0.0):
    """[(n,) int per frame: each detection's object, -1 for one under min_score] and the
    objects' classes: detections of one class at IoU >= SAME_OBJECT_IOU in canvas
    coordinates are one object (matched one to one per frame against the median box of
    each object so far)."""
    from scipy.optimize import linear_sum_assignment
    boxes = []              # per object: its canvas boxes
    classes = []
    out = []
    for i, rows in enumerate(frames_rows):
        which = np.full(rows.shape[0], -1, np.int64)
        kept = np.flatnonzero(rows[:, 4] >= min_score)
        canvas = to_canvas(rows[kept].astype(np.float64), clip.warps[i])
        single = ~two_together(canvas, rows[kept, 5].astype(np.int64), clip.labels)
        kept, canvas = kept[single], canvas[single]
        found = np.full(kept.size, -1, np.int64)
        if boxes and kept.size:
            medians = np.array([np.median(b, 0) for b in boxes])
            iou = iou_matrix(canvas, medians)
            iou[rows[kept, 5][:, None].astype(np.int64) != np.array(classes)[None, :]] = 0.0
            r, c = linear_sum_assignment(-iou)
            good = iou[r, c] >= SAME_OBJECT_IOU
            found[r[good]] = c[good]
        for k in np.flatnonzero(found < 0):
            found[k] = len(boxes)
            boxes.append([])
            classes.append(int(rows[kept[k], 5]))
        for k, obj in enumerate(found):
            boxes[obj].append(canvas[k])
        which[kept] = found
        out.append(which)
    return out, classes


def labelled_objects(clip, frames_rows, min_score=0.0):
    """Like `objects`, but the objects are the images' COCO labels (real objects, each
    once): a detection is the labelled object of its class it overlaps at IoU >=
    SAME_OBJECT_IOU in canvas coordinates (one to one per frame); the detector's boxes of
    part of an object or of two together are no object here."""
    from scipy.optimize import linear_sum_assignment
    boxes, classes = clip.labels
    out = []
    for i, rows in enumerate(frames_rows):
        which = np.full(rows.shape[0], -1, np.int64)
        kept = np.flatnonzero(rows[:, 4] >= min_score)
        if kept.size and boxes.shape[0]:
            canvas = to_canvas(rows[kept].astype(np.float64), clip.warps[i])
            single = ~two_together(canvas, rows[kept, 5].astype(np.int64), clip.labels)
            kept, canvas = kept[single], canvas[single]
            iou = iou_matrix(canvas, boxes)
            iou[rows[kept, 5][:, None].astype(np.int64) != classes[None, :]] = 0.0
            r, c = linear_sum_assignment(-iou)
            good = iou[r, c] >= SAME_OBJECT_IOU
            which[kept[r[good]]] = c[good]
        out.append(which)
    return out, [int(c) for c in classes]


def score(which, ids, frames, classes, labels=None):
    """{"steady", "lost", "switches", "untracked", "objects": [...]} of one tracker's ids
    (per frame, per detection) for the clip's objects."""
    seen = {}
    for i, (objs, tracked) in enumerate(zip(which, ids)):
        for obj, tid in zip(objs, tracked):
            if obj < 0:
                continue
            seen.setdefault(int(obj), []).append((i, int(tid)))
    out = {"steady": 0, "lost": 0, "switches": 0, "untracked": 0, "objects": []}
    for obj, hits in sorted(seen.items()):
        if len({f for f, _ in hits}) < STEADY * frames:
            continue
        given = [t for _, t in hits if t]
        switches = sum(1 for a, b in zip(given, given[1:]) if a != b)
        lost = len(set(given)) > 1
        out["steady"] += 1
        out["lost"] += lost
        out["switches"] += switches
        out["untracked"] += not given
        out["objects"].append({
            "object": obj, "class": labels[classes[obj]] if labels else classes[obj],
            "frames": len({f for f, _ in hits}), "ids": sorted(set(given)),
            "switches": switches, "unconfirmed": len(hits) - len(given),
            "timeline": _timeline(hits, frames)})
    return out


def _timeline(hits, frames):
    """One character a frame: '.' no detection, '0' unconfirmed, else the id's letter (a, b,
    ... in the order ids appear), for reading where an object's id changed."""
    letters = {}
    line = ["."] * frames
    for f, t in hits:
        if t and t not in letters:
            letters[t] = "abcdefghijklmnopqrstuvwxyz"[len(letters) % 26]
        if line[f] in (".", "0"):
            line[f] = letters[t] if t else "0"
    return "".join(line)


# -- trackers --------------------------------------------------------------------------------

class _TrueMotion:
    """The clip's true camera motion in CameraMotion's place (an oracle)."""

    def __init__(self, clip):
        self.clip = clip
        self.last = None

    def estimate(self, frame, boxes):
        self.last = self.clip.true_motion(frame.index)
        return self.last


_runs = itertools.count(1)


def run_edge(clip, frames_rows, card, mode, frames=None):
    """(ids per frame, figures): edge's CameraTracking, motion `mode` ("off", "auto") or
    "true" (the clip's true motion)."""
    from edge.frames import Frame
    from edge.tracking import CameraTracking
    tracking = CameraTracking(track_settings("off" if mode == "true" else mode), card,
                              "bench-motion", camera="bench-motion-{}".format(next(_runs)))
    if mode == "true":
        tracking.motion = _TrueMotion(clip)
    slot = Frame(0, (SIZE[1], SIZE[0], 3))
    ids, errors, track_ms = [], [], 0.0
    corners = np.array([[0, 0], [SIZE[0], 0], [0, SIZE[1]], [SIZE[0], SIZE[1]]], np.float64)
    for i, rows in enumerate(frames_rows):
        np.copyto(slot.image, frames[i] if frames is not None else clip.frame(i))
        slot.index = i
        slot.ts = i / FPS
        started = time.perf_counter()
        tracked, _ = tracking.update(rows, slot)
        track_ms += (time.perf_counter() - started) * 1000.0
        ids.append(tracked.copy())
        true = clip.true_motion(i)
        found = tracking.motion.last
        if mode == "auto" and true is not None and found is not None:
            moved = corners @ found[:, :2].T + found[:, 2]
            right = corners @ true[:, :2].T + true[:, 2]
            errors.append(float(np.max(np.hypot(*(moved - right).T))))
    figures = {"track_ms": track_ms / len(frames_rows)}
    if mode == "auto":
        summary = tracking.motion.summary()
        figures.update({"fits": summary["fits"], "failures": summary["failures"],
                        "motion_ms": summary["mean_ms"],
                        "error_px": errors})
    return ids, figures


def norfair_motion(clip, frames_rows, frames=None):
    """(norfair CoordinatesTransformation or None per frame, ms per frame): its
    MotionEstimator (homography, its defaults) with the detections masked out, as its
    documentation does."""
    from norfair.camera_motion import MotionEstimator
    estimator = MotionEstimator()
    out, spent, failures = [], 0.0, 0
    for i, rows in enumerate(frames_rows):
        image = frames[i] if frames is not None else clip.frame(i)
        started = time.perf_counter()
        mask = np.ones(image.shape[:2], image.dtype)
        for x1, y1, x2, y2 in rows[:, :4].astype(np.int64):
            mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = 0
        transform = _norfair_update(estimator, image, mask)
        if transform is None:
            # too few points even unmasked: keep the last transformation (its coordinates
            # stay absolute)
            transform = out[-1] if out else None
            failures += 1
        out.append(transform)
        spent += (time.perf_counter() - started) * 1000.0
    return out, spent / len(frames_rows), failures


def _norfair_update(estimator, image, mask):
    """The estimator's transformation, or None. norfair raises where the points left
    outside the mask are too few for a homography (large boxes cover the picture), and it
    would raise again on every later frame (its reference frame's points stay the masked
    ones): on a failure its reference frame's points are found again without the mask."""
    for attempt in range(2):
        try:
            transform = estimator.update(image, mask)
            transform.rel_to_abs(np.zeros((1, 2)))       # a failed fit holds no matrix
            return transform
        except (cv2.error, TypeError, ValueError, AttributeError):
            estimator.prev_pts = None
            estimator.prev_mask = None
            mask = None
    return None


def run_norfair(frames_rows, transforms, distance_threshold, hit_counter_max,
                initialization_delay, min_score):
    """ids per frame (0: none, or not yet initialised) from norfair's tracker."""
    import norfair
    tracker = norfair.Tracker(distance_function="iou", distance_threshold=distance_threshold,
                              hit_counter_max=hit_counter_max,
                              initialization_delay=initialization_delay)
    ids = []
    for rows, transform in zip(frames_rows, transforms):
        fed = np.flatnonzero(rows[:, 4] >= min_score)
        dets = [norfair.Detection(points=rows[k, :4].reshape(2, 2).astype(np.float64),
                                  scores=np.full(2, float(rows[k, 4])), label=int(rows[k, 5]),
                                  data=int(k)) for k in fed]
        out = np.zeros(rows.shape[0], np.int64)
        for obj in tracker.update(detections=dets, coord_transformations=transform):
            if obj.id is not None and any(obj.last_detection is d for d in dets):
                out[obj.last_detection.data] = obj.id
        ids.append(out)
    return ids


# -- the benchmark ---------------------------------------------------------------------------

def prepare(split="val", profiles=PROFILES, frames=FRAMES, seed=SEED, work=None,
            backend=None, log=None):
    """[(clip, detections per frame)] for every image and profile, and the detector."""
    work = work or os.path.join(tempfile.gettempdir(), "edge-bench-motion")
    cache = os.path.join(work, "detections")
    os.makedirs(cache, exist_ok=True)
    detector = Detector(work, backend=backend)
    paths = image_paths(split)
    canvas, places = mosaic(paths)
    labelled = label_boxes(paths, places)
    clips = []
    for profile in profiles:
        for path, place in zip(paths, places):
            clip = Clip(canvas, place, os.path.basename(path), profile, frames, seed)
            clip.labels = labelled
            started = time.perf_counter()
            clips.append((clip, detections(clip, detector, cache)))
            if log:
                log("{} {}: {:.1f} s".format(profile, clip.name,
                                             time.perf_counter() - started))
    return clips, detector


def evaluate(clips, card, floor, norfair_settings=None, trackers=TRACKERS, details=False):
    """Per profile and tracker: steady objects, objects that lost their id, ID switches,
    objects never given an id, counted on the published detections (the card's score
    threshold) and on every box the trackers are fed (from `floor`); the compensation's
    figures; every steady object's ids with `details`."""
    norfair_settings = norfair_settings or NORFAIR
    labels = card.labels
    published = card.thresholds["score"]
    out = {}
    for clip, rows in clips:
        frames = [clip.frame(i) for i in range(len(clip))]
        clustered = {"published": objects(clip, rows, published),
                     "all": objects(clip, rows, floor),
                     "labelled": labelled_objects(clip, rows, published)}
        prof = out.setdefault(clip.profile, {"clips": 0, "frames": 0, "detections": 0,
                                             "trackers": {}, "motion": {}})
        prof["clips"] += 1
        prof["frames"] += len(clip)
        prof["detections"] += int(sum(r.shape[0] for r in rows))
        figures = {}
        for who in trackers:
            if who.startswith("edge"):
                ids, figures[who] = run_edge(clip, rows, card, who.split()[1], frames)
            else:
                transforms, ms, failures = norfair_motion(clip, rows, frames)
                figures[who] = {"motion_ms": ms, "failures": failures}
                ids = run_norfair(rows, transforms, **norfair_settings)
            for boxes, (which, classes) in clustered.items():
                result = score(which, ids, len(clip), classes, labels)
                total = prof["trackers"].setdefault(who, {}).setdefault(
                    boxes, {"steady": 0, "lost": 0, "switches": 0, "untracked": 0})
                for key in total:
                    total[key] += result[key]
                if details:
                    prof.setdefault("details", []).extend(
                        dict(o, clip=clip.name, tracker=who, boxes=boxes)
                        for o in result["objects"])
        motion = prof["motion"]
        auto = figures.get("edge auto")
        if auto:
            motion["fits"] = motion.get("fits", 0) + auto["fits"]
            motion["failures"] = motion.get("failures", 0) + auto["failures"]
            motion.setdefault("errors", []).extend(auto["error_px"])
            motion.setdefault("edge_ms", []).append(auto["motion_ms"])
        if "norfair" in figures:
            motion.setdefault("norfair_ms", []).append(figures["norfair"]["motion_ms"])
            motion["norfair_failures"] = motion.get("norfair_failures", 0) + \
                figures["norfair"]["failures"]
    for prof in out.values():
        motion = prof["motion"]
        errors = motion.pop("errors", [])
        if errors:
            motion["error_px_p50"] = round(float(np.median(errors)), 2)
            motion["error_px_p95"] = round(float(np.percentile(errors, 95)), 2)
            motion["error_px_max"] = round(float(np.max(errors)), 2)
        for key in ("edge_ms", "norfair_ms"):
            if key in motion:
                motion[key] = round(float(np.mean(motion[key])), 2)
    return out


def tune_norfair(clips, card, grid=None):
    """(the best settings, their totals): fewest objects losing their id over every
    profile (published detections), then fewest ID switches, then fewest never given one."""
    grid = grid or NORFAIR_GRID
    prepared = []
    for clip, rows in clips:
        frames = [clip.frame(i) for i in range(len(clip))]
        which, classes = objects(clip, rows, card.thresholds["score"])
        prepared.append((rows, norfair_motion(clip, rows, frames)[0], which, classes,
                         len(clip)))
    best = None
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values))
        if settings["initialization_delay"] >= settings["hit_counter_max"]:
            continue
        totals = {"lost": 0, "switches": 0, "untracked": 0}
        for rows, transforms, which, classes, frames in prepared:
            result = score(which, run_norfair(rows, transforms, **settings), frames, classes)
            for key in totals:
                totals[key] += result[key]
        rank = (totals["lost"], totals["switches"], totals["untracked"])
        if best is None or rank < best[0]:
            best = (rank, settings, totals)
    return best[1], best[2]


def still_camera():
    """edge's IDF1 (and live IDF1) on tools/bench_track.py's sequences: no motion there."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_track
    from edge.tracking import mot
    out = {}
    for name in bench_track.SEQUENCES:
        gt = bench_track.ground_truth(name)
        dets = bench_track.detector_like(gt, bench_track.SEED)
        out[name] = {"idf1": bench_track.evaluate(gt, bench_track.run_edge(dets))["idf1"],
                     "idf1_live": bench_track.evaluate(gt, mot.track(
                         dets, size=bench_track.IMAGE_SIZE, fill_gaps=False))["idf1"]}
    return out


def table(results):
    """The figures as text: per profile and tracker, then the motion estimates."""
    lines = ["{:18} | {:^31} | {:^21} | {:^21}".format(
        "", "published (score >= {:g})".format(results["published"]),
        "every box (>= {:g})".format(results["floor"]), "COCO-labelled objects"),
        "{:7} {:10} | {:>6} {:>4} {:>8} {:>9} | {:>6} {:>4} {:>8} | {:>6} {:>4} {:>8}".format(
            "profile", "tracker", "steady", "lost", "switches", "untracked", "steady", "lost",
            "switches", "steady", "lost", "switches")]
    for profile, prof in results["profiles"].items():
        for who, t in prof["trackers"].items():
            p, a, g = t["published"], t["all"], t["labelled"]
            lines.append("{:7} {:10} | {:6d} {:4d} {:8d} {:9d} | {:6d} {:4d} {:8d} | {:6d} "
                         "{:4d} {:8d}".format(
                             profile, who, p["steady"], p["lost"], p["switches"],
                             p["untracked"], a["steady"], a["lost"], a["switches"],
                             g["steady"], g["lost"], g["switches"]))
    lines.append("")
    lines.append("{:7} {:>6} {:>5} {:>8} {:>21} {:>9} {:>13}".format(
        "motion", "frames", "fits", "failures", "error p50/p95/max px", "edge ms",
        "norfair ms"))
    for profile, prof in results["profiles"].items():
        m = prof["motion"]
        lines.append("{:7} {:6d} {:5d} {:8d} {:>21} {:>9} {:>13}".format(
            profile, prof["frames"], m.get("fits", 0), m.get("failures", 0),
            "{}/{}/{}".format(m.get("error_px_p50", "-"), m.get("error_px_p95", "-"),
                              m.get("error_px_max", "-")),
            m.get("edge_ms", "-"), "{} ({} failed)".format(
                m.get("norfair_ms", "-"), m.get("norfair_failures", 0))))
    ns = results["norfair_settings"]
    lines.append("")
    lines.append("coco8 {}: {} clips of {} frames per profile; steady: detected in >= {:.0%} of "
                 "a clip's frames; lost: more than one track id over the clip".format(
                     results["images"], results["clips"], results["frames"], STEADY))
    lines.append("norfair: IoU distance {distance_threshold:g}, hit_counter_max "
                 "{hit_counter_max}, initialization_delay {initialization_delay}, boxes from "
                 "score {min_score:g}, MotionEstimator (homography)".format(**ns))
    lines.append("detector: {} ms a frame (median, {})".format(
        results.get("detector_ms", "cached"), results["backend"].get("backend", "")
        if isinstance(results["backend"], dict) else results["backend"]))
    still = results.get("still_camera")
    if still:
        lines.append("still camera (tools/bench_track.py, edge): " + ", ".join(
            "{} IDF1 {:.3f} (live {:.3f})".format(name, s["idf1"], s["idf1_live"])
            for name, s in still.items()) + "; all >= {:g}: {}".format(
                STILL_IDF1, "yes" if all(s["idf1"] >= STILL_IDF1 for s in still.values())
                else "NO"))
    return "\n".join(lines)


def details_text(results, lost_only=False):
    """One line per steady object and tracker: its ids and, per frame, which one."""
    lines = []
    for profile, prof in results["profiles"].items():
        for o in prof.get("details", []):
            if lost_only and len(o["ids"]) < 2:
                continue
            lines.append("{:6} {:9} {:16} {:10} {:10} {:3d} {:10} {}".format(
                profile, o["boxes"], o["clip"], o["tracker"], str(o["class"]), o["frames"],
                ",".join(str(i) for i in o["ids"]) or "-", o["timeline"]))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="val", choices=("val", "train"),
                        help="coco8 split: val (held out, default) or train (development)")
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--backend", choices=("auto", "ort", "trt"))
    parser.add_argument("--work", help="models, engines and cached detections (default: "
                                       "the temp folder's edge-bench-motion)")
    parser.add_argument("--tune-norfair", action="store_true",
                        help="search NORFAIR_GRID on the train images first")
    parser.add_argument("--no-still", action="store_true",
                        help="skip tools/bench_track.py's still-camera figures")
    parser.add_argument("--details", action="store_true", help="every steady object's ids")
    parser.add_argument("--lost", action="store_true", help="the steady objects that lost "
                                                            "their id, frame by frame")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    settings = NORFAIR
    if args.tune_norfair:
        dev, detector = prepare("train", frames=args.frames, seed=args.seed, work=args.work,
                                backend=args.backend)
        settings, totals = tune_norfair(dev, detector.card)
        log("norfair tuned on train: {} {}".format(settings, totals))
    clips, detector = prepare(args.images, frames=args.frames, seed=args.seed, work=args.work,
                              backend=args.backend)
    results = {"images": args.images, "frames": args.frames, "clips": len(clips) // len(PROFILES),
               "backend": detector.backend, "norfair_settings": settings,
               "published": detector.card.thresholds["score"], "floor": detector.task.floor,
               "profiles": evaluate(clips, detector.card, detector.task.floor, settings,
                                    details=args.details or args.lost)}
    if detector.ms:
        results["detector_ms"] = round(float(np.median(detector.ms)), 1)
    if not args.no_still:
        results["still_camera"] = still_camera()
    results["seconds"] = round(time.perf_counter() - started, 1)
    if args.details or args.lost:
        print(details_text(results, lost_only=not args.details))
        print()
    print(table(results))
    print("{:.0f} s".format(results["seconds"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
