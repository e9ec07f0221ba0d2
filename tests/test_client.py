"""edge.client, the library robots import, against a real Mosquitto.

Payloads are the API document's examples and messages real `edge run` processes published
(tests/recorded.py), sent to the broker at QoS 1 by a test publisher; the live daemon's side
(`edge listen`, a broker restart mid-stream) is in test_listen.py.
"""

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from edge import client as edge_client
from edge import mqtt, schemas
from edge.errors import ConfigError, UnavailableError
from tests import recorded
from tests.conftest import ROOT, free_port
from tools.soak import Mosquitto

DOC = schemas.document()
EXAMPLE_TOPICS = {"Status": "status", "Detections": "detections", "Matches": "matches",
                  "Depth": "depth", "Event": "events"}


@pytest.fixture(scope="module")
def messages(tmp_path_factory, model_dir):
    return recorded.record(str(tmp_path_factory.mktemp("recorded")), model_dir)


class Publisher:
    """A test publisher: QoS 1 messages, each waited for until the broker has it."""

    def __init__(self, port):
        self.client = mqtt.make_client("test-pub-{}".format(time.monotonic_ns()))
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    def send(self, topic, payload, retain=False):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), topic

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker):
    pub = Publisher(broker.port)
    yield pub
    pub.close()


def examples():
    """(topic, payload) of every example of a device-published message in the document."""
    for name, topic in EXAMPLE_TOPICS.items():
        for example in DOC["components"]["messages"][name]["examples"]:
            yield topic, example["payload"]


def check_object(message, topic, payload):
    """The object holds the payload's values, as plain Python values."""
    assert message.kind == topic and message.payload == payload
    assert message.device == payload["device"]
    if topic == "detections":
        assert message.frame.index == payload["frame"]["index"]
        assert message.frame.width == payload["frame"]["width"]
        assert len(message.detections) == len(payload["detections"])
        for d, p in zip(message.detections, payload["detections"]):
            assert (d.label, d.class_id, d.score, list(d.box), d.track_id) == (
                p["label"], p["class_id"], p["score"], p["box"], p["track_id"])
            if p.get("spatial") is None:
                assert d.spatial is None
            else:
                assert tuple(d.spatial) == (p["spatial"]["x"], p["spatial"]["y"],
                                            p["spatial"]["z"])
                assert d.spatial.z == p["spatial"]["z"]
    elif topic == "events":
        assert (message.type, message.track_id, message.label, message.frame_index,
                list(message.box), message.zone, message.line, message.direction) == (
            payload["type"], payload["track_id"], payload["label"], payload["frame_index"],
            payload["box"], payload.get("zone"), payload.get("line"), payload.get("direction"))
    elif topic == "depth":
        assert (message.columns, message.rows) == (payload["grid"]["columns"],
                                                   payload["grid"]["rows"])
        known = [(mm, c, r) for r, row in enumerate(payload["depth_mm"])
                 for c, mm in enumerate(row) if mm is not None]
        assert message.nearest() == (min(known) if known else None)
    elif topic == "matches":
        assert (message.count, message.inliers, message.homography, message.reference) == (
            payload["count"], payload["inliers"], payload["homography"], payload["reference"])
    elif topic == "status":
        assert (message.state, message.reason) == (payload["state"], payload["reason"])


def test_every_topic_arrives_as_plain_objects(broker, publisher, messages):
    """Examples of the API document and real daemons' messages (track ids, events,
    `spatial`, a depth grid) arrive in order as objects holding the payload's values."""
    sent = list(examples())
    for run in ("pan", "stereo"):
        for topic, payloads in sorted(messages[run].items()):
            sent += [(topic, p) for p in payloads]
    assert any(d.get("spatial") for _, p in sent if "detections" in p for d in p["detections"])
    assert any(d["track_id"] for _, p in sent if "detections" in p for d in p["detections"])
    with edge_client.Client(broker.url, topics=edge_client.TOPICS) as client:
        for topic, payload in sent:
            publisher.send("edge/{}/{}".format(payload["device"], topic), payload)
        got = list(client.messages(count=len(sent), timeout=10))
        assert len(got) == len(sent)
        for message, (topic, payload) in zip(got, sent):
            check_object(message, topic, payload)
            assert message.topic == "edge/{}/{}".format(payload["device"], topic)
        assert client.stats()["invalid"] == 0


