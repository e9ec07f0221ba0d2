"""What a command may cost a running `edge run`, on a real broker: a huge message costs no
memory whatever the MQTT protocol, a camera with no frame to give answers a snapshot at once
and holds up no health probe, and a broker that stays down is logged once per cause with a
reminder now and then, not once per attempt."""

import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from edge import mqtt
from tests.conftest import ROOT, Broker, free_port, paho_env
from tools.soak import stop_edge, wait_until

# A command this size grew the daemon's peak RSS by 3 to 4 times as much before the MQTT
# link bounded what it reads (VmHWM +324 MB for 100 MB with paho 2.2); now it costs nothing.
HUGE = 64 << 20


class Replies:
    """A paho client recording (arrival monotonic s, topic, payload) under `edge/{device}/`."""

    def __init__(self, port, device):
        self.messages = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.make_client("replies-{}".format(time.monotonic_ns()))
        self.client.on_connect = lambda c, *a: c.subscribe("edge/{}/#".format(device), 1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert ready.wait(5)
        self.device = device

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((time.monotonic(), message.topic, message.payload))

    def reply(self, request_id):
        """(arrival monotonic s, reply dict) of the reply to `request_id`, or None."""
        topic = "edge/{}/reply/{}".format(self.device, request_id)
        with self.lock:
            found = [(t, json.loads(p)) for t, top, p in self.messages if top == topic]
        return found[0] if found else None

    def online(self):
        with self.lock:
            return any(top.endswith("/status") and json.loads(p)["state"] in
                       ("online", "degraded") for _, top, p in self.messages)

    def send(self, name, request, qos=1):
        """Publish a request; the monotonic time it was sent."""
        sent = time.monotonic()
        self.client.publish("edge/{}/cmd/{}".format(self.device, name), json.dumps(request),
                            qos=qos)
        return sent

    def ask(self, name, request, timeout=10):
        """(seconds until the reply, reply dict) of a request; fails without one."""
        sent = self.send(name, request)
        assert wait_until(lambda: self.reply(request["id"]), timeout), \
            "no reply to " + request["id"]
        arrived, reply = self.reply(request["id"])
        return arrived - sent, reply

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def start_edge(tmp_path, broker, device, config, source_args, env=None):
    cfg = tmp_path / "edge-{}.yaml".format(device)
    cfg.write_text(config)
    log = open(str(tmp_path / "edge-{}.log".format(device)), "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "-c", str(cfg)] + source_args +
        ["--mqtt", broker.url, "--device-id", device,
         "--state-dir", str(tmp_path / "state-{}".format(device))],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def log_of(tmp_path, device):
    return open(str(tmp_path / "edge-{}.log".format(device))).read()


def vm_mib(pid, key):
    """VmRSS / VmHWM (peak RSS) of a process, MiB."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no {} in /proc/{}/status".format(key, pid))


def _remaining_length(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_string(text):
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def publish_raw(port, topic, request_id, size):
    """Publish `{"id": request_id, "pad": "xxx..."}` of `size` bytes at QoS 1 over a plain
    MQTT 3.1.1 socket, streaming the payload: paho copies the rest of a packet on every
    partial send, which makes a 64 MB publish take many seconds in the sender alone."""
    head = '{{"id": "{}", "pad": "'.format(request_id).encode()
    tail = b'"}'
    pad = size - len(head) - len(tail)
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        body = _mqtt_string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + \
            _mqtt_string("huge-{}".format(time.monotonic_ns()))
        sock.sendall(bytes([0x10]) + _remaining_length(len(body)) + body)
        assert sock.recv(4) == b"\x20\x02\x00\x00", "CONNACK"
        variable = _mqtt_string(topic) + struct.pack("!H", 1)       # packet id 1
        sock.sendall(bytes([0x32]) + _remaining_length(len(variable) + size) + variable + head)
        chunk = b"x" * (1 << 20)
        while pad > 0:
            sock.sendall(chunk[:pad])
            pad -= len(chunk)
        sock.sendall(tail)
        assert sock.recv(4) == b"\x40\x02\x00\x01", "PUBACK"
        sock.sendall(b"\xe0\x00")                                   # DISCONNECT


@pytest.mark.parametrize("protocol, paho", [("3.1.1", "venv"), ("5", "venv"),
                                            ("3.1.1", "1.5.1"), ("5", "1.6.1")])
def test_a_huge_command_costs_the_daemon_no_memory(broker, tmp_path, model_dir, protocol, paho):
    """The test broker has no message limit (as a broker configured by someone else may
    not): a 64 MB command reaches the device, which reads it in chunks, keeps 72 KiB of it
    and answers too_large with its real size. With MQTT 5 it no longer asks the broker for a
    maximum packet size: Mosquitto 2.0 would stop sending it QoS 1 messages after 20
    refused ones, and the device's commands with them."""
    device = "big" + protocol.replace(".", "") + paho.replace(".", "")
    proc = start_edge(tmp_path, broker, device, "mqtt: {{protocol: '{}'}}\n".format(protocol),
                      ["--source", "test://?width=160&height=120&fps=10",
                       "--detector", "yolox-nano", "--model-dir", model_dir],
                      env=paho_env(paho))
    replies = Replies(broker.port, device)
    try:
        assert wait_until(replies.online, 60), log_of(tmp_path, device)
        replies.ask("ping", {"id": "warm"})
        time.sleep(1.0)                         # engines loaded, frames flowing
        peak = vm_mib(proc.pid, "VmHWM")
        publish_raw(broker.port, "edge/{}/cmd/ping".format(device), "huge", HUGE)
        seconds, reply = replies.ask("ping", {"id": "after"}, timeout=60)
        assert reply["ok"], reply
        grown = vm_mib(proc.pid, "VmHWM") - peak
        refused = replies.reply("unknown")      # (its id is never parsed)
        assert refused is not None and refused[1]["error"] == {
            "code": "too_large", "message": "request of {} bytes; the limit is 65536".format(
                HUGE)}
        print("{}: a {} MiB command grew the daemon's peak RSS by {:.1f} MiB (from {:.0f})"
              .format(protocol, HUGE >> 20, grown, peak))
        assert grown < 16, "peak RSS grew {:.0f} MiB for a {} MiB command".format(
            grown, HUGE >> 20)
        # Twenty-five oversized QoS 1 commands, then a ping: answered (each of those was
        # read and refused by the device, none held back in the broker's inflight window).
        for i in range(25):
            replies.client.publish("edge/{}/cmd/ping".format(device),
                                   json.dumps({"id": "o{}".format(i), "pad": "x" * 100000}),
                                   qos=1)
        replies.ask("ping", {"id": "after-many"}, timeout=20)
    finally:
        replies.close()
        stop_edge(proc, 20)
    assert "Traceback" not in log_of(tmp_path, device)


# -- snapshots of a camera that gives no frame -------------------------------------------

@pytest.mark.timing      # reply times within 2 s: alone, not beside other workers
def test_snapshots_of_a_camera_without_frames_fail_fast_and_never_slow_health(
        broker, tmp_path, model_dir):
    """A camera that never delivers (an HTTP camera nobody serves, beside a working one):
    snapshots of it twice a second are answered `unavailable` at once, naming it, and
    health probes meanwhile take as long as without them (it was 5 s: each snapshot waited
    5 s for a frame in the thread that answers health probes too)."""
    dead = "http://127.0.0.1:{}/stream.mjpg".format(free_port())
    proc = start_edge(tmp_path, broker, "snap", "sources:\n"
                      "  - {name: front, uri: 'test://?width=160&height=120&fps=10'}\n"
                      "  - {name: web, uri: '" + dead + "'}\n",
                      ["--detector", "yolox-nano", "--model-dir", model_dir])
    replies = Replies(broker.port, "snap")
    try:
        assert wait_until(replies.online, 60), log_of(tmp_path, "snap")
        # (`unavailable` until the front camera's first frame, after the engines load)
        attempts = iter(range(100))
        assert wait_until(lambda: replies.ask("snapshot", {
            "id": "front{}".format(next(attempts)), "camera": "front"})[1]["ok"], 30)
        baseline = [replies.ask("health", {"id": "b{}".format(i)})[0] for i in range(4)]
        snapshots, probes = [], []
        for i in range(10):                     # 5 s: a snapshot and a probe every 0.5 s
            snapshots.append(("s{}".format(i), replies.send(
                "snapshot", {"id": "s{}".format(i), "camera": "web"})))
            probes.append(("h{}".format(i), replies.send("health", {"id": "h{}".format(i)})))
            time.sleep(0.5)
        assert wait_until(lambda: all(replies.reply(i) for i, _ in snapshots + probes), 15)
        health_s = [replies.reply(i)[0] - sent for i, sent in probes]
        snapshot_s = [replies.reply(i)[0] - sent for i, sent in snapshots]
        print("health reply s, alone:", [round(s, 2) for s in baseline],
              "beside snapshots:", [round(s, 2) for s in health_s],
              "snapshot reply s:", [round(s, 2) for s in snapshot_s])
        for request_id, _ in snapshots:
            error = replies.reply(request_id)[1]["error"]
            assert error["code"] == "unavailable" and error["message"].startswith(
                "camera 'web': no frame has arrived yet (reconnecting: "), error
        assert max(snapshot_s) < 2.0, snapshot_s
        assert max(health_s) < max(2.0, 3 * max(baseline)), (baseline, health_s)
    finally:
        replies.close()
        stop_edge(proc, 20)
    assert "Traceback" not in log_of(tmp_path, "snap")


@pytest.mark.timing      # reply times within 2 s: alone, not beside other workers
def test_a_snapshot_waiting_for_a_stalled_camera_holds_up_no_health_probe(
        broker, tmp_path, model_dir):
    """An HTTP camera that stops sending mid-stream (SIGSTOP: the connection stays open, so
    the camera stays `open` until its read times out): a snapshot waits for its next frame,
    in a thread of its own; a health probe sent after it is answered first."""
    from tests.test_faults import start_camera
    port = free_port()
    camera = start_camera(port)
    proc = start_edge(tmp_path, broker, "stall", "",
                      ["--source", "http://127.0.0.1:{}/stream.mjpg".format(port),
                       "--detector", "yolox-nano", "--model-dir", model_dir])
    replies = Replies(broker.port, "stall")
    try:
        assert wait_until(replies.online, 60), log_of(tmp_path, "stall")
        attempts = iter(range(100))
        assert wait_until(lambda: replies.ask("snapshot", {"id": "before{}".format(
            next(attempts))})[1]["ok"], 30)
        camera.send_signal(signal.SIGSTOP)
        time.sleep(1.0)                          # what was in flight has been read
        snapshot_sent = replies.send("snapshot", {"id": "waits"})
        time.sleep(0.3)
        seconds, reply = replies.ask("health", {"id": "probe"})
        assert wait_until(lambda: replies.reply("waits"), 15)
        snapshot_at, snapshot = replies.reply("waits")
        print("health answered in {:.2f} s; the snapshot in {:.2f} s: {}".format(
            seconds, snapshot_at - snapshot_sent, snapshot.get("error")))
        assert reply["ok"] and seconds < 2.0, seconds
        assert snapshot_at - snapshot_sent > 2.0, "the camera still delivered: no stall"
        assert snapshot["error"]["code"] == "unavailable", snapshot
    finally:
        camera.send_signal(signal.SIGCONT)
        camera.kill()
        camera.wait()
        replies.close()
        stop_edge(proc, 20)
    assert "Traceback" not in log_of(tmp_path, "stall")


# -- a broker that stays down ----------------------------------------------------------

def mqtt_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "edge.mqtt" and r.levelno == logging.WARNING]


def test_a_broker_down_is_logged_once_per_cause_then_reminded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edge.mqtt")
    port = free_port()
    link = mqtt.MqttLink(mqtt.parse_url("mqtt://127.0.0.1:{}".format(port)), "logs")
    link.client.reconnect_delay_set(1, 1)
    link.remind_s = 2.5
    link.start()
    broker = Broker(str(tmp_path), port)
    try:
        def reminders():
            return [w for w in mqtt_warnings(caplog) if "still cannot reach the broker" in w]
        assert wait_until(reminders, 15), mqtt_warnings(caplog)      # attempts every second
        warnings = mqtt_warnings(caplog)
        refused = [w for w in warnings if "connection refused by 127.0.0.1:{}".format(port) in w]
        reminders = reminders()
        assert len(refused) - len(reminders) == 1, warnings    # logged once as it came
        assert reminders and "failed attempts): connection refused" in reminders[0], warnings
        assert len(warnings) == len(refused), warnings
        broker.start()
        assert link.connected.wait(10)
        connected = [r.getMessage() for r in caplog.records if "connected to" in
                     r.getMessage()]
        assert connected and "down (" in connected[-1] and "failed attempts)" in connected[-1]
    finally:
        link.stop(timeout=2)
        broker.stop()


def test_a_server_that_closes_before_connack_is_logged_once(caplog):
    """Something that accepts and hangs up (not a broker, a broker at max_connections):
    said once, not silently retried forever."""
    caplog.set_level(logging.INFO, logger="edge.mqtt")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stopping = threading.Event()
    accepted = []

    def hang_up():
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            conn.recv(1024)
            conn.close()
            accepted.append(1)
    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    link = mqtt.MqttLink(mqtt.parse_url("mqtt://127.0.0.1:{}".format(
        server.getsockname()[1])), "closed")
    link.client.reconnect_delay_set(1, 1)
    link.start()
    try:
        assert wait_until(lambda: len(accepted) >= 3, 15), accepted
        time.sleep(0.2)
        warnings = mqtt_warnings(caplog)
        assert len(warnings) == 1 and "closed before the broker answered CONNECT" in \
            warnings[0], warnings
        assert link.last_error and "closed before" in link.last_error
    finally:
        link.client.loop_stop()
        stopping.set()
        thread.join(2)
        server.close()

