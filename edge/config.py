"""The configuration: defaults, the YAML file, then command line flags, validated by key."""

import collections
import copy
import os
import re

from edge import imagefiles, precision, tasks, topics, validate
from edge.errors import ConfigError
from edge.validate import Field

# \Z, not $: `$` also matches before a trailing newline
_REGION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")

# Bounds of track.zones and track.lines. Every zone and line is tested on every tracked
# object in every frame, so their number and points are the per-frame cost (README,
# Tracking: at these limits under 1 ms a frame with 50 objects on the development host,
# under 6 ms with 256).
# Real use has margin: a car park's spaces (tens of 4-point zones), a hand-drawn area (a
# dozen points; a traced outline a few dozen), a few doors and lanes.
MAX_ZONES = 100
MAX_ZONE_POINTS = 64
MAX_ALL_ZONE_POINTS = 1024         # of all zones together: the edges every point is tested on
MAX_LINES = 100
MAX_COORDINATE = 1e6               # pixels either way: a zone may reach past the frame
# A configuration with every zone and line at those limits is some 30-50 KB; the YAML parser
# takes about a second per 60 KB (pure Python), so a file larger than this is refused unread.
MAX_CONFIG_BYTES = 128 * 1024


def _region_name(value):
    return None if _REGION_NAME.match(value) else "1-64 letters, digits, _ . - (no spaces)"


class _Listed(Field):
    """A list Field that says what it holds in its own words (points, zones, lines)."""

    def __init__(self, words, **kwargs):
        super().__init__(list, **kwargs)
        self.words = words

    def describe(self):
        return self.words


def _finite_point(point):
    if all(abs(v) <= MAX_COORDINATE for v in point):     # False for nan; never an overflow
        return None
    return "finite numbers from -{0:.0f} to {0:.0f} (pixels; no .nan or .inf)".format(
        MAX_COORDINATE)


def _zone_points(points):
    if len(points) < 3:
        return "a zone needs at least 3 points"
    if len(points) > MAX_ZONE_POINTS:
        return "a zone has at most {} points (got {})".format(MAX_ZONE_POINTS, len(points))
    return None


def _normalized_outside(item):
    if item["normalized"] and any(not 0.0 <= v <= 1.0 for point in item["points"]
                                  for v in point):
        return "points", "normalized coordinates must lie within 0..1"
    return None


def _labels_empty(item):
    if item["labels"] is not None and not item["labels"]:
        return "labels", "list at least one label, or leave labels out to count every class"
    return None


def _crossing_edges(points):
    """(i, j) of the first two edges of a polygon that cross (edge i runs from points[i] to
    the next point), or None. Edges that only touch do not count: the even-odd test is
    well defined there."""
    import numpy as np
    p = np.array(points, np.float64)
    d = np.roll(p, -1, axis=0) - p
    # side[i, j]: z of edge i x (point j - start of edge i): which side of edge i point j is
    side = d[:, None, 0] * (p[None, :, 1] - p[:, None, 1]) - \
        d[:, None, 1] * (p[None, :, 0] - p[:, None, 0])
    # edge j's ends on strictly opposite sides of edge i
    apart = side * np.roll(side, -1, axis=1) < 0
    crossing = np.triu(apart & apart.T, 2)          # each pair once; neighbours share a point
    crossing[0, -1] = False                         # the last edge's neighbour is the first
    found = np.argwhere(crossing)
    return tuple(int(v) for v in found[0]) if found.size else None


def _collinear(points):
    (x0, y0) = points[0]
    far = max(points, key=lambda q: abs(q[0] - x0) + abs(q[1] - y0))
    dx, dy = far[0] - x0, far[1] - y0
    return all(dx * (y - y0) - dy * (x - x0) == 0 for x, y in points)


