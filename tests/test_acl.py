"""The broker ACL example (systemd/mosquitto.conf, systemd/mosquitto-acl) on a real Mosquitto.

The shipped files are used as they are, with the listener moved to a free loopback port and
the paths moved to a temporary folder; passwords come from `mosquitto_passwd`. A real
`edge run` logs in as device cam1. Mosquitto acknowledges a publish the ACL forbids and drops
it (MQTT 3.1.1 has no error for it), so every check is on delivery: a forbidden message is
followed by an allowed one on the same topic, and the subscriber must get only the latter.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, free_port, mosquitto_binary
from tools.soak import read_jsonl, start_edge

USERS = {"cam1": "cam1-secret", "cam2": "cam2-secret", "robot-arm": "robot-secret",
         "operator-1": "operator-secret"}


class Client:
    """A paho client logged in as `user`, recording what it receives."""

    def __init__(self, port, user, password=None, topics=()):
        import paho.mqtt.client as paho
        from edge.mqtt import make_client
        self.messages = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.refused = None
        self.topics = list(topics)
        self.client = make_client("acl-{}-{}".format(user, time.monotonic_ns()))
        self.client.username_pw_set(user, USERS.get(user) if password is None else password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert paho is not None

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

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def wait_ready(self):
        assert self.ready.wait(10), "no CONNACK/SUBACK"
        return self

    def publish(self, topic, payload):
        """Publish with QoS 1 and wait for the broker's PUBACK (sent even when it drops it)."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def received(self, topic=None):
        with self.lock:
            return [p for t, p in self.messages if topic is None or t == topic]

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


@pytest.fixture
def acl_broker(tmp_path):
    """Mosquitto with the shipped configuration and ACL, on a free port."""
    binary = mosquitto_binary()
    passwd = shutil.which("mosquitto_passwd")
    if binary is None or passwd is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed (apt-get install mosquitto)")
    password_file = str(tmp_path / "edge.passwd")
    for i, (user, password) in enumerate(sorted(USERS.items())):
        subprocess.check_call([passwd, "-b"] + (["-c"] if i == 0 else []) +
                              [password_file, user, password])
    acl = str(tmp_path / "edge-acl")
    shutil.copy(os.path.join(ROOT, "systemd", "mosquitto-acl"), acl)
    port = free_port()
    conf = open(os.path.join(ROOT, "systemd", "mosquitto.conf")).read()
    replacements = [(r"(?m)^listener 1883$", "listener {} 127.0.0.1".format(port)),
                    (r"(?m)^password_file .*$", "password_file " + password_file),
                    (r"(?m)^acl_file .*$", "acl_file " + acl),
                    (r"(?m)^persistence_location .*$",
                     "persistence_location {}/".format(tmp_path))]
    for pattern, value in replacements:
        conf, count = re.subn(pattern, value, conf)
        assert count == 1, pattern
    conf_path = str(tmp_path / "mosquitto.conf")
    # As root, mosquitto switches to the `mosquitto` user, which cannot read the private
    # temporary folder; stay root there (ignored when not run as root).
    open(conf_path, "w").write(conf + "\nuser root\n")
    log = open(str(tmp_path / "mosquitto.log"), "wb")
    proc = subprocess.Popen([binary, "-c", conf_path], stdout=log, stderr=subprocess.STDOUT)
    import socket
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mosquitto did not start: " + open(str(tmp_path /
                                                                   "mosquitto.log")).read())
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)
    log.close()


