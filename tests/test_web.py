"""The web port (`edge run --web-port`): token rules, the cameras, zones and lines replaced
live and kept across a restart, hostile bodies and clients, against a real daemon and broker.
Zone changes handed to a tracker between frames are tested on the tracker directly too."""

import http.client
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest

from edge import config, validate
from edge.errors import EXIT_CONFIG
from edge.frames import Frame
from edge.tracking import CameraTracking
from tests.conftest import free_port, run_edge
from tests.test_tracking import CARD, person, rows, settings
from tools.soak import start_edge, stop_edge, wait_until

COCO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                    "shared", "data", "coco8", "images", "train")
GIRAFFE = os.path.join(COCO, "000000000025.jpg")
TOKEN = "0123456789abcdef0123"
WHOLE = [[0, 0], [1, 0], [1, 1], [0, 1]]


def request(port, method, path, body=None, token=TOKEN, headers=None, timeout=10):
    """(status, parsed JSON body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = "Bearer " + token
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        return response.status, json.loads(response.read().decode() or "null")
    finally:
        conn.close()


def raw(port, data, timeout=10):
    """What the server answers to these bytes (the status line's code), or b'' if it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_all(s)


def served(port, path, timeout=10):
    """(parsed body, times refused first) of a GET retried while the server is still busy
    with an earlier burst (503, or closed at once past its refusal threads; both counted as
    refused), as a client would."""
    refused = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, doc = request(port, "GET", path, token=None)
        except (http.client.HTTPException, ConnectionError):
            status, doc = None, None
        if status == 200:
            return doc, refused
        assert status in (503, None) and time.monotonic() < deadline, (status, doc)
        refused += 1
        time.sleep(0.1)


def read_all(s):
    """Bytes from a socket until the server closes it."""
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return got
        got += chunk


def start(tmp_path, port, args, cfg, state):
    """A daemon with the web port; waits until frames flow."""
    proc = start_edge(str(tmp_path), ["--web-port", str(port), "--state-dir", state] + args,
                      cfg)

    def ready():
        try:
            status, doc = request(port, "GET", "/api/cameras", timeout=2)
        except OSError:
            return False
        return status == 200 and doc["cameras"][0]["frames"] > 0     # frames flow
    ok = wait_until(ready, 60)
    if not ok:
        stop_edge(proc)
        with open(os.path.join(str(tmp_path), "edge.log")) as f:
            raise AssertionError("no web API: " + f.read()[-3000:])
    return proc


def test_a_web_port_off_loopback_needs_a_token(tmp_path):
    cfg = tmp_path / "edge.yaml"
    for text, words in (("web: {bind: 0.0.0.0}\n", "web.bind: '0.0.0.0' takes connections"),
                        ("web: {bind: 0.0.0.0, token: short}\n", "web.token: at least 16"),
                        ("web: {token: %s, token_file: /x}\n" % TOKEN, "set one")):
        cfg.write_text(text)
        rc, _, err = run_edge("run", "-c", str(cfg), "--detector", "yolox-nano",
                              "--web-port", str(free_port()), timeout=60)
        assert rc == EXIT_CONFIG, err
        lines = [l for l in err.splitlines() if l.startswith("edge: error:")]
        assert len(lines) == 1 and words in lines[0], err
        assert "short" not in err          # a token is never echoed


def test_a_corrupt_saved_zones_file_stops_the_start_with_its_name(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "zones.json").write_text('{"v": 1, "cameras": {"source": {"zones": [{"name": ')
    rc, _, err = run_edge("run", "--detector", "yolox-nano", "--state-dir", str(state),
                          "--max-frames", "1", timeout=60)
    assert rc == EXIT_CONFIG, err
    lines = [l for l in err.splitlines() if l.startswith("edge: error:")]
    assert len(lines) == 1, err
    assert str(state / "zones.json") in lines[0] and "not valid JSON" in lines[0]
    assert "remove it" in lines[0]
    (state / "zones.json").write_text(json.dumps(
        {"v": 1, "cameras": {"source": {"zones": [{"name": "a", "points": [[0, 0], [1, 1]]}]}}}))
    rc, _, err = run_edge("run", "--detector", "yolox-nano", "--state-dir", str(state),
                          "--max-frames", "1", timeout=60)
    assert rc == EXIT_CONFIG and "cameras.source.zones[0].points: must be" in err, err


def test_zones_put_over_the_api_bring_events_at_once_and_survive_a_restart(
        tmp_path, broker, subscriber, model_dir):
    folder = tmp_path / "still"
    folder.mkdir()
    shutil.copy(GIRAFFE, str(folder / "giraffe.jpg"))     # a giraffe standing still, looped
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = "web: {token_file: %s}\n" % token_file
    port = free_port()
    state = str(tmp_path / "state")
    args = ["--source", "cam=images://{}?loop=1".format(folder), "--detector", "yolox-nano",
            "--model-dir", model_dir, "--mqtt", broker.url, "--device-id", "d1"]
    sub = subscriber("edge/d1/#")
    proc = start(tmp_path, port, args, cfg, state)
    try:
        # the token: none, a wrong one -> 401; the header or ?token= -> 200
        assert request(port, "GET", "/api/cameras", token=None)[0] == 401
        assert request(port, "GET", "/api/cameras", token="x" * 20)[0] == 401
        assert request(port, "GET", "/nowhere", token=None)[0] == 401
        status, doc = request(port, "GET", "/api/cameras?token=" + TOKEN, token=None)
        assert status == 200
        camera = doc["cameras"][0]
        assert doc["cameras"] == [{"name": "cam", "width": 640, "height": 426,
                                   "state": camera["state"], "frames": camera["frames"],
                                   "fps": camera["fps"], "tracked": True}]
        assert request(port, "GET", "/api/cameras/cam/zones") == (200, [])
        assert request(port, "GET", "/api/cameras/nope/zones")[0] == 404
        assert request(port, "DELETE", "/api/cameras/cam/zones")[0] == 405

        # the giraffe gets a track id before any zone exists
        assert sub.wait_for(lambda s: any(d["track_id"] for m in s.json("detections/cam")
                                          for d in m["detections"]), 30)
        assert not sub.json("events/cam") or all(
            e["type"] == "track_start" for e in sub.json("events/cam"))

        # hostile bodies: each a 400 (413) with one line, and nothing changes
        big = raw(port, "PUT /api/cameras/cam/zones HTTP/1.0\r\nAuthorization: Bearer {}\r\n"
                        "Content-Length: {}\r\n\r\n".format(TOKEN, 10 << 20).encode())
        assert big.startswith(b"HTTP/1.0 413"), big
        for body, words in (
                (b"not json", "the body is not JSON"),
                (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
                (b'[{"name": "z", "points": [[0, 0], [NaN, 1], [1, 1]]}]', "no .nan or .inf"),
                (b'[{"name": "z", "points": [[0, 0], [Infinity, 1], [1, 1]]}]', "no .nan"),
                (json.dumps([{"name": "z", "points": [[i, i % 7] for i in range(10000)]}])
                 .encode(), "a zone has at most 64 points (got 10000)"),
                (b'{"zones": []}', "camera cam: zones: must be a list of at most 100 zones"),
                (b'[[[[[["deep"]]]]]]', "camera cam: zones: must be"),
                (json.dumps([{"name": "z", "points": WHOLE, "normalized": True,
                              "labels": ["unicorn"]}]).encode(),
                 "camera cam: zones[0].labels: unknown label 'unicorn' for detector")):
            status, doc = request(port, "PUT", "/api/cameras/cam/zones", body)
            assert status == 400, (body[:60], doc)
            assert words in doc["error"] and "\n" not in doc["error"], doc
        assert request(port, "GET", "/api/cameras/cam/zones") == (200, [])

        # a zone over the whole picture: the giraffe, already tracked, enters it
        zone = [{"name": "everywhere", "points": WHOLE, "normalized": True,
                 "labels": ["giraffe"]}]
        status, doc = request(port, "PUT", "/api/cameras/cam/zones", zone)
        assert status == 200, doc
        assert doc == zone
        assert sub.wait_for(lambda s: any(e["type"] == "zone_enter" and e["zone"] == "everywhere"
                                          and e["camera"] == "cam"
                                          for e in s.json("events/cam")), 15)
        line = [{"name": "gate", "points": [[0.5, 0], [0.5, 1]], "normalized": True}]
        assert request(port, "PUT", "/api/cameras/cam/lines", line)[0] == 200
        assert request(port, "GET", "/api/cameras/cam/lines")[1] == [
            dict(line[0], direction="both", labels=None)]
        time.sleep(1.0)
        # the still giraffe neither crossed the new line nor left the zone it stays in
        kinds = [(e["type"], e.get("zone")) for e in sub.json("events/cam")]
        assert kinds.count(("zone_enter", "everywhere")) == 1, kinds
        assert ("zone_leave", "everywhere") not in kinds and \
            not any(k == "line_cross" for k, _ in kinds), kinds
        status, figures = request(port, "GET", "/api/server")
        assert figures["unauthorized"] == 3 and figures["refused"] == 0, figures
    finally:
        assert stop_edge(proc) == 0
    with open(os.path.join(state, "zones.json")) as f:
        assert json.load(f)["cameras"]["cam"]["zones"] == zone

    # a restart keeps them: the saved zones win over the (empty) configuration's
    proc = start(tmp_path, port, args, cfg, state)
    try:
        assert request(port, "GET", "/api/cameras/cam/zones") == (200, zone)
        assert request(port, "GET", "/api/cameras/cam/lines")[1][0]["name"] == "gate"
    finally:
        assert stop_edge(proc) == 0


def test_idle_and_surplus_clients_are_bounded_counted_and_never_stall_the_daemon(
        tmp_path, model_dir):
    port = free_port()
    cfg = "web: {max_clients: 2, timeout: 3.0}\n"
    args = ["--source", "test://?fps=20", "--detector", "yolox-nano", "--model-dir", model_dir]
    proc = start(tmp_path, port, args, cfg, str(tmp_path / "state"))
    try:
        status, doc = request(port, "GET", "/api/cameras", token=None)
        assert doc["cameras"][0]["name"] == "source"
        frames = doc["cameras"][0]["frames"]
        assert request(port, "GET", "/api/cameras/source/zones", token=None) == (200, [])
        # two clients connect and send nothing: they hold both slots...
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.2)
        # ...so a third is refused with 503 (counted), at once
        begun = time.monotonic()
        answer = raw(port, b"GET /api/cameras HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 503"), answer
        assert b"web.max_clients" in answer and time.monotonic() - begun < 2
        # web.timeout closes the silent ones
        for s in idle:
            s.settimeout(10)
            assert s.recv(100) == b""       # closed by the server, within web.timeout
            s.close()
        status, figures = request(port, "GET", "/api/server", token=None)
        assert status == 200
        assert figures["refused"] == 1 and figures["timeouts"] == 2, figures
        assert figures["max_clients"] == 2
        # many at once: each served or refused, never hung
        answers = []
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=10)
                   for _ in range(12)]
        for s in sockets:
            s.sendall(b"GET /api/cameras HTTP/1.0\r\n\r\n")
        for s in sockets:
            answers.append(read_all(s)[:12])
            s.close()
        # (past web.max_clients and the 4 threads that answer 503, a connection is closed)
        assert set(answers) <= {b"HTTP/1.0 200", b"HTTP/1.0 503", b""}, answers
        assert b"HTTP/1.0 200" in answers
        # (the burst's last threads may still hold the slots for a moment: retried)
        figures, busy = served(port, "/api/server")
        assert figures["refused"] == 1 + 12 - answers.count(b"HTTP/1.0 200") + busy, \
            (figures, answers, busy)
        # the pipeline ran on throughout
        camera = served(port, "/api/cameras")[0]["cameras"][0]
        assert camera["frames"] >= frames + 10, (frames, camera)
    finally:
        assert stop_edge(proc) == 0


