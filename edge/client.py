"""What a robot imports to receive edge devices' messages (Python 3.6+, paho-mqtt).

    from edge.client import Client

    with Client("mqtt://broker:1883", devices=["cam1"]) as client:
        for message in client.messages(count=10):
            for d in message.detections:
                print(d.label, d.score, d.box, d.track_id, d.spatial)

A Client subscribes at QoS 1 to `{prefix}/{device}/{topic}` for the devices (default: every
device) and topics (default: detections) it is given, checks each payload against the API
document shipped with the package (edge/schemas/asyncapi.yaml; keys a newer device adds are
let through), and hands it on as a plain object: `Detections`, `Event`, `Depth`, `Matches`,
`Status` or `Health` (namedtuples; `payload` holds the checked dict). Cameras, labels and a
minimum score narrow what arrives.

A message's `kind` is the name of the topic it came on, a plain str: "detections",
"matches", "events" (plural, as the topic), "depth", "status" or "health", also importable
as DETECTIONS, MATCHES, EVENTS, DEPTH, STATUS and HEALTH (TOPICS holds them all). Compare
with the constants (`message.kind == EVENTS`) or the class (`isinstance(message, Event)`):
a misspelt constant is a NameError, where a misspelt string ("event") matches nothing. A
name that is no topic given to Client(topics=...) or on() is a ValueError naming the valid
ones.

Peers are not trusted. Who sent a message is its topic: `device` (and `camera`, on a
camera's topic) come from the topic, and a payload that names another device or camera is
dropped (`forged` in stats()). A payload larger than `max_payload` bytes is dropped on
paho's thread before anything reads it (`oversized`). (MQTT 5's Maximum Packet Size, which
would keep it off the wire, is not asked for: Mosquitto 2.0 keeps an in-flight slot for
each QoS 1 message it drops for that reason, and after 20 of them it sends the session
nothing more.) The rest is parsed as strict JSON (no NaN or Infinity) and checked against
the document's bounds (finite numbers, maximum lengths, a depth grid of its declared
shape) by edge.schemas.check, in time proportional to its size (`invalid`). Log lines
about dropped messages come at a bounded rate (a burst of 10, then one per 6 s).

Sessions are persistent (MQTT 3.1.1 clean_session=False, MQTT 5 clean start off with a
session expiry), so the broker queues QoS 1 messages while the client is away: across
reconnects and broker restarts (a broker with persistence), and, with a `session` name,
across restarts of the robot's program. Without a name the session is the Client's own and
ends with `close()`. Messages reach a robot at QoS 1 only when the device publishes them at
QoS 1 (`mqtt.qos: 1`, or `?qos=1` in its URL); status, health and events always are.

Threads: paho's network thread only puts each raw message on a bounded queue (the oldest is
dropped and counted when the consumer falls behind by `queue` messages); parsing, checking
and callbacks happen in the consumer: the caller of `messages()`, or the thread `start()`
runs for the callbacks given to `on()`. An exception in a callback is logged and the next
message still arrives.

Log lines come from the logger "edge.client" (its name says where they come from): dropped
messages, a consumer that falls behind, and a lost connection, in words, before paho
reconnects.
"""

import collections
import difflib
import logging
import queue
import threading
import time
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from edge import mqtt, peertext, schemas, topics as topic_rules
from edge.errors import ConfigError, UnavailableError
from edge.topics import (CAMERA_TOPICS, DEPTH, DETECTIONS, EVENTS, HEALTH, MATCHES,  # noqa: F401
                         STATUS, TOPICS)

logger = logging.getLogger(__name__)

