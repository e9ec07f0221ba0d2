"""The configuration: defaults, the YAML file, then command line flags, validated by key."""

import os
import re
import socket

from edge import imagefiles, validate
from edge.errors import ConfigError
from edge.validate import Field

# \Z, not $: `$` also matches before a trailing newline, which MQTT topics cannot carry
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")


def _device_id(value):
    return None if _DEVICE_ID.match(value) else "letters, digits, _ . - (no / + # or spaces)"


def _prefix(value):
    return None if _TOPIC_PREFIX.match(value) else "MQTT topic levels without + # or spaces"


_REGION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _region_name(value):
    return None if _REGION_NAME.match(value) else "1-64 letters, digits, _ . - (no spaces)"


def _normalized_outside(item):
    if item["normalized"] and any(not 0.0 <= v <= 1.0 for point in item["points"]
                                  for v in point):
        return "points", "normalized coordinates must lie within 0..1"
    return None


def _labels_empty(item):
    if item["labels"] is not None and not item["labels"]:
        return "labels", "list at least one label, or leave labels out to count every class"
    return None


def _zone(item):
    """Rules across a zone's keys: a polygon of 3 or more points with an area."""
    points = item["points"]
    if len(points) < 3:
        return "points", "a zone needs at least 3 points"
    twice_area = sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in
                     zip(points, points[1:] + points[:1]))
    if twice_area == 0:
        return "points", "the points enclose no area (all on one line)"
    return _normalized_outside(item) or _labels_empty(item)


def _line(item):
    """Rules across a line's keys: two different points."""
    if item["points"][0] == item["points"][1]:
        return "points", "the two points are the same (a zero-length line)"
    return _normalized_outside(item) or _labels_empty(item)


_POINT = Field(list, length=2)
_LABELS = Field(list, default=None, nullable=True, items=Field(str),
                help="the detector's labels this counts; null: every class")
ZONE = {
    "name": Field(str, check=_region_name, help="name in events and health"),
    "points": Field(list, items=_POINT, help="polygon [[x, y], ...], 3 or more points"),
    "normalized": Field(bool, default=False, help="points in 0..1 of the frame's width and "
                                                  "height instead of pixels"),
    "labels": _LABELS,
}
LINE = {
    "name": Field(str, check=_region_name, help="name in events and health"),
    "points": Field(list, length=2, items=_POINT, help="[[x1, y1], [x2, y2]]"),
    "normalized": Field(bool, default=False, help="points in 0..1 of the frame"),
    "direction": Field(str, default="both", choices=("both", "left_to_right", "right_to_left"),
                       help="crossings counted, walking from the first point to the second"),
    "labels": _LABELS,
}


def _grid(value):
    from edge.depth import parse_grid
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
    from edge.backends.trt import parse_tactic_sources
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


CAMERA = {
    "name": Field(str, check=_camera_name, help="the camera's topic level and `camera` field"),
    "uri": Field(str, help="source URI (DESIGN.md, Sources)"),
}


def _backend_names():
    from edge import backends
    return tuple(backends.names())


SPEC = {
    "device_id": Field(str, default=None, nullable=True, check=_device_id,
                       help="name in MQTT topics; default: the host name"),
    "source": Field(str, default="test://", help="source URI (DESIGN.md, Sources)"),
    "sources": Field(list, default=None, nullable=True, items=CAMERA, unique="name",
                     check=_sources_empty,
                     help="named cameras [{name, uri}, ...] instead of `source`"),
    "detector": Field(str, default=None, nullable=True, help="detection card name or path"),
    "matcher": Field(str, default=None, nullable=True, help="matching card name or path"),
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
                              help="larger images (folder frames, references) are refused "
                                   "from their header, before decoding"),
    "jsonl": Field(str, default=None, nullable=True, help="also append messages to this file"),
    "log_level": Field(str, default="info", choices=("debug", "info", "warning", "error")),
    "mqtt": {
        "url": Field(str, default=None, nullable=True,
                     help="mqtt://host:port; null: no MQTT (JSONL only)"),
        "prefix": Field(str, default="edge", check=_prefix),
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
                          help="5: commands honour response topic and correlation data"),
        "queue": Field(int, default=1000, min=1, max=1000000,
                       help="messages held while the broker is slow or away"),
        "flush_timeout": Field(float, default=10.0, min=0.0, max=600.0,
                               help="seconds to deliver what is queued when a run ends"),
    },
    "match": {
        "max_hz": Field(float, default=1.0, min=0.0, max=1000.0,
                        help="matching rate on the newest frame; 0: every frame"),
        "every": Field(int, default=0, min=0, help="> 0: match every N-th frame instead"),
        "top_k": Field(int, default=500, min=0, max=100000,
                       help="matches published per message, best first (count is always full)"),
        "max_references": Field(int, default=4, min=1, max=64,
                                help="references held, configured + stored with set_reference "
                                     "(more are refused)"),
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
                           help="largest request accepted"),
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
        "anchor": Field(str, default="bottom", choices=("bottom", "center"),
                        help="point of a box that zones and lines test"),
        "zones": Field(list, default=[], items=ZONE, item_check=_zone, unique="name",
                       help="polygons: events when a track enters or leaves"),
        "lines": Field(list, default=[], items=LINE, item_check=_line, unique="name",
                       help="segments: events when a track crosses"),
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


def load(path=None, overrides=None, require_task=True, folders=None):
    """The validated configuration: defaults < file < overrides (dotted keys from flags).

    `folders`: values for `model_dir` / `state_dir` where file and flags leave them null,
    before the defaults from the environment (the installed service's, edge.installed).
    """
    where = "config {}".format(path) if path else "config"
    raw = {}
    if path:
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
        host = socket.gethostname().split(".")[0]
        # the host name made safe for topics, and to the pattern a configured id must follow
        config["device_id"] = (re.sub(r"[^A-Za-z0-9_.-]", "-", host).lstrip("_.-") or
                               "edge")[:64]
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
    if require_task and not config["detector"] and not config["matcher"] and \
            not stereo["calib"]:
        raise ConfigError("{}: detector: no task configured; set detector (e.g. yolox-nano) "
                          "and/or matcher (or stereo.calib for depth alone), or pass "
                          "--detector CARD".format(where))
    return config
