"""The MQTT API as data: the AsyncAPI document shipped with the package, and its schemas.

`asyncapi.yaml` (next to this file) describes every topic and payload. Here:
- `document()`: the parsed document (loaded once);
- `schema(name)`: a standalone JSON Schema (draft-07) for a message kind (`status`, `depth`,
  `detections`, `matches`, `health`, `reply`, `command`) or a component (`SnapshotRequest`);
- `kind_of_topic(topic, prefix)`: the message kind a concrete topic carries;
- `validate(kind, payload)`: ValueError with the path and the reason when a payload is not
  what the API promises; `strict=False` (what a consumer such as edge.client checks) lets
  through keys the document does not list, which a newer device may add compatibly.

jsonschema is only needed by `validate` and imported there: devices do not install it.
"""

import copy
import os
import threading

import yaml

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "asyncapi.yaml")
DRAFT7 = "http://json-schema.org/draft-07/schema#"
COMPONENTS_REF = "#/components/schemas/"

# message kind -> component schema of its payload
KINDS = {
    "status": "Status",
    "detections": "Detections",
    "matches": "Matches",
    "depth": "Depth",
    "health": "Health",
    "reply": "Reply",
    "command": "CommandRequest",
    "events": "Event",
}
# topics directly under {prefix}/{device_id}/ -> kind
_FIXED = {"status": "status", "detections": "detections", "matches": "matches",
          "health": "health", "events": "events", "depth": "depth"}
# topics {prefix}/{device_id}/{level}/{name or id} -> kind
_NAMED = {"cmd": "command", "reply": "reply", "snapshot": "snapshot"}
# results of a named camera: {prefix}/{device_id}/{kind}/{camera}
_PER_CAMERA = {"detections": "detections", "matches": "matches", "events": "events",
               "depth": "depth"}
HEALTH_CLIENT_LEVEL = "_health"     # `edge health` replies: {prefix}/_health/{session}/{device}
JPEG_START = b"\xff\xd8\xff"

_lock = threading.Lock()
_document = None
_schemas = {}
_validators = {}


def document():
    """The AsyncAPI document as a dict (parsed once; do not modify it)."""
    global _document
    with _lock:
        if _document is None:
            with open(PATH, "r", encoding="utf-8") as f:
                _document = yaml.safe_load(f)
        return _document


def names():
    """The component schema names."""
    return sorted(document()["components"]["schemas"])


def _rewrite(node):
    """A copy of a schema with `#/components/schemas/X` refs turned into `#/definitions/X`."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(COMPONENTS_REF):
                out[key] = "#/definitions/" + value[len(COMPONENTS_REF):]
            else:
                out[key] = _rewrite(value)
        return out
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    return node


def schema(name):
    """A standalone draft-07 JSON Schema for a message kind or a component schema name.

    The components are embedded as `definitions`, so the schema needs nothing else.
    """
    component = KINDS.get(name, name)
    with _lock:
        cached = _schemas.get(component)
    if cached is None:
        components = document()["components"]["schemas"]
        if component not in components:
            raise KeyError("no schema {!r}; kinds: {}; components: {}".format(
                name, ", ".join(sorted(KINDS)), ", ".join(sorted(components))))
        cached = {"$schema": DRAFT7, "title": component}
        cached.update(_rewrite(components[component]))
        cached["definitions"] = _rewrite(components)
        with _lock:
            _schemas[component] = cached
    return copy.deepcopy(cached)


def kind_of_topic(topic, prefix="edge"):
    """The kind of message on a concrete topic, or None for a topic not of this API.

    `edge/cam1/detections` -> "detections", `edge/cam1/detections/front` -> "detections"
    (camera `front`), `edge/cam1/cmd/ping` -> "command", `edge/cam1/reply/42` -> "reply",
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


def _where(path):
    """`detections[0].box[1]` from a jsonschema error path."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += "[{}]".format(part)
        else:
            text += ("." if text else "") + str(part)
    return text or "(the payload)"


def _open(node):
    """A copy of a schema whose objects accept keys they do not list (`additionalProperties:
    false` left out); maps that constrain their values keep that constraint."""
    if isinstance(node, dict):
        return {key: _open(value) for key, value in node.items()
                if not (key == "additionalProperties" and value is False)}
    if isinstance(node, list):
        return [_open(item) for item in node]
    return node


def _validator(component, strict=True):
    import jsonschema
    with _lock:
        validator = _validators.get((component, strict))
    if validator is None:
        document = schema(component)
        validator = jsonschema.Draft7Validator(document if strict else _open(document))
        with _lock:
            _validators[(component, strict)] = validator
    return validator


def _deepest(error):
    """The most specific error of a oneOf/anyOf failure: the branch that got furthest."""
    while error.context:
        error = max(error.context, key=lambda e: (len(e.absolute_path), -len(e.context)))
    return error


def validate(kind, payload, strict=True):
    """Check a payload (a dict; bytes for `snapshot`) against the API; ValueError if invalid.

    The message names the kind, the path of the first problem and the reason, e.g.
    `detections payload: at detections[0].box: 'x' is not of type 'number'`. `strict=False`
    accepts keys the document does not list (a consumer's view: a newer device may add
    keys compatibly, and `v` changes when a change breaks consumers); every listed key is
    still checked.
    """
    if kind == "snapshot":
        if not isinstance(payload, (bytes, bytearray)) or not payload.startswith(JPEG_START):
            raise ValueError("snapshot payload: not JPEG bytes")
        return
    component = KINDS.get(kind, kind)
    if component == "Reply" and isinstance(payload, dict) and isinstance(payload.get("ok"), bool):
        # Check against the branch the reply claims to be: its errors are the readable ones.
        component = "ReplyOk" if payload["ok"] else "ReplyError"
    from jsonschema.exceptions import best_match
    error = best_match(_validator(component, strict).iter_errors(payload))
    if error is None:
        return
    error = _deepest(error)
    raise ValueError("{} payload: at {}: {}".format(kind, _where(error.absolute_path),
                                                    _short(error.message)))


def _short(text, limit=300):
    return text if len(text) <= limit else text[:limit - 3] + "..."
