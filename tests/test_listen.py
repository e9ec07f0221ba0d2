"""`edge listen` against real daemons and a real Mosquitto (with persistence), and every
example of the docs' Robots page (docs/robots.md) and of the README's robot subscriber, read
from the page and run as written.

A daemon on a live test source (device cam1, QoS 1, JSONL sink) runs for the module; a
second one plays a clip panning over a giraffe and a zebra (device clip, tracking with a
zone and a line) while listeners with filters, started before it, record what they get.
The JSONL sinks hold every message the daemons produced: what listeners print is compared
with them. The docs' examples use `mqtt://broker:1883`, replaced by the test broker's
URL, and `.venv/bin/edge`, run as `python -m edge`; those that filter by label or listen to
events run while the clip plays, the others against the live daemon.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types

import pytest

from edge import client as edge_client
from edge import cli, listen, schemas
from tests import recorded
from tests.conftest import ROOT, free_port, run_edge
from tools.soak import Mosquitto, delivery, read_jsonl, start_edge, wait_until

README_URL = "mqtt://broker:1883"
ROBOTS_PAGE = os.path.join(ROOT, "docs", "robots.md")


def robots_sections():
    """The Robots page (docs/robots.md) and the README's robot subscriber section."""
    with open(ROBOTS_PAGE, encoding="utf-8") as f:
        page = f.read()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return [page, readme.split("\n## A robot subscriber", 1)[1].split("\n## ", 1)[0]]


def readme_examples():
    """(kind, code) of each example of the Robots page and the README's robot subscriber:
    kind "sh" (one command) or "python" (a program)."""
    examples = []
    for kind, block in re.findall(r"```(sh|python)\n(.*?)```", "\n".join(robots_sections()),
                                  re.S):
        if kind == "python":
            examples.append(("python", block))
        else:
            examples += [("sh", line) for line in block.splitlines() if line.strip()]
    return examples


def sh_argv(line, url):
    """A docs command as an argv: its own broker replaced by the test's."""
    args = shlex.split(line, comments=True)
    assert args[0] == ".venv/bin/edge", line
    return [sys.executable, "-m", "edge"] + [a.replace(README_URL, url) for a in args[1:]]


def needs_the_clip(line):
    """Examples that want labelled objects or events: run while the clip plays."""
    args = shlex.split(line, comments=True)
    return "--label" in args or "--min-score" in args or "events" in args


EXAMPLES = readme_examples()
CLIP_EXAMPLES = [line for kind, line in EXAMPLES if kind == "sh" and needs_the_clip(line)]


# The readable line `edge listen` prints, per kind (the word after the device)
SHAPES = {"detections": r"^\S+ detections seq \d+ frame \d+( \S+)?: (nothing|.+? [01]\.\d\d "
                        r"\[\d+ \d+ \d+ \d+\]( track \d+)?( at x -?\d+ mm y -?\d+ mm z \d+ mm)?"
                        r"(, |$))+",
          "event": r"^\S+ event seq \d+ frame \d+: track \d+ .+ \w+( .+)?$",
          "depth": r"^\S+ depth seq \d+ frame \d+( \S+)?: \d+x\d+ grid, \d+ of \d+ cells "
                   r"known, nearest (-|\d+ mm at column \d+ row \d+)$",
          "matches": r"^\S+ matches seq \d+ frame \d+( \S+)?: reference \S+, \d+ matches, "
                     r"\d+ inliers, homography (found|none)$",
          # a last will says when the device was last heard, not since when it is offline
          "status": r"^\S+ status (\w+ since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d( \(.+\))?|offline, last "
                    r"heard (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|an unknown time) \(.+\))$",
          "health": r"^\S+ health \w+: .+$"}


def kind_of(payload):
    """The topic of a payload printed by `edge listen --json`."""
    for key, topic in (("type", "events"), ("grid", "depth"), ("verdict", "health"),
                       ("state", "status"), ("matches", "matches")):
        if key in payload:
            return topic
    return "detections"