def test_retained_status_arrives_and_a_cleared_one_is_no_message(broker, publisher):
    """A retained status reaches a client that subscribes later (flag `retained`); clearing
    one (an empty retained payload, a retired device) is neither a message nor invalid."""
    status = json.loads(mqtt.status_payload("cam1", "online", time.time()).decode())
    with edge_client.Client(broker.url, topics=["status"]) as live:
        publisher.send("edge/cam1/status", status, retain=True)
        publisher.send("edge/cam2/status", dict(status, device="cam2"), retain=True)
        publisher.send("edge/cam2/status", b"", retain=True)
        got = list(live.messages(timeout=1))
        assert [(m.device, m.retained) for m in got] == [("cam1", False), ("cam2", False)]
        assert live.stats()["invalid"] == 0 and live.stats()["received"] == 3
    with edge_client.Client(broker.url, topics=["status"]) as later:
        got = list(later.messages(timeout=1))
    assert [(m.device, m.state, m.retained) for m in got] == [("cam1", "online", True)]


def test_a_callback_that_raises_stops_nothing(broker, publisher, messages, caplog):
    """Callbacks run in the client's own thread; an exception in one is logged and every
    later message still arrives (paho's network thread never sees it)."""
    payloads = messages["pan"]["detections"][:6]
    seen, threads = [], set()
    done = threading.Event()

    def on_detections(message):
        threads.add(threading.current_thread().name)
        seen.append(message.seq)
        if len(seen) == len(payloads):
            done.set()
        if len(seen) <= 2:
            raise RuntimeError("a robot's bug")

    client = edge_client.Client(broker.url, devices=["clip"]).on("detections", on_detections)
    with caplog.at_level(logging.ERROR, logger="edge.client"):
        client.start()
        try:
            for payload in payloads:
                publisher.send("edge/clip/detections", payload)
            assert done.wait(10), seen
        finally:
            client.close()
    assert seen == [p["seq"] for p in payloads]
    assert threads == {"edge-client"}
    assert client.stats()["callback_errors"] == 2
    failures = [r for r in caplog.records if "callback on_detections failed" in r.getMessage()]
    assert len(failures) == 2 and "a robot's bug" in failures[0].exc_text


def test_invalid_payloads_are_skipped_counted_and_named(broker, publisher, messages, caplog):
    """Not JSON, a wrong type, another API version: skipped, counted, logged with the topic
    and the path; a key the document does not list (a newer device's) is let through."""
    good = messages["pan"]["detections"][0]
    wrong_box = json.loads(json.dumps(good))
    wrong_box["detections"] = [dict(good["detections"][0], box=["a", 1, 2, 3])]
    newer = dict(good, v=2)
    extra = dict(good, camera="front", future_key={"anything": 1})
    with caplog.at_level(logging.WARNING, logger="edge.client"):
        with edge_client.Client(broker.url) as client:
            for payload in (b"\xff not json", wrong_box, newer, extra, good):
                publisher.send("edge/clip/detections", payload)
            got = list(client.messages(timeout=1))
            stats = client.stats()
    assert [m.payload for m in got] == [extra, good]
    assert got[0].camera == "front"
    assert stats["invalid"] == 3 and stats["delivered"] == 2
    text = caplog.text
    assert "edge/clip/detections" in text and "not UTF-8 JSON" in text
    assert "detections[0].box[0]" in text and "at v" in text


