"""The `system` section of the health report, and the versions facts.

One adapter per source of data, tried in this order:
1. jtop (jetson-stats, optional extra, AGPL-3.0), when the caller passes an open client;
2. on a Jetson, /sys and /proc read directly (`from_sysfs`);
3. elsewhere, psutil for memory and swap plus /sys/class/thermal (`from_psutil`).
Every value is None when it is not known: nothing here estimates or fills in a figure.
Maps of sensors (`temperatures`, `power.rails`) are empty when there are none.
Every file path is taken relative to `root`, so tests run against recorded trees.

Units: MB are MiB (2**20 bytes; /proc/meminfo's "kB" are KiB), temperatures in degrees C,
power in mW, loads and duty cycles in percent.
"""

import glob
import json
import logging
import os
import platform
import re
import threading

from edge import __version__

logger = logging.getLogger(__name__)

JETSON_MODEL_MARK = "NVIDIA Jetson"

# GPU load in per-mille (0..1000). JetPack 4 (Nano, Xavier): gpu.0 under /sys/devices;
# JetPack 5/6 (Orin): under /sys/devices/platform. Else the devfreq device of the iGPU.
GPU_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
# of_node names of Jetson iGPUs, as jetson-stats matches them (jtop/core/gpu.py).
GPU_NODE_NAMES = ("gpu", "gp10b", "gv11b", "ga10b")

# INA3221 channel that measures the whole module input. Boards without one (AGX Xavier,
# AGX Orin) get total_mw None: a sum of the other rails is not the board's power.
INPUT_RAILS = ("POM_5V_IN", "VDD_IN")
INA3221_CHANNELS = (1, 2, 3)     # the chip has three; in7 is "sum of shunt voltages"

FAN_PWM_MAX = 255                # pwm-fan duty cycle register range 0..255
TEMP_OFFLINE_MILLI = -256000     # what an absent sensor reads (Orin Nano cv*-thermal)

# L4T release -> JetPack. Only releases checked against a source; anything else is None.
# NVIDIA L4T release pages (developer.nvidia.com/embedded/linux-tegra-r3271, -r3272):
# "L4T 32.7.1 is included as part of JetPack 4.6.1", "L4T 32.7.2 ... JetPack 4.6.2".
# Careful: R32.7.x is NOT JetPack 4.7, and some tables online list 4.6.2 on R32.7.1.
# The rest: jetson-stats 7.2.2 jtop/core/jetson_variables.py NVIDIA_JETPACK, which agrees
# with NVIDIA's JetPack archive (developer.nvidia.com/embedded/jetpack-archive).
JETPACK_BY_L4T = {
    "32.6.1": "4.6",
    "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3",
    "32.7.4": "4.6.4", "32.7.5": "4.6.5", "32.7.6": "4.6.6",
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2",
    "35.5.0": "5.1.3", "35.6.0": "5.1.4", "35.6.1": "5.1.5",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
}

L4T_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)")
NVPMODEL_STATUS_RE = re.compile(r"pmode:(\d+)")
NVPMODEL_MODE_RE = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+?)\s*>")


# -- small readers: None on any missing or malformed file, never an exception ------------

def _path(root, relative):
    return os.path.join(root, relative.lstrip("/"))


