"""Status, health and the command channel with a real broker and a real `edge run` process."""

import base64
import json
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.conftest import ROOT, SHARED, run_edge

LEFT = os.path.join(SHARED, "data", "middlebury-motorcycle", "motorcycle_left.png")


class Device:
    """`edge run` on a live test pattern, in the background."""

    def __init__(self, broker, tmp_path, model_dir, device="cam1", config="", matcher=False):
        cfg = tmp_path / "edge-{}.yaml".format(device)
        cfg.write_text("health: {interval: 1}\n" + config)
        args = [sys.executable, "-m", "edge", "run", "-c", str(cfg), "--source",
                "test://?width=320&height=240&fps=10", "--detector", "yolox-nano",
                "--model-dir", model_dir, "--mqtt", broker.url + "?keepalive=5",
                "--device-id", device, "--state-dir", str(tmp_path / "state")]
        if matcher:
            args += ["--matcher", "coarse-loftr"]
        self.log = open(str(tmp_path / "{}.log".format(device)), "wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.device = device
        self.log_path = str(tmp_path / "{}.log".format(device))

    def text(self):
        return open(self.log_path).read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def device(broker, subscriber, tmp_path, model_dir):
    started = []

    def start(**kwargs):
        sub = subscriber("edge/#")
        dev = Device(broker, tmp_path, model_dir, **kwargs)
        started.append(dev)
        # running: `online` or `degraded`, whichever its first health verdict says
        assert sub.wait_for(lambda s: any(m["state"] in ("online", "degraded")
                                          for m in s.json("status")
                                          if m["device"] == dev.device), 30), dev.text()
        return dev, sub
    yield start
    for dev in started:
        dev.stop()


def command(sub, device, name, payload, timeout=10):
    """Send a command (dict or raw bytes) and return the reply for its id."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    before = len(sub.messages)
    sub.client.publish("edge/{}/cmd/{}".format(device, name), raw, qos=1)

    def replies(s):
        with s.lock:
            return [json.loads(p) for t, p, _ in s.messages[before:] if "/reply/" in t]
    assert sub.wait_for(lambda s: replies(s), timeout), "no reply to {}".format(name)
    return replies(sub)[0]


def test_status_lifecycle_and_retained_health(device, broker, subscriber):
    dev, sub = device()

    def working(s):
        # Reports come while the engines are prepared, when the pipeline starts, then each
        # interval: wait for one from the running pipeline.
        return [r for r in s.json("health") if r["tasks"].get("detect", {}).get("frames")]
    assert sub.wait_for(working, 15)
    report = working(sub)[-1]
    assert report["device"] == "cam1" and report["verdict"]["healthy"]
    assert report["tasks"]["detect"]["frames"] > 0 and report["source"]["state"] == "open"
    assert report["versions"]["edge"] and report["mqtt"]["connected"]
    assert dev.stop() == 0
    states = [m["state"] for m in sub.json("status")]
    assert states[-1] == "offline" and "online" in states
    assert sub.json("status")[-1]["reason"] == "stopped"
    late = subscriber("edge/cam1/#")       # retained: a newcomer sees status and health
    assert late.wait_for(lambda s: s.json("status") and s.json("health"), 5)
    assert all(r for _, _, r in late.messages)
    assert late.json("status")[-1]["state"] == "offline"


def test_last_retained_health_tells_how_the_run_ended(broker, subscriber, tmp_path, model_dir):
    """A finite run with a long health interval: the retained report is the final one."""
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("health: {interval: 3600}\n")
    rc, out, err = run_edge("run", "-c", str(cfg), "--source", "test://?width=320&height=240&"
                            "frames=12&fps=0", "--detector", "yolox-nano", "--model-dir",
                            model_dir, "--mqtt", broker.url, "--device-id", "done1",
                            "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    late = subscriber("edge/done1/health")
    assert late.wait_for(lambda s: s.json("health"), 5)
    report = late.json("health")[-1]
    assert report["source"]["state"] == "finished" and report["source"]["frames"] == 12
    assert report["tasks"]["detect"]["frames"] == 12


def test_kill_9_turns_status_offline_through_the_last_will(device):
    dev, sub = device()
    dev.proc.send_signal(signal.SIGKILL)
    dev.proc.wait()
    assert sub.wait_for(lambda s: s.json("status")[-1]["state"] == "offline", 15)
    assert sub.json("status")[-1]["reason"] == "connection lost"


def test_each_command_and_each_kind_of_bad_command(device, subscriber, tmp_path):
    dev, sub = device(matcher=True)
    robot = subscriber("robots/#")
    pong = command(sub, "cam1", "ping", {"id": "p1"})
    assert pong["ok"] and pong["id"] == "p1" and pong["result"]["pong"] is True
    health = command(sub, "cam1", "health", {"id": "h1"})
    assert health["ok"] and health["result"]["device"] == "cam1"
    snap = command(sub, "cam1", "snapshot", {"id": "s1", "max_bytes": 60000})
    assert snap["ok"] and snap["result"]["bytes"] <= 60000
    jpeg = base64.b64decode(snap["result"]["data"])
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[1] == snap["result"]["frame"]["width"]
    binary = command(sub, "cam1", "snapshot", {"id": "s2", "binary": True})
    assert binary["ok"] and sub.wait_for(
        lambda s: any(t == binary["result"]["topic"] for t, _, _ in s.messages), 5)
    ref = command(sub, "cam1", "set_reference", {"id": "r1", "name": "dock"})
    assert ref["ok"] and ref["result"] == {"name": "dock", "width": 320, "height": 240}
    assert os.path.exists(str(tmp_path / "state" / "references" / "dock.png"))
    listed = command(sub, "cam1", "list_references", {"id": "l1"})
    assert [r["name"] for r in listed["result"]["references"]] == ["dock"]
    assert sub.wait_for(lambda s: s.json("matches"), 10), "the matcher starts on the new reference"
    gone = command(sub, "cam1", "delete_reference", {"id": "d1", "name": "dock"})
    assert gone["ok"]
    missing = command(sub, "cam1", "delete_reference", {"id": "d2", "name": "dock"})
    assert missing["error"]["code"] == "not_found"
    sub.client.publish("edge/cam1/cmd/ping", json.dumps(
        {"id": "c1", "reply_to": "edge/cam1/reply/robot-r2/c1"}), qos=1)
    assert sub.wait_for(lambda s: any(t == "edge/cam1/reply/robot-r2/c1" and
                                      json.loads(p)["ok"] for t, p, _ in s.messages), 10), \
        "reply_to under the device's reply/ is honoured"
    for n, elsewhere in enumerate(["robots/r2/answers", "edge/cam1/detections",
                                   "edge/cam1/status", "edge/cam1/cmd/reload",
                                   "edge/cam2/reply/x"]):
        reply = command(sub, "cam1", "ping", {"id": "e{}".format(n), "reply_to": elsewhere})
        assert reply["error"]["code"] == "bad_request" and "reply/" in reply["error"]["message"]
    assert not robot.messages and "reloading" not in dev.text(), \
        "a reply never lands outside the reply namespaces"
    bad = {
        "unknown_command": ("selfdestruct", {"id": "x1"}),
        "bad_json": ("ping", b"{not json"),
        "bad_request": ("ping", {"id": 5}),
        "too_large": ("ping", b"{\"id\": \"big\", \"pad\": \"" + b"x" * 70000 + b"\"}"),
    }
    for code, (name, payload) in bad.items():
        reply = command(sub, "cam1", name, payload)
        assert reply["ok"] is False and reply["error"]["code"] == code, (code, reply)
    for args in ({"id": "t1", "name": 7}, {"id": "t2", "name": "../../etc/passwd"},
                 {"id": "t3"}):
        reply = command(sub, "cam1", "set_reference", args)
        assert reply["error"]["code"] == "bad_request", reply
    reply = command(sub, "cam1", "snapshot", {"id": "t4", "max_bytes": "lots"})
    assert reply["error"]["code"] == "bad_request"
    assert dev.proc.poll() is None, "bad commands never crash the daemon"
    assert not os.path.exists(str(tmp_path / "state" / "references" / "passwd.png"))


def test_retained_commands_are_ignored(broker, subscriber, device):
    """A retained request would run on every connect and restart (a retained `reload` is a
    reload loop): the device ignores it and says so; live requests after it are answered."""
    sender = subscriber("edge/cam1/reply/#")
    for name, request_id in (("ping", "ret1"), ("reload", "ret2")):
        sender.client.publish("edge/cam1/cmd/{}".format(name), json.dumps(
            {"id": request_id}), qos=1, retain=True).wait_for_publish(5)
    dev, sub = device()
    pong = command(sub, "cam1", "ping", {"id": "live1"})
    assert pong["ok"] and pong["id"] == "live1"
    replied = [json.loads(p)["id"] for t, p, _ in sub.messages if "/reply/" in t]
    assert replied == ["live1"], replied
    assert dev.text().count("ignored a retained message on edge/cam1/cmd/") == 2, dev.text()
    assert "reloading" not in dev.text()


def test_commands_are_rate_limited(device):
    """A burst over commands.burst: the budget runs, as many refusals again are answered
    `rate_limited`, the rest get no reply and are counted (commands.dropped)."""
    dev, sub = device(config="commands: {rate: 1, burst: 3}\n")
    for i in range(12):
        sub.client.publish("edge/cam1/cmd/ping", json.dumps({"id": "q{}".format(i)}), qos=1)

    def codes(s):
        with s.lock:
            return [json.loads(p).get("error", {}).get("code") for t, p, _ in s.messages
                    if "/reply/q" in t]
    assert sub.wait_for(lambda s: len(codes(s)) >= 6, 10)
    import time
    time.sleep(0.5)      # the rest are refused by now (health probes are taken first)
    health = command(sub, "cam1", "health", {"id": "h1"})["result"]["commands"]
    answered = codes(sub)
    assert answered.count(None) >= 3 and answered.count("rate_limited") >= 3, answered
    assert len(answered) < 12, "refusals past the budget get no reply: {}".format(answered)
    assert health["dropped"] == 12 - len(answered), (health, answered)
    assert health["rate_limited"] == answered.count("rate_limited"), (health, answered)


def test_a_command_flood_neither_starves_health_probes_nor_goes_uncounted(device, broker):
    """About 1000 pings a second, in bursts of 100, from one client while an operator runs
    `edge health`: the probe has its own queue and budget, so it is answered; what the flood
    lost is counted."""
    import threading
    import time
    from edge.mqtt import make_client
    dev, sub = device(config="commands: {rate: 1, burst: 1}\n")
    stop = threading.Event()
    flooder = make_client("flooder")
    flooder.connect("127.0.0.1", broker.port, 30)
    flooder.loop_start()

    def flood():
        sent = 0
        while not stop.is_set():
            flooder.publish("edge/cam1/cmd/ping", json.dumps({"id": "f{}".format(sent)}))
            sent += 1
            if sent % 100 == 0:
                time.sleep(0.1)
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        rc, out, err = run_edge("health", "cam1", "--json", "--mqtt", broker.url, "--timeout",
                                "5")
    finally:
        stop.set()
        thread.join(5)
        flooder.loop_stop()
        flooder.disconnect()
    assert rc == 0, out + err
    counts = json.loads(out)["cam1"]["report"]["commands"]
    assert counts["dropped"] > 0 and counts["rate_limited"] > 0, counts
    assert dev.proc.poll() is None


def test_reload_command_rebuilds_the_pipeline(device):
    dev, sub = device()
    reply = command(sub, "cam1", "reload", {"id": "rl"})
    assert reply["ok"]
    assert sub.wait_for(lambda s: "reloading" in dev.text() and
                        dev.text().count("running yolox-nano") >= 2, 20), dev.text()
    before = len(sub.json("detections"))
    assert sub.wait_for(lambda s: len(s.json("detections")) > before + 5, 10)


def test_a_reload_that_fails_is_refused_or_reported(device, tmp_path):
    """A config that does not load: the reload command replies with the error and nothing
    restarts. One that loads but cannot run (SIGHUP, a matcher card that does not exist): the
    previous configuration keeps running. Health carries the outcome either way; a good
    reload clears it."""
    dev, sub = device()
    cfg = tmp_path / "edge-cam1.yaml"
    good = cfg.read_text()
    cfg.write_text(good + "mqtt: {qos: 7}\n")
    reply = command(sub, "cam1", "reload", {"id": "rl1"})
    assert reply["error"]["code"] == "failed" and "mqtt.qos" in reply["error"]["message"]
    health = command(sub, "cam1", "health", {"id": "h1"})["result"]
    assert health["reload"]["ok"] is False and "mqtt.qos" in health["reload"]["error"]
    assert not health["verdict"]["healthy"] and health["state"] == "degraded"
    assert any("reload failed" in r for r in health["verdict"]["reasons"])
    cfg.write_text(good + "matcher: no-such-card\n")
    dev.proc.send_signal(signal.SIGHUP)
    assert sub.wait_for(lambda s: "no-such-card" in (
        (s.json("health")[-1].get("reload") or {}).get("error") or ""), 30), dev.text()
    before = len(sub.json("detections"))
    assert sub.wait_for(lambda s: len(s.json("detections")) > before + 5, 10), \
        "the previous configuration keeps running"
    cfg.write_text(good)
    assert command(sub, "cam1", "reload", {"id": "rl2"})["ok"]
    assert sub.wait_for(lambda s: (s.json("health")[-1].get("reload") or {}).get("ok") and
                        s.json("health")[-1]["verdict"]["healthy"], 30), dev.text()


def test_edge_health_exit_codes(device, broker):
    device(device="good")
    _, sub = device(device="bad", config="health: {interval: 1, memory_percent: 0}\n")
    states = [m["state"] for m in sub.json("status") if m["device"] == "bad"]
    assert "degraded" in states and "online" not in states, \
        "an unhealthy device goes from starting to degraded, never online: {}".format(states)
    rc, out, err = run_edge("health", "good", "--mqtt", broker.url, "--timeout", "5")
    assert rc == 0, out + err
    assert "good" in out and "healthy" in out
    rc, out, err = run_edge("health", "good", "bad", "--mqtt", broker.url, "--timeout", "5")
    assert rc == 1, out + err
    assert "memory" in out
    rc, out, err = run_edge("health", "good", "ghost", "--mqtt", broker.url, "--timeout", "2")
    assert rc == 2 and "no answer" in out
    rc, out, err = run_edge("health", "--all", "--json", "--mqtt", broker.url, "--timeout", "5")
    results = json.loads(out)
    assert sorted(results) == ["bad", "good"] and rc == 1


def test_edge_health_all_lists_offline_devices_and_fails_for_a_dead_fleet(device, broker,
                                                                          subscriber):
    """A crashed device's last will is `offline`: `--all` lists it and exits 2; with every
    device dead it is not "no device found" and exit 0. Clearing the retained status (the
    command docs/getting-started.md gives for a retired device) takes it off the list."""
    dev, sub = device(device="crashed")
    dev.proc.send_signal(signal.SIGKILL)
    dev.proc.wait()
    assert sub.wait_for(lambda s: s.json("status")[-1]["state"] == "offline", 15)
    rc, out, err = run_edge("health", "--all", "--mqtt", broker.url, "--timeout", "3")
    assert rc == 2, out + err
    assert "crashed" in out and "offline, last heard" in out and "connection lost" in out, out
    device(device="alive")
    rc, out, err = run_edge("health", "--all", "--json", "--mqtt", broker.url, "--timeout", "3")
    results = json.loads(out)
    assert sorted(results) == ["alive", "crashed"] and rc == 2, out + err
    assert results["alive"]["healthy"] and results["crashed"]["state"] == "offline"
    sub.client.publish("edge/crashed/status", b"", qos=1, retain=True).wait_for_publish(5)
    rc, out, err = run_edge("health", "--all", "--json", "--mqtt", broker.url, "--timeout", "3")
    assert sorted(json.loads(out)) == ["alive"] and rc == 0, out + err


def test_edge_health_all_with_no_device_is_not_green(broker):
    rc, out, err = run_edge("health", "--all", "--mqtt", broker.url, "--timeout", "1")
    assert rc == 2 and "no device found" in out, out + err


class Rogue:
    """A client posing as device `name`: retained status online, and `answer(request)` as the
    reply to every health request (raw bytes)."""

    def __init__(self, port, name, answer):
        from edge.mqtt import make_client, status_payload
        import time
        self.client = make_client("rogue-" + name)
        self.client.connect("127.0.0.1", port, 30)
        topic = "edge/{}/cmd/health".format(name)

        def on_message(client, userdata, msg):
            request = json.loads(msg.payload)
            client.publish(request["reply_to"], answer(request), qos=1)
        self.client.on_message = on_message
        self.client.subscribe(topic, 1)
        self.client.loop_start()
        self.client.publish("edge/{}/status".format(name), status_payload(
            name, "online", time.time()), qos=1, retain=True).wait_for_publish(5)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


ROGUE_ANSWERS = {
    "text": lambda r: b"not json at all",
    "list": lambda r: b"[1, 2]",
    "noverdict": lambda r: json.dumps({"v": 1, "id": r["id"], "ok": True,
                                       "result": {"state": "online"}}).encode(),
    "badtypes": lambda r: json.dumps({"v": 1, "id": r["id"], "ok": True, "result": {
        "state": "online", "verdict": {"healthy": True, "reasons": []}, "tasks": [1],
        "system": {"temperatures": "hot", "memory": 5}}}).encode(),
    "olderror": lambda r: json.dumps({"v": 1, "id": r["id"], "ok": False,
                                      "error": "no"}).encode(),
}


def test_edge_health_all_survives_malformed_reports(device, broker):
    """Rogue or old devices answer with garbage: each is listed as such, the real device's
    report is shown, and the exit status says unhealthy."""
    device(device="good")
    rogues = [Rogue(broker.port, name, answer) for name, answer in ROGUE_ANSWERS.items()]
    try:
        rc, out, err = run_edge("health", "--all", "--mqtt", broker.url, "--timeout", "5")
        rc_json, out_json, _ = run_edge("health", "--all", "--json", "--mqtt", broker.url,
                                        "--timeout", "5")
    finally:
        for rogue in rogues:
            rogue.close()
    assert rc == 1 and "internal error" not in err and "Traceback" not in err, out + err
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "healthy" in lines["good"] and "detect=" in lines["good"], out
    for name in ROGUE_ANSWERS:
        if name == "badtypes":      # a well-formed verdict; the parts that are not show as -
            assert lines[name].split()[2:5] == ["-", "-", "-"], lines[name]
        else:
            assert "malformed health reply" in lines[name], lines[name]
    results = json.loads(out_json)
    assert rc_json == 1 and results["good"]["healthy"] and not results["list"]["healthy"]


def test_status_is_starting_while_engines_are_built(broker, subscriber, tmp_path, model_dir):
    """Engines are built before frames flow (minutes on a Nano): meanwhile health reports the
    builds and `status` says `starting`, not `online`; `online` comes once frames flow."""
    sub = subscriber("edge/cam1/#")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("health: {interval: 1}\n")
    rc, out, err = run_edge("run", "-c", str(cfg), "--source",
                            "test://?width=320&height=240&frames=5", "--detector",
                            "yolox-nano", "--matcher", "coarse-loftr", "--reference", LEFT,
                            "--model-dir", model_dir, "--mqtt", broker.url,
                            "--device-id", "cam1", "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    assert sub.wait_for(lambda s: any(json.loads(p).get("state") == "offline"
                                      for t, p, _ in s.messages if t.endswith("/status")), 10)
    status, preparing = None, 0
    with sub.lock:
        messages = list(sub.messages)
    for topic, payload, _ in messages:      # one client's messages arrive in order
        message = json.loads(payload)
        if topic.endswith("/status"):
            status = message["state"]
        elif topic.endswith("/health"):
            engines = message["engines"].values()
            if not engines or any(e["state"] == "building" for e in engines):
                preparing += 1
                assert message["state"] == "starting" and status == "starting", message
    assert preparing >= 1                # a report came before the engines were ready
    states = [json.loads(p)["state"] for t, p, _ in messages if t.endswith("/status")]
    assert "online" in states and states.index("online") > states.index("starting")


def test_min_fps_holds_the_tasks_that_run_on_every_frame_only():
    """health.min_fps: a detector below it degrades the device, a matcher (a background
    task, at its own rate) does not; the daemon passes the tasks that run on every frame,
    from each task's class."""
    from edge.health import verdict
    from edge.tasks import kinds
    report = {"source": {"state": "open"}, "uptime_s": 60.0, "engines": {}, "mqtt": None,
              "system": None, "tasks": {"detect": {"fps": 3.0}, "match": {"fps": 1.0}}}
    limits = {"temperature_c": 85.0, "memory_percent": 95.0, "min_fps": 5.0}
    every_frame = [cls.name for cls in kinds() if not cls.background]
    assert every_frame == ["detect"]
    healthy, reasons = verdict(report, limits, every_frame)
    assert not healthy and reasons == ["task detect at 3.0 fps, below 5.0"], reasons
    report["tasks"]["detect"]["fps"] = 6.0
    assert verdict(report, limits, every_frame) == (True, [])