def camera_copies(payloads, camera):
    return [dict(p, camera=camera) for p in payloads]


def test_devices_cameras_labels_and_scores_filter(broker, publisher, messages):
    """Devices by topic, cameras by topic (and the `camera` field), labels and a minimum
    score by detection (the payload narrowed to them, still valid) and by event."""
    dets = messages["pan"]["detections"]
    events = messages["pan"]["events"]
    front, rear = camera_copies(dets[:3], "front"), camera_copies(dets[3:6], "rear")
    clients = {
        "device": edge_client.Client(broker.url, devices=["clip"]),
        "camera": edge_client.Client(broker.url, cameras=["rear"], topics=["detections",
                                                                           "status"]),
        "label": edge_client.Client(broker.url, labels=["zebra"],
                                    topics=["detections", "events"]),
        "score": edge_client.Client(broker.url, min_score=0.8, topics=["detections", "events"]),
    }
    for client in clients.values():
        client.connect()
    status = json.loads(mqtt.status_payload("other", "online", time.time()).decode())
    try:
        for payload in dets:
            publisher.send("edge/clip/detections", payload)
        for payload in events:
            publisher.send("edge/clip/events", payload)
        for payload in front + rear:        # named cameras: detections/{camera}
            publisher.send("edge/multi/detections/" + payload["camera"], payload)
        publisher.send("edge/other/status", status)
        got = {name: list(c.messages(timeout=1)) for name, c in clients.items()}
    finally:
        for client in clients.values():
            client.close()
    assert [m.payload for m in got["device"]] == dets
    assert [m.payload for m in got["camera"] if m.kind == "detections"] == rear
    assert [m.device for m in got["camera"] if m.kind == "status"] == ["other"]

    all_dets = dets + front + rear
    for name, keep in (("label", lambda d: d["label"] == "zebra"),
                       ("score", lambda d: d["score"] >= 0.8)):
        detections = [m for m in got[name] if m.kind == "detections"]
        assert [m.payload for m in detections] == recorded.narrowed(all_dets, keep)
        assert [[(d.label, d.score) for d in m.detections] for m in detections] == [
            [(d["label"], d["score"]) for d in p["detections"]]
            for p in recorded.narrowed(all_dets, keep)]
        for m in detections:    # (`camera` is issue 16's: not in the document yet)
            schemas.validate("detections", {k: v for k, v in m.payload.items()
                                            if k != "camera"})
        assert [m.payload for m in got[name] if m.kind == "events"] == [
            e for e in events if keep(e)]
    assert any(m.kind == "events" for m in got["label"])
    assert len(recorded.narrowed(all_dets, lambda d: d["label"] == "zebra")) < len(all_dets)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_share_group_splits_one_stream(broker, publisher, messages, protocol):
    """Consumers in one share group (MQTT shared subscriptions) each get part of the
    messages, every message exactly one of them."""
    payloads = messages["pan"]["detections"][:20]
    workers = [edge_client.Client(broker.url, devices=["clip"], share="workers",
                                  protocol=protocol).connect() for _ in range(2)]
    try:
        assert workers[0].subscriptions == ["$share/workers/edge/clip/detections",
                                           "$share/workers/edge/clip/detections/+"]
        for payload in payloads:
            publisher.send("edge/clip/detections", payload)
        got = [[m.seq for m in w.messages(timeout=1)] for w in workers]
    finally:
        for worker in workers:
            worker.close()
    assert all(got) and not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == [p["seq"] for p in payloads]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_named_session_gets_what_came_while_the_program_was_away(broker, publisher,
                                                                   messages, protocol):
    """A robot's program stops and starts again with the same session name: the broker
    queued the QoS 1 messages published meanwhile, and they arrive in order."""
    payloads = messages["pan"]["detections"][:10]
    first = edge_client.Client(broker.url, session="robot-{}".format(protocol.replace(".", "")),
                               protocol=protocol).connect()
    first.close()
    for payload in payloads:
        publisher.send("edge/clip/detections", payload)
    with edge_client.Client(broker.url, session=first.client_id, protocol=protocol) as again:
        got = list(again.messages(count=len(payloads), timeout=5))
    assert [m.seq for m in got] == [p["seq"] for p in payloads]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_an_unnamed_session_ends_with_close(broker, protocol):
    """Without a name the session is the client's alone: close() ends it on the broker,
    which would otherwise queue messages for it for ever."""
    client = edge_client.Client(broker.url, protocol=protocol).connect()
    client_id = client.client_id
    client.close()
    present = []
    connected = threading.Event()
    paho = mqtt.make_client(client_id, protocol, clean_session=False)

    def on_connect(c, userdata, flags, rc, properties=None):
        present.append(mqtt.session_present(flags))
        connected.set()
    paho.on_connect = on_connect
    options = {}
    if protocol == "5":
        options = {"clean_start": False, "properties": mqtt.packet_properties(
            "CONNECT", SessionExpiryInterval=60)}
    paho.connect("127.0.0.1", broker.port, 30, **options)
    paho.loop_start()
    try:
        assert connected.wait(5)
    finally:
        paho.disconnect()
        paho.loop_stop()
    assert present == [False]


