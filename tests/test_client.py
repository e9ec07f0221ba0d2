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
    def where(topic, payload):      # a named camera's messages go to {topic}/{camera}
        return "edge/{}/{}".format(payload["device"], topic) + (
            "/" + payload["camera"] if "camera" in payload else "")
    with edge_client.Client(broker.url, topics=edge_client.TOPICS) as client:
        for topic, payload in sent:
            publisher.send(where(topic, payload), payload)
        got = list(client.messages(count=len(sent), timeout=10))
        assert len(got) == len(sent)
        for message, (topic, payload) in zip(got, sent):
            check_object(message, topic, payload)
            assert message.topic == where(topic, payload)
            assert message.camera == payload.get("camera")
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
            for payload in (b"\xff not json", wrong_box, newer):
                publisher.send("edge/clip/detections", payload)
            publisher.send("edge/clip/detections/front", extra)
            publisher.send("edge/clip/detections", good)
            got = list(client.messages(timeout=1))
            stats = client.stats()
    assert [m.payload for m in got] == [extra, good]
    assert got[0].camera == "front"
    assert stats["invalid"] == 3 and stats["delivered"] == 2
    text = caplog.text
    assert "edge/clip/detections" in text and "not UTF-8 JSON" in text
    assert "detections[0].box[0]" in text and "at v" in text


def camera_copies(payloads, camera, device="multi"):
    """A device with named cameras: its messages name the camera (and the device) their
    topic names."""
    return [dict(p, camera=camera, device=device) for p in payloads]


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


def test_without_jsonschema_payloads_are_checked_all_the_same():
    """edge.schemas.check is plain Python: a robot needs no jsonschema to check payloads."""
    rc, out, err = run_python(
        "import sys; sys.modules['jsonschema'] = None\n"
        "from edge import client, schemas\n"
        "print(client.Client().validate)\n"
        "example = schemas.document()['components']['messages']['Status']['examples'][0]\n"
        "schemas.check('status', example['payload'], strict=False)\n"
        "try:\n    schemas.check('status', dict(example['payload'], since='soon'))\n"
        "except ValueError as e:\n    print(e)\n")
    assert rc == 0, err
    assert out.splitlines() == ["True", "status payload: at since: 'soon' is not of type "
                                        "'number'"], out


def test_a_robot_needs_only_paho_and_pyyaml(broker, publisher, messages):
    """Receiving and checking messages imports none of the device's libraries (numpy,
    OpenCV, ONNX, ONNX Runtime, scipy, psutil), nor jsonschema: a robot can install edge
    with --no-deps."""
    code = ("import sys\nfrom edge.client import Client\n"
            "with Client('{}', devices=['clip']) as c:\n"
            "    print('ready', flush=True)\n"
            "    print([m.seq for m in c.messages(count=1, timeout=20)])\n"
            "print(sorted(m for m in ('numpy', 'cv2', 'onnx', 'onnxruntime', 'scipy', 'psutil',"
            " 'jsonschema') if m in sys.modules))\n").format(broker.url)
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


# -- hostile peers (issue 23): who sent a message is its topic; sizes, numbers and shapes
#    bounded; nothing slow or bad delays the next good message -----------------------------

def example(name, index=0):
    """A copy of an example payload of the API document."""
    return json.loads(json.dumps(DOC["components"]["messages"][name]["examples"][index][
        "payload"]))


def detections_of(count, device="cam1"):
    """The document's stereo detections example with `count` objects (valid up to a card's
    3840 candidates)."""
    message = example("Detections", 2)
    message["device"] = device
    first = message["detections"][0]
    message["detections"] = [dict(first, track_id=i + 1) for i in range(count)]
    return message


def raw_json(payload, **tokens):
    """A payload as bytes with placeholders replaced by raw JSON tokens (NaN, 1e400, ...),
    which json.dumps would not write as such."""
    text = json.dumps(payload)
    for placeholder, token in tokens.items():
        text = text.replace('"{}"'.format(placeholder), token)
    return text.encode()


