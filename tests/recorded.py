"""Messages real `edge run` processes publish, recorded once per test session (JSONL sinks)
for the robot-side tests (edge.client, the ROS 2 bridge): a clip panning over a giraffe and
a zebra with a zone and a line (detections with track ids, events), and the Middlebury
stereo pair with a depth grid (detections with `spatial`, a depth message)."""

import json
import os
import sys

from tests.conftest import ROOT, SHARED, run_edge

sys.path.insert(0, os.path.join(ROOT, "tools"))
import pan_clip  # noqa: E402  (tools/)

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
CLIP_FRAMES = 45
_cache = {}


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def by_topic(messages):
    """{topic: [payload, ...]} of JSONL messages (events have a `type`, depth a `grid`)."""
    out = {}
    for m in messages:
        topic = "events" if "type" in m else "depth" if "grid" in m else "detections"
        out.setdefault(topic, []).append(m)
    return out


def narrowed(payloads, keep):
    """Detections messages as a label or score filter passes them on: each with only the
    detections `keep(detection dict)` accepts, none where none is left."""
    out = []
    for p in payloads:
        kept = [d for d in p["detections"] if keep(d)]
        if kept:
            out.append(dict(p, detections=kept))
    return out


def clip(folder, frames=CLIP_FRAMES):
    """The panning clip and its track config: (clip path, config path)."""
    path = os.path.join(folder, "pan.avi")
    pan_clip.make(path, frames=frames)
    config = os.path.join(folder, "track.yaml")
    with open(config, "w") as f:
        # Tracked as from a still camera (no motion compensation), so that the pan carries
        # the animals over the line: the recording holds every kind of event, line_cross
        # too (with compensation the still animals cross nothing: test_tracking_e2e.py).
        f.write(pan_clip.TRACK_CONFIG + '  motion: "off"\n')
    return path, config


def record(folder, model_dir):
    """{"pan": {topic: [payload]}, "stereo": {topic: [payload]}}, made once per session."""
    if "messages" in _cache:
        return _cache["messages"]
    os.makedirs(folder, exist_ok=True)
    video, config = clip(folder)
    state = os.path.join(folder, "state")
    pan = os.path.join(folder, "pan.jsonl")
    rc, _, err = run_edge("run", "-c", config, "--source", video, "--detector", "yolox-nano",
                          "--device-id", "clip", "--jsonl", pan, "--model-dir", model_dir,
                          "--state-dir", state)
    assert rc == 0, err
    grid = os.path.join(folder, "grid.yaml")
    with open(grid, "w") as f:
        f.write("stereo:\n  grid: 8x6\n")
    stereo = os.path.join(folder, "stereo.jsonl")
    source = "stereo://?left={}&right={}".format(os.path.join(PAIR, "motorcycle_left.png"),
                                                 os.path.join(PAIR, "motorcycle_right.png"))
    rc, _, err = run_edge("run", "-c", grid, "--source", source, "--calib",
                          os.path.join(PAIR, "calib.txt"), "--detector", "yolox-nano",
                          "--device-id", "stereo", "--jsonl", stereo, "--model-dir", model_dir,
                          "--state-dir", state)
    assert rc == 0, err
    _cache["messages"] = {"pan": by_topic(_read(pan)), "stereo": by_topic(_read(stereo))}
    return _cache["messages"]
