"""A camera's or a broker's password never reaches a retained message, a log line or an
error line, whatever characters it holds and however the URL is malformed.

Passwords are built from distinctive pieces (`Zq7`, `Kx9`, ...) around every character a
URL reserves (/ ? # @ : % [ ] and a space): a piece found anywhere is a leak, also of a
part of a password (urllib's "Port could not be cast to integer value as 'Zq7'").
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import quote

import pytest

from edge import mqtt, schemas
from edge.errors import ConfigError
from edge.urls import redact, redacted, split
from tests.conftest import ROOT, Broker, free_port, run_edge

PIECES = ["Zq7", "Kx9", "Wm3", "Pv5", "Tn8", "Rb2", "Hc4", "Yd6", "Gf1", "Jw0"]
RESERVED = ["/", "?", "#", "@", ":", "%", "[", "]", " "]
# One password per reserved character, and one holding all of them ("%zz": a % that
# starts no percent-escape, so the password is the same written as it is or decoded).
ONE_EACH = {c: PIECES[i] + c + ("zz" if c == "%" else "") + PIECES[i + 1]
            for i, c in enumerate(RESERVED)}
ALL = "Zq7/Kx9?Wm3#Pv5@Tn8:Rb2%zz[Hc4]Yd6 Gf1"


def leaks(text, pieces=PIECES):
    """The password pieces found in `text` (none, for a redacted text)."""
    return [piece for piece in pieces if piece in text]


def written(password):
    """The forms a password takes in a URL: as it is, and percent-encoded."""
    return [password, quote(password, safe="")]


# --- the redaction itself ---------------------------------------------------------------

URL_FORMS = [
    "rtsp://admin:{}@192.168.1.20:554/Streaming/Channels/101",
    "http://admin:{}@cam.local/video.mjpg?resolution=640x480",
    "https://admin:{}@[fe80::1]:8443/mjpeg",
    "file://admin:{}@nowhere/clip.mp4",
    "images://admin:{}@nowhere/shots/",
    "mqtt://edge:{}@broker:1883?qos=1",
    "mqtts://edge:{}@broker",
]


@pytest.mark.parametrize("form", URL_FORMS)
@pytest.mark.parametrize("char", RESERVED)
def test_every_reserved_character_is_hidden_in_every_kind_of_url(form, char):
    for password in written(ONE_EACH[char]) + written(ALL):
        url = form.format(password)
        shown = redact(url)
        assert not leaks(shown), (url, shown)
        user = form.split("//")[1].split(":")[0]
        assert shown.startswith(form.split("//")[0] + "//" + user + ":***@"), shown
        assert shown.endswith(form.split("@", 1)[1]), "the host and path stay readable"
        assert redact(shown) == shown and redact(url, url) == shown
        # quoted in a message, between other text, with the URL known or not
        message = "stream {!r} cannot be opened; check it".format(url)
        assert not leaks(redact(message)) and not leaks(redact(message, url))


@pytest.mark.parametrize("password", written(ALL))
def test_urls_inside_other_urls_and_messages(password):
    inner = "rtsp://admin:{}@10.0.0.2/s".format(password)
    for text in [
            "stereo://?left={}&right={}".format(quote(inner, safe=""), quote(inner, safe="")),
            "stereo://?left={}".format(quote(quote(inner, safe=""), safe="")),   # twice
            "stereo://?source={}&layout=side-by-side".format(inner),
            "front=test://, rear={}".format(inner),
            "source {} failed (cannot open {}); reopening".format(inner, inner),
            "line one\n" + inner + "\nline three admin@example.com"]:
        assert not leaks(redact(text)), (text, redact(text))
        assert redact(redact(text)) == redact(text)
    report = {"source": {"uri": inner, "error": "x " + inner}, "n": 3,
              "verdict": {"reasons": ["camera rear reconnecting: " + inner]}}
    assert not leaks(json.dumps(redacted(report))) and redacted(report)["n"] == 3


def test_what_is_not_a_password_stays():
    for text in ["file:///data/cam@2/clip.mp4", "images:///d/", "test://?fps=30",
                 "rtsp://192.168.1.20:554/stream", "plain admin@example.com", "/dev/video0",
                 "csi://0?width=1280", "mqtt://127.0.0.1:1883"]:
        assert redact(text) == text
    assert redact("mqtt://token@host") == "mqtt://***@host"     # a user alone: hidden too


def test_the_last_at_ends_the_userinfo():
    assert split("rtsp://a:b/c?d#e@f@host:554/s?x=1") == ("rtsp://", "a:b/c?d#e@f",
                                                          "host:554/s?x=1")
    assert split("rtsp://host/s") == ("rtsp://", None, "host/s")
    assert split("/dev/video0") == (None, None, "/dev/video0")


# --- the broker URL parser -------------------------------------------------------------

@pytest.mark.parametrize("char", RESERVED)
def test_a_broker_password_with_any_character_is_parsed_whole(char):
    password = ONE_EACH[char]
    for form in written(password):
        settings = mqtt.parse_url("mqtt://edge:{}@127.0.0.1:1884?qos=1".format(form))
        assert (settings["username"], settings["password"]) == ("edge", password), form
        assert (settings["host"], settings["port"], settings["qos"]) == ("127.0.0.1", 1884, 1)
        assert settings["display"] == "mqtt://edge:***@127.0.0.1:1884?qos=1"


@pytest.mark.parametrize("url", [
    "mqtt://edge:{}@127.0.0.1:notaport", "mqtt://edge:{}@127.0.0.1:99999",
    "mqtt://edge:{}@[::1", "mqtt://edge:{}@127.0.0.1:1883/x", "mqtt://edge:{}@127.0.0.1?qos=2",
    "mqtt://edge:{}@:1883", "http://edge:{}@127.0.0.1", "mqtt://edge:{}@127.0.0.1?retain=1"])
@pytest.mark.parametrize("password", written(ALL) + [ONE_EACH["/"], ONE_EACH["#"]])
def test_broker_url_errors_never_quote_the_password(url, password):
    with pytest.raises(ConfigError) as error:
        mqtt.parse_url(url.format(password))
    text = str(error.value)
    assert not leaks(text), text
    assert "edge:***@" in text and "EDGE_MQTT_PASSWORD" in text and "\n" not in text


# --- through real processes and a real broker that checks the password -------------------

class AuthBroker(Broker):
    """Mosquitto that takes user `edge` with `password` only."""

    def __init__(self, folder, password):
        super().__init__(folder)
        # Mosquitto started as root reads its password file as the user `mosquitto`: a
        # folder of its own that it may read (pytest's folders are the test user's alone).
        self.shared = tempfile.mkdtemp(prefix="edge-test-broker-")
        os.chmod(self.shared, 0o755)
        passwords = os.path.join(self.shared, "passwd")
        open(passwords, "w").close()
        subprocess.check_call(["mosquitto_passwd", "-b", passwords, "edge", password])
        os.chmod(passwords, 0o644)
        with open(self.conf, "w") as f:
            f.write("listener {} 127.0.0.1\nallow_anonymous false\npassword_file {}\n"
                    "persistence false\n".format(self.port, passwords))

    def stop(self):
        super().stop()
        shutil.rmtree(self.shared, ignore_errors=True)

    def url_with(self, password):
        return "mqtt://edge:{}@127.0.0.1:{}".format(password, self.port)


class Watcher:
    """Every message under edge/ (retained ones included), as the broker's user `edge`."""

    def __init__(self, port, password):
        self.messages = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.make_client("watcher-{}".format(time.monotonic_ns()))
        self.client.username_pw_set("edge", password)
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("edge/#", 1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert ready.wait(10), "the watcher could not subscribe with the password"

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload.decode("utf-8", "replace")))

    def json(self, suffix):
        with self.lock:
            return [json.loads(p) for t, p in self.messages if t.endswith("/" + suffix) and p]

    def wait_for(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.1)
        return predicate()

    def text(self):
        with self.lock:
            return "\n".join(t + " " + p for t, p in self.messages)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def start_camera(port):
    """The MJPEG camera of the fault tests (a separate process); ignores credentials."""
    from tests.test_faults import start_camera as start
    return start(port)


