"""The `/metrics` server under awkward clients: idle and trickling connections hold neither a
scrape nor the daemon's stop, a burst of concurrent scrapes is served in full, and the
handler threads stay bounded (issue 24, item 18)."""

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from tests.conftest import ROOT, free_port

URL = "http://127.0.0.1:{}/metrics"


def get(port, timeout=5):
    with urllib.request.urlopen(URL.format(port), timeout=timeout) as r:
        return r.read().decode()


def start_daemon(tmp_path, model_dir, port, *outputs):
    log = open(str(tmp_path / "edge.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--source",
         "test://?width=160&height=120&fps=5", "--detector", "yolox-nano",
         "--model-dir", model_dir, "--state-dir", str(tmp_path / "state"),
         "--metrics-port", str(port)] + list(outputs),
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.time() + 60
    while True:
        try:
            get(port, timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(open(str(tmp_path / "edge.log")).read())
            time.sleep(0.2)


class Trickle(threading.Thread):
    """A client that sends its request one byte every 0.3 s and never finishes it."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.done = threading.Event()

    def run(self):
        try:
            while not self.done.wait(0.3):
                self.sock.sendall(b"G")
        except OSError:         # cut by the server: what a stop should do
            pass


def test_idle_clients_hold_neither_a_scrape_nor_the_stop(broker, subscriber, tmp_path,
                                                         model_dir):
    port = free_port()
    sub = subscriber("edge/cam1/status")
    proc = start_daemon(tmp_path, model_dir, port, "--mqtt", broker.url,
                        "--device-id", "cam1")
    idle = socket.create_connection(("127.0.0.1", port))      # connects, sends nothing
    trickle = Trickle(port)
    trickle.start()
    try:
        time.sleep(0.5)
        began = time.time()
        assert "edge_uptime_seconds" in get(port, timeout=3)
        assert time.time() - began < 3
        assert sub.wait_for(lambda s: s.json("status") and
                            s.json("status")[-1]["state"] == "online", 30)
        proc.send_signal(signal.SIGTERM)
        began = time.time()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError("edge run still running 20 s after SIGTERM with an idle "
                                 "metrics client")
    finally:
        trickle.done.set()
        idle.close()
        if proc.poll() is None:
            proc.kill()
    log = open(str(tmp_path / "edge.log")).read()
    assert proc.returncode == 0, log
    assert "Traceback" not in log, log
    assert sub.wait_for(lambda s: s.json("status")[-1]["state"] == "offline", 10)


def test_a_burst_of_concurrent_scrapes_is_served_in_full(tmp_path, model_dir):
    port = free_port()
    proc = start_daemon(tmp_path, model_dir, port, "--jsonl", str(tmp_path / "o.jsonl"))
    count = 200
    results = []
    lock = threading.Lock()
    ready = threading.Barrier(count)

    def scrape():
        ready.wait()
        try:
            body = get(port, timeout=30)
            outcome = "edge_info" in body and "process_resident_memory_bytes" in body
        except OSError as e:
            outcome = repr(e)
        with lock:
            results.append(outcome)
    try:
        threads = [threading.Thread(target=scrape) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    failed = [r for r in results if r is not True]
    assert len(results) == count and not failed, (len(results), failed[:5])


def serve_a_recorded_jetson(monkeypatch, max_clients, timeout_s):
    """A MetricsServer on a free port for a daemon-like app with a Jetson Nano's figures."""
    from edge import metrics, system
    from edge.health import Health
    from tests.test_schemas import LIMITS, NANO, App
    monkeypatch.setattr(metrics, "MAX_CLIENTS", max_clients, raising=False)
    monkeypatch.setattr(metrics, "TIMEOUT_S", timeout_s, raising=False)
    app = App()
    app.health = Health(app, 10.0, LIMITS, system_status=lambda: system.from_sysfs(NANO))
    server = metrics.MetricsServer(app, "127.0.0.1", 0).start()
    return server, server.server.server_address[1]


def handler_threads():
    return [t for t in threading.enumerate() if t.name == "metrics-client"]


def test_handler_threads_are_bounded(monkeypatch):
    """More idle clients than handlers: the threads stay bounded, and a scrape waits for a
    handler that an idle client gives up after TIMEOUT_S."""
    server, port = serve_a_recorded_jetson(monkeypatch, max_clients=2, timeout_s=0.5)
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        time.sleep(0.2)
        assert 1 <= len(handler_threads()) <= 2
        assert "edge_uptime_seconds" in get(port, timeout=10)
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_a_stop_cuts_the_clients_still_connected(monkeypatch):
    """stop() returns at once, not after the clients' timeout, and ends their threads."""
    server, port = serve_a_recorded_jetson(monkeypatch, max_clients=2, timeout_s=30.0)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.3)
        assert len(handler_threads()) == 2
        began = time.time()
        server.stop()
        assert time.time() - began < 2
        deadline = time.time() + 2
        while handler_threads():
            assert time.time() < deadline, "handler threads outlived the stop"
            time.sleep(0.05)
        assert idle[0].recv(1) == b""          # the server's end is closed
    finally:
        for sock in idle:
            sock.close()
