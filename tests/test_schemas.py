"""The MQTT API document (edge/schemas/asyncapi.yaml) against the code that builds the payloads.

Every payload checked here is made by edge itself: `edge run` processes for detections and
matches, edge.mqtt.status_payload, edge.health.Health over recorded Jetson trees, and
edge.commands.Commands.handle for replies. One test runs a device against a real broker and
validates every message it publishes, snapshot bytes included.
"""

import base64
import fnmatch
import json
import os
import re
import subprocess
import sys
import time

import cv2
import jsonschema
import numpy as np
import pytest

import edge
from edge import mqtt, schemas, system
from edge.backends import select
from edge.commands import Commands
from edge.daemon import Daemon
from edge.health import Health
from edge.publisher import Publisher
from edge.references import ReferenceStore
from tests.conftest import COCO8_VAL, ROOT, SHARED, Subscriber, run_edge

DOC = schemas.document()
COMPONENTS = DOC["components"]["schemas"]
PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
NANO = os.path.join(ROOT, "tests", "data", "sysfs", "nano-jp46")
ORIN = os.path.join(ROOT, "tests", "data", "sysfs", "orin-jp6")
ERROR_CODES = COMPONENTS["ErrorCode"]["enum"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def walk(node, path=()):
    """(path, node) for every dict and list in a document."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            for item in walk(value, path + (key,)):
                yield item
    elif isinstance(node, list):
        for i, value in enumerate(node):
            for item in walk(value, path + (i,)):
                yield item


def pointer(ref):
    """The node a local `#/a/b` reference points at; KeyError when it does not resolve."""
    assert ref.startswith("#/"), ref
    node = DOC
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def resolved(node):
    while isinstance(node, dict) and "$ref" in node:
        node = pointer(node["$ref"])
    return node


# -- the document --------------------------------------------------------------------------

# Fixed fields of the AsyncAPI 2.6.0 objects (spec, and its JSON Schema asyncapi/spec-json-schemas
# schemas/2.6.0.json, where every one of these objects has additionalProperties: false and
# allows `x-` extensions).
FIELDS = {
    "document": {"asyncapi", "id", "info", "servers", "defaultContentType", "channels",
                 "components", "tags", "externalDocs"},
    "info": {"title", "version", "description", "termsOfService", "contact", "license"},
    "server": {"url", "description", "protocol", "protocolVersion", "variables", "security",
               "bindings", "tags"},
    "serverVariable": {"enum", "default", "description", "examples"},
    "channel": {"$ref", "parameters", "description", "servers", "publish", "subscribe",
                "deprecated", "bindings"},
    "operation": {"traits", "summary", "description", "security", "tags", "externalDocs",
                  "operationId", "bindings", "message"},
    "parameter": {"description", "schema", "location"},
    "message": {"schemaFormat", "contentType", "headers", "messageId", "payload",
                "correlationId", "tags", "summary", "name", "title", "description",
                "externalDocs", "deprecated", "examples", "bindings", "traits"},
    "example": {"name", "summary", "headers", "payload"},
    "components": {"schemas", "servers", "channels", "serverVariables", "messages",
                   "securitySchemes", "parameters", "correlationIds", "operationTraits",
                   "messageTraits", "serverBindings", "channelBindings", "operationBindings",
                   "messageBindings"},
}


def fixed_fields_only(kind, node):
    unknown = {k for k in node if not k.startswith("x-")} - FIELDS[kind]
    assert not unknown, (kind, unknown)


def test_document_has_the_asyncapi_2_6_structure():
    assert DOC["asyncapi"] == "2.6.0"
    assert {"asyncapi", "info", "channels"} <= set(DOC)
    fixed_fields_only("document", DOC)
    fixed_fields_only("info", DOC["info"])
    fixed_fields_only("components", DOC["components"])
    assert DOC["info"]["title"] == "edge" and DOC["info"]["description"]
    assert isinstance(DOC["info"]["version"], str)
    for name, server in DOC["servers"].items():
        fixed_fields_only("server", server)
        assert server["protocol"] in ("mqtt", "secure-mqtt"), name
        assert isinstance(server["protocolVersion"], str)
        for variable in re.findall(r"{(\w+)}", server["url"]):
            fixed_fields_only("serverVariable", server["variables"][variable])
            assert isinstance(server["variables"][variable]["default"], str), (name, variable)
    assert {s["protocol"] for s in DOC["servers"].values()} == {"mqtt", "secure-mqtt"}
    for parameter in DOC["components"]["parameters"].values():
        fixed_fields_only("parameter", parameter)
    operation_ids = []
    for topic, channel in DOC["channels"].items():
        fixed_fields_only("channel", channel)
        # a device's topics, and the fleet-wide commands every device takes
        assert topic.startswith(("{prefix}/{device_id}/", "{prefix}/_all/cmd/")), topic
        assert set(re.findall(r"{(\w+)}", topic)) == set(channel["parameters"]), topic
        operations = [k for k in ("publish", "subscribe") if k in channel]
        assert len(operations) == 1 and channel["description"], topic
        operation = channel[operations[0]]
        fixed_fields_only("operation", operation)
        operation_ids.append(operation["operationId"])
        assert operation["summary"], topic
        assert operation["bindings"]["mqtt"]["qos"] in (0, 1)
        message = operation["message"]
        assert set(message) in ({"$ref"}, {"oneOf"}), topic
        for branch in message.get("oneOf", [message]):
            assert "payload" in resolved(branch), (topic, branch)
    assert len(set(operation_ids)) == len(operation_ids)
    for name, message in DOC["components"]["messages"].items():
        fixed_fields_only("message", message)
        assert set(message["payload"]) == {"$ref"}, name
        for example in message.get("examples", []):
            fixed_fields_only("example", example)


def test_every_ref_resolves():
    refs = [node["$ref"] for _, node in walk(DOC) if isinstance(node, dict) and "$ref" in node]
    assert len(refs) > 50
    for ref in refs:
        pointer(ref)        # KeyError names the broken one


def test_version_is_the_package_version():
    assert DOC["info"]["version"] == edge.__version__


def test_every_schema_is_a_valid_draft_7_schema():
    for name in list(COMPONENTS) + list(schemas.KINDS):
        standalone = schemas.schema(name)
        jsonschema.Draft7Validator.check_schema(standalone)
        assert "#/components/" not in json.dumps(standalone), name


def test_every_field_is_described():
    """The MQTT API page is rendered from the descriptions: every property and schema has one."""
    missing = []
    for path, node in walk(COMPONENTS):
        if not isinstance(node, dict):
            continue
        for key, child in (node.get("properties") or {}).items():
            if not resolved(child).get("description") and not child.get("description"):
                missing.append("/".join(map(str, path + ("properties", key))))
        if "x-enumDescriptions" in node:
            assert list(node["x-enumDescriptions"]) == node["enum"], path
    for name, component in COMPONENTS.items():
        if not component.get("description"):
            missing.append(name)
    assert not missing, missing


def test_every_payload_carries_v_1():
    for name in ("Status", "Detections", "Matches", "Health", "ReplyOk", "ReplyError", "Event"):
        assert COMPONENTS[name]["properties"]["v"] == {"$ref": "#/components/schemas/ApiVersion"}
        assert "v" in COMPONENTS[name]["required"]
    assert COMPONENTS["ApiVersion"]["const"] == 1


def test_commands_match_the_handlers_and_their_results():
    channel = DOC["channels"]["{prefix}/{device_id}/cmd/{command}"]
    messages = [pointer(m["$ref"]) for m in channel["publish"]["message"]["oneOf"]]
    handlers = Commands(None).handlers
    assert [m["name"] for m in messages] == list(handlers)
    assert channel["parameters"]["command"]["$ref"] == "#/components/parameters/command"
    assert DOC["components"]["parameters"]["command"]["schema"]["enum"] == list(handlers)
    results = [m["x-result"] for m in messages]
    assert results == COMPONENTS["ReplyOk"]["properties"]["result"]["oneOf"]
    general = channel["publish"]["x-errors"]
    specific = [code for message in messages for code in message["x-errors"]]
    assert set(general) | set(specific) == set(ERROR_CODES)
    for message in messages:
        assert set(message["x-errors"]) <= set(ERROR_CODES), message["name"]
        request = resolved(message["payload"])
        assert request["required"][0] == "id"
        assert set(request["properties"]) >= {"id", "reply_to"}


def test_error_codes_are_the_ones_the_code_raises():
    with open(os.path.join(ROOT, "edge", "commands.py")) as f:
        source = f.read()
    raised = set(re.findall(r'CommandError\(\s*"(\w+)"', source))
    raised |= set(re.findall(r'"code": "(\w+)"', source))
    assert raised == set(ERROR_CODES)


def test_examples_in_the_document_validate():
    checked = 0
    for name, message in DOC["components"]["messages"].items():
        component = message["payload"]["$ref"].rsplit("/", 1)[1]
        for example in message.get("examples", []):
            schemas.validate(component, example["payload"])
            checked += 1
    assert checked >= 10


def test_package_data_ships_the_document():
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        patterns = re.search(r"^edge = (.*)$", f.read(), re.M).group(1).split(", ")
    relative = os.path.relpath(schemas.PATH, os.path.join(ROOT, "edge"))
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def test_validate_imports_jsonschema_only_when_called():
    code = ("import sys, edge.schemas as s; s.schema('health'); s.kind_of_topic('edge/a/status');"
            "assert 'jsonschema' not in sys.modules; print('ok')")
    out = subprocess.check_output([sys.executable, "-c", code], cwd=ROOT)
    assert out.strip() == b"ok"


def test_the_api_page_is_rendered_from_the_document():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "render_api.py"),
                           "--check"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr.decode()


# -- topics --------------------------------------------------------------------------------

@pytest.mark.parametrize("topic, prefix, kind", [
    ("edge/cam1/status", "edge", "status"),
    ("edge/cam1/detections", "edge", "detections"),
    ("edge/cam1/matches", "edge", "matches"),
    ("edge/cam1/depth", "edge", "depth"),
    ("edge/cam1/health", "edge", "health"),
    ("edge/cam1/events", "edge", "events"),
    ("edge/cam1/cmd/ping", "edge", "command"),
    ("edge/cam1/cmd/selfdestruct", "edge", "command"),
    ("edge/cam1/reply/p1", "edge", "reply"),
    ("edge/cam1/reply/unknown", "edge", "reply"),
    ("edge/cam1/snapshot/s2", "edge", "snapshot"),
    ("edge/_health/1f2e3d4c5b6a/cam1", "edge", "reply"),
    ("site/a/cam1/detections", "site/a", "detections"),
    ("edge/cam1/detections", "site/a", None),
    ("edge/cam1/other", "edge", None),
    ("edge/cam1/cmd", "edge", None),
    ("edge/cam1/cmd/ping/extra", "edge", None),
    ("edge//status", "edge", None),
    ("edgex/cam1/status", "edge", None),
    ("robots/r2/answers", "edge", None),
])
def test_kind_of_topic(topic, prefix, kind):
    assert schemas.kind_of_topic(topic, prefix) == kind


# -- payloads made by edge -----------------------------------------------------------------

@pytest.mark.parametrize("state, reason", [("starting", None), ("online", None),
                                           ("degraded", "task detect failed: boom"),
                                           ("offline", "finished"), ("offline", "stopped"),
                                           ("offline", "connection lost")])
def test_status_payloads_validate(state, reason):
    schemas.validate("status", json.loads(mqtt.status_payload("cam1", state, time.time(), reason)))


def test_detections_from_edge_run_validate(tmp_path, model_dir):
    jsonl = str(tmp_path / "out.jsonl")
    rc, _, err = run_edge("run", "--source", COCO8_VAL, "--detector", "yolox-nano",
                          "--jsonl", jsonl, "--model-dir", model_dir,
                          "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    messages = read_jsonl(jsonl)
    assert len(messages) == 4 and any(m["detections"] for m in messages)
    for message in messages:
        schemas.validate("detections", message)


def test_matches_from_edge_run_validate(tmp_path, model_dir):
    jsonl = str(tmp_path / "out.jsonl")
    rc, _, err = run_edge("run", "--matcher", "coarse-loftr",
                          "--reference", os.path.join(PAIR, "motorcycle_left.png"),
                          "--source", os.path.join(PAIR, "motorcycle_right.png"),
                          "--jsonl", jsonl, "--model-dir", model_dir,
                          "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    messages = read_jsonl(jsonl)
    assert len(messages) == 1 and messages[0]["homography"] is not None
    schemas.validate("matches", messages[0])


class App:
    """The attributes of a daemon that Commands and Health read, with no pipeline running.

    Commands and Health are the real ones; the broker and pipeline paths are covered by the
    live test below and by test_health.py.
    """

    def __init__(self, store=None, frame=None):
        self.device = "cam1"
        self.started = time.time() - 12.5
        self.link = mqtt.MqttLink(mqtt.parse_url("mqtt://127.0.0.1:1"), "cam1")  # never started
        self.publisher = Publisher(self.link)                                   # never started
        self.store = store
        self.pipeline = None
        self.source_display = "test://"
        self.tasks = []
        self.frame = frame
        self.reloads = 0
        self.config = self.commands = self.motion = self.last_reload = None

    snapshot = Daemon.snapshot      # what Health and metrics read: the daemon's own view

    def next_frame(self, timeout=5.0):
        return None if self.frame is None else (self.frame.copy(), 41)

    def request_reload(self):
        self.reloads += 1


LIMITS = {"temperature_c": 85.0, "memory_percent": 95.0, "min_fps": 0.0}


@pytest.mark.parametrize("system_status, root", [
    (None, "/"),                                          # health without edge.system
    (system.system_status, "/"),                          # this machine (psutil)
    (lambda: system.from_sysfs(NANO), NANO),              # recorded Jetson Nano, JetPack 4.6
    (lambda: system.from_sysfs(ORIN), ORIN),              # recorded Orin Nano, JetPack 6
    (lambda: system.empty_status("sysfs"), "/"),          # every figure unknown
])
def test_health_reports_validate(system_status, root):
    backend = select("ort").describe()
    health = Health(App(), 10.0, LIMITS, system_status=system_status,
                    versions=system.versions(backend, root=root))
    report = health.report()
    schemas.validate("health", report)
    schemas.validate("health", json.loads(json.dumps(report)))      # as it goes over the wire
    hot = dict(LIMITS, temperature_c=20.0, memory_percent=1.0)
    degraded = Health(App(), 10.0, hot, system_status=system_status).report()
    schemas.validate("health", degraded)


def test_health_accepts_platform_keys_where_documented():
    report = Health(App(), 10.0, LIMITS, system_status=lambda: system.from_sysfs(NANO),
                    versions=system.versions({"backend": "trt", "tensorrt": "8.2.1",
                                              "dla_cores": 0}, root=NANO)).report()
    report["system"]["memory"]["emc_percent"] = 12.0
    report["system"]["fan"]["profile"] = "quiet"
    schemas.validate("health", report)
    report["system"]["gpu_percent"] = 3.0
    with pytest.raises(ValueError, match=r"at system: .*'gpu_percent' was unexpected"):
        schemas.validate("health", report)


def ask(commands, name, request, reply_to=None, now=None):
    """(topic, reply) for one request, the reply checked against the API."""
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    topic, reply = commands.handle(name, raw, reply_to, now=now)
    schemas.validate("reply", reply)
    schemas.validate("reply", json.loads(json.dumps(reply)))
    return topic, reply


REQUESTS = {"ping": "PingRequest", "health": "HealthRequest", "snapshot": "SnapshotRequest",
            "set_reference": "SetReferenceRequest", "list_references": "ListReferencesRequest",
            "delete_reference": "DeleteReferenceRequest", "reload": "ReloadRequest"}


def test_replies_of_every_command_validate(tmp_path):
    image = np.random.RandomState(1).randint(0, 255, (240, 320, 3), np.uint8)
    store = ReferenceStore(str(tmp_path))
    app = App(store=store, frame=image)
    app.health = Health(app, 10.0, LIMITS, system_status=system.system_status)
    commands = Commands(app)
    for name, request in [("ping", {"id": "p1"}), ("health", {"id": "h1"}),
                          ("snapshot", {"id": "s1", "max_bytes": 60000}),
                          ("snapshot", {"id": "s2", "binary": True}),
                          ("set_reference", {"id": "r1", "name": "dock"}),
                          ("list_references", {"id": "l1"}),
                          ("delete_reference", {"id": "d1", "name": "dock"}),
                          ("reload", {"id": "rl1"})]:
        schemas.validate("command", request)
        schemas.validate(REQUESTS[name], request)
        topic, reply = ask(commands, name, request)
        assert reply["ok"], reply
        assert topic == "edge/cam1/reply/" + request["id"]
        assert schemas.kind_of_topic(topic) == "reply"
        if name == "snapshot" and "data" in reply["result"]:
            schemas.validate("snapshot", base64.b64decode(reply["result"]["data"]))
        if name == "snapshot" and "topic" in reply["result"]:
            assert schemas.kind_of_topic(reply["result"]["topic"]) == "snapshot"
    assert app.reloads == 1
    topic, reply = ask(commands, "ping", {"id": "c1", "reply_to": "edge/cam1/reply/robot/c1"})
    assert topic == "edge/cam1/reply/robot/c1" and reply["ok"]
    topic, reply = ask(commands, "ping", {"id": "c2", "reply_to": "robots/r2/answers"})
    assert topic == "edge/cam1/reply/c2" and reply["error"]["code"] == "bad_request"


def test_broadcast_requests_are_answered_on_reply_to_plus_the_device():
    """`{prefix}/_all/cmd/{name}`: the reply goes to reply_to + /device (edge health --all's
    per-device topic), the namespace rule holds for the composed topic, and only commands
    that change nothing are taken."""
    app = App()
    app.health = Health(app, 10.0, LIMITS)
    commands = Commands(app)
    request = {"id": "health-s1", "reply_to": "edge/_health/s1"}
    schemas.validate("HealthRequest", request)
    topic, reply = commands.handle("health", json.dumps(request).encode(), broadcast=True)
    schemas.validate("reply", json.loads(json.dumps(reply)))
    assert topic == "edge/_health/s1/cam1" and reply["ok"] and reply["result"]["device"] == "cam1"
    assert schemas.kind_of_topic(topic) == "reply"
    assert schemas.kind_of_topic(app.link.broadcast_topic("health")) == "command"
    # on the device's own topic a reply_to under _health must already end in this device
    # (`edge health DEV`'s form; edge health files answers by that level)
    direct = dict(request, reply_to="edge/_health/s1/cam1")
    assert commands.handle("ping", json.dumps(direct).encode())[0] == "edge/_health/s1/cam1"
    topic, reply = commands.handle("ping", json.dumps(request).encode())
    assert topic == "edge/cam1/reply/health-s1" and reply["error"]["code"] == "bad_request"
    # MQTT 5 response topic: the device is appended as well
    topic, reply = commands.handle("ping", b'{"id": "p5"}', "edge/_health/s5", broadcast=True)
    assert topic == "edge/_health/s5/cam1" and reply["ok"]
    # no reply_to: the device's own reply topic
    topic, reply = commands.handle("ping", b'{"id": "p6"}', broadcast=True)
    assert topic == "edge/cam1/reply/p6" and reply["ok"]
    # a reply_to outside the namespaces stays refused
    topic, reply = commands.handle("ping", json.dumps(
        {"id": "p7", "reply_to": "edge/cam2/status"}).encode(), broadcast=True)
    assert topic == "edge/cam1/reply/p7" and reply["error"]["code"] == "bad_request"
    # commands that change something are refused on the broadcast topic
    topic, reply = commands.handle("reload", json.dumps(
        {"id": "r1", "reply_to": "edge/_health/s1"}).encode(), broadcast=True)
    assert topic == "edge/_health/s1/cam1" and reply["error"]["code"] == "bad_request"
    assert "edge/cam1/cmd/reload" in reply["error"]["message"] and app.reloads == 0


def test_error_replies_validate_for_every_code(tmp_path):
    app = App()     # no matcher (store None), no frames, no health reporter
    commands = Commands(app, max_bytes=256)
    cases = [
        ("bad_json", "ping", b"{not json"),
        ("bad_json", "ping", b"\xff\xfe"),
        ("bad_request", "ping", b"[]"),
        ("bad_request", "ping", {"id": 5}),
        ("bad_request", "ping", {"id": "has space"}),
        ("bad_request", "ping", {"id": "x1", "reply_to": "robots/#"}),
        ("bad_request", "set_reference", {"id": "x2", "name": "../../etc/passwd"}),
        ("bad_request", "delete_reference", {"id": "x3"}),
        ("bad_request", "snapshot", {"id": "x4", "max_bytes": "lots"}),
        ("unknown_command", "selfdestruct", {"id": "x5"}),
        ("too_large", "ping", {"id": "x6", "pad": "x" * 300}),
        ("not_found", "delete_reference", {"id": "x7", "name": "dock"}),
        ("unavailable", "set_reference", {"id": "x8", "name": "dock"}),
        ("unavailable", "snapshot", {"id": "x9"}),
        # a bug in a handler: health on a daemon whose health reporter is missing
        ("internal", "health", {"id": "x10"}),
    ]
    seen = set()
    for code, name, request in cases:
        topic, reply = ask(commands, name, request)
        assert reply["ok"] is False and reply["error"]["code"] == code, (request, reply)
        if reply["id"] is None:
            assert topic == "edge/cam1/reply/unknown"
        seen.add(code)
    # failed: the command ran and could not do it (a frame too small to be a reference)
    small = App(store=ReferenceStore(str(tmp_path)), frame=np.zeros((8, 8, 3), np.uint8))
    _, reply = ask(Commands(small), "set_reference", {"id": "f1", "name": "dock"})
    assert reply["error"]["code"] == "failed"
    seen.add("failed")
    # rate_limited: a burst of one at a fixed instant
    limited = Commands(App(), rate=0.1, burst=1)
    now = time.monotonic()
    assert ask(limited, "ping", {"id": "q1"}, now=now)[1]["ok"]
    _, reply = ask(limited, "ping", {"id": "q2"}, now=now)
    assert reply["error"]["code"] == "rate_limited"
    seen.add("rate_limited")
    assert seen == set(ERROR_CODES)


def test_the_health_client_request_validates():
    from edge.remote import Asker
    asker = Asker(mqtt.parse_url("mqtt://127.0.0.1:1"), "edge")
    sent = []
    asker.client.publish = lambda topic, payload, qos=0: sent.append((topic, payload))
    asker.ask(["cam1", "cam2"])
    for topic, payload in sent:
        assert schemas.kind_of_topic(topic) == "command" and topic.endswith("/cmd/health")
        request = json.loads(payload)
        schemas.validate("HealthRequest", request)
        assert schemas.kind_of_topic(request["reply_to"]) == "reply"
    sent.clear()
    asker.broadcast()
    (topic, payload), = sent
    assert topic == "edge/_all/cmd/health" and schemas.kind_of_topic(topic) == "command"
    request = json.loads(payload)
    schemas.validate("HealthRequest", request)
    # each device answers on reply_to + /device, the per-device topic of the session
    assert schemas.kind_of_topic(request["reply_to"] + "/cam1") == "reply"


# -- broken payloads -----------------------------------------------------------------------

DETECTIONS = DOC["components"]["messages"]["Detections"]["examples"][0]["payload"]


def broken(change):
    message = json.loads(json.dumps(DETECTIONS))
    change(message)
    return message


BROKEN = [
    ("detections", broken(lambda m: m.pop("v")), "(the payload)", "'v' is a required property"),
    ("detections", broken(lambda m: m.update(v=2)), "v", "1 was expected"),
    ("detections", broken(lambda m: m["detections"][0].update(box="12,40,200,470")),
     "detections[0].box", "is not of type 'array'"),
    ("detections", broken(lambda m: m["detections"][0]["box"].__setitem__(1, "40")),
     "detections[0].box[1]", "is not of type 'number'"),
    ("detections", broken(lambda m: m["detections"][0]["box"].pop()),
     "detections[0].box", "is too short"),
    ("detections", broken(lambda m: m["detections"][0].update(color="red")),
     "detections[0]", "'color' was unexpected"),
    ("detections", broken(lambda m: m["frame"].update(width=-1)), "frame.width",
     "less than the minimum"),
    ("status", {"v": 1, "device": "cam1", "state": "asleep", "since": 1.0, "reason": None,
                "version": "0.1.0"}, "state", "is not one of"),
    ("reply", {"v": 1, "id": "p1", "ok": True, "error": {"code": "failed", "message": "x"}},
     "(the payload)", "'result' is a required property|'error' was unexpected"),
    ("reply", {"v": 1, "id": None, "ok": False, "error": {"code": "oops", "message": "x"}},
     "error.code", "is not one of"),
    ("reply", {"v": 1, "id": "p1", "ok": True, "result": {"pong": "yes", "ts": 1.0,
                                                          "uptime_s": 2.0}},
     "result.pong", "is not of type 'boolean'"),
    ("command", {"id": "a/b"}, "id", "does not match"),
    ("events", dict(DOC["components"]["messages"]["Event"]["examples"][0]["payload"],
                    direction="up"), "direction", "is not one of"),
    ("events", {k: v for k, v in DOC["components"]["messages"]["Event"]["examples"][0][
        "payload"].items() if k != "line"}, "(the payload)", "'line' is a required property"),
    ("events", dict(DOC["components"]["messages"]["Event"]["examples"][2]["payload"],
                    zone="dock"), "(the payload)", "should not be valid"),
]


@pytest.mark.parametrize("kind, payload, where, reason", BROKEN)
def test_broken_payloads_are_refused_with_path_and_reason(kind, payload, where, reason):
    with pytest.raises(ValueError) as info:
        schemas.validate(kind, payload)
    message = str(info.value)
    assert message.startswith("{} payload: at {}: ".format(kind, where)), message
    assert re.search(reason, message), message


def test_snapshot_kind_wants_jpeg_bytes():
    ok, jpeg = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    schemas.validate("snapshot", jpeg.tobytes())
    with pytest.raises(ValueError, match="not JPEG"):
        schemas.validate("snapshot", b"\x89PNG\r\n")


def test_unknown_kind_is_a_key_error():
    with pytest.raises(KeyError, match="no schema 'telemetry'"):
        schemas.validate("telemetry", {})


# -- a live device -------------------------------------------------------------------------

def test_every_message_of_a_live_device_validates(broker, tmp_path, model_dir):
    """`edge run` with both tasks against a real broker: status, detections, matches,
    health, replies to every command and a binary snapshot all validate."""
    sub = Subscriber(broker.port, "#")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--source", "test://?width=320&height=240&fps=10",
         "--detector", "yolox-nano", "--matcher", "coarse-loftr", "--model-dir", model_dir,
         "--mqtt", broker.url, "--device-id", "cam1", "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert sub.wait_for(lambda s: s.json("health") and s.json("detections"), 60)
        requests = [("set_reference", {"id": "r1", "name": "dock"}), ("ping", {"id": "p1"}),
                    ("list_references", {"id": "l1"}), ("health", {"id": "h1"}),
                    ("snapshot", {"id": "s1", "max_bytes": 30000}),
                    ("snapshot", {"id": "s2", "binary": True}),
                    ("delete_reference", {"id": "d1", "name": "nothing"}),
                    ("ping", {"id": "c1", "reply_to": "robots/r2/answers"})]
        for name, request in requests:
            sub.client.publish("edge/cam1/cmd/" + name, json.dumps(request), qos=1)
        assert sub.wait_for(lambda s: len([t for t, _, _ in s.messages if "/reply/" in t or
                                           t == "robots/r2/answers"]) == len(requests), 30)
        assert sub.wait_for(lambda s: s.json("matches"), 20)
    finally:
        proc.terminate()
        proc.wait(30)
        time.sleep(0.5)
        sub.close()
    kinds = {}
    for topic, payload, _ in sub.messages:
        kind = "reply" if topic == "robots/r2/answers" else schemas.kind_of_topic(topic)
        assert kind is not None, topic
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "snapshot":
            schemas.validate(kind, payload)
        else:
            assert agree(kind, schemas.loads(payload)) is None, (topic, payload[:200])
    assert set(kinds) == {"status", "detections", "matches", "health", "command", "reply",
                          "snapshot"}, kinds


def test_every_message_of_a_live_stereo_device_validates(broker, tmp_path, model_dir):
    """`edge run` on two live cameras (test patterns at the Middlebury pair's size) with the
    pair's calibration and a depth grid: detections carry `spatial`, depth grids, health
    with the depth task and a snapshot with the depth map all validate."""
    from urllib.parse import quote
    camera = quote("test://?width=741&height=500&fps=10", safe="")
    grid = tmp_path / "stereo.yaml"
    grid.write_text("stereo:\n  grid: 8x6\n  max_hz: 5\n")
    sub = Subscriber(broker.port, "#")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "-c", str(grid), "--source",
         "stereo://?left={}&right={}".format(camera, camera), "--calib",
         os.path.join(PAIR, "calib.txt"), "--detector", "yolox-nano", "--model-dir", model_dir,
         "--mqtt", broker.url, "--device-id", "cam1", "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert sub.wait_for(lambda s: s.json("depth") and s.json("detections") and
                            any("depth" in h["tasks"] for h in s.json("health")), 60)
        sub.client.publish("edge/cam1/cmd/snapshot", json.dumps({"id": "s1", "depth": True,
                                                                 "max_bytes": 200000}), qos=1)
        assert sub.wait_for(lambda s: s.json("reply/s1"), 20)
    finally:
        proc.terminate()
        proc.wait(30)
        time.sleep(0.5)
        sub.close()
    kinds = set()
    for topic, payload, _ in sub.messages:
        kind = schemas.kind_of_topic(topic)
        assert kind is not None, topic
        kinds.add(kind)
        assert agree(kind, schemas.loads(payload)) is None, (topic, payload[:200])
    assert {"detections", "depth", "health", "reply"} <= kinds
    depth = sub.json("depth")[0]
    assert depth["model"] == "stereo-sgbm" and len(depth["depth_mm"]) == 6
    assert all("spatial" in d for m in sub.json("detections") for d in m["detections"])
    assert all(h["source"]["unpaired"] >= 0 for h in sub.json("health"))
    reply = sub.json("reply/s1")[0]
    assert reply["ok"] and reply["result"]["frame"]["width"] == 2 * 741


# -- bounds (issue 23): what is valid is written down, and both checks hold to it -----------

def test_the_documented_bounds_are_the_code_s_limits():
    """maxItems and maximum where the daemon's own limits set them: a card's candidates
    (detections per frame), match.top_k (matches per message), stereo.grid (cells)."""
    from edge import cards, config
    detections = COMPONENTS["Detections"]["properties"]["detections"]
    assert detections["maxItems"] == cards.SPEC["candidates"].max == 3840
    assert COMPONENTS["Matches"]["properties"]["matches"]["maxItems"] == \
        config.SPEC["match"]["top_k"].max
    grid = COMPONENTS["Depth"]["properties"]["grid"]["properties"]
    assert grid["columns"]["maximum"] == grid["rows"]["maximum"] == 256
    depth_mm = COMPONENTS["Depth"]["properties"]["depth_mm"]
    assert depth_mm["maxItems"] == depth_mm["items"]["maxItems"] == 256
    assert depth_mm["items"]["items"]["maximum"] == config.SPEC["stereo"]["depth_max_mm"].max
    # a file name of an image folder: 255 bytes on Linux (NAME_MAX), with margin
    assert COMPONENTS["Frame"]["properties"]["name"]["maxLength"] >= 1024


def every_node_robots_get():
    """(path, schema) of every schema node in the payloads robots and `edge health` get,
    the components they refer to included."""
    names, todo = set(), ["Status", "Detections", "Matches", "Depth", "Event", "Health",
                          "ReplyOk", "ReplyError"]
    while todo:
        name = todo.pop()
        if name in names:
            continue
        names.add(name)
        for path, node in walk(COMPONENTS[name], (name,)):
            if isinstance(node, dict) and isinstance(node.get("$ref"), str):
                todo.append(node["$ref"].rsplit("/", 1)[1])
    for name in sorted(names):
        for item in walk(COMPONENTS[name], (name,)):
            yield item


def test_every_string_array_and_number_of_a_device_s_message_is_bounded():
    """Robots receive only what the document bounds: each string has maxLength (or an
    enum, a const or a pattern of bounded length), each array maxItems, each integer a
    maximum."""
    unbounded = []
    for path, node in every_node_robots_get():
        if not isinstance(node, dict) or path[-1:] == ("properties",) or "$ref" in node:
            continue
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        if "string" in types and not ({"maxLength", "enum", "const"} & set(node)) and \
                not re.search(r"\{\d+,\d+\}(\$|\(\?!\[\\s\\S\]\))$", node.get("pattern", "")):
            unbounded.append(("string", path))
        if "array" in types and "maxItems" not in node:
            unbounded.append(("array", path))
        if "integer" in types and "maximum" not in node and "const" not in node:
            unbounded.append(("integer", path))
    assert not unbounded, unbounded


def agree(kind, payload, strict=True):
    """Whether the payload is valid, by the fast check and by jsonschema (validate); they
    must agree."""
    outcomes = []
    for check in (schemas.check, schemas.validate):
        try:
            check(kind, payload, strict=strict)
            outcomes.append(None)
        except ValueError as e:
            outcomes.append(str(e))
    assert (outcomes[0] is None) == (outcomes[1] is None), (kind, outcomes)
    return outcomes[0]


def test_check_and_jsonschema_agree_on_examples_and_broken_payloads():
    for name, message in DOC["components"]["messages"].items():
        component = message["payload"]["$ref"].rsplit("/", 1)[1]
        for example in message.get("examples", []):
            if component != "SnapshotImage":
                assert agree(component, example["payload"]) is None, name
    for kind, payload, where, reason in BROKEN:
        problem = agree(kind, payload)
        assert problem.startswith("{} payload: at {}: ".format(kind, where)), problem
        assert re.search(reason, problem), problem


@pytest.mark.parametrize("system_status, root", [
    (system.system_status, "/"),
    (lambda: system.from_sysfs(NANO), NANO),
    (lambda: system.from_sysfs(ORIN), ORIN),
    (lambda: system.empty_status("sysfs"), "/"),
])
def test_check_and_jsonschema_agree_on_health_reports(system_status, root):
    backend = select("ort").describe()
    for limits in (LIMITS, dict(LIMITS, temperature_c=20.0, memory_percent=1.0)):
        report = Health(App(), 10.0, limits, system_status=system_status,
                        versions=system.versions(backend, root=root)).report()
        assert agree("health", json.loads(json.dumps(report))) is None
        assert agree("health", json.loads(json.dumps(report)), strict=False) is None


def test_the_largest_legitimate_messages_are_valid_and_cheap_to_check():
    """A depth grid of 256 x 256 cells at the farthest depth, detections at a card's 3840
    candidates with long labels and 3-D positions, matches at top_k: valid by both checks,
    and the fast one takes well under a second."""
    depth = json.loads(json.dumps(DOC["components"]["messages"]["Depth"]["examples"][0][
        "payload"]))
    depth["grid"] = {"columns": 256, "rows": 256}
    depth["depth_mm"] = [[10000000] * 256 for _ in range(256)]
    det = json.loads(json.dumps(DOC["components"]["messages"]["Detections"]["examples"][2][
        "payload"]))
    det["frame"]["name"] = "n" * 255 + ".png"
    det["detections"] = [dict(det["detections"][0], track_id=i + 1, label="l" * 128)
                         for i in range(3840)]
    matches = json.loads(json.dumps(DOC["components"]["messages"]["Matches"]["examples"][0][
        "payload"]))
    matches["matches"] = [[1234.56, 987.65, 4321.09, 876.54, 0.8073]] * 25000
    for kind, payload in (("depth", depth), ("detections", det), ("matches", matches)):
        assert agree(kind, payload, strict=False) is None
        started = time.perf_counter()
        schemas.check(kind, payload, strict=False)
        assert time.perf_counter() - started < 0.5, kind


@pytest.mark.parametrize("raw, problem", [
    (b'{"a": NaN}', "NaN"),
    (b'{"a": Infinity}', "Infinity"),
    (b'{"a": -Infinity}', "-Infinity"),
    (b'{"v": 1, "device": "cam1", "state": "online", "since": 1e400, "reason": null, '
     b'"version": "0.1.0"}', "at since: inf is not a finite number"),
    (b'{"a": ' + b"9" * 5000 + b"}", "digits"),
    (b"[" * 100000 + b"]" * 100000, "nested"),
    (b"\xff", "UTF-8"),
])
def test_loads_is_strict_json(raw, problem):
    with pytest.raises(ValueError, match=problem):
        payload = schemas.loads(raw)
        schemas.check("status", payload)


def test_nan_and_infinity_fail_validate_too():
    """jsonschema takes NaN for a number: validate (what the tests check every published
    message with) refuses it, so a daemon that ever published one would fail them."""
    status = json.loads(mqtt.status_payload("cam1", "online", time.time()))
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="at since: .* finite"):
            schemas.validate("status", dict(status, since=value))


def test_detections_from_an_image_folder_with_long_file_names_validate(tmp_path, model_dir):
    """File names of 255 bytes (Linux's most) in an image folder: the messages name them
    and stay valid."""
    import shutil
    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(sorted(os.listdir(COCO8_VAL))[:2]):
        shutil.copy(os.path.join(COCO8_VAL, name),
                    str(folder / ("{}".format(i) * 251 + ".jpg")))
    jsonl = str(tmp_path / "out.jsonl")
    rc, _, err = run_edge("run", "--source", str(folder), "--detector", "yolox-nano",
                          "--jsonl", jsonl, "--model-dir", model_dir,
                          "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    messages = read_jsonl(jsonl)
    assert len(messages) == 2 and all(len(m["frame"]["name"]) == 255 for m in messages)
    for message in messages:
        assert agree("detections", message) is None


def mutations(payload, rng, count):
    """`count` copies of a payload, each with one value somewhere replaced, a key dropped
    or a key added."""
    paths = [path for path, _ in walk(payload) if path]
    odd = [None, True, 0, -1, 1.5, 2 ** 60, "", "x" * 300, [], [1, 2], {}, {"k": 1}, 1e11,
           "online", -0.5]
    for _ in range(count):
        copy_ = json.loads(json.dumps(payload))
        path = paths[rng.randint(len(paths))]
        parent = copy_
        for part in path[:-1]:
            parent = parent[part]
        action = rng.randint(3)
        if action == 0:
            parent[path[-1]] = odd[rng.randint(len(odd))]
        elif action == 1 and isinstance(parent, dict):
            parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent["extra_key"] = odd[rng.randint(len(odd))]
        else:
            parent.append(odd[rng.randint(len(odd))])
        yield copy_


def test_check_and_jsonschema_agree_on_random_damage():
    """A few thousand damaged copies of every example and of a health report: the fast
    check and jsonschema give the same verdict, strict and not."""
    rng = np.random.RandomState(23)
    report = Health(App(), 10.0, LIMITS, system_status=lambda: system.from_sysfs(NANO),
                    versions=system.versions(select("ort").describe(), root=NANO)).report()
    cases = [("health", json.loads(json.dumps(report)))]
    for name, message in DOC["components"]["messages"].items():
        component = message["payload"]["$ref"].rsplit("/", 1)[1]
        if component != "SnapshotImage":
            cases += [(component, e["payload"]) for e in message.get("examples", [])]
    checked = 0
    for kind, payload in cases:
        for damaged in mutations(payload, rng, 150):
            for strict in (True, False):
                agree(kind, damaged, strict)
                checked += 1
    assert checked > 5000


def test_a_health_report_bounds_every_text_it_quotes():
    """An error of any length (an exception's text, a build's output) is cut in the report,
    so no report grows past what robots accept (the document's maxLength)."""
    from edge.backends import build as building
    state = building.BuildState("huge-320x240")
    state.update(state="failed", error="engine huge-320x240: " + "x" * 20000)
    building.STATES[state.label] = state
    try:
        app = App()
        report = Health(app, 10.0, LIMITS).report()
    finally:
        del building.STATES[state.label]
    error = report["engines"]["huge-320x240"]["error"]
    assert error.startswith("engine huge-320x240: xxx") and len(error) == 1000
    assert all(len(reason) <= 2000 for reason in report["verdict"]["reasons"])
    schemas.validate("health", json.loads(json.dumps(report)))
    assert schemas.check("health", json.loads(json.dumps(report))) is None


def test_a_name_with_a_trailing_newline_is_no_valid_name():
    """`$` also matches before a final newline in Python's re: the document's name patterns
    end in (?![\\s\\S]), so jsonschema and the client's check both refuse "door\\n"."""
    example = schemas.document()["components"]["messages"]["Event"]["examples"][0]["payload"]
    event = json.loads(json.dumps(example))
    schemas.validate("events", event)
    event["line"] = "door\n"
    with pytest.raises(ValueError):
        schemas.validate("events", event)
    with pytest.raises(ValueError):
        schemas.check("events", event)
