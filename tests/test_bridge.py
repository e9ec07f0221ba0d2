"""The broker cluster example (systemd/mosquitto-site.conf -> mosquitto-central.conf) on two
real Mosquitto brokers: a device on the site broker (its own credentials, ACL %u), the
bridge over TLS with the site's credentials (central ACL), `edge health --all` and a robot's
subscriber on the central broker, and no QoS 1 message lost across a restart of the site
broker, which holds the bridge.

The shipped files are used as they are except for ports, paths, the central broker's address
and the site's password; the bridge's restart_timeout is shortened from 2-30 s to 1-2 s so
the test does not wait for its back-off.
"""

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

from tests.conftest import ROOT, free_port, mosquitto_binary
from tools.soak import delivery, read_jsonl, start_edge, start_mosquitto
from tools.soak import wait_until as wait

pytestmark = pytest.mark.skipif(not shutil.which("openssl") or not shutil.which(
    "mosquitto_passwd") or not mosquitto_binary(), reason="needs openssl and mosquitto")

SYSTEMD = os.path.join(ROOT, "systemd")
SITE_USERS = {"cam1": "cam1-secret"}
CENTRAL_USERS = {"site-a": "site-a-secret", "robot-arm": "robot-secret",
                 "operator-1": "operator-secret"}


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def passwords(path, users):
    for i, (user, password) in enumerate(sorted(users.items())):
        subprocess.check_call(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) +
                              [path, user, password])


def shipped(name, replacements):
    """A shipped file with each (regex, value) replaced exactly once."""
    text = open(os.path.join(SYSTEMD, name)).read()
    for pattern, value in replacements:
        text, count = re.subn(pattern, lambda m: value, text)
        assert count == 1, (name, pattern)
    return text


class Broker:
    """mosquitto with a given config on 127.0.0.1:port; stop and start keep the port."""

    def __init__(self, folder, name, port, conf):
        self.folder, self.name, self.port = folder, name, port
        self.conf = os.path.join(folder, name + ".conf")
        # As root, mosquitto switches to the `mosquitto` user, which cannot read the private
        # temporary folder; stay root there (ignored when not run as root).
        open(self.conf, "w").write(conf + "\nuser root\n")
        self.proc = None

    def log(self):
        return open(os.path.join(self.folder, self.name + ".log"), errors="replace").read()

    def start(self):
        try:
            self.proc = start_mosquitto(self.conf, self.port,
                                        os.path.join(self.folder, self.name + ".log"), 15)
        except RuntimeError:
            pytest.fail("{} did not start: {}".format(self.name, self.log()))
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()       # SIGTERM: persistence is saved
            self.proc.wait(15)


