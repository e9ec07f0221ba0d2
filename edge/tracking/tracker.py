"""Multi-object tracking by detection: Kalman prediction, ByteTrack's two-stage association.

Per frame (after Zhang et al., "ByteTrack", ECCV 2022, with BoT-SORT's width/height filter):
1. every track's box is predicted to this frame;
2. confident boxes (score >= high_score) are matched to the confirmed tracks, seen last
   frame or lost for now, by IoU (>= match_iou);
3. weak boxes (low_score <= score < high_score) are matched to the confirmed tracks still
   left over, with a stricter IoU (>= low_match_iou): a partly hidden object scores low,
   and this keeps its track where a threshold would have dropped it;
4. tentative tracks take boxes left over; one unmatched for more than a frame goes;
5. boxes still left start tentative tracks;
6. a tentative track is confirmed (and gets its id) once matched in confirm_hits frames
   with scores summing to confirm_score: two confident boxes, or more weak ones, so that a
   person only ever seen half hidden is tracked too, and a one-frame false positive never;
7. a confirmed track unmatched for more than max_lost frames ends (a young one, matched in
   fewer than YOUNG_HITS frames, after YOUNG_MAX_LOST).
Matching is per class and one to one (the assignment that maximises the IoU), and the
Kalman filter vetoes pairs its motion and size model finds implausible (see `_match`).

Everything lives in arrays of a fixed capacity indexed by slot: a frame allocates numpy's
temporaries and its small result, never anything that grows with the run.
"""

import numpy as np
from scipy.optimize import linear_sum_assignment

from edge.tracking.kalman import BoxKalman

FREE, TENTATIVE, TRACKED, LOST = 0, 1, 2, 3
_FORBIDDEN = 1e6       # cost of a pair the gate refuses (never picked over an allowed one)
GATE = 18.467          # squared Mahalanobis distance: the chi-square 99.9% quantile, 4 dof
EDGE_PX = 1.0          # a box this close to the frame's edge is cut by it
EDGE_AREA = 0.7        # ... and skips the gate when at least this share of the prediction
# A box that overlaps a track's last confident box (moved with the camera since) by this IoU,
# that box at most STRONG_AGE frames old, is the object again whatever the filter says: a
# detector that boxes an object whole, then a part of it (half an umbrella), then whole
# again pulls the filter towards the part with the weak part-box, and the gate would refuse
# the whole as a jump in size (tools/bench_motion.py: zoom 2 -> 1 ids lost, pan 3 -> 1
# switches; tools/bench_track.py unchanged on seeds 14 and 21-23).
STRONG_IOU = 0.7
STRONG_AGE = 3
# A left-over box that covers GROUP_COVER of each of two or more confirmed tracks of its class
# (seen at most STRONG_AGE frames ago) is the detector boxing them together, not a new
# object: it starts no track. Two rearing horses side by side, boxed now one by one, now as
# one, made the pair a third track that took one horse's id half of the time.
GROUP_COVER = 0.5
# Nor is a box matched to a track that object when it grew out of the track's last box
# (GROUP_GROWTH times the area) into the box of it and another track of its class matched in
# the same frame (it covers GROUP_COVER of that one's box and is about their union: IoU >=
# GROUP_UNION): the track goes unmatched for the frame (it coasts) and the box is a group's.
# The same horses under a zoom: the one horse's box grew over frames into the box of both,
# and the horse alone was then too far from it for the gate (a second id). A person holding
# a child keeps the person's box (it did not grow), so keeps the track. tools/bench_motion.py
# zoom: 1 -> 0 ids lost; works for growth 1.15-1.25 and union 0.8 (0.7 or 0.9, or growth 1.5,
# do not); tools/bench_track.py unchanged on seeds 14, 21-23, 30-33.
GROUP_GROWTH = 1.25
GROUP_UNION = 0.8
TENTATIVE_MISSES = 1   # frames a tentative track may go unmatched
# A young track (matched in fewer than YOUNG_HITS frames) ends after YOUNG_MAX_LOST frames
# lost, not max_lost: its velocity is a few jittered boxes' worth, so its prediction drifts
# while it is lost, and false positives landing on the drifting box would keep it going (and
# offline, filling the gaps between them drew a false trajectory). Measured on ten seeds of
# tools/bench_track.py's detections: never a lower IDF1 on either sequence, up to +0.04.
YOUNG_HITS = 6
YOUNG_MAX_LOST = 10


