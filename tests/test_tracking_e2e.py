"""End to end: a video of real objects moving -> `edge run` (yolox-nano on ONNX Runtime) ->
a real broker: one stable id per object through the clip, events for the zone and none for
the line (the camera moves, the animals stand still), the camera's motion in each message and
in health, and every message as the AsyncAPI document describes it."""

import json
import os
import sys

from edge import schemas
from tests.conftest import ROOT, run_edge

sys.path.insert(0, os.path.join(ROOT, "tools"))
import pan_clip  # noqa: E402

def test_a_panning_clip_keeps_one_id_per_object(broker, subscriber, model_dir, tmp_path):
    clip = str(tmp_path / "pan.avi")
    frames = pan_clip.make(clip)          # a giraffe, then a zebra, cross the view leftwards
    config = tmp_path / "edge.yaml"
    config.write_text(pan_clip.TRACK_CONFIG)     # the left half a zone, its edge a line
    sub = subscriber("edge/#")
    jsonl = tmp_path / "out.jsonl"
    rc, _, err = run_edge("run", "-c", str(config), "--source", clip, "--detector", "yolox-nano",
                          "--model-dir", model_dir, "--mqtt", broker.url + "?qos=1",
                          "--device-id", "cam1", "--jsonl", str(jsonl),
                          "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    assert sub.wait_for(lambda s: len(s.json("detections")) == frames and
                        s.json("status")[-1]["state"] == "offline")
    for topic, payload, retained in sub.messages:
        kind = schemas.kind_of_topic(topic)
        schemas.validate(kind, json.loads(payload))
        if kind == "events":
            assert not retained
    detections = sub.json("detections")
    events = sub.json("events")
    results = [json.loads(p) for t, p, _ in sub.messages
               if t.endswith(("/detections", "/events"))]
    with open(str(jsonl)) as f:
        assert [json.loads(line) for line in f] == results     # the same, in the same order

    # The object is the best box of its class in a frame (the detector sometimes adds a
    # second, partial box of the zebra): from its track's confirmation on, one id each.
    ids = {"giraffe": [], "zebra": []}
    scores = {"giraffe": [], "zebra": []}
    for message in detections:
        for label in ids:
            boxes = [d for d in message["detections"] if d["label"] == label]
            if boxes:
                best = max(boxes, key=lambda d: d["score"])
                ids[label].append(best["track_id"])
                scores[label].append(best["score"])
    for label, seen in ids.items():
        assert len(seen) >= 30, (label, seen)
        # confirmed at the latest once two or more of its boxes' scores sum to 1.5
        # (track.confirm_frames, track.confirm_score; boxes below the card's threshold,
        # not published, may have added to it before)
        due = next(k for k in range(1, len(seen)) if sum(scores[label][:k + 1]) >= 1.5)
        first = next(i for i, v in enumerate(seen) if v is not None)
        assert first <= due, (label, seen, scores[label])
        assert set(seen[first:]) == {seen[first]}, (label, seen)
    giraffe, zebra = ids["giraffe"][-1], ids["zebra"][-1]
    assert giraffe != zebra

    by_track = {}
    for event in events:
        by_track.setdefault(event["track_id"], []).append(
            (event["type"], event.get("zone") or event.get("line"), event.get("direction")))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    # Both animals stand still while the camera pans over them: the pan carries them from
    # the right half into the left one, so they enter the zone (a region of the picture),
    # but they cross no line (camera motion compensation, `track.motion` auto: a crossing
    # is an object's own motion); the giraffe leaves the view, then its track ends after
    # 10 frames.
    assert by_track[giraffe] == [("track_start", None, None),
                                 ("zone_enter", "left", None),
                                 ("zone_leave", "left", None),
                                 ("track_end", None, None)], by_track
    assert by_track[zebra][0] == ("track_start", None, None)
    assert ("zone_enter", "left", None) in by_track[zebra]
    assert not [e for e in events if e["type"] == "line_cross"], events

    # the camera's motion, frame by frame: the window sweeps right, so the scene moves left
    motions = [m["camera_motion"] for m in detections]
    assert motions[0] is None                       # nothing to compare the first frame with
    found = [m for m in motions[1:] if m is not None]
    assert len(found) >= len(motions) - 3, motions
    assert sum(1 for m in found if m["dx"] < 0) >= 0.9 * len(found), found
    assert all(1.0 <= m["scale"] < 1.01 for m in found), found     # zooming in slowly

    # health counts them (the final retained report, made after the last frame)
    assert sub.wait_for(lambda s: s.json("health"), 5)
    tracking = sub.json("health")[-1]["tasks"]["detect"]["tracking"]
    crossings = sum(1 for e in events if e["type"] == "line_cross")
    assert crossings == 0
    assert tracking["lines"] == {"middle": {"left_to_right": 0, "right_to_left": 0}}
    motion = tracking["motion"]["source"]
    assert motion["mode"] == "auto" and motion["fits"] == len(found), motion
    assert motion["fits"] + motion["failures"] == frames - 1, motion
    assert motion["mean_shift_px"] > 1.0, motion
    entered = sum(1 for e in events if e["type"] == "zone_enter")
    left = sum(1 for e in events if e["type"] == "zone_leave")
    assert tracking["zones"]["left"] == {"inside": entered - left, "entered": entered,
                                         "left": left}
    assert tracking["started"] == sum(1 for e in events if e["type"] == "track_start")