# What a client can subscribe to, below {prefix}/{device}/, and the `kind` of its messages
# (`message.kind == EVENTS`: a typo in a constant fails loudly, a typo in a string never),
# come from edge.topics, the rules the device follows too: TOPICS, and CAMERA_TOPICS, whose
# messages come from one camera (status and health are the device's, whatever the filter).
# Topics whose messages carry labels and scores (`labels`, `min_score` narrow them).
LABELLED_TOPICS = (DETECTIONS, EVENTS)
DEFAULT_SESSION_EXPIRY = 24 * 3600      # s: how long an MQTT 5 broker keeps a named session
# Bytes of the largest payload taken. The largest messages a device sends within the API
# document's bounds, as it writes them (compact JSON):
#   depth: a grid of 256 x 256 cells (stereo.grid's most), each up to 8 digits   0.6 MB
#   detections: a card's 3840 candidates (its most), each with `spatial` and a
#     256-character label (the document's most; class names are far shorter)     1.5 MB
#   matches: about 40 bytes a match: match.top_k 500 (the default)                0.02 MB
#     (top_k up to about 50 000 fits; a robot of a device with more passes max_payload)
#   health: a report of 64 cameras with their errors                             ~0.1 MB
# 2 MiB holds each with margin; 8 MiB (the example broker's limit) would let one message of
# a rogue cost the robot a quarter of a second to parse and check, 2 MiB a sixteenth.
DEFAULT_MAX_PAYLOAD = 2 * 1024 * 1024
_MAX_PACKET = 268435455     # bytes: the largest MQTT packet
_LOG_BURST = 10             # log lines about dropped messages at once ...
_LOG_EVERY = 6.0            # ... then one per this many seconds
_CLOSED = object()


class Frame(collections.namedtuple("Frame", "index ts width height name")):
    """The source frame a message is about: index from 0, capture time (unix s), size in
    pixels, the file name for image folders (else None)."""

    __slots__ = ()


class Spatial(collections.namedtuple("Spatial", "x y z")):
    """Where an object is, in mm in the left camera's optical frame (x right, y down, z
    forward, as ROS `_optical` frames)."""

    __slots__ = ()


class Detection(collections.namedtuple("Detection",
                                       "label class_id score box track_id spatial")):
    """One object: `box` (x1, y1, x2, y2) in source pixels, `track_id` (None until its track
    is confirmed, or without tracking), `spatial` (a Spatial in stereo runs, else None)."""

    __slots__ = ()


class Detections(collections.namedtuple(
        "Detections", "device camera model seq frame latency_ms detections topic retained "
                      "payload")):
    """The detector's result for one frame; `detections` best score first. `kind`
    DETECTIONS ("detections")."""

    __slots__ = ()
    kind = DETECTIONS


class Event(collections.namedtuple(
        "Event", "device camera model seq type ts frame_index track_id label class_id score "
                 "box zone line direction topic retained payload")):
    """A tracking event: `type` track_start, track_end, zone_enter, zone_leave or
    line_cross; `zone`, `line` and `direction` where the type has them, else None. `kind`
    EVENTS ("events", as the topic: not "event")."""

    __slots__ = ()
    kind = EVENTS


class Depth(collections.namedtuple(
        "Depth", "device camera model seq frame columns rows range_mm depth_mm topic retained "
                 "payload")):
    """A coarse grid of median depths: `depth_mm[row][column]` in mm, None where unknown.
    `kind` DEPTH ("depth")."""

    __slots__ = ()
    kind = DEPTH

    def nearest(self) -> Optional[Tuple[float, int, int]]:
        """(mm, column, row) of the nearest cell with a depth, or None."""
        cells = [(mm, column, row) for row, values in enumerate(self.depth_mm)
                 for column, mm in enumerate(values) if mm is not None]
        return min(cells) if cells else None


class Matches(collections.namedtuple(
        "Matches", "device camera model seq frame reference count inliers homography matches "
                   "topic retained payload")):
    """The matcher's result for one reference: `homography` 9 numbers (reference -> frame)
    or None, `matches` [x_ref, y_ref, x_cur, y_cur, score] lists. `kind` MATCHES
    ("matches")."""

    __slots__ = ()
    kind = MATCHES


class Status(collections.namedtuple("Status",
                                    "device state since reason version topic retained payload")):
    """The device's state: starting, online, degraded or offline (retained). `kind` STATUS
    ("status")."""

    __slots__ = ()
    kind = STATUS
    camera = None


class Health(collections.namedtuple("Health",
                                    "device ts state healthy reasons topic retained payload")):
    """The device's health report (retained); `payload` is the whole report. `kind` HEALTH
    ("health")."""

    __slots__ = ()
    kind = HEALTH
    camera = None