def _zone(item):
    """Rules across a zone's keys: a simple polygon (no edges crossing) with an area."""
    points = item["points"]
    crossed = _crossing_edges(points)
    if crossed is not None:
        i, j = crossed
        n = len(points)
        return "points", ("edges cross (points[{}] to points[{}] and points[{}] to points[{}]); "
                          "a zone's outline must not cross itself: list the points in order "
                          "around the zone").format(i, (i + 1) % n, j, (j + 1) % n)
    twice_area = sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in
                     zip(points, points[1:] + points[:1]))
    if twice_area == 0:
        if _collinear(points):
            return "points", "the points enclose no area (all on one line)"
        return "points", "the points enclose no area (the outline runs back over itself)"
    return _normalized_outside(item) or _labels_empty(item)


def _line(item):
    """Rules across a line's keys: two different points; a side the line has."""
    (x1, y1), (x2, y2) = item["points"]
    if (x1, y1) == (x2, y2):
        return "points", "the two points are the same (a zero-length line)"
    direction = item["direction"]
    if direction in ("to_left", "to_right") and y1 == y2:
        return "direction", ("a horizontal line has no left or right side; use to_top or "
                             "to_bottom")
    if direction in ("to_top", "to_bottom") and x1 == x2:
        return "direction", ("a vertical line has no top or bottom side; use to_left or "
                             "to_right")
    return _normalized_outside(item) or _labels_empty(item)


def _zones_bounded(zones):
    if len(zones) > MAX_ZONES:
        return "at most {} zones (got {})".format(MAX_ZONES, len(zones))
    total = sum(len(zone["points"]) for zone in zones)
    if total > MAX_ALL_ZONE_POINTS:
        return "at most {} points in all zones together (got {}); use fewer points or " \
               "fewer zones".format(MAX_ALL_ZONE_POINTS, total)
    return None


def _lines_bounded(lines):
    if len(lines) > MAX_LINES:
        return "at most {} lines (got {})".format(MAX_LINES, len(lines))
    return None


_POINT = Field(list, length=2, check=_finite_point)
_LABELS = Field(list, default=None, nullable=True, items=Field(str),
                help="the detector's labels this counts; null: every class")
DIRECTIONS = ("both", "to_left", "to_right", "to_top", "to_bottom", "left_to_right",
              "right_to_left")
ZONE = {
    "name": Field(str, check=_region_name, help="name in events and health"),
    "points": _Listed("a list of 3 to {} points [[x, y], ...]".format(MAX_ZONE_POINTS),
                      items=_POINT, check=_zone_points,
                      help="polygon [[x, y], ...]: 3 to 64 points, edges not crossing"),
    "normalized": Field(bool, default=False, help="points in 0..1 of the frame's width and "
                                                  "height instead of pixels"),
    "labels": _LABELS,
}
LINE = {
    "name": Field(str, check=_region_name, help="name in events and health"),
    "points": _Listed("a list of 2 points [[x1, y1], [x2, y2]]", length=2, items=_POINT,
                      help="[[x1, y1], [x2, y2]]"),
    "normalized": Field(bool, default=False, help="points in 0..1 of the frame"),
    "direction": Field(str, default="both", choices=DIRECTIONS,
                       help="crossings counted: to_left | to_right (a line that is not "
                            "horizontal) or to_top | to_bottom (not vertical), the side of "
                            "the line in the picture a crossing ends on; left_to_right | "
                            "right_to_left, walking from the first point to the second"),
    "labels": _LABELS,
}


def _grid(value):
    from edge.stereo.conversion import parse_grid
    try:
        parse_grid(value)
    except ValueError:
        return "COLUMNSxROWS, each 1..256, e.g. 16x12"
    return None


def _multiple_of_16(value):
    return None if value % 16 == 0 else "a multiple of 16 (StereoSGBM's search is in steps of 16)"


def _odd(value):
    return None if value % 2 else "an odd number (the block has a centre pixel)"