# -- zones handed to a tracker between frames -----------------------------------------------

def _zone(name, points):
    return validate.check({"zones": [{"name": name, "points": points}]},
                          {"zones": config.TRACK_ZONES}, "test")["zones"]


def test_a_zone_change_between_frames_keeps_ids_and_makes_no_spurious_events():
    tracking = CameraTracking(settings(zones=_zone("a", [[0, 0], [300, 0], [300, 480],
                                                         [0, 480]])), CARD, "d", camera="live")
    frame = Frame(0, (480, 640, 3))
    events = []

    def step(i, box):
        frame.index, frame.ts = i, 1000.0 + i / 10
        ids, new = tracking.update(rows(box), frame)
        events.extend((e["type"], e.get("zone") or e.get("line")) for e in new)
        return ids[0]
    for i in range(5):
        first = step(i, person(100))
    assert ("zone_enter", "a") in events
    events.clear()
    # zone a stays (same name, same outline), zone b is new and holds the person too
    b = _zone("b", [[50, 0], [640, 0], [640, 480], [50, 480]])
    tracking.replace_regions(tracking.make_regions(
        tracking.current_regions()[0] + b, [], "t: zones", "t: lines"))
    assert [z["name"] for z in tracking.current_regions()[0]] == ["a", "b"]
    assert step(5, person(100)) == first
    assert events == [("zone_enter", "b")]
    assert tracking.summary()["zones"]["a"]["entered"] == 1     # counts kept by name
    events.clear()
    # a line drawn right under the person: no crossing at the change; zone b gone: no event
    line = validate.check({"lines": [{"name": "l", "points": [[120, 0], [120, 480]]}]},
                          {"lines": config.TRACK_LINES}, "test")["lines"]
    tracking.replace_regions(tracking.make_regions(
        tracking.current_regions()[0][:1], line, "t: zones", "t: lines"))
    for i in range(6, 9):
        assert step(i, person(100)) == first
    assert events == []
    for i in range(9, 20):        # walking right over the line: one crossing
        step(i, person(100 + (i - 8) * 8))
    assert events.count(("line_cross", "l")) == 1, events
    assert np.all(tracking.regions.inside.sum(0) <= 1)


def test_no_zone_changes_while_the_daemon_reloads():
    """A reload reads the saved zones, then builds and swaps in new tasks: a change saved
    in between would not be used, so the API answers 503 (retry) while the daemon holds its
    regions lock, and changes again once it is free."""
    import threading
    import types
    from edge.web.api import Api
    from edge.web.server import ApiError
    app = types.SimpleNamespace(regions_lock=threading.Lock())
    api = Api(app, lambda: {})
    with app.regions_lock:                      # a reload in progress
        with pytest.raises(ApiError) as refused:
            with api._changing():
                pass
    assert refused.value.status == 503 and "reloading" in refused.value.message
    assert refused.value.headers == {"Retry-After": "2"}
    with api._changing():                       # free again: the change goes ahead
        assert app.regions_lock.locked()
    assert not app.regions_lock.locked()
