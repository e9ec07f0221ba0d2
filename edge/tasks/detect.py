"""Object detection: the graph's (K, 6) best candidates -> thresholds -> class-aware NMS,
then tracking (track ids, zones, lines, events) per camera."""

import numpy as np

from edge.families.yolo import DETECTIONS
from edge.tasks import Side, register
from edge.tasks.base import Task
from edge.tracking import EVENT_QOS, EVENT_TOPIC
from edge.tracking.tracker import pair_iou
from edge.validate import Field


def nms(rows, iou_threshold):
    """Indices of the rows kept by class-aware NMS; rows (n, 6) sorted by score, descending."""
    if rows.shape[0] == 0:
        return []
    # Shift each class to its own region so that boxes of different classes never overlap.
    offset = rows[:, 5:6] * (float(rows[:, :4].max()) + 1.0)
    x1, y1, x2, y2 = (rows[:, i] + offset[:, 0] for i in range(4))
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.arange(rows.shape[0])
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


def select(rows, score_threshold, iou_threshold):
    """(n, 6) rows above the score threshold that survive NMS, best first."""
    # The graph sorted the rows by score: the candidates are a prefix.
    count = int(np.searchsorted(-rows[:, 4], -score_threshold, side="right"))
    candidates = rows[:count]
    return candidates[nms(candidates, iou_threshold)]


# edge doctor: FP16 engines move box edges by a pixel or two
BOX_TOLERANCE_PX = 4.0
SCORE_TOLERANCE = 0.03
# ... INT8 ones (engine.precision int8) further: each box is matched as docs/int8.md counts
# (same class, IoU >= 0.5); on doctor's sample yolox-nano's INT8 moved edges by 9 px
INT8_MATCH_IOU = 0.5
INT8_SCORE_TOLERANCE = 0.1


