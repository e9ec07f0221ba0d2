"""`edge health`: ask devices for a fresh health report over MQTT, from any machine.

Exit status: 0 when every device answered healthy, 1 when any answered unhealthy (or with a
report that is not one), 2 when any did not answer within the timeout or is offline, and when
`--all` finds no device at all (2 wins over 1), so cron, Nagios-style checks and fleet CI can
use it as it is. `--all` lists every device whose status the broker retains, offline ones
(a crashed device's last will) included: a dead fleet is never green. A device whose run
ended as asked (retained status `offline`, reason `finished` or `stopped`) is listed as
`finished` or `stopped` and counts as no failure.

A fleet is asked with one message: `--all` publishes a single request on
`{prefix}/_all/cmd/health`, which every device takes, and each answers on
`{prefix}/_health/{session}/{device}` (the topic the broker lets that device alone write).
The answers are collected as they come, and the command ends as soon as every device whose
retained status is not offline has answered, or at the timeout. Devices of a version without
the broadcast are asked on their own `cmd/health` at half the timeout. A device named on the
command line whose retained status is offline is not waited for either: it cannot answer
(unless it comes back meanwhile; then it is asked again).

An offline device's last will cannot say when it died (it is written at connect): what is
printed is when it was last heard, its retained `health` report's `ts`, fetched for those
devices only. The broker's uptime (`$SYS/broker/uptime`, where its ACL lets us read it)
tells a will the broker published as it stopped (Mosquitto publishes every client's will
then) from a device's death.

What devices send is a peer's data. A device is the one its topic names: a reply whose
report names another device is malformed, a retained status or health report whose
`device` is not its topic's is none. Payloads are strict JSON (NaN and Infinity refused) of
at most MAX_PAYLOAD bytes; every string printed goes through edge.peertext (escaped,
bounded), every time through peertext.when.
"""

import json
import logging
import threading
import time
import uuid

from edge import mqtt, peertext, schemas, topics

logger = logging.getLogger(__name__)

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_SILENT = 0, 1, 2
MAX_PAYLOAD = 2 * 1024 * 1024   # bytes of a reply or status taken (edge.client's default)
MAX_STATE = 64                  # characters of a report's `state` (its values are words)
UPTIME_TOPIC = "$SYS/broker/uptime"     # Mosquitto's, retained: "N seconds"
# s: a device retries its broker at least this often (edge.mqtt.MqttLink's reconnect delay),
# so a will older than twice that since a broker restart is no reconnection still under way
RECONNECT_S = 30.0
# s: how old the broker's uptime may be (Mosquitto's default sys_interval: it publishes
# $SYS that often)
SYS_INTERVAL = 10.0
ENDED_TEXT = {"finished": "its source ended (a file, an image folder, --max-frames): not "
                          "counted as a failure",
              "stopped": "by a signal (systemctl stop, Ctrl-C): not counted as a failure"}


class _Malformed:
    """A reply that is no strict JSON, or too large to read: still a (bad) answer."""

    def __init__(self, why):
        self.why = why


def _offline(status):
    return isinstance(status, dict) and status.get("state") == "offline"