def _frame(data):
    return Frame(data["index"], data["ts"], data["width"], data["height"], data["name"])


def _detection(data):
    spatial = data.get("spatial")
    return Detection(data["label"], data["class_id"], data["score"], tuple(data["box"]),
                     data["track_id"], None if spatial is None else Spatial(
                         spatial["x"], spatial["y"], spatial["z"]))


def _detections(data, device, camera, topic, retained):
    return Detections(device, camera, data["model"], data["seq"],
                      _frame(data["frame"]), data["latency_ms"],
                      [_detection(d) for d in data["detections"]], topic, retained, data)


def _event(data, device, camera, topic, retained):
    return Event(device, camera, data["model"], data["seq"], data["type"],
                 data["ts"], data["frame_index"], data["track_id"], data["label"],
                 data["class_id"], data["score"], tuple(data["box"]), data.get("zone"),
                 data.get("line"), data.get("direction"), topic, retained, data)


def _depth(data, device, camera, topic, retained):
    return Depth(device, camera, data["model"], data["seq"],
                 _frame(data["frame"]), data["grid"]["columns"], data["grid"]["rows"],
                 tuple(data["range_mm"]), data["depth_mm"], topic, retained, data)


def _matches(data, device, camera, topic, retained):
    return Matches(device, camera, data["model"], data["seq"],
                   _frame(data["frame"]), data["reference"], data["count"], data["inliers"],
                   data["homography"], data["matches"], topic, retained, data)


def _status(data, device, camera, topic, retained):
    return Status(device, data["state"], data["since"], data["reason"],
                  data["version"], topic, retained, data)


def _health(data, device, camera, topic, retained):
    return Health(device, data["ts"], data["state"], data["verdict"]["healthy"],
                  data["verdict"]["reasons"], topic, retained, data)


# What messages() yields and callbacks are given.
Message = Union[Detections, Event, Depth, Matches, Status, Health]
# Names given as one str or several (devices, cameras, labels); None or empty: any.
Names = Optional[Union[str, Sequence[str]]]

PARSERS = {DETECTIONS: _detections, EVENTS: _event, DEPTH: _depth, MATCHES: _matches,
           STATUS: _status, HEALTH: _health}
_FROM_PAYLOAD = object()


def parse(topic_name: str, payload: dict, topic: str = "", retained: bool = False,
          device: Optional[str] = _FROM_PAYLOAD, camera: Optional[str] = _FROM_PAYLOAD
          ) -> Message:
    """The object for a payload (a dict) of one of TOPICS; KeyError or TypeError when it
    lacks what the API promises (check it first: edge.schemas.check). `device` and
    `camera`: the sender as the topic names it (what a Client passes); left out, the
    payload's own (for payloads that came some other way: files, tests)."""
    if device is _FROM_PAYLOAD:
        device = payload["device"]
    if camera is _FROM_PAYLOAD:
        camera = payload.get("camera")
    return PARSERS[topic_name](payload, device, camera, topic, retained)


sender = topic_rules.sender


def forgery(payload: dict, device: str, camera: Optional[str]) -> Optional[str]:
    """Why a payload is not from the device (and camera) its topic names, or None: who
    sent a message is its topic, never its payload."""
    if payload.get("device") != device:
        return "the payload says device {}, the topic {}".format(
            peertext.text(payload.get("device"), 64), device)
    if payload.get("camera") != camera:
        return "the payload says camera {}, the topic {}".format(
            peertext.text(payload.get("camera"), 64), camera or "none")
    return None


def subscriptions(prefix: str, devices: Optional[Sequence[str]] = None,
                  topics: Sequence[str] = (DETECTIONS,), share: Optional[str] = None,
                  cameras: Optional[Sequence[str]] = None) -> List[str]:
    """The MQTT topic filters for these devices (None: every device), topics and cameras;
    with a `share` group, shared subscriptions (`$share/{share}/...`: the broker hands each
    message to one member of the group).

    The one place topics are built. A device with named cameras publishes CAMERA_TOPICS on
    `{topic}/{camera}`, one with a single unnamed source on `{topic}`: without `cameras`
    both are subscribed to, with them only those cameras' topics.
    """
    def levels(name):
        if name not in CAMERA_TOPICS:
            return [name]
        if cameras:
            return ["{}/{}".format(name, camera) for camera in cameras]
        return [name, name + "/+"]
    filters = [topic_rules.device_topic(prefix, device, level) for device in (devices or ["+"])
               for name in topics for level in levels(name)]
    return ["$share/{}/{}".format(share, f) for f in filters] if share else filters


