"""The `motion` topic (edge/motioninput.py): a robot sends its camera's rotation, the device
takes it to the tracker, and a bad message is counted and logged once per kind of problem,
on a real Mosquitto, in this process and in a running `edge run`."""

import json
import logging
import math
import threading
import time

import pytest

from edge import motioninput, mqtt, schemas
from edge.motioninput import MotionInput, MotionRefused, parse
from edge.tracking.motion import describe, robot_motion
from tests.conftest import free_port
from tools.soak import start_edge, stop_edge, wait_until

GOOD = {"v": 1, "wx": 0.0, "wy": 0.35, "wz": 0.0, "focal_px": 600.0}
# raw payload -> the cause it is refused for
BAD = [
    (b"", "bad_json"),
    (b"not json", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"[0.1, 0.2, 0.3]", "bad_json"),
    (b'{"v": 1, "wx": NaN, "wy": 0, "wz": 0, "focal_px": 600}', "bad_json"),
    (json.dumps(dict(GOOD, v=2)).encode(), "version"),
    (json.dumps(dict(GOOD, v=True)).encode(), "version"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "v"}).encode(), "version"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "focal_px"}).encode(),
     "missing focal_px"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "wz"}).encode(), "missing wz"),
    (json.dumps(dict(GOOD, wx="0.1")).encode(), "bad wx"),
    (json.dumps(dict(GOOD, wx=None)).encode(), "bad wx"),
    (json.dumps(dict(GOOD, wy=True)).encode(), "bad wy"),
    (json.dumps(dict(GOOD, wy=50.001)).encode(), "bad wy"),
    (json.dumps(dict(GOOD, wz=-1e300)).encode(), "bad wz"),
    (b'{"v": 1, "wx": 0, "wy": 1e999, "wz": 0, "focal_px": 600}', "bad wy"),
    (json.dumps(dict(GOOD, focal_px=0)).encode(), "bad focal_px"),
    (json.dumps(dict(GOOD, focal_px=0.5)).encode(), "bad focal_px"),
    (json.dumps(dict(GOOD, focal_px=-600)).encode(), "bad focal_px"),
    (json.dumps(dict(GOOD, focal_px=1e6)).encode(), "bad focal_px"),
    (json.dumps(dict(GOOD, ts=-1)).encode(), "bad ts"),
    (json.dumps(dict(GOOD, ts="now")).encode(), "bad ts"),
    (json.dumps(dict(GOOD, ts=1e11)).encode(), "bad ts"),
    (json.dumps(dict(GOOD, pad="x" * 5000)).encode(), "too_large"),
]


def test_a_motion_message_is_parsed_and_every_problem_is_named():
    assert parse(json.dumps(GOOD).encode()) == (0.0, 0.35, 0.0, 600.0)
    assert parse(json.dumps(dict(GOOD, ts=1795545403.72, wx=-50, wz=50, focal_px=1,
                                 frame_id="camera_optical_frame")).encode()) == \
        (-50.0, 0.35, 50.0, 1.0), "an int is a number; keys it does not know are ignored"
    assert parse(json.dumps(dict(GOOD, ts=None)).encode())
    with pytest.raises(MotionRefused) as info:
        parse(json.dumps(GOOD).encode(), size=70000)     # cut short by the MQTT link
    assert info.value.cause == "too_large" and "70000 bytes" in str(info.value)
    for raw, cause in BAD:
        with pytest.raises(MotionRefused) as info:
            parse(raw)
        assert info.value.cause == cause, (raw[:80], str(info.value))
        assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_the_code_takes_what_the_document_takes():
    """The API document's Motion schema and parse() agree on every example and every bad
    payload above (a consumer's check: keys the document does not list pass)."""
    motion = schemas.document()["components"]["schemas"]["Motion"]["properties"]
    for key in motioninput.RATES:
        assert (motion[key]["minimum"], motion[key]["maximum"]) == (
            -motioninput.MAX_RATE, motioninput.MAX_RATE)
    assert (motion["focal_px"]["minimum"], motion["focal_px"]["maximum"]) == (
        motioninput.MIN_FOCAL_PX, motioninput.MAX_FOCAL_PX)
    examples = schemas.document()["components"]["messages"]["Motion"]["examples"]
    payloads = [e["payload"] for e in examples] + [GOOD, json.loads(motioninput.EXAMPLE)]
    for payload in payloads:
        schemas.validate("motion", payload)
        parse(json.dumps(payload).encode())
    for raw, cause in BAD:
        if cause in ("bad_json", "too_large"):
            continue
        with pytest.raises(ValueError):
            schemas.check("motion", json.loads(raw), strict=False)
    assert schemas.kind_of_topic("edge/cam1/motion") == "motion"
    assert schemas.kind_of_topic("edge/cam1/motion/front") == "motion"