def iou_matrix(a, b):
    """IoU (n, m) of boxes a (n, 4) and b (m, 4), x1, y1, x2, y2."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0.0, None) * np.clip(h, 0.0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-9)


def pair_iou(a, b):
    """IoU (n,) of boxes a (n, 4) and b (n, 4) pair by pair, x1, y1, x2, y2."""
    w = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    h = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(w, 0.0, None) * np.clip(h, 0.0, None)
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + \
        (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


def pair_iou_cover(a, b):
    """The share of box b (4,) inside box a (4,)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / max((b[2] - b[0]) * (b[3] - b[1]), 1e-9)


def assign(similarity, minimum, allowed=None):
    """(rows, cols) of the one-to-one matching of pairs with similarity >= minimum that
    maximises the total similarity.

    Pairs that are alone in their row and column are taken directly, and only the rest goes
    to the assignment solver: in a street scene most objects have one candidate, and the
    solver of older scipy releases (JetPack 4.6 ships 0.19) is written in Python.
    """
    if allowed is None:
        allowed = similarity >= minimum
    if not allowed.any():
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    per_row = allowed.sum(1)
    per_col = allowed.sum(0)
    single = allowed & (per_row[:, None] == 1) & (per_col[None, :] == 1)
    rows, cols = np.nonzero(single)
    # the rest: rows and columns with a choice (their allowed pairs never touch a single)
    busy_rows = np.flatnonzero((per_row > 0) & ~single.any(1))
    busy_cols = np.flatnonzero((per_col > 0) & ~single.any(0))
    if busy_rows.size and busy_cols.size:
        block = similarity[np.ix_(busy_rows, busy_cols)]
        cost = np.where(allowed[np.ix_(busy_rows, busy_cols)], 1.0 - block, _FORBIDDEN)
        r, c = linear_sum_assignment(cost)
        keep = cost[r, c] < _FORBIDDEN
        rows = np.concatenate([rows, busy_rows[r[keep]]])
        cols = np.concatenate([cols, busy_cols[c[keep]]])
    return rows, cols


class TrackerResult:
    """What one frame did, by track slot (a slot's arrays stay as they were until the slot
    is reused by a later frame, so ended tracks can still be read)."""

    __slots__ = ("ids", "matched", "started", "ended")

    def __init__(self, ids, matched, started, ended):
        self.ids = ids            # (n,) int64: each box's track id, 0 when not confirmed
        self.matched = matched    # (k,) confirmed before this frame and matched in it
        self.started = started    # (j,) confirmed in this frame (matched in it too)
        self.ended = ended        # (e,) ended in this frame

    @property
    def updated(self):
        """Slots of every confirmed track matched in this frame."""
        return np.concatenate([self.matched, self.started])