def narrow(message: Message, cameras: Optional[Sequence[str]] = None,
           labels: Optional[Sequence[str]] = None, min_score: Optional[float] = None
           ) -> Optional[Message]:
    """The message as the filters let it through (detections narrowed to the labels and
    score asked for, `payload` with them), or None when nothing of it passes.

    Cameras select messages of CAMERA_TOPICS by their `camera` field (a device with one
    unnamed source sends none: no camera filter lets it through); labels and min_score
    apply to detections and events. A detections message with no detection left is None
    only when labels or min_score are set (without them, empty frames are news too).
    """
    if cameras and message.kind in CAMERA_TOPICS and message.camera not in cameras:
        return None
    if (not labels and min_score is None) or message.kind not in LABELLED_TOPICS:
        return message

    def keep(label, score):
        return (not labels or label in labels) and (min_score is None or score >= min_score)
    if message.kind == EVENTS:
        return message if keep(message.label, message.score) else None
    kept = [i for i, d in enumerate(message.detections) if keep(d.label, d.score)]
    if not kept:
        return None
    if len(kept) == len(message.detections):
        return message
    payload = dict(message.payload)
    payload["detections"] = [message.payload["detections"][i] for i in kept]
    return message._replace(detections=[message.detections[i] for i in kept], payload=payload)


_CLOSED_BY_PEER = "closed by the broker or the network"
_NO_PING_ANSWER = "no answer from the broker within the keepalive"
# paho 1.x's int codes for a connection that ended on the client's side (MQTT_ERR_*)
_PAHO1_CODES = {7: _CLOSED_BY_PEER,             # MQTT_ERR_CONN_LOST
                16: _NO_PING_ANSWER,            # MQTT_ERR_KEEPALIVE (paho 1.6)
                1: _NO_PING_ANSWER}             # what paho before 1.6 reported for it
# paho 2.x's reason codes for the same (it maps MQTT_ERR_* onto MQTT 5 reason codes)
_PAHO2_CODES = {128: _CLOSED_BY_PEER,           # "Unspecified error": MQTT_ERR_CONN_LOST
                141: _NO_PING_ANSWER}           # "Keep alive timeout"


def disconnect_reason(args: Sequence) -> str:
    """Why a connection ended, in words, from paho's on_disconnect arguments after (client,
    userdata): (rc) in paho 1.x, (rc, properties) in 1.x with MQTT 5, (flags, reason code,
    properties) in 2.x. A broker's own DISCONNECT (MQTT 5) is named by its reason."""
    if not args:
        return "closed"
    rc = args[-2] if len(args) >= 2 else args[-1]
    code = mqtt._reason_code(rc)
    from_broker = getattr(args[0], "is_disconnect_packet_from_server", None)
    if from_broker is None:
        # paho 1.x: a ReasonCodes object only for the broker's DISCONNECT, else an int
        from_broker = not isinstance(rc, int)
    if from_broker:
        return "the broker ended it: {}".format(str(rc).lower())
    if isinstance(rc, int):
        if code in _PAHO1_CODES:
            return _PAHO1_CODES[code]
        import paho.mqtt.client as paho
        return paho.error_string(code).rstrip(".").lower()
    return _PAHO2_CODES.get(code) or str(rc).lower()


def _listed(names):
    """A list of names from a list, a tuple or one name (not its letters); None if empty."""
    if isinstance(names, str):
        return [names]
    return list(names) if names else None


class TopicError(ConfigError, ValueError):
    """A topic (message kind) that is not one of TOPICS, or not one of the client's: a
    ConfigError like the client's other bad arguments, and a ValueError, as a bad value."""


