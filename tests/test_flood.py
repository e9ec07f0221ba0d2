"""A command flood against a real `edge run` on a real broker: results and health probes
keep flowing, the flood's unanswered requests are counted.

A paho client publishes thousands of pings a second (QoS 0) for some seconds at the device
while it runs a finite source (`test://?frames=N`: a finite source never drops) and an
operator sends a health probe every second. Every detection must reach the subscriber,
every probe sent during the flood must be answered, the device's replies to the flood stay
within its budgets (commands.rate / burst for requests run, as much again for refusals
answered), and the final retained health report counts every request it did not answer.
"""

import json
import subprocess
import sys
import threading
import time

import pytest

from edge import schemas
from tests.conftest import ROOT

FRAMES = 360              # 18 s at FPS: the device reads the flood's backlog meanwhile
FPS = 20
FLOOD_PER_S = 5000
FLOOD_S = 5.0
PROBES = 5


class Flooder(threading.Thread):
    """Pings at about `per_second` (bursts every 10 ms), QoS 0, for `seconds`."""

    def __init__(self, port, device, per_second, seconds):
        super().__init__(name="flooder", daemon=True)
        from edge.mqtt import make_client
        self.client = make_client("flooder-{}".format(time.monotonic_ns()))
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        self.topic = "edge/{}/cmd/ping".format(device)
        self.burst = max(1, per_second // 100)
        self.seconds = seconds
        self.sent = 0
        self.started = self.ended = None
        self.stop_event = threading.Event()

    def run(self):
        self.started = time.monotonic()
        tick = self.started
        while not self.stop_event.is_set() and tick - self.started < self.seconds:
            for _ in range(self.burst):
                self.client.publish(self.topic, b'{"id": "f%d"}' % self.sent, qos=0)
                self.sent += 1
            tick += 0.01
            delay = tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.ended = time.monotonic()

    def close(self):
        self.stop_event.set()
        self.join(10)
        self.client.loop_stop()
        self.client.disconnect()

    @property
    def rate(self):
        return self.sent / max(1e-6, (self.ended or time.monotonic()) - self.started)


@pytest.mark.timing      # thousands of requests a second: alone, not beside other workers
def test_a_ping_flood_never_costs_a_result_or_a_health_probe(broker, subscriber, tmp_path,
                                                            model_dir):
    sub = subscriber("edge/flood1/#")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("health: {interval: 1}\n")
    log = open(str(tmp_path / "edge.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "-c", str(cfg), "--source",
         "test://?width=320&height=240&frames={}&fps={}".format(FRAMES, FPS), "--detector",
         "yolox-nano", "--model-dir", model_dir, "--mqtt", broker.url, "--device-id",
         "flood1", "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    flooder = None
    probes = []
    latencies = []            # seconds from each probe to its reply, if within 5 s
    try:
        assert sub.wait_for(lambda s: any(m["state"] == "online" for m in s.json("status")),
                            60), open(str(tmp_path / "edge.log")).read()
        flooder = Flooder(broker.port, "flood1", FLOOD_PER_S, FLOOD_S)
        flooder.start()
        time.sleep(0.5)                   # the flood is on before the first probe
        while len(probes) < PROBES and proc.poll() is None:
            # as `edge health` asks, and waits up to its default timeout (5 s)
            probe = "probe{}".format(len(probes))
            sent = time.monotonic()
            sub.client.publish("edge/flood1/cmd/health", json.dumps({"id": probe}), qos=1)
            probes.append(probe)
            if sub.wait_for(lambda s: any(t == "edge/flood1/reply/" + probe
                                          for t, _, _ in s.messages), 5):
                latencies.append(round(time.monotonic() - sent, 2))
            time.sleep(max(0.0, sent + 1.0 - time.monotonic()))
        flooder.join(FLOOD_S + 10)
        rc = proc.wait(180)
        ended = time.monotonic()
    finally:
        if flooder is not None:
            flooder.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = open(str(tmp_path / "edge.log")).read()
    assert len(probes) == PROBES, "the run ended before the probes were sent: {}".format(text)
    assert sub.wait_for(lambda s: s.json("status")[-1]["state"] == "offline", 10)
    with sub.lock:
        messages = list(sub.messages)
    detections = [json.loads(p) for t, p, _ in messages if t == "edge/flood1/detections"]
    replies = {t.rsplit("/", 1)[1]: json.loads(p) for t, p, _ in messages
               if t.startswith("edge/flood1/reply/")}
    answered = [p for p in probes if p in replies and replies[p]["ok"]]
    flood_replies = [r for i, r in replies.items() if i.startswith("f")]
    report = [json.loads(p) for t, p, _ in messages if t == "edge/flood1/health"][-1]
    schemas.validate("health", report)
    counts = report["commands"]
    figures = {"frames": FRAMES, "detections": len(detections), "probes": len(probes),
               "probes_answered": len(answered), "probe_latency_s": latencies,
               "flood_sent": flooder.sent,
               "flood_per_s": round(flooder.rate), "flood_replies": len(flood_replies),
               "commands": counts, "results_dropped": report["mqtt"]["dropped"],
               "exit": rc}
    print("flood figures:", json.dumps(figures, sort_keys=True))
    assert rc == 0, text
    assert flooder.rate > 2000, figures        # thousands of requests a second
    assert sorted(m["frame"]["index"] for m in detections) == list(range(FRAMES)), figures
    assert report["mqtt"]["dropped"] == 0, figures
    assert answered == probes and len(latencies) == PROBES, figures
    # Replies stay within the budgets: commands.burst (10) and commands.rate (5/s) of pings
    # run, as many refused with a reply; every other request is counted as dropped.
    assert len(flood_replies) <= 2 * (10 + 5 * (ended - flooder.started)), figures
    assert counts["handled"] == len(flood_replies) + len(answered), figures
    assert counts["handled"] + counts["dropped"] == flooder.sent + len(probes), figures
    assert "Traceback" not in text