def test_robot_cannot_command_device_cannot_write_another_operator_can(acl_broker, tmp_path,
                                                                      model_dir):
    port = acl_broker
    clients = []

    def client(*args, **kwargs):
        c = Client(port, *args, **kwargs).wait_ready()
        clients.append(c)
        return c

    try:
        # Nobody gets in without a password.
        # CONNACK 4/5 (paho 2 reports MQTT 5 reason codes 134/135 for them).
        refused = (4, 5, 134, 135)
        for user, password in (("nobody", "x"), ("robot-arm", "wrong")):
            stranger = Client(port, user, password).wait_ready()
            stranger.close()
            assert stranger.refused in refused, user

        # Commands: the device and an operator watch cam1's command topic.
        cam1 = client("cam1", topics=["edge/cam1/cmd/#"])
        watcher = client("operator-1", topics=["edge/+/cmd/#"])
        robot = client("robot-arm")
        operator = client("operator-1")
        robot.publish("edge/cam1/cmd/reload", b'{"id": "robot"}')
        operator.publish("edge/cam1/cmd/reload", b'{"id": "operator"}')
        for observer in (cam1, watcher):
            assert observer.wait_for("edge/cam1/cmd/reload", b'{"id": "operator"}'), \
                "an operator's command is delivered"
            assert observer.received("edge/cam1/cmd/reload") == [b'{"id": "operator"}'], \
                "a robot's command never reaches the device"

        # A device writes under its own id only: not another's results, nor its commands.
        cam2 = client("cam2", topics=["edge/cam2/cmd/#"])
        robot_reader = client("robot-arm", topics=["edge/+/detections", "edge/+/status"])
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
        spy = client("robot-arm", topics=["edge/cam1/cmd/#"])
        robot.publish("edge/cam1/detections", b'{"forged": "robot"}')
        operator.publish("edge/cam1/cmd/ping", b'{"id": "p"}')
        assert cam1.wait_for("edge/cam1/cmd/ping", b'{"id": "p"}')
        cam1.publish("edge/cam1/detections", b'{"real": "cam1"}')
        assert robot_reader.wait_for("edge/cam1/detections", b'{"real": "cam1"}')
        assert robot_reader.received("edge/cam1/detections") == [b'{"real": "cam1"}']
        time.sleep(0.2)
        assert spy.received() == [], "a robot cannot read commands"
    finally:
        for c in clients:
            c.close()

    # A real device behind the ACL: it publishes its status, health and detections under its
    # id, takes an operator's command and replies; a robot's command never reaches it.
    robot_reader = Client(port, "robot-arm", topics=["edge/cam1/#"]).wait_ready()
    operator = Client(port, "operator-1", topics=["edge/cam1/reply/#"]).wait_ready()
    robot = Client(port, "robot-arm").wait_ready()
    jsonl = str(tmp_path / "out.jsonl")
    proc = start_edge(str(tmp_path), [
        "--source", "test://?width=320&height=240&fps=10", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--device-id", "cam1", "--jsonl", jsonl,
        "--mqtt", "mqtt://cam1:{}@127.0.0.1:{}".format(USERS["cam1"], port)],
        "health: {interval: 1}\n")
    try:
        def has(topic_suffix):
            return lambda: any(t == "edge/cam1/" + topic_suffix for t, _ in
                               list(robot_reader.messages))
        for suffix in ("status", "health", "detections"):
            assert wait(has(suffix), 60, proc), (suffix, log(tmp_path))
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
        fleet = Client(port, "operator-1", topics=["edge/_health/#"]).wait_ready()
        try:
            robot.publish("edge/_all/cmd/health", json.dumps(
                {"id": "robot", "reply_to": "edge/_health/robot"}).encode())
            fleet.publish("edge/_all/cmd/health", json.dumps(
                {"id": "fleet", "reply_to": "edge/_health/acl"}).encode())
            assert wait(lambda: fleet.received("edge/_health/acl/cam1"), 15, proc), log(tmp_path)
            reply = json.loads(fleet.received("edge/_health/acl/cam1")[0])
            assert reply["ok"] and reply["result"]["device"] == "cam1"
            time.sleep(0.5)
            assert fleet.received("edge/_health/robot/cam1") == []
        finally:
            fleet.close()
        proc_health = subprocess.run(
            [sys.executable, "-m", "edge", "health", "--all", "--json", "--timeout", "10",
             "--mqtt", "mqtt://operator-1:{}@127.0.0.1:{}".format(USERS["operator-1"], port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        results = json.loads(proc_health.stdout)
        assert proc_health.returncode == 0 and list(results) == ["cam1"], proc_health.stderr
        assert read_jsonl(jsonl)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
        for c in (robot_reader, operator, robot):
            c.close()


def wait(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def log(tmp_path):
    return open(str(tmp_path / "edge.log"), errors="replace").read()
