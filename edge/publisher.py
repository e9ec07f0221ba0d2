"""The publisher: a bounded queue between the tasks and the sinks (MQTT, JSONL).

`put` never blocks a task: when the queue is full the oldest message is dropped and counted.
Results have that queue to themselves: replies to commands, snapshots and health reports
(`control`) wait in a small lane of their own, sent first, so a flood of commands can never
displace a detection (nor a result backlog a health probe's answer).
One thread ("publish") serialises each message once, appends it to the JSONL file, and hands
it to MQTT when connected. While the broker is away, messages wait in the same bounded queue
(oldest dropped first, counted) and leave in order after the reconnect.

Delivery: QoS 1 messages are at least once. paho keeps a QoS 1 message it took until the
broker acknowledges it and sends it again (flagged DUP) after a reconnect, so a broker that
goes away between receiving a message and acknowledging it gets it twice. Order holds across
a reconnect: no new message is handed to paho until the ones it is re-sending from the
previous connection are acknowledged (paho would otherwise send new ones first: our
on_connect runs before its re-send loop). QoS 0 messages are at most once.

Memory: at most `limit` results and CONTROL_LIMIT control messages wait (oldest dropped
first), and paho holds at most `window` + CONTROL_WINDOW more that it was handed and the
broker has not acknowledged yet (those can no longer be dropped), so paho's own queue never
grows beyond that either.
"""

import collections
import json
import logging
import threading
import time
import traceback

from edge import mqtt
from edge.errors import SinkError

logger = logging.getLogger(__name__)

WINDOW = 20            # messages handed to paho at once (paho's default max_inflight_messages)
CONTROL_WINDOW = 20    # control messages handed to paho at once, apart from WINDOW
CONTROL_LIMIT = 64     # replies, snapshots and health reports waiting; oldest dropped first.
                       # The command budgets (commands.rate and burst, for requests run and for
                       # refusals answered, health apart) keep them to a few dozen a second.
RESEND_WAIT_S = 30.0   # longest wait for paho's re-sends before new messages go out anyway
JSONL_RETRY_S = 10.0   # how often a JSONL file that could not be written is tried again


class JsonlSink:
    """Appends each result payload as one line."""

    def __init__(self, path):
        self.path = path
        try:
            self.file = open(path, "ab")
        except OSError as e:
            raise SinkError("jsonl {}: cannot open for writing ({}); choose a writable path"
                            .format(path, e.strerror))

    def reopen(self):
        """Open the file again after a failed write, cut back to its last whole line: a
        full disk leaves half a line at the end, which would spoil the next one."""
        try:
            self.file.close()
        except OSError:
            pass     # what the old buffer held is lost; the cut below drops any part of it
        with open(self.path, "r+b") as f:
            end = f.seek(0, 2)
            start = max(0, end - 65536)    # a line is one message: far less than that
            f.seek(start)
            tail = f.read()
            keep = start + tail.rfind(b"\n") + 1 if b"\n" in tail else start
            if keep < end:
                f.truncate(keep)
        self.file = open(self.path, "ab")

    def write(self, payload):
        self.file.write(payload)
        self.file.write(b"\n")

    def flush(self):
        self.file.flush()

    def close(self):
        try:
            self.file.close()
        except OSError as e:     # the last buffered lines could not be written (disk full)
            logger.error("jsonl %s: cannot write (%s)", self.path, e.strerror or e)


class PublisherView(collections.namedtuple(
        "PublisherView", "queue sent delivered lost stalled_s dropped jsonl")):
    """What the publisher holds and has done, for observers (health, metrics): messages
    held, sent, delivered, lost, the seconds a stuck queue has waited, results dropped
    (queue full), and the JSONL file's {path, missed, error} or None without one."""


