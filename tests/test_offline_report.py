"""How `edge health` and `edge listen` report a device that is gone (issue 24): when it was
last heard rather than when it connected, a broker outage told from a device's death, a run
that ended as asked listed but not failed, millimetres as the payloads carry them, and a
fleet of 100 answered without waiting on anything that cannot come."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from edge import cli
from edge import client as edge_client
from edge import listen, mqtt, remote, schemas
from tests.conftest import ROOT, Subscriber, run_edge
from tools.soak import Mosquitto, wait_until

# A device without a pipeline: the daemon's own MQTT link (status, last will), nothing else.
LINK = """
import sys, time
from edge import mqtt
link = mqtt.MqttLink(mqtt.parse_url(sys.argv[1]), sys.argv[2])
link.set_status("online")
link.start()
while True:
    time.sleep(1)
"""


def start_link(url, device):
    return subprocess.Popen([sys.executable, "-c", LINK, url, device], cwd=ROOT)


def start_daemon(tmp_path, model_dir, url, device, source, config="health: {interval: 2}\n"):
    cfg = tmp_path / "{}.yaml".format(device)
    cfg.write_text(config)
    log = open(str(tmp_path / "{}.log".format(device)), "wb")
    return subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", str(cfg), "--source",
                             source, "--detector", "yolox-nano", "--model-dir", model_dir,
                             "--mqtt", url, "--device-id", device,
                             "--state-dir", str(tmp_path / ("state-" + device))],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def log_of(tmp_path, device):
    return (tmp_path / "{}.log".format(device)).read_text()


def last_status(sub, device):
    statuses = [m for m in sub.json("status") if m["device"] == device]
    return statuses[-1] if statuses else {}


class Listening:
    """`edge listen ARGS` in a real process; its lines as they come."""

    def __init__(self, tmp_path, url, *args):
        self.out = str(tmp_path / "listen-{}.out".format(time.monotonic_ns()))
        self.err = self.out[:-4] + ".err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge", "listen", "--mqtt", url]
                                         + list(args), stdout=out, stderr=err, cwd=ROOT)
        assert wait_until(lambda: "subscribed to" in open(self.err).read(), 30), \
            open(self.err).read()

    def lines(self):
        with open(self.out) as f:
            return f.read().splitlines()

    def wait_for(self, pattern, timeout=20):
        found = []

        def match():
            found[:] = [line for line in self.lines() if re.search(pattern, line)]
            return found
        assert wait_until(match, timeout), (pattern, self.lines(), open(self.err).read())
        return found[-1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(20)


def printed_time(line):
    """The unix time of the first `YYYY-mm-dd HH:MM:SS` (local) in a line."""
    text = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line).group(0)
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


# -- item 2: offline since its start time -> last heard ----------------------------------------

def test_after_kill_9_health_and_listen_say_when_it_was_last_heard(broker, subscriber,
                                                                   tmp_path, model_dir):
    """SIGKILL a daemon (health every 2 s) that ran a while: its will says no `since`, and
    `edge health DEV` answers at once (an offline device cannot answer) with a last-heard
    time within 5 s of the kill, not the time it started; `edge listen` says the same."""
    sub = subscriber("edge/#")
    proc = start_daemon(tmp_path, model_dir, broker.url, "dead1",
                        "test://?width=160&height=120&fps=5")
    try:
        assert sub.wait_for(lambda s: last_status(s, "dead1").get("state") == "online", 60), \
            log_of(tmp_path, "dead1")
        started = last_status(sub, "dead1")["since"]
        # reports well after it came online: the start is far behind the kill
        assert sub.wait_for(lambda s: any(r["ts"] > started + 6 for r in s.json("health")), 30)
        time.sleep(1.0)
        killed = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sub.wait_for(lambda s: last_status(s, "dead1").get("reason") == "connection lost", 15)
    will = last_status(sub, "dead1")
    # its `since` stays a number (robots' clients validate it), the connect time
    assert will["state"] == "offline" and will["since"] <= started
    schemas.validate("status", will)

    began = time.monotonic()
    rc, out, err = run_edge("health", "dead1", "--json", "--mqtt", broker.url, "--timeout", "10")
    took = time.monotonic() - began
    assert rc == 2, out + err
    result = json.loads(out)["dead1"]
    assert not result["answered"] and result["state"] == "offline" and not result["ended"]
    assert killed - 5 <= result["last_heard"] <= killed + 0.5, (killed, result)
    assert killed - started > 6     # a start time would have been far off
    assert result["reasons"][0].startswith("offline, last heard "), result
    assert "connection lost: the device died" in result["reasons"][0]
    assert took < 5, "an offline device is not waited for ({:.1f} s)".format(took)

    rc, out, err = run_edge("health", "dead1", "--mqtt", broker.url, "--timeout", "10")
    assert rc == 2 and "offline, last heard" in out and "since" not in out, out

    rc, out, err = run_edge("listen", "dead1", "--topic", "status", "--count", "1",
                            "--mqtt", broker.url, timeout=60)
    assert rc == 0, err
    assert out.startswith("dead1 status offline, last heard "), out
    assert killed - 6 <= printed_time(out) <= killed + 1, (killed, out)


def test_old_devices_wills_and_a_stranger_s_report(broker):
    """A will of a device before this version carries its connect time as `since`: still
    read, the retained report's later `ts` wins; a report on one device's topic that names
    another device is not taken as its word."""
    old_will = json.loads(mqtt.status_payload("old1", "offline", 1790000000.0,
                                              "connection lost").decode())
    health = {"device": "old1", "ts": 1790003600.5}
    stranger = {"device": "someone", "ts": 1790009999.0}
    pub = Subscriber(broker.port, "nothing/here")
    try:
        for topic, payload in (("edge/old1/status", old_will), ("edge/old1/health", health),
                               ("edge/old2/status", dict(old_will, device="old2")),
                               ("edge/old2/health", stranger)):
            pub.client.publish(topic, json.dumps(payload), qos=1,
                               retain=True).wait_for_publish(5)
    finally:
        pub.close()
    results, code = remote.check(broker.url, ["old1", "old2"], timeout=5)
    assert code == remote.EXIT_SILENT
    assert results["old1"]["last_heard"] == 1790003600.5
    assert results["old2"]["last_heard"] == 1790000000.0     # its own will's connect time
    assert results["old1"]["reasons"][0].startswith("offline, last heard ")


# -- item 10: a broker outage is not a device's death ------------------------------------------

def test_listen_tells_a_broker_outage_from_a_device_death(broker, tmp_path):
    """Stopping Mosquitto publishes the will of every device connected to it: `edge listen`
    says the broker went down with it, and when the device is back with the `since` it
    had, that it never stopped; a device killed while the broker runs is said to have died."""
    alive = mqtt.MqttLink(mqtt.parse_url(broker.url), "alive1")
    alive.set_status("online")
    alive.start()
    doomed = start_link(broker.url, "doomed1")
    listener = Listening(tmp_path, broker.url, "--topic", "status")
    try:
        first = listener.wait_for(r"^alive1 status online since ")
        listener.wait_for(r"^doomed1 status online since ")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        died = listener.wait_for(r"^doomed1 status offline, last heard ")
        assert "the device died" in died and "broker" not in died, died

        broker.stop()
        down = listener.wait_for(r"^alive1 status offline, last heard ")
        assert "as the broker went down" in down and "probably alive" in down, down
        broker.start()
        back = listener.wait_for(r"^alive1 status online since .*back without a restart", 40)
        assert printed_time(back) == printed_time(first)
    finally:
        listener.stop()
        alive.stop()
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()


def test_health_names_a_broker_restart_that_came_after_the_device_was_last_heard(tmp_path):
    """A broker with persistence keeps the wills it published as it stopped: until the
    device reconnects, `edge health` says the broker restarted less than a minute ago, so
    the device may be alive (held with SIGSTOP here, so that it cannot reconnect first)."""
    broker = Mosquitto(str(tmp_path), persistence=True, extra="sys_interval 1\n").start()
    device = start_link(broker.url, "paused1")
    sub = Subscriber(broker.port, "edge/#")
    try:
        assert sub.wait_for(lambda s: last_status(s, "paused1").get("state") == "online", 20)
        sub.client.publish("edge/paused1/health", json.dumps(
            {"device": "paused1", "ts": time.time()}), qos=1, retain=True).wait_for_publish(5)
        time.sleep(1.5)
        sub.close()
        device.send_signal(signal.SIGSTOP)
        broker.stop()
        broker.start()
        rc, out, err = run_edge("health", "paused1", "--mqtt", broker.url, "--timeout", "5")
        assert rc == 2, out + err
        assert "offline, last heard" in out and "or the broker restarted" in out
        assert "ask again in a minute" in out, out
    finally:
        device.send_signal(signal.SIGCONT)
        device.kill()
        device.wait()
        broker.stop()


def test_what_a_will_means_by_the_broker_s_uptime():
    """The uptime is up to SYS_INTERVAL s old: only a report from after the latest possible
    start rules a restart out; a restart within a minute is named, an old one the device
    did not come back from is said so."""
    now = 1790000000.0
    died = "connection lost: the device died or lost power or network"
    assert remote._will_text(now - 5, (3600, now), now) == died
    assert remote._will_text(now - 3, (5, now), now) == died
    assert remote._will_text(now - 5, None, now) == died + ", or the broker restarted"
    assert remote._will_text(None, (3600, now), now) == died + ", or the broker restarted"
    for heard in (now - 7, now - 20):
        assert remote._will_text(heard, (5, now), now) == \
            "connection lost: the device died, or the broker restarted 15 s ago or less and " \
            "it reconnects within 30 s: ask again in a minute"
    assert remote._will_text(now - 7200, (3600, now), now) == \
        "connection lost, not back since the broker restarted 60 min ago"
    assert remote._will_text(now - 3605, (3600, now), now) == died   # (within the uptime's age)


# -- item 12: a run that ended as asked is no failure --------------------------------------------

def test_finished_and_stopped_devices_are_listed_but_not_failed(broker, subscriber, tmp_path,
                                                                model_dir):
    """A finite source that ended (`finished`) and a daemon stopped with SIGTERM
    (`stopped`): `edge health --all` lists both under those states and exits 0 beside a
    healthy device; `edge health DEV` for one of them answers at once."""
    from tests.test_fleet import Fake, reply, report, status
    sub = subscriber("edge/#")
    done = start_daemon(tmp_path, model_dir, broker.url, "done1",
                        "test://?width=160&height=120&frames=5&fps=0")
    term = start_daemon(tmp_path, model_dir, broker.url, "term1",
                        "test://?width=160&height=120&fps=5")
    good = Fake(broker.port, "good1", lambda r: reply(r, report("good1")), status("good1"))
    try:
        assert done.wait(120) == 0, log_of(tmp_path, "done1")
        assert sub.wait_for(lambda s: last_status(s, "term1").get("state") == "online", 60), \
            log_of(tmp_path, "term1")
        term.send_signal(signal.SIGTERM)
        assert term.wait(30) == 0, log_of(tmp_path, "term1")
        assert last_status(sub, "done1")["reason"] == "finished"
        assert sub.wait_for(lambda s: last_status(s, "term1").get("reason") == "stopped", 5)

        rc, out, err = run_edge("health", "--all", "--json", "--mqtt", broker.url,
                                "--timeout", "10")
        results = json.loads(out)
        assert rc == 0, out + err
        assert results["good1"]["healthy"] and not results["good1"]["ended"]
        assert results["done1"]["state"] == "finished" and results["done1"]["ended"]
        assert results["term1"]["state"] == "stopped" and results["term1"]["ended"]
        assert abs(results["term1"]["last_heard"] - time.time()) < 60

        rc, out, err = run_edge("health", "--all", "--mqtt", broker.url, "--timeout", "10")
        rows = {line.split()[0]: line for line in out.splitlines()[1:]}
        assert rc == 0 and rows["done1"].split()[1] == "finished", out
        assert "not counted as a failure" in rows["term1"], out

        began = time.monotonic()
        rc, out, err = run_edge("health", "term1", "--mqtt", broker.url, "--timeout", "10")
        assert rc == 0 and "stopped at " in out, out + err
        assert time.monotonic() - began < 5, "a stopped device is not waited for"
    finally:
        good.close()
        for proc in (done, term):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- item 13: millimetres, as the payloads carry them -------------------------------------------

def test_listen_prints_distances_in_millimetres_like_the_payloads():
    messages = schemas.document()["components"]["messages"]
    stereo = next(e["payload"] for e in messages["Detections"]["examples"]
                  if any(d.get("spatial") for d in e["payload"]["detections"]))
    detection = next(d for d in stereo["detections"] if d.get("spatial"))
    text = listen.line(edge_client.parse("detections", stereo))
    assert " at x {:.0f} mm y {:.0f} mm z {:.0f} mm".format(
        detection["spatial"]["x"], detection["spatial"]["y"], detection["spatial"]["z"]) in text
    depth = messages["Depth"]["examples"][0]["payload"]
    message = edge_client.parse("depth", depth)
    assert "nearest {} mm at column".format(message.nearest()[0]) in listen.line(message)


# -- item 16: a fleet of 100 -------------------------------------------------------------------

class Fleet:
    """100 devices on one client: retained status and health each, a reply per request."""

    def __init__(self, port, count=100):
        from tests.test_fleet import report
        self.names = ["fleet{:03d}".format(i) for i in range(count)]
        self.reports = {name: report(name) for name in self.names}
        self.last_reply = None
        self.client = mqtt.make_client("fleet-{}".format(time.monotonic_ns()))
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.subscribe([("edge/_all/cmd/health", 1), ("edge/+/cmd/health", 1)])
        self.client.loop_start()
        for name in self.names:
            self.client.publish("edge/{}/status".format(name), mqtt.status_payload(
                name, "online", time.time()), qos=1, retain=True)
            self.client.publish("edge/{}/health".format(name), json.dumps(self.reports[name]),
                                qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, client, userdata, message):
        request = json.loads(message.payload)
        broadcast = message.topic.startswith("edge/_all/")
        for name in self.names if broadcast else [message.topic.split("/")[1]]:
            client.publish(request["reply_to"] + ("/" + name if broadcast else ""), json.dumps(
                {"v": 1, "id": request["id"], "ok": True, "result": self.reports[name]}), qos=1)
        self.last_reply = time.monotonic()

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.timing      # times a new process and a reply within 0.5 s: alone
def test_a_fleet_of_100_is_answered_and_the_command_ends_with_the_last_answer(broker):
    """The check ends right after the last answer (it waited out paho's 1 s select before),
    and the command answers 100 devices well within its timeout; nothing on its path
    imports numpy, OpenCV or ONNX."""
    fleet = Fleet(broker.port)
    try:
        for _ in range(3):
            results, code = remote.check(broker.url, [], timeout=5, all_devices=True)
            ended = time.monotonic()
            assert code == remote.EXIT_HEALTHY and len(results) == 100
            assert sum(r["answered"] for r in results.values()) == 100
            assert ended - fleet.last_reply < 0.5, ended - fleet.last_reply
        began = time.monotonic()
        rc, out, err = run_edge("health", "--all", "--json", "--mqtt", broker.url,
                                "--timeout", "5")
        took = time.monotonic() - began
        assert rc == 0 and len(json.loads(out)) == 100, err
        assert took < 4, took
        probe = ("import sys\nfrom edge import cli\ncli.main(['health', '--all', '--mqtt', "
                 "{!r}, '--timeout', '5'])\nprint(sorted({{m.split('.')[0] for m in "
                 "sys.modules}} & {{'numpy', 'cv2', 'scipy', 'onnx', 'onnxruntime'}}))"
                 ).format(broker.url)
        proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60,
                              env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        assert proc.stdout.decode().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    finally:
        fleet.close()


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["cam1", "--timeout", "0"], "--timeout 0: seconds, more than 0"),
    (["cam1", "--timeout", "nan"], "--timeout nan: seconds"),
    (["cam/1"], "device 'cam/1': use 1-64 letters"),
    (["cam1", "#"], "device '#'"),
    (["--all", "--prefix", "edge/#"], "--prefix 'edge/#'"),
])
def test_bad_health_flags_exit_78_with_one_line(args, words, capsys):
    assert cli.main(["health"] + args + ["--mqtt", "mqtt://127.0.0.1:1"]) == 78
    out, err = capsys.readouterr()
    assert out == "" and words in err and len(err.strip().splitlines()) == 1, err
