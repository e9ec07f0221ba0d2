"""`edge health`: ask devices for a fresh health report over MQTT, from any machine.

Exit status: 0 when every device answered healthy, 1 when any answered unhealthy (or with a
report that is not one), 2 when any did not answer within the timeout or is offline, and when
`--all` finds no device at all (2 wins over 1), so cron, Nagios-style checks and fleet CI can
use it as it is. `--all` lists every device whose status the broker retains, offline ones
(a crashed device's last will) included: a dead fleet is never green.

A fleet is asked with one message: `--all` publishes a single request on
`{prefix}/_all/cmd/health`, which every device takes, and each answers on
`{prefix}/_health/{session}/{device}` (the topic the broker lets that device alone write).
The answers are collected as they come, and the command ends as soon as every device whose
retained status is not offline has answered, or at the timeout. Devices of a version without
the broadcast are asked on their own `cmd/health` at half the timeout.

What devices send is a peer's data. A device is the one its topic names: a reply whose
report names another device is malformed, a retained status whose `device` is not its
topic's is no status. Payloads are strict JSON (NaN and Infinity refused) of at most
MAX_PAYLOAD bytes; every string printed goes through edge.peertext (escaped, bounded), every
time through peertext.when.
"""

import json
import logging
import threading
import time
import uuid

from edge import config, mqtt, peertext, schemas

logger = logging.getLogger(__name__)

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_SILENT = 0, 1, 2
MAX_PAYLOAD = 2 * 1024 * 1024   # bytes of a reply or status taken (edge.client's default)
MAX_STATE = 64                  # characters of a report's `state` (its values are words)


class _Malformed:
    """A reply that is no strict JSON, or too large to read: still a (bad) answer."""

    def __init__(self, why):
        self.why = why


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
        self.settled = threading.Event()    # the retained statuses have all arrived
        self.lock = threading.Lock()
        client = mqtt.make_client("edge-health-{}".format(self.session))
        mqtt.secure(client, settings)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def reply_topic(self, device=None):
        """Where a device answers: the session's topic plus the device (the broadcast's
        reply_to is the session's topic; each device adds its id)."""
        topic = "{}/_health/{}".format(self.prefix, self.session)
        return topic if device is None else "{}/{}".format(topic, device)

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        if mqtt._reason_code(rc) == 0:
            # Statuses at QoS 0: a broker sends QoS 1 messages only a window at a time, and
            # the second SUBSCRIBE below must not overtake a fleet's worth of them.
            client.subscribe([(self.reply_topic("+"), 1),
                              ("{}/+/status".format(self.prefix), 0)])
            self.connected.set()

    def _on_subscribe(self, client, userdata, *args):
        # The broker sends a subscription's retained messages before it answers the next
        # SUBSCRIBE on the same connection: the second SUBACK (of a repeat of the reply
        # subscription, which holds no retained message) marks the end of the statuses.
        if not self.subscribed.is_set():
            self.subscribed.set()
            client.subscribe(self.reply_topic("+"), 1)
        else:
            self.settled.set()

    def _on_message(self, client, userdata, message):
        try:
            parts = message.topic.split("/")
            device = parts[-2] if message.topic.endswith("/status") else parts[-1]
            if config._device_id(device):
                return      # no device has this name (a rogue's topic): nothing to list
            if message.topic.endswith("/status") and not message.payload:
                with self.lock:     # a retained status being cleared: the device is retired
                    self.statuses.pop(parts[-2], None)
                return
            if len(message.payload) > MAX_PAYLOAD:
                payload = _Malformed("{} bytes, over {}".format(len(message.payload),
                                                                 MAX_PAYLOAD))
            else:
                try:
                    payload = schemas.loads(message.payload)
                except ValueError as e:
                    payload = _Malformed("not UTF-8 JSON: {}".format(_short(str(e), 80)))
            with self.lock:
                if message.topic.endswith("/status"):
                    # who sent it is its topic: a status that names another device is none
                    trusted = isinstance(payload, dict) and payload.get("device") == parts[-2]
                    self.statuses[parts[-2]] = payload if trusted else {}
                elif "/_health/" in message.topic:
                    self.replies[parts[-1]] = payload
        except Exception:   # never let an exception end paho's network thread
            logger.exception("edge health: message on %s", peertext.text(message.topic))

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

    def request(self):
        return {"id": "health-{}".format(self.session), "reply_to": self.reply_topic()}

    def broadcast(self):
        """One request every device takes; each answers on reply_topic(its id)."""
        self.client.publish("{}/{}/cmd/health".format(self.prefix, mqtt.BROADCAST_LEVEL),
                            json.dumps(self.request()), qos=1)

    def ask(self, devices):
        """A request on each device's own command topic."""
        for device in devices:
            request = {"id": "health-{}".format(self.session),
                       "reply_to": self.reply_topic(device)}
            self.client.publish("{}/{}/cmd/health".format(self.prefix, device),
                                json.dumps(request), qos=1)

    def waiting_for(self, named, fleet):
        """Devices that have not answered yet: the named ones and, with `fleet`, every device
        whose retained status is not offline."""
        with self.lock:
            expected = set(named)
            if fleet:
                expected |= {d for d, s in self.statuses.items() if s.get("state") != "offline"}
            return sorted(d for d in expected if d not in self.replies)

    def wait(self, named, fleet, timeout, retry_at=None):
        """Until everyone expected answered (and, with `fleet`, the statuses are in) or the
        timeout; at `retry_at` s, those still silent are asked on their own topic."""
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            silent = self.waiting_for(named, fleet)
            if not silent and (not fleet or self.settled.is_set()):
                return
            if elapsed >= timeout:
                return
            if retry_at is not None and elapsed >= retry_at:
                retry_at = None
                self.ask(silent)
            time.sleep(0.02)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def check(url, devices, prefix="edge", timeout=5.0, all_devices=False, credentials=None):
    """{device: result} with result {"answered", "healthy", "state", "reasons", "report"};
    the exit status.

    `credentials`: keyword arguments of edge.mqtt.with_credentials (user, TLS files).
    `all_devices`: also every device whose status the broker retains, or that answers the
    broadcast; those whose status is offline are asked too (they may be back) but not
    waited for.
    """
    settings = mqtt.with_credentials(mqtt.parse_url(url), **(credentials or {}))
    asker = Asker(settings, prefix)
    started = time.monotonic()
    asker.start(timeout)
    try:
        left = max(0.0, timeout - (time.monotonic() - started))
        if all_devices:
            asker.broadcast()
            asker.wait(devices, True, left, retry_at=left / 2)
        else:
            asker.ask(devices)
            asker.wait(devices, False, left)
        with asker.lock:
            replies = dict(asker.replies)
            statuses = dict(asker.statuses)
    finally:
        asker.close()
    if all_devices:
        devices = sorted(set(devices) | set(statuses) | set(replies))
    results = {device: _result(device, replies.get(device), statuses.get(device) or {}, timeout)
               for device in devices}
    if not results or any(not r["answered"] for r in results.values()):
        code = EXIT_SILENT
    elif any(not r["healthy"] for r in results.values()):
        code = EXIT_UNHEALTHY
    else:
        code = EXIT_HEALTHY
    return results, code