def test_a_broker_restart_loses_nothing(tmp_path, messages):
    """The broker (with persistence) restarts while the client is connected; what is
    published as soon as it is back reaches the client through its resumed session."""
    broker = Mosquitto(str(tmp_path)).start()
    try:
        payloads = messages["pan"]["detections"][:20]
        with edge_client.Client(broker.url) as client:
            broker.stop()
            broker.start()
            publisher = Publisher(broker.port)    # before the client is back, most likely
            for payload in payloads:
                publisher.send("edge/clip/detections", payload)
            publisher.close()
            got = list(client.messages(count=len(payloads), timeout=10))
            stats = client.stats()
    finally:
        broker.stop()
    assert [m.seq for m in got] == [p["seq"] for p in payloads]
    assert stats["connects"] == 2 and stats["sessions_lost"] == 0


def test_a_slow_consumer_loses_the_oldest_and_counts_them(broker, publisher, messages):
    payloads = messages["pan"]["detections"][:20]
    with edge_client.Client(broker.url, queue_size=5) as client:
        for payload in payloads:
            publisher.send("edge/clip/detections", payload)
        deadline = time.monotonic() + 5
        while client.stats()["dropped"] < 15 and time.monotonic() < deadline:
            time.sleep(0.02)
        got = list(client.messages(timeout=0.5))
        assert client.stats()["dropped"] == 15
    assert [m.seq for m in got] == [p["seq"] for p in payloads[-5:]]


def test_an_unreachable_broker_is_an_unavailable_error_naming_the_cause():
    client = edge_client.Client("mqtt://127.0.0.1:{}".format(free_port()))
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="connection refused") as e:
        client.connect(timeout=1)
    assert e.value.exit_code == 69 and time.monotonic() - started < 5
    with pytest.raises(UnavailableError, match="connection refused"):
        client.connect(timeout=None, retry=False)      # the first failed attempt ends it


@pytest.mark.parametrize("kwargs, words", [
    ({"devices": ["cam/1"]}, "device 'cam/1'"),
    ({"devices": ["+"]}, "device '+'"),
    ({"cameras": ["front rear"]}, "camera 'front rear'"),
    ({"topics": ["detections", "cmd"]}, "topics detections, cmd"),
    ({"topics": []}, "topics (none)"),
    ({"min_score": 1.5}, "min_score 1.5"),
    ({"session": "robot#1"}, "session 'robot#1'"),
    ({"prefix": "edge/#"}, "prefix 'edge/#': MQTT topic levels"),
    ({"share": "a/b"}, "share group 'a/b'"),
    ({"protocol": "3"}, "protocol '3'"),
    ({"queue_size": 0}, "queue_size 0"),
    ({"url": "http://broker"}, "unknown scheme"),
    ({"ca_file": "/nonexistent/ca.pem", "url": "mqtts://broker"}, "ca_file /nonexistent"),
])
def test_bad_arguments_are_config_errors_naming_them(kwargs, words):
    kwargs = dict(kwargs)
    url = kwargs.pop("url", "mqtt://localhost:1883")
    with pytest.raises(ConfigError) as e:
        edge_client.Client(url, **kwargs)
    assert words in str(e.value)