def test_the_sender_is_the_topic_never_the_payload(broker, publisher, caplog):
    """A robot publishes on its own topics with `"device": "cam1"` (a person at 0.99, a fake
    `cam1 online`): nothing of it reaches the consumer as cam1's. The same for a camera a
    payload names against its topic's. Genuine messages arrive, the device and camera taken
    from the topic; the forgeries are counted and logged at a bounded rate."""
    det = example("Detections")                 # device cam1, no camera
    status = json.loads(mqtt.status_payload("cam1", "online", time.time()).decode())
    multi = dict(example("Detections", 1), device="multi", camera="front")
    with caplog.at_level(logging.WARNING, logger="edge.client"):
        with edge_client.Client(broker.url, topics=["detections", "status"]) as client:
            publisher.send("edge/robot-arm/detections", det)
            publisher.send("edge/robot-arm/status", status)
            publisher.send("edge/multi/detections/front", dict(multi, camera="rear"))
            publisher.send("edge/multi/detections", multi)      # a camera on the plain topic
            publisher.send("edge/cam1/detections", det)
            publisher.send("edge/multi/detections/front", multi)
            got = list(client.messages(timeout=1))
            stats = client.stats()
    assert [(m.kind, m.device, m.camera) for m in got] == [("detections", "cam1", None),
                                                           ("detections", "multi", "front")]
    assert stats["forged"] == 4 and stats["delivered"] == 2 and stats["invalid"] == 0
    assert "edge/robot-arm/detections" in caplog.text and "cam1" in caplog.text


def test_log_lines_about_bad_messages_come_at_a_bounded_rate(broker, publisher, caplog):
    """300 forgeries from 300 topics (each a problem of its own) make a handful of log
    lines, not 300: the counts are in stats()."""
    det = example("Detections")
    with caplog.at_level(logging.WARNING, logger="edge.client"):
        with edge_client.Client(broker.url) as client:
            for i in range(300):
                publisher.send("edge/r{}/detections".format(i), det)
            publisher.send("edge/cam1/detections", det)
            got = list(client.messages(count=1, timeout=10))
            stats = client.stats()
    assert [m.device for m in got] == ["cam1"] and stats["forged"] == 300
    lines = [r for r in caplog.records if r.name == "edge.client"]
    assert 1 <= len(lines) <= 20, len(lines)


# Payloads outside what the API document allows: (name, topic, raw bytes). Each one passed
# before issue 23 (json accepts NaN and Infinity, and nothing bounded ids or strings).
def _hostile():
    det = example("Detections", 2)              # with `spatial`
    event = example("Event")
    depth = example("Depth")
    matches = example("Matches")
    status = example("Status")

    def changed(payload, change):
        payload = json.loads(json.dumps(payload))
        change(payload)
        return payload

    def first(m):
        return m["detections"][0]
    cases = [
        ("score NaN", "detections", raw_json(changed(det, lambda m: first(m).update(
            score="X")), X="NaN")),
        ("box Infinity", "detections", raw_json(changed(det, lambda m: first(m)["box"].__setitem__(
            2, "X")), X="Infinity")),
        ("box -Infinity", "detections", raw_json(changed(det, lambda m: first(m)["box"].__setitem__(
            0, "X")), X="-Infinity")),
        ("box 1e400", "detections", raw_json(changed(det, lambda m: first(m)["box"].__setitem__(
            1, "X")), X="1e400")),
        ("spatial NaN", "detections", raw_json(changed(det, lambda m: first(m)["spatial"].update(
            x="X")), X="NaN")),
        ("frame ts NaN", "detections", raw_json(changed(det, lambda m: m["frame"].update(
            ts="X")), X="NaN")),
        ("frame ts 1e300", "detections", json.dumps(changed(det, lambda m: m["frame"].update(
            ts=1e300))).encode()),
        ("latency Infinity", "detections", raw_json(changed(det, lambda m: m["latency_ms"].update(
            total="X")), X="Infinity")),
        ("track id 10^300", "detections", json.dumps(changed(det, lambda m: first(m).update(
            track_id=10 ** 300))).encode()),
        ("seq 10^300", "detections", json.dumps(changed(det, lambda m: m.update(
            seq=10 ** 300))).encode()),
        ("frame index 10^30", "detections", json.dumps(changed(det, lambda m: m["frame"].update(
            index=10 ** 30))).encode()),
        ("class id 5000 digits", "detections", raw_json(changed(det, lambda m: first(m).update(
            class_id="X")), X="9" * 5000)),
        ("label of 1 MB", "detections", json.dumps(changed(det, lambda m: first(m).update(
            label="x" * 1000000))).encode()),
        ("frame name of 1 MB", "detections", json.dumps(changed(det, lambda m: m["frame"].update(
            name="y" * 1000000))).encode()),
        ("model of 1 MB", "detections", json.dumps(changed(det, lambda m: m.update(
            model="m" * 1000000))).encode()),
        ("5000 detections", "detections", json.dumps(detections_of(5000)).encode()),
        ("event ts Infinity", "events", raw_json(changed(event, lambda m: m.update(ts="X")),
                                                 X="Infinity")),
        ("event zone of 1 MB", "events", json.dumps(changed(example("Event", 1), lambda m: m.update(
            zone="z" * 1000000))).encode()),
        ("depth grid with a row missing", "depth", json.dumps(changed(
            depth, lambda m: m["depth_mm"].pop())).encode()),
        ("depth grid with a short row", "depth", json.dumps(changed(
            depth, lambda m: m["depth_mm"][1].pop())).encode()),
        ("depth grid with a long row", "depth", json.dumps(changed(
            depth, lambda m: m["depth_mm"][0].append(1000))).encode()),
        ("depth grid of 10^300 columns", "depth", json.dumps(changed(
            depth, lambda m: m["grid"].update(columns=10 ** 300))).encode()),
        ("depth NaN", "depth", raw_json(changed(depth, lambda m: m["range_mm"].__setitem__(
            0, "X")), X="NaN")),
        ("homography Infinity", "matches", raw_json(changed(
            matches, lambda m: m["homography"].__setitem__(8, "X")), X="Infinity")),
        ("match NaN", "matches", raw_json(changed(
            matches, lambda m: m["matches"][0].__setitem__(4, "X")), X="NaN")),
        ("count 10^300", "matches", json.dumps(changed(
            matches, lambda m: m.update(count=10 ** 300))).encode()),
        ("status since NaN", "status", raw_json(changed(status, lambda m: m.update(
            since="X")), X="NaN")),
        ("status since 1e300", "status", json.dumps(changed(status, lambda m: m.update(
            since=1e300))).encode()),
        ("status reason of 1 MB", "status", json.dumps(changed(status, lambda m: m.update(
            reason="r" * 1000000))).encode()),
        ("nested 100000 deep", "status", b"[" * 100000 + b"]" * 100000),
    ]
    return cases