def _tactic_sources(value):
    from edge.backends.tactics import parse_tactic_sources
    try:
        parse_tactic_sources(value)
    except ValueError as e:
        return str(e)
    return None


def _camera_name(value):
    from edge.cameras import name_problem
    return name_problem(value)


def _sources_empty(value):
    if not value:
        return ("list at least one camera ({name, uri}), or leave sources out and set "
                "source: URI")
    return None


TRACK_ANCHOR = Field(str, default="bottom", choices=("bottom", "center"),
                     help="point of a box that zones and lines test")
TRACK_MOTION = Field(str, default="auto", choices=("auto", "robot", "off"),
                     help="camera motion compensation: auto: from the frames, or the "
                          "robot's rotation while it sends it (`motion` topic); robot: "
                          "only the robot's; off: a still camera")
TRACK_ZONES = _Listed("a list of at most {} zones {{name, points, ...}}".format(MAX_ZONES),
                      default=[], items=ZONE, item_check=_zone, unique="name",
                      check=_zones_bounded, help="polygons: events when a track enters or leaves")
TRACK_LINES = _Listed("a list of at most {} lines {{name, points, ...}}".format(MAX_LINES),
                      default=[], items=LINE, item_check=_line, unique="name",
                      check=_lines_bounded, help="segments: events when a track crosses")


def _own(field):
    """A camera's own value of a `track` key: unset (null), the `track` section's applies."""
    own = copy.copy(field)
    own.default = None
    own.nullable = True
    return own


# The `track` keys a camera may set for itself: a zone or a line is a region of one camera's
# picture, and one camera may stand still while another moves with the robot. The rest
# (scores, IoUs, lifetimes) are the detector's and the tracker's, the same for every camera.
CAMERA_TRACK = ("zones", "lines", "anchor", "motion")

CAMERA = {
    "name": Field(str, check=_camera_name, help="the camera's topic level and `camera` field"),
    "uri": Field(str, help="source URI (DESIGN.md, Sources)"),
    "track": {key: _own(field) for key, field in zip(
        CAMERA_TRACK, (TRACK_ZONES, TRACK_LINES, TRACK_ANCHOR, TRACK_MOTION))},
}


CameraTrack = collections.namedtuple("CameraTrack", "settings keys")


def camera_track(config, camera):
    """A CameraTrack: the `track` settings of a camera, by name (None: the one unnamed
    camera), the `track` section with what the camera's `sources` entry sets itself, and
    over both the zones and lines saved over the web API (with_saved_regions); and where
    each of its zones and lines came from, for error messages (`config: track.zones`)."""
    settings = dict(config["track"])
    keys = {"zones": "config: track.zones", "lines": "config: track.lines"}
    for i, item in enumerate(config.get("sources") or ()):
        if item["name"] != camera:
            continue
        for key, value in (item.get("track") or {}).items():
            if value is not None:
                settings[key] = value
                keys[key] = "config: sources[{}].track.{}".format(i, key)
    saved = config.get("saved_regions") or {}
    name = UNNAMED if camera is None else camera
    for key, value in (saved.get("cameras", {}).get(name) or {}).items():
        if value is not None:
            settings[key] = value
            keys[key] = "saved zones {}: cameras.{}.{}".format(saved["path"], name, key)
    return CameraTrack(settings, keys)


# Zones and lines saved over the web API (edge.web): one JSON file in the state folder,
# written atomically, read at start-up and on reload, where a camera's saved zones (lines)
# replace the configuration's. JSON, not YAML: the API speaks it, and it parses in
# milliseconds where the YAML parser takes a second per 60 KB (every camera at the limits is
# some 50 KB).
SAVED_REGIONS = "zones.json"
SAVED_VERSION = 1
MAX_SAVED_BYTES = 4 << 20
UNNAMED = "source"      # the one unnamed camera's name in the web API and the saved file
SAVED_CAMERA = {"zones": _own(TRACK_ZONES), "lines": _own(TRACK_LINES)}
_SAVED_FIX = ("; correct it, or remove it to go back to the configuration's zones and lines "
              "(then PUT them again over the web API)")


