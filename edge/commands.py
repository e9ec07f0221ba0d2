"""The command channel: requests on `{prefix}/{device}/cmd/{name}`, replies as DESIGN.md says.

paho's callback only hands the raw request to a bounded queue; the "commands" thread parses,
checks, rate-limits and runs it. A request within the rate budget (`commands.rate`,
`commands.burst`) runs and gets exactly one reply. A refused one (malformed, or over the rate)
gets its error reply only within a second budget of the same size: past it, as past the
queue (a flood), it is dropped without a reply and counted (health: `commands.dropped`), so
a flood costs a few replies a second, never a flood of them. `health` requests have a queue
and both budgets of their own, so a flood of other commands never starves an operator's
health probe; and replies travel in the publisher's control lane, apart from the results.
Requests that wait for a camera's next frame (`snapshot`, `set_reference`) run in a thread of
their own ("commands-frames"), so that a camera slow to deliver never holds up a health probe;
a camera that has no frame to give (none yet, or reconnecting) is answered at once.
A handler never names files or URLs: references and snapshots come from frames and stay
under the state folder.
"""

import base64
import collections
import json
import logging
import re
import threading
import time

from edge import mqtt, topics
from edge.errors import EdgeError
from edge.urls import redact

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
_TOPIC_LEVEL = re.compile(r"^[^#+\x00\n\r]*\Z")
QUEUE_LIMIT = 32
HEALTH_QUEUE_LIMIT = 8       # health probes wait apart from every other command
# Requests waiting for a frame, each up to FRAME_WAIT_S: more are dropped (and counted)
FRAME_QUEUE_LIMIT = 4
FRAME_WAIT_S = 5.0


class CommandError(Exception):
    """A request that gets an error reply: `code` is machine-readable, the message for people."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _string(args, key, required=True):
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise CommandError("bad_request", "argument {!r} must be a string".format(key))
    return value


def _int(args, key, default, low, high):
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CommandError("bad_request", "argument {!r} must be an integer from {} to {}".format(
            key, low, high))
    return value


def _encodable(topic):
    """Whether the topic is valid UTF-8 (JSON may carry lone surrogates; MQTT cannot)."""
    try:
        topic.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _bool(args, key, default):
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise CommandError("bad_request", "argument {!r} must be true or false".format(key))
    return value


def _camera_label(source):
    """How a reply names a camera (a pipeline's Camera, or None: the device's only one)."""
    if source is None:
        return "the camera"
    return "camera {!r}".format(source.name) if source.name is not None else \
        "the camera ({})".format(source.source.display)


class RateLimit:
    """A token bucket: `rate` requests per second on average, bursts up to `burst`."""

    def __init__(self, rate, burst):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    def ready(self, now=None):
        """Whether a request would be allowed now (nothing taken)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = max(self.last, now)
        return self.tokens >= 1.0

    def allow(self, now=None):
        """Take one request's token; False when there is none."""
        if self.ready(now):
            self.tokens -= 1.0
            return True
        return False


