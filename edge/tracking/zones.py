"""Zones (polygons) and lines of one camera: which tracks are inside, which crossed.

A track's position is its anchor point (`track.anchor`: the bottom centre of its filtered
box, where a person or a car touches the ground, or the centre), taken from the Kalman
filter's box rather than the raw detection so that box jitter does not flicker a track in
and out of a zone or back and forth over a line. Only confirmed tracks matched in the frame
move; a track found again after an occlusion crosses a line it passed while hidden.

Line directions: walking along the line from its first point to its second, `left_to_right`
is a crossing from the left-hand side to the right-hand side (in the image, y down: for a
line drawn from left to right, moving downwards).
"""

import numpy as np

DIRECTIONS = ("left_to_right", "right_to_left")


def polygon_edges(polygon):
    """(4, p) x1, y1, x2, y2 of the edges of a polygon (p, 2), for `polygon_contains`."""
    return np.stack([polygon[:, 0], polygon[:, 1], np.roll(polygon[:, 0], -1),
                     np.roll(polygon[:, 1], -1)])


def polygon_contains(points, edges):
    """(k,) bool: which points (k, 2) lie inside the polygon of `edges` (even-odd rule)."""
    x = points[:, 0:1]
    y = points[:, 1:2]
    x1, y1, x2, y2 = edges
    straddles = (y1 > y) != (y2 > y)
    dy = np.where(y2 == y1, 1.0, y2 - y1)          # never used where it was 0 (no straddle)
    crossing = x < (x2 - x1) * (y - y1) / dy + x1
    return (np.count_nonzero(straddles & crossing, axis=1) % 2) == 1


def _cross(origin, direction, points):
    """z of direction x (points - origin), per point."""
    return direction[0] * (points[:, 1] - origin[1]) - direction[1] * (points[:, 0] - origin[0])


def _cross_rows(origins, directions, point):
    """z of directions x (point - origins), per row."""
    return directions[:, 0] * (point[1] - origins[:, 1]) - \
        directions[:, 1] * (point[0] - origins[:, 0])


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
        self.zone_counts = [{"inside": 0, "entered": 0, "left": 0} for _ in zones]
        self.line_counts = [dict.fromkeys(DIRECTIONS, 0) for _ in lines]
        self._size = None
        self._polygons = []
        self._segments = []

    def _scale(self, width, height):
        """Pixel coordinates for this frame size (normalised ones scale with the frame)."""
        if self._size == (width, height):
            return
        self._size = (width, height)

        def pixels(item):
            points = np.array(item["points"], np.float64)
            return points * (width, height) if item["normalized"] else points
        self._polygons = [polygon_edges(pixels(z)) for z in self.zones]
        self._segments = [pixels(l) for l in self.lines]

    def anchors(self, boxes):
        """(k, 2) anchor points of boxes (k, 4) x1, y1, x2, y2."""
        out = np.empty((boxes.shape[0], 2), np.float64)
        out[:, 0] = (boxes[:, 0] + boxes[:, 2]) * 0.5
        out[:, 1] = boxes[:, 3] if self.anchor == "bottom" else (boxes[:, 1] + boxes[:, 3]) * 0.5
        return out

    def start(self, slots, classes, boxes, width, height, emit):
        """Tracks just confirmed: enter the zones they are in; no crossing yet."""
        if not slots.size or not (self.zones or self.lines):
            return
        self._scale(width, height)
        points = self.anchors(boxes)
        self.point[slots] = points
        self.inside[slots] = False
        for i, segment in enumerate(self._segments):
            self.side[slots, i] = _cross(segment[0], segment[1] - segment[0], points) >= 0
        self._zones(slots, classes, points, emit)

    def move(self, slots, classes, boxes, width, height, emit):
        """Tracks matched in this frame (already started): zones entered or left, lines
        crossed. `emit(slot, kind, name, direction)` for each event."""
        if not slots.size or not (self.zones or self.lines):
            return
        self._scale(width, height)
        points = self.anchors(boxes)
        before = self.point[slots]
        for i, (segment, classes_in) in enumerate(zip(self._segments, self.line_classes)):
            a, b = segment
            side = _cross(a, b - a, points) >= 0
            flipped = np.flatnonzero(side != self.side[slots, i])
            self.side[slots, i] = side
            if flipped.size == 0:
                continue
            # the path from the last point to this one must pass between the line's ends
            path = points[flipped] - before[flipped]
            ends_a = _cross_rows(before[flipped], path, a)
            ends_b = _cross_rows(before[flipped], path, b)
            through = flipped[(ends_a >= 0) != (ends_b >= 0)]
            if classes_in is not None:
                through = through[np.isin(classes[through], classes_in)]
            direction = self.lines[i]["direction"]
            for k in through:
                crossed = DIRECTIONS[0] if side[k] else DIRECTIONS[1]
                if direction in ("both", crossed):
                    self.line_counts[i][crossed] += 1
                    emit(slots[k], "line_cross", self.lines[i]["name"], crossed)
        self.point[slots] = points
        self._zones(slots, classes, points, emit)

    def _zones(self, slots, classes, points, emit):
        for i, (polygon, classes_in) in enumerate(zip(self._polygons, self.zone_classes)):
            inside = polygon_contains(points, polygon)
            if classes_in is not None:
                inside &= np.isin(classes, classes_in)
            changed = np.flatnonzero(inside != self.inside[slots, i])
            self.inside[slots, i] = inside
            counts = self.zone_counts[i]
            for k in changed:
                kind = "zone_enter" if inside[k] else "zone_leave"
                counts["entered" if inside[k] else "left"] += 1
                counts["inside"] += 1 if inside[k] else -1
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
