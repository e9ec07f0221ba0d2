"""Zones (polygons) and lines of one camera: which tracks are inside, which crossed.

A track's position is its anchor point (`track.anchor`: the bottom centre of its filtered
box, where a person or a car touches the ground, or the centre), taken from the Kalman
filter's box rather than the raw detection so that box jitter does not flicker a track in
and out of a zone or back and forth over a line. Only confirmed tracks matched in the frame
move; a track found again after an occlusion crosses a line it passed while hidden.

Zones and lines are regions of the picture: they stay where they were drawn when the camera
moves, and an object a pan carries into a zone enters it. A line is crossed by an object,
not by the camera: with camera motion compensation, a track's side change counts only when
its own motion (from where the camera carried its last point to its point now) goes that
way (`Regions._lines`), so a still object a pan carries over a line never crosses it.

Line directions: `to_left`, `to_right`, `to_top`, `to_bottom` name the side of the line in
the picture that a crossing ends on (a line that is not horizontal has a left and a right
side, one that is not vertical a top and a bottom side). Events and counts keep the older
names: walking along the line from its first point to its second, `left_to_right` is a
crossing from the left-hand side to the right-hand side (in the image, y down: for a line
drawn downwards, a move to the left of the picture); `counted_crossing` turns one into the
other.

Every zone and line is tested in one numpy pass over all of them (edge.config bounds their
number and points: MAX_ZONES, ...); Python runs per event only.
"""

import numpy as np

from edge.tracking.motion import apply

DIRECTIONS = ("left_to_right", "right_to_left")
# Of a crossing while the camera moves, the least share of the camera's motion across the
# line that the object's own motion must reach (see Regions._lines): a still object's box
# jitters by a pixel or two a frame (the giraffe of tools/pan_clip.py: 1.4 px against a pan
# of 9.4 px), the camera motion estimate errs by tenths of a pixel.
OWN_SHARE = 0.25


def counted_crossing(line):
    """The crossing (one of DIRECTIONS) a line's `direction` counts; None for both.

    The picture's point (x + 1, y) lies on the walker's right-hand side when the line runs
    upwards (dy < 0), and (x, y + 1) when it runs rightwards (dx > 0); normalised points
    scale x and y by positive factors, so the signs hold at every frame size.
    """
    direction = line["direction"]
    if direction == "both":
        return None
    if direction in DIRECTIONS:
        return direction
    (x1, y1), (x2, y2) = line["points"]
    if direction in ("to_left", "to_right"):
        right_hand = (direction == "to_right") == (y2 - y1 < 0)
    else:
        right_hand = (direction == "to_bottom") == (x2 - x1 > 0)
    return DIRECTIONS[0] if right_hand else DIRECTIONS[1]


def polygon_edges(polygon):
    """(4, p) x1, y1, x2, y2 of the edges of a polygon (p, 2)."""
    return np.stack([polygon[:, 0], polygon[:, 1], np.roll(polygon[:, 0], -1),
                     np.roll(polygon[:, 1], -1)])


class ZoneEdges:
    """The edges of every zone in pixels (made once per frame size), and which points lie
    inside each zone.

    The even-odd rule: a point is inside when an odd number of edges straddle its row
    (y1 <= y < y2, either way round) to its right. With the points sorted by y, the points an
    edge straddles are one slice of them, so only those (point, edge) pairs are computed: at
    the config's limits a few thousand rather than points x edges (256 x 1024).
    """

    def __init__(self, polygons):
        x1, y1, x2, y2 = np.concatenate([polygon_edges(p) for p in polygons], axis=1)
        self.zones = len(polygons)
        self.owner = np.repeat(np.arange(self.zones), [len(p) for p in polygons])
        self.x1, self.y1, self.dx = x1, y1, x2 - x1
        self.dy = np.where(y2 == y1, 1.0, y2 - y1)     # never used where it was 0: no row
        self.low, self.high = np.minimum(y1, y2), np.maximum(y1, y2)

    def contains(self, points):
        """(k, z) bool: which points (k, 2) lie inside each zone."""
        x, y = points[:, 0], points[:, 1]
        order = np.argsort(y)                      # nan last, inside no slice
        rows = y[order]
        first = np.searchsorted(rows, self.low)
        counts = np.searchsorted(rows, self.high) - first
        # (point, edge) pairs edge by edge: edge e with sorted points first[e] .. + counts[e];
        # per-edge values repeated rather than gathered (half the time)
        point = np.take(order, np.arange(counts.sum()) -
                        np.repeat(np.cumsum(counts) - counts - first, counts))
        at = np.take(y, point)                     # -> x where the edge crosses that row
        at -= np.repeat(self.y1, counts)
        at *= np.repeat(self.dx, counts)
        at /= np.repeat(self.dy, counts)
        at += np.repeat(self.x1, counts)
        right = np.take(x, point) < at
        cells = point[right] * self.zones + np.repeat(self.owner, counts)[right]
        odd = np.bincount(cells, minlength=points.shape[0] * self.zones) & 1
        return odd.astype(bool).reshape(points.shape[0], self.zones)


