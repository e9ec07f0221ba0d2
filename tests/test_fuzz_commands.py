"""Fuzzing the MQTT command handler with hypothesis.

`Commands.handle(name, payload)` is called directly, as the "commands" thread calls it for
each request from the broker, on a Commands built around a minimal daemon: a real
ReferenceStore in a temporary state folder, the real Health report, a real Publisher (not
started), a real frame for snapshots and references. Inputs: arbitrary bytes, deep JSON,
huge numbers, wrong types, unicode, path-like reference names (`../`, absolute paths, NUL
bytes, Windows separators). Every call must return one reply that the API's schema accepts,
with no exception escaping and no `internal` error (a bug in a handler), and nothing may be
written outside the references folder, nor in the working directory.
"""

import json
import os
import re
import time

import cv2
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from edge import mqtt, schemas
from edge.commands import Commands
from edge.daemon import Daemon
from edge.health import Health
from edge.publisher import Publisher
from edge.references import ReferenceStore
from tests.conftest import COCO8_VAL

# The documented rule, matched against the whole string (`$` would allow a trailing newline).
REFERENCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
CODES = {"bad_json", "bad_request", "unknown_command", "too_large", "rate_limited",
         "not_found", "unavailable", "failed"}      # "internal" is a bug
COMMANDS = ["ping", "health", "snapshot", "set_reference", "list_references",
            "delete_reference", "reload"]
LIMITS = {"temperature_c": 85.0, "memory_percent": 95.0, "min_fps": 0.0}


class App:
    """What Commands and Health read of a daemon, with no pipeline and no broker."""

    def __init__(self, state_dir, frame):
        self.device = "fuzz"
        self.started = time.time()
        self.link = mqtt.MqttLink(mqtt.parse_url("mqtt://127.0.0.1:1"), "fuzz")  # never started
        self.publisher = Publisher(self.link, limit=50)                          # never started
        self.store = ReferenceStore(state_dir)
        self.pipeline = None
        self.source_display = "test://"
        self.tasks = []
        self.frame = frame
        self.reloads = 0
        self.config = self.commands = self.motion = self.last_reload = None
        self.health = Health(self, 10.0, LIMITS)

    snapshot = Daemon.snapshot

    def next_frame(self, timeout=5.0):
        return self.frame.copy(), 17

    def request_reload(self):
        self.reloads += 1


class Harness:
    def __init__(self, root):
        self.root = root
        self.state = os.path.join(root, "state")
        self.cwd = os.path.join(root, "cwd")
        os.makedirs(self.cwd)
        frame = cv2.imread(os.path.join(COCO8_VAL, sorted(os.listdir(COCO8_VAL))[0]))
        self.app = App(self.state, frame)
        self.commands = Commands(self.app)
        self.clock = time.monotonic()

    def tree(self):
        """{path: (size, mtime)} of every file under the root, except the references."""
        found = {}
        references = os.path.join(self.state, "references")
        for folder, dirs, files in os.walk(self.root):
            if folder == references:
                continue
            for name in files:
                path = os.path.join(folder, name)
                stat = os.lstat(path)
                found[path] = (stat.st_size, stat.st_mtime_ns)
        return found

    def handle(self, name, payload):
        self.clock += 1.0    # one request a second: below the rate limit
        return self.commands.handle(name, payload, now=self.clock)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return Harness(str(tmp_path_factory.mktemp("fuzz")))


# --- strategies ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)

path_like = st.sampled_from([
    "../x", "../../etc/passwd", "/etc/passwd", "/tmp/evil", "a/b", "a\\b", "..\\..\\win",
    "C:\\Windows\\x", "a\x00b", "\x00", ".", "..", "", " ", "a\n", "a\r\n", "dock\n",
    "ok-name", "ok_name_2", "x" * 64, "x" * 65, "-lead", "_lead", "név", "名前", "a.png",
    "a.b", "%2e%2e%2f", "file:///etc/passwd", "http://example.com/x.png", "\ud800",
    "a" * 10000])
def mostly(good, bad, tenths=8):
    """`good` in about `tenths` of ten draws, else `bad`."""
    return st.integers(0, 9).flatmap(lambda k: good if k < tenths else bad)


valid_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True)
names = mostly(valid_names, path_like | st.text(max_size=80) | json_values, 5)
valid_ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
ids = mostly(valid_ids, st.sampled_from(["a" * 65, "", "x\n", "id with space", "\ud800",
                                         "../x"]) |
             st.text(max_size=70) | st.integers() | st.none() | st.lists(st.integers(),
                                                                         max_size=2))
topics = st.from_regex(r"[A-Za-z0-9_/.-]{1,40}", fullmatch=True)
huge = st.sampled_from([10 ** 30, -10 ** 30, 2 ** 63, 1e308, -1e308, 0, -1, 1023, 1024,
                        4 * 2 ** 20, 4 * 2 ** 20 + 1, True, False, None, "1024", 1.5, []])

requests = st.fixed_dictionaries({"id": ids, "name": names}, optional={
    "reply_to": mostly(topics, st.text(max_size=40) | path_like | json_values, 6),
    "max_bytes": mostly(st.integers(1024, 4 * 2 ** 20), huge | json_values, 5),
    "binary": mostly(st.booleans(), json_values),
}).flatmap(lambda base: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(
    lambda extra: dict(extra, **base)))


