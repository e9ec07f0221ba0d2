"""TLS to the broker with a client certificate, user name and password from a file; the
password never shows in logs, health or the process's command line."""

import getpass
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, free_port, mosquitto_binary

pytestmark = pytest.mark.skipif(not shutil.which("openssl") or not shutil.which(
    "mosquitto_passwd"), reason="needs openssl and mosquitto_passwd")

PASSWORD = "s3cret-Pa55-word"


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


@pytest.fixture
def tls_broker(tmp_path):
    d = str(tmp_path)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edge-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + (
            "127.0.0.1" if name == "server" else "cam1"), "-keyout", name + ".key", "-out",
            name + ".csr", cwd=d)
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\n" if name == "server" else
                    "extendedKeyUsage=clientAuth\n")
        openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", name + ".crt", "-extfile", name + ".ext",
                cwd=d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", os.path.join(d, "passwd"), "cam1", PASSWORD],
                   check=True)
    port = free_port()
    conf = os.path.join(d, "mosquitto.conf")
    with open(conf, "w") as f:
        # user: mosquitto started as root would drop to a user that cannot read tmp_path
        f.write("user " + getpass.getuser() + "\nlistener {} 127.0.0.1\nallow_anonymous false\npassword_file {}\ncafile {}\n"
                "certfile {}\nkeyfile {}\nrequire_certificate true\n".format(
                    port, os.path.join(d, "passwd"), os.path.join(d, "ca.crt"),
                    os.path.join(d, "server.crt"), os.path.join(d, "server.key")))
    os.chmod(os.path.join(d, "server.key"), 0o644)
    log = open(os.path.join(d, "mosquitto.log"), "wb")
    proc = subprocess.Popen([mosquitto_binary(), "-c", conf], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and b"running" not in open(
            os.path.join(d, "mosquitto.log"), "rb").read():
        assert proc.poll() is None, open(os.path.join(d, "mosquitto.log")).read()
        time.sleep(0.05)
    with open(os.path.join(d, "password"), "w") as f:
        f.write(PASSWORD + "\n")
    yield port, d
    proc.terminate()
    proc.wait()


def subscribe(port, d):
    from edge import mqtt
    settings = mqtt.with_credentials(mqtt.parse_url("mqtts://127.0.0.1:{}".format(port)),
                                     "cam1", os.path.join(d, "password"),
                                     os.path.join(d, "ca.crt"), os.path.join(d, "client.crt"),
                                     os.path.join(d, "client.key"))
    got, ready = [], threading.Event()
    client = mqtt.make_client("tls-sub")
    mqtt.secure(client, settings)
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("edge/#", 1)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert ready.wait(10)
    return client, got


def test_mqtts_with_client_certificate_and_password_file(tls_broker, tmp_path, model_dir):
    port, d = tls_broker
    client, got = subscribe(port, d)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("health: {interval: 1}\nmqtt: {username: cam1, password_file: %s, "
                   "ca_file: %s, cert_file: %s, key_file: %s}\n" % (
                       os.path.join(d, "password"), os.path.join(d, "ca.crt"),
                       os.path.join(d, "client.crt"), os.path.join(d, "client.key")))
    proc = subprocess.run([sys.executable, "-m", "edge", "--debug", "run", "-c", str(cfg),
                           "--source", "test://?width=320&height=240&fps=10&frames=15",
                           "--detector", "yolox-nano", "--model-dir", model_dir,
                           "--mqtt", "mqtts://127.0.0.1:{}?qos=1".format(port),
                           "--device-id", "cam1"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=120)
    log = proc.stdout.decode()
    assert proc.returncode == 0, log
    time.sleep(0.5)
    client.loop_stop()
    detections = [p for t, p in got if t.endswith("/detections")]
    assert len(detections) == 15
    everything = log + "".join(p.decode(errors="replace") for _, p in got)
    assert PASSWORD not in everything, "the password must never be logged or published"
    assert any(t.endswith("/health") for t, _ in got)


def short_run(cfg, port, model_dir):
    """`edge run` of three frames to the TLS broker with the config file `cfg`."""
    return subprocess.run([sys.executable, "-m", "edge", "run", "-c", str(cfg), "--source",
                           "test://?width=320&height=240&frames=3", "--detector", "yolox-nano",
                           "--model-dir", model_dir, "--mqtt",
                           "mqtts://127.0.0.1:{}?qos=1".format(port)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


def test_wrong_password_is_a_clear_error(tls_broker, tmp_path, model_dir):
    port, d = tls_broker
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("mqtt: {username: cam1, password_file: %s, ca_file: %s, cert_file: %s, "
                   "key_file: %s, flush_timeout: 3}\n" % (
                       wrong, os.path.join(d, "ca.crt"), os.path.join(d, "client.crt"),
                       os.path.join(d, "client.key")))
    proc = short_run(cfg, port, model_dir)
    err = proc.stderr.decode()
    assert proc.returncode == 69
    line = [l for l in err.splitlines() if l.startswith("edge: error:")][0]
    assert "bad user name or password" in line or "not authorised" in line
    assert "nope" not in err


def test_tls_files_must_exist_and_need_mqtts(tmp_path):
    from edge import mqtt
    from edge.errors import ConfigError
    with pytest.raises(ConfigError, match="ca_file .*not found"):
        mqtt.with_credentials(mqtt.parse_url("mqtts://h"), ca_file=str(tmp_path / "none.crt"))
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match="use mqtts://"):
        mqtt.with_credentials(mqtt.parse_url("mqtt://h"), ca_file=str(tmp_path / "ca.crt"))


def test_a_broker_certificate_that_does_not_verify_is_a_warning_naming_tls(tls_broker,
                                                                          tmp_path, model_dir):
    """No ca_file: the system's CAs do not know the broker's: the run says so (it used to log
    nothing at all), and the final error names it too."""
    port, d = tls_broker
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("mqtt: {username: cam1, password_file: %s, cert_file: %s, key_file: %s, "
                   "flush_timeout: 3}\n" % (os.path.join(d, "password"),
                                            os.path.join(d, "client.crt"),
                                            os.path.join(d, "client.key")))
    proc = short_run(cfg, port, model_dir)
    err = proc.stderr.decode()
    assert proc.returncode == 69, err
    warnings = [l for l in err.splitlines() if "WARNING edge.mqtt" in l]
    assert warnings and "TLS: the broker's certificate does not verify" in warnings[0], err
    assert "mqtt.ca_file" in warnings[0]
    line = [l for l in err.splitlines() if l.startswith("edge: error:")][0]
    assert "certificate does not verify" in line, line
    assert PASSWORD not in err


def test_doctor_checks_the_configured_broker(tls_broker, tmp_path, model_dir):
    """`edge doctor` connects to the broker of the config, as the daemon would."""
    port, d = tls_broker
    good = "mqtt: {url: 'mqtts://127.0.0.1:%d', username: cam1, password_file: %s, " \
           "ca_file: %s, cert_file: %s, key_file: %s}\n" % (
               port, os.path.join(d, "password"), os.path.join(d, "ca.crt"),
               os.path.join(d, "client.crt"), os.path.join(d, "client.key"))
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    for name, text, expect in (
            ("good", good, "ok"),
            ("password", good.replace(os.path.join(d, "password"), str(wrong)),
             "broker refused the connection"),
            ("noca", good.replace("ca_file: %s, " % os.path.join(d, "ca.crt"), ""),
             "certificate does not verify")):
        cfg = tmp_path / (name + ".yaml")
        cfg.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "edge", "doctor", "yolox-nano", "-c",
                               str(cfg), "--backend", "ort", "--model-dir", model_dir,
                               "--state-dir", str(tmp_path / "state")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        out = proc.stdout.decode()
        line = [l for l in out.splitlines() if l.startswith("mqtt ")]
        assert len(line) == 1 and "127.0.0.1:{}".format(port) in line[0], out
        assert expect in line[0], out
        assert proc.returncode == (0 if name == "good" else 1), out
        assert "nope" not in out and PASSWORD not in out
