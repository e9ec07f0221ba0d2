"""`edge listen`: what robots receive, as readable lines or JSON lines, filtered (edge.client).

Messages come checked by edge.client (strict JSON, the API document's bounds, the sender
from the topic); every string in them is still a peer's text, printed through
edge.peertext.text (escaped, bounded), and times through peertext.when. JSON lines are
json.dumps of the checked payload: escaped by JSON itself, at most the client's max_payload.
Distances print in millimetres, as the payloads carry them, each with its unit.

A device's last will (`offline`, reason `connection lost`) cannot say when the device died:
its line says when the device was last heard (the latest time in its messages: with
`--topic status` the retained health reports are received too, unprinted, for their `ts`).
A broker that stops publishes every client's will (Mosquitto does), so the line of a will
that comes live waits WILL_GRACE s: if this listener lost the broker meanwhile, the line
says the broker went down with it. A device that comes back with the `since` it had before
its will never stopped: its line says so.
"""

import json
import sys
import time

from edge import client as edge_client
from edge import mqtt, peertext
from edge.errors import EXIT_OK, ConfigError
from edge.peertext import text as _text
from edge.peertext import when

CONNECT_TIMEOUT = 5.0       # s: for a broker that does not answer (a refusal ends it at once)
# s a live last will's line waits to see whether this listener loses the broker too
# (Mosquitto sends the wills, then closes every connection, within milliseconds)
WILL_GRACE = 1.5
PROBE_TIMEOUT = 1.0         # s: the check that the broker still takes connections


def _who(message):
    return _text(message.device) + ("/" + _text(message.camera) if message.camera else "")


def _mm(value):
    return "{:.0f} mm".format(value)


def _detection_text(d):
    text = "{} {:.2f} [{}]".format(_text(d.label), d.score,
                                   " ".join("{:.0f}".format(v) for v in d.box))
    if d.track_id is not None:
        text += " track {}".format(d.track_id)
    if d.spatial is not None:
        text += " at x {} y {} z {}".format(_mm(d.spatial.x), _mm(d.spatial.y),
                                            _mm(d.spatial.z))
    return text


def _frame_text(message):
    frame = message.frame
    return "seq {} frame {}{}".format(message.seq, frame.index,
                                      " " + _text(frame.name) if frame.name else "")


def _detections_line(message):
    return "{} detections {}: {}".format(
        _who(message), _frame_text(message),
        ", ".join(_detection_text(d) for d in message.detections) or "nothing")


def _event_line(message):
    where = " ".join(_text(v) for v in (message.zone, message.line, message.direction) if v)
    return "{} event seq {} frame {}: track {} {} {}{}".format(
        _who(message), message.seq, message.frame_index, message.track_id, _text(message.label),
        _text(message.type), " " + where if where else "")


def _depth_line(message):
    nearest = message.nearest()
    known = sum(1 for row in message.depth_mm for mm in row if mm is not None)
    return "{} depth {}: {}x{} grid, {} of {} cells known, nearest {}".format(
        _who(message), _frame_text(message), message.columns, message.rows, known,
        message.columns * message.rows, "-" if nearest is None else
        "{} at column {} row {}".format(_mm(nearest[0]), nearest[1], nearest[2]))


def _matches_line(message):
    return "{} matches {}: reference {}, {} matches, {} inliers, homography {}".format(
        _who(message), _frame_text(message), _text(message.reference["name"]), message.count,
        message.inliers, "found" if message.homography else "none")


def _status_line(message, heard=None, broker_down=None, stayed_up=False):
    """A status's line. A last will: when the device was last heard (`heard`, else the
    will's `since`, its connect time), and
    `broker_down` True when this listener lost the broker with it, False when it did not,
    None when unknown. `stayed_up`: the device is back with the state it had before its
    last will."""
    if mqtt.is_last_will(message.payload):
        last = _last_heard(message, heard)
        if broker_down:
            why = "connection lost as the broker went down, which publishes every device's " \
                  "last will; this listener lost the broker too: the device is probably " \
                  "alive and reports again once the broker is back"
        else:
            why = "connection lost: the device died or lost power or network{}".format(
                "" if broker_down is False else ", or the broker stopped, which publishes "
                "every device's last will")
        return "{} status offline, last heard {} ({})".format(_text(message.device),
                                                              when(last), why)
    return "{} status {} since {}{}{}".format(
        _text(message.device), _text(message.state), when(message.since),
        " ({})".format(_text(message.reason)) if message.reason else "",
        " (back without a restart: the offline before was a lost connection)"
        if stayed_up else "")


def _health_line(message):
    reasons = "; ".join(_text(r) for r in message.reasons[:10]) + (
        "; and {} more".format(len(message.reasons) - 10) if len(message.reasons) > 10 else "")
    return "{} health {}: {}".format(_text(message.device), _text(message.state),
                                     "healthy" if message.healthy else reasons or "unhealthy")


LINES = {"detections": _detections_line, "events": _event_line, "depth": _depth_line,
         "matches": _matches_line, "status": _status_line, "health": _health_line}


def line(message):
    """One readable line for a message of edge.client."""
    return LINES[message.kind](message)


def _valid(ts):
    """Whether a peer's time is one a clock can have (what peertext.when prints as such)."""
    return isinstance(ts, (int, float)) and not isinstance(ts, bool) and \
        0 <= ts <= peertext.LATEST