HOSTILE = _hostile()


def test_non_finite_numbers_huge_ids_and_malformed_grids_are_refused(broker, publisher):
    """NaN and Infinity (which Python's json accepts), numbers past the document's maxima,
    strings and arrays past its maxLength and maxItems, a depth grid whose rows do not match
    its size: none reaches a callback; each is counted as invalid, and a good message
    after them arrives."""
    topics = sorted({topic for _, topic, _ in HOSTILE})
    with edge_client.Client(broker.url, topics=topics) as client:
        for name, topic, raw in HOSTILE:
            publisher.send("edge/cam1/" + topic, raw)
        publisher.send("edge/cam1/detections", example("Detections"))
        got = list(client.messages(timeout=2))
        stats = client.stats()
    assert [(m.kind, m.seq) for m in got] == [("detections", example("Detections")["seq"])], \
        [m.payload for m in got if m.kind != "detections" or m.seq != 17][:1]
    assert stats["invalid"] == len(HOSTILE), stats


def test_every_hostile_case_is_refused_by_the_check_alone():
    """The same cases without a broker: strict JSON (no NaN, no Infinity, no huge
    integers) and the document's bounds, each with a reason."""
    for name, topic, raw in HOSTILE:
        with pytest.raises(ValueError):
            schemas.check(topic, schemas.loads(raw), strict=False)
            pytest.fail(name)


@pytest.mark.timing
def test_a_huge_message_is_dropped_unread_and_does_not_delay_the_next(broker, publisher):
    """An 8 MB detections message (under the example broker's 8 MiB limit) from a rogue
    device, then a real device's message: the big one is dropped on paho's thread by its
    size (never parsed or queued), the real one arrives at once."""
    big = json.dumps(detections_of(50000, device="rogue")).encode()
    assert 7.5e6 < len(big) < 8 * 1024 * 1024
    good = example("Detections")
    with edge_client.Client(broker.url) as client:
        publisher.send("edge/rogue/detections", big)
        sent = time.monotonic()
        publisher.send("edge/cam1/detections", good)
        got = list(client.messages(count=1, timeout=30))
        delay = time.monotonic() - sent
        stats = client.stats()
    assert [m.device for m in got] == ["cam1"]
    assert stats["oversized"] == 1 and stats["received"] == 1, stats
    assert delay < 1.0, delay