def _class_mask(classes):
    """(z, n + 1) bool: which class ids each zone counts (column n: every id from n on,
    which no zone names); None when every zone counts every class."""
    if all(c is None for c in classes):
        return None
    n = 1 + max([int(c.max()) for c in classes if c is not None and c.size] or [0])
    mask = np.ones((len(classes), n + 1), bool)
    for i, ids in enumerate(classes):
        if ids is not None:
            mask[i] = False
            mask[i, ids] = True
    return mask


class Regions:
    """The configured zones and lines in pixels of the current frame size, and per track
    slot: inside which zones, on which side of each line, where it was last."""

    def __init__(self, zones, lines, zone_classes, line_classes, capacity, anchor="bottom"):
        self.zones = zones                  # validated config items
        self.lines = lines
        self.anchor = anchor
        # per zone and line: the class ids it counts (int64 array), or None for all
        self.zone_classes = zone_classes
        self.line_classes = line_classes
        self.inside = np.zeros((capacity, len(zones)), bool)
        self.side = np.zeros((capacity, len(lines)), bool)     # True: right-hand side
        self.point = np.zeros((capacity, 2), np.float64)
        # where the picture's content at `point` is now: `point` moved by the camera's motion
        # since (the same as `point` while the camera stands still)
        self.carried = np.zeros((capacity, 2), np.float64)
        self.zone_counts = [{"inside": 0, "entered": 0, "left": 0} for _ in zones]
        self.line_counts = [dict.fromkeys(DIRECTIONS, 0) for _ in lines]
        self.counted = [counted_crossing(l) for l in lines]   # None: both ways
        self._zone_mask = _class_mask(zone_classes)
        self._line_sets = [None if c is None else frozenset(int(v) for v in c)
                           for c in line_classes]
        self._size = None
        self._edges = None          # ZoneEdges in pixels of this size
        self._ends = None           # (2, l, 2): each line's first and second point, pixels

    def _scale(self, width, height):
        """Pixel coordinates for this frame size (normalised ones scale with the frame)."""
        if self._size == (width, height):
            return
        self._size = (width, height)

        def pixels(item):
            points = np.array(item["points"], np.float64)
            return points * (width, height) if item["normalized"] else points
        if self.zones:
            self._edges = ZoneEdges([pixels(z) for z in self.zones])
        if self.lines:
            self._ends = np.stack([pixels(l) for l in self.lines], axis=1)

    def anchors(self, boxes):
        """(k, 2) anchor points of boxes (k, 4) x1, y1, x2, y2."""
        out = np.empty((boxes.shape[0], 2), np.float64)
        out[:, 0] = (boxes[:, 0] + boxes[:, 2]) * 0.5
        out[:, 1] = boxes[:, 3] if self.anchor == "bottom" else (boxes[:, 1] + boxes[:, 3]) * 0.5
        return out

    def _sides(self, points):
        """(k, l) bool: which points lie on each line's right-hand side (or on it)."""
        a, b = self._ends
        d = b - a
        return d[:, 0] * (points[:, 1:2] - a[:, 1]) - d[:, 1] * (points[:, 0:1] - a[:, 0]) >= 0

    def start(self, slots, classes, boxes, width, height, emit):
        """Tracks just confirmed: enter the zones they are in; no crossing yet."""
        if not slots.size or not (self.zones or self.lines):
            return
        self._scale(width, height)
        points = self.anchors(boxes)
        self.point[slots] = points
        self.carried[slots] = points
        self.inside[slots] = False
        if self.lines:
            self.side[slots] = self._sides(points)
        self._zones(slots, classes, points, emit)

    def adopt(self, old, slots, boxes, width, height):
        """Carry the state of the tracks in `slots` (their filtered boxes (k, 4)) over from a
        camera's old Regions to these, which replace them (the web API's PUT), so that a
        change of zones makes no event of its own:
        - a zone of the same name keeps its counts and which tracks are inside it: a track
          inside a zone that stays makes no event (if its outline changed, the track's next
          frame enters or leaves it as the new outline says);
        - a new zone starts empty: the tracks in it enter it on their next frame;
        - a zone that went makes no leave events (it is no more);
        - a line of the same name keeps its counts, and with the same points its tracks' sides;
          a new or moved line takes each track's side from where it is now, so no track
          crosses it at the change."""
        had_regions = bool(old.zones or old.lines)    # else old.point was never kept up
        self.point[:] = old.point
        self.carried[:] = old.carried
        if slots.size and not had_regions:
            self.point[slots] = self.carried[slots] = self.anchors(boxes)
        old_zones = {zone["name"]: j for j, zone in enumerate(old.zones)}
        for i, zone in enumerate(self.zones):
            j = old_zones.get(zone["name"])
            if j is not None:
                self.inside[:, i] = old.inside[:, j]
                self.zone_counts[i] = old.zone_counts[j]
        old_lines = {line["name"]: j for j, line in enumerate(old.lines)}
        fresh = []
        for i, line in enumerate(self.lines):
            j = old_lines.get(line["name"])
            if j is not None:
                self.line_counts[i] = old.line_counts[j]
                was = old.lines[j]
                if (was["points"], was["normalized"]) == (line["points"], line["normalized"]):
                    self.side[:, i] = old.side[:, j]
                    continue
            fresh.append(i)
        if fresh and slots.size:
            self._scale(width, height)
            self.side[np.ix_(slots, fresh)] = self._sides(self.point[slots])[:, fresh]

    def warp(self, slots, motion):
        """The camera moved (`motion`, edge.tracking.motion): where the tracks in `slots`
        were last seen moves with the picture (`carried`), so that `_lines` can tell an
        object's own motion from the camera's."""
        if slots.size and self.lines:
            self.carried[slots] = apply(motion, self.carried[slots])

    def move(self, slots, classes, boxes, width, height, emit):
        """Tracks matched in this frame (already started): zones entered or left, lines
        crossed. `emit(slot, kind, name, direction)` for each event."""
        if not slots.size or not (self.zones or self.lines):
            return
        self._scale(width, height)
        points = self.anchors(boxes)
        if self.lines:
            self._lines(slots, classes, points, emit)
            self.carried[slots] = points
        self.point[slots] = points
        self._zones(slots, classes, points, emit)

    def _lines(self, slots, classes, points, emit):
        side = self._sides(points)
        # (line, row) of the tracks now on the other side of a line, line by line
        lines, rows = np.nonzero((side != self.side[slots]).T)
        self.side[slots] = side
        if not lines.size:
            return
        # the path from the last point to this one must pass between the line's ends
        before = self.point[slots[rows]]
        path = points[rows] - before
        a, b = self._ends[0][lines] - before, self._ends[1][lines] - before
        ends_a = path[:, 0] * a[:, 1] - path[:, 1] * a[:, 0]
        ends_b = path[:, 0] * b[:, 1] - path[:, 1] * b[:, 0]
        through = (ends_a >= 0) != (ends_b >= 0)
        # The camera's share: the track moved from `before` to `carried` with the picture and
        # from there to its point by itself. A crossing is the object's when its own motion
        # goes the crossing's way by at least OWN_SHARE of the camera's across the line: a
        # still object a pan carries over a line (own motion: the estimate's noise) does not
        # cross it; where the camera stands still, every crossing counts as before.
        d = (self._ends[1] - self._ends[0])[lines]
        length = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)
        carried = self.carried[slots[rows]]
        own = (d[:, 0] * (points[rows, 1] - carried[:, 1]) -
               d[:, 1] * (points[rows, 0] - carried[:, 0])) / length
        camera = (d[:, 0] * (carried[:, 1] - before[:, 1]) -
                  d[:, 1] * (carried[:, 0] - before[:, 0])) / length
        towards = np.where(side[rows, lines], own, -own)     # own motion towards the new side
        through &= (towards > 0) & (towards >= OWN_SHARE * np.abs(camera))
        for i, k in zip(lines[through], rows[through]):
            if self._line_sets[i] is not None and int(classes[k]) not in self._line_sets[i]:
                continue
            crossed = DIRECTIONS[0] if side[k, i] else DIRECTIONS[1]
            if self.counted[i] in (None, crossed):
                self.line_counts[i][crossed] += 1
                emit(slots[k], "line_cross", self.lines[i]["name"], crossed)

    def _zones(self, slots, classes, points, emit):
        if not self.zones:
            return
        inside = self._edges.contains(points)
        if self._zone_mask is not None:
            n = self._zone_mask.shape[1] - 1
            ids = np.where((classes >= 0) & (classes < n), classes, n)
            inside &= self._zone_mask[:, ids].T
        # (zone, row) of the tracks that entered or left, zone by zone
        zones, rows = np.nonzero((inside != self.inside[slots]).T)
        self.inside[slots] = inside
        for i, k in zip(zones, rows):
            counts = self.zone_counts[i]
            kind = "zone_enter" if inside[k, i] else "zone_leave"
            counts["entered" if inside[k, i] else "left"] += 1
            counts["inside"] += 1 if inside[k, i] else -1
            emit(slots[k], kind, self.zones[i]["name"], None)

    def end(self, slot, emit):
        """A track ended: it leaves the zones it was in."""
        for i in np.flatnonzero(self.inside[slot]):
            self.inside[slot, i] = False
            counts = self.zone_counts[i]
            counts["left"] += 1
            counts["inside"] -= 1
            emit(slot, "zone_leave", self.zones[i]["name"], None)

    def summary(self):
        """Counts per zone and line, for health."""
        return ({z["name"]: dict(c) for z, c in zip(self.zones, self.zone_counts)},
                {l["name"]: dict(c) for l, c in zip(self.lines, self.line_counts)})