@register
class DetectTask(Task):
    """Boxes in source-frame pixels on the `detections` topic."""

    name = "detect"
    topic = "detections"
    can_batch = True
    samples = ("coco-000000000036.jpg", None)
    thresholds = {
        "score": Field(float, default=0.3, min=0.0, max=1.0),
        "iou": Field(float, default=0.45, min=0.0, max=1.0),
    }

    @classmethod
    def options(cls, config, maker, store=None, depth=None):
        """Tracking (the `track` section, each named camera's own), batching (`pipeline.batch`:
        auto where the backend batches) and stereo depth's `spatial`."""
        from edge import cameras
        from edge.config import camera_track
        setting = config["pipeline"]["batch"]
        options = dict(super().options(config, maker), track=config["track"],
                       cameras={name: camera_track(config, name)
                                for name, _ in cameras.configured(config)},
                       batching=maker.backend.batches if setting == "auto"
                       else setting == "always")
        if depth is not None:
            options["depth"] = depth
        return options

    def draw(self, image, message):
        """Boxes with label, score and `#id`."""
        from edge import draw
        draw.detections(image, message["detections"])

    @classmethod
    def summarise(cls, card, outputs):
        rows = select(outputs[DETECTIONS], card.thresholds["score"], card.thresholds["iou"])
        return {"detections": [[round(float(v), 2) for v in row] for row in rows]}

    @classmethod
    def compare(cls, card, got, want):
        a, b = got["detections"], want["detections"]
        if len(a) != len(b):
            return False, "{} detections, expected {}".format(len(a), len(b))
        if card.precision == "int8":
            return _compare_int8(a, b)
        worst_box, worst_score = 0.0, 0.0
        for x, y in zip(sorted(a, key=lambda r: -r[4]), sorted(b, key=lambda r: -r[4])):
            if int(x[5]) != int(y[5]):
                return False, "class {} instead of {}".format(int(x[5]), int(y[5]))
            worst_box = max(worst_box, max(abs(p - q) for p, q in zip(x[:4], y[:4])))
            worst_score = max(worst_score, abs(x[4] - y[4]))
        ok = worst_box <= BOX_TOLERANCE_PX and worst_score <= SCORE_TOLERANCE
        return ok, "{} detections, box edges within {:.2f} px, scores within {:.3f}".format(
            len(a), worst_box, worst_score)

    def __init__(self, card, engines, model, device="edge", track=None, depth=None,
                 batching=False, cameras=None):
        super().__init__(card, engines, model, batching)
        self.device = device
        self.depth = depth      # stereo runs: the depth task (edge.stereo.task) adds `spatial`
        self.score = card.thresholds["score"]
        self.iou = card.thresholds["iou"]
        self.track = track if track is not None and track["enabled"] else None
        # Tracking also reads the weak boxes below the card's threshold (ByteTrack's second
        # association); they keep tracks alive and are never published.
        self.floor = self.score if self.track is None else min(self.score,
                                                                 self.track["low_score"])
        # each camera's `track` settings and their keys (edge.config.camera_track); the one
        # unnamed camera under None
        self.cameras = cameras or {}
        self.trackers = {}     # camera name (None: the one unnamed camera) -> CameraTracking
        if self.track is not None:     # a bad zone or line label fails now, not at frame 1
            for camera in self.cameras or (None,):
                self.tracking_for(camera)

    def tracking_for(self, camera):
        """The camera's tracking, made on first use."""
        tracking = self.trackers.get(camera)
        if tracking is None:
            from edge.tracking import CameraTracking
            settings, keys = self.cameras.get(camera, (self.track, None))
            tracking = CameraTracking(settings, self.card, self.device, camera, keys)
            self.trackers[camera] = tracking
        return tracking

    def regions(self, camera):
        """{"zones", "lines"} of a camera (None: the unnamed one) as configured items, None
        where this task does not track that camera (the web API's GET)."""
        tracking = self.trackers.get(camera) if self.track is not None else None
        if tracking is None:
            return None
        zones, lines = tracking.current_regions()
        return {"zones": zones, "lines": lines}

    def check_regions(self, camera, zones=None, lines=None, where="web"):
        """The camera's tracking and its Regions with these zones and/or lines (validated
        items; None: those it has), (None, None) where this task does not track the camera;
        ConfigError naming `where: zones[i].labels` for a label the detector does not
        know."""
        tracking = self.trackers.get(camera) if self.track is not None else None
        if tracking is None:
            return None, None
        now_zones, now_lines = tracking.current_regions()
        return tracking, tracking.make_regions(
            now_zones if zones is None else zones, now_lines if lines is None else lines,
            "{}: zones".format(where), "{}: lines".format(where))

    def replace_regions(self, camera, zones=None, lines=None, where="web"):
        """Give a camera new zones and/or lines from its next frame on, from any thread (the
        web API's PUT); False where this task does not track the camera (see
        check_regions)."""
        tracking, regions = self.check_regions(camera, zones, lines, where)
        if tracking is None:
            return False
        tracking.replace_regions(regions)
        return True

    def detections(self, outputs, frame=None):
        """(the detections as dicts, as published; the `events` of the frame)."""
        kept = select(outputs[DETECTIONS], self.floor, self.iou)
        events = ()
        ids = None
        if self.track is not None and frame is not None:
            ids, events = self.tracking_for(frame.camera).update(kept, frame)
        # NMS keeps the rows in score order: the published ones are a prefix
        published = int(np.count_nonzero(kept[:, 4] >= self.score))
        return [{"label": self.card.label(int(row[5])), "class_id": int(row[5]),
                 "score": round(float(row[4]), 4),
                 "box": [round(float(v), 2) for v in row[:4]],
                 "track_id": int(ids[i]) if ids is not None and ids[i] else None}
                for i, row in enumerate(kept[:published])], events

    def health(self):
        """Tracking figures for the health report: tracks, counts per zone and line (over
        every camera by name, and per camera), camera motion per camera."""
        if self.track is None:
            return {}
        summaries = [t.summary() for t in self.trackers.values()]
        tracks = {"tracks": sum(s["tracks"] for s in summaries),
                  "started": sum(s["started"] for s in summaries), "zones": {}, "lines": {},
                  "cameras": {}, "motion": {}}
        for tracking, summary in zip(self.trackers.values(), summaries):
            if tracking.tracker.frame is not None:      # cameras that sent a frame
                tracks["motion"].update(summary["motion"])
                tracks["cameras"].update(summary["cameras"])
            for kind in ("zones", "lines"):
                for name, counts in summary[kind].items():
                    total = tracks[kind].setdefault(name, dict.fromkeys(counts, 0))
                    for key, value in counts.items():
                        total[key] += value
        return {"tracking": tracks}

    def infer_frame(self, frame):
        engine, binding = self.binding_for(frame)
        return binding, self.infer(engine, binding)

    def decode(self, frame, inferred):
        binding, infer_ms = inferred
        self.frames += 1
        msg = self.new_message(frame, infer_ms)
        msg["detections"], events = self.detections(binding.outputs, frame)
        if self.track is not None:
            tracking = self.tracking_for(frame.camera)
            if tracking.motion.mode != "off":
                msg["camera_motion"] = tracking.camera_motion(frame.width, frame.height)
        if self.depth is not None and self.depth.serves(frame.camera):
            self.depth.add_spatial(frame, msg["detections"])
        return [msg] + [Side(EVENT_TOPIC, event, EVENT_QOS) for event in events]


def _compare_int8(got, want):
    """(ok, line) of an INT8 engine's detections against the float reference's: each
    reference box found again (same class, IoU >= INT8_MATCH_IOU, best first, one to one),
    scores within INT8_SCORE_TOLERANCE."""
    left = list(got)
    worst_iou, worst_score = 1.0, 0.0
    for y in sorted(want, key=lambda r: -r[4]):
        same = [x for x in left if int(x[5]) == int(y[5])]
        if not same:
            return False, "no class {} box for the reference's".format(int(y[5]))
        ious = pair_iou(np.array([x[:4] for x in same], np.float64),
                        np.array([y[:4]] * len(same), np.float64))
        best = int(np.argmax(ious))
        worst_iou = min(worst_iou, float(ious[best]))
        worst_score = max(worst_score, abs(same[best][4] - y[4]))
        left.remove(same[best])
    ok = worst_iou >= INT8_MATCH_IOU and worst_score <= INT8_SCORE_TOLERANCE
    return ok, "{} detections, boxes overlapping the reference's by IoU >= {:.2f}, scores " \
               "within {:.3f} (INT8)".format(len(want), worst_iou, worst_score)