class Tracker:
    """One camera's tracks; `update` once per frame with that frame's boxes."""

    def __init__(self, high_score=0.5, low_score=0.1, match_iou=0.2, low_match_iou=0.5,
                 confirm_hits=2, confirm_score=1.5, max_lost=30, capacity=256, next_id=None):
        self.high_score = high_score
        self.low_score = low_score
        self.match_iou = match_iou
        self.low_match_iou = low_match_iou
        self.confirm_hits = confirm_hits
        self.confirm_score = confirm_score
        self.max_lost = max_lost
        self.capacity = capacity
        self._next_id = next_id or _counter()
        self.kalman = BoxKalman(capacity)
        self.state = np.zeros(capacity, np.int8)
        self.track_id = np.zeros(capacity, np.int64)
        self.class_id = np.zeros(capacity, np.int64)
        self.hits = np.zeros(capacity, np.int64)
        self.seen = np.zeros(capacity, np.int64)       # frame index of the last match
        self.score = np.zeros(capacity, np.float64)    # score of the last matched box
        self.box = np.zeros((capacity, 4), np.float64)  # last matched box, as detected
        # last confident box (score >= high_score; a new track's first box), moved with the
        # camera since, and the frame it was matched in (see STRONG_IOU)
        self.strong = np.zeros((capacity, 4), np.float64)
        self.strong_seen = np.zeros(capacity, np.int64)
        self.evidence = np.zeros(capacity, np.float64)  # sum of the matched boxes' scores
        self.born = np.zeros(capacity, np.int64)       # frame index of the track's first box
        self.frame = None          # index of the previous frame
        self.started_total = 0     # tracks confirmed since the tracker was made
        self.overflow = 0          # boxes that found no free slot (capacity reached)

    @classmethod
    def from_settings(cls, settings, high_score, next_id=None, capacity=None):
        """A tracker for the config's `track` section (high_score resolved by the caller)."""
        return cls(high_score=high_score, low_score=settings["low_score"],
                   match_iou=settings["match_iou"], low_match_iou=settings["low_match_iou"],
                   confirm_hits=settings["confirm_frames"],
                   confirm_score=settings["confirm_score"], max_lost=settings["max_lost"],
                   capacity=capacity or settings["max_tracks"], next_id=next_id)

    def active(self):
        """Slots of the confirmed tracks, matched in the last frame or lost for now."""
        return np.flatnonzero(self.state >= TRACKED)

    def update(self, boxes, scores, classes, frame, size=None, motion=None):
        """Track one frame's boxes (n, 4) x1, y1, x2, y2 with scores (n,) and classes (n,).

        `frame` is the source's frame index: a gap (frames a live source dropped) is
        predicted as time passing. `size`: the frame's (width, height), where known.
        `motion`: the camera's motion since the previous frame (2 x 3, edge.tracking.motion)
        or None; every track moves with it after the prediction, before association.
        Returns a TrackerResult.
        """
        steps = 1 if self.frame is None or frame <= self.frame else frame - self.frame
        self.frame = frame
        n = boxes.shape[0]
        ids = np.zeros(n, np.int64)
        live = np.flatnonzero(self.state != FREE)
        lost = live[self.state[live] == LOST]
        self.kalman.mean[lost, 6:] = 0.0       # a lost box keeps its size (ByteTrack)
        self.kalman.predict(live, steps)
        if motion is not None:
            self.kalman.warp(live, motion)
            corners = self.strong[live].reshape(-1, 2) @ motion[:, :2].T + motion[:, 2]
            self.strong[live] = corners.reshape(-1, 4)
        predicted = self.kalman.boxes(live)

        state = self.state[live]
        taken = np.zeros(n, bool)              # boxes matched so far
        confident = scores >= self.high_score
        weak = (scores >= self.low_score) & ~confident

        # confident boxes -> confirmed tracks (seen last frame or lost for now)
        confirmed = np.flatnonzero(state >= TRACKED)
        t1, d1 = self._match(live, predicted, confirmed, boxes, classes,
                             np.flatnonzero(confident), self.match_iou, size)
        # weak boxes -> confirmed tracks still unmatched
        waiting = state >= TRACKED
        waiting[t1] = False
        t2, d2 = self._match(live, predicted, np.flatnonzero(waiting), boxes, classes,
                             np.flatnonzero(weak), self.low_match_iou, size)
        matched = np.concatenate([t1, t2])
        found = np.concatenate([d1, d2])
        grouped = self._grown_into_groups(live[matched], boxes[found], classes[found])
        matched, found = matched[~grouped], found[~grouped]
        slots = live[matched]
        taken[found] = True
        self._correct(slots, boxes, scores, found, frame)
        ids[found] = self.track_id[slots]
        missed = state >= TRACKED
        missed[matched] = False
        self.state[live[missed]] = LOST
        self.state[slots] = TRACKED

        # tentative tracks take the boxes left over; confirmed with enough evidence
        candidates = confident | weak
        tentative = np.flatnonzero(state == TENTATIVE)
        t3, d3 = self._match(live, predicted, tentative, boxes, classes,
                             np.flatnonzero(candidates & ~taken), self.match_iou, size)
        taken[d3] = True
        grown = live[t3]
        self._correct(grown, boxes, scores, d3, frame)
        waiting = live[tentative]
        self.state[waiting[frame - self.seen[waiting] > TENTATIVE_MISSES]] = FREE
        ready = (self.hits[grown] >= self.confirm_hits) & \
            (self.evidence[grown] >= self.confirm_score)
        started = grown[ready]
        self._confirm(started)
        ids[d3[ready]] = self.track_id[started]

        # boxes still left start tentative tracks, but for boxes of groups
        new = np.flatnonzero(candidates & ~taken)
        new = new[~self._groups(boxes[new], classes[new], live, predicted, frame)]
        created = self._create(new, boxes, scores, classes, frame)
        ready = (self.hits[created] >= self.confirm_hits) & \
            (self.evidence[created] >= self.confirm_score)
        if ready.any():                      # confirm_frames 1 and a confident enough box
            self._confirm(created[ready])
            ids[new[:created.size][ready]] = self.track_id[created[ready]]
            started = np.concatenate([started, created[ready]])

        # lost too long: the track ends (a young one sooner)
        lost_for = frame - self.seen
        ended = np.flatnonzero((self.state == LOST) & (
            (lost_for > self.max_lost) |
            ((self.hits < YOUNG_HITS) & (lost_for > min(YOUNG_MAX_LOST, self.max_lost)))))
        self.state[ended] = FREE
        return TrackerResult(ids, slots, started, ended)

    def _match(self, live, predicted, tracks, boxes, classes, candidates, minimum, size):
        """(positions in `live`, box indices) matched between tracks and candidate boxes."""
        if tracks.size == 0 or candidates.size == 0:
            return np.zeros(0, np.intp), np.zeros(0, np.intp)
        similarity = iou_matrix(predicted[tracks], boxes[candidates])
        similarity[self.class_id[live[tracks]][:, None] != classes[candidates][None, :]] = 0.0
        # IoU proposes, the Kalman filter vetoes: a box the track's motion and size so far
        # make unlikely (two people crossing, one nearer the camera) is no candidate however
        # much it overlaps. Except a box cut by the frame's edge that no other track wants:
        # an object coming into view grows its box faster than any motion model expects.
        allowed = similarity >= minimum
        checked = allowed
        if size is not None:
            b = boxes[candidates]
            cut = (b[:, 0] <= EDGE_PX) | (b[:, 1] <= EDGE_PX) | \
                (b[:, 2] >= size[0] - EDGE_PX) | (b[:, 3] >= size[1] - EDGE_PX)
            if cut.any():
                alone = (allowed.sum(1) == 1)[:, None] & (allowed.sum(0) == 1)[None, :]
                # ... that is not much smaller than the prediction's part inside the frame:
                # an object coming into view grows, while a box much smaller than its track
                # at the edge is a part of it (a giraffe's legs at the bottom edge took its
                # track from the whole giraffe)
                p = np.clip(predicted[tracks], 0.0, [size[0], size[1], size[0], size[1]])
                area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
                grown = area[None, :] >= EDGE_AREA * ((p[:, 2] - p[:, 0]) *
                                                      (p[:, 3] - p[:, 1]))[:, None]
                checked = allowed & ~(alone & cut[None, :] & grown)
        r, c = np.nonzero(checked)
        if r.size:
            far = self.kalman.distance(live[tracks[r]], boxes[candidates[c]]) > GATE
            if far.any():       # ... unless the box is the track's recent confident shape
                at = np.flatnonzero(far)
                slots = live[tracks[r[at]]]
                same = (pair_iou(self.strong[slots], boxes[candidates[c[at]]]) >= STRONG_IOU) \
                    & (self.frame - self.strong_seen[slots] <= STRONG_AGE)
                far[at[same]] = False
            allowed[r[far], c[far]] = False
        rows, cols = assign(similarity, minimum, allowed)
        return tracks[rows], candidates[cols]

    def _grown_into_groups(self, slots, boxes, classes):
        """(n,) bool of the matched pairs (track slot, box): the box grew out of the track's
        last box (GROUP_GROWTH times its area) into the box of it and another track of its
        class matched in this frame too (it covers GROUP_COVER of that one's box, and is that
        union: IoU >= GROUP_UNION)."""
        n = boxes.shape[0]
        out = np.zeros(n, bool)
        if n < 2:
            return out
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        last = self.box[slots]
        grown = area >= GROUP_GROWTH * (last[:, 2] - last[:, 0]) * (last[:, 3] - last[:, 1])
        for i in np.flatnonzero(grown):
            for j in range(n):
                if j == i or classes[j] != classes[i]:
                    continue
                inside = pair_iou_cover(boxes[i], boxes[j])
                if inside < GROUP_COVER:
                    continue
                union = np.concatenate([np.minimum(last[i, :2], boxes[j, :2]),
                                        np.maximum(last[i, 2:], boxes[j, 2:])])
                if pair_iou(boxes[i:i + 1], union[None, :])[0] >= GROUP_UNION:
                    out[i] = True
                    break
        return out

    def _groups(self, boxes, classes, live, predicted, frame):
        """(n,) bool: each box covers GROUP_COVER of two or more recent confirmed tracks of
        its class (their predictions)."""
        recent = (self.state[live] >= TRACKED) & (frame - self.seen[live] <= STRONG_AGE)
        if boxes.shape[0] == 0 or np.count_nonzero(recent) < 2:
            return np.zeros(boxes.shape[0], bool)
        p = predicted[recent]
        w = np.minimum(boxes[:, None, 2], p[None, :, 2]) - \
            np.maximum(boxes[:, None, 0], p[None, :, 0])
        h = np.minimum(boxes[:, None, 3], p[None, :, 3]) - \
            np.maximum(boxes[:, None, 1], p[None, :, 1])
        inter = np.clip(w, 0.0, None) * np.clip(h, 0.0, None)
        area = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
        covered = (inter >= GROUP_COVER * area[None, :]) & \
            (classes[:, None] == self.class_id[live[recent]][None, :])
        return covered.sum(1) >= 2

    def _correct(self, slots, boxes, scores, index, frame):
        self.kalman.update(slots, boxes[index])
        self.box[slots] = boxes[index]
        sure = scores[index] >= self.high_score
        self.strong[slots[sure]] = boxes[index[sure]]
        self.strong_seen[slots[sure]] = frame
        self.score[slots] = scores[index]
        self.seen[slots] = frame
        self.hits[slots] += 1
        self.evidence[slots] += scores[index]

    def _confirm(self, slots):
        for slot in slots:
            self.track_id[slot] = next(self._next_id)
        self.state[slots] = TRACKED
        self.started_total += slots.size

    def _create(self, index, boxes, scores, classes, frame):
        free = np.flatnonzero(self.state == FREE)[:index.size]
        if free.size < index.size:
            self.overflow += index.size - free.size
            index = index[:free.size]
        self.kalman.start(free, boxes[index])
        self.state[free] = TENTATIVE
        self.track_id[free] = 0
        self.class_id[free] = classes[index]
        self.hits[free] = 1
        self.evidence[free] = scores[index]
        self.seen[free] = frame
        self.born[free] = frame
        self.score[free] = scores[index]
        self.box[free] = boxes[index]
        self.strong[free] = boxes[index]
        self.strong_seen[free] = frame
        return free


def _counter():
    import itertools
    return itertools.count(1)
