"""The daemon under a service manager: the notify protocol on a real NOTIFY_SOCKET, signals,
no accepted message lost on SIGTERM, SIGHUP reload."""

import json
import os
import signal
import socket
import subprocess
import sys
import time


from tests.conftest import ROOT


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages = []        # (monotonic time, assignment)

    def drain(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            for line in data.splitlines():
                self.messages.append((time.monotonic(), line))

    def wait_for(self, prefix, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(m.startswith(prefix) for _, m in self.messages):
                return True
            self.drain(0.2)
        return False

    def count(self, prefix, since=0.0):
        return sum(1 for t, m in self.messages if m.startswith(prefix) and t >= since)


def start(tmp_path, model_dir, *extra, env=None, config="health: {interval: 1}\n"):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(config)
    full_env = dict(os.environ, **(env or {}))
    log = open(str(tmp_path / "edge.log"), "wb")
    args = [sys.executable, "-m", "edge", "run", "-c", str(cfg), "--detector", "yolox-nano",
            "--model-dir", model_dir, "--state-dir", str(tmp_path / "state")] + list(extra)
    return subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def log_text(tmp_path):
    return open(str(tmp_path / "edge.log")).read()


def test_ready_watchdog_while_frames_flow_and_stopping(tmp_path, model_dir):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    proc = start(tmp_path, model_dir, "--source", "test://?width=320&height=240&fps=20",
                 env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    try:
        assert notify.wait_for("READY=1", 30), log_text(tmp_path)
        ready_at = next(t for t, m in notify.messages if m == "READY=1")
        notify.drain(3)
        assert notify.count("WATCHDOG=1", ready_at) >= 4       # every 0.5 s while frames flow
        assert notify.count("STATUS=") >= 1
        assert any("detect" in m and "fps" in m for _, m in notify.messages
                   if m.startswith("STATUS="))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        notify.drain(0.3)
        assert notify.count("STOPPING=1") == 1
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watchdog_stops_when_inference_stalls(tmp_path, model_dir):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    proc = start(tmp_path, model_dir, "--source", "test://?width=320&height=240&fps=20",
                 env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000",
                      "EDGE_FAULT_STALL_AFTER_FRAMES": "30"})
    try:
        assert notify.wait_for("READY=1", 30), log_text(tmp_path)
        deadline = time.monotonic() + 20
        while "stalls" not in log_text(tmp_path) and time.monotonic() < deadline:
            notify.drain(0.2)
        assert "stalls" in log_text(tmp_path)
        notify.drain(1.0)                 # a ping already on its way may still arrive
        stalled = time.monotonic()
        notify.drain(3.0)
        assert notify.count("WATCHDOG=1", stalled) == 0, "a stalled pipeline is not pinged"
        assert proc.poll() is None        # systemd, not the daemon, decides to restart it
    finally:
        proc.kill()
        proc.wait()


def test_watchdog_is_fed_right_after_a_reload(tmp_path, model_dir):
    """The frame count restarts with the new pipeline; the watchdog must not wait until it
    passes the old one (systemd would kill a healthy daemon after every reload)."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    proc = start(tmp_path, model_dir, "--source", "test://?width=320&height=240&fps=20",
                 env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    try:
        assert notify.wait_for("READY=1", 30), log_text(tmp_path)
        notify.drain(6)                   # some 120 frames before the reload
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while notify.count("READY=1") < 2 and time.monotonic() < deadline:
            notify.drain(0.2)
        assert notify.count("RELOADING=1") == 1 and notify.count("READY=1") == 2, \
            log_text(tmp_path)
        ready_again = [t for t, m in notify.messages if m == "READY=1"][1]
        notify.drain(3)
        assert notify.count("WATCHDOG=1", ready_again) >= 4, "pings every 0.5 s go on"
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_loses_no_accepted_message(tmp_path, model_dir, broker, subscriber):
    sub = subscriber("edge/cam1/detections", qos=1)
    jsonl = str(tmp_path / "out.jsonl")
    proc = start(tmp_path, model_dir, "--source", "test://?width=320&height=240&fps=30",
                 "--mqtt", broker.url + "?qos=1", "--device-id", "cam1", "--jsonl", jsonl)
    assert sub.wait_for(lambda s: len(s.json("detections")) >= 20, 30), log_text(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log_text(tmp_path)
    with open(jsonl) as f:
        written = [json.loads(line)["seq"] for line in f]
    assert sub.wait_for(lambda s: len(s.json("detections")) >= len(written), 10)
    received = [m["seq"] for m in sub.json("detections")]
    assert received == written == list(range(1, len(written) + 1))


def test_sighup_reloads_the_config_in_the_same_process(tmp_path, model_dir):
    jsonl = str(tmp_path / "out.jsonl")
    proc = start(tmp_path, model_dir, "--jsonl", jsonl, config="health: {interval: 1}\n"
                 "source: test://?width=320&height=240&fps=20\n")
    try:
        deadline = time.monotonic() + 30
        while "running yolox-nano" not in log_text(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        (tmp_path / "edge.yaml").write_text("health: {interval: 1}\nsource: "
                                            "test://?width=256&height=192&fps=20\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while log_text(tmp_path).count("running yolox-nano") < 2 and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        assert "reloading" in log_text(tmp_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        with open(jsonl) as f:
            widths = [json.loads(line)["frame"]["width"] for line in f]
        switch = widths.index(256)
        assert set(widths[:switch]) == {320} and set(widths[switch:]) == {256}
    finally:
        if proc.poll() is None:
            proc.kill()
