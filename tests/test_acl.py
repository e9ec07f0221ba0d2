"""The broker ACL example (systemd/mosquitto.conf, systemd/mosquitto-acl) on a real Mosquitto.

The shipped files are used as they are, with the listener moved to a free loopback port and
the paths moved to a temporary folder; every account of systemd/broker-roster.yaml gets a
password with `mosquitto_passwd`. Mosquitto acknowledges a publish the ACL forbids and drops
it (MQTT 3.1.1 has no error for it), so every check is on delivery: what may not arrive is
followed by a message that must, on the same connections, and the subscriber must get only
what it may read. The topics come from the API document (edge/schemas/asyncapi.yaml): every
channel, {camera} as two named cameras, so no topic of the API can miss its readers.
"""

import collections
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from edge import schemas
from tests.conftest import ROOT, free_port, mosquitto_binary
from tools import render_broker
from tools.soak import read_jsonl, start_edge, start_mosquitto

ROSTER = render_broker.load_roster(render_broker.ROSTER)
ACCOUNTS = ROSTER["devices"] + ROSTER["robots"] + ROSTER["operators"] + list(ROSTER["sites"])
USERS = {name: name + "-secret" for name in ACCOUNTS}
# Who publishes what clients send to a device, by operationId (every one of the document's).
CLIENT_WRITERS = {"command": "operators", "broadcast": "operators", "motion": "robots",
                  "motion_of_camera": "robots"}
# Example values of the API document's topic parameters: two named cameras.
EXAMPLES = {"camera": ("front", "rear"), "id": ("r1",), "command": ("ping",),
            "broadcast_command": ("health",), "session": ("s1",)}

pytestmark = pytest.mark.skipif(
    not mosquitto_binary() or not shutil.which("mosquitto_passwd"),
    reason="mosquitto and mosquitto_passwd are needed (apt-get install mosquitto)")


def api_topics(device, prefix="edge", clients="operators"):
    """({topic: whether robots read it} of everything `device` publishes, [the topics
    `clients` (operators: commands; robots: the camera's motion) publish to it]): each
    channel of the API document with EXAMPLES as parameters, and the answers to `edge
    health` (`{prefix}/_health/{session}/{device_id}`, which the `reply` channel names).
    Answers to commands (a channel with an {id}, `edge health`'s) are for operators only;
    results and state for robots as well."""
    published, commands = collections.OrderedDict(), []
    channels = []
    for template, item in schemas.document()["channels"].items():
        if "subscribe" in item:
            channels.append((template, True))
        elif CLIENT_WRITERS[item["publish"]["operationId"]] == clients:
            channels.append((template, False))
    channels.append((render_broker.HEALTH_REPLY, True))
    for template, device_publishes in channels:
        names = re.findall(r"\{(\w+)\}", template)
        values = dict(EXAMPLES, prefix=(prefix,), device_id=(device,))
        for combination in itertools.product(*(values[n] for n in names)):
            topic = template
            for name, value in zip(names, combination):
                topic = topic.replace("{" + name + "}", value)
            if device_publishes:
                published[topic] = "{id}" not in template and "_health" not in template
            else:
                commands.append(topic)
    return published, commands