def test_the_signs_are_the_optical_frame_s():
    """What docs/tracking.md says: a positive wy (turning right) moves the picture's content left
    by f * wy * dt pixels, a positive wx (tilting up) moves it down, a positive wz turns it
    counter-clockwise."""
    robot = robot_motion("signs-" + str(time.monotonic_ns()))
    for (wx, wy, wz), (dx, dy, angle) in (((0, 0.5, 0), (-10.0, 0, 0)),
                                          ((0.5, 0, 0), (0, 10.0, 0)),
                                          ((0, 0, 0.5), (0, 0, math.degrees(0.02)))):
        robot.put(wx, wy, wz, 500.0)
        moved = describe(robot.motion(0.04, 640, 480), 640, 480)
        assert (moved["dx"], moved["dy"]) == (pytest.approx(dx, abs=0.01),
                                              pytest.approx(dy, abs=0.01))
        assert moved["angle"] == pytest.approx(angle, abs=0.01)


class Robot:
    """A paho client that publishes as a robot does (QoS 0)."""

    def __init__(self, port):
        self.client = mqtt.make_client("robot-{}".format(time.monotonic_ns()))
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    def send(self, topic, payload, retain=False, qos=0):
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def motion_warnings(text):
    return [line for line in text.splitlines() if "motion: ignored a message on" in line]


def test_a_device_takes_motion_and_counts_each_bad_message(broker, caplog):
    """An MqttLink with two named cameras: good messages reach each camera's RobotMotion at
    any rate, every bad one is counted (on its camera where it has one), a retained one is
    ignored, and each kind of problem is logged once however often it comes."""
    device = "motion-{}".format(free_port())
    front, rear = "front-" + device, "rear-" + device
    robot = Robot(broker.port)
    topic = "edge/{}/motion".format(device)
    robot.send(topic + "/" + front, GOOD, retain=True)       # there before the device
    link = mqtt.MqttLink(mqtt.parse_url(broker.url), device)
    taken = MotionInput(link, lambda: [front, rear])
    link.on_motion = taken.submit
    caplog.set_level(logging.WARNING, logger="edge.motioninput")
    link.start()
    try:
        assert wait_until(lambda: taken.rejected == 1, 10), taken.counts()
        assert robot_motion(front).rejected == 1 and robot_motion(front).received == 0
        assert "retained" in robot_motion(front).last_error
        for i in range(200):                 # 200 messages as fast as they go
            robot.send(topic + "/" + front, dict(GOOD, wy=i / 100.0, ts=time.time()))
        assert wait_until(lambda: robot_motion(front).received == 200, 10)
        motion = robot_motion(front).motion(0.1, 640, 480)
        assert describe(motion, 640, 480)["dx"] == pytest.approx(-600 * 1.99 * 0.1, abs=0.01)
        robot.send(topic + "/" + rear, dict(GOOD, focal_px=800), qos=1)
        for _ in range(3):
            for raw, _cause in BAD:
                robot.send(topic + "/" + rear, raw)
            robot.send(topic, GOOD)                          # the unnamed camera: none here
            robot.send(topic + "/side", GOOD)
            # a retained message reaches a subscriber already there as a live one (MQTT):
            # only one kept from before the subscription is stale
            robot.send(topic + "/" + front, GOOD, retain=True)
        robot.send(topic + "/", GOOD)                        # an empty camera name
        robot.send(topic + "/" + front, b"")                 # no payload at all
        expected = 1 + 3 * (len(BAD) + 2) + 2
        assert wait_until(lambda: taken.rejected == expected, 10), (taken.counts(), expected)
        assert taken.accepted == 204 and taken.unknown_camera == 7
        assert robot_motion(front).received == 203 and robot_motion(rear).received == 1
        assert robot_motion(rear).rejected == 3 * len(BAD)
        assert robot_motion(front).rejected == 2
        assert robot_motion(front).last_error.startswith("not UTF-8 JSON")
    finally:
        link.stop()
        robot.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "edge.motioninput"]
    causes = {cause for _, cause in BAD} | {"retained", "unknown_camera"}
    assert len(lines) == len(causes), "\n".join(lines)
    assert all(r.levelno == logging.WARNING for r in caplog.records
               if r.name == "edge.motioninput")
    text = "\n".join(lines)
    assert "on edge/{}/motion/{}: motion must not be retained; publish without the " \
           "retain flag".format(device, front) in text
    assert "on edge/{}/motion: this device's cameras are named ({}, {}): publish on " \
           "edge/{}/motion/<camera>".format(device, front, rear, device) in text
    assert "`focal_px` is missing; send {" in text
    assert "`wy` must be rad/s, a number from -50 to 50 (got True)" in text
    assert "`focal_px` must be the focal length in pixels, a number from 1 to 100000" in text
    assert "4096" in text
    assert taken.counts()["last_error"].startswith("edge/{}/motion/{}: ".format(device, front))