def saved_regions_path(config):
    """The file the web API saves zones and lines in: {state_dir}/zones.json."""
    return os.path.join(config["state_dir"], SAVED_REGIONS)


def _saved_camera_name(value):
    from edge.cameras import name_problem
    return name_problem(value)


def load_saved_regions(path):
    """{camera name: {"zones": list or None, "lines": list or None}} of a saved file ({} when
    there is none); ConfigError naming the file, the key and the fix when it is bad."""
    import json
    where = "saved zones {}".format(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_SAVED_BYTES:
            raise ConfigError("{}: {} bytes, more than the web API ever saves (at most "
                              "{}){}".format(where, size, MAX_SAVED_BYTES, _SAVED_FIX))
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("{}: cannot read it ({}){}".format(where, e, _SAVED_FIX))
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError("{}: not valid JSON ({}){}".format(
            where, str(e).splitlines()[0] if str(e) else "nested too deeply", _SAVED_FIX))
    try:
        doc = validate.check(doc, {"v": Field(int, choices=(SAVED_VERSION,)),
                                   "cameras": Field(dict)}, where)
        cameras = {}
        for name, entry in doc["cameras"].items():
            problem = _saved_camera_name(name)
            if problem:
                raise ConfigError("{}: cameras.{}: not a camera name; {}".format(
                    where, validate.shown(name), problem))
            cameras[name] = validate.check(entry, SAVED_CAMERA, where,
                                           "cameras.{}.".format(name))
    except ConfigError as e:
        raise ConfigError(str(e) + _SAVED_FIX)
    return cameras


def saved_regions_document(cameras):
    """The bytes of a saved file holding `cameras` (as load_saved_regions returns)."""
    import json
    doc = {"v": SAVED_VERSION, "cameras": cameras}
    return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def with_saved_regions(config):
    """The config with the zones and lines saved over the web API (`saved_regions`:
    {path, cameras} of the configured cameras; camera_track applies them); ConfigError for a
    bad file. Saved entries of cameras the config no longer has are kept in the file and
    left out, with a warning."""
    import logging
    logger = logging.getLogger(__name__)
    path = saved_regions_path(config)
    saved = load_saved_regions(path)
    names = [item["name"] for item in config["sources"]] if config.get("sources") else [UNNAMED]
    for name in sorted(saved):
        if name not in names:
            logger.warning("saved zones %s: camera %s is not configured; its zones and "
                           "lines are left out", path, name)
        else:
            logger.info("camera %s: zones and lines saved over the web API (%s) replace the "
                        "configuration's", name, path)
    config["saved_regions"] = {"path": path,
                               "cameras": {k: v for k, v in saved.items() if k in names}}
    return config


def _backend_names():
    from edge import backends
    return tuple(backends.names())


SPEC = {
    "device_id": Field(str, default=None, nullable=True, check=topics.name_problem,
                       help="name in MQTT topics; default: the host name"),
    "source": Field(str, default="test://", help="source URI (DESIGN.md, Sources)"),
    "sources": Field(list, default=None, nullable=True, items=CAMERA, unique="name",
                     check=_sources_empty,
                     help="named cameras [{name, uri, track}, ...] instead of `source`; "
                          "`track`: the camera's own zones, lines, anchor, motion"),
    "backend": Field(str, default="auto", choices=("auto", "ort", "trt")),
    "model_dir": Field(str, default=None, nullable=True,
                       help="model files; default $EDGE_MODEL_DIR or ~/.cache/edge/models"),
    "model_mirror": Field(str, default=None, nullable=True,
                          help="local folder to fetch models from instead of the network"),
    "state_dir": Field(str, default=None, nullable=True,
                       help="references and engines; default $EDGE_STATE_DIR, $STATE_DIRECTORY "
                            "or ~/.local/state/edge"),
    "reference": Field(str, default=None, nullable=True,
                       help="image file matched as a reference in this run (not stored)"),
    "max_frames": Field(int, default=None, nullable=True, min=1),
    "max_image_pixels": Field(int, default=imagefiles.DEFAULT_MAX_PIXELS, min=1, max=1 << 30,
                              help="larger images (folder frames, file:// images, "
                                   "references) and video or camera frames are refused from "
                                   "their header or container, before decoding"),
    "jsonl": Field(str, default=None, nullable=True, help="also append messages to this file"),
    "log_level": Field(str, default="info", choices=("debug", "info", "warning", "error")),
    "mqtt": {
        "url": Field(str, default=None, nullable=True,
                     help="mqtt://host:port; null: no MQTT (JSONL only)"),
        "prefix": Field(str, default=topics.DEFAULT_PREFIX, check=topics.prefix_problem),
        "username": Field(str, default=None, nullable=True, help="broker user name"),
        "password_file": Field(str, default=None, nullable=True,
                               help="file whose first line is the password (or set "
                                    "EDGE_MQTT_PASSWORD); never put it in the URL or flags"),
        "ca_file": Field(str, default=None, nullable=True,
                         help="CA certificate(s) to verify the broker (mqtts://)"),
        "cert_file": Field(str, default=None, nullable=True, help="client certificate"),
        "key_file": Field(str, default=None, nullable=True, help="client certificate's key"),
        "qos": Field(int, default=0, choices=(0, 1)),
        "keepalive": Field(int, default=30, min=5, max=3600),
        "protocol": Field(str, default="3.1.1", choices=("3.1.1", "5"),
                          help="5: commands honour response topic and correlation data "
                               "(Mosquitto >= 1.6; Ubuntu 18.04's 1.4 speaks 3.1.1 only); "
                               "both bound large commands alike (docs/broker.md)"),
        "queue": Field(int, default=1000, min=1, max=1000000,
                       help="messages held while the broker is slow or away"),
        "flush_timeout": Field(float, default=10.0, min=0.0, max=600.0,
                               help="seconds to deliver what is queued when a run ends"),
    },
    "engine": {
        "dir": Field(str, default=None, nullable=True,
                     help="built engines; default {state_dir}/engines"),
        "budget_mb": Field(int, default=2048, min=64, max=1 << 20,
                           help="memory the engine build process may use itself (RSS + "
                                "swap, plus its GPU memory where readable); no other "
                                "process's memory counts"),
        "reserve_mb": Field(int, default=128, min=0, max=1 << 20,
                            help="memory + swap a build must leave to the rest of the "
                                 "system: less before it starts refuses it, less while it "
                                 "runs stops it"),
        "workspace_mb": Field(int, default=256, min=0, max=1 << 20,
                              help="TensorRT builder workspace"),
        "precision": Field(str, default="auto", choices=precision.CHOICES,
                           help="auto: the card's (fp16) on a GPU, fp32 on the CPU; int8: "
                                "the card's calibrated graph (edge calibrate), refused on a "
                                "GPU without fast INT8 (the Jetson Nano)"),
        "tactic_sources": Field(str, default="auto", check=_tactic_sources,
                                help="TensorRT tactic sources: auto (a Jetson: TensorRT's own "
                                     "kernels, no cuBLAS/cuDNN; elsewhere TensorRT's "
                                     "defaults), default, or edits such as "
                                     "-CUDNN,-CUBLAS,-CUBLAS_LT or +CUBLAS"),
        "build_timeout": Field(float, default=3600.0, min=1.0,
                               help="seconds before a build is given up"),
        "cache_mb": Field(int, default=1024, min=1, max=1 << 20,
                          help="built engines kept on disk; past it the least recently used "
                               "are removed, never those in use"),
    },
    "health": {
        "interval": Field(float, default=10.0, min=1.0, max=3600.0,
                          help="seconds between retained health reports"),
        "temperature_c": Field(float, default=85.0, help="any sensor at or above: degraded"),
        "memory_percent": Field(float, default=95.0, min=0.0, max=100.0,
                                help="memory used at or above: degraded"),
        "min_fps": Field(float, default=0.0, min=0.0,
                         help="detection below this after 30 s: degraded (0: off)"),
    },
    "commands": {
        "rate": Field(float, default=5.0, min=0.1, max=1000.0,
                      help="commands per second on average (token bucket)"),
        "burst": Field(int, default=10, min=1, max=1000),
        "max_bytes": Field(int, default=65536, min=256, max=1 << 20,
                           help="largest request accepted; of a larger message the device "
                                "keeps only this + 8 KiB (the rest is read and dropped) and "
                                "answers too_large"),
        "snapshot_bytes": Field(int, default=262144, min=1024, max=4 << 20,
                                help="default size cap of a snapshot JPEG"),
    },
    "track": {
        "enabled": Field(bool, default=True, help="track detections (ids, zones, lines, events)"),
        "high_score": Field(float, default=None, nullable=True, min=0.0, max=1.0,
                            help="boxes that match tracks at match_iou; null: the card's "
                                 "thresholds.score"),
        "low_score": Field(float, default=0.1, min=0.0, max=1.0,
                           help="weaker boxes down to this match at low_match_iou and build "
                                "tracks; never published"),
        "match_iou": Field(float, default=0.2, min=0.01, max=1.0,
                           help="least IoU of a confident box with a track's prediction"),
        "low_match_iou": Field(float, default=0.5, min=0.01, max=1.0,
                               help="least IoU of a weak box with a track's prediction"),
        "confirm_frames": Field(int, default=2, min=1, max=100,
                                help="frames matched before a track gets its id"),
        "confirm_score": Field(float, default=1.5, min=0.0, max=100.0,
                               help="sum of the scores of those frames' boxes, at least"),
        "max_lost": Field(int, default=30, min=0, max=100000,
                          help="frames a track lives unseen before it ends (at most 10 "
                          "for a track seen in fewer than 6 frames)"),
        "max_tracks": Field(int, default=256, min=1, max=65536,
                            help="tracks held at once per camera (memory is fixed)"),
        "anchor": TRACK_ANCHOR,
        "motion": TRACK_MOTION,
        "zones": TRACK_ZONES,
        "lines": TRACK_LINES,
    },
    "stereo": {
        "calib": Field(str, default=None, nullable=True,
                       help="the pair's calibration: Middlebury calib.txt or OpenCV stereo "
                            "YAML/XML; needed with a stereo:// source, adds `spatial`"),
        "disparity": Field(str, default="auto", choices=("auto", "sgbm", "vpi"),
                           help="auto: VPI's CUDA estimator where `import vpi` works, else "
                                "OpenCV StereoSGBM"),
        "min_disparity": Field(int, default=0, min=-256, max=256, help="pixels"),
        "num_disparities": Field(int, default=64, min=16, max=512, check=_multiple_of_16,
                                 help="search range in pixels from min_disparity"),
        "block_size": Field(int, default=5, min=1, max=31, check=_odd,
                            help="matching window (SGBM) or census window (VPI), pixels"),
        "max_hz": Field(float, default=2.0, min=0.0, max=1000.0,
                        help="depth rate on live sources; 0: every frame (files and folders: "
                             "every frame)"),
        "max_age": Field(float, default=1.0, min=0.0, max=60.0,
                         help="seconds between a detection's frame and the depth map it may "
                              "use (live sources)"),
        "box_scale": Field(float, default=0.5, min=0.05, max=1.0,
                           help="part of each box (width and height) whose median depth is "
                                "taken"),
        "min_valid": Field(float, default=0.1, min=0.0, max=1.0,
                           help="share of that part that must have a depth, else spatial: "
                                "null"),
        "convert": Field(str, default="auto", choices=("auto", "graph", "numpy"),
                         help="disparity -> depth: the graph on the backend (TensorRT: the "
                              "GPU), vectorised numpy, or auto: the faster, timed at start"),
        "depth_min_mm": Field(float, default=100.0, min=0.0, max=1e6),
        "depth_max_mm": Field(float, default=10000.0, min=1.0, max=1e7),
        "grid": Field(str, default=None, nullable=True, check=_grid,
                      help="COLUMNSxROWS (e.g. 16x12): publish median depths per cell on the "
                           "depth topic"),
    },
    "metrics": {
        "port": Field(int, default=None, nullable=True, min=1, max=65535,
                      help="serve Prometheus metrics on http://address:port/metrics; "
                           "null: off"),
        "address": Field(str, default="127.0.0.1",
                         help="address the metrics port listens on (0.0.0.0: every network)"),
    },
    "web": {
        "port": Field(int, default=None, nullable=True, min=1, max=65535,
                      help="serve the live view's API on http://bind:port/ (--web-port); "
                           "null: off"),
        "bind": Field(str, default="127.0.0.1",
                      help="address the web port listens on; any but a loopback address "
                           "needs web.token or web.token_file"),
        "token": Field(str, default=None, nullable=True,
                       help="secret every request must carry (Authorization: Bearer TOKEN "
                            "or ?token=); at least 16 characters"),
        "token_file": Field(str, default=None, nullable=True,
                            help="file whose first line is the token (instead of web.token)"),
        "max_clients": Field(int, default=8, min=1, max=256,
                             help="connections served at once; more are refused with 503 "
                                  "(and counted)"),
        "timeout": Field(float, default=10.0, min=0.5, max=600.0,
                         help="seconds a client may take to send its request or read a "
                              "reply; then the connection is closed"),
        "max_viewers": Field(int, default=4, min=0, max=64,
                             help="live pictures (MJPEG streams) served at once, all cameras "
                                  "together, beside max_clients; more are refused with 503 "
                                  "(and counted); 0: no live picture"),
        "max_fps": Field(float, default=15.0, min=0.2, max=30.0,
                         help="the highest rate a viewer may ask of a live picture (?fps=); "
                              "the page asks 5"),
    },
    "pipeline": {
        "pool": Field(int, default=6, min=3, max=64,
                      help="frame slots of each camera, shared by all tasks"),
        "batch": Field(str, default="auto", choices=("auto", "always", "never"),
                       help="detect several cameras' frames in one run; auto: where the "
                            "backend gains from it (TensorRT)"),
        "threads": Field(int, default=0, min=0, max=64,
                         help="ONNX Runtime threads of detection; 0: one per core (the "
                              "matcher's engine runs on one)"),
    },
}
# Each task kind's config key naming its card, and its own section (edge.tasks.KINDS).
for _kind in tasks.KINDS:
    SPEC[_kind.config_key] = Field(str, default=None, nullable=True, help=_kind.help)
    if _kind.section:
        SPEC[_kind.section[0]] = _kind.section[1]


MIN_TOKEN = 16      # characters of web.token: a guess must not be feasible over the network
MAKE_TOKEN = "python3 -c 'import secrets; print(secrets.token_hex(16))'"


def loopback(address):
    """Whether a listening address takes connections from this host only."""
    if address == "localhost":
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _check_web(web, where):
    """The web section's rules across keys (only with web.port set): a token off loopback."""
    if web["token_file"]:
        web["token_file"] = os.path.expanduser(web["token_file"])
    if web["port"] is None:
        return
    if web["token"] is not None and web["token_file"]:
        raise ConfigError("{}: web.token and web.token_file: set one (the file keeps the "
                          "secret out of the configuration)".format(where))
    if web["token"] is not None and len(web["token"].strip()) < MIN_TOKEN:
        # never echo the value: it is a secret
        raise ConfigError("{}: web.token: at least {} characters (e.g. {})".format(
            where, MIN_TOKEN, MAKE_TOKEN))
    if not loopback(web["bind"]) and web["token"] is None and not web["token_file"]:
        raise ConfigError("{}: web.bind: {} takes connections from other hosts; set "
                          "web.token_file (or web.token) to a secret of at least {} "
                          "characters, or bind 127.0.0.1".format(
                              where, validate.shown(web["bind"]), MIN_TOKEN))


def load(path=None, overrides=None, require_task=True, folders=None):
    """The validated configuration: defaults < file < overrides (dotted keys from flags).

    `folders`: values for `model_dir` / `state_dir` where file and flags leave them null,
    before the defaults from the environment (the installed service's, edge.installed).
    """
    where = "config {}".format(path) if path else "config"
    raw = {}
    if path:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0                # load_yaml says what is wrong with the path
        if size > MAX_CONFIG_BYTES:
            raise ConfigError("{}: {} bytes, more than a configuration holds (at most {}, "
                              "every zone and line at its limits included); check that -c "
                              "names the config file".format(where, size, MAX_CONFIG_BYTES))
        raw = validate.load_yaml(path, "config")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError("config {}: must be a mapping of keys to values".format(path))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if dotted in ("source", "sources"):
            # A flag's camera(s) replace the file's, whichever of the two keys it used.
            raw.pop("sources" if dotted == "source" else "source", None)
        node = raw
        keys = dotted.split(".")
        for depth, key in enumerate(keys[:-1]):
            if node.get(key) is None:
                node[key] = {}     # a section left empty in the file
            elif not isinstance(node[key], dict):
                raise ConfigError("{}: {}: must be a mapping (got {})".format(
                    where, ".".join(keys[:depth + 1]), validate.shown(node[key])))
            node = node[key]
        node[keys[-1]] = value
    if raw.get("sources") is not None and "source" in raw:
        raise ConfigError("{}: source and sources: set one; source: URI is one unnamed camera, "
                          "sources: [{{name, uri}}, ...] named ones".format(where))
    config = validate.check(raw, SPEC, where)
    if config["device_id"] is None:
        config["device_id"] = topics.default_device_id()
    for key, value in (folders or {}).items():
        if config[key] is None:
            config[key] = value
    if config["model_dir"] is None:
        from edge import models
        config["model_dir"] = models.default_model_dir()
    if config["state_dir"] is None:
        from edge import references
        config["state_dir"] = references.default_state_dir()
    for key in ("model_dir", "model_mirror", "jsonl", "state_dir", "reference"):
        if config[key]:
            config[key] = os.path.expanduser(config[key])
    if config["engine"]["dir"] is None:
        config["engine"]["dir"] = os.path.join(config["state_dir"], "engines")
    config["engine"]["dir"] = os.path.expanduser(config["engine"]["dir"])
    stereo = config["stereo"]
    if stereo["depth_min_mm"] >= stereo["depth_max_mm"]:
        raise ConfigError("{}: stereo.depth_min_mm ({:g}) must be below stereo.depth_max_mm "
                          "({:g})".format(where, stereo["depth_min_mm"], stereo["depth_max_mm"]))
    if stereo["calib"]:
        stereo["calib"] = os.path.expanduser(stereo["calib"])
    _check_web(config["web"], where)
    if require_task and not tasks.card_names(config) and not stereo["calib"]:
        first = tasks.KINDS[0]
        raise ConfigError("{}: {}: no task configured; set {} (or stereo.calib for depth "
                          "alone), or pass --{} CARD".format(
                              where, first.config_key, " and/or ".join(
                                  "{} (e.g. {})".format(k.config_key, k.example)
                                  for k in tasks.KINDS), first.config_key))
    return config
