"""edge.system: the health report's `system` section and the versions facts.

The psutil path runs on this machine. The Jetson paths run against fake `/` trees
(tests/data/sysfs) and jtop recordings (tests/data/jtop): hand-built from the documented
layouts and jetson-stats' own source, since there is no Jetson here.
"""

import json
import logging
import os
import sys
import threading
import time
import types

import pytest

from conftest import ROOT
from edge import __version__, system

DATA = os.path.join(ROOT, "tests", "data")
NANO = os.path.join(DATA, "sysfs", "nano-jp46")
ORIN = os.path.join(DATA, "sysfs", "orin-jp6")

NANO_SYSFS = {
    "source": "sysfs", "cpu_percent": None,
    "memory": {"total_mb": 3964.3, "available_mb": 2290.7, "used_percent": 42.2},
    "swap": {"total_mb": 1982.1, "used_mb": 41.4},
    "gpu": {"load_percent": 42.3},
    # PMIC-Die (a fixed 100 C placeholder) is left out
    "temperatures": {"ao": 36.5, "cpu": 38.0, "gpu": 35.5, "pll": 34.0, "thermal-fan-est": 36.7},
    "power": {"total_mw": 2960, "rails": {"POM_5V_IN": 2960, "POM_5V_GPU": 79, "POM_5V_CPU": 514}},
    "fan": {"percent": 30.2, "rpm": 1421},
    "throttled": None, "nvpmodel": "MAXN", "jetson_clocks": None}

ORIN_SYSFS = {
    "source": "sysfs", "cpu_percent": None,
    "memory": {"total_mb": 7441.6, "available_mb": 5399.2, "used_percent": 27.4},
    "swap": {"total_mb": 3720.8, "used_mb": 0.0},
    "gpu": {"load_percent": 18.7},
    # cv0..cv2 read -256 C on an Orin Nano (no DLA/PVA): offline, left out
    "temperatures": {"cpu": 47.5, "gpu": 46.0, "soc0": 45.3, "soc1": 46.2, "soc2": 44.8,
                     "tj": 47.5},
    # mV * mA / 1000, rounded: 5072 * 1036 / 1000 = 5254.6
    "power": {"total_mw": 5255, "rails": {"VDD_IN": 5255, "VDD_CPU_GPU_CV": 1004, "VDD_SOC": 1390}},
    "fan": {"percent": 40.0, "rpm": 1923},
    "throttled": None, "nvpmodel": "15W", "jetson_clocks": None}

NANO_JTOP = {
    "source": "jtop", "cpu_percent": [16.5, 11.3, 12.2, 12.0],
    # jtop's RAM "used" leaves out buffers and cache, and it has no MemAvailable
    "memory": {"total_mb": 3964.3, "available_mb": None, "used_percent": 37.5},
    "swap": {"total_mb": 1982.1, "used_mb": 41.4},
    "gpu": {"load_percent": 42.3},
    "temperatures": {"ao": 36.5, "cpu": 38.0, "gpu": 35.5, "pll": 34.0, "thermal": 36.7},
    "power": {"total_mw": 2960, "rails": {"POM_5V_CPU": 514, "POM_5V_GPU": 79, "POM_5V_IN": 2960}},
    "fan": {"percent": 30.2, "rpm": 1421},
    "throttled": None, "nvpmodel": "MAXN", "jetson_clocks": False}

ORIN_JTOP = {
    "source": "jtop", "cpu_percent": [10.0, 5.5, 6.0, 5.6, 5.7, 7.4],
    "memory": {"total_mb": 7441.6, "available_mb": None, "used_percent": 23.6},
    "swap": {"total_mb": 3720.8, "used_mb": 0.0},
    "gpu": {"load_percent": 18.7},
    "temperatures": {"cpu": 47.5, "gpu": 46.0, "soc0": 45.3, "soc1": 46.2, "soc2": 44.8,
                     "tj": 47.5},
    # jtop truncates mV * mA / 1000 to int
    "power": {"total_mw": 5254, "rails": {"VDD_CPU_GPU_CV": 1004, "VDD_SOC": 1389, "VDD_IN": 5254}},
    "fan": {"percent": 40.0, "rpm": 1923},
    "throttled": None, "nvpmodel": "15W", "jetson_clocks": False}


class NVPModel(object):
    """jtop.core.nvpmodel.NVPModel as read: `.name`, `.id`, repr is the name."""

    def __init__(self, name, id):
        self.name, self.id = name, id

    def __repr__(self):
        return self.name


class JetsonClocks(object):
    """jtop.core.jetson_clocks.JetsonClocks as read: bool() is "running"."""

    def __init__(self, enabled):
        self._enabled = enabled

    def __bool__(self):
        return self._enabled