@pytest.fixture
def auth_broker(tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = AuthBroker(str(folder), ALL).start()
    yield broker
    broker.stop()


def test_no_password_in_health_status_replies_or_the_log(auth_broker, tmp_path, model_dir):
    """`edge run` with a camera per reserved character in its password (down: FFmpeg cannot
    even parse most of them), an MJPEG camera that works with a percent-encoded one, one that
    does not with the same password as it is, and a broker whose password holds every
    reserved character, written as it is in --mqtt (the broker takes nothing else)."""
    mjpeg_port = free_port()
    camera = start_camera(mjpeg_port)
    closed = free_port()
    sources = ["ok=http://cam:{}@127.0.0.1:{}/stream.mjpg".format(quote(ALL, safe=""),
                                                                   mjpeg_port),
               "raw=http://cam:{}@127.0.0.1:{}/stream.mjpg".format(ALL, mjpeg_port)]
    names = {"/": "slash", "?": "query", "#": "hash", "@": "at", ":": "colon", "%": "pct",
             "[": "open", "]": "close", " ": "space"}
    for char, password in ONE_EACH.items():
        sources.append("{}=rtsp://admin:{}@127.0.0.1:{}/stream".format(names[char], password,
                                                                       closed))
    sources.append("enc=rtsp://admin:{}@127.0.0.1:{}/s".format(quote(ALL, safe=""), closed))
    args = [sys.executable, "-m", "edge", "run", "-c", str(tmp_path / "edge.yaml"),
            "--detector", "yolox-nano", "--model-dir", model_dir, "--device-id", "leaky",
            "--mqtt", auth_broker.url_with(ALL), "--state-dir", str(tmp_path / "state")]
    for source in sources:
        args += ["--source", source]
    (tmp_path / "edge.yaml").write_text("health: {interval: 1}\n")
    log_path = str(tmp_path / "edge.log")
    watcher = None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        watcher = Watcher(auth_broker.port, ALL)

        def settled():
            reports = watcher.json("health")
            if not reports or "cameras" not in reports[-1]:
                return False
            cameras = reports[-1]["cameras"]
            return cameras["ok"]["frames"] > 0 and all(
                cameras[n]["state"] == "reconnecting" and cameras[n]["error"]
                for n in list(names.values()) + ["enc", "raw"])
        assert watcher.wait_for(settled, 90), open(log_path).read()[-3000:]
        # replies carry the report too, and the reasons go to the retained status
        watcher.client.publish("edge/leaky/cmd/health", json.dumps({"id": "h1"}), qos=1)
        assert watcher.wait_for(lambda: any(t.endswith("/reply/h1")
                                            for t, _ in watcher.messages), 10)
        assert watcher.wait_for(lambda: watcher.json("status")[-1]["state"] == "degraded", 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, open(log_path).read()[-3000:]
        assert watcher.wait_for(lambda: watcher.json("status")[-1]["state"] == "offline", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        camera.kill()
        camera.wait()
        if watcher is not None:
            watcher.close()
    late = Watcher(auth_broker.port, ALL)       # what a robot or operator reads afterwards
    try:
        assert late.wait_for(lambda: late.json("status") and late.json("health"), 10)
        retained = late.text()
    finally:
        late.close()
    log = open(log_path).read()
    seen = watcher.text()
    assert not leaks(seen), [l for l in seen.splitlines() if leaks(l)][:5]
    assert not leaks(retained), [l for l in retained.splitlines() if leaks(l)][:5]
    assert not leaks(log), [l for l in log.splitlines() if leaks(l)][:5]
    report = watcher.json("health")[-1]
    schemas.validate("health", report)
    cameras = report["cameras"]
    assert cameras["ok"]["uri"] == "http://cam:***@127.0.0.1:{}/stream.mjpg".format(mjpeg_port)
    assert cameras["slash"]["uri"] == "rtsp://admin:***@127.0.0.1:{}/stream".format(closed)
    assert "percent-encoded" in cameras["slash"]["error"], cameras["slash"]["error"]
    assert "ok=http://cam:***@" in report["source"]["uri"]
    reasons = [s for s in watcher.json("status") if s["state"] == "degraded"][0]["reason"]
    assert reasons.startswith("camera ") and "***@" in reasons, reasons
    assert "mqtt://edge:***@127.0.0.1" in log and "admin:***@" in log


def edge_error(result, code):
    """The one `edge: error:` line of a command that must fail with `code`."""
    rc, out, err = result
    assert rc == code, out + err
    lines = [line for line in err.splitlines() if line.startswith("edge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_broker_and_camera_passwords_stay_out_of_every_command_line_tool(auth_broker,
                                                                         tmp_path, model_dir):
    good = auth_broker.url_with(ALL)
    port = auth_broker.port
    # accepted by the broker: the whole password arrived; nothing prints it
    for args, code in [(["health", "--all", "--timeout", "1"], 2),
                       (["listen", "--topic", "status", "--count", "1"], None)]:
        if code is None:      # listen needs a message: a retained status to print
            client = mqtt.make_client("poster")
            client.username_pw_set("edge", ALL)
            client.connect("127.0.0.1", port)
            client.loop_start()
            client.publish("edge/cam1/status", mqtt.status_payload("cam1", "online",
                                                                   time.time()),
                           qos=1, retain=True).wait_for_publish(5)
            client.loop_stop()
            client.disconnect()
        rc, out, err = run_edge(*(args + ["--mqtt", good]), timeout=60)
        assert rc == (code or 0), out + err
        assert not leaks(out + err), out + err
    # refused by the broker, and URLs that do not parse: one error line each, no password
    wrong = "mqtt://edge:{}@127.0.0.1:{}".format(ALL[::-1], port)
    for url, code in [(wrong, 69), ("mqtt://edge:{}@127.0.0.1:notaport".format(ALL), 78),
                      ("mqtt://edge:{}@[::1".format(ONE_EACH["/"]), 78)]:
        for command in (["health", "cam1", "--timeout", "2"], ["listen", "--count", "1"]):
            line = edge_error(run_edge(*(command + ["--mqtt", url]), timeout=60), code)
            assert not leaks(line) and "edge:***@" in line, line
    line = edge_error(run_edge("run", "--source", "test://?frames=2&fps=0", "--detector",
                               "yolox-nano", "--model-dir", model_dir, "--mqtt",
                               "mqtt://edge:{}@127.0.0.1:notaport".format(ALL)), 78)
    assert not leaks(line) and "edge:***@" in line, line
    # the issue's own example: parsed whole now; a host that does not resolve is a delivery
    # error naming the broker, without its password
    config = tmp_path / "edge.yaml"
    config.write_text("mqtt: {flush_timeout: 1}\n")
    rc, out, err = run_edge("run", "-c", str(config), "--source", "test://?frames=2&fps=0",
                            "--detector", "yolox-nano", "--model-dir", model_dir, "--mqtt",
                            "mqtt://user:{}@no-such-host.invalid:1883".format(ONE_EACH["/"]))
    line = edge_error((rc, out, err), 69)
    assert "mqtt://user:***@no-such-host.invalid:1883" in line and not leaks(out + err), err
    # file-like sources and a stereo pair's inner camera: errors name them without password
    for source, code in [("file://admin:{}@nowhere/clip.mp4".format(ALL), 66),
                         ("images://admin:{}@nowhere/shots/".format(ALL), 66),
                         ("foo://admin:{}@x/y".format(ALL), 78),
                         ("stereo://?left={}&right={}".format(
                             quote("rtsp://admin:{}@127.0.0.1:1/s".format(ALL), safe=""),
                             quote("rtsp://admin:{}@127.0.0.1:1/s".format(ALL), safe="")),
                          None)]:
        rc, out, err = run_edge("run", "--source", source, "--detector", "yolox-nano",
                                "--model-dir", model_dir, "--max-frames", "1", timeout=90)
        assert rc != 0 and (code is None or rc == code), out + err
        assert not leaks(out + err), err
        assert "admin:***@" in err or "admin%3A***" in err, err
