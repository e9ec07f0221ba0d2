"""systemd integration: the notify protocol on a real datagram socket, the unit file checked by
systemd-analyze, and the default /etc/edge/edge.yaml loaded by the real config loader."""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
import yaml

from edge import config
from edge.systemd import Notifier, Watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "systemd", "edge.service")
DEFAULT_CONFIG = os.path.join(ROOT, "systemd", "edge.yaml")
ANALYZE = shutil.which("systemd-analyze")


class Listener:
    """The service manager's end: a datagram socket that NOTIFY_SOCKET names."""

    def __init__(self, address, env_value):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.env_value = env_value

    def receive(self, timeout=2.0):
        """The assignments of the next datagram, as a list of lines."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode("utf-8").split("\n")

    def nothing_waiting(self):
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        return False

    def close(self):
        self.sock.close()


@pytest.fixture
def listener():
    # sun_path holds 107 bytes: a short folder of its own rather than pytest's tmp_path.
    folder = tempfile.mkdtemp(prefix="edge-notify-")
    path = os.path.join(folder, "notify")
    sock = Listener(path, path)
    yield sock
    sock.close()
    shutil.rmtree(folder)


@pytest.fixture
def abstract_listener():
    name = "edge-test-{}".format(uuid.uuid4().hex)
    sock = Listener("\0" + name, "@" + name)
    yield sock
    sock.close()


def notifier_for(listener, **env):
    environ = {"NOTIFY_SOCKET": listener.env_value}
    environ.update({k: str(v) for k, v in env.items()})
    return Notifier.from_environ(environ)


# --- the notify protocol ---------------------------------------------------------------

def test_messages_reach_the_socket(listener):
    notifier = notifier_for(listener, WATCHDOG_USEC=30000000, WATCHDOG_PID=os.getpid())
    assert notifier.enabled
    assert notifier.ready("running yolox-nano on csi://0")
    assert listener.receive() == ["READY=1", "STATUS=running yolox-nano on csi://0"]
    assert notifier.status("12.5 fps, 0 dropped")
    assert listener.receive() == ["STATUS=12.5 fps, 0 dropped"]
    assert notifier.watchdog()
    assert listener.receive() == ["WATCHDOG=1"]
    assert notifier.extend_timeout(60)
    assert listener.receive() == ["EXTEND_TIMEOUT_USEC=60000000"]
    assert notifier.stopping("stopping: finishing frames in flight")
    assert listener.receive() == ["STOPPING=1", "STATUS=stopping: finishing frames in flight"]
    assert notifier.ready()
    assert listener.receive() == ["READY=1"]


def test_status_stays_one_line(listener):
    notifier = notifier_for(listener)
    notifier.status("engine yolox-nano:\nbuilding")
    assert listener.receive() == ["STATUS=engine yolox-nano: building"]


def test_reloading_carries_the_monotonic_clock(listener):
    notifier = notifier_for(listener)
    before = time.clock_gettime(time.CLOCK_MONOTONIC)
    assert notifier.reloading()
    after = time.clock_gettime(time.CLOCK_MONOTONIC)
    lines = listener.receive()
    assert lines[0] == "RELOADING=1"
    name, value = lines[1].split("=")
    assert name == "MONOTONIC_USEC"
    assert before * 1e6 - 1 <= int(value) <= after * 1e6 + 1


def test_abstract_socket(abstract_listener):
    notifier = notifier_for(abstract_listener)
    assert notifier.address.startswith("@")
    assert notifier.ready("up")
    assert abstract_listener.receive() == ["READY=1", "STATUS=up"]


def test_no_socket_is_a_no_op():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    for send in (notifier.ready, notifier.watchdog, notifier.stopping, notifier.reloading):
        assert send() is False
    assert notifier.status("x") is False
    assert notifier.extend_timeout(10) is False


def test_sending_never_raises(tmp_path):
    # A socket path nobody listens on: the message is dropped (and logged at debug level).
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone"),
                                      "WATCHDOG_USEC": "30000000"})
    assert notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    notifier.close()
    assert notifier.ready("x") is False


def test_unsupported_address_disables():
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_sending_never_blocks(listener):
    # Nobody reads: once the socket's queue is full, sends fail at once instead of waiting.
    notifier = notifier_for(listener)
    start = time.monotonic()
    results = [notifier.status("x" * 1000) for _ in range(2000)]
    assert time.monotonic() - start < 5
    assert results[0] is True
    assert False in results


def test_watchdog_interval_is_half_of_watchdog_usec(listener):
    notifier = notifier_for(listener, WATCHDOG_USEC=30000000)     # WATCHDOG_PID unset: ours
    assert notifier.watchdog_interval == 15.0
    assert notifier_for(listener).watchdog_interval is None
    assert notifier_for(listener, WATCHDOG_USEC="0").watchdog_interval is None
    assert notifier_for(listener, WATCHDOG_USEC="junk").watchdog_interval is None


def test_watchdog_pid_of_another_process_disables_the_watchdog(listener):
    notifier = notifier_for(listener, WATCHDOG_USEC=30000000, WATCHDOG_PID=os.getpid() + 1)
    assert notifier.watchdog_interval is None
    assert notifier.watchdog() is False
    assert listener.nothing_waiting()
    assert notifier.ready()                       # the other messages still go out
    assert listener.receive() == ["READY=1"]


def test_unset_environment_keeps_children_out():
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000",
               "WATCHDOG_PID": str(os.getpid()), "PATH": "/usr/bin"}
    notifier = Notifier.from_environ(environ, unset_environment=True)
    assert notifier.address == "/run/systemd/notify"
    assert notifier.watchdog_interval == 15.0
    assert environ == {"PATH": "/usr/bin"}


# --- the watchdog follows progress -----------------------------------------------------

class Counter:
    def __init__(self):
        self.value = 0

    def __call__(self):
        return self.value


def pings(listener):
    count = 0
    while not listener.nothing_waiting():
        count += 1
    return count


def test_watchdog_pings_only_while_progress_advances(listener):
    notifier = notifier_for(listener, WATCHDOG_USEC=30000000)
    frames = Counter()
    watchdog = Watchdog(notifier, frames)
    assert watchdog.interval == 15.0

    assert not watchdog.tick(now=100.0)          # no frame yet
    frames.value = 3
    assert watchdog.tick(now=100.5)              # progress: ping
    assert listener.receive() == ["WATCHDOG=1"]
    frames.value = 30
    assert not watchdog.tick(now=101.0)          # progress, but within the interval
    assert not watchdog.tick(now=115.0)
    assert watchdog.tick(now=115.5)              # 15 s after the last ping
    assert listener.receive() == ["WATCHDOG=1"]

    # The pipeline stalls: no more pings however often tick() runs, and systemd's
    # WatchdogSec=30 runs out.
    for step in range(400):
        assert not watchdog.tick(now=116.0 + step * 0.1)
    assert pings(listener) == 0

    frames.value = 31                            # frames again: pings resume at once
    assert watchdog.tick(now=160.0)
    assert watchdog.pings == 3
    assert pings(listener) == 1


def test_watchdog_without_watchdog_does_nothing(listener):
    frames = Counter()
    watchdog = Watchdog(notifier_for(listener), frames)
    frames.value = 10
    assert not watchdog.tick(now=1.0)
    assert listener.nothing_waiting()


def test_build_extends_the_start_while_it_progresses(listener):
    notifier = notifier_for(listener, WATCHDOG_USEC=30000000)
    frames = Counter()
    build = Counter()
    watchdog = Watchdog(notifier, frames)
    watchdog.follow(build)

    # The first extension is unconditional: the build just started.
    assert watchdog.extend_while_building(60, now=10.0)
    assert listener.receive() == ["EXTEND_TIMEOUT_USEC=60000000"]
    build.value = 1
    assert not watchdog.extend_while_building(60, now=20.0)     # within seconds / 2
    assert watchdog.extend_while_building(60, now=40.0)
    assert listener.receive() == ["EXTEND_TIMEOUT_USEC=60000000"]
    # The watchdog is fed by the build's progress, not by frames.
    assert watchdog.tick(now=40.0)
    assert listener.receive() == ["WATCHDOG=1"]

    # A stuck build: no extension, no ping; systemd ends it 60 s after the last extension.
    assert not watchdog.extend_while_building(60, now=70.0)
    assert not watchdog.tick(now=70.0)
    assert listener.nothing_waiting()

    build.value = 2
    assert watchdog.extend_while_building(60, now=75.0)
    assert listener.receive() == ["EXTEND_TIMEOUT_USEC=60000000"]

    # Back to frames: pings need frame progress again.
    watchdog.follow(frames)
    build.value = 50
    assert not watchdog.tick(now=100.0)
    frames.value = 1
    assert watchdog.tick(now=100.0)
    assert listener.receive() == ["WATCHDOG=1"]


# --- the unit file ---------------------------------------------------------------------

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def unit_with_stub_binary(folder):
    """The unit with ExecStart= pointing at a stub: verify checks that the binary exists."""
    stub = os.path.join(folder, "edge")
    with open(stub, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(stub, 0o755)
    with open(UNIT) as f:
        text = f.read()
    assert "ExecStart=/usr/local/bin/edge run -c /etc/edge/edge.yaml\n" in text
    path = os.path.join(folder, "edge.service")
    with open(path, "w") as f:
        f.write(text.replace("ExecStart=/usr/local/bin/edge ", "ExecStart={} ".format(stub)))
    return path


@needs_analyze
def test_unit_verifies_cleanly(tmp_path):
    unit = unit_with_stub_binary(str(tmp_path))
    result = subprocess.run([ANALYZE, "verify", unit], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert "edge.service" not in result.stdout, result.stdout


def exposure(unit):
    result = subprocess.run([ANALYZE, "security", "--offline=yes", unit],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60)
    match = re.search(r"Overall exposure level for edge\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1)), result.stdout


@needs_analyze
def test_unit_exposure_is_at_most_3():
    level, report = exposure(UNIT)
    assert level <= 3.0, report
    # Settings the design depends on, read back through systemd's own assessment.
    for line in ("✓ NoNewPrivileges=", "✓ ProtectSystem=", "✓ User=/DynamicUser=",
                 "✓ NotifyAccess=", "✓ ProtectHome="):
        assert line in report, line


@needs_analyze
def test_syscall_allow_list_drop_in_keeps_exposure(tmp_path):
    # install-jetson writes this drop-in where systemd >= 239 knows @system-service.
    shutil.copy(UNIT, str(tmp_path / "edge.service"))
    (tmp_path / "edge.service.d").mkdir()
    (tmp_path / "edge.service.d" / "10-syscall-allow-list.conf").write_text(
        "[Service]\nSystemCallFilter=\nSystemCallFilter=@system-service\n"
        "SystemCallFilter=~@privileged\n")
    level, report = exposure(str(tmp_path / "edge.service"))
    assert level <= 3.0, report
    assert "System call allow list defined" in report


def unit_settings():
    settings = {}
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def test_unit_settings_the_daemon_relies_on():
    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["RestartPreventExitStatus"] == ["78"]
    assert settings["WatchdogSec"] == ["30"]
    assert "EDGE_MODEL_DIR=/var/cache/edge/models" in settings["Environment"]
    assert settings["StateDirectory"] == ["edge"]
    # PrivateDevices= would hide the GPU; MemoryDenyWriteExecute= breaks CUDA's JIT.
    assert "PrivateDevices" not in settings
    assert "MemoryDenyWriteExecute" not in settings
    # A group that may not exist fails the start: only video is listed.
    assert settings["SupplementaryGroups"] == ["video"]


# --- the default configuration ---------------------------------------------------------

def spec_keys(spec, prefix=""):
    for key, field in spec.items():
        if isinstance(field, dict):
            yield from spec_keys(field, prefix + key + ".")
        else:
            yield prefix + key, field


def test_default_config_loads_with_the_real_loader():
    loaded = config.load(DEFAULT_CONFIG)
    assert loaded["detector"] == "yolox-nano"
    assert loaded["source"] == "csi://0"
    assert loaded["mqtt"]["url"] == "mqtt://localhost:1883"
    assert loaded["matcher"] is None


def test_default_config_lists_every_key_with_its_default():
    with open(DEFAULT_CONFIG) as f:
        raw = yaml.safe_load(f)
    changed = {"source": "csi://0", "detector": "yolox-nano", "mqtt.url": "mqtt://localhost:1883"}
    for dotted, field in spec_keys(config.SPEC):
        node = raw
        for key in dotted.split("."):
            assert isinstance(node, dict) and key in node, \
                "systemd/edge.yaml lacks {}: add it with its default and a comment".format(dotted)
            node = node[key]
        assert node == changed.get(dotted, field.default), dotted
    # ... and nothing else: every key of the file is one the loader knows.
    known = {dotted for dotted, _ in spec_keys(config.SPEC)}

    def file_keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from file_keys(value, prefix + key + ".")
            else:
                yield prefix + key

    assert set(file_keys(raw)) <= known


def test_default_config_comments_every_key():
    with open(DEFAULT_CONFIG) as f:
        for number, line in enumerate(f, 1):
            if re.match(r"^\s*[a-z_]+:\s*\S", line):
                assert "#" in line, "systemd/edge.yaml:{}: no comment: {}".format(number, line)


def test_device_allow_opens_the_gpu_of_every_l4t_release_and_no_more():
    """DevicePolicy=closed with DeviceAllow= by char group (systemd matches each group name in
    /proc/devices with fnmatch) and by path. The groups are what the L4T kernel sources
    register (docs/systemd.md, "Device access"): nvgpu names its group after the GPU's
    platform device; host1x's is "nvhost" on R32."""
    import fnmatch
    settings = unit_settings()
    assert settings["DevicePolicy"] == ["closed"]
    allowed = [value.split()[0] for value in settings["DeviceAllow"]]
    groups = [a[len("char-"):] for a in allowed if a.startswith("char-")]
    paths = [a for a in allowed if a.startswith("/dev/")]

    def opens(group):
        return any(fnmatch.fnmatchcase(group, pattern) for pattern in groups)
    # The GPU's platform device on the Nano/TX1, TX2, Xavier, Orin (R35), Orin (R36).
    for gpu in ("57000000.gpu", "17000000.gp10b", "17000000.gv11b", "17000000.ga10b",
                "17000000.gpu"):
        assert opens(gpu), gpu
    assert opens("nvhost") and opens("nvhost-ctrl")
    assert "/dev/nvmap" in paths and "/dev/nvhost-ctrl" in paths
    assert opens("video4linux") and opens("drm") and opens("nvidia-uvm")
    # Hardening: nothing that opens every device of a kind the daemon does not use.
    for other in ("misc", "mem", "input", "tty", "kvm", "i2c", "spidev", "hidraw"):
        assert not opens(other), other
