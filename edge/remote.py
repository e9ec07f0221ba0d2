"""`edge health`: ask devices for a fresh health report over MQTT, from any machine.

Exit status: 0 when every device answered healthy, 1 when any answered unhealthy (or with a
report that is not one), 2 when any did not answer within the timeout or is offline, and when
`--all` finds no device at all (2 wins over 1), so cron, Nagios-style checks and fleet CI can
use it as it is. `--all` lists every device whose status the broker retains, offline ones
(a crashed device's last will) included: a dead fleet is never green.
"""

import json
import logging
import threading
import time
import uuid

from edge import mqtt

logger = logging.getLogger(__name__)

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_SILENT = 0, 1, 2
_MALFORMED = object()       # a reply whose payload is not JSON


class Asker:
    """A short-lived MQTT client that sends `health` commands and collects the replies."""

    def __init__(self, settings, prefix):
        self.settings = settings
        self.prefix = prefix
        self.session = uuid.uuid4().hex[:12]
        self.replies = {}           # device -> reply dict
        self.statuses = {}          # device -> retained status dict
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        client = mqtt.make_client("edge-health-{}".format(self.session))
        mqtt.secure(client, settings)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *args: self.subscribed.set()
        client.on_message = self._on_message
        self.client = client

    def reply_topic(self, device):
        return "{}/_health/{}/{}".format(self.prefix, self.session, device)

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        if mqtt._reason_code(rc) == 0:
            client.subscribe([("{}/_health/{}/+".format(self.prefix, self.session), 1),
                              ("{}/+/status".format(self.prefix), 1)])
            self.connected.set()

    def _on_message(self, client, userdata, message):
        try:
            parts = message.topic.split("/")
            if message.topic.endswith("/status") and not message.payload:
                with self.lock:     # a retained status being cleared: the device is retired
                    self.statuses.pop(parts[-2], None)
                return
            try:
                payload = json.loads(message.payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                payload = _MALFORMED    # a reply that is no JSON is still a (bad) answer
            with self.lock:
                if message.topic.endswith("/status"):
                    self.statuses[parts[-2]] = payload if isinstance(payload, dict) else {}
                elif "/_health/" in message.topic:
                    self.replies[parts[-1]] = payload
        except Exception:   # never let an exception end paho's network thread
            logger.exception("edge health: message on %s", message.topic)

    def start(self, timeout):
        from edge.errors import UnavailableError
        try:
            self.client.connect(self.settings["host"], self.settings["port"],
                                self.settings["keepalive"])
        except (OSError, ValueError) as e:
            raise UnavailableError("mqtt {}: cannot connect ({}); check --mqtt".format(
                self.settings["display"], getattr(e, "strerror", None) or e))
        self.client.loop_start()
        if not (self.connected.wait(timeout) and self.subscribed.wait(timeout)):
            self.client.loop_stop()
            raise UnavailableError("mqtt {}: no connection within {:.0f} s; check --mqtt and "
                                   "the broker".format(self.settings["display"], timeout))

    def ask(self, devices):
        for device in devices:
            request = {"id": "health-{}".format(self.session),
                       "reply_to": self.reply_topic(device)}
            self.client.publish("{}/{}/cmd/health".format(self.prefix, device),
                                json.dumps(request), qos=1)

    def wait(self, devices, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(d in self.replies for d in devices):
                    return
            time.sleep(0.05)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def check(url, devices, prefix="edge", timeout=5.0, all_devices=False, credentials=None):
    """{device: result} with result {"answered", "healthy", "state", "reasons", "report"};
    the exit status.

    `credentials`: keyword arguments of edge.mqtt.with_credentials (user, TLS files).
    `all_devices`: also every device whose status the broker retains; those whose status is
    offline are asked too (they may be back) but not waited for.
    """
    settings = mqtt.with_credentials(mqtt.parse_url(url), **(credentials or {}))
    asker = Asker(settings, prefix)
    asker.start(timeout)
    try:
        waited = list(devices)
        if all_devices:
            time.sleep(min(1.0, timeout))      # retained statuses arrive right after subscribe
            with asker.lock:
                known = dict(asker.statuses)
            waited += [d for d, s in known.items() if s.get("state") != "offline"]
            devices = sorted(set(devices) | set(known))
        asker.ask(devices)
        asker.wait(sorted(set(waited)), timeout)
        with asker.lock:
            replies = dict(asker.replies)
            statuses = dict(asker.statuses)
    finally:
        asker.close()
    results = {device: _result(replies.get(device), statuses.get(device) or {}, timeout)
               for device in devices}
    if not results or any(not r["answered"] for r in results.values()):
        code = EXIT_SILENT
    elif any(not r["healthy"] for r in results.values()):
        code = EXIT_UNHEALTHY
    else:
        code = EXIT_HEALTHY
    return results, code


def _result(reply, status, timeout):
    """One device's result from its reply (None: no answer) and its retained status."""
    if reply is None:
        if status.get("state") == "offline":
            reason = status.get("reason")
            since = status.get("since")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(
                since, (int, float)) and not isinstance(since, bool) and \
                0 <= since < 2 ** 33 else "an unknown time"
            return {"answered": False, "healthy": False, "state": "offline", "report": None,
                    "reasons": ["offline since {}{}".format(when, " ({})".format(
                        _short(reason)) if isinstance(reason, str) else "")]}
        return {"answered": False, "healthy": False, "report": None,
                "state": status.get("state") if isinstance(status.get("state"), str) else None,
                "reasons": ["no answer within {:.0f} s".format(timeout)]}
    problem = _problem(reply)
    if problem is not None:
        return {"answered": True, "healthy": False, "state": None, "report": None,
                "reasons": ["malformed health reply ({}); is it an edge device of a "
                            "compatible version?".format(problem)]}
    if not reply["ok"]:
        return {"answered": True, "healthy": False, "state": None, "report": None,
                "reasons": [_short(reply["error"]["message"])]}
    report = reply["result"]
    return {"answered": True, "healthy": report["verdict"]["healthy"], "state": report["state"],
            "reasons": [_short(r) for r in report["verdict"]["reasons"]], "report": report}


def _problem(reply):
    """What is wrong with a reply to `health` (a rogue or old device), or None."""
    if reply is _MALFORMED:
        return "not UTF-8 JSON"
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return "not a reply object with `ok`"
    if not reply["ok"]:
        error = reply.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return "an error without `error.message`"
        return None
    report = reply.get("result")
    if not isinstance(report, dict):
        return "no `result` object"
    verdict = report.get("verdict")
    if not isinstance(verdict, dict) or not isinstance(verdict.get("healthy"), bool) or \
            not isinstance(verdict.get("reasons"), list) or \
            not all(isinstance(r, str) for r in verdict["reasons"]):
        return "no `verdict` with `healthy` and `reasons`"
    if not isinstance(report.get("state"), str):
        return "no `state`"
    return None


def _short(text, limit=200):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mapping(value):
    return value if isinstance(value, dict) else {}


def table(results):
    """A readable table: device, state, fps per task, temperature, verdict. Parts of a report
    that are missing or of the wrong type show as `-`."""
    rows = [("DEVICE", "STATE", "FPS", "TEMP C", "MEM %", "VERDICT")]
    for device, r in sorted(results.items()):
        report = r["report"] or {}
        tasks = _mapping(report.get("tasks"))
        fps = " ".join("{}={}".format(n, "-" if _number(_mapping(t).get("fps")) is None
                                      else _mapping(t)["fps"])
                       for n, t in sorted(tasks.items())) or "-"
        system = _mapping(report.get("system"))
        temps = [v for v in _mapping(system.get("temperatures")).values()
                 if _number(v) is not None]
        memory = _number(_mapping(system.get("memory")).get("used_percent"))
        verdict = "healthy" if r["healthy"] else "; ".join(r["reasons"]) or "unhealthy"
        rows.append((device, r["state"] or ("silent" if not r["answered"] else "-"), fps,
                     "{:.0f}".format(max(temps)) if temps else "-",
                     "-" if memory is None else "{:.0f}".format(memory), verdict))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row[:5], widths)) + "  " + row[5]
                     for row in rows)