class RecordedJtop(object):
    """A started jtop client replayed from a recording: the attributes edge.system reads."""

    def __init__(self, name, running=True, error=None):
        with open(os.path.join(DATA, "jtop", name)) as f:
            data = json.load(f)
        for attribute in ("cpu", "memory", "gpu", "power", "temperature", "fan"):
            setattr(self, attribute, data[attribute])
        self.nvpmodel = NVPModel(**data["nvpmodel"]) if data["nvpmodel"] else None
        self.jetson_clocks = None if data["jetson_clocks"] is None \
            else JetsonClocks(data["jetson_clocks"])
        self.running, self.error, self.closed = running, error, False

    def ok(self, spin=False):
        if self.error:
            raise self.error
        return self.running

    def close(self):
        self.closed = True


def write(root, relative, text):
    path = os.path.join(str(root), relative)
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(text)


# -- psutil: this machine ------------------------------------------------------------------

@pytest.mark.skipif(system.is_jetson("/"), reason="this machine is a Jetson")
def test_psutil_path_on_this_machine():
    sampler = system.CpuSampler()
    first = system.system_status(cpu_sampler=sampler)
    time.sleep(0.2)
    status = system.system_status(cpu_sampler=sampler)
    assert status["source"] == "psutil"
    assert first["cpu_percent"] == [None] * os.cpu_count()
    assert len(status["cpu_percent"]) == os.cpu_count()
    assert all(0.0 <= p <= 100.0 for p in status["cpu_percent"] if p is not None)
    memory = status["memory"]
    assert memory["total_mb"] > 0
    assert 0 < memory["available_mb"] <= memory["total_mb"]
    assert 0.0 <= memory["used_percent"] <= 100.0
    assert status["swap"]["total_mb"] >= status["swap"]["used_mb"] >= 0
    assert status["gpu"] == {"load_percent": None}
    assert status["power"] == {"total_mw": None, "rails": {}}
    assert status["fan"] == {"percent": None, "rpm": None}
    assert status["throttled"] is None and status["nvpmodel"] is None
    assert all(-50 < c < 150 for c in status["temperatures"].values())
    json.dumps(status)                      # goes into an MQTT payload as it is