def test_one_name_is_a_list_of_one():
    client = edge_client.Client(devices="cam1", topics="events", cameras="front",
                                labels="person")
    assert client.subscriptions == ["edge/cam1/events/front"]
    assert (client.cameras, client.labels) == (["front"], ["person"])


def test_on_wants_a_topic_of_the_client():
    client = edge_client.Client(topics=["detections"])
    with pytest.raises(ConfigError, match="on\\('events'\\)"):
        client.on("events", print)


def run_python(code, env=None):
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60, env=dict(os.environ, **(env or {})))
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def test_without_jsonschema_it_says_how_to_install_it():
    rc, out, err = run_python(
        "import sys; sys.modules['jsonschema'] = None\n"
        "from edge.client import Client\n"
        "try:\n    Client()\nexcept Exception as e:\n    print(e)\n"
        "print(Client(validate=False).topics)\n")
    assert rc == 0, err
    assert "pip install 'jsonschema>=3.2'" in out and "validate=False" in out
    assert "('detections',)" in out


def test_a_robot_needs_only_paho_pyyaml_and_jsonschema(broker, publisher, messages):
    """Receiving and checking messages imports none of the device's libraries (numpy,
    OpenCV, ONNX, ONNX Runtime, scipy, psutil): a robot can install edge with --no-deps."""
    code = ("import sys\nfrom edge.client import Client\n"
            "with Client('{}', devices=['clip']) as c:\n"
            "    print('ready', flush=True)\n"
            "    print([m.seq for m in c.messages(count=1, timeout=20)])\n"
            "print(sorted(m for m in ('numpy', 'cv2', 'onnx', 'onnxruntime', 'scipy', 'psutil')"
            " if m in sys.modules))\n").format(broker.url)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        publisher.send("edge/clip/detections", messages["pan"]["detections"][0])
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.decode().split("\n")[:2] == [
        "[{}]".format(messages["pan"]["detections"][0]["seq"]), "[]"], err.decode()


def test_topics_are_built_in_one_place():
    # a single unnamed source publishes on detections, named cameras on detections/{camera}
    assert edge_client.subscriptions("edge") == ["edge/+/detections", "edge/+/detections/+"]
    assert edge_client.subscriptions("site/a", ["cam1", "cam2"], ["detections", "status"]) == [
        "site/a/cam1/detections", "site/a/cam1/detections/+", "site/a/cam1/status",
        "site/a/cam2/detections", "site/a/cam2/detections/+", "site/a/cam2/status"]
    assert edge_client.subscriptions("edge", ["r1"], ["events", "health"],
                                     cameras=["front", "rear"]) == [
        "edge/r1/events/front", "edge/r1/events/rear", "edge/r1/health"]
    assert edge_client.subscriptions("edge", ["r1"], share="g") == [
        "$share/g/edge/r1/detections", "$share/g/edge/r1/detections/+"]


def test_bench_client_prints_its_figures():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_client.py"),
                           "--messages", "50", "--rounds", "20", "--detections", "3"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    for step in ("json decode", "check", "parse"):
        assert re.search(r"  {} +\d+\.\d+ ms a message".format(step), out), out
    assert re.search(r"through the broker: 50 messages at \d+ a second \(QoS 1; dropped 0, "
                     r"invalid 0\)", out), out
