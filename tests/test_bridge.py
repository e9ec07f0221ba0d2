"""The broker cluster example (systemd/mosquitto-site.conf -> mosquitto-central.conf) on two
real Mosquitto brokers: devices on the site broker (their own credentials, mosquitto-acl), the
bridge over TLS with the site's credentials (mosquitto-central-acl), robots and operators on
the central broker. Every topic of the API document crosses the bridge to the accounts meant
to read it; another site's credentials neither read this site's commands nor write its
devices' topics; no account takes the bridge's client id or writes its link state; and, with
a real device, `edge health --all` at the centre and no QoS 1 message lost across a restart
of the site broker, which holds the bridge.

The shipped files are used as they are except for ports, paths, the central broker's address
and the site's password; the bridge's restart_timeout is shortened from 2-30 s to 1-2 s so
the test does not wait for its back-off.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, free_port, mosquitto_binary
from tests.test_acl import USERS, Client, api_topics, password_file, shipped
from tools.soak import delivery, read_jsonl, start_edge, start_mosquitto
from tools.soak import wait_until as wait

pytestmark = pytest.mark.skipif(not shutil.which("openssl") or not shutil.which(
    "mosquitto_passwd") or not mosquitto_binary(), reason="needs openssl and mosquitto")

SYSTEMD = os.path.join(ROOT, "systemd")
SITE_USERS = {name: USERS[name] for name in ("cam1", "cam2")}
CENTRAL_USERS = {name: USERS[name] for name in ("site-a", "site-b", "robot-arm", "robot-cart",
                                                "operator-1", "operator-2")}
LINK = "$SYS/broker/connection/site-a/state"


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


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


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA and the central broker's certificate for 127.0.0.1: (folder, ca.crt)."""
    d = str(tmp_path_factory.mktemp("certs"))
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
    return d, os.path.join(d, "ca.crt")


