"""The live page's parts without a browser, against a real daemon: the page's fixed files and
the token, the live picture (MJPEG) with its overlays, a viewer that never reads (dropped,
counted; the daemon keeps its rate and does not grow), many viewers at once (bounded,
counted, refused past web.max_viewers, never holding the API's client slots), DELETE of a
zone, and /api/health."""

import configparser
import fnmatch
import os
import socket
import time

import cv2
import numpy as np
import pytest

from edge.web import page
from tests.conftest import ROOT, free_port
from tests.test_web import TOKEN, read_all, request, start
from tools.soak import stop_edge, wait_until

STREAM = "/api/cameras/source/stream"


def stream_request(port, path, token=TOKEN, rcvbuf=None):
    """A socket that asked for a stream (nothing read yet)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall("GET {} HTTP/1.0\r\nAuthorization: Bearer {}\r\n\r\n".format(path, token).encode())
    return s


def read_head(s):
    """The response's status line and headers, and what came after them."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def read_jpegs(s, rest, count):
    """`count` pictures of an MJPEG stream, decoded."""
    pictures = []
    data = rest
    while len(pictures) < count:
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, data = data.partition(b"\r\n\r\n")
        assert head.startswith(b"--frame\r\nContent-Type: image/jpeg"), head
        length = int(head.rsplit(b"Content-Length: ", 1)[1])
        while len(data) < length + 2:
            data += s.recv(65536)
        pictures.append(cv2.imdecode(np.frombuffer(data[:length], np.uint8), cv2.IMREAD_COLOR))
        data = data[length + 2:]
    return pictures


def rss_mb(pid):
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


def get(port, path, timeout=10):
    """The body of a GET, retried while the server is busy (503): a stream holds its client
    slot for the moment before it starts, and the module's server has two."""
    deadline = time.monotonic() + timeout
    while True:
        status, doc = request(port, "GET", path)
        if status == 200:
            return doc
        assert status == 503 and time.monotonic() < deadline, (status, doc)
        time.sleep(0.05)


def figures(port):
    return get(port, "/api/server")


def processed(port):
    """Frames the detect task has processed."""
    return get(port, "/api/health")["tasks"]["detect"]["frames"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_dir):
    """One daemon for the module: 2 client slots, 3 viewers, a 2 s timeout, a token."""
    tmp_path = tmp_path_factory.mktemp("web_stream")
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = ("web: {token_file: %s, max_clients: 2, max_viewers: 3, timeout: 2.0, "
           "max_fps: 20}\n" % token_file)
    args = ["--source", "test://?width=640&height=480&fps=20", "--detector", "yolox-nano",
            "--model-dir", model_dir]
    proc = start(tmp_path, port, args, cfg, str(tmp_path / "state"))
    assert wait_until(lambda: processed(port) > 0, 30)
    yield proc, port
    assert stop_edge(proc) == 0


def test_the_page_is_a_fixed_set_of_files_behind_the_token(daemon):
    _, port = daemon
    for path in ("/", "/assets/app.js", "/assets/app.css"):
        s = stream_request(port, path, token="wrong-token-wrong-token")
        assert read_all(s).startswith(b"HTTP/1.0 401"), path
        s.close()
    s = stream_request(port, "/")
    page = read_all(s)
    s.close()
    assert page.startswith(b"HTTP/1.0 200") and b"text/html" in page.split(b"\r\n\r\n")[0]
    # the page's own files carry the token it was opened with
    assert b'src="/assets/app.js?token=' + TOKEN.encode() + b'"' in page
    assert b"Content-Security-Policy: default-src 'none'" in page
    for path in ("/assets/app.js", "/assets/app.css"):
        s = stream_request(port, path)
        assert read_all(s).startswith(b"HTTP/1.0 200"), path
        s.close()
    for path in ("/assets/../web/__init__.py", "/assets/index.html", "/assets/", "/index.html",
                 "/assets/app.js/x", "/assets//etc/passwd"):
        assert request(port, "GET", path)[0] == 404, path
    assert request(port, "PUT", "/assets/app.js", b"x")[0] == 405


def test_health_and_a_bad_rate_get_clear_answers(daemon):
    _, port = daemon
    status, report = request(port, "GET", "/api/health")
    assert status == 200 and report["tasks"]["detect"]["frames"] > 0
    assert report["verdict"]["healthy"] is True
    for asked in ("0", "99", "abc", "nan"):
        status, doc = request(port, "GET", STREAM + "?fps=" + asked)
        assert status == 400 and "web.max_fps" in doc["error"] and "e.g. ?fps=5" in doc["error"]
    assert request(port, "GET", "/api/cameras/nope/stream")[0] == 404