@pytest.mark.timing
def test_twenty_invalid_messages_do_not_delay_the_next_by_much(broker, publisher):
    """20 invalid messages just under the client's size limit (too many detections: the
    check fails at once), then 20 invalid ones of 8 MB (dropped by size), then a good
    one: it arrives within a small bound."""
    client = edge_client.Client(broker.url)
    limit = client.max_payload
    per = len(json.dumps(detections_of(2))) - len(json.dumps(detections_of(1)))
    count = limit // per
    while len(json.dumps(detections_of(count))) > limit:
        count -= 10
    near = json.dumps(detections_of(count, device="rogue")).encode()
    assert limit * 0.99 < len(near) <= limit and count > 3840
    over = json.dumps(detections_of(50000, device="rogue")).encode()
    good = example("Detections")
    with client:
        for _ in range(20):
            publisher.send("edge/rogue/detections", near)
        for _ in range(20):
            publisher.send("edge/rogue/detections", over)
        sent = time.monotonic()
        publisher.send("edge/cam1/detections", good)
        got = list(client.messages(count=1, timeout=30))
        delay = time.monotonic() - sent
        stats = client.stats()
    assert [m.device for m in got] == ["cam1"]
    assert stats["invalid"] == 20 and stats["oversized"] == 20, stats
    assert delay < 5.0, delay     # 2.0 s on the 2-core development host: parsing 2 MiB, 20 times


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_many_oversized_messages_do_not_stall_the_session(broker, publisher, protocol):
    """25 oversized QoS 1 messages, then a good one, which arrives. (With MQTT 5's Maximum
    Packet Size in its CONNECT, Mosquitto 2.0 would drop them for the client but keep
    their in-flight slots: after 20 the session got nothing more. The client asks for no
    maximum and drops them itself.)"""
    with edge_client.Client(broker.url, protocol=protocol, max_payload=1000) as client:
        for _ in range(25):
            publisher.send("edge/rogue/detections", b"x" * 200000)
        publisher.send("edge/cam1/detections", example("Detections"))
        got = list(client.messages(count=1, timeout=10))
        stats = client.stats()
    assert [m.device for m in got] == ["cam1"] and stats["oversized"] == 25, stats


def test_max_payload_is_an_argument_with_a_documented_default(broker, publisher):
    """The limit covers the largest messages a device sends within the document's bounds
    (a 256x256 depth grid, detections at a card's 3840 candidates); a smaller one drops
    more, and a bad value is a ConfigError."""
    assert edge_client.DEFAULT_MAX_PAYLOAD == edge_client.Client().max_payload
    depth = example("Depth")
    depth["grid"] = {"columns": 256, "rows": 256}
    depth["depth_mm"] = [[10000000] * 256 for _ in range(256)]
    largest = [depth, detections_of(3840)]
    for payload in largest:
        raw = json.dumps(payload, separators=(",", ":")).encode()
        assert len(raw) < edge_client.DEFAULT_MAX_PAYLOAD
        started = time.perf_counter()
        schemas.check(payload.get("grid") and "depth" or "detections", schemas.loads(raw))
        assert time.perf_counter() - started < 1.0
    with edge_client.Client(broker.url, max_payload=1000) as client:
        publisher.send("edge/cam1/detections", detections_of(20))
        publisher.send("edge/cam1/detections", example("Detections"))
        got = list(client.messages(count=1, timeout=10))
        assert client.stats()["oversized"] == 1 and [m.seq for m in got] == [17]
    for bad in (0, -1, "1MB", 1.5):
        with pytest.raises(ConfigError, match="max_payload"):
            edge_client.Client(max_payload=bad)


# -- what users see (issue 24): message kinds, the words of a lost connection --------------