@pytest.fixture
def cluster(tmp_path, certs):
    d, ca = certs
    central_dir, site_dir = str(tmp_path / "central"), str(tmp_path / "site")
    os.makedirs(central_dir)
    os.makedirs(site_dir)
    password_file(os.path.join(central_dir, "passwd"), CENTRAL_USERS)
    password_file(os.path.join(site_dir, "passwd"), SITE_USERS)
    shutil.copy(os.path.join(SYSTEMD, "mosquitto-central-acl"), os.path.join(central_dir, "acl"))
    shutil.copy(os.path.join(SYSTEMD, "mosquitto-acl"), os.path.join(site_dir, "acl"))
    central_port, site_port = free_port(), free_port()
    central = Broker(central_dir, "central", central_port, shipped("mosquitto-central.conf", [
        (r"(?m)^listener 8883$", "listener {} 127.0.0.1".format(central_port)),
        (r"(?m)^password_file .*$", "password_file " + os.path.join(central_dir, "passwd")),
        (r"(?m)^acl_file .*$", "acl_file " + os.path.join(central_dir, "acl")),
        (r"(?m)^cafile .*$", "cafile " + ca),
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
        (r"(?m)^bridge_cafile .*$", "bridge_cafile " + ca),
        (r"(?m)^remote_password .*$", "remote_password " + CENTRAL_USERS["site-a"]),
        (r"(?m)^restart_timeout .*$", "restart_timeout 1 2")])
    site = Broker(site_dir, "site", site_port, site_conf)
    central.start()
    site.start()
    yield central, site, ca
    site.stop()
    central.stop()


@pytest.fixture
def clients():
    """make(port, user, ...): connected Clients, closed at the end."""
    made = []

    def make(*args, **kwargs):
        c = Client(*args, **kwargs).wait_ready()
        assert c.refused is None, (args, c.refused)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def link_up(central, ca, clients, user="operator-2"):
    """An operator's client on the central broker once the bridge says it is up (retained 1)."""
    watcher = clients(central.port, user, topics=[LINK], ca=ca)
    assert watcher.wait_for(LINK, b"1", 20), central.log()
    return watcher


def test_every_topic_crosses_the_bridge_to_the_accounts_meant_to_read_it(cluster, clients):
    """cam1 with two named cameras on the site broker: at the centre robots get results,
    events, depth, status and health of both cameras, operators those and the answers; the
    commands of an operator at the centre reach cam1, the fleet-wide one every device, and
    so does the `motion` a robot at the centre sends."""
    central, site, ca = cluster
    link_up(central, ca, clients)
    published, commands = api_topics("cam1")
    robot = clients(central.port, "robot-arm", topics=["edge/#"], ca=ca)
    operator = clients(central.port, "operator-1", topics=["edge/#"], ca=ca)
    cam1 = clients(site.port, "cam1", topics=["edge/#"])
    cam2 = clients(site.port, "cam2", topics=["edge/#"])
    for topic in published:
        cam1.publish(topic, topic.encode())
    cam1.publish("edge/cam1/status", b"end")
    assert robot.wait_for("edge/cam1/status", b"end") and operator.wait_for(
        "edge/cam1/status", b"end"), site.log() + central.log()
    assert operator.topics_received() == list(published) + ["edge/cam1/status"]
    assert robot.topics_received() == [t for t, robots in published.items() if robots] + [
        "edge/cam1/status"]
    for topic in commands:
        operator.publish(topic, topic.encode())
    operator.publish("edge/cam2/cmd/ping", b"end")
    assert cam2.wait_for("edge/cam2/cmd/ping", b"end") and cam1.wait_for(
        commands[-1], commands[-1].encode())
    time.sleep(0.2)
    assert cam1.topics_received() == commands
    assert cam2.topics_received() == [t for t in commands if "/_all/" in t] + [
        "edge/cam2/cmd/ping"]
    motions = api_topics("cam1", clients="robots")[1]
    sender = clients(central.port, "robot-cart", ca=ca)
    for topic in motions:
        sender.publish(topic, topic.encode())
    sender.publish("edge/cam2/motion", b"end")
    assert cam2.wait_for("edge/cam2/motion", b"end") and cam1.wait_for(
        motions[-1], motions[-1].encode())
    time.sleep(0.2)
    assert cam1.topics_received() == commands + motions
    assert cam2.topics_received()[-1] == "edge/cam2/motion"
    assert robot.topics_received()[-1] == "edge/cam1/status", "robots read no motion"


def test_a_site_reads_and_writes_its_own_devices_only(cluster, clients):
    """site-b's credentials at the centre (a compromised site broker): cam1's commands (site-a's)
    never reach it, its writes to cam1's topics, cam1's `edge health` answers and site-a's
    link state reach nobody; its own device cam3's go through."""
    central, site, ca = cluster
    watcher = link_up(central, ca, clients)
    operator = clients(central.port, "operator-1", topics=["edge/#", "$SYS/broker/#"], ca=ca)
    robot = clients(central.port, "robot-arm", topics=["edge/#"], ca=ca)
    site_b = clients(central.port, "site-b", topics=["edge/#", "$SYS/#"], ca=ca)
    cam1 = clients(site.port, "cam1", topics=["edge/cam1/cmd/#"])
    for device in ("cam1", "cam3"):
        operator.publish("edge/{}/cmd/ping".format(device), device.encode())
    operator.publish("edge/_all/cmd/ping", b"all")
    assert cam1.wait_for("edge/cam1/cmd/ping", b"cam1"), "site-a reads its device's command"
    assert site_b.wait_for("edge/_all/cmd/ping", b"all")
    assert site_b.topics_received() == ["edge/cam3/cmd/ping", "edge/_all/cmd/ping"]

    forged = b'{"v": 1, "device": "cam1", "state": "offline", "forged": true}'
    for topic in api_topics("cam1")[0]:
        site_b.publish(topic, forged, retain=topic.endswith("/status"))
    site_b.publish(LINK, b"0", retain=True)
    site_b.publish("$SYS/broker/connection/site-b/state", b"1", retain=True)
    site_b.publish("edge/cam3/status", b"cam3", retain=True)
    assert robot.wait_for("edge/cam3/status", b"cam3")
    assert operator.wait_for("edge/cam3/status", b"cam3")
    time.sleep(0.2)
    assert robot.received() == [b"cam3"]
    with operator.lock:
        states = [(t, p) for t, p, _ in operator.messages if t.startswith("$SYS/")]
        forgeries = [t for t, p, _ in operator.messages if p == forged]
    assert forgeries == []
    assert states == [(LINK, b"1"), ("$SYS/broker/connection/site-b/state", b"1")]
    assert watcher.received(LINK) == [b"1"]


def test_no_account_takes_the_bridges_client_id(cluster, clients):
    """An account connecting with client id site-a (robot-cart, site-b's bridge credentials)
    gets its own user name as client id: the bridge stays connected, its link state stays 1."""
    central, site, ca = cluster
    watcher = link_up(central, ca, clients)
    operator = clients(central.port, "operator-1", topics=["edge/+/status"], ca=ca)
    cam1 = clients(site.port, "cam1")
    for user in ("robot-cart", "site-b"):
        for attempt in range(3):
            intruder = clients(central.port, user, client_id="site-a", ca=ca,
                               clean_session=False)
            intruder.publish(LINK, b"0", retain=True)
            intruder.close()
    payload = b'{"after": "intruders"}'
    cam1.publish("edge/cam1/status", payload)
    assert operator.wait_for("edge/cam1/status", payload), site.log()
    assert watcher.received(LINK) == [b"1"]
    assert "already connected" not in central.log(), central.log()
    assert site.log().count("Connecting bridge (step 1)") == 1, site.log()


def test_a_site_bridged_to_the_central_broker(cluster, tmp_path, model_dir):
    central, site, ca = cluster
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