class Commands(threading.Thread):
    """Runs command requests for one daemon (`app`) and publishes the replies."""

    def __init__(self, app, rate=5.0, burst=10, max_bytes=65536, snapshot_bytes=262144):
        super().__init__(name="commands", daemon=True)
        self.app = app
        self.max_bytes = max_bytes
        self.snapshot_bytes = snapshot_bytes
        # (requests run, refusals answered): each a budget of its own; health has both apart
        self.budgets = {False: (RateLimit(rate, burst), RateLimit(rate, burst)),
                        True: (RateLimit(rate, burst), RateLimit(rate, burst))}
        self.dropped = 0            # requests left unanswered: queue full, or refused past
                                    # the budget of error replies
        self.rate_limited = 0       # requests answered `rate_limited`
        self.handled = 0            # requests answered (run, or refused with a reply)
        self._queue = collections.deque()
        self._health_queue = collections.deque()
        self._frame_queue = collections.deque()
        # guards the queues, and the budgets and counts both threads update
        self._cond = threading.Condition()
        self._stopping = False      # (not `_stop`: threading.Thread has a method of that name)
        self.handlers = {
            "ping": self.ping, "health": self.health, "snapshot": self.snapshot,
            "set_reference": self.set_reference, "list_references": self.list_references,
            "delete_reference": self.delete_reference, "reload": self.reload,
        }
        # handlers that wait for a camera's next frame: run by the "commands-frames" thread
        self.waiting = {"snapshot", "set_reference"}
        self._frames = threading.Thread(target=self._serve_frames, name="commands-frames",
                                        daemon=True)

    def submit(self, name, payload, reply_topic=None, correlation=None, broadcast=False,
               size=None):
        """Queue a raw request (called from paho's thread: must not block or raise).

        `reply_topic` and `correlation` are an MQTT 5 request's response topic and
        correlation data: the reply goes there and carries the same correlation data.
        `broadcast`: the request came on `{prefix}/_all/cmd/` (see `handle`). `size`: the
        request's real size in bytes where `payload` is only its beginning (the MQTT link
        reads no more of a message than commands.max_bytes and a little).
        """
        queue, limit = (self._health_queue, HEALTH_QUEUE_LIMIT) if name == "health" else \
            (self._queue, QUEUE_LIMIT)
        with self._cond:
            if len(queue) >= limit:
                self.dropped += 1
                return
            queue.append((name, payload, reply_topic, correlation, broadcast, size))
            self._cond.notify_all()

    def run(self):
        self._frames.start()
        while True:
            with self._cond:
                while not self._queue and not self._health_queue and not self._stopping:
                    self._cond.wait(0.5)
                if self._stopping:
                    return
                queue = self._health_queue or self._queue     # health probes first
                request = queue.popleft()
                if request[0] in self.waiting:
                    # A snapshot may wait seconds for a frame: not in this thread, where
                    # health probes would wait behind it.
                    if len(self._frame_queue) >= FRAME_QUEUE_LIMIT:
                        self.dropped += 1
                    else:
                        self._frame_queue.append(request)
                        self._cond.notify_all()
                    continue
            self._run(request)

    def _serve_frames(self):
        while True:
            with self._cond:
                while not self._frame_queue and not self._stopping:
                    self._cond.wait(0.5)
                if self._stopping:
                    return
                request = self._frame_queue.popleft()
            self._run(request)

    def _run(self, request):
        """Handle one queued request and publish its reply."""
        name, payload, reply_topic, correlation, broadcast, size = request
        try:
            answer = self.handle(name, payload, reply_topic, broadcast=broadcast, size=size)
            if answer is not None:
                self.app.publisher.control(answer[0], answer[1],
                                           properties=mqtt.reply_properties(correlation))
        except Exception:   # the command threads outlive every request
            logger.exception("command %s failed", name)

    def stop(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def counts(self):
        """What health reports of the command channel: requests answered, requests left
        without a reply (queue full, refused past the budget, or their reply dropped in the
        publisher's control lane), requests answered `rate_limited`."""
        publisher = getattr(self.app, "publisher", None)
        lost = publisher.control_dropped if publisher is not None else 0
        return {"handled": self.handled, "dropped": self.dropped + lost,
                "rate_limited": self.rate_limited}

    def reply_topic(self, request_id):
        return self.app.link.topic("reply/{}".format(request_id or "unknown"))

    def handle(self, name, payload, reply_topic=None, now=None, broadcast=False, size=None):
        """(topic, reply dict) for one raw request, or None when it gets no reply; never
        raises for bad input. `size`: the request's real size when `payload` was cut short.

        A request runs within the rate budget; a refused one (malformed, over the rate) is
        answered within the refusal budget, else dropped unanswered and counted: a flood
        costs its budgets' worth of replies, and requests past both are not even parsed.
        `reply_topic`: the MQTT 5 response topic, if the request had one.
        `broadcast`: the request went to every device (`{prefix}/_all/cmd/{name}`): the
        reply goes to its `reply_to` (or response topic) plus `/{device_id}`, so that the
        answers of a fleet arrive apart, each on a topic the device alone may write.
        """
        now = time.monotonic() if now is None else now
        limit, refusals = self.budgets[name == "health"]
        with self._cond:
            if not limit.ready(now) and not refusals.ready(now):
                self.dropped += 1
                return None
        taken = []
        topic, reply = self._answer(name, payload, reply_topic, now, broadcast, limit, taken,
                                    len(payload) if size is None else size)
        with self._cond:
            if not taken and not refusals.allow(now):
                self.dropped += 1
                return None
            self.handled += 1
            if not reply["ok"] and reply["error"]["code"] == "rate_limited":
                self.rate_limited += 1
        return topic, reply

    def _answer(self, name, payload, reply_topic, now, broadcast, limit, taken, size):
        """(topic, reply) for a request; appends to `taken` once it passed the rate budget
        (from then on it is answered whatever happens)."""
        if broadcast and reply_topic is not None:
            reply_topic = self._for_this_device(reply_topic)
        response_problem = None if reply_topic is None else self._reply_to_problem(reply_topic)
        request_id = None
        topic = reply_topic if reply_topic is not None and response_problem is None \
            else self.reply_topic(None)
        try:
            if size > self.max_bytes:
                raise CommandError("too_large", "request of {} bytes; the limit is {}".format(
                    size, self.max_bytes))
            try:
                args = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise CommandError("bad_json", "the request is not UTF-8 JSON")
            if not isinstance(args, dict):
                raise CommandError("bad_request", "the request must be a JSON object")
            raw_id = args.get("id")
            if isinstance(raw_id, str) and _ID.match(raw_id):
                request_id = raw_id
            if reply_topic is None or response_problem is not None:
                topic = self.reply_topic(request_id)
            if response_problem is not None:
                raise CommandError("bad_request", "the MQTT 5 response topic " +
                                   response_problem)
            if reply_topic is None and "reply_to" in args:
                wanted = self._for_this_device(args["reply_to"]) if broadcast \
                    else args["reply_to"]
                problem = self._reply_to_problem(wanted)
                if problem is not None:
                    raise CommandError("bad_request", "`reply_to` " + problem)
                topic = wanted
            if request_id is None:
                raise CommandError("bad_request", "`id` must be 1-64 letters, digits or _ . : -")
            with self._cond:
                allowed = limit.allow(now)
            if not allowed:
                raise CommandError("rate_limited", "too many commands; retry in a second")
            taken.append(True)
            if broadcast and name not in mqtt.BROADCAST_COMMANDS:
                raise CommandError("bad_request", "{!r} is not taken on {}: only {}; send it "
                                   "to {}".format(name[:64], self.app.link.broadcast_topic(""),
                                                  ", ".join(mqtt.BROADCAST_COMMANDS),
                                                  self.app.link.topic("cmd/" + name[:64])))
            handler = self.handlers.get(name)
            if handler is None:
                raise CommandError("unknown_command", "unknown command {!r}; known: {}".format(
                    name[:64], ", ".join(sorted(self.handlers))))
            result = handler(args, request_id)
            return topic, {"v": 1, "id": request_id, "ok": True, "result": result}
        except CommandError as e:
            error = {"code": e.code, "message": str(e)}
        except EdgeError as e:     # (a reload's error may quote a camera's URL)
            error = {"code": "failed", "message": redact(str(e))}
        except Exception as e:   # a bug in a handler: say so, keep running
            logger.exception("command %s failed", name[:64])
            error = {"code": "internal",
                     "message": redact("{}: {}".format(type(e).__name__, e))[:300]}
        return topic, {"v": 1, "id": request_id, "ok": False, "error": error}

    def reply_namespaces(self):
        """The topic prefixes replies may go to: the device's own `reply/` and the one of
        `edge health` sessions. Anything else could forge a device's results or status, or
        make it command itself."""
        return (self.app.link.topic("reply/"),
                "{}/{}/".format(self.app.link.prefix, topics.HEALTH_CLIENT_LEVEL))

    def _for_this_device(self, value):
        """A broadcast request's reply topic: the one it names plus `/{device_id}`."""
        return value + "/" + self.app.device if isinstance(value, str) else value

    def _reply_to_problem(self, value):
        """None when `value` may receive a reply, else what is wrong with it."""
        namespaces = self.reply_namespaces()
        if not isinstance(value, str) or not 0 < len(value) <= 256 or \
                not _TOPIC_LEVEL.match(value) or value.startswith("$") or \
                not _encodable(value):
            return "must be a UTF-8 MQTT topic without wildcards, at most 256 characters"
        if not any(value.startswith(n) and len(value) > len(n) for n in namespaces):
            return "must be a topic under {} (replies go nowhere else)".format(
                " or ".join(n + "..." for n in namespaces))
        health = namespaces[1]
        if value.startswith(health) and not re.match(
                r"[^/]+/{}\Z".format(re.escape(self.app.device)), value[len(health):]):
            # `edge health` files an answer by its topic's last level: under another
            # device's name this one would answer as that device, on a looser broker than ours
            return "must be {}<session>/{} (this device's answer)".format(health, self.app.device)
        return None

    # Handlers: (args, request id) -> result dict; CommandError for a bad request.

    def ping(self, args, request_id):
        return {"pong": True, "ts": round(time.time(), 3),
                "uptime_s": round(time.time() - self.app.started, 1)}

    def health(self, args, request_id):
        return self.app.health.report()

    def _camera(self, args):
        """The `camera` a request names (checked against the device's), None if it names none."""
        camera = _string(args, "camera", required=False)
        if camera is None:
            return None
        pipeline = getattr(self.app, "pipeline", None)
        names = pipeline.camera_names() if pipeline is not None else []
        if camera not in names:
            raise CommandError("not_found", "no camera {!r} on this device; {}".format(
                camera[:64], "its cameras: " + ", ".join(names) if names else
                "it has one unnamed camera: leave `camera` out"))
        return camera

    def _next_frame(self, camera):
        """(image, index, camera name) of the next frame of a camera (default: the first);
        `unavailable` at once when the camera has no frame to give."""
        pipeline = getattr(self.app, "pipeline", None)
        source = None
        if pipeline is not None and pipeline.cameras:
            source = pipeline.named[camera] if camera is not None else pipeline.cameras[0]
            self._check_delivering(source)
        tapped = self.app.next_frame(FRAME_WAIT_S) if camera is None else \
            self.app.next_frame(FRAME_WAIT_S, camera=camera)
        if tapped is None and pipeline is None:
            raise CommandError("unavailable", "no camera is running now (starting, or "
                                              "reloading); retry in a few seconds")
        if tapped is None:
            raise CommandError("unavailable", "{}: no frame arrived within {:.0f} s".format(
                _camera_label(source), FRAME_WAIT_S))
        if camera is None:
            names = pipeline.camera_names() if pipeline is not None else []
            camera = names[0] if names else None
        return tapped[0], tapped[1], camera

    @staticmethod
    def _check_delivering(source):
        """CommandError `unavailable` when a camera (a pipeline's Camera) has delivered no
        frame yet, or is not open now (reconnecting, failed, finished): waiting for its next
        frame would only end in the timeout."""
        capture = source.capture
        if capture is None or (capture.state == "open" and capture.frames > 0):
            return
        error = capture.last_error or (str(capture.error) if capture.error else None)
        state = capture.state if error is None else "{}: {}".format(
            capture.state, redact(error)[:200])
        if capture.frames == 0:
            raise CommandError("unavailable", "{}: no frame has arrived yet ({}); retry once "
                               "it delivers (edge health shows its state)".format(
                                   _camera_label(source), state))
        raise CommandError("unavailable", "{}: no new frame to take ({}); retry once it "
                           "delivers again".format(_camera_label(source), state))

    def snapshot(self, args, request_id):
        import cv2
        max_bytes = _int(args, "max_bytes", self.snapshot_bytes, 1024, 4 * 2 ** 20)
        binary = _bool(args, "binary", False)
        image, index, camera = self._next_frame(self._camera(args))
        for task in self.app.tasks:
            message = task.last_messages.get(camera)
            if message is not None:
                task.draw(image, message)
        if _bool(args, "depth", False):
            image = self._beside_depth(image, camera)
        data = None
        for quality in (90, 80, 70, 55, 40, 25):
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            data = encoded.tobytes()
            if ok and len(data) <= max_bytes:
                break
            scale = (max_bytes / float(len(data))) ** 0.5
            if quality <= 40 and scale < 1:
                image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if len(data) > max_bytes:
            raise CommandError("too_large", "the snapshot does not fit in {} bytes".format(
                max_bytes))
        result = {"frame": {"index": index, "width": image.shape[1], "height": image.shape[0]},
                  "format": "jpeg", "bytes": len(data)}
        if camera is not None:
            result["camera"] = camera
        if binary:
            topic = self.app.link.topic("snapshot/{}".format(request_id))
            self.app.publisher.control(topic, data)     # before its reply, in the same lane
            result["topic"] = topic
        else:
            result["data"] = base64.b64encode(data).decode("ascii")
        return result

    def _beside_depth(self, image, camera=None):
        """The frame with the newest depth map, colourised, to its right (stereo runs)."""
        import numpy as np
        pictures = [t.picture() for t in self.app.tasks if t.serves(camera)]
        picture = next((p for p in pictures if p is not None), None)
        if picture is None:
            raise CommandError("unavailable", "no depth map: not a stereo run (stereo.calib), or "
                                              "no depth computed yet")
        if picture.shape[:2] != image.shape[:2]:
            import cv2
            picture = cv2.resize(picture, (image.shape[1], image.shape[0]))
        return np.hstack([image, picture])

    def set_reference(self, args, request_id):
        from edge.references import NAME
        name = _string(args, "name")
        if not NAME.match(name):
            raise CommandError("bad_request", "`name` must be 1-64 letters, digits, _ or -")
        store = self.app.store
        if store is None:
            raise CommandError("unavailable", "no matcher is configured on this device")
        return store.put(name, self._next_frame(self._camera(args))[0])

    def list_references(self, args, request_id):
        store = self.app.store
        return {"references": store.describe() if store is not None else []}

    def delete_reference(self, args, request_id):
        from edge.references import NAME
        name = _string(args, "name")
        if not NAME.match(name):
            raise CommandError("bad_request", "`name` must be 1-64 letters, digits, _ or -")
        if self.app.store is None or not self.app.store.delete(name):
            raise CommandError("not_found", "no reference named {!r}".format(name))
        return {"deleted": name}

    def reload(self, args, request_id):
        self.app.request_reload()
        return {"reloading": True}