def encode(request, style):
    text = json.dumps(request, ensure_ascii=(style == "ascii"))
    return text.encode("utf-8", "surrogatepass")


payloads = mostly(st.builds(encode, requests, st.sampled_from(["ascii", "utf8"])), st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([
        b"[" * 10000 + b"]" * 10000,                       # deep nesting
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"id": "r1", "max_bytes": ' + b"9" * 5000 + b"}",  # a 5000-digit number
        b'{"id": "r1", "max_bytes": 1e999}',
        b'{"id": "r1", "name": "\\ud800"}',
        b'{"id": "r1"' + b" " * 70000 + b"}",              # over commands.max_bytes
        b"\xff\xfe\x00", b"", b"null", b"{}", b'"id"',
        b'{"id": "r1", "name": "dock\\u0000.png"}',
    ])), 7)
command_names = mostly(st.sampled_from(COMMANDS), st.text(max_size=20) | st.sampled_from(
    ["../reload", "ping/../../x", "", "\x00", "PING"]))


# --- the checks ----------------------------------------------------------------------------

def check(h, name, payload, topic, reply):
    assert isinstance(reply, dict) and reply["v"] == 1 and isinstance(reply["ok"], bool)
    assert reply["id"] is None or REQUEST_ID.match(reply["id"]), reply
    if reply["ok"]:
        assert isinstance(reply["result"], dict) and "error" not in reply
    else:
        assert reply["error"]["code"] in CODES, reply
        assert isinstance(reply["error"]["message"], str) and "result" not in reply
    wire = json.loads(json.dumps(reply))
    schemas.validate("reply", wire)
    assert isinstance(topic, str) and topic
    topic.encode("utf-8")                     # a topic paho can send
    assert "#" not in topic and "+" not in topic and not topic.startswith("$")
    for stored in h.app.store.names():
        assert REFERENCE_NAME.match(stored), stored


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(name=command_names, payload=payloads)
@example(name="set_reference", payload=b'{"id": "r1", "name": "../../escape"}')
@example(name="set_reference", payload=b'{"id": "r1", "name": "/tmp/escape"}')
@example(name="set_reference", payload=b'{"id": "r1", "name": "..\\\\..\\\\escape"}')
@example(name="set_reference", payload=b'{"id": "r1", "name": "ok\\u0000/../../x"}')
@example(name="delete_reference", payload=b'{"id": "r1", "name": "../state"}')
@example(name="snapshot", payload=b'{"id": "r1", "max_bytes": 1024, "binary": true}')
@example(name="ping", payload=b'{"id": "r1", "reply_to": "\\ud800"}')
@example(name="set_reference", payload=b'{"id": "r1", "name": "nl\\n"}')
@example(name="ping", payload=b'{"id": "r1", "reply_to": "robots/+/x"}')
def test_no_request_escapes_the_handler_or_the_state_folder(harness, monkeypatch, name,
                                                            payload):
    monkeypatch.chdir(harness.cwd)
    before = harness.tree()
    topic, reply = harness.handle(name, payload)
    event("{} {}".format(name if name in COMMANDS else "other",
                         "ok" if reply["ok"] else reply["error"]["code"]))
    check(harness, name, payload, topic, reply)
    after = harness.tree()
    assert after == before, "written outside the references folder: {}".format(
        sorted(set(after.items()) ^ set(before.items())))
    assert os.listdir(harness.cwd) == []
    references = os.path.join(harness.state, "references")
    if os.path.isdir(references):
        for entry in os.listdir(references):
            path = os.path.join(references, entry)
            assert os.path.isfile(path) and not os.path.islink(path), entry
            assert entry.endswith(".png") and ".tmp." not in entry, entry


def test_valid_requests_still_work_after_the_fuzzing(harness):
    topic, reply = harness.handle("set_reference", b'{"id": "a1", "name": "dock"}')
    assert reply["ok"] and reply["result"]["name"] == "dock", reply
    topic, reply = harness.handle("list_references", b'{"id": "a2"}')
    assert "dock" in [r["name"] for r in reply["result"]["references"]]
    topic, reply = harness.handle("delete_reference", b'{"id": "a3", "name": "dock"}')
    assert reply == {"v": 1, "id": "a3", "ok": True, "result": {"deleted": "dock"}}
    assert topic == "edge/fuzz/reply/a3"


def test_reference_name_with_a_trailing_newline_is_refused(tmp_path):
    h = Harness(str(tmp_path))
    topic, reply = h.handle("set_reference", b'{"id": "n1", "name": "dock\\n"}')
    assert not reply["ok"] and reply["error"]["code"] == "bad_request", reply
    assert h.app.store.names() == []


def test_reply_to_that_is_no_valid_topic_is_refused(tmp_path):
    h = Harness(str(tmp_path))
    topic, reply = h.handle("ping", b'{"id": "s1", "reply_to": "robot/\\ud800"}')
    assert not reply["ok"] and reply["error"]["code"] == "bad_request", reply
    topic.encode("utf-8")