def _check_topic(name, allowed, where):
    """TopicError naming the valid topics (and the likely one meant: "event" is "events")
    unless `name` is one of `allowed`; `where` names the argument."""
    if isinstance(name, str) and name in allowed:
        return
    if isinstance(name, str) and name in TOPICS:
        raise TopicError("edge.client: {}: not a topic of this client ({}); add it to "
                         "Client(topics=...)".format(where, ", ".join(allowed)))
    close = difflib.get_close_matches(name, TOPICS, 1) if isinstance(name, str) else []
    raise TopicError("edge.client: {}: {!r} is no topic; choose from {}{}".format(
        where, name, ", ".join(TOPICS), "; did you mean {!r}?".format(close[0]) if close else ""))


def _check_names(what, names):
    for name in names or ():
        # the rule of device ids (edge.topics): a single topic level, no wildcards
        if topic_rules.name_problem(name):
            raise ConfigError("edge.client: {} {!r}: use 1-64 letters, digits, _ . - (no / + # "
                              "or spaces)".format(what, name))


class Client:
    """A robot's subscription to edge devices: connect, reconnect, check, filter, hand on.

    url: `mqtt[s]://[user[:password]@]host[:port][?keepalive=S]` (messages are always
    subscribed at QoS 1); devices, topics (TOPICS), cameras, labels, min_score: what to
    receive; session: a name (1-64 letters, digits, _ . -) for a session the broker keeps
    across restarts of this program (MQTT 5: for `session_expiry` s), None for one that
    ends with close(); protocol "3.1.1" or "5"; validate: check each payload against the
    API document (False: only strict JSON, the size and the sender are checked);
    queue_size: messages held for a slow consumer; share: a group name, for consumers that
    split one stream (MQTT shared subscriptions); max_payload: bytes of the largest payload
    taken (DEFAULT_MAX_PAYLOAD, 2 MiB: the largest message a device sends within the
    document's bounds, with margin); username, password_file, ca_file, cert_file, key_file:
    as `edge health`'s flags (the password also from EDGE_MQTT_PASSWORD).
    """

    def __init__(self, url: str = "mqtt://localhost:1883", devices: Names = None,
                 topics: Union[str, Sequence[str]] = (DETECTIONS,), cameras: Names = None,
                 labels: Names = None, min_score: Optional[float] = None,
                 prefix: str = topic_rules.DEFAULT_PREFIX, session: Optional[str] = None,
                 session_expiry: int = DEFAULT_SESSION_EXPIRY, protocol: str = "3.1.1",
                 validate: bool = True, queue_size: int = 1000, share: Optional[str] = None,
                 username: Optional[str] = None, password_file: Optional[str] = None,
                 ca_file: Optional[str] = None, cert_file: Optional[str] = None,
                 key_file: Optional[str] = None, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.settings = mqtt.with_credentials(
            mqtt.parse_url(url), username, password_file, ca_file, cert_file, key_file,
            where="edge.client")
        self.devices = _listed(devices)
        self.topics = tuple(collections.OrderedDict.fromkeys(_listed(topics) or ()))  # once each
        self.cameras = _listed(cameras)
        self.labels = _listed(labels)
        self.min_score = min_score
        self.prefix = prefix
        if topic_rules.prefix_problem(prefix):
            raise ConfigError("edge.client: prefix {!r}: {}".format(
                prefix, topic_rules.PREFIX_RULE))
        _check_names("device", self.devices)
        _check_names("camera", self.cameras)
        _check_names("session", [session] if session is not None else None)
        _check_names("share group", [share] if share is not None else None)
        if not self.topics:
            raise TopicError("edge.client: topics (none): choose from {}".format(
                ", ".join(TOPICS)))
        for topic in self.topics:
            _check_topic(topic, TOPICS, "topics " + ", ".join(map(str, self.topics)))
        if min_score is not None and not (isinstance(min_score, (int, float)) and
                                          0.0 <= min_score <= 1.0):
            raise ConfigError("edge.client: min_score {!r}: a number 0..1".format(min_score))
        if protocol not in ("3.1.1", "5"):
            raise ConfigError("edge.client: protocol {!r}: \"3.1.1\" or \"5\"".format(protocol))
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError("edge.client: queue_size {!r}: at least 1".format(queue_size))
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) or \
                not 1 <= max_payload <= _MAX_PACKET:
            raise ConfigError("edge.client: max_payload {!r}: bytes, 1 to {}".format(
                max_payload, _MAX_PACKET))
        self.max_payload = max_payload
        self.validate = validate
        self.protocol = protocol
        self.session = session
        self.session_expiry = session_expiry
        self.client_id = session or "edge-client-{}".format(uuid.uuid4().hex[:12])
        self.subscriptions = subscriptions(prefix, self.devices, self.topics, share, self.cameras)
        self._queue = queue.Queue(queue_size)
        self._callbacks = {}
        self._lock = threading.Lock()
        self._counts = collections.Counter()
        self._log_tokens = float(_LOG_BURST)  # log lines about dropped messages allowed now
        self._log_time = time.monotonic()
        self._log_held = 0                  # dropped messages not logged since the last line
        self._subscribed = threading.Event()
        self._refused = None        # why the broker refused the connection or subscription
        self._cause = None          # why the broker cannot be reached (last connect failure)
        self._up = False
        self._connected_once = False
        self._closed = False
        self._dispatcher = None
        self._paho = None

    # -- connection ---------------------------------------------------------------------

    def connect(self, timeout: Optional[float] = 10.0, retry: bool = True) -> "Client":
        """Connect and subscribe; UnavailableError as soon as the broker refuses (credentials,
        ACL), or when it cannot be reached within `timeout` s (None: wait as long as it takes;
        paho retries meanwhile), or, with `retry=False` (a command line), at the first attempt
        that fails. Afterwards paho reconnects by itself."""
        if self._paho is not None:
            return self
        client = mqtt.make_client(self.client_id, self.protocol, clean_session=False)
        mqtt.secure(client, self.settings)
        client.reconnect_delay_set(0.5, 10)     # a robot wants its data back soon
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail     # paho >= 1.6; ignored before
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        options = {}
        if self.protocol == "5":
            # (no MaximumPacketSize: see the module's docstring)
            options = {"clean_start": False, "properties": mqtt.packet_properties(
                "CONNECT", SessionExpiryInterval=int(self.session_expiry))}
        self._paho = client
        try:
            client.connect_async(self.settings["host"], self.settings["port"],
                                 self.settings["keepalive"], **options)
        except (OSError, ValueError) as e:
            self._paho = None
            raise UnavailableError("mqtt {}: cannot connect ({}); check the URL".format(
                self.settings["display"], e))
        client.loop_start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._subscribed.wait(0.05):
            if self._refused or (self._cause and not retry) or \
                    (deadline is not None and time.monotonic() > deadline):
                reason = self._refused or self._cause or mqtt.diagnose(self.settings, 2.0) or \
                    "no answer within {:.0f} s".format(timeout)
                self._stop_paho()
                raise UnavailableError("mqtt {}: {}".format(self.settings["display"], reason))
        return self

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        try:
            code = mqtt._reason_code(rc)
            if code != 0:
                self._refused = "broker refused the connection (code {}: {}); check the user " \
                                "name and password".format(code, mqtt._connack_text(code))
                logger.warning("mqtt %s: %s", self.settings["display"],
                               self._refused)
                return
            self._up, self._cause = True, None
            self._count("connects")
            resumed = mqtt.session_present(flags)
            if self._connected_once and resumed:
                # The broker kept the subscriptions and queued what came meanwhile.
                logger.info("reconnected to %s, session resumed",
                            self.settings["display"])
                return
            if self._connected_once:
                self._count("sessions_lost")
                logger.warning("reconnected to %s but the broker had forgotten "
                               "the session (restarted without persistence, or the session "
                               "expired): messages published meanwhile are lost",
                               self.settings["display"])
            self._connected_once = True
            # Subscribed on the first connect even when a named session was resumed: the
            # program may ask for other topics than last time.
            client.subscribe([(topic, 1) for topic in self.subscriptions])
        except Exception:   # never let an exception end paho's network thread
            logger.exception("on_connect failed")

    def _on_subscribe(self, client, userdata, mid, granted, *rest):
        try:
            refused = [t for t, code in zip(self.subscriptions, granted)
                       if mqtt._reason_code(code) >= 128]
            if refused:
                self._refused = "broker refused the subscription to {} (not authorised?); " \
                                "check the broker's ACL for this user".format(", ".join(refused))
                logger.warning("mqtt %s: %s", self.settings["display"],
                               self._refused)
                return
            self._subscribed.set()
        except Exception:   # never let an exception end paho's network thread
            logger.exception("on_subscribe failed")

    def _on_connect_fail(self, client, userdata):
        try:
            self._cause = mqtt.diagnose(self.settings) or "cannot connect"
        except Exception:   # never let an exception end paho's network thread
            logger.exception("on_connect_fail failed")

    def _on_disconnect(self, client, userdata, *args):
        try:
            was_up, self._up = self._up, False
            code = mqtt.disconnect_code(args)
            if was_up and code != 0 and not self._closed:
                reason = disconnect_reason(args)
                if self.session is not None and reason == _CLOSED_BY_PEER:
                    # MQTT 3.1.1 brokers close the older connection of a client id without a
                    # word: two programs with one session name take turns like this
                    reason += ", or another program connected with session " + self.session
                logger.warning("connection to %s lost (%s); reconnecting",
                               self.settings["display"], reason)
        except Exception:   # never let an exception end paho's network thread
            logger.exception("on_disconnect failed")

    def _on_message(self, client, userdata, message):
        try:
            # the size first, before anything reads the payload: a rogue's 100 MB never
            # reaches the queue, the JSON parser or the check
            if len(message.payload) > self.max_payload:
                self._count("oversized")
                self._dropped(message.topic, "{} bytes, over max_payload {}".format(
                    len(message.payload), self.max_payload))
                return
            self._put((message.topic, message.payload, bool(message.retain)))
        except Exception:   # never let an exception end paho's network thread
            logger.exception("on_message failed")

    def _put(self, item):
        """Queue an item; when the queue is full the oldest waiting message makes room."""
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    continue
                if self._count("dropped") == 1:
                    logger.warning("the consumer falls behind: the oldest queued "
                                   "messages are dropped (queue_size %d); see stats()",
                                   self._queue.maxsize)

    # -- consuming ----------------------------------------------------------------------

    def messages(self, count: Optional[int] = None, timeout: Optional[float] = None
                 ) -> Iterator[Message]:
        """Received messages, checked and filtered, in arrival order: ends after `count`
        messages, when `timeout` s pass without one, or when the client is closed.
        Connects first when connect() was not called."""
        if self._dispatcher is not None and threading.current_thread() is not self._dispatcher:
            raise RuntimeError("edge.client: start() hands messages to callbacks; use "
                               "messages() or start(), not both")
        if self._closed:
            return
        self.connect()
        delivered = 0
        while count is None or delivered < count:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                return
            if item is _CLOSED:
                return
            message = self._decode(*item)
            if message is not None:
                delivered += 1
                self._count("delivered")
                yield message

    def _decode(self, topic, raw, retained):
        """The message object for a raw MQTT message, or None (not asked for, invalid,
        forged)."""
        self._count("received")
        name, device, camera = sender(topic, self.prefix)
        if name not in self.topics or (self.devices and device not in self.devices):
            # (a named session may keep subscriptions an earlier run of the program made)
            self._count("filtered")
            return None
        if not raw:
            return None     # a retained message being cleared (a retired device)
        if topic_rules.name_problem(device) or (camera is not None and
                                                topic_rules.name_problem(camera)):
            return self._invalid(topic, "the topic names no valid device or camera")
        try:
            payload = schemas.loads(raw)
        except ValueError as e:
            return self._invalid(topic, "not UTF-8 JSON: {}".format(e))
        if not isinstance(payload, dict):
            return self._invalid(topic, "{} payload: not a JSON object".format(name))
        try:
            if self.validate:
                schemas.check(name, payload, strict=False)
        except ValueError as e:
            return self._invalid(topic, str(e))
        forged = forgery(payload, device, camera if name in CAMERA_TOPICS else None)
        if forged:
            self._count("forged")
            return self._dropped(topic, "not from its topic's sender: " + forged)
        try:
            message = parse(name, payload, topic, retained, device, camera)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            return self._invalid(topic, "{} payload: {}: {}".format(name, type(e).__name__, e))
        message = narrow(message, self.cameras, self.labels, self.min_score)
        if message is None:
            self._count("filtered")
        return message

    def _invalid(self, topic, reason):
        """Count an invalid message and log it (at a bounded rate)."""
        self._count("invalid")
        return self._dropped(topic, reason)

    def _dropped(self, topic, reason):
        """Log a dropped message: a burst of _LOG_BURST lines, then one per _LOG_EVERY s
        (a flood of bad messages must not flood the log); what was not logged is counted
        in the next line. The topic and the reason are a peer's text: escaped, bounded."""
        with self._lock:
            now = time.monotonic()
            self._log_tokens = min(float(_LOG_BURST), self._log_tokens +
                                   (now - self._log_time) / _LOG_EVERY)
            self._log_time = now
            if self._log_tokens < 1.0:
                self._log_held += 1
                return None
            self._log_tokens -= 1.0
            held, self._log_held = self._log_held, 0
        logger.warning("ignored a message on %s: %s%s", peertext.text(topic),
                       peertext.text(reason, 300), " ({} more ignored since the last line; "
                       "see stats())".format(held) if held else "")
        return None

    def on(self, topic: str, callback: Callable[[Message], object]) -> "Client":
        """Call `callback(message)` for each message of this topic (one of the client's
        topics, e.g. EVENTS) once start() runs; several callbacks per topic are called in
        order. TopicError (a ValueError) for a topic the client does not receive."""
        _check_topic(topic, self.topics, "on({!r})".format(topic))
        self._callbacks.setdefault(topic, []).append(callback)
        return self

    def start(self, timeout: Optional[float] = 10.0) -> "Client":
        """Connect, then call the callbacks from a thread of the client's own."""
        self.connect(timeout)
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(target=self._dispatch, name="edge-client",
                                                daemon=True)
            self._dispatcher.start()
        return self

    def _dispatch(self):
        for message in self.messages():
            for callback in self._callbacks.get(message.kind, ()):
                try:
                    callback(message)
                except Exception:   # a robot's bug must not stop the messages that follow
                    self._count("callback_errors")
                    logger.exception("callback %s failed on %s",
                                     getattr(callback, "__name__", callback), message.topic)

    def stats(self) -> Dict[str, int]:
        """Counts: received (taken from the queue), delivered, filtered, invalid (not strict
        JSON, or outside the API document), forged (a device or camera other than its
        topic's), oversized (over max_payload: dropped unread, never queued), dropped (the
        queue was full), callback_errors, connects, sessions_lost (reconnects to a broker
        that had forgotten the session)."""
        with self._lock:
            counts = dict(self._counts)
        return {key: counts.get(key, 0) for key in (
            "received", "delivered", "filtered", "invalid", "forged", "oversized", "dropped",
            "callback_errors", "connects", "sessions_lost")}

    def _count(self, key):
        with self._lock:
            self._counts[key] += 1
            return self._counts[key]

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect and end messages() and the callbacks' thread. An unnamed session ends
        here; a named one stays on the broker, which queues for it until the next run."""
        if self._closed:
            return
        self._closed = True
        self._put(_CLOSED)
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(5)
        if self._paho is None:
            return
        if self.session is None and self.protocol == "5" and self._up:
            # MQTT 5: a session expiry of 0 on DISCONNECT ends the session now.
            self._paho.disconnect(properties=mqtt.packet_properties(
                "DISCONNECT", SessionExpiryInterval=0))
            self._paho.loop_stop()
            self._paho = None
            return
        was_up = self._up
        self._stop_paho()
        if self.session is None and was_up:
            # MQTT 3.1.1 has no expiry: a clean-session connect with the same id ends it,
            # else the broker would queue messages for it for ever.
            problem = mqtt.probe(self.settings, timeout=2.0, client_id=self.client_id)
            if problem:
                logger.debug("session %s not ended: %s", self.client_id, problem)

    def _stop_paho(self):
        self._paho.disconnect()
        self._paho.loop_stop()
        self._paho = None

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()