def _time(value):
    """A peer's unix time, or None when it is none a clock can have."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 <= value <= peertext.LATEST:
        return None
    return value


class Asker:
    """A short-lived MQTT client that sends `health` commands and collects the replies.

    `named`: the devices asked for; `fleet`: every device with a retained status too."""

    def __init__(self, settings, prefix, named=(), fleet=False):
        self.settings = settings
        self.prefix = prefix
        self.named = set(named)
        self.fleet = fleet
        self.session = uuid.uuid4().hex[:12]
        self.replies = {}           # device -> reply dict
        self.statuses = {}          # device -> retained status dict
        self.heard = {}             # device -> `ts` of its retained health report
        self.uptime = None          # (broker uptime s, time.time() when it came)
        self.back = set()           # devices whose status left `offline` meanwhile
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.settled = threading.Event()    # every retained message needed has arrived
        self.news = threading.Event()       # something arrived: the waiter looks again
        self.lock = threading.Lock()
        self._marks = {}            # SUBSCRIBE message id -> what its SUBACK means
        client = mqtt.make_client("edge-health-{}".format(self.session))
        mqtt.secure(client, settings)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def reply_topic(self, device=None):
        """Where a device answers: the session's topic plus the device (the broadcast's
        reply_to is the session's topic; each device adds its id)."""
        return topics.health_reply_topic(self.prefix, self.session, device)

    def _subscribe(self, client, filters, step):
        """SUBSCRIBE `filters`; `step` runs when the broker answers it."""
        _, mid = client.subscribe(filters)
        self._marks[mid] = step     # (in paho's thread, before any SUBACK is read)

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        if mqtt._reason_code(rc) == 0:
            # Statuses at QoS 0: a broker sends QoS 1 messages only a window at a time, and
            # the second SUBSCRIBE below must not overtake a fleet's worth of them. The
            # uptime is refused by brokers that keep $SYS from this user: nothing lost.
            self._subscribe(client, [(self.reply_topic("+"), 1),
                                     ("{}/+/status".format(self.prefix), 0),
                                     (UPTIME_TOPIC, 0)], self._statuses_asked)
            self.connected.set()

    def _statuses_asked(self, client):
        # The broker sends a subscription's retained messages before it answers the next
        # SUBSCRIBE on the same connection: the SUBACK of a repeat of the reply
        # subscription (which holds no retained message) marks the end of the statuses.
        self.subscribed.set()
        self._subscribe(client, [(self.reply_topic("+"), 1)], self._statuses_in)

    def _statuses_in(self, client):
        # Devices whose status is a last will: when they were last heard is the `ts` of
        # their retained health report, fetched for them alone (a fleet's reports are
        # large), with the same end marker.
        with self.lock:
            wills = sorted(d for d, s in self.statuses.items() if mqtt.is_last_will(s) and
                           (self.fleet or d in self.named))
        if not wills:
            self.settled.set()
            return
        self._subscribe(client, [("{}/{}/health".format(self.prefix, d), 0) for d in wills],
                        lambda client: None)
        self._subscribe(client, [(self.reply_topic("+"), 1)], lambda client: self.settled.set())

    def _on_subscribe(self, client, userdata, mid, *args):
        try:
            step = self._marks.pop(mid, None)
            if step is not None:
                step(client)
            self.news.set()
        except Exception:   # never let an exception end paho's network thread
            logger.exception("edge health: subscription")

    def _on_message(self, client, userdata, message):
        try:
            self._take(message.topic, message.payload)
            self.news.set()
        except Exception:   # never let an exception end paho's network thread
            logger.exception("edge health: message on %s", peertext.text(message.topic))

    def _take(self, topic, raw):
        if topic == UPTIME_TOPIC:
            seconds = raw.decode("ascii", "replace").split(" ")[0]
            if seconds.isdigit() and len(seconds) < 12:
                self.uptime = (int(seconds), time.time())
            return
        replies = self.reply_topic() + "/"
        if topic.startswith(replies):
            kind, device = "reply", topic[len(replies):]
        else:
            device, _, kind = topic[len(self.prefix) + 1:].rpartition("/")
            if kind not in ("status", "health"):
                return
        if topics.name_problem(device):
            return      # no device has this name (a rogue's topic): nothing to list
        if kind == "status" and not raw:
            with self.lock:     # a retained status being cleared: the device is retired
                self.statuses.pop(device, None)
            return
        if len(raw) > MAX_PAYLOAD:
            payload = _Malformed("{} bytes, over {}".format(len(raw), MAX_PAYLOAD))
        else:
            try:
                payload = schemas.loads(raw)
            except ValueError as e:
                payload = _Malformed("not UTF-8 JSON: {}".format(_short(str(e), 80)))
        # who sent it is its topic: a status or report that names another device is none
        trusted = isinstance(payload, dict) and payload.get("device") == device
        with self.lock:
            if kind == "reply":
                self.replies[device] = payload
            elif kind == "health":
                if trusted and _time(payload.get("ts")) is not None:
                    self.heard[device] = payload["ts"]
            else:
                if _offline(self.statuses.get(device)) and trusted and not _offline(payload):
                    self.back.add(device)
                self.statuses[device] = payload if trusted else {}

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
            self.close()
            raise UnavailableError("mqtt {}: no connection within {:.0f} s; check --mqtt and "
                                   "the broker".format(self.settings["display"], timeout))

    def request(self):
        return {"id": "health-{}".format(self.session), "reply_to": self.reply_topic()}

    def broadcast(self):
        """One request every device takes; each answers on reply_topic(its id)."""
        self.client.publish(topics.broadcast_topic(self.prefix, "health"),
                            json.dumps(self.request()), qos=1)

    def ask(self, devices):
        """A request on each device's own command topic."""
        for device in devices:
            request = {"id": "health-{}".format(self.session),
                       "reply_to": self.reply_topic(device)}
            self.client.publish("{}/{}/cmd/health".format(self.prefix, device),
                                json.dumps(request), qos=1)

    def waiting_for(self):
        """Devices that have not answered yet and may: the named ones and, for a fleet,
        every device with a retained status, less those whose status is offline (nobody
        there to answer)."""
        with self.lock:
            expected = set(self.named) | (set(self.statuses) if self.fleet else set())
            return sorted(d for d in expected
                          if d not in self.replies and not _offline(self.statuses.get(d)))

    def wait(self, timeout, retry_at=None):
        """Until everyone expected answered and the retained messages are in, or the
        timeout; at `retry_at` s, those still silent are asked on their own topic, and a
        device that comes back from offline meanwhile is asked at once."""
        started = time.monotonic()
        asked_back = set()
        while True:
            self.news.clear()       # (before looking: news from now on wakes the wait below)
            with self.lock:
                back = sorted(self.back - asked_back)
            if back:
                asked_back.update(back)
                self.ask(back)
            silent = self.waiting_for()
            if not silent and self.settled.is_set():
                return
            elapsed = time.monotonic() - started
            if elapsed >= timeout:
                return
            if retry_at is not None and elapsed >= retry_at:
                retry_at = None
                self.ask(silent)
            until = timeout if retry_at is None else min(timeout, retry_at)
            self.news.wait(max(0.0, until - elapsed))

    def close(self):
        # DISCONNECT first: it wakes paho's thread, which then ends at once (stopped first,
        # the thread sits out its 1 s select timeout)
        self.client.disconnect()
        self.client.loop_stop()