def test_kinds_are_constants_equal_to_the_plain_strings():
    """`message.kind` is the topic's name, a plain str, importable as a constant: old code
    comparing strings keeps working, new code cannot misspell one silently."""
    from edge.client import DEPTH, DETECTIONS, EVENTS, HEALTH, MATCHES, STATUS
    assert (DETECTIONS, MATCHES, EVENTS, DEPTH, STATUS, HEALTH) == edge_client.TOPICS == (
        "detections", "matches", "events", "depth", "status", "health")
    classes = {DETECTIONS: edge_client.Detections, MATCHES: edge_client.Matches,
               EVENTS: edge_client.Event, DEPTH: edge_client.Depth,
               STATUS: edge_client.Status, HEALTH: edge_client.Health}
    for kind, cls in classes.items():
        assert cls.kind == kind and type(cls.kind) is str
        assert kind in cls.__doc__, "{}'s docstring names its kind".format(cls.__name__)
    for name, topic in EXAMPLE_TOPICS.items():
        payload = example(name)
        message = edge_client.parse(topic, payload)
        assert message.kind == topic and type(message.kind) is str


@pytest.mark.parametrize("make", [
    lambda: edge_client.Client(topics=["detections", "event"]),
    lambda: edge_client.Client(topics="event"),
    lambda: edge_client.Client(topics=["detections", "events"]).on("event", print),
])
def test_a_misspelt_kind_is_a_value_error_naming_the_valid_ones(make):
    """"event" for "events" matched nothing before: a script's events were all skipped while
    the client counted them delivered. Where a kind is given to the client, it is checked."""
    with pytest.raises(ValueError) as e:
        make()
    assert isinstance(e.value, ConfigError)
    text = str(e.value)
    assert "'event'" in text and "did you mean 'events'" in text
    assert all(topic in text for topic in edge_client.TOPICS), text


def test_events_counted_delivered_are_the_events_a_script_sees(broker, publisher):
    """The six events of a script filtering by the constant reach it, as the stats say."""
    event = example("Event")
    with edge_client.Client(broker.url, topics=[edge_client.DETECTIONS,
                                                edge_client.EVENTS]) as client:
        for seq in range(6):
            publisher.send("edge/cam1/events", dict(event, seq=seq + 1))
        publisher.send("edge/cam1/detections", example("Detections"))
        got = list(client.messages(count=7, timeout=10))
        stats = client.stats()
    assert len([m for m in got if m.kind == edge_client.EVENTS]) == 6 == len(
        [m for m in got if isinstance(m, edge_client.Event)])
    assert stats["delivered"] == 7


def test_disconnect_reasons_are_words_under_paho_1_and_2():
    """paho 2.x gives a ReasonCode (128 "Unspecified error" when the connection dropped),
    paho 1.x an int (7: MQTT_ERR_CONN_LOST) or, for the broker's own DISCONNECT, a reason
    object: each becomes words, never a bare code."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode
    from paho.mqtt.client import DisconnectFlags

    def code(name):
        return ReasonCode(PacketTypes.DISCONNECT, name)
    reason = edge_client.disconnect_reason
    lost = "closed by the broker or the network"
    silent = "no answer from the broker within the keepalive"
    assert reason((DisconnectFlags(False), code("Unspecified error"), None)) == lost
    assert reason((DisconnectFlags(False), code("Keep alive timeout"), None)) == silent
    assert reason((DisconnectFlags(True), code("Session taken over"), None)) == \
        "the broker ended it: session taken over"
    assert reason((7,)) == reason((7, None)) == lost        # paho 1.x, MQTT 3.1.1 and 5
    assert reason((16,)) == reason((1,)) == silent          # paho 1.6, and before 1.6
    assert reason((code("Server shutting down"), None)) == \
        "the broker ended it: server shutting down"          # paho 1.x, MQTT 5
    assert not re.search(r"\d", reason((4,)))


def test_a_lost_connection_is_one_line_in_words(broker):
    """`edge listen` (edge.client under edge's log format) while the broker stops: one
    WARNING naming the broker and why, the logger's name once, no bare reason code."""
    proc = subprocess.Popen([sys.executable, "-m", "edge", "listen", "--mqtt", broker.url],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = threading.Timer(30, proc.kill)      # a line that never comes ends the read
    deadline.start()
    try:
        assert proc.stderr.readline().startswith(b"edge listen: subscribed")
        broker.stop()
        line = proc.stderr.readline().decode()
    finally:
        deadline.cancel()
        proc.kill()
        proc.communicate()
    assert line.rstrip().endswith(
        " WARNING edge.client: connection to {} lost (closed by the broker or the network); "
        "reconnecting".format(broker.url)), line
