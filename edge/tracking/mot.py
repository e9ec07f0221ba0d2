"""`edge track`: the tracker offline on MOTChallenge files, for evaluation with standard tools.

Detections in (det.txt): `frame,id,x,y,w,h,score[,...]` per line, frames counted from 1, the
id ignored (-1), boxes as top-left corner and size in pixels. Results out:
`frame,id,x,y,w,h,1,-1,-1,-1`, one line per confirmed track matched in that frame, the box
being the track's filtered box (the Kalman filter's estimate after the frame's detection).
Offline the future is known, so by default the results also hold what a live run cannot
publish: a track's frames before it was confirmed, and the frames it was unseen before it
was found again, filled in linearly (`--no-fill`: only what a live run publishes).
"""

import numpy as np

from edge.errors import DataError, SinkError, SourceError
from edge.tracking.tracker import TENTATIVE, Tracker


def read_detections(path):
    """(n, 6) float64 rows frame, x, y, w, h, score from a MOTChallenge det.txt."""
    rows = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                fields = line.replace(" ", "").split(",")
                try:
                    if len(fields) < 7:
                        raise ValueError("{} fields".format(len(fields)))
                    frame, x, y, w, h, score = (float(fields[i]) for i in (0, 2, 3, 4, 5, 6))
                except ValueError as e:
                    raise DataError("detections {}: line {}: expected frame,id,x,y,w,h,score"
                                      "[,...] with numbers ({}); use the MOTChallenge det.txt "
                                      "format".format(path, number, e))
                if frame < 1 or frame != int(frame):
                    raise DataError("detections {}: line {}: frame {:g} must be a whole "
                                      "number from 1".format(path, number, frame))
                rows.append((frame, x, y, w, h, score))
    except FileNotFoundError:
        raise SourceError("detections {}: file not found".format(path))
    except OSError as e:
        raise SourceError("detections {}: cannot read: {}".format(path, e.strerror or e))
    except UnicodeDecodeError as e:
        raise DataError("detections {}: not text ({}); use the MOTChallenge det.txt format"
                        .format(path, e))
    return np.array(rows, np.float64).reshape(-1, 6)


OFFLINE_HIGH_SCORE = 0.5     # `track.high_score: null` offline, where no card says better


def track(detections, settings=None, fill_gaps=True, size=None):
    """Results rows (m, 6) frame, id, x, y, w, h for detection rows as `read_detections`.

    `settings`: the config's `track` section (None: its defaults). With `fill_gaps`, the
    frames a track was unseen before it was found again are filled in (`interpolate`).
    `size`: the frames' (width, height) where known (boxes cut by the edge match more
    freely).
    """
    if settings is None:
        from edge import config, validate
        settings = validate.check({}, config.SPEC["track"], "config", "track.")
    high_score = settings["high_score"]
    tracker = Tracker.from_settings(settings, OFFLINE_HIGH_SCORE if high_score is None
                                    else high_score,
                                    capacity=max(settings["max_tracks"], 1024))
    if detections.shape[0] == 0:
        return np.zeros((0, 6), np.float64)
    order = np.argsort(detections[:, 0], kind="stable")
    detections = detections[order]
    frames = detections[:, 0].astype(np.int64)
    starts = np.searchsorted(frames, np.arange(1, frames.max() + 2))
    classes = np.zeros(detections.shape[0], np.int64)
    corners = detections[:, 1:5].copy()
    corners[:, 2:] += corners[:, :2]
    out = []
    pending = {}          # slot of a tentative track -> its rows so far, id not yet known
    for frame in range(1, int(frames.max()) + 1):
        a, b = starts[frame - 1], starts[frame]
        result = tracker.update(corners[a:b], detections[a:b, 5], classes[a:b], frame, size)
        slots = result.updated
        if slots.size:
            out.append(_rows(frame, tracker.track_id[slots], tracker.kalman.boxes(slots)))
        # offline, a track's frames before its confirmation are known to be its own
        for slot in result.started:
            for block in pending.pop(slot, []):
                block[:, 1] = tracker.track_id[slot]
                out.append(block)
        for slot in np.flatnonzero((tracker.state == TENTATIVE) & (tracker.seen == frame)):
            if tracker.born[slot] == frame:
                pending[slot] = []
            pending[slot].append(_rows(frame, np.zeros(1), tracker.kalman.boxes([slot])))
    rows = np.concatenate(out) if out else np.zeros((0, 6), np.float64)
    return interpolate(rows, settings["max_lost"]) if fill_gaps else rows


def _rows(frame, ids, boxes):
    """Results rows (k, 6) frame, id, x, y, w, h of boxes (k, 4) x1, y1, x2, y2."""
    block = np.empty((ids.size, 6), np.float64)
    block[:, 0] = frame
    block[:, 1] = ids
    block[:, 2:4] = boxes[:, :2]
    block[:, 4:6] = boxes[:, 2:] - boxes[:, :2]
    return block


def interpolate(rows, max_gap):
    """Results rows with the frames a track was unseen (up to max_gap in a row) filled in
    linearly between the boxes before and after: offline, the track's return is known."""
    if rows.shape[0] == 0:
        return rows
    rows = rows[np.lexsort((rows[:, 0], rows[:, 1]))]
    gap = np.diff(rows[:, 0])
    same = rows[1:, 1] == rows[:-1, 1]
    holes = np.flatnonzero(same & (gap > 1) & (gap <= max_gap + 1))
    filled = [rows]
    for i in holes:
        a, b = rows[i], rows[i + 1]
        steps = int(b[0] - a[0])
        t = (np.arange(1, steps) / float(steps))[:, None]
        block = a + (b - a) * t
        block[:, 1] = a[1]
        filled.append(block)
    out = np.concatenate(filled)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


def write_results(rows, path):
    """MOTChallenge results lines, written atomically."""
    from edge import files
    text = "".join("{:d},{:d},{:.2f},{:.2f},{:.2f},{:.2f},1,-1,-1,-1\n".format(
        int(r[0]), int(r[1]), r[2], r[3], r[4], r[5]) for r in rows)
    try:
        files.atomic_write(path, text.encode())
    except OSError as e:
        raise SinkError("results {}: cannot write ({}); choose a writable path".format(
            path, e.strerror or e))