@pytest.mark.skipif(system.is_jetson("/"), reason="this machine is a Jetson")
def test_versions_on_this_machine():
    facts = system.versions({"name": "ort"})
    assert facts["edge"] == __version__
    assert facts["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert facts["backend"] == {"name": "ort"}
    assert facts["jetpack"] is None and facts["l4t"] is None and facts["board"] is None
    assert facts["os"]


# -- sysfs: recorded Jetson trees ----------------------------------------------------------

@pytest.mark.parametrize("root, expected", [(NANO, NANO_SYSFS), (ORIN, ORIN_SYSFS)],
                         ids=["nano-jp46", "orin-jp6"])
def test_sysfs_path_on_recorded_jetsons(root, expected):
    assert system.is_jetson(root)
    assert system.system_status(root=root) == expected


@pytest.mark.parametrize("root, expected", [
    (NANO, {"cuda": "10.2.300", "jetpack": "4.6.1", "l4t": "32.7.1",
            "board": "NVIDIA Jetson Nano Developer Kit", "os": "Ubuntu 18.04.6 LTS"}),
    (ORIN, {"cuda": "12.2.140", "jetpack": "6.0", "l4t": "36.3.0",
            "board": "NVIDIA Jetson Orin Nano Developer Kit", "os": "Ubuntu 22.04.4 LTS"}),
], ids=["nano-jp46", "orin-jp6"])
def test_versions_on_recorded_jetsons(root, expected):
    facts = system.versions({"name": "trt"}, root=root)
    assert facts.pop("edge") == __version__ and facts.pop("python")
    assert facts.pop("backend") == {"name": "trt"}
    assert facts == expected


@pytest.mark.parametrize("l4t, jetpack", [
    ("32.6.1", "4.6"), ("32.7.1", "4.6.1"), ("32.7.2", "4.6.2"), ("32.7.6", "4.6.6"),
    ("35.4.1", "5.1.2"), ("35.6.1", "5.1.5"), ("36.3.0", "6.0"), ("36.4.3", "6.2"),
    ("36.4.4", "6.2.1"),
    ("32.7.9", None), ("32.5.0", None), ("39.0.0", None), (None, None)])
def test_jetpack_only_for_known_l4t_releases(l4t, jetpack):
    assert system.jetpack_for(l4t) == jetpack


def test_cpu_sampler_percent_between_calls(tmp_path):
    stat = ("cpu  0 0 0 0 0 0 0 0 0 0\n"
            "cpu0 100 0 50 800 50 0 0 0 0 0\n"
            "cpu1 100 0 50 800 50 0 0 0 0 0\n"
            "cpu2 100 0 50 800 50 0 0 0 0 0\n"
            "cpu3 100 0 50 800 50 0 0 0 0 0\n")
    write(tmp_path, "sys/devices/system/cpu/present", "0-3\n")
    write(tmp_path, "proc/stat", stat)
    sampler = system.CpuSampler(root=str(tmp_path))
    assert sampler.sample() == [None, None, None, None]
    # +200 ticks each: cpu0 busy 60 (user 50, system 10), cpu1 busy 0, cpu2 busy 200;
    # cpu3 went offline (nvpmodel parks cores), so it is missing from /proc/stat.
    write(tmp_path, "proc/stat",
          "cpu  0 0 0 0 0 0 0 0 0 0\n"
          "cpu0 150 0 60 930 60 0 0 0 0 0\n"
          "cpu1 100 0 50 1000 50 0 0 0 0 0\n"
          "cpu2 250 0 100 800 50 0 0 0 0 0\n")
    assert sampler.sample() == [30.0, 0.0, 100.0, None]


def test_cpu_sampler_on_recorded_tree():
    assert system.CpuSampler(root=NANO).sample() == [None] * 4
    assert system.CpuSampler(root=ORIN).sample() == [None] * 6


# -- jtop: recordings of jetson-stats 4.x (Nano, JP4.6) and 7.x (Orin, JP6) ----------------

@pytest.mark.parametrize("recording, expected", [("nano-jp46.json", NANO_JTOP),
                                                 ("orin-jp6.json", ORIN_JTOP)])
def test_jtop_adapter_on_recordings(recording, expected):
    assert system.from_jtop(RecordedJtop(recording)) == expected


def test_system_status_prefers_a_running_jtop_client():
    status = system.system_status(jtop_client=RecordedJtop("nano-jp46.json"), root=NANO,
                                  cpu_sampler=system.CpuSampler(root=NANO))
    expected = dict(NANO_JTOP, memory=dict(NANO_JTOP["memory"], available_mb=2290.7))
    assert status == expected          # MemAvailable from /proc/meminfo, jtop's own CPU


@pytest.mark.parametrize("client", [RecordedJtop("orin-jp6.json", running=False),
                                    RecordedJtop("orin-jp6.json",
                                                 error=EOFError("lost jtop.service"))],
                         ids=["closed", "service-lost"])
def test_stopped_jtop_client_falls_back_to_sysfs(client):
    assert system.system_status(jtop_client=client, root=ORIN) == ORIN_SYSFS


def test_jtop_adapter_with_missing_sections():
    class Partial(object):
        cpu = {"cpu": [{"online": True, "idle": 75.0}, {"online": False}]}
        memory = {"RAM": {"tot": 0, "used": 0}}       # no SWAP, zero total
        power = {}                                    # a board without power monitors
        fan = {}
        nvpmodel = None
        jetson_clocks = None
    status = system.from_jtop(Partial())
    assert status == dict(system.empty_status("jtop"), cpu_percent=[25.0, None],
                          memory={"total_mb": 0.0, "available_mb": None, "used_percent": None})


def test_jtop_sum_of_rails_is_not_a_total():
    # AGX boards have no input rail: jtop then reports the SUM of the rails as "tot".
    power = {"rail": {"VDD_GPU_SOC": {"power": 3200, "online": True},
                      "VDD_CPU_CV": {"power": 900, "online": True}},
             "tot": {"power": 4100, "avg": 4000}}
    client = RecordedJtop("orin-jp6.json")
    client.power = power
    assert system.from_jtop(client)["power"] == {
        "total_mw": None, "rails": {"VDD_GPU_SOC": 3200, "VDD_CPU_CV": 900}}


# -- open_jtop / close_jtop ---------------------------------------------------------------

def fake_jetson_stats(monkeypatch, tmp_path, start):
    """A jtop module whose client's start() is `start`, and a socket file for it."""
    class Client(object):
        def __init__(self, interval=1.0):
            self.closed = False

        def start(self):
            start()

        def close(self):
            self.closed = True
    module = types.ModuleType("jtop")
    module.jtop = Client
    monkeypatch.setitem(sys.modules, "jtop", module)
    socket = tmp_path / "jtop.sock"
    socket.write_text("")
    monkeypatch.setattr(system, "JTOP_SOCKET", str(socket))


def test_open_jtop_without_jetson_stats(monkeypatch, caplog):
    """On a Jetson a missing jetson-stats is worth a line: it says what is lost."""
    monkeypatch.setitem(sys.modules, "jtop", None)        # import fails
    with caplog.at_level(logging.INFO, logger="edge.system"):
        assert system.open_jtop(root=NANO) is None
    said = [r for r in caplog.records if "jetson-stats not available" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "install-jetson" in said[0].getMessage()


def test_open_jtop_off_a_jetson_says_nothing_worth_reading(monkeypatch, caplog, tmp_path):
    """A PC cannot have jtop: one debug line, jtop not even imported (issue 24, item 9)."""
    monkeypatch.setitem(sys.modules, "jtop", None)        # an import would fail loudly
    with caplog.at_level(logging.DEBUG, logger="edge.system"):
        assert system.open_jtop(root=str(tmp_path)) is None
    lines = [r for r in caplog.records if r.name == "edge.system"]
    assert [r.levelno for r in lines] == [logging.DEBUG], [r.getMessage() for r in lines]
    assert "not a Jetson" in lines[0].getMessage()
    # jetson-stats installed on a PC changes nothing: its service cannot run there
    fake_jetson_stats(monkeypatch, tmp_path, start=lambda: None)
    assert system.open_jtop(root=str(tmp_path)) is None


def test_open_jtop_without_its_service(monkeypatch, tmp_path):
    fake_jetson_stats(monkeypatch, tmp_path, start=lambda: None)
    monkeypatch.setattr(system, "JTOP_SOCKET", str(tmp_path / "missing.sock"))
    assert system.open_jtop(root=NANO) is None


def test_open_jtop_when_the_service_refuses(monkeypatch, tmp_path):
    def refuse():
        raise RuntimeError("The jtop.service is not active")
    fake_jetson_stats(monkeypatch, tmp_path, start=refuse)
    assert system.open_jtop(root=NANO) is None


def test_open_jtop_when_the_service_hangs(monkeypatch, tmp_path):
    release = threading.Event()
    fake_jetson_stats(monkeypatch, tmp_path, start=lambda: release.wait(5))
    began = time.time()
    assert system.open_jtop(timeout=0.2, root=NANO) is None
    assert time.time() - began < 2
    release.set()


def test_open_and_close_jtop(monkeypatch, tmp_path):
    fake_jetson_stats(monkeypatch, tmp_path, start=lambda: None)
    client = system.open_jtop(root=NANO)
    assert client is not None
    system.close_jtop(client)
    assert client.closed
    system.close_jtop(None)


# -- missing and malformed files: None, never an exception ---------------------------------

def test_empty_root_is_not_a_jetson(tmp_path):
    root = str(tmp_path)
    assert not system.is_jetson(root)
    status = system.system_status(root=root, cpu_sampler=system.CpuSampler(root=root))
    assert status["source"] == "psutil"
    assert status["cpu_percent"] is None and status["temperatures"] == {}
    facts = system.versions({}, root=root)
    assert [facts[k] for k in ("cuda", "jetpack", "l4t", "board", "os")] == [None] * 5


def test_jetson_with_nothing_readable(tmp_path):
    write(tmp_path, "proc/device-tree/model", "NVIDIA Jetson Xavier NX Developer Kit\x00")
    assert system.system_status(root=str(tmp_path)) == system.empty_status("sysfs")
    facts = system.versions({}, root=str(tmp_path))
    assert facts["board"] == "NVIDIA Jetson Xavier NX Developer Kit"
    assert facts["l4t"] is None and facts["jetpack"] is None


def test_malformed_files_read_as_unknown(tmp_path):
    garbage = {
        "etc/nv_tegra_release": "# R36 (release)\n",
        "usr/local/cuda/version.json": "{not json",
        "usr/local/cuda/version.txt": "CUDA\n",
        "etc/os-release": "NAME=Linux\n",
        "proc/meminfo": "MemTotal: lots kB\n",
        "proc/stat": "cpu0 a b c\n",
        "sys/devices/gpu.0/load": "\n",
        "sys/class/thermal/thermal_zone0/type": "CPU-therm\n",
        "sys/class/thermal/thermal_zone0/temp": "n/a\n",
        "sys/class/thermal/thermal_zone1/type": "GPU-therm\n",
        "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/in1_label": "VDD_IN\n",
        "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/in1_input": "5072\n",
        "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/in2_label": "NC\n",
        "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/in2_input": "0\n",
        "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/curr2_input": "0\n",
        "sys/devices/pwm-fan/target_pwm": "fast\n",
        "var/lib/nvpmodel/status": "pmode:0003\n",
        "etc/nvpmodel.conf": "< POWER_MODEL ID=0 NAME=MAXN >\n",
    }
    for relative, text in garbage.items():
        write(tmp_path, relative, text)
    root = str(tmp_path)
    assert system.system_status(root=root) == system.empty_status("sysfs")
    assert system.CpuSampler(root=root).sample() is None
    facts = system.versions({}, root=root)
    assert [facts[k] for k in ("cuda", "jetpack", "l4t", "os")] == [None] * 4