class Central:
    """A subscriber on the central broker over TLS as `user`: persistent session, QoS 1."""

    def __init__(self, port, ca, topics, user="robot-arm"):
        import paho.mqtt.client as paho
        self.messages = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        client_id = "{}-1".format(user)
        if hasattr(paho, "CallbackAPIVersion"):
            self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      clean_session=False, protocol=paho.MQTTv311)
        else:
            self.client = paho.Client(client_id=client_id, clean_session=False,
                                      protocol=paho.MQTTv311)
        self.client.username_pw_set(user, CENTRAL_USERS[user])
        self.client.tls_set(ca_certs=ca)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(
            [(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def seqs(self):
        with self.lock:
            return [json.loads(p)["seq"] for t, p in self.messages if t.endswith("/detections")]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def cluster(tmp_path):
    d = str(tmp_path)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=edge-central-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
            "central.key", "-out", "central.csr", cwd=d)
    with open(os.path.join(d, "central.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "central.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "central.crt", "-extfile", "central.ext",
            cwd=d)
    os.chmod(os.path.join(d, "central.key"), 0o644)
    central_dir, site_dir = os.path.join(d, "central"), os.path.join(d, "site")
    os.makedirs(central_dir)
    os.makedirs(site_dir)
    passwords(os.path.join(central_dir, "passwd"), CENTRAL_USERS)
    passwords(os.path.join(site_dir, "passwd"), SITE_USERS)
    shutil.copy(os.path.join(SYSTEMD, "mosquitto-central-acl"), os.path.join(central_dir, "acl"))
    shutil.copy(os.path.join(SYSTEMD, "mosquitto-acl"), os.path.join(site_dir, "acl"))
    central_port, site_port = free_port(), free_port()
    central = Broker(central_dir, "central", central_port, shipped("mosquitto-central.conf", [
        (r"(?m)^listener 8883$", "listener {} 127.0.0.1".format(central_port)),
        (r"(?m)^password_file .*$", "password_file " + os.path.join(central_dir, "passwd")),
        (r"(?m)^acl_file .*$", "acl_file " + os.path.join(central_dir, "acl")),
        (r"(?m)^cafile .*$", "cafile " + os.path.join(d, "ca.crt")),
        (r"(?m)^certfile .*$", "certfile " + os.path.join(d, "central.crt")),
        (r"(?m)^keyfile .*$", "keyfile " + os.path.join(d, "central.key")),
        (r"(?m)^persistence_location .*$", "persistence_location {}/".format(central_dir))]))
    site_conf = shipped("mosquitto.conf", [
        (r"(?m)^listener 1883$", "listener {} 127.0.0.1".format(site_port)),
        (r"(?m)^password_file .*$", "password_file " + os.path.join(site_dir, "passwd")),
        (r"(?m)^acl_file .*$", "acl_file " + os.path.join(site_dir, "acl")),
        (r"(?m)^persistence_location .*$", "persistence_location {}/".format(site_dir))])
    site_conf += "\n" + shipped("mosquitto-site.conf", [
        (r"(?m)^address .*$", "address 127.0.0.1:{}".format(central_port)),
        (r"(?m)^bridge_cafile .*$", "bridge_cafile " + os.path.join(d, "ca.crt")),
        (r"(?m)^remote_password .*$", "remote_password " + CENTRAL_USERS["site-a"]),
        (r"(?m)^restart_timeout .*$", "restart_timeout 1 2")])
    site = Broker(site_dir, "site", site_port, site_conf)
    central.start()
    site.start()
    yield central, site, d
    site.stop()
    central.stop()


def test_a_site_bridged_to_the_central_broker(cluster, tmp_path, model_dir):
    central, site, d = cluster
    ca = os.path.join(d, "ca.crt")
    robot = Central(central.port, ca, ["edge/+/detections", "edge/+/status"])
    # The bridge is up: its link state, which the central ACL lets it write by its client id
    # (%c), says 1 (retained).
    link = Central(central.port, ca, ["$SYS/broker/connection/site-a/state"], "operator-1")
    assert wait(lambda: (b"1" in [p for _, p in link.messages]), 20), central.log()
    link.close()
    jsonl = str(tmp_path / "out.jsonl")
    proc = start_edge(str(tmp_path), [
        "--source", "test://?width=160&height=120&fps=20", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--device-id", "cam1", "--jsonl", jsonl,
        "--mqtt", "mqtt://cam1:{}@127.0.0.1:{}?qos=1".format(SITE_USERS["cam1"], site.port)],
        "health: {interval: 1}\n")
    try:
        assert wait(lambda: len(robot.seqs()) >= 10, 60), \
            open(str(tmp_path / "edge.log")).read() + site.log()
        # An operator on the central broker asks the whole fleet: the broadcast goes in over
        # the bridge, the device's answer comes out on edge/_health/<session>/cam1.
        password = str(tmp_path / "operator.password")
        open(password, "w").write(CENTRAL_USERS["operator-1"] + "\n")
        health = subprocess.run(
            [sys.executable, "-m", "edge", "health", "--all", "--json", "--timeout", "20",
             "--mqtt", "mqtts://127.0.0.1:{}".format(central.port), "--username",
             "operator-1", "--password-file", password, "--ca-file", ca],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        results = json.loads(health.stdout)
        assert health.returncode == 0 and list(results) == ["cam1"], health.stderr
        assert results["cam1"]["healthy"] and results["cam1"]["report"]["device"] == "cam1"
        # The site broker (and with it the bridge) restarts while the device publishes.
        before = len(robot.seqs())
        site.stop()
        time.sleep(2)
        site.start()
        assert wait(lambda: len(robot.seqs()) > before + 20, 60), site.log()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, open(str(tmp_path / "edge.log")).read()
    sent = [m["seq"] for m in read_jsonl(jsonl)]
    assert wait(lambda: set(sent) <= set(robot.seqs()), 30), \
        delivery(sent, robot.seqs())["lost"][:20]
    result = delivery(sent, robot.seqs())
    assert result["lost"] == [] and result["unexpected"] == [], result
    with robot.lock:
        statuses = [json.loads(p) for t, p in robot.messages if t == "edge/cam1/status"]
    assert statuses[-1]["state"] == "offline" and statuses[-1]["reason"] == "stopped"
    robot.close()
