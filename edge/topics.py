"""The MQTT topic rules the device and its robots share: names, the prefix, the topics.

A device publishes under `{prefix}/{device}/`: `status`, `health`, and per task `detections`,
`matches`, `events`, `depth` (under `{kind}/{camera}` for a named camera); it takes commands
on `{prefix}/{device}/cmd/{name}` (the fleet's on `{prefix}/_all/cmd/{name}`) and motion on
`{prefix}/{device}/motion[/{camera}]`; `edge health` hears replies on
`{prefix}/_health/{session}/{device}`.

Both sides import this module (edge.config and edge.mqtt on the device, edge.client,
edge.listen and edge.remote on a robot), so it imports nothing beyond the standard library.
"""

import re
import socket
from typing import Optional, Tuple

DEFAULT_PREFIX = "edge"
BROADCAST_LEVEL = "_all"        # {prefix}/_all/cmd/{name}: a command to every device
HEALTH_CLIENT_LEVEL = "_health"     # `edge health` replies: {prefix}/_health/{session}/{device}

# What a robot subscribes to below {prefix}/{device}/, and the kind of those messages.
DETECTIONS = "detections"
MATCHES = "matches"
EVENTS = "events"
DEPTH = "depth"
STATUS = "status"
HEALTH = "health"
TOPICS = (DETECTIONS, MATCHES, EVENTS, DEPTH, STATUS, HEALTH)
# Topics a named camera's messages come on as {kind}/{camera}; status and health are the
# device's.
CAMERA_TOPICS = (DETECTIONS, MATCHES, EVENTS, DEPTH)

# \Z, not $: `$` also matches before a trailing newline, which MQTT topics cannot carry.
# A device id, a camera name, a session: one topic level, no wildcards.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
NAME_RULE = "letters, digits, _ . - (no / + # or spaces)"
PREFIX = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")
PREFIX_RULE = "MQTT topic levels without + # or spaces"

# topics directly under {prefix}/{device}/ -> kind
_FIXED = {"status": "status", "detections": "detections", "matches": "matches",
          "health": "health", "events": "events", "depth": "depth", "motion": "motion"}
# topics {prefix}/{device}/{level}/{name or id} -> kind
_NAMED = {"cmd": "command", "reply": "reply", "snapshot": "snapshot"}
# a named camera's topics: {prefix}/{device}/{kind}/{camera}
_PER_CAMERA = {"detections": "detections", "matches": "matches", "events": "events",
               "depth": "depth", "motion": "motion"}


def name_problem(value: str) -> Optional[str]:
    """None for a valid device id (or camera name, session), else the rule it breaks."""
    return None if isinstance(value, str) and NAME.match(value) else NAME_RULE


def prefix_problem(value: str) -> Optional[str]:
    """None for a valid topic prefix, else the rule it breaks."""
    return None if isinstance(value, str) and PREFIX.match(value) else PREFIX_RULE


def default_device_id(host: Optional[str] = None) -> str:
    """A device id from the host name (this machine's by default), made to follow NAME."""
    host = (socket.gethostname() if host is None else host).split(".")[0]
    return (re.sub(r"[^A-Za-z0-9_.-]", "-", host).lstrip("_.-") or "edge")[:64]


def device_topic(prefix: str, device: str, suffix: str) -> str:
    """`{prefix}/{device}/{suffix}`: a topic of one device."""
    return "{}/{}/{}".format(prefix, device, suffix)


def camera_topic(prefix: str, device: str, kind: str, camera: Optional[str] = None) -> str:
    """Where a device publishes `kind` for a camera: `{kind}/{camera}` for a named one."""
    return device_topic(prefix, device, kind if camera is None else kind + "/" + camera)


def broadcast_topic(prefix: str, name: str) -> str:
    """The topic a fleet-wide command `name` goes to: every device takes it."""
    return "{}/{}/cmd/{}".format(prefix, BROADCAST_LEVEL, name)


def health_reply_topic(prefix: str, session: str, device: Optional[str] = None) -> str:
    """Where devices answer an `edge health` session (each adds its id to the broadcast's)."""
    topic = "{}/{}/{}".format(prefix, HEALTH_CLIENT_LEVEL, session)
    return topic if device is None else "{}/{}".format(topic, device)


def kind_of_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> Optional[str]:
    """The kind of message on a concrete topic, or None for a topic not of this API.

    `edge/cam1/detections` -> "detections", `edge/cam1/detections/front` -> "detections"
    (camera `front`), `edge/cam1/motion/front` -> "motion" (what a robot sends the device),
    `edge/cam1/cmd/ping` -> "command", `edge/cam1/reply/42` -> "reply",
    `edge/cam1/snapshot/42` -> "snapshot". A reply sent to
    a request's own `reply_to` topic cannot be told from its topic (None), except the ones
    `edge health` asks for (`{prefix}/_health/{session}/{device}`).
    """
    head = prefix.rstrip("/") + "/"
    if not isinstance(topic, str) or not topic.startswith(head):
        return None
    levels = topic[len(head):].split("/")
    if any(not level for level in levels):
        return None
    if len(levels) == 3 and levels[0] == HEALTH_CLIENT_LEVEL:
        return "reply"
    if len(levels) == 2:
        return _FIXED.get(levels[1])
    if len(levels) == 3:
        return _NAMED.get(levels[1]) or _PER_CAMERA.get(levels[1])
    return None


def sender(topic: str, prefix: str = DEFAULT_PREFIX
           ) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(kind, device, camera) a concrete topic names: camera None on a topic without one;
    (None, None, None) for a topic not of TOPICS under this prefix."""
    name = kind_of_topic(topic, prefix)
    if name not in TOPICS:
        return None, None, None
    levels = topic[len(prefix.rstrip("/")) + 1:].split("/")
    return name, levels[0], levels[2] if len(levels) == 3 else None