class Client:
    """A paho client logged in as `user`, recording (topic, payload, retain) it receives."""

    def __init__(self, port, user, password=None, topics=(), client_id=None, ca=None,
                 clean_session=True):
        from edge.mqtt import make_client
        self.user = user
        self.messages = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.refused = None
        self.disconnects = 0
        self.topics = list(topics)
        self.client = make_client(client_id or "acl-{}-{}".format(user, time.monotonic_ns()),
                                  clean_session=clean_session)
        self.client.username_pw_set(user, USERS.get(user) if password is None else password)
        if ca is not None:
            self.client.tls_set(ca_certs=ca)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *args: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        code = int(getattr(rc, "value", rc))
        if code != 0:
            self.refused = code
            self.ready.set()
            return
        if self.topics:
            client.subscribe([(t, 1) for t in self.topics])
        else:
            self.ready.set()

    def _on_disconnect(self, client, userdata, *args):
        self.disconnects += 1

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, message.payload, message.retain))

    def wait_ready(self):
        assert self.ready.wait(10), "no CONNACK/SUBACK for " + self.user
        return self

    def publish(self, topic, payload, retain=False):
        """Publish with QoS 1 and wait for the broker's PUBACK (sent even when it drops it)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()

    def received(self, topic=None):
        with self.lock:
            return [p for t, p, _ in self.messages if topic is None or t == topic]

    def topics_received(self):
        with self.lock:
            return [t for t, _, _ in self.messages]

    def wait_for(self, topic, payload, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if payload in self.received(topic):
                return True
            time.sleep(0.02)
        return False

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def password_file(path, users):
    for i, (user, password) in enumerate(sorted(users.items())):
        subprocess.check_call(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) +
                              [path, user, password])


def shipped(name, replacements):
    """A shipped file of systemd/ with each (regex, value) replaced exactly once."""
    text = open(os.path.join(ROOT, "systemd", name)).read()
    for pattern, value in replacements:
        text, count = re.subn(pattern, lambda m: value, text)
        assert count == 1, (name, pattern)
    return text


Broker = collections.namedtuple("Broker", "port proc acl passwd folder")


@pytest.fixture
def acl_broker(tmp_path):
    """Mosquitto with the shipped configuration and ACL, on a free port."""
    passwd = str(tmp_path / "edge.passwd")
    password_file(passwd, USERS)
    acl = str(tmp_path / "edge-acl")
    shutil.copy(os.path.join(ROOT, "systemd", "mosquitto-acl"), acl)
    port = free_port()
    conf = shipped("mosquitto.conf", [
        (r"(?m)^listener 1883$", "listener {} 127.0.0.1".format(port)),
        (r"(?m)^password_file .*$", "password_file " + passwd),
        (r"(?m)^acl_file .*$", "acl_file " + acl),
        (r"(?m)^persistence_location .*$", "persistence_location {}/".format(tmp_path))])
    conf_path = str(tmp_path / "mosquitto.conf")
    # As root, mosquitto switches to the `mosquitto` user, which cannot read the private
    # temporary folder; stay root there (ignored when not run as root).
    open(conf_path, "w").write(conf + "\nuser root\n")
    try:
        proc = start_mosquitto(conf_path, port, str(tmp_path / "mosquitto.log"))
    except RuntimeError:
        pytest.fail("mosquitto did not start: " + open(str(tmp_path / "mosquitto.log")).read())
    yield Broker(port, proc, acl, passwd, str(tmp_path))
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def clients():
    """make(port, user, ...): connected Clients, closed at the end."""
    made = []

    def make(*args, **kwargs):
        c = Client(*args, **kwargs).wait_ready()
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def test_every_topic_of_the_api_reaches_the_accounts_meant_to_read_it(acl_broker, clients):
    """cam1 with two named cameras: robots get results, events, depth, status and health of
    both cameras; operators get those and the answers; another device nothing. Commands reach
    their device (the fleet-wide one every device), never a robot; a robot's `motion`
    reaches its device and operators, never another device or robot, and nobody but a
    robot writes it."""
    port = acl_broker.port
    published, commands = api_topics("cam1")
    assert "edge/cam1/detections/front" in published and "edge/cam1/events/rear" in published
    robot = clients(port, "robot-arm", topics=["edge/#"])
    operator = clients(port, "operator-1", topics=["edge/#"])
    other = clients(port, "cam2", topics=["edge/#"])
    cam1 = clients(port, "cam1", topics=["edge/#"])
    for topic in published:
        cam1.publish(topic, topic.encode())
    cam1.publish("edge/cam1/status", b"end")
    assert robot.wait_for("edge/cam1/status", b"end") and operator.wait_for(
        "edge/cam1/status", b"end")
    assert robot.topics_received() == [t for t, robots in published.items() if robots] + [
        "edge/cam1/status"]
    assert operator.topics_received() == list(published) + ["edge/cam1/status"]

    for topic in commands:
        operator.publish(topic, topic.encode())
    operator.publish("edge/cam2/cmd/ping", b"end")
    assert other.wait_for("edge/cam2/cmd/ping", b"end")
    assert cam1.wait_for(commands[-1], commands[-1].encode())
    time.sleep(0.2)
    assert cam1.topics_received() == commands, "a device reads its own commands only"
    assert other.topics_received() == [t for t in commands if "/_all/" in t] + [
        "edge/cam2/cmd/ping"]
    assert robot.topics_received()[-1] == "edge/cam1/status", "robots read no commands"

    motions = api_topics("cam1", clients="robots")[1]
    assert motions == ["edge/cam1/motion", "edge/cam1/motion/front", "edge/cam1/motion/rear"]
    sender = clients(port, "robot-cart")
    for forger in (clients(port, "operator-2"), clients(port, "cam2")):
        forger.publish("edge/cam1/motion", forger.user.encode())
    for topic in motions:
        sender.publish(topic, topic.encode())
    sender.publish("edge/cam2/motion", b"end")
    assert other.wait_for("edge/cam2/motion", b"end")
    assert cam1.wait_for(motions[-1], motions[-1].encode())
    assert operator.wait_for("edge/cam2/motion", b"end")
    time.sleep(0.2)
    assert cam1.topics_received() == commands + motions, "only a robot writes motion"
    assert cam1.received("edge/cam1/motion") == [b"edge/cam1/motion"]
    assert other.topics_received()[-1:] == ["edge/cam2/motion"] and \
        not [t for t in other.topics_received() if t.startswith("edge/cam1/")]
    assert [t for t in operator.topics_received() if "/motion" in t] == motions + [
        "edge/cam2/motion"]
    assert robot.topics_received()[-1] == "edge/cam1/status", "robots read no motion"


def test_no_account_can_pose_as_a_device(acl_broker, clients):
    """What a robot, an operator or another device publishes under a device's topics, its own
    name's or cam1's, reaches nobody, retained or not: no phantom device, no forged result."""
    port = acl_broker.port
    robot = clients(port, "robot-cart", topics=["edge/#"])
    operator = clients(port, "operator-2", topics=["edge/#"])
    forgers = [clients(port, name) for name in ("robot-arm", "operator-1", "cam2")]
    forged = b'{"v": 1, "device": "cam1", "state": "online", "forged": true}'
    for forger in forgers:
        for device in {forger.user, "cam1"} - {"cam2"}:     # (cam2's own topics are its own)
            for topic in api_topics(device)[0]:
                forger.publish(topic, forged, retain=topic.endswith("/status"))
        forger.publish("edge/_all/cmd/health", forged)     # and no robot commands a fleet
    cam1 = clients(port, "cam1")
    cam1.publish("edge/cam1/status", b'{"real": true}', retain=True)
    for reader in (robot, operator):
        assert reader.wait_for("edge/cam1/status", b'{"real": true}')
    # operator-1's _all/cmd/health is a real command: operators send them
    assert robot.received() == [b'{"real": true}']
    assert operator.received() == [forged, b'{"real": true}'] and operator.topics_received() == [
        "edge/_all/cmd/health", "edge/cam1/status"]
    # A later subscriber (`edge health --all` reads the retained statuses) finds cam1 only.
    late = clients(port, "operator-2", topics=["edge/+/status"])
    assert late.wait_for("edge/cam1/status", b'{"real": true}')
    time.sleep(0.2)
    assert late.topics_received() == ["edge/cam1/status"]


def test_a_device_added_to_the_roster_is_in_after_a_reload(acl_broker, clients, tmp_path):
    """Provisioning as docs/broker.md says: roster, render_broker --acl, mosquitto_passwd,
    SIGHUP (systemctl reload); connected clients stay connected."""
    port = acl_broker.port
    robot = clients(port, "robot-arm", topics=["edge/+/status", "edge/+/detections/+"])
    refused = Client(port, "cam9", "cam9-secret").wait_ready()
    refused.close()
    assert refused.refused in (4, 5, 134, 135)
    roster = open(render_broker.ROSTER).read().replace("  - cam3\n", "  - cam3\n  - cam9\n")
    assert "cam9" in roster
    (tmp_path / "fleet.yaml").write_text(roster)
    subprocess.check_call([sys.executable, os.path.join(ROOT, "tools", "render_broker.py"),
                           "--roster", str(tmp_path / "fleet.yaml"), "--acl", acl_broker.acl])
    subprocess.check_call(["mosquitto_passwd", "-b", acl_broker.passwd, "cam9", "cam9-secret"])
    acl_broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        cam9 = Client(port, "cam9", "cam9-secret").wait_ready()
        if cam9.refused is None or time.monotonic() > deadline:
            break
        cam9.close()
        time.sleep(0.1)
    try:
        assert cam9.refused is None
        cam9.publish("edge/cam9/detections/front", b"front")
        cam9.publish("edge/cam9/status", b"online")
        assert robot.wait_for("edge/cam9/status", b"online")
        assert robot.received() == [b"front", b"online"] and robot.disconnects == 0
    finally:
        cam9.close()


def test_robot_cannot_command_device_cannot_write_another_operator_can(acl_broker, clients,
                                                                      tmp_path, model_dir):
    port = acl_broker.port
    # Nobody gets in without a password.
    # CONNACK 4/5 (paho 2 reports MQTT 5 reason codes 134/135 for them).
    refused = (4, 5, 134, 135)
    for user, password in (("nobody", "x"), ("robot-arm", "wrong")):
        stranger = Client(port, user, password).wait_ready()
        stranger.close()
        assert stranger.refused in refused, user

    # Commands: the device and an operator watch cam1's command topic.
    cam1 = clients(port, "cam1", topics=["edge/cam1/cmd/#"])
    watcher = clients(port, "operator-1", topics=["edge/+/cmd/#"])
    robot = clients(port, "robot-arm")
    operator = clients(port, "operator-1")
    robot.publish("edge/cam1/cmd/reload", b'{"id": "robot"}')
    operator.publish("edge/cam1/cmd/reload", b'{"id": "operator"}')
    for observer in (cam1, watcher):
        assert observer.wait_for("edge/cam1/cmd/reload", b'{"id": "operator"}'), \
            "an operator's command is delivered"
        assert observer.received("edge/cam1/cmd/reload") == [b'{"id": "operator"}'], \
            "a robot's command never reaches the device"

    # A device writes under its own id only: not another's results, nor its commands.
    cam2 = clients(port, "cam2", topics=["edge/cam2/cmd/#"])
    robot_reader = clients(port, "robot-arm", topics=["edge/+/detections", "edge/+/status"])
    cam1.publish("edge/cam2/detections", b'{"forged": true}')
    cam1.publish("edge/cam2/status", b'{"forged": true}')
    cam1.publish("edge/cam2/cmd/reload", b'{"id": "forged"}')
    cam2.publish("edge/cam2/detections", b'{"real": true}')
    cam2.publish("edge/cam2/status", b'{"real": true}')
    operator.publish("edge/cam2/cmd/reload", b'{"id": "operator"}')
    assert robot_reader.wait_for("edge/cam2/status", b'{"real": true}')
    assert robot_reader.wait_for("edge/cam2/detections", b'{"real": true}')
    assert robot_reader.received("edge/cam2/detections") == [b'{"real": true}']
    assert robot_reader.received("edge/cam2/status") == [b'{"real": true}']
    assert cam2.wait_for("edge/cam2/cmd/reload", b'{"id": "operator"}')
    assert cam2.received("edge/cam2/cmd/reload") == [b'{"id": "operator"}']

    # A robot reads results but not commands; it cannot forge a device's results either.
    spy = clients(port, "robot-arm", topics=["edge/cam1/cmd/#"])
    robot.publish("edge/cam1/detections", b'{"forged": "robot"}')
    operator.publish("edge/cam1/cmd/ping", b'{"id": "p"}')
    assert cam1.wait_for("edge/cam1/cmd/ping", b'{"id": "p"}')
    cam1.publish("edge/cam1/detections", b'{"real": "cam1"}')
    assert robot_reader.wait_for("edge/cam1/detections", b'{"real": "cam1"}')
    assert robot_reader.received("edge/cam1/detections") == [b'{"real": "cam1"}']
    time.sleep(0.2)
    assert spy.received() == [], "a robot cannot read commands"
    for c in (cam1, cam2):
        c.close()    # the real cam1 below

    # A real device with two named cameras behind the ACL: a robot gets status, health and
    # each camera's detections; the device takes an operator's command and replies; a
    # robot's command never reaches it.
    robot_reader = clients(port, "robot-arm", topics=["edge/cam1/#"])
    operator = clients(port, "operator-1", topics=["edge/cam1/reply/#"])
    jsonl = str(tmp_path / "out.jsonl")
    proc = start_edge(str(tmp_path), [
        "--source", "front=test://?width=160&height=120&fps=10",
        "--source", "rear=test://?width=160&height=120&fps=10", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--device-id", "cam1", "--jsonl", jsonl,
        "--mqtt", "mqtt://cam1:{}@127.0.0.1:{}".format(USERS["cam1"], port)],
        "health: {interval: 1}\n")
    try:
        def has(topic_suffix):
            return lambda: "edge/cam1/" + topic_suffix in robot_reader.topics_received()
        for suffix in ("status", "health", "detections/front", "detections/rear"):
            assert wait(has(suffix), 60, proc), (suffix, log(tmp_path))
        assert "edge/cam1/detections" not in robot_reader.topics_received()
        robot.publish("edge/cam1/cmd/ping", json.dumps({"id": "from-robot"}).encode())
        operator.client.publish("edge/cam1/cmd/ping", json.dumps({"id": "from-op"}).encode(),
                                qos=1)
        assert wait(lambda: operator.received("edge/cam1/reply/from-op"), 15, proc), \
            log(tmp_path)
        reply = json.loads(operator.received("edge/cam1/reply/from-op")[0])
        assert reply["ok"] and reply["result"]["pong"] is True
        time.sleep(0.5)
        assert operator.received("edge/cam1/reply/from-robot") == []
        assert "from-robot" not in log(tmp_path)
        # The broker's message_size_limit: a 20 MB "command" never reaches the device (which
        # would buffer it whole before refusing it); the next one is answered as usual.
        operator.client.publish("edge/cam1/cmd/ping", json.dumps(
            {"id": "huge", "pad": "x" * (20 << 20)}).encode(), qos=1)
        operator.client.publish("edge/cam1/cmd/ping", json.dumps({"id": "after"}).encode(),
                                qos=1)
        assert wait(lambda: operator.received("edge/cam1/reply/after"), 15, proc), log(tmp_path)
        # (a too_large reply would go to reply/unknown: the id is never parsed)
        assert operator.received("edge/cam1/reply/unknown") == []
        # The fleet-wide health request: one message on edge/_all/cmd/health from an
        # operator reaches the device, which answers on edge/_health/<session>/cam1 (the ACL
        # lets it write there); a robot's never reaches it. `edge health --all` as operator.
        fleet = clients(port, "operator-1", topics=["edge/_health/#"])
        robot.publish("edge/_all/cmd/health", json.dumps(
            {"id": "robot", "reply_to": "edge/_health/robot"}).encode())
        fleet.publish("edge/_all/cmd/health", json.dumps(
            {"id": "fleet", "reply_to": "edge/_health/acl"}).encode())
        assert wait(lambda: fleet.received("edge/_health/acl/cam1"), 15, proc), log(tmp_path)
        reply = json.loads(fleet.received("edge/_health/acl/cam1")[0])
        assert reply["ok"] and reply["result"]["device"] == "cam1"
        time.sleep(0.5)
        assert fleet.received("edge/_health/robot/cam1") == []
        proc_health = subprocess.run(
            [sys.executable, "-m", "edge", "health", "--all", "--json", "--timeout", "10",
             "--mqtt", "mqtt://operator-2:{}@127.0.0.1:{}".format(USERS["operator-2"], port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        results = json.loads(proc_health.stdout)
        assert proc_health.returncode == 0 and list(results) == ["cam1"], proc_health.stderr
        assert read_jsonl(jsonl)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)


def wait(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def log(tmp_path):
    return open(str(tmp_path / "edge.log"), errors="replace").read()