class Listener:
    """`edge listen ARGS` in a real process, stdout and stderr in files."""

    def __init__(self, folder, argv, name):
        self.out_path = os.path.join(str(folder), name + ".out")
        self.err_path = os.path.join(str(folder), name + ".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT)
        self.rc = None

    def err(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def lines(self):
        with open(self.out_path) as f:
            return [line for line in f.read().split("\n")[:-1]]

    def json(self):
        return [json.loads(line) for line in self.lines()]

    def wait_subscribed(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if "subscribed to" in self.err():
                return
            time.sleep(0.05)
        raise AssertionError("edge listen did not subscribe: " + self.err())

    def wait_for(self, predicate, timeout=30):
        return wait_until(lambda: predicate(self), timeout)

    def stop(self):
        """Ctrl-C (unless it ended by itself); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.rc = self.proc.wait(20)
        return self.rc


def edge_listen(url, *args):
    return [sys.executable, "-m", "edge", "listen", "--mqtt", url] + list(args)


@pytest.fixture(scope="module")
def live(tmp_path_factory, model_dir):
    """A persistent Mosquitto and a daemon on a live test source (device cam1, QoS 1)."""
    folder = tmp_path_factory.mktemp("live")
    broker = Mosquitto(str(folder)).start()
    jsonl = str(folder / "out.jsonl")
    proc = start_edge(str(folder), [
        "--source", "test://?width=320&height=240&fps=10", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--device-id", "cam1", "--mqtt", broker.url + "?qos=1",
        "--jsonl", jsonl, "--state-dir", str(folder / "state")])
    try:
        deadline = time.monotonic() + 60
        while len(read_jsonl(jsonl)) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "edge run ended"
            time.sleep(0.1)
        yield types.SimpleNamespace(broker=broker, jsonl=jsonl, proc=proc, folder=folder)
    finally:
        proc.terminate()
        proc.wait(30)
        broker.stop()


CLIP_LISTENERS = {
    "all": ["clip", "--json"],
    "zebra": ["clip", "--label", "zebra", "--json"],
    "score": ["clip", "--min-score", "0.8", "--json"],
    "events": ["clip", "--topic", "events", "--json"],
    "giraffe_events": ["clip", "--topic", "events", "--label", "giraffe"],
    "readable": ["clip"],
    "camera": ["clip", "--camera", "front", "--json"],
}


@pytest.fixture(scope="module")
def clip_run(live, model_dir):
    """Listeners (the ones above and the README's examples with labels or events) started,
    then a daemon plays the clip (device clip) to its end; then the listeners are stopped."""
    folder = live.folder / "clip"
    folder.mkdir()
    video, config = recorded.clip(str(folder))
    listeners = {name: Listener(folder, edge_listen(live.broker.url, *args), name)
                 for name, args in CLIP_LISTENERS.items()}
    for i, line in enumerate(CLIP_EXAMPLES):
        listeners["readme{}".format(i)] = Listener(folder, sh_argv(line, live.broker.url),
                                                   "readme{}".format(i))
    try:
        for listener in listeners.values():
            listener.wait_subscribed()
        jsonl = str(folder / "clip.jsonl")
        rc, _, err = run_edge("run", "-c", config, "--source", video, "--detector", "yolox-nano",
                              "--device-id", "clip", "--model-dir", model_dir, "--mqtt",
                              live.broker.url + "?qos=1", "--jsonl", jsonl, "--state-dir",
                              str(folder / "state"))
        assert rc == 0, err      # exit 0: every message was delivered to the broker
        # the broker hands them on at once; the listeners print them as they come
        all_detections = listeners["all"]
        produced = recorded.by_topic(read_jsonl(jsonl))
        assert all_detections.wait_for(
            lambda li: len(li.lines()) >= len(produced["detections"]), 20)
        time.sleep(0.5)
    finally:
        for listener in listeners.values():
            listener.stop()
    return types.SimpleNamespace(listeners=listeners, produced=produced)


# -- against a live daemon ---------------------------------------------------------------

def test_count_5_json_prints_5_valid_detections_messages(live):
    rc, out, err = run_edge("listen", "--mqtt", live.broker.url, "--count", "5", "--json",
                            timeout=60)
    assert rc == 0, err
    messages = [json.loads(line) for line in out.splitlines()]
    assert len(messages) == 5
    for message in messages:
        schemas.validate("detections", message)
        assert message["device"] == "cam1"
    first = messages[0]["seq"]
    assert [m["seq"] for m in messages] == list(range(first, first + 5))
    assert "edge listen: subscribed to edge/+/detections edge/+/detections/+ on " + \
        live.broker.url in err


def test_health_as_json_validates(live):
    """The retained health report, printed at once (status and health as readable lines:
    the README's examples below)."""
    rc, out, err = run_edge("listen", "--mqtt", live.broker.url, "--topic", "health",
                            "--count", "1", "--json", timeout=60)
    assert rc == 0, err
    schemas.validate("health", json.loads(out))


def test_an_unreachable_broker_exits_69_naming_the_cause():
    started = time.monotonic()
    rc, out, err = run_edge("listen", "--mqtt", "mqtt://127.0.0.1:{}".format(free_port()),
                            "--count", "1", timeout=60)
    assert time.monotonic() - started < 5, "a refused connection ends it at once"
    assert rc == 69 and out == ""
    assert err.startswith("edge: error: mqtt mqtt://127.0.0.1:") and "connection refused" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["--topic", "status", "--label", "person"], "--label and --min-score filter"),
    (["--count", "0"], "--count 0: at least 1"),
    (["cam/1"], "device 'cam/1'"),
    (["--min-score", "1.5"], "min_score 1.5"),
    (["--mqtt", "mqtt://broker:1883?qos=2"], "qos must be 0 or 1"),
    (["--password-file", "/nonexistent/password"], "password_file /nonexistent/password"),
])
def test_bad_flags_exit_78_with_one_line(args, words, capsys):
    assert cli.main(["listen"] + args) == 78
    out, err = capsys.readouterr()
    assert out == "" and words in err and len(err.strip().splitlines()) == 1, err


def test_label_score_topic_device_and_camera_filters(clip_run):
    """Every filter against what the clip's daemon produced (its JSONL sink)."""
    got = {name: listener for name, listener in clip_run.listeners.items()}
    detections = clip_run.produced["detections"]
    events = clip_run.produced["events"]
    assert got["all"].json() == detections
    zebra = recorded.narrowed(detections, lambda d: d["label"] == "zebra")
    score = recorded.narrowed(detections, lambda d: d["score"] >= 0.8)
    assert zebra and len(zebra) < len(detections) and score
    assert got["zebra"].json() == zebra
    assert got["score"].json() == score
    for message in zebra + score:
        schemas.validate("detections", message)
    assert len(events) >= 4 and got["events"].json() == events
    giraffe = [e for e in events if e["label"] == "giraffe"]
    lines = got["giraffe_events"].lines()
    assert len(lines) == len(giraffe) >= 2
    for line, event in zip(lines, giraffe):
        assert line.startswith("clip event seq {} frame {}: track {} giraffe {}".format(
            event["seq"], event["frame_index"], event["track_id"], event["type"]))
    readable = got["readable"].lines()
    assert len(readable) == len(detections)
    for line, message in zip(readable, detections):
        assert line.startswith("clip detections seq {} frame {}: ".format(
            message["seq"], message["frame"]["index"]))
        for d in message["detections"]:
            assert "{} {:.2f} [".format(d["label"], d["score"]) in line
    # the clip's daemon has one unnamed source: its messages carry no camera
    assert got["camera"].lines() == []
    for name in CLIP_LISTENERS:
        assert got[name].rc == 130      # they ran until Ctrl-C


def test_a_broker_restart_mid_listen_loses_nothing(live, tmp_path):
    """The broker (persistence on) stops for 2 s and comes back while `edge listen` runs:
    every detections message the daemon produced from the listener's first one on arrives
    (QoS 1 at least once: a duplicate is allowed, a loss is not)."""
    listener = Listener(tmp_path, edge_listen(live.broker.url, "cam1", "--json"), "restart")
    listener.wait_subscribed()
    assert listener.wait_for(lambda li: len(li.lines()) >= 10)
    down = time.time()
    live.broker.stop()
    time.sleep(2)
    live.broker.start()
    up = time.time()
    target = max(m["seq"] for m in read_jsonl(live.jsonl)) + 10
    try:
        assert listener.wait_for(lambda li: any(m["seq"] >= target for m in li.json()), 60), \
            listener.err()
    finally:
        listener.stop()
    received = [m["seq"] for m in listener.json()]
    produced = read_jsonl(live.jsonl)
    sent = [m["seq"] for m in produced if received[0] <= m["seq"] <= target]
    outcome = delivery(sent, [s for s in received if s <= target])
    assert outcome["lost"] == [] and outcome["in_order"], outcome
    held = [m for m in produced if down <= m["frame"]["ts"] <= up]
    assert len(held) >= 10, "the daemon produced messages while the broker was down"
    err = listener.err()
    assert "connection to mqtt://127.0.0.1:{} lost".format(live.broker.port) in err
    assert "session resumed" in err and "forgotten" not in err


# -- the docs' examples --------------------------------------------------------------------

def test_the_readme_has_examples_of_each_kind():
    kinds = [kind for kind, _ in EXAMPLES]
    assert kinds.count("sh") >= 4 and kinds.count("python") >= 3   # 2 on the page, 1 README
    assert CLIP_EXAMPLES and len(CLIP_EXAMPLES) < kinds.count("sh")


@pytest.mark.parametrize("line", [line for kind, line in EXAMPLES
                                  if kind == "sh" and not needs_the_clip(line)])
def test_readme_listen_examples_against_a_live_daemon(live, line):
    proc = subprocess.run(sh_argv(line, live.broker.url), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    count = int(shlex.split(line, comments=True)[shlex.split(line, comments=True).index(
        "--count") + 1])
    assert len(lines) == count
    for text in lines:
        if "--json" in line:
            payload = json.loads(text)
            schemas.validate(kind_of(payload), payload)
        else:
            assert re.match(SHAPES[text.split()[1]], text), text


def test_readme_listen_examples_while_the_clip_plays(clip_run):
    assert CLIP_EXAMPLES
    for i, line in enumerate(CLIP_EXAMPLES):
        listener = clip_run.listeners["readme{}".format(i)]
        assert listener.rc == 0, (line, listener.err())
        args = shlex.split(line, comments=True)
        assert len(listener.lines()) == int(args[args.index("--count") + 1]), line


@pytest.mark.parametrize("index", [i for i, (kind, _) in enumerate(EXAMPLES)
                                   if kind == "python"])
def test_readme_python_examples_against_a_live_daemon(live, index):
    code = EXAMPLES[index][1]
    assert README_URL in code
    proc = subprocess.run([sys.executable, "-c", code.replace(README_URL, live.broker.url)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines, "the example printed nothing"


def test_readable_lines_in_the_readme_have_the_shape_listen_prints():
    """The Robots page's sample output and what edge.listen prints for the API document's
    examples (and a health report) match the same pattern per kind."""
    with open(ROBOTS_PAGE, encoding="utf-8") as f:
        section = f.read()
    sample = re.search(r"```text\n(.*?)```", section, re.S).group(1).splitlines()
    assert len(sample) >= 5
    made = [listen.line(edge_client.parse(
        {"Status": "status", "Detections": "detections", "Matches": "matches",
         "Depth": "depth", "Event": "events"}[name], example["payload"]))
        for name, message in schemas.document()["components"]["messages"].items()
        if name in ("Status", "Detections", "Matches", "Depth", "Event")
        for example in message["examples"]]
    made.append(listen.line(edge_client.Health("cam1", time.time(), "degraded", False,
                                               ["camera reconnecting"], "", False, {})))
    assert {line.split()[1] for line in made} == set(SHAPES)
    for line in sample + made:
        assert re.match(SHAPES[line.split()[1]], line), line


# -- hostile peers (issue 23) ----------------------------------------------------------------

def publish_raw(port, messages):
    """Publish (topic, payload bytes, retain) at QoS 1, each acknowledged by the broker."""
    from edge.mqtt import make_client
    client = make_client("hostile-{}".format(time.monotonic_ns()))
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        for topic, payload, retain in messages:
            info = client.publish(topic, payload, qos=1, retain=retain)
            info.wait_for_publish(5)
            assert info.is_published(), topic
    finally:
        client.disconnect()
        client.loop_stop()


def status_of(device, **changes):
    payload = {"v": 1, "device": device, "state": "online", "since": 1795545400.125,
               "reason": None, "version": "0.1.0"}
    payload.update(changes)
    return payload


def test_a_retained_status_with_a_wild_since_does_not_end_listen(broker):
    """`since` 1e300, NaN or Infinity in a retained status (json accepts them): `edge
    listen` goes on and prints the good status, instead of ending with exit 1."""
    publish_raw(broker.port, [
        ("edge/cam1/status", json.dumps(status_of("cam1", since=1e300)).encode(), True),
        ("edge/cam2/status", json.dumps(status_of("cam2", since=float("nan"))).encode(), True),
        ("edge/cam3/status", json.dumps(status_of("cam3", since=-float("inf"))).encode(), True),
        ("edge/cam4/status", json.dumps(status_of("cam4")).encode(), True)])
    rc, out, err = run_edge("listen", "--mqtt", broker.url, "--topic", "status", "--count", "1",
                            timeout=60)
    assert rc == 0, err
    assert out.startswith("cam4 status online since ") and len(out.splitlines()) == 1, out


def test_times_out_of_range_print_as_unknown():
    for since in (1e300, -1e300, float("nan"), float("inf"), 2 ** 70):
        status = edge_client.Status("cam1", "online", since, None, "0.1.0", "", False, {})
        assert listen.line(status) == "cam1 status online since an unknown time"


def test_hostile_text_is_printed_escaped_and_bounded(broker, tmp_path):
    """Escape codes, carriage returns, newlines that would forge a line of another device,
    bidi overrides in labels, frame names and reasons print escaped, each message on one
    line of bounded length; 1 MB strings, a zone name outside the document's pattern and a
    status that claims another device's name are not printed at all."""
    det = json.loads(json.dumps(schemas.document()["components"]["messages"]["Detections"][
        "examples"][0]["payload"]))
    event = json.loads(json.dumps(schemas.document()["components"]["messages"]["Event"][
        "examples"][1]["payload"]))
    det["detections"][0]["label"] = "\x1b[2J\x1b[31mperson\ncam9 detections seq 1 frame 0: " \
                                    "nothing"
    det["frame"]["name"] = "x\ry\x07\u202e.png"
    huge = json.loads(json.dumps(det))
    huge["detections"][0]["label"] = "x" * 1000000
    event["label"] = "car\x1b[0m\u2028cam9 event"
    bad_zone = dict(event, zone="dock\x1b[0m")
    listener = Listener(tmp_path, edge_listen(broker.url, "cam1", "rogue", "--topic", "detections",
                                              "--topic", "status", "--topic", "events"),
                        "hostile")
    try:
        listener.wait_subscribed()
        publish_raw(broker.port, [
            ("edge/cam1/detections", json.dumps(det).encode(), False),
            ("edge/cam1/detections", json.dumps(huge).encode(), False),
            ("edge/cam1/status", json.dumps(status_of(
                "cam1", state="degraded", reason="\x1b]0;owned\x07\ncam9 status online since "
                "2026-01-01 00:00:00")).encode(), False),
            ("edge/rogue/status", json.dumps(status_of("cam1")).encode(), False),
            ("edge/cam1/events", json.dumps(bad_zone).encode(), False),
            ("edge/cam1/events", json.dumps(event).encode(), False),
            ("edge/cam1/status", json.dumps(status_of("cam1", reason="end")).encode(), False)])
        assert listener.wait_for(lambda li: "(end)" in open(li.out_path, "rb").read().decode(
            "utf-8", "replace"), 20), listener.err()
    finally:
        listener.stop()
    with open(listener.out_path, "rb") as f:
        out = f.read()
    text = out.decode("utf-8")
    for bad in ("\x1b", "\x07", "\r", "\u202e", "\u2028"):
        assert bad not in text, (bad, text)
    lines = text.splitlines()
    assert [line.split()[:2] for line in lines] == [["cam1", "detections"], ["cam1", "status"],
                                                   ["cam1", "event"], ["cam1", "status"]], text
    assert all(len(line) < 1000 for line in lines)
    assert "\\x1b[2J\\x1b[31mperson\\ncam9 detections" in lines[0]
    assert "x\\ry\\x07\\u202e.png" in lines[0]
    assert "\\u2028cam9 event" in lines[2]
