"""The publisher: a bounded queue between the tasks and the sinks (MQTT, JSONL).

`put` never blocks a task: when the queue is full the oldest message is dropped and counted.
One thread ("publish") serialises each message once, appends it to the JSONL file, and hands
it to MQTT when connected. While the broker is away, messages wait in the same bounded queue
(oldest dropped first, counted) and leave in order after the reconnect.
"""

import collections
import json
import logging
import threading
import time

from edge.errors import SinkError

logger = logging.getLogger(__name__)

_QUEUED = 0        # paho's rc for a message it accepted


class JsonlSink:
    """Appends each result payload as one line."""

    def __init__(self, path):
        self.path = path
        try:
            self.file = open(path, "ab")
        except OSError as e:
            raise SinkError("jsonl {}: cannot open for writing ({}); choose a writable path"
                            .format(path, e.strerror))

    def write(self, payload):
        self.file.write(payload)
        self.file.write(b"\n")

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


class Publisher(threading.Thread):
    """Bounded hand-off from tasks to the sinks, drained by its own thread."""

    def __init__(self, link=None, jsonl=None, qos=0, limit=1000):
        super().__init__(name="publish", daemon=True)
        self.link = link            # MqttLink or None
        self.jsonl = jsonl          # JsonlSink or None
        self.qos = qos
        self.limit = limit
        self.dropped = 0            # messages dropped because the queue was full
        self.sent = 0               # handed to paho (MQTT) or written (JSONL only)
        self.accepted = 0
        self._queue = collections.deque()     # (topic, message, retain, qos, to_jsonl)
        self._outbox = collections.deque()    # (topic, payload, retain, qos) for the broker
        self._inflight = collections.deque()  # paho MessageInfo not yet published
        self._cond = threading.Condition()
        self._closing = False

    def put(self, topic, message, retain=False, qos=None, jsonl=True):
        """Queue a message (a dict, or bytes sent as they are); never blocks.

        When the queue is full the oldest message is dropped and counted. `jsonl=False`
        keeps it out of the JSONL file (health, replies: the file holds results only).
        """
        with self._cond:
            if len(self._queue) + len(self._outbox) >= self.limit:
                if self._outbox:
                    self._outbox.popleft()
                else:
                    self._queue.popleft()
                self.dropped += 1
            self._queue.append((topic, message, retain, self.qos if qos is None else qos,
                                jsonl))
            self.accepted += 1
            self._cond.notify()

    @property
    def depth(self):
        return len(self._queue) + len(self._outbox)

    def run(self):
        while True:
            with self._cond:
                if not self._queue and not self._closing:
                    self._cond.wait(0.05)
                batch = list(self._queue)
                self._queue.clear()
                closing = self._closing
            for topic, message, retain, qos, to_jsonl in batch:
                payload = message if isinstance(message, bytes) else json.dumps(
                    message, separators=(",", ":")).encode()
                if self.jsonl is not None and to_jsonl:
                    self.jsonl.write(payload)
                if self.link is not None:
                    with self._cond:
                        self._outbox.append((topic, payload, retain, qos))
                else:
                    self.sent += 1
            if batch and self.jsonl is not None:
                self.jsonl.flush()
            self._send()
            if closing and not self._queue:
                return

    def _send(self):
        """Hand queued payloads to paho while connected, keeping their order."""
        if self.link is None:
            return
        while self._inflight and self._inflight[0].is_published():
            self._inflight.popleft()
        while self.link.connected.is_set():
            with self._cond:
                if not self._outbox:
                    return
                topic, payload, retain, qos = self._outbox[0]
            full = topic if "/" in topic else self.link.topic(topic)
            info = self.link.publish(full, payload, qos, retain)
            if info.rc != _QUEUED:
                return     # paho's own queue is full or the link just dropped: retry later
            with self._cond:
                if self._outbox and self._outbox[0][1] is payload:
                    self._outbox.popleft()
            self._inflight.append(info)
            self.sent += 1

    def flush(self, timeout):
        """Stop accepting, write everything out; the number of messages not delivered."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self.join(timeout)
        deadline = time.monotonic() + timeout
        if self.link is not None:
            while time.monotonic() < deadline:
                self._send()
                while self._inflight and self._inflight[0].is_published():
                    self._inflight.popleft()
                if not self._outbox and not self._inflight:
                    break
                time.sleep(0.02)
        if self.jsonl is not None:
            self.jsonl.flush()
        return len(self._queue) + len(self._outbox) + len(self._inflight)
