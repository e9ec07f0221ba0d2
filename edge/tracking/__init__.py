"""Tracking: stable ids for detections, zones and lines, and the events they make.

The detect task owns one CameraTracking per camera (keyed by camera name) and runs it in
its decode step, on the decode thread: the tracker (tracker.py: Kalman prediction,
ByteTrack's two-stage association), the zones and lines (zones.py), and the `events`
messages. `edge track` runs the same tracker offline on MOTChallenge files (mot.py).
The web API replaces a camera's zones and lines while it runs: `replace_regions` from its
thread, taken by `update` at the next frame, the tracks' state carried over (`Regions.adopt`).
"""

import itertools
import threading

import numpy as np

from edge.errors import ConfigError
from edge.tracking.motion import CameraMotion, describe, robot_motion
from edge.tracking.tracker import Tracker
from edge.tracking.zones import Regions

EVENT_TOPIC = "events"
EVENT_QOS = 1           # events are rare and each one matters: at least once, never retained

_ids = {}               # camera name -> itertools.count: ids stay unique across reloads
_ids_lock = threading.Lock()


def id_counter(camera):
    """The track id source of a camera for this process (ids never repeat in a run)."""
    with _ids_lock:
        return _ids.setdefault(camera, itertools.count(1))


def class_ids(labels, card_labels, key, model):
    """The class ids of a zone's or line's `labels` (None: every class); ConfigError naming
    the key (with where it is: `config: track.zones[0].labels`) for a label the detector does
    not know."""
    if labels is None:
        return None
    ids = []
    for label in labels:
        if label in card_labels:
            ids.append(card_labels.index(label))
        elif not card_labels and label.isdigit():   # a card without labels names classes by id
            ids.append(int(label))
        else:
            known = ", ".join(card_labels[:12]) + (", ..." if len(card_labels) > 12 else "")
            raise ConfigError("{}: unknown label {!r} for detector {}; its labels: {}"
                              .format(key, label, model, known or "class numbers 0, 1, ..."))
    return np.array(ids, np.int64)


class CameraTracking:
    """One camera's tracker, zones and lines; `update` once per decoded frame."""

    def __init__(self, settings, card, device, camera=None, keys=None):
        """`settings`: the camera's `track` section (edge.config.camera_track); `keys`: where
        its zones and lines came from, for errors (default `config: track.zones`...)."""
        keys = keys or {}
        self.card = card
        self.device = device
        self.camera = camera
        self.capacity = settings["max_tracks"]
        self.anchor = settings["anchor"]
        high_score = settings["high_score"]
        if high_score is None:
            high_score = card.thresholds["score"]
        self.tracker = Tracker.from_settings(settings, high_score, id_counter(camera))
        self.motion = CameraMotion(settings["motion"], robot_motion(camera))
        self.regions = self.make_regions(settings["zones"], settings["lines"],
                                         keys.get("zones", "config: track.zones"),
                                         keys.get("lines", "config: track.lines"))
        # Regions handed over by another thread (replace_regions), taken at the start of the
        # next update: the decode thread alone ever touches self.regions' arrays.
        self._pending = None
        self._pending_lock = threading.Lock()
        # capture time of each slot's last match
        self.seen_ts = np.zeros(self.capacity, np.float64)
        self.seq = 0
        self._events = []

    def make_regions(self, zones, lines, zones_key, lines_key):
        """Regions of validated zones and lines (the config's items) for this camera;
        ConfigError naming `zones_key[i].labels` for a label the detector does not know."""
        labels = self.card.labels
        return Regions(
            zones, lines,
            [class_ids(z["labels"], labels, "{}[{}].labels".format(zones_key, i), self.card.name)
             for i, z in enumerate(zones)],
            [class_ids(l["labels"], labels, "{}[{}].labels".format(lines_key, i), self.card.name)
             for i, l in enumerate(lines)],
            self.capacity, self.anchor)

    def replace_regions(self, regions):
        """Use these Regions (make_regions) from the next frame on; any thread may call it.
        Tracks keep their ids; see Regions.adopt for what zones and lines keep."""
        with self._pending_lock:
            self._pending = regions

    def current_regions(self):
        """(zones, lines) as configured items: those handed over and not yet taken, else
        those in use."""
        regions = self._pending or self.regions
        return regions.zones, regions.lines

    def update(self, rows, frame):
        """Track the frame's kept detections (n, 6) x1, y1, x2, y2, score, class.

        Returns (track id per row, 0 for none; the `events` messages of this frame).
        """
        self._events = []
        tracker = self.tracker
        if self._pending is not None:       # a plain read per frame; the lock only to take it
            with self._pending_lock:
                pending, self._pending = self._pending, None
            slots = tracker.active()
            pending.adopt(self.regions, slots, tracker.kalman.boxes(slots), frame.width,
                          frame.height)
            self.regions = pending
        boxes = rows[:, :4].astype(np.float64)
        motion = self.motion.estimate(frame, boxes)
        before = tracker.active()
        result = tracker.update(boxes, rows[:, 4].astype(np.float64),
                                rows[:, 5].astype(np.int64), frame.index,
                                (frame.width, frame.height), motion)
        self.seen_ts[result.matched] = frame.ts
        self.seen_ts[result.started] = frame.ts
        for slot in result.started:
            self._emit(slot, "track_start", None, None)
        width, height = frame.width, frame.height
        regions = self.regions
        if motion is not None:
            regions.warp(before, motion)
        regions.start(result.started, tracker.class_id[result.started],
                      tracker.kalman.boxes(result.started), width, height, self._emit)
        regions.move(result.matched, tracker.class_id[result.matched],
                     tracker.kalman.boxes(result.matched), width, height, self._emit)
        for slot in result.ended:
            regions.end(slot, self._emit)
            self._emit(slot, "track_end", None, None)
        return result.ids, self._events

    def _emit(self, slot, kind, name, direction):
        """One `events` message about the track in `slot`, as of its last match."""
        tracker = self.tracker
        self.seq += 1
        class_id = int(tracker.class_id[slot])
        event = {"v": 1, "device": self.device}
        if self.camera is not None:       # named cameras (config `sources`)
            event["camera"] = self.camera
        event.update({"model": self.card.name, "seq": self.seq,
                      "type": kind, "ts": round(float(self.seen_ts[slot]), 6),
                      "frame_index": int(tracker.seen[slot]),
                      "track_id": int(tracker.track_id[slot]),
                      "label": self.card.label(class_id), "class_id": class_id,
                      "score": round(float(tracker.score[slot]), 4),
                      "box": [round(float(v), 2) for v in tracker.box[slot]]})
        if kind.startswith("zone_"):
            event["zone"] = name
        elif kind == "line_cross":
            event["line"] = name
            event["direction"] = direction
        self._events.append(event)

    def camera_motion(self, width, height):
        """The last frame's camera motion for its message ({dx, dy, scale, angle}), None when
        none was found; no key at all with `track.motion: off`."""
        motion = self.motion.last
        return None if motion is None else describe(motion, width, height)

    def summary(self):
        """For health: tracks now, tracks started, counts per zone and line, and under the
        camera's name (the one unnamed camera is `source`, as in the report) the same counts
        and its motion compensation."""
        zones, lines = self.regions.summary()
        name = "source" if self.camera is None else self.camera
        return {"tracks": int(self.tracker.active().size),
                "started": self.tracker.started_total, "zones": zones, "lines": lines,
                "cameras": {name: {"zones": zones, "lines": lines}},
                "motion": {name: self.motion.summary()}}