@pytest.mark.timing      # compares the daemon's rate before and during: alone, not beside workers
def test_a_viewer_that_never_reads_is_dropped_and_the_daemon_keeps_its_rate(daemon):
    proc, port = daemon
    before = figures(port)["streams"]
    start_frames, started = processed(port), time.monotonic()
    time.sleep(2.0)
    base_rate = (processed(port) - start_frames) / (time.monotonic() - started)
    rss = rss_mb(proc.pid)
    # a small receive buffer: the daemon's side (256 KiB) fills within seconds
    s = stream_request(port, STREAM + "?fps=20", rcvbuf=4096)
    try:
        start_frames, started = processed(port), time.monotonic()
        assert wait_until(lambda: figures(port)["streams"]["dropped"] ==
                          before["dropped"] + 1, 25), figures(port)
        rate = (processed(port) - start_frames) / (time.monotonic() - started)
    finally:
        s.close()
    after = figures(port)["streams"]
    assert after["viewers"] == 0 and after["streams"] == before["streams"] + 1, after
    # a daemon that waited for the viewer would stop; what is lost besides is the encoder's
    # own work (20 pictures a second for this viewer), large on a busy 2-core host
    assert rate >= 0.5 * base_rate, (rate, base_rate)
    assert rss_mb(proc.pid) - rss < 30, (rss, rss_mb(proc.pid))


def test_many_viewers_are_bounded_counted_and_leave_the_api_its_slots(daemon):
    _, port = daemon
    server_before = figures(port)
    before = server_before["streams"]
    sockets, heads = [], []
    try:
        for _ in range(6):      # one after another: each reaches the viewers' bound alone
            sockets.append(stream_request(port, STREAM + "?fps=10"))
            heads.append(read_head(sockets[-1]))
        served = [(s, rest) for s, (head, rest) in zip(sockets, heads)
                  if head.startswith("HTTP/1.0 200")]
        refused = [head for head, _ in heads if head.startswith("HTTP/1.0 503")]
        assert len(served) == 3 and len(refused) == 3, [h[:40] for h, _ in heads]
        assert "multipart/x-mixed-replace; boundary=frame" in heads[0][0]
        # the viewers hold no client slot: the API (2 slots) still answers, several times
        # (a refused viewer's thread may hold its slot a moment after its answer: retried)
        for _ in range(3):
            now = get(port, "/api/server", timeout=3)
        streams = now["streams"]
        # refused as a viewer past web.max_viewers, or (while a refused one's thread still
        # held its slot) as a client past web.max_clients: each counted (the API's own
        # requests may have been refused a moment too, and counted as clients)
        assert streams["viewers"] == 3
        as_viewers = streams["refused"] - before["refused"]
        as_clients = now["refused"] - server_before["refused"]
        assert as_viewers <= 3 and as_viewers + as_clients >= 3, (now, server_before)
        assert streams["cameras"]["source"]["viewers"] == 3     # one encoder for all three
        # each viewer sees the test pattern's square move
        for s, rest in served:
            first, second = read_jpegs(s, rest, 2)
            assert first.shape == (480, 640, 3)
            assert np.abs(first.astype(int) - second.astype(int)).max() > 50
    finally:
        for s in sockets:
            s.close()
    assert wait_until(lambda: figures(port)["streams"]["viewers"] == 0, 10), figures(port)
    status, doc = request(port, "GET", "/api/server")
    assert doc["streams"]["cameras"]["source"]["encode_ms"] > 0


def test_a_zone_is_drawn_on_the_picture_and_deleted_by_name(daemon):
    _, port = daemon
    zone = {"name": "box", "normalized": True,
            "points": [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]}
    assert request(port, "PUT", "/api/cameras/source/zones", [zone])[0] == 200
    s = stream_request(port, STREAM)
    try:
        head, rest = read_head(s)
        picture = read_jpegs(s, rest, 1)[0]
    finally:
        s.close()
    # the zone's outline in its colour (BGR 255, 160, 0) along its top edge
    edge = picture[120, 200:440].astype(int)
    assert (np.abs(edge - (255, 160, 0)).sum(axis=1) < 120).mean() > 0.8, edge[:5]
    status, doc = request(port, "DELETE", "/api/cameras/source/zones/nothere")
    assert status == 404 and "no zone named 'nothere'; its zones: box" in doc["error"]
    assert request(port, "DELETE", "/api/cameras/source/zones/box") == (200, [])
    assert request(port, "GET", "/api/cameras/source/zones") == (200, [])


def test_the_page_files_are_package_data():
    """`pip install .[daemon]` ships every file of the page's table (setup.cfg)."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    globs = [g.strip() for g in parser["options.package_data"]["edge"].split(",")]
    for name, _ in page.ASSETS.values():
        assert os.path.isfile(os.path.join(page.FOLDER, name)), name
        assert any(fnmatch.fnmatch("web/assets/" + name, g) for g in globs), name