def check(url, devices, prefix="edge", timeout=5.0, all_devices=False, credentials=None):
    """{device: result} with result {"answered", "healthy", "state", "reasons", "report",
    "ended", "last_heard"}; the exit status.

    `credentials`: keyword arguments of edge.mqtt.with_credentials (user, TLS files).
    `all_devices`: also every device whose status the broker retains, or that answers the
    broadcast; those whose status is offline are asked too (they may be back) but not
    waited for. `ended`: the device's run ended as asked (finished, stopped): listed, not a
    failure. `last_heard`: the device's unix time of its latest word (report, goodbye,
    retained health report for a last will), None when unknown.
    """
    from edge.errors import ConfigError
    if topics.prefix_problem(prefix):
        raise ConfigError("edge health: --prefix {!r}: {}".format(
            prefix, topics.PREFIX_RULE if isinstance(prefix, str) else "a string"))
    for device in devices:
        if topics.name_problem(device):   # a topic level: no / + # (a `#` would subscribe)
            raise ConfigError("edge health: device {!r}: use 1-64 letters, digits, _ . - (no / "
                              "+ # or spaces)".format(device))
    settings = mqtt.with_credentials(mqtt.parse_url(url), **(credentials or {}))
    asker = Asker(settings, prefix, devices, all_devices)
    started = time.monotonic()
    asker.start(timeout)
    try:
        left = max(0.0, timeout - (time.monotonic() - started))
        if all_devices:
            asker.broadcast()
            asker.wait(left, retry_at=left / 2)
        else:
            asker.ask(devices)
            asker.wait(left)
        with asker.lock:
            replies = dict(asker.replies)
            statuses = dict(asker.statuses)
            heard = dict(asker.heard)
    finally:
        asker.close()
    if all_devices:
        devices = sorted(set(devices) | set(statuses) | set(replies))
    results = {device: _result(device, replies.get(device), statuses.get(device) or {},
                               timeout, heard.get(device), asker.uptime)
               for device in devices}
    counted = [r for r in results.values() if not r["ended"]]
    if not results or any(not r["answered"] for r in counted):
        code = EXIT_SILENT
    elif any(not r["healthy"] for r in counted):
        code = EXIT_UNHEALTHY
    else:
        code = EXIT_HEALTHY
    return results, code