def _read(path):
    """A file's text without surrounding whitespace or NULs, or None."""
    try:
        with open(path, "r") as f:
            return f.read().strip().strip("\x00").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path):
    """The first integer in a file ("1421", "32760 ma"), or None."""
    text = _read(path)
    try:
        return int(text.split()[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _numbered(pattern):
    """Paths matching a glob, in the order of their trailing number (hwmon2 before hwmon10)."""
    def key(path):
        digits = re.search(r"(\d+)$", path)
        return (int(digits.group(1)) if digits else -1, path)
    return sorted(glob.glob(pattern), key=key)


def _mib(kib):
    return None if kib is None else round(kib / 1024.0, 1)


def _percent(part, whole):
    if part is None or not whole:
        return None
    return round(100.0 * part / whole, 1)


def empty_status(source):
    """The `system` dict with every value unknown."""
    return {"source": source,
            "cpu_percent": None,
            "memory": {"total_mb": None, "available_mb": None, "used_percent": None},
            "swap": {"total_mb": None, "used_mb": None},
            "gpu": {"load_percent": None},
            "temperatures": {},
            "power": {"total_mw": None, "rails": {}},
            "fan": {"percent": None, "rpm": None},
            # No source tells reliably whether clocks are being throttled now: tegrastats
            # and jtop do not report it, and the soctherm/over-current files are event
            # counters, not a state. None until such a source exists.
            "throttled": None,
            "nvpmodel": None,
            "jetson_clocks": None}


# -- the entry point -------------------------------------------------------------------

def system_status(jtop_client=None, root="/", cpu_sampler=None):
    """The health report's `system` section from the best source available."""
    if jtop_client is not None:
        status = _from_live_jtop(jtop_client, root)
        if status is not None:
            return status
    status = from_sysfs(root) if is_jetson(root) else from_psutil(root)
    if cpu_sampler is not None:
        status["cpu_percent"] = cpu_sampler.sample()
    return status


def is_jetson(root="/"):
    """True on an NVIDIA Jetson (an L4T release file, or the device-tree model says so)."""
    if os.path.isfile(_path(root, "etc/nv_tegra_release")):
        return True
    return JETSON_MODEL_MARK in (read_board(root) or "")


# -- CPU: per-core busy percent between two reads of /proc/stat ------------------------

class CpuSampler(object):
    """Per-core CPU busy percent since the previous call; the first call gives None values."""

    def __init__(self, root="/"):
        self.root = root
        self._last = None

    def sample(self):
        """[percent or None per core]; None for a core offline in either sample."""
        now = read_cpu_times(self.root)
        last, self._last = self._last, now
        if not now:                         # /proc/stat missing or without a cpuN line
            return None
        count = _cpu_count(self.root, now)
        if last is None:
            return [None] * count
        return [_busy_percent(last.get(core), now.get(core)) for core in range(count)]


def read_cpu_times(root="/"):
    """{core: (busy ticks, total ticks)} from /proc/stat, or None; offline cores are absent."""
    text = _read(_path(root, "proc/stat"))
    if text is None:
        return None
    times = {}
    for line in text.splitlines():
        match = re.match(r"cpu(\d+)\s+(.*)$", line)
        if not match:
            continue
        try:
            # user nice system idle iowait irq softirq steal; guest time is already in user.
            ticks = [int(v) for v in match.group(2).split()[:8]]
        except ValueError:
            continue
        idle = sum(ticks[3:5])          # idle + iowait: waiting on I/O is not CPU work
        times[int(match.group(1))] = (sum(ticks) - idle, sum(ticks))
    return times


def _busy_percent(before, after):
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100.0 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def _cpu_count(root, times):
    """Cores present (online or not, e.g. the two nvpmodel parks on a Nano in 5W mode)."""
    present = _read(_path(root, "sys/devices/system/cpu/present"))   # "0-3" or "0,2-5"
    if present:
        try:
            return max(int(part.split("-")[-1]) for part in present.split(",")) + 1
        except ValueError:
            pass
    return max(times) + 1 if times else 0


# -- adapter: /sys and /proc on a Jetson -------------------------------------------------

def from_sysfs(root="/"):
    """`system` read straight from a Jetson's /sys and /proc (no jtop service needed)."""
    status = empty_status("sysfs")
    status["memory"], status["swap"] = read_meminfo(root)
    status["gpu"]["load_percent"] = read_gpu_load(root)
    status["temperatures"] = read_temperatures(root)
    status["power"] = read_power(root)
    status["fan"] = read_fan(root)
    status["nvpmodel"] = read_nvpmodel(root)
    # jetson_clocks stays None: whether it is active is only known by comparing every
    # clock with its maximum (what jtop does), which no single file states.
    return status


def read_meminfo(root="/"):
    """(memory, swap) dicts from /proc/meminfo; used_percent as psutil counts it."""
    values = {}
    for line in (_read(_path(root, "proc/meminfo")) or "").splitlines():
        match = re.match(r"(\w+):\s+(\d+)", line)        # "MemTotal:  4059416 kB" (KiB)
        if match:
            values[match.group(1)] = int(match.group(2))
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    used = None if total is None or available is None else total - available
    memory = {"total_mb": _mib(total), "available_mb": _mib(available),
              "used_percent": _percent(used, total)}
    swap_total, swap_free = values.get("SwapTotal"), values.get("SwapFree")
    swap_used = None if swap_total is None or swap_free is None else swap_total - swap_free
    return memory, {"total_mb": _mib(swap_total), "used_mb": _mib(swap_used)}


# Per-process GPU memory on a Jetson: nvmap's table in debugfs, as jetson-stats 4.x and 7.x
# read it (jtop/core/processes.py, read_process_table: "user process PID size" rows, sizes
# like "42376K"). debugfs is root's alone (mode 0700): the jtop service runs as root and
# hands the same figures to members of the `jtop` group over its socket (jetson.processes,
# field 8, KiB), which is how a service running as another user can see them.
NVMAP_CLIENTS = "sys/kernel/debug/nvmap/iovmm/maps"
NVMAP_ROW_RE = re.compile(r"^\S+\s+\S+\s+(\d+)\s+(\d+)([KMG])\s*$")
_UNIT_KIB = {"K": 1, "M": 1024, "G": 1024 * 1024}


def process_gpu_memory(pid, jtop_client=None, root="/"):
    """Bytes of GPU (nvmap) memory process `pid` holds on a Jetson; 0 when it holds none,
    None where no figure can be read (not a Jetson, debugfs not readable and no jtop)."""
    text = _read(_path(root, NVMAP_CLIENTS))
    if text is not None:
        kib = 0
        for line in text.splitlines():
            match = NVMAP_ROW_RE.match(line.strip())
            if match and int(match.group(1)) == pid:
                kib += int(match.group(2)) * _UNIT_KIB[match.group(3)]
        return kib * 1024
    if jtop_client is not None:
        try:
            rows = jtop_client.processes
            return sum(int(row[8]) for row in rows if int(row[0]) == pid) * 1024
        except Exception as exc:             # a closed client, another shape: no figure
            logger.debug("jtop processes not usable: %r", exc)
    return None


def read_gpu_load(root="/"):
    """iGPU load in percent from its per-mille `load` file, or None."""
    for relative in GPU_LOAD_FILES:
        load = _read_int(_path(root, relative))
        if load is not None:
            return round(load / 10.0, 1)
    for device in sorted(glob.glob(_path(root, "sys/class/devfreq/*"))):
        if _read(os.path.join(device, "device", "of_node", "name")) in GPU_NODE_NAMES:
            load = _read_int(os.path.join(device, "device", "load"))
            if load is not None:
                return round(load / 10.0, 1)
    return None


def read_temperatures(root="/"):
    """{zone name: degrees C} from /sys/class/thermal (millidegrees in `temp`)."""
    temperatures = {}
    for zone in _numbered(_path(root, "sys/class/thermal/thermal_zone*")):
        kind = _read(os.path.join(zone, "type"))
        milli = _read_int(os.path.join(zone, "temp"))
        if not kind or milli is None or milli <= TEMP_OFFLINE_MILLI:
            continue
        if kind.startswith("PMIC"):
            # Nano/TX1 "PMIC-Die" reads a fixed 100 C placeholder, not a measurement;
            # jetson-stats drops it too (jtop/core/temperature.py).
            continue
        name = zone_name(kind)
        if name in temperatures:
            name = "{}.{}".format(name, re.search(r"(\d+)$", zone).group(1))
        temperatures[name] = round(milli / 1000.0, 1)
    return temperatures


def zone_name(kind):
    """A stable short name: "CPU-therm" (JP4) and "cpu-thermal" (JP5+) are both "cpu"."""
    name = kind.lower()
    for suffix in ("-thermal", "_thermal", "-therm"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def read_power(root="/"):
    """{"total_mw", "rails": {name: mW}} from the INA3221 monitors, JetPack 4 and 5/6 layouts."""
    rails = {}
    rails.update(_ina3221_iio(root))
    rails.update(_ina3221_hwmon(root))
    total = next((rails[name] for name in INPUT_RAILS if name in rails), None)
    return {"total_mw": total, "rails": rails}


def _ina3221_iio(root):
    """JetPack 4 (ina3221x IIO driver): rail_name_N and in_powerN_input, already in mW."""
    rails = {}
    pattern = "sys/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_*"
    for label in sorted(glob.glob(_path(root, pattern))):
        channel = label.rsplit("_", 1)[1]
        name = _read(label)
        milliwatts = _read_int(os.path.join(os.path.dirname(label),
                                            "in_power{}_input".format(channel)))
        if name and milliwatts is not None:
            rails[name] = milliwatts
    return rails


def _ina3221_hwmon(root):
    """JetPack 5/6 (ina3221 hwmon driver): inN_label, inN_input mV, currN_input mA."""
    rails = {}
    for device in sorted(glob.glob(_path(root, "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"))):
        for channel in INA3221_CHANNELS:
            name = _read(os.path.join(device, "in{}_label".format(channel)))
            millivolts = _read_int(os.path.join(device, "in{}_input".format(channel)))
            milliamps = _read_int(os.path.join(device, "curr{}_input".format(channel)))
            if not name or name == "NC" or millivolts is None or milliamps is None:
                continue        # "NC": channel not connected on this module (AGX Orin)
            rails[name] = int(round(millivolts * milliamps / 1000.0))
    return rails


def read_fan(root="/"):
    """{"percent": duty cycle, "rpm": tachometer} of the Jetson fan, None where absent."""
    # JetPack 4: Tegra pwm-fan driver; target_pwm is the commanded duty, the fan ramps to it.
    pwm = _read_int(_path(root, "sys/devices/pwm-fan/target_pwm"))
    rpm = _read_int(_path(root, "sys/devices/pwm-fan/rpm_measured"))
    # JetPack 5/6: hwmon "pwmfan" holds pwm1; a separate hwmon ("pwm_tach") holds rpm.
    for hwmon in _numbered(_path(root, "sys/class/hwmon/hwmon*")):
        if pwm is None and "fan" in (_read(os.path.join(hwmon, "name")) or ""):
            pwm = _read_int(os.path.join(hwmon, "pwm1"))
        if rpm is None:
            rpm = _read_int(os.path.join(hwmon, "rpm"))
        if rpm is None:
            rpm = _read_int(os.path.join(hwmon, "fan1_input"))
    return {"percent": _percent(pwm, FAN_PWM_MAX), "rpm": rpm}


def read_nvpmodel(root="/"):
    """Name of the active power mode: the id `nvpmodel -m` saved, named by /etc/nvpmodel.conf."""
    status = _read(_path(root, "var/lib/nvpmodel/status")) or ""      # "pmode:0000 fmode:quiet"
    match = NVPMODEL_STATUS_RE.search(status)
    if not match:
        return None
    mode = int(match.group(1))
    conf = _read(_path(root, "etc/nvpmodel.conf")) or ""       # "< POWER_MODEL ID=0 NAME=MAXN >"
    for mode_id, name in NVPMODEL_MODE_RE.findall(conf):
        if int(mode_id) == mode:
            return name
    return None


# -- adapter: psutil on any other Linux host --------------------------------------------

def from_psutil(root="/"):
    """`system` on a host that is not a Jetson: memory and swap from psutil, thermal zones.

    psutil reads the live machine's /proc whatever `root` is; only the thermal zones
    follow `root`. GPU, power and fan stay None: no portable source for them here.
    """
    status = empty_status("psutil")
    try:
        import psutil
        memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    except Exception as exc:      # psutil missing or /proc unreadable: leave them unknown
        logger.warning("psutil could not read memory (%s)", exc)
    else:
        status["memory"] = {"total_mb": round(memory.total / 2.0 ** 20, 1),
                            "available_mb": round(memory.available / 2.0 ** 20, 1),
                            "used_percent": round(memory.percent, 1)}
        status["swap"] = {"total_mb": round(swap.total / 2.0 ** 20, 1),
                          "used_mb": round(swap.used / 2.0 ** 20, 1)}
    status["temperatures"] = read_temperatures(root)
    return status


# -- adapter: jtop (jetson-stats) --------------------------------------------------------
#
# API checked against the sources of jetson-stats 4.2.12 and 4.3.2 (the 4.x line, the last
# for Python 3.6: python_requires >=2.7) and 7.2.2 (current, requires Python >= 3.7).
# The jtop properties used here have the same shapes in all three (jtop/jtop.py):
#   jetson.cpu          {"total": {...}, "cpu": [{"online", "user", "nice", "system",
#                        "idle" (percent; absent while the core is offline), "freq", ...}]}
#   jetson.memory       {"RAM": {"tot", "used", "free", "buffers", "cached", "shared" (KiB)},
#                        "SWAP": {"tot", "used", "cached" (KiB), "table"}, "EMC"?, "IRAM"?};
#                        RAM "used" = MemTotal - MemFree - Buffers - Cached; MemAvailable is
#                        read but not exposed (commented out in jtop/core/memory.py).
#   jetson.gpu          {name: {"type", "status": {"load" (percent), "railgate", ...},
#                        "freq": {...}}}; 7.x may fill it from NVML on JetPack 7 / Thor.
#   jetson.power        {"rail": {name: {"volt" mV, "curr" mA, "power" mW, "avg" mW,
#                        "online", ...}}, "tot": {"power", "avg", "name"?}}, or {} without
#                        sensors. "tot" is the input rail (POM_5V_IN, VDD_IN; 7.x also
#                        Thor's VIN) taken out of "rail" and named, else a SUM of the rails
#                        without "name".
#   jetson.temperature  {name: {"temp" (C, -256 when offline), "online", "max"?, "crit"?}}
#   jetson.fan          {name: {"speed": [percent], "rpm"?: [rpm], "profile", ...}}
#   jetson.nvpmodel     NVPModel (`.name`, `.id`) or None; jetson.jetson_clocks
#                        JetsonClocks (bool() is "running") or None.
#   jetson.stats        a flat summary of the above (datetime values): not used.
# jetson-stats 3.x had other shapes (jetson.ram, jetson.cpu["CPU1"], power as a tuple);
# setup.cfg requires >= 4.2. 7.x differs from 4.x in internals we do not read (NVML GPU on
# JetPack 7, INA238 "VIN", fan rpm paired from a separate "pwm_tach" hwmon) and in
# __exit__ calling close(). The client and the jtop service must match: 4.2 compares the
# exact version, 4.3+ major.minor, else start() raises JtopException.

JTOP_SOCKET = "/run/jtop.sock"


def from_jtop(jetson):
    """`system` mapped from a started jtop.jtop client (or a recording with its shapes)."""
    status = empty_status("jtop")
    sections = (("cpu_percent", _jtop_cpu, "cpu"), ("memory", _jtop_memory, "memory"),
                ("swap", _jtop_swap, "memory"), ("gpu", _jtop_gpu, "gpu"),
                ("temperatures", _jtop_temperatures, "temperature"),
                ("power", _jtop_power, "power"), ("fan", _jtop_fan, "fan"),
                ("nvpmodel", _jtop_nvpmodel, "nvpmodel"),
                ("jetson_clocks", _jtop_jetson_clocks, "jetson_clocks"))
    for key, mapper, attribute in sections:
        try:
            status[key] = mapper(getattr(jetson, attribute))
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            logger.debug("jtop %s not usable: %r", attribute, exc)   # stays unknown
    return status


def _jtop_cpu(cpu):
    percents = []
    for core in cpu["cpu"]:
        idle = core.get("idle") if core.get("online") else None
        percents.append(None if idle is None else round(100.0 - float(idle), 1))
    return percents


def _jtop_memory(memory):
    # available_mb stays None: jtop does not expose MemAvailable (see above); its "used"
    # excludes buffers and page cache, close to but not the same as total - available.
    ram = memory["RAM"]
    return {"total_mb": _mib(ram["tot"]), "available_mb": None,
            "used_percent": _percent(ram["used"], ram["tot"])}


def _jtop_swap(memory):
    swap = memory["SWAP"]
    return {"total_mb": _mib(swap["tot"]), "used_mb": _mib(swap["used"])}


def _jtop_gpu(gpu):
    for name in sorted(gpu.keys()):
        load = gpu[name]["status"].get("load")
        return {"load_percent": None if load is None else round(float(load), 1)}
    return {"load_percent": None}


def _jtop_temperatures(temperature):
    temperatures = {}
    for name, sensor in temperature.items():
        celsius = sensor.get("temp")
        if sensor.get("online", True) and celsius is not None and celsius > -256:
            temperatures[zone_name(name)] = round(float(celsius), 1)
    return temperatures


def _jtop_power(power):
    rails = {name: int(rail["power"]) for name, rail in power.get("rail", {}).items()
             if rail.get("online", True) and rail.get("power") is not None}
    total = power.get("tot") or {}
    if "name" not in total:                 # jtop summed the rails: not a measurement
        return {"total_mw": None, "rails": rails}
    rails[total["name"]] = int(total["power"])
    return {"total_mw": int(total["power"]), "rails": rails}


def _jtop_fan(fan):
    for name in sorted(fan.keys()):
        speeds, rpms = fan[name].get("speed") or [], fan[name].get("rpm") or []
        return {"percent": round(float(speeds[0]), 1) if speeds else None,
                "rpm": int(rpms[0]) if rpms else None}
    return {"percent": None, "rpm": None}


def _jtop_nvpmodel(nvpmodel):
    return None if nvpmodel is None else str(nvpmodel.name)


def _jtop_jetson_clocks(jetson_clocks):
    return None if jetson_clocks is None else bool(jetson_clocks)


def _from_live_jtop(client, root):
    """from_jtop for a live client, None when it has stopped (then /sys is read instead)."""
    try:
        if not client.ok(spin=True):        # non-blocking; re-raises the reader's error
            return None
        status = from_jtop(client)
    except Exception as exc:
        logger.warning("jtop client stopped (%s); reading /sys directly", exc)
        return None
    # MemAvailable from the same /proc/meminfo jtop reads; jtop leaves it out.
    status["memory"]["available_mb"] = read_meminfo(root)[0]["available_mb"]
    return status


def open_jtop(interval=1.0, timeout=10.0, root="/"):
    """A started jtop client, or None when jetson-stats or its service is not usable."""
    if not is_jetson(root):
        # jetson-stats serves Jetsons only: on any other host its absence is expected, and
        # an info line on every start would only look like something to fix.
        logger.debug("not a Jetson (no %s): jetson-stats not used",
                     _path(root, "etc/nv_tegra_release"))
        return None
    try:
        from jtop import jtop
    except Exception as exc:                # ImportError, or a broken install
        logger.info("jetson-stats not available (%s); reading /sys directly: jetson_clocks "
                    "is then unknown, and so is a build's GPU memory unless edge runs as "
                    "root (tools/install-jetson installs it: docs/systemd.md)", exc)
        return None
    if not os.path.exists(JTOP_SOCKET):
        logger.info("jtop service not running (no %s); reading /sys directly", JTOP_SOCKET)
        return None
    client = jtop(interval=interval)
    error = _start_within(client, timeout)
    if error is not None:
        logger.warning("jtop service not usable (%s); reading /sys directly", error)
        close_jtop(client)
        return None
    return client


def _start_within(client, timeout):
    """client.start() in a helper thread; the error, or None once started.

    jtop's start() waits on the service's queue without a timeout, so a hung service
    would otherwise hang the caller.
    """
    outcome = {}

    def start():
        try:
            client.start()
            outcome["started"] = True
        except Exception as exc:
            outcome["error"] = exc
    starter = threading.Thread(target=start, name="jtop-start", daemon=True)
    starter.start()
    starter.join(timeout)
    if outcome.get("started"):
        return None
    return outcome.get("error") or "no answer from {} in {:g} s".format(JTOP_SOCKET, timeout)


def close_jtop(client):
    """Stop a client from open_jtop (None is fine)."""
    if client is None:
        return
    try:
        client.close()
    except Exception as exc:
        logger.debug("closing jtop: %r", exc)


# -- versions ------------------------------------------------------------------------------

def versions(backend_describe, root="/"):
    """Versions for the health report; None for what this machine does not have."""
    l4t = read_l4t(root)
    return {"edge": __version__,
            "python": platform.python_version(),
            "backend": backend_describe,
            "cuda": read_cuda(root),
            "jetpack": jetpack_for(l4t),
            "l4t": l4t,
            "board": read_board(root),
            "os": read_os(root)}


def read_l4t(root="/"):
    """"32.7.1" from /etc/nv_tegra_release ("# R32 (release), REVISION: 7.1, ..."), or None."""
    match = L4T_RE.search(_read(_path(root, "etc/nv_tegra_release")) or "")
    return "{}.{}.{}".format(*match.groups()) if match else None


def jetpack_for(l4t):
    """The JetPack release that ships an L4T release, or None when not in the table."""
    return JETPACK_BY_L4T.get(l4t)


def read_cuda(root="/"):
    """CUDA toolkit version from /usr/local/cuda: version.json (11.1+) or version.txt."""
    text = _read(_path(root, "usr/local/cuda/version.json"))
    if text:
        try:
            return str(json.loads(text)["cuda"]["version"])      # {"cuda": {"version": ..}}
        except (ValueError, KeyError, TypeError):
            pass
    match = re.search(r"CUDA Version\s+(\S+)",
                      _read(_path(root, "usr/local/cuda/version.txt")) or "")
    return match.group(1) if match else None


def read_board(root="/"):
    """The device-tree model ("NVIDIA Jetson Nano Developer Kit"), or None."""
    return _read(_path(root, "proc/device-tree/model")) or None


def read_os(root="/"):
    """PRETTY_NAME from os-release, or None."""
    for relative in ("etc/os-release", "usr/lib/os-release"):
        match = re.search(r'^PRETTY_NAME=(.*)$', _read(_path(root, relative)) or "", re.M)
        if match:
            return match.group(1).strip().strip("\"'") or None
    return None