def test_zones_and_motion_of_one_camera_stay_with_it(broker, subscriber, model_dir, tmp_path):
    """Two cameras on the same panning clip: `front` has its own zone and the `track`
    section's motion compensation, `rear` its own `motion: off` and the section's zone.
    Each zone's events come from its camera only, camera_motion only from `front`."""
    clip = str(tmp_path / "pan.avi")
    pan_clip.make(clip, frames=45)
    config = tmp_path / "edge.yaml"
    config.write_text("""\
track:
  max_lost: 10
  zones:
    - {{name: everywhere, normalized: true, points: [[0, 0], [1, 0], [1, 1], [0, 1]]}}
sources:
  - name: front
    uri: {clip}
    track:
      zones:
        - {{name: left, normalized: true, points: [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}}
  - name: rear
    uri: {clip}
    track: {{motion: "off"}}
""".format(clip=clip))
    sub = subscriber("edge/#")
    rc, _, err = run_edge("run", "-c", str(config), "--detector", "yolox-nano",
                          "--model-dir", model_dir, "--mqtt", broker.url + "?qos=1",
                          "--device-id", "cam2", "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    assert sub.wait_for(lambda s: len(s.json("detections/front")) == 45 and
                        len(s.json("detections/rear")) == 45 and
                        s.json("status")[-1]["state"] == "offline"), err
    zones = {}
    for event in sub.json("events/front") + sub.json("events/rear"):
        if "zone" in event:
            zones.setdefault(event["zone"], set()).add(event["camera"])
    assert zones == {"left": {"front"}, "everywhere": {"rear"}}, zones
    assert all("camera_motion" in m for m in sub.json("detections/front"))
    assert sum(1 for m in sub.json("detections/front") if m["camera_motion"]) >= 40
    assert not any("camera_motion" in m for m in sub.json("detections/rear"))
    tracking = sub.json("health")[-1]["tasks"]["detect"]["tracking"]
    motion = tracking["motion"]
    assert motion["front"]["mode"] == "auto" and motion["rear"]["mode"] == "off", motion
    # health says which camera's zone: each camera its own, counted from its own events
    cameras = tracking["cameras"]
    assert set(cameras["front"]["zones"]) == {"left"}, cameras
    assert set(cameras["rear"]["zones"]) == {"everywhere"}, cameras
    for camera, zone in (("front", "left"), ("rear", "everywhere")):
        entered = sum(1 for e in sub.json("events/" + camera) if e["type"] == "zone_enter")
        assert cameras[camera]["zones"][zone]["entered"] == entered > 0, cameras