def _result(device, reply, status, timeout, heard=None, uptime=None):
    """One device's result from its reply (None: no answer), its retained status, the `ts`
    of its retained health report and the broker's uptime (s, unix s when it came)."""
    result = {"answered": False, "healthy": False, "state": None, "report": None,
              "ended": False, "last_heard": None}
    if reply is None:
        state = status.get("state")
        if state != "offline":
            result.update(state=state if isinstance(state, str) and len(state) <= MAX_STATE
                          else None, reasons=["no answer within {:.0f} s".format(timeout)])
            return result
        reason, since = status.get("reason"), _time(status.get("since"))
        if isinstance(reason, str) and reason in ENDED_TEXT:
            result.update(state=reason, ended=True, last_heard=since, reasons=[
                "{} at {}: {}".format(reason, peertext.when(since), ENDED_TEXT[reason])])
        elif mqtt.is_last_will(status):
            # a will's `since` is its connect time: the last report is later, if any
            last = max([t for t in (heard, since) if t is not None] or [None])
            result.update(state="offline", last_heard=last, reasons=[
                "offline, last heard {} ({})".format(peertext.when(last),
                                                     _will_text(last, uptime))])
        else:
            result.update(state="offline", last_heard=since, reasons=[
                "offline since {}{}".format(peertext.when(since), " ({})".format(
                    _short(reason)) if isinstance(reason, str) else "")])
        return result
    result["answered"] = True
    problem = _problem(reply, device)
    if problem is not None:
        result["reasons"] = ["malformed health reply ({}); is it an edge device of a "
                             "compatible version?".format(problem)]
        return result
    if not reply["ok"]:
        result["reasons"] = [_short(reply["error"]["message"])]
        return result
    report = reply["result"]
    result.update(healthy=report["verdict"]["healthy"], state=report["state"], report=report,
                  reasons=[_short(r) for r in report["verdict"]["reasons"]],
                  last_heard=_time(report.get("ts")))
    return result


def _will_text(heard, uptime, now=None):
    """What a last will means here. Mosquitto publishes every client's will as it stops, so
    the broker's uptime (N, when it came) tells whether a restart may have sent it: the
    broker started between SYS_INTERVAL s before and the moment N s before the uptime came.
    Two clocks' times: a hint, not a proof."""
    died = "connection lost: the device died or lost power or network"
    if heard is None or uptime is None:
        return died + ", or the broker restarted"
    started_by = uptime[1] - uptime[0]
    if heard > started_by:
        return died     # heard from after the broker started: no restart since
    ago = (time.time() if now is None else now) - (started_by - SYS_INTERVAL)
    if ago < 2 * RECONNECT_S:
        return "connection lost: the device died, or the broker restarted {:.0f} s ago or " \
               "less and it reconnects within {:.0f} s: ask again in a minute".format(
                   ago, RECONNECT_S)
    if heard < started_by - SYS_INTERVAL:
        return "connection lost, not back since the broker restarted {:.0f} min ago".format(
            ago / 60.0)
    return died


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
