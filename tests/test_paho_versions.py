"""The publisher under every paho-mqtt we support, when a broker dies with messages in flight.

paho 2.x marks a QoS 0 message still in its buffer when the connection drops as failed, and
its is_published() then raises; paho 1.x and 2.x both keep "no connection" as the rc of a
QoS 1 message taken while disconnected, and is_published() raises on it even after its
acknowledgement. A publisher that asked is_published() stuck for good after a broker restart:
nothing left its queue, health said healthy, SIGTERM ended in an internal error.

tests/paho_outage.py makes the case deterministic (the broker stopped while paho holds
unsent data, then killed) and runs under the venv's paho (2.x) and under 1.5.1 and 1.6.1,
which tools/test installs into .paho/ (pure Python: a folder each).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import OLD_PAHOS, ROOT, paho_env
from tools.soak import Mosquitto, PersistentSubscriber, start_edge, wait_until


@pytest.mark.parametrize("version", ("venv",) + OLD_PAHOS)
def test_a_broker_killed_mid_send_never_sticks_the_queue(tmp_path, version):
    env = paho_env(version)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "paho_outage.py"),
                           str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=150)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    if version != "venv":
        assert out["paho"] == version, out
    else:
        assert out["paho"].startswith("2."), out
    # the case happened: paho held messages when the broker stopped, nothing left meanwhile
    assert out["held_when_stopped"] > 0 and out["stalled_s"] >= 2.0, out
    assert out["noticed_loss"] and out["reconnected"], out
    assert out["lost"] > 0, "QoS 0 messages in paho's buffer die with the connection"
    # and the publisher went on: new results reach a subscriber, the queue drains
    assert out["after_received"] and out["after_s"] <= 15.0, out
    assert out["drained"] and out["stalled_after_s"] < 1.0, out
    assert out["stuck_reason"] == [], out
    # a QoS 1 message paho took while no broker ran is delivered after the reconnect
    assert out["queued_taken"] and out["queued_delivered"], out
    assert out["failed"] == 0, out
    assert not [line for line in out["log"] if line.startswith("ERROR")], out["log"]
    assert out["stopped"] is True and out["undelivered_at_stop"] == 0, out


def _log(tmp_path):
    with open(str(tmp_path / "edge.log"), errors="replace") as f:
        return f.read()


def test_health_says_the_queue_is_stuck_while_the_broker_takes_nothing(tmp_path, model_dir):
    """The broker frozen (SIGSTOP: the connection stays up, nothing is acknowledged) for 14 s
    under QoS 1: the daemon's health goes degraded, "publish queue stuck", and healthy again
    once the broker answers."""
    broker = Mosquitto(str(tmp_path), persistence=False).start()
    proc = start_edge(str(tmp_path), _run_args(model_dir, "stuck", broker.url + "?qos=1"),
                      "health: {interval: 1}\n")
    try:
        sub = PersistentSubscriber(broker.port, ["edge/stuck/health"], persistent=False).start()
        assert sub.wait_for(lambda: sub.count("health") >= 2 and sub.payloads("health")[-1][
            "state"] == "online", 60), _log(tmp_path)
        broker.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        assert wait_until(lambda: "publish queue stuck" in _log(tmp_path), 25), _log(tmp_path)
        assert time.monotonic() - frozen >= 9.0, "stuck is said after 10 s, not before"
        broker.proc.send_signal(signal.SIGCONT)
        assert wait_until(lambda: "healthy again" in _log(tmp_path), 20), _log(tmp_path)
        sub.close()
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, _log(tmp_path)
        broker.stop()
    assert "Traceback" not in _log(tmp_path)


def test_qos0_results_flow_again_after_each_broker_restart(tmp_path, model_dir):
    """Two restarts of the broker (3 s down each) under `edge run` at QoS 0 with the venv's
    paho: results reach a subscriber again within 15 s each time, no traceback, and the
    daemon ends cleanly on SIGTERM."""
    broker = Mosquitto(str(tmp_path), persistence=False).start()
    proc = start_edge(str(tmp_path), _run_args(model_dir, "restart", broker.url),
                      "health: {interval: 1}\n")
    waits = []
    try:
        sub = PersistentSubscriber(broker.port, ["edge/restart/detections"],
                                   persistent=False).start()
        assert sub.wait_for(lambda: sub.count("detections") > 0, 60), _log(tmp_path)
        sub.close()
        for _ in range(2):
            broker.stop()
            time.sleep(3.0)
            broker.start()
            sub = PersistentSubscriber(broker.port, ["edge/restart/detections"],
                                       persistent=False).start()
            back = time.monotonic()
            sub.wait_for(lambda: sub.count("detections") > 0, 15)
            waits.append(round(time.monotonic() - back, 1))
            sub.close()
    finally:
        proc.terminate()
        code = proc.wait(20)
        broker.stop()
    log = _log(tmp_path)
    assert max(waits) <= 15.0, (waits, log)
    assert code == 0, log
    assert "Traceback" not in log and "publisher failed" not in log, log
    assert log.count("mqtt connected") >= 3, log


def _run_args(model_dir, device, url):
    return ["--source", "test://?width=160&height=120&fps=10", "--detector", "yolox-nano",
            "--model-dir", model_dir, "--device-id", device, "--mqtt", url]