def _last_heard(will, heard):
    """When a device was last heard, at its last will: `heard` (its last report), or the
    will's `since` (when its connection began) where there is no later one."""
    return max([t for t in (heard, will.since) if _valid(t)] or [None])


def _heard_at(message):
    """The device's own time in a message (when it was alive), or None."""
    if message.kind == "health":
        return message.ts
    if message.kind == "status":
        return None if mqtt.is_last_will(message.payload) else message.since
    if message.kind == "events":
        return message.ts
    return message.frame.ts


class _Printer:
    """Writes the messages a listener asked for, one line each, at most `count`; keeps when
    each device was last heard; holds a live last will's line (and those after it, in
    order) for WILL_GRACE s, to tell a broker that went down from a device that did."""

    def __init__(self, client, out, wanted, as_json, count):
        self.client = client
        self.out = out
        self.wanted = wanted
        self.as_json = as_json
        self.count = count
        self.printed = 0
        self.heard = {}         # device -> latest device time seen in its messages
        self.wills = {}         # device -> last heard, when its will was printed
        self.held = []          # (message, last heard then) waiting behind a will
        self.due = None         # monotonic s when the held lines are printed
        self.connects = 0       # the client's connects when the first held will came

    def done(self):
        return self.count is not None and self.printed >= self.count

    def wait_s(self):
        """How long the next message may be waited for (None: as long as it takes)."""
        return None if self.due is None else max(0.0, self.due - time.monotonic())

    def take(self, message):
        heard = _heard_at(message)
        if _valid(heard) and heard > self.heard.get(message.device, 0.0):
            self.heard[message.device] = heard
        if message.kind not in self.wanted:
            return      # (health received for the times it carries)
        if self.as_json:
            self._write(json.dumps(message.payload, separators=(",", ":")))
            return
        entry = (message, self.heard.get(message.device))
        if self.held:
            self.held.append(entry)
        elif mqtt.is_last_will(message.payload) and not message.retained:
            self.held = [entry]
            self.due = time.monotonic() + WILL_GRACE
            self.connects = self.client.stats()["connects"]
        else:
            self._print(entry, None)

    def flush(self, force=False):
        """Print the held lines once their time has come (`force`: now, undecided)."""
        if not self.held or (not force and time.monotonic() < self.due):
            return
        broker_down = None if force else self._broker_down()
        held, self.held, self.due = self.held, [], None
        for entry in held:
            self._print(entry, broker_down)

    def _broker_down(self):
        """Whether this listener lost the broker since the held will came: it reconnected,
        or the broker takes no connection now."""
        if self.client.stats()["connects"] > self.connects:
            return True
        return mqtt.diagnose(self.client.settings, PROBE_TIMEOUT) is not None

    def _print(self, entry, broker_down):
        message, heard = entry
        if message.kind != "status":
            self._write(line(message))
            return
        if mqtt.is_last_will(message.payload):
            self.wills[message.device] = _last_heard(message, heard)
            self._write(_status_line(message, heard, broker_down))
            return
        before = self.wills.pop(message.device, None)
        stayed_up = message.state != "offline" and _valid(before) and \
            _valid(message.since) and message.since <= before
        self._write(_status_line(message, stayed_up=stayed_up))

    def _write(self, text):
        if self.done():
            return
        self.out.write(text + "\n")
        self.out.flush()     # line by line: a pipe sees each message as it comes
        self.printed += 1


def listen(url, devices, topics, cameras=None, labels=None, min_score=None, count=None,
           as_json=False, prefix="edge", credentials=None, out=None):
    """Print the messages until `count` (None: until interrupted); exit status."""
    out = out or sys.stdout
    topics = topics or ["detections"]
    if (labels or min_score is not None) and not set(topics) & set(edge_client.LABELLED_TOPICS):
        raise ConfigError("edge listen: --label and --min-score filter {}; --topic {} has "
                          "neither".format(" and ".join(edge_client.LABELLED_TOPICS),
                                           " ".join(topics)))
    if count is not None and count < 1:
        raise ConfigError("edge listen: --count {}: at least 1".format(count))
    received = list(topics)
    if not as_json and "status" in topics and "health" not in topics:
        received.append("health")   # for when a device was last heard; not printed
    # health first: the broker sends retained messages in the order of the subscriptions,
    # so a device's report is in before a retained will is printed
    received.sort(key=lambda topic: topic != "health")
    client = edge_client.Client(url, devices=devices, topics=received, cameras=cameras,
                                labels=labels, min_score=min_score, prefix=prefix,
                                **(credentials or {}))
    client.connect(CONNECT_TIMEOUT, retry=False)
    printer = _Printer(client, out, set(topics), as_json, count)
    try:
        # on stderr, so that stdout holds only messages (`--json | jq`); tests wait for it
        print("edge listen: subscribed to {} on {}".format(
            " ".join(client.subscriptions), client.settings["display"]), file=sys.stderr,
            flush=True)
        while not printer.done():
            for message in client.messages(timeout=printer.wait_s()):
                printer.take(message)
                printer.flush()
                if printer.done() or printer.due is not None:
                    break   # (to wait for the held lines' time with a timeout)
            printer.flush()
    finally:
        printer.flush(force=True)
        client.close()
    return EXIT_OK