def test_a_running_daemon_tracks_with_the_robot_s_rotation(broker, tmp_path, model_dir):
    """`edge run` with one unnamed camera and track.motion auto: while a robot sends its
    rotation the tracker uses it (health's from_robot), bad messages, a retained one and
    those for cameras it does not have are logged once per kind and never stop it."""
    device = "motion-run"
    topic = "edge/{}/motion".format(device)
    robot = Robot(broker.port)
    robot.send(topic, GOOD, retain=True)
    reports = []
    watcher = mqtt.make_client("watcher-{}".format(time.monotonic_ns()))
    watcher.on_connect = lambda c, *a: c.subscribe("edge/{}/health".format(device), 1)
    watcher.on_message = lambda c, u, m: reports.append(json.loads(m.payload))
    watcher.connect("127.0.0.1", broker.port, 30)
    watcher.loop_start()
    proc = start_edge(str(tmp_path), [
        "--source", "test://?width=320&height=240&fps=15", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--mqtt", broker.url, "--device-id", device],
        "health: {interval: 1}\n")
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            robot.send(topic, dict(GOOD, ts=time.time()))
            stop.wait(0.02)                                  # 50 Hz
    sender = threading.Thread(target=stream, daemon=True)

    def motion_health():
        for report in reversed(reports):
            for task in report.get("tasks", {}).values():
                motion = (task.get("tracking") or {}).get("motion", {}).get("source")
                if motion is not None:
                    return motion
        return None
    try:
        assert wait_until(lambda: reports or proc.poll() is not None, 60), "no health"
        sender.start()
        for _ in range(20):
            for raw, _cause in BAD[:6]:
                robot.send(topic, raw)
            robot.send(topic + "/front", GOOD)
        assert wait_until(lambda: (motion_health() or {}).get("from_robot", 0) >= 10 or
                          proc.poll() is not None, 30), motion_health()
        assert proc.poll() is None
        assert motion_health()["mode"] == "auto"
        # the topic's own counts: 20 x 6 bad, the retained one, 20 for a camera it lacks
        assert wait_until(lambda: (reports[-1].get("motion_topic") or {}).get(
            "unknown_camera") == 20, 10), reports[-1].get("motion_topic")
        topic_counts = reports[-1]["motion_topic"]
        assert topic_counts["rejected"] == 20 * 6 + 1 + 20, topic_counts
        assert topic_counts["accepted"] >= 10 and "motion/front" in topic_counts["last_error"]
        assert motion_health()["robot_rejected"] == 20 * 6 + 1      # this camera's share
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(5)
        watcher.loop_stop()
        watcher.disconnect()
        stop_edge(proc)
        robot.close()
    log = open(str(tmp_path / "edge.log"), errors="replace").read()
    lines = motion_warnings(log)
    causes = {cause for _, cause in BAD[:6]} | {"retained", "unknown_camera"}
    assert len(lines) == len(causes), "\n".join(lines)
    assert "on edge/motion-run/motion/front: this device has no camera 'front', only one " \
           "unnamed camera: publish on edge/motion-run/motion" in log
    assert "Traceback" not in log