def _result(device, reply, status, timeout):
    """One device's result from its reply (None: no answer) and its retained status."""
    if reply is None:
        if status.get("state") == "offline":
            reason = status.get("reason")
            return {"answered": False, "healthy": False, "state": "offline", "report": None,
                    "reasons": ["offline since {}{}".format(
                        peertext.when(status.get("since")), " ({})".format(
                            _short(reason)) if isinstance(reason, str) else "")]}
        state = status.get("state")
        return {"answered": False, "healthy": False, "report": None,
                "state": state if isinstance(state, str) and len(state) <= MAX_STATE else None,
                "reasons": ["no answer within {:.0f} s".format(timeout)]}
    problem = _problem(reply, device)
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


def _problem(reply, device):
    """What is wrong with a reply to `health` (a rogue or old device), or None."""
    if isinstance(reply, _Malformed):
        return reply.why
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
    if not isinstance(report.get("state"), str) or len(report["state"]) > MAX_STATE:
        return "no `state` (a word of at most {} characters)".format(MAX_STATE)
    if "device" in report and report["device"] != device:
        # who sent it is its topic (the one topic the example ACL lets that device write)
        return "the report names device {}".format(peertext.text(report["device"], 64))
    return None


def _short(text, limit=200):
    """A peer's string, at most `limit` characters (as data: escaped when printed)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number(value):
    """A figure of a report to show: a number of at most 9 digits before the point, else
    None (a rogue's 1e300 would print 301 of them)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and \
        -1e9 < value < 1e9 else None


def _mapping(value):
    return value if isinstance(value, dict) else {}


def table(results):
    """A readable table: device, state, fps per task, temperature, verdict. Parts of a report
    that are missing or of the wrong type show as `-`; every string of a device's is
    escaped and bounded (edge.peertext), at most 8 tasks and 10 reasons a row."""
    text = peertext.text
    rows = [("DEVICE", "STATE", "FPS", "TEMP C", "MEM %", "VERDICT")]
    for device, r in sorted(results.items()):
        report = r["report"] or {}
        tasks = sorted(_mapping(report.get("tasks")).items())
        fps = " ".join("{}={}".format(text(n, 32), "-" if _number(_mapping(t).get("fps")) is None
                                      else _mapping(t)["fps"])
                       for n, t in tasks[:8]) + (" ..." if len(tasks) > 8 else "") or "-"
        system = _mapping(report.get("system"))
        temps = [v for v in _mapping(system.get("temperatures")).values()
                 if _number(v) is not None]
        memory = _number(_mapping(system.get("memory")).get("used_percent"))
        reasons = [text(reason) for reason in r["reasons"][:10]]
        if len(r["reasons"]) > 10:
            reasons.append("and {} more".format(len(r["reasons"]) - 10))
        verdict = "healthy" if r["healthy"] else "; ".join(reasons) or "unhealthy"
        rows.append((text(device, 64), text(r["state"], MAX_STATE) if r["state"] else
                     ("silent" if not r["answered"] else "-"), fps,
                     "{:.0f}".format(max(temps)) if temps else "-",
                     "-" if memory is None else "{:.0f}".format(memory), verdict))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row[:5], widths)) + "  " + row[5]
                     for row in rows)
