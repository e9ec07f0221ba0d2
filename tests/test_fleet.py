"""tools/fleet with a small fleet: real daemons come online, `edge health --all` asks them with
one broadcast request and every one answers; the tool reports the figures it measured."""

import json
import os
import subprocess
import sys
import time

from tests.conftest import ROOT, SHARED, run_edge


def test_tools_fleet_with_five_daemons(tmp_path):
    out = str(tmp_path / "fleet.json")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fleet.py"), "5",
                           "--rounds", "2", "--timeout", "20", "--json", out,
                           "--mirror", os.path.join(SHARED, "models")],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300)
    text = proc.stdout.decode()
    assert proc.returncode == 0, text
    result = json.load(open(out))
    assert result["started"] == result["online"] == 5 and result["time_to_online_s"] > 0
    for round_ in result["health_all"]:
        # one request reached the fleet; nobody had to be asked on its own topic (that
        # happens only at half the timeout, for devices that stayed silent)
        assert round_["answered"] == round_["healthy"] == round_["listed"] == 5, round_
        assert round_["exit"] == 0 and round_["broadcast_requests"] == 1, round_
        assert round_["direct_requests"] == 0, round_
    assert 20 < result["rss_mb"]["mean"] < 1000 and 0 < result["pss_mb"]["mean"]
    assert "time to online" in text and "edge health --all #2" in text
    assert not os.path.exists(result["folder"])      # cleaned up without --keep


# -- hostile devices (issue 23): `edge health --all` against fakes on a real broker ----------

class Fake:
    """A client posing as device `name`: a retained status (bytes) and `answer(request)` as
    the raw reply to every health request, broadcast or its own."""

    def __init__(self, port, name, answer, status):
        from edge.mqtt import make_client
        self.client = make_client("fake-" + name)
        self.client.connect("127.0.0.1", port, 30)

        def on_message(client, userdata, msg):
            request = json.loads(msg.payload)
            topic = request["reply_to"]
            if msg.topic.startswith("edge/_all/"):
                topic += "/" + name
            client.publish(topic, answer(request), qos=1)
        self.client.on_message = on_message
        self.client.subscribe([("edge/{}/cmd/health".format(name), 1),
                               ("edge/_all/cmd/health", 1)])
        self.client.loop_start()
        self.client.publish("edge/{}/status".format(name), status, qos=1,
                            retain=True).wait_for_publish(5)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def report(device, healthy=True, reasons=(), state="online"):
    """A health report as a device makes it (edge.health over a daemon without a pipeline)."""
    from edge.health import Health
    from tests.test_schemas import LIMITS, App
    app = App()
    app.device = device
    made = Health(app, 10.0, LIMITS).report()
    made.update(state=state, verdict={"healthy": healthy, "reasons": list(reasons)})
    return made


def reply(request, result):
    return json.dumps({"v": 1, "id": request["id"], "ok": True, "result": result}).encode()


def status(device, **changes):
    from edge.mqtt import status_payload
    payload = json.loads(status_payload(device, "online", time.time()).decode())
    payload.update(changes)
    return json.dumps(payload).encode()


def test_edge_health_all_against_hostile_devices(broker):
    """A device that claims another's name in its report, forged rows and escape codes in
    reasons, a 1 MB state, NaN in a report, a status `since` 1e300 or NaN: each device is
    listed under its topic's name only, escaped, bounded, and nothing forged reads as
    healthy."""
    forged_row = "\ngood      online  detect=30.0  40      50     healthy"
    fakes = {
        "good": (lambda r: reply(r, report("good")), status("good")),
        # claims to be `good` (and healthy) in its report
        "forger": (lambda r: reply(r, report("good")), status("forger")),
        # an unhealthy verdict whose reason forges a healthy row and sets the terminal
        "injector": (lambda r: reply(r, report("injector", False, [
            "\x1b[2J\x1b[32m" + forged_row, "\u202eyhtlaeh"], "degraded")), status("injector")),
        "bigstate": (lambda r: reply(r, report("bigstate", state="A" * 1000000)),
                     status("bigstate")),
        "nan": (lambda r: reply(r, report("nan")).replace(b'"uptime_s": ', b'"uptime_s": NaN, '
                                                          b'"x": '), status("nan")),
    }
    # silent devices whose retained status is offline with a wild `since`
    # (a status that is no strict JSON is no status: its device must answer)
    silent = {"far": status("far", state="offline", since=1e300, reason="connection lost"),
              "nanny": status("nanny", state="offline", since=float("nan")),
              "esc": status("esc", state="offline", reason="\x1b[31mconnection lost\nx")}
    started = [Fake(broker.port, name, answer, st) for name, (answer, st) in fakes.items()]
    from tests.conftest import Subscriber
    pub = Subscriber(broker.port, "nothing/here")
    for name, payload in silent.items():
        pub.client.publish("edge/{}/status".format(name), payload, qos=1,
                           retain=True).wait_for_publish(5)
    # a retained status on another device's topic that claims to be `good`, offline
    pub.client.publish("edge/impostor/status", status("good", state="offline"), qos=1,
                       retain=True).wait_for_publish(5)
    try:
        rc, out, err = run_edge("health", "--all", "--mqtt", broker.url, "--timeout", "4")
        rc_json, out_json, err_json = run_edge("health", "--all", "--json", "--mqtt", broker.url,
                                               "--timeout", "4")
    finally:
        for fake in started:
            fake.close()
        pub.close()
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == 2, out + err       # far, nanny and impostor are silent
    for bad in ("\x1b", "\u202e", "\r"):
        assert bad not in out, out
    assert len(out) < 20000, len(out)
    lines = out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == sorted(list(fakes) + list(silent) + ["impostor"]), out
    assert len(lines) == 1 + len(rows)
    assert rows["good"].rstrip().endswith("healthy") and "malformed" not in rows["good"]
    for name in ("forger", "bigstate", "nan"):
        assert "malformed health reply" in rows[name] and "healthy" != rows[name].split()[-1], \
            rows[name]
    assert "names device good" in rows["forger"]
    assert "\\x1b[2J" in rows["injector"] and rows["injector"].split()[1] == "degraded"
    assert "offline, last heard an unknown time" in rows["far"]     # a will: no `since`
    assert "no answer" in rows["nanny"]
    assert "offline since" in rows["esc"] and "\\x1b[31mconnection lost\\nx" in rows["esc"]
    results = json.loads(out_json)
    assert rc_json == 2 and sorted(results) == sorted(rows)
    assert results["good"]["healthy"] and not results["forger"]["healthy"]
    assert not results["impostor"]["answered"] and results["impostor"]["state"] is None
    assert len(out_json) < 200000, len(out_json)