class Publisher(threading.Thread):
    """Bounded hand-off from tasks to the sinks, drained by its own thread."""

    def __init__(self, link=None, jsonl=None, qos=0, limit=1000):
        super().__init__(name="publish", daemon=True)
        self.link = link            # MqttLink or None
        self.jsonl = jsonl          # JsonlSink or None
        self.qos = qos
        self.limit = limit
        self.window = max(1, min(WINDOW, limit // 4))
        self.dropped = 0            # results dropped because the queue was full
        self.control_dropped = 0    # control messages dropped because their lane was full
        self.failed = 0             # messages that could not be serialised or published (bugs)
        self.sent = 0               # handed to paho (MQTT) or written (JSONL only)
        self.delivered = 0          # of those handed to paho: written out (QoS 0), acknowledged
        self.lost = 0               # of those: QoS 0 lost with a connection (at most once)
        self.accepted = 0
        self.error = None           # SinkError while the JSONL file cannot be written
        self.jsonl_missed = 0       # results not written to the JSONL file meanwhile
        self._jsonl_retry = 0.0     # monotonic time of the next try to write it again
        # (topic, message, retain, qos, to_jsonl, properties)
        self._queue = collections.deque()
        self._outbox = collections.deque()    # (topic, payload, retain, qos, properties)
        self._control = collections.deque()   # the same, for `control`: serialised already
        # (paho MessageInfo, qos, connection number, control lane?): each lane has its own
        # window, so replies waiting for their acknowledgement (which a flood of requests on
        # the same connection delays) never hold back a QoS 0 result, nor results a reply
        self._inflight = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._processing = 0        # messages taken from the queue, not yet in the outbox
        self._doomed = 0            # of those, how many (the oldest) were dropped meanwhile
        self._resend_since = None   # monotonic time a re-send from an old connection began
        self._progress = time.monotonic()   # the last time a message left, or none waited
        self._progress_connects = 0         # (or the broker was away): on that connection
        self._faults = 0            # exceptions in the thread since the last one logged
        self._fault_logged = None   # monotonic time of that log line

    def put(self, topic, message, retain=False, qos=None, jsonl=True, properties=None):
        """Queue a message (a dict, or bytes sent as they are); never blocks.

        When the queue is full the oldest message is dropped and counted. `jsonl=False`
        keeps it out of the JSONL file (health, replies: the file holds results only).
        `properties`: MQTT 5 PUBLISH properties (a reply's correlation data), or None.
        """
        with self._cond:
            self._trim(self.limit - 1)
            self._queue.append((topic, message, retain, self.qos if qos is None else qos,
                                jsonl, properties))
            self.accepted += 1
            self._cond.notify()

    def control(self, topic, message, retain=False, properties=None):
        """Queue a reply, a snapshot or a health report (QoS 1) in the control lane, apart
        from the results; never blocks. When the lane is full the oldest is dropped (counted
        in `control_dropped`); without MQTT there is nowhere to send it (never to JSONL)."""
        try:
            payload = message if isinstance(message, bytes) else json.dumps(
                message, separators=(",", ":")).encode()
        except (TypeError, ValueError):     # a bug in a handler: lose one message
            logger.exception("cannot serialise a message for %s", topic)
            self.failed += 1
            return
        with self._cond:
            self.accepted += 1
            if self.link is None:
                return
            while len(self._control) >= CONTROL_LIMIT:
                self._control.popleft()
                self.control_dropped += 1
            self._control.append((topic, payload, retain, 1, properties))
            self._cond.notify()

    def topic(self, suffix):
        """The full topic of a suffix under the device (`detections/front`) for `put`: a
        topic without "/" is taken as one under the device, any other as it is."""
        return self.link.topic(suffix) if self.link is not None else suffix

    def _trim(self, keep):
        """Drop the oldest messages until at most `keep` are held (call with the lock).

        By age: the outbox, then the batch the thread is serialising (its oldest are marked
        and left out when it joins the outbox; the JSONL file still gets them), then the
        queue. Without MQTT only the queue is for the sinks' sake: drop there."""
        while self._waiting() > keep:
            if self._outbox:
                self._outbox.popleft()
            elif self.link is not None and self._processing > self._doomed:
                self._doomed += 1
            elif self._queue:
                self._queue.popleft()
            else:
                return
            self.dropped += 1

    def _waiting(self):
        return len(self._queue) + self._processing - self._doomed + len(self._outbox)

    def _held(self):
        return self._waiting() + len(self._control) + len(self._inflight)

    @property
    def depth(self):
        """Messages held: waiting, and handed to paho but not yet delivered."""
        with self._cond:
            return self._held()

    @property
    def stalled_s(self):
        """Seconds messages have waited, while the broker was connected, with none leaving
        (0 when none wait, or without MQTT): what tells a stuck queue from a busy one. The
        time of an outage is not counted: that has its own reason."""
        with self._cond:
            if self.link is None or not self._held():
                return 0.0
            return time.monotonic() - self._progress

    def snapshot(self):
        """A PublisherView of this moment."""
        jsonl = None
        if self.jsonl is not None:
            jsonl = {"path": self.jsonl.path, "missed": self.jsonl_missed,
                     "error": str(self.error) if self.error else None}
        return PublisherView(self.depth, self.sent, self.delivered, self.lost,
                             round(self.stalled_s, 1), self.dropped, jsonl)

    def _watch(self):
        """Restart the stall clock while nothing waits, the broker is away, or a new
        connection began (the thread's every pass: a thread that stops passing is stuck)."""
        with self._cond:
            connects = self.link.connects
            if not self._held() or not self.link.connected.is_set() or \
                    connects != self._progress_connects:
                self._progress = time.monotonic()
                self._progress_connects = connects

    def run(self):
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    # Poll faster while a backlog drains: acknowledgements free the window.
                    draining = (self._outbox or self._control) and self.link is not None \
                        and self.link.connected.is_set()
                    self._cond.wait(0.005 if draining else 0.05)
                batch = list(self._queue)
                self._queue.clear()
                self._processing = len(batch)    # still counted while being serialised
                stopping = self._stopping
            try:
                if batch:
                    self._write(batch)
                self._send()
                if self.link is not None:
                    self._watch()
            except Exception:   # the thread must outlive any one message: log, go on
                self._fault()
                with self._cond:
                    self._processing = self._doomed = 0
                time.sleep(0.1)
            if stopping:
                return

    def _fault(self):
        """Log an exception of the thread: the first with its traceback, repeats once a
        minute with their count (a fault on every pass would log 10 lines a second)."""
        now = time.monotonic()
        self._faults += 1
        if self._fault_logged is None:
            logger.exception("publisher failed; going on")
        elif now - self._fault_logged >= 60.0:
            logger.error("publisher failed %d times in %.0f s, the latest: %s", self._faults,
                         now - self._fault_logged, traceback.format_exc().strip()
                         .splitlines()[-1])
        else:
            return
        self._fault_logged, self._faults = now, 0

    def _write(self, batch):
        """Serialise once, append results to the JSONL file, queue for the broker."""
        payloads = []
        lines = 0      # JSONL lines written since the last flush
        for topic, message, retain, qos, to_jsonl, properties in batch:
            try:
                payload = message if isinstance(message, bytes) else json.dumps(
                    message, separators=(",", ":")).encode()
            except (TypeError, ValueError):     # a bug in a task: lose one message, not all
                logger.exception("cannot serialise a message for %s", topic)
                self.failed += 1
                continue
            if self.jsonl is not None and to_jsonl:
                lines += self._write_jsonl(payload)
            payloads.append((topic, payload, retain, qos, properties))
        if self.jsonl is not None and self.error is None:
            try:
                self.jsonl.flush()
            except OSError as e:
                self.jsonl_missed += lines
                self._jsonl_failed(e)
        with self._cond:
            doomed, self._doomed, self._processing = self._doomed, 0, 0
            if self.link is not None:
                self._outbox.extend(payloads[doomed:])
            else:
                self.sent += len(payloads)

    def _write_jsonl(self, payload):
        """Append one line; 1 if written (to the file's buffer), else 0."""
        if self.error is not None and not self._jsonl_recovered():
            self.jsonl_missed += 1
            return 0
        try:
            self.jsonl.write(payload)
        except OSError as e:
            self.jsonl_missed += 1
            self._jsonl_failed(e)
            return 0
        return 1

    def _jsonl_failed(self, error):
        # Logged once, then tried again every JSONL_RETRY_S: a full disk would otherwise log
        # a line per frame. MQTT goes on; health reports the error while it lasts.
        self._jsonl_retry = time.monotonic() + JSONL_RETRY_S
        if self.error is not None:
            return
        self.error = SinkError("jsonl {}: cannot write ({}); free space or choose another "
                               "path".format(self.jsonl.path, error.strerror or error))
        logger.error("%s; results still go to MQTT", self.error)

    def _jsonl_recovered(self):
        """Whether the JSONL file takes lines again (tried every JSONL_RETRY_S)."""
        if time.monotonic() < self._jsonl_retry:
            return False
        try:
            self.jsonl.reopen()
        except OSError as e:
            self._jsonl_failed(e)
            return False
        logger.warning("jsonl %s: writable again; up to %d results were not written to it",
                       self.jsonl.path, self.jsonl_missed)
        self.error = None
        return True

    def _settle(self, connection):
        """Forget what paho delivered; True while paho re-sends an old connection's messages."""
        resending = False
        kept = collections.deque()
        for entry in self._inflight:
            info, qos, number, _ = entry
            if mqtt.delivered(info):
                if mqtt.lost(info):
                    self.lost += 1
                else:
                    self.delivered += 1
                self._progress = time.monotonic()
                continue
            if number != connection:
                if qos == 0:
                    self.lost += 1
                    continue     # lost with the connection: QoS 0 is at most once
                resending = True
            kept.append(entry)
        with self._cond:
            self._inflight = kept
        if not resending:
            self._resend_since = None
            return False
        now = time.monotonic()
        if self._resend_since is None:
            self._resend_since = now
        elif now - self._resend_since > RESEND_WAIT_S:
            logger.warning("mqtt: %d messages of the previous connection still not "
                           "acknowledged after %.0f s; sending new ones", len(kept),
                           RESEND_WAIT_S)
            with self._cond:
                self._inflight = collections.deque(
                    (i, q, connection, c) for i, q, _, c in kept)
            self._resend_since = None
            return False
        return True

    def _send(self):
        """Hand queued payloads to paho while connected, keeping the order of each lane;
        the control lane first (a few small messages a second at most)."""
        if self.link is None:
            return
        connection = self.link.connects
        if self._settle(connection):
            return
        while self.link.connected.is_set():
            with self._cond:
                busy = sum(1 for entry in self._inflight if entry[3])
                control = bool(self._control) and busy < CONTROL_WINDOW
                lane = self._control if control else self._outbox
                if not control and (not lane or len(self._inflight) - busy >= self.window):
                    return
                topic, payload, retain, qos, properties = lane[0]
                full = topic if "/" in topic else self.link.topic(topic)
                try:
                    if properties is None:
                        info = self.link.publish(full, payload, qos, retain)
                    else:
                        info = self.link.publish(full, payload, qos, retain, properties)
                except (ValueError, TypeError) as e:   # a topic paho refuses: drop that one
                    lane.popleft()
                    self.failed += 1
                    logger.error("mqtt: cannot publish on %r: %s", full[:100], e)
                    continue
                if not mqtt.taken(info):
                    return     # paho's queue is full or the link just dropped: retry later
                lane.popleft()
                self._inflight.append((info, qos, connection, control))
                self.sent += 1

    def flush(self, timeout):
        """Deliver what is held within `timeout` s, then stop the thread; the number of
        messages not delivered (QoS 1: acknowledged, QoS 0: written to the socket)."""
        deadline = time.monotonic() + timeout
        if self.is_alive():
            while time.monotonic() < deadline and self.is_alive():
                with self._cond:
                    if not self._held():
                        break
                time.sleep(0.02)
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self.join(5.0)
        if self.link is not None:
            self._settle(self.link.connects)
        if self.jsonl is not None and self.error is None:
            try:
                self.jsonl.flush()
            except OSError as e:
                self._jsonl_failed(e)
        return self.depth
