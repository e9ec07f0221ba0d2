"""What an engine build and a running daemon take in memory, each figure with its source.

The one home of the memory figures: the build's pre-check (edge.backends.build) asks the
backend how much a build is expected to need, and the backends answer from here
(`trt_build`, `ort_build`); `edge doctor` and tools/install-jetson print the plan this module
makes for a configuration on the live board (`read_board`, `plan`); docs/memory.md is that
plan for each board, with the reasoning behind every figure.

Every figure is in MiB and carries its source: a published one (an issue, a document, a
script), "measured here" (on the development host, x86-64, never a Jetson), "estimated
here" (computed from the model files), or UNCONFIRMED where nothing establishes it. Every
file path is taken relative to `root`, so the tests run against recorded trees.

The plan has two phases, because the daemon builds every engine first (in a child process,
one at a time, whose memory goes back to the system when it ends) and loads them after:
- build: the system, the daemon waiting for its engines, and the largest build child;
- run: the system, the daemon with its CUDA context, tactic libraries, engines and frames.
Each phase must fit the RAM less engine.reserve_mb ("fits"), or fit only by swapping idle
memory out ("tight": swap never holds what the GPU uses), or neither ("does not fit").
"""

import math
import os
import re

MIB = 2 ** 20

# name -> (MiB, source). UNCONFIRMED marks a figure no published source established.
FIGURES = {
    "cuda_init": (225, "wang-xinyu/tensorrtx#1160: TensorRT 8.2 on a Nano 2GB logs 'Init CUDA: "
                       "CPU +225 MiB'; Orin's CUDA 11/12 context: UNCONFIRMED"),
    "cublas": (241, "wang-xinyu/tensorrtx#1160: 'Init cuBLAS/cuBLASLt: CPU +156, GPU +241 MiB' "
                    "(Nano 2GB, TensorRT 8.2); on a Jetson the GPU column is the board's memory "
                    "in use (cuMemGetInfo: cuda-python docs), the CPU growth inside it"),
    "cudnn": (406, "wang-xinyu/tensorrtx#1160: 'Init cuDNN: CPU +241, GPU +406 MiB' (Nano "
                   "2GB, TensorRT 8.2), counted as cublas"),
    "trt_model_factor": (3, "UNCONFIRMED: the parsed FP32 weights, the builder's copies and "
                            "the serialized plan, about three times the ONNX file"),
    "build_python": (26, "measured here: RSS of Python + numpy in a fresh interpreter "
                         "(tools/footprint.py, x86-64)"),
    "ort_base": (64, "measured here: the build child's peak RSS less its model (ONNX Runtime "
                     "1.x imported, no model)"),
    "ort_model_factor": (4, "measured here: the optimised session and the written model"),
    "daemon_trt": (90, "derived from a measurement here: RSS of `edge run` on ONNX Runtime "
                       "134.5 MiB (tools/footprint.py, x86-64) less ONNX Runtime's library "
                       "(21.3) and session (about 25); on a Jetson (Python 3.6, numpy 1.19, "
                       "pycuda, tensorrt): UNCONFIRMED"),
    "daemon_ort": (110, "measured here: RSS of `edge run` (tools/footprint.py, x86-64) less "
                        "its yolox-nano session; the sessions are counted per engine"),
    "system_nano": (400, "microsoft/onnxruntime#4259: a Nano idles at about 300-500 MB without "
                         "the desktop (logged in over ssh); the Nano 2GB: UNCONFIRMED"),
    "system_orin": (1500, "UNCONFIRMED: ShunmeiCho/JetLLM jetson_environment_info.md shows "
                          "2.3 GiB used on an Orin Nano 8GB (JetPack 6.0, desktop on), less "
                          "the desktop's 800 MB"),
    "builder_kernels": (1235, "UNCONFIRMED for an Orin Nano: OE4T/meta-tegra#2120 logs "
                              "'Init builder kernel library: CPU +1227, GPU +1235' (TensorRT 10 "
                              "on L4T R38); TensorRT 8.2 has no such library"),
    "system_other": (0, "measured now on the board: MemTotal - MemAvailable (/proc/meminfo), "
                        "no fixed figure"),
    "desktop_lxde": (250, "dusty-nv/jetson-containers docs/setup.md: the desktop takes "
                          "'~250MB for LXDE'"),
    "desktop_gnome": (800, "dusty-nv/jetson-containers docs/setup.md: the desktop takes "
                           "'~800MB for Unity/GNOME'"),
    "zram_share": (50, "percent of the RAM nvzramconfig gives zram by default "
                       "(/etc/systemd/nvzramconfig.sh: mem = totalmem / 2 / NRDEVICES per "
                       "CPU): JetsonHacksNano/resizeSwapMemory README.md"),
    "zram_ratio": (2, "UNCONFIRMED: zram's compression ratio; 2:1 is the figure commonly "
                      "quoted (MichaIng/DietPi#94), so zram gives back half its size"),
}

# The models of the shipped cards, estimated here from the ONNX files (/work/shared/models):
# float weights (initializers and Constant nodes), and the largest set of activations alive
# at once when ONNX Runtime runs the graph as edge rewrites it for TensorRT 8.2 (frame
# 640x480 float32, preprocessing included), in FP32 (TensorRT keeps some layers in FP32).
# TensorRT's own "Total Activation Memory" (its build log) is the figure to check on a device.
MODELS = {
    "yolox-nano": {"bytes": 3660092, "weights_fp16": 1.75, "activations": 7.9,
                   "ort_session": 30,
                   "source": "estimated here from yolox_nano.onnx: 0.915 M weights, FP16; "
                             "largest live activations 7.9 MiB FP32",
                   "ort_source": "measured here: RSS an ONNX Runtime session of yolox-nano "
                                 "adds at 640x480, first run included"},
    "coarse-loftr": {"bytes": 1847636, "weights_fp16": 0.47, "activations": 16.5,
                     "ort_session": 42,
                     "source": "estimated here from coarse_loftr_teacher.onnx: 0.245 M "
                               "weights, FP16; largest live activations 16.5 MiB FP32",
                     "ort_source": "measured here: RSS an ONNX Runtime session of "
                                   "coarse-loftr adds at 640x480, first run included"},
}
UNKNOWN_MODEL = ("UNCONFIRMED: a card this table does not know: weights are half its ONNX "
                 "file (FP32 to FP16), activations guessed as 16 network inputs in FP32")

# The boards: how to recognise each (the device-tree model, then MemTotal, which tells the
# Nano 2GB from the 4GB and the Orin Nano 8GB from the 4GB that share a model string), its
# RAM as Linux sees it (MemTotal: the carve-outs are gone) and the desktop its image runs.
BOARDS = (
    {"key": "nano-2gb", "name": "Jetson Nano 2GB", "family": "Jetson Nano",
     "models": ("NVIDIA Jetson Nano 2GB Developer Kit",), "min_mib": 0, "max_mib": 3000,
     "mem_total": 1980, "system": "system_nano", "desktop": "desktop_lxde", "l4t": "32.7.1",
     "sources": {
         "model": "linux-tegra patch 'arm64: tegra: Add NVIDIA Jetson Nano 2GB Developer Kit "
                  "support' (tegra210-p3541-0000.dts)",
         "mem_total": "kostaleonard/nvidia-jetson-tensorflow-mnist README: tegrastats "
                      "'RAM 1889/1980MB' on a 2GB Jetson",
         "desktop": "UNCONFIRMED: DocksDocks/jetson_nano README (the Nano 2GB runs LXDE by "
                    "itself)"}},
    {"key": "nano-4gb", "name": "Jetson Nano 4GB", "family": "Jetson Nano",
     "models": ("NVIDIA Jetson Nano Developer Kit",), "min_mib": 3000, "max_mib": 1 << 20,
     "mem_total": 3964, "system": "system_nano", "desktop": "desktop_gnome", "l4t": "32.7.1",
     "sources": {
         "model": "mainline tegra210-p3450-0000.dts: 'NVIDIA Jetson Nano Developer Kit' "
                  "(the 2GB's tegra210-p3541-0000.dts includes it and renames it)",
         "mem_total": "Ektimo/jetson_prometheus_exporter tests/test_parsing.py: tegrastats "
                      "'RAM 2015/3964MB ... SWAP 29/1982MB'",
         "desktop": "dusty-nv/jetson-containers docs/setup.md: ~800MB for Unity/GNOME; that "
                    "the Nano 4GB image runs GNOME: UNCONFIRMED"}},
    {"key": "orin-nano-8gb", "name": "Jetson Orin Nano 8GB", "family": "Jetson Orin Nano",
     "models": ("NVIDIA Jetson Orin Nano Developer Kit", "NVIDIA Jetson Orin Nano"),
     "min_mib": 5000, "max_mib": 1 << 20,
     "mem_total": 7578, "system": "system_orin", "desktop": "desktop_gnome", "l4t": "36.3.0",
     "sources": {
         "model": "mainline tegra234-p3768-0000+p3767-0005.dts: 'NVIDIA Jetson Orin Nano "
                  "Developer Kit'",
         "mem_total": "ShunmeiCho/JetLLM jetson_environment_info.md: free 'Total: 7.4Gi', "
                      "swap 3.7Gi of zram (JetPack 6.0)",
         "desktop": "dusty-nv/jetson-containers docs/setup.md: ~800MB for Unity/GNOME; that "
                    "the JetPack 6 image runs GNOME: UNCONFIRMED"}},
)

# L4T major release -> the TensorRT it ships (TENSORRT.md section 0: JetPack 4.6.1+ = 8.2,
# JetPack 5 = 8.5 and 6.0 = 8.6 UNCONFIRMED, 6.1/6.2 = 10.3).
TRT_BY_L4T = ((32, 0, (8, 2)), (35, 0, (8, 5)), (36, 0, (8, 6)), (36, 4, (10, 3)))
# From 8.6 TensorRT's core library no longer needs cuDNN and cuBLAS (a maintainer in
# NVIDIA/TensorRT#3376); before it the runtime loads them at deserialization (8.5 on a Jetson
# NX in NVIDIA/TensorRT#3917), and whether 8.2 skips them for an engine built without them
# is UNCONFIRMED: the plan counts them.
RUNTIME_WITHOUT_LIBRARIES = (8, 6)
BUILDER_KERNELS_SINCE = (8, 6)     # "Init builder kernel library" in build logs from 8.6 on
UINT8_INPUTS = (8, 5)            # before: the frame goes to TensorRT as a float32 copy

DESKTOP_PROCESSES = ("Xorg", "X", "Xwayland", "gdm", "gdm3", "gdm-x-session", "gnome-shell",
                     "lightdm", "lxdm", "lxsession", "lxpanel", "openbox", "xfce4-session")
LXDE_PROCESSES = ("lxdm", "lxsession", "lxpanel", "openbox")
SWAP_FILE = "/var/swapfile"
DEFAULT_FRAME = (1280, 720)      # a camera whose URI names no size (csi:// defaults to it)
TEST_FRAME = (640, 480)          # test:// without width and height
STATIC_RESERVE = 128             # engine.reserve_mb's default, for plans without a config


def mib(name):
    """The figure `name` in MiB."""
    return FIGURES[name][0]


def source(name):
    """Where the figure `name` comes from."""
    return FIGURES[name][1]


def builder_libraries(version, libraries):
    """What a TensorRT `version` ((major, minor)) build loads: the tactic `libraries`, and
    from 8.6 the builder kernel library."""
    return tuple(libraries) + (("builder_kernels",) if tuple(version[:2]) >=
                               BUILDER_KERNELS_SINCE else ())


def trt_build(model_size, workspace_mb, libraries=()):
    """Bytes a TensorRT build is expected to need: the CUDA context, the tactic libraries it
    loads (`libraries`: "cublas", "cudnn"), the network about three times over, the
    workspace, and the build child's own Python with numpy."""
    total = mib("build_python") + mib("cuda_init") + sum(mib(name) for name in libraries) + \
        workspace_mb
    return total * MIB + mib("trt_model_factor") * model_size


def ort_build(model_size):
    """Bytes an ONNX Runtime build (an optimised model written out) is expected to need."""
    return mib("ort_base") * MIB + mib("ort_model_factor") * model_size


# -- the live board -------------------------------------------------------------------------

def _path(root, relative):
    return os.path.join(root, relative.lstrip("/"))


def _read(path):
    try:
        with open(path, "r") as f:
            return f.read().replace("\x00", "").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo(root):
    values = {}
    for line in (_read(_path(root, "proc/meminfo")) or "").splitlines():
        match = re.match(r"(\w+):\s+(\d+)", line)           # "MemTotal:  4059416 kB" (KiB)
        if match:
            values[match.group(1)] = int(match.group(2)) / 1024.0
    return values


def _zram(root):
    """MiB of swap on zram devices, from /proc/swaps (sizes in KiB)."""
    total = 0.0
    for line in (_read(_path(root, "proc/swaps")) or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and "zram" in fields[0]:
            try:
                total += int(fields[2]) / 1024.0
            except ValueError:
                pass
    return total


def _processes(root):
    """Names (comm) and command lines (argv lists) of the running processes."""
    names, commands = set(), []
    try:
        pids = [p for p in os.listdir(_path(root, "proc")) if p.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        comm = _read(_path(root, "proc/{}/comm".format(pid)))
        if comm:
            names.add(comm)
        try:
            with open(_path(root, "proc/{}/cmdline".format(pid)), "rb") as f:
                commands.append(f.read().decode("utf-8", "replace").split("\x00"))
        except OSError:
            pass
    return names, commands


def _is_daemon(argv):
    """True for `edge run ...` or `python -m edge run ...` (the service's daemon)."""
    for index, arg in enumerate(argv):
        if os.path.basename(arg) == "edge" or (arg == "edge" and index and
                                               argv[index - 1] == "-m"):
            return "run" in argv[index + 1:]
    return False


def _graphical_target(root):
    """True when the system boots to the desktop (default.target is graphical.target)."""
    for relative in ("etc/systemd/system/default.target", "lib/systemd/system/default.target"):
        path = _path(root, relative)
        if os.path.islink(path):
            return os.path.basename(os.readlink(path)) == "graphical.target"
        if os.path.exists(path):
            return "graphical" in (_read(path) or "")
    return None


def _l4t(root):
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)",
                      _read(_path(root, "etc/nv_tegra_release")) or "")
    return "{}.{}.{}".format(*match.groups()) if match else None


def board_for(model, mem_total):
    """The BOARDS entry for a device-tree model string and MemTotal (MiB), or None."""
    if not model or "Jetson" not in model:
        return None
    for board in BOARDS:
        if any(mark in model for mark in board["models"]) and \
                board["min_mib"] <= (mem_total or 0) < board["max_mib"]:
            return board
    for board in BOARDS:     # "NVIDIA Jetson Nano Developer Kit" with 2 GB: by MemTotal
        if board["family"] in model and board["min_mib"] <= (mem_total or 0) < board["max_mib"]:
            return board
    return None


def read_board(root="/"):
    """What the plan needs to know of the live board, as plain data (MiB)."""
    info = _meminfo(root)
    model = _read(_path(root, "proc/device-tree/model")) or None
    l4t = _l4t(root)
    names, commands = _processes(root)
    total = info.get("MemTotal")
    board = board_for(model, total)
    jetson = board is not None or l4t is not None or "Jetson" in (model or "")
    desktop_running = bool(names & set(DESKTOP_PROCESSES))
    kind = None
    if desktop_running:
        kind = "desktop_lxde" if names & set(LXDE_PROCESSES) else "desktop_gnome"
    elif board is not None:
        kind = board["desktop"]
    elif jetson:
        kind = "desktop_gnome"
    # a running daemon's memory is already in MemAvailable's fall: see `plan`
    daemon = any(_is_daemon(argv) for argv in commands)
    return {"model": model, "l4t": l4t, "board": board["key"] if board else None,
            "jetson": jetson,
            "mem_total": total, "mem_available": info.get("MemAvailable"),
            "swap_total": info.get("SwapTotal", 0.0), "swap_free": info.get("SwapFree", 0.0),
            "zram": _zram(root),
            "desktop_running": desktop_running, "graphical_target": _graphical_target(root),
            "desktop_kind": kind, "daemon_running": daemon, "measured": True}


def simulate(key, desktop=None, zram=True, swap_file_mib=0):
    """The reading of an idle board of BOARDS `key` (docs/memory.md's tables): its MemTotal,
    nvzramconfig's zram when `zram`, a swap file of `swap_file_mib`, the desktop on or off
    (None: as the board's image ships, on)."""
    board = next(b for b in BOARDS if b["key"] == key)
    desktop = True if desktop is None else desktop
    total = float(board["mem_total"])
    zram_mib = total * mib("zram_share") / 100.0 if zram else 0.0
    swap = zram_mib + swap_file_mib
    return {"model": board["models"][0], "l4t": board["l4t"], "board": key, "jetson": True,
            "mem_total": total, "mem_available": None, "swap_total": swap, "swap_free": swap,
            "zram": zram_mib, "desktop_running": desktop, "graphical_target": desktop,
            "desktop_kind": board["desktop"], "daemon_running": False, "measured": False}


# -- the plan -------------------------------------------------------------------------------

def trt_version_for(l4t):
    """(major, minor) of the TensorRT an L4T release ships, or None."""
    if not l4t:
        return None
    parts = [int(p) for p in l4t.split(".")[:2]]
    version = None
    for major, minor, trt in TRT_BY_L4T:
        if (parts[0], parts[1]) >= (major, minor) and parts[0] == major:
            version = trt
    return version


def _libraries(setting, version, integrated):
    """(build libraries, runtime libraries) for engine.tactic_sources `setting`."""
    try:
        from edge.backends.tactics import resolve_tactic_sources, tactic_libraries
        build = tactic_libraries(version, resolve_tactic_sources(setting, version, integrated))
    except (ImportError, ValueError):
        off = (setting == "auto" and integrated) or version >= (10, 0)
        build = () if off else ("cublas", "cudnn")
    run = tuple(build) if version >= RUNTIME_WITHOUT_LIBRARIES else ("cublas", "cudnn")
    return tuple(build), run


def _frame_size(uri):
    """(width, height) a camera URI delivers: its width/height query, else the kind's
    default (csi:// 1280x720, test:// 640x480), else 1280x720 (assumed)."""
    query = uri.split("?", 1)[1] if "?" in uri else ""
    params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    try:
        width, height = int(params.get("width", 0)), int(params.get("height", 0))
    except ValueError:
        width = height = 0
    if width > 0 and height > 0:
        return width, height
    return TEST_FRAME if uri.startswith("test:") else DEFAULT_FRAME


def _cameras(cfg):
    try:
        from edge.cameras import configured
        return configured(cfg)
    except ImportError:         # pragma: no cover - edge is importable wherever this runs
        return [(None, cfg.get("source") or "test://")]


def _cards(cfg):
    from edge import cards, tasks
    return [cards.load(name) for name in tasks.card_names(cfg)]


def _model(card, model_dir):
    """(estimate dict, source) of a card's model."""
    known = MODELS.get(card.name)
    path = os.path.join(model_dir or "", card.model.get("file", "")) if model_dir else None
    size = os.path.getsize(path) if path and os.path.isfile(path) else None
    if known is not None:
        return dict(known, bytes=size or known["bytes"]), known["source"]
    size = size or 0
    width, height = card.input_size
    return ({"bytes": size, "weights_fp16": size / 2.0 / MIB,
             "activations": 16 * width * height * 3 * 4.0 / MIB, "ort_session": 8 * size / MIB},
            UNKNOWN_MODEL)


def _row(phase, item, value, source_text, swappable=False, in_ram=None):
    """One line of the plan; `in_ram`: the MiB of it that cannot be swapped out (all of it
    unless `swappable`)."""
    if in_ram is None:
        in_ram = 0.0 if swappable else float(value)
    return {"phase": phase, "item": item, "mib": float(value), "source": source_text,
            "in_ram": float(in_ram)}


def _system_rows(phase, board, reading, backend):
    """The system and the desktop; the measured figure when it is larger than the estimate."""
    rows = []
    jetson = reading["jetson"]
    system_key = board["system"] if board else None
    if system_key is None and jetson:       # a Jetson the table does not know: by its L4T
        system_key = "system_orin" if (trt_version_for(reading["l4t"]) or (8, 2)) >= (8, 5) \
            else "system_nano"
    desktop_on = bool(reading["desktop_running"] or reading["graphical_target"])
    if system_key:
        rows.append(_row(phase, "L4T system, no desktop", mib(system_key), source(system_key)))
        if desktop_on and reading["desktop_kind"]:
            kind = reading["desktop_kind"]
            label = "LXDE" if kind == "desktop_lxde" else "GNOME"
            how = "running" if reading["desktop_running"] else "on at boot"
            rows.append(_row(phase, "desktop ({}, {})".format(label, how), mib(kind),
                             source(kind), swappable=True))
    measured = None
    if reading["measured"] and reading["mem_available"] is not None and \
            not reading["daemon_running"]:
        measured = reading["mem_total"] - reading["mem_available"]
    estimate = sum(r["mib"] for r in rows)
    if measured is not None and (not rows or measured > estimate):
        # what the system takes without the desktop stays in RAM; the rest (the desktop,
        # other programs' idle pages) can be swapped out
        floor = mib(system_key) if system_key else measured
        rows = [_row(phase, "system as measured now (MemTotal - MemAvailable)", measured,
                     source("system_other"), in_ram=min(measured, floor))]
    return rows


def plan(cfg, reading=None, root="/", trt_version=None):
    """The memory plan of config `cfg` (edge.config.load) on the board `reading` (read_board
    of `root` by default; simulate for a board by name): plain data with the rows (phase,
    item, MiB, source), each phase's total, the verdict and the advice."""
    reading = reading if reading is not None else read_board(root)
    board = next((b for b in BOARDS if b["key"] == reading["board"]), None)
    engine = cfg["engine"]
    backend = cfg.get("backend") or "auto"
    backend = "trt" if backend == "trt" or (backend == "auto" and reading["jetson"]) else "ort"
    version = trt_version or trt_version_for(reading["l4t"]) or (10, 3)
    setting = engine.get("tactic_sources") or "auto"
    build_libs, run_libs = _libraries(setting, version, reading["jetson"]) \
        if backend == "trt" else ((), ())
    cards = _cards(cfg)
    cameras = [(name, _frame_size(uri)) for name, uri in _cameras(cfg)]
    pool = int(cfg.get("pipeline", {}).get("pool", 6))
    workspace = int(engine.get("workspace_mb", 256))
    reserve = float(engine.get("reserve_mb", STATIC_RESERVE))
    budget = float(engine.get("budget_mb", 2048))
    models = [(card,) + _model(card, cfg.get("model_dir")) for card in cards]

    rows = []
    # build: the system, the daemon waiting for its engines, the largest build child
    builds = []
    for card, model, model_source in models:
        if backend == "trt":
            need = trt_build(model["bytes"], workspace,
                             builder_libraries(version, build_libs)) / float(MIB)
        else:
            need = ort_build(model["bytes"]) / float(MIB)
        builds.append((need, card, model))
    if builds:
        need, card, model = max(builds, key=lambda b: b[0])
        phase = "build"
        rows += _system_rows(phase, board, reading, backend)
        rows.append(_daemon_row(phase, "daemon, engines not loaded yet", backend))
        label = "child"
        if backend == "trt":
            rows.append(_row(phase, label + ": Python + numpy", mib("build_python"),
                             source("build_python"), swappable=True))
            rows.append(_row(phase, label + ": CUDA context", mib("cuda_init"),
                             source("cuda_init")))
            for library in build_libs:
                rows.append(_row(phase, label + ": " + LIBRARY_NAMES[library], mib(library),
                                 source(library) + "; engine.tactic_sources: " + setting))
            if version >= BUILDER_KERNELS_SINCE:
                rows.append(_row(phase, label + ": TensorRT's builder kernel library",
                                 mib("builder_kernels"), source("builder_kernels")))
            rows.append(_row(phase, label + ": workspace", workspace,
                             "engine.workspace_mb"))
            rows.append(_row(phase, label + ": network, 3 x the ONNX file",
                             mib("trt_model_factor") * model["bytes"] / float(MIB),
                             source("trt_model_factor"), swappable=True))
        else:
            rows.append(_row(phase, "child: ONNX Runtime optimising the model", need,
                             source("ort_base") + "; " + source("ort_model_factor")))
    # run: the daemon with its context, libraries, engines and frames
    phase = "run"
    rows += _system_rows(phase, board, reading, backend)
    rows.append(_daemon_row(phase, "daemon: Python, numpy, scipy, paho-mqtt, edge", backend))
    if backend == "trt" and cards:
        rows.append(_row(phase, "CUDA context", mib("cuda_init"), source("cuda_init")))
        for library in run_libs:
            note = "" if library in build_libs else \
                "; loaded at run time whatever the build used: UNCONFIRMED for TensorRT " \
                "{}.{} (NVIDIA/TensorRT#3917, #3376)".format(*version)
            rows.append(_row(phase, LIBRARY_NAMES[library], mib(library),
                             source(library) + note))
    for card, model, model_source in models:
        if backend == "trt":
            rows.append(_row(phase, "engine {}: weights FP16 + activations".format(card.name),
                             model["weights_fp16"] + model["activations"], model_source))
        else:
            rows.append(_row(phase, "ONNX Runtime session {}".format(card.name),
                             model["ort_session"], model.get("ort_source", model_source)))
    frames = 0.0
    staging = 0.0
    for name, (width, height) in cameras:
        frames += pool * width * height * 3 / float(MIB)
        if backend == "trt" and version < UINT8_INPUTS:
            from edge import tasks
            for card, _, _ in models:
                copies = tasks.kind(card.task).frame_copies   # a matcher: and the reference
                staging += copies * width * height * 3 * 4 / float(MIB)
    if cards:
        sizes = ", ".join("{}x{}".format(w, h) for _, (w, h) in cameras)
        rows.append(_row(phase, "frame pool: {} slots x {} camera(s) ({})".format(
            pool, len(cameras), sizes), frames,
            "pipeline.pool x width x height x 3 bytes; a size the URI does not name is "
            "assumed 1280x720"))
        if staging:
            rows.append(_row(phase, "float32 frame copies for TensorRT {}.{} (no uint8 "
                             "inputs)".format(*version), staging,
                             "edge.backends.trt: width x height x 3 x 4 bytes per camera and "
                             "engine (TENSORRT.md section 3)"))
    result = _verdict(cfg, reading, board, rows, builds, backend, version, setting, build_libs,
                      run_libs, cards, cameras, workspace, reserve, budget)
    result["build_card"] = max(builds, key=lambda b: b[0])[1].name if builds else None
    result["builds"] = len(builds)
    return result


def _daemon_row(phase, item, backend):
    """The daemon's own row (its figure depends on the backend's libraries)."""
    figure = "daemon_trt" if backend == "trt" else "daemon_ort"
    return _row(phase, item, mib(figure), source(figure), swappable=True)


LIBRARY_NAMES = {"cublas": "cuBLAS / cuBLAS LT", "cudnn": "cuDNN"}
VERDICTS = ("fits", "tight", "does not fit")


def _verdict(cfg, reading, board, rows, builds, backend, version, setting, build_libs,
             run_libs, cards, cameras, workspace, reserve, budget):
    total_ram = reading["mem_total"] or 0.0
    limit = total_ram - reserve
    zram = reading["zram"] or 0.0
    disk_swap = max(0.0, (reading["swap_total"] or 0.0) - zram)
    usable_swap = disk_swap + zram * (1 - 1.0 / mib("zram_ratio"))
    phases = {}
    for row in rows:
        phase = phases.setdefault(row["phase"], {"total": 0.0, "in_ram": 0.0})
        phase["total"] += row["mib"]
        phase["in_ram"] += row["in_ram"]
    verdict = 0
    problems = []
    for name in ("build", "run"):
        if name not in phases:
            continue
        phase = phases[name]
        if phase["total"] <= limit:
            phase["verdict"] = "fits"
        elif phase["total"] <= limit + usable_swap and phase["in_ram"] <= limit:
            phase["verdict"] = "tight"
            problems.append("{}: {:.0f} MiB is over the {:.0f} MiB of RAM less "
                            "engine.reserve_mb; it fits only by swapping {:.0f} MiB out".format(
                                name, phase["total"], limit, phase["total"] - limit))
        else:
            phase["verdict"] = "does not fit"
            if phase["in_ram"] > limit:
                problems.append("{}: {:.0f} MiB must stay in RAM (GPU memory, the CUDA "
                                "context and libraries do not swap), over the {:.0f} MiB of "
                                "RAM less engine.reserve_mb".format(name, phase["in_ram"],
                                                                    limit))
            else:
                problems.append("{}: {:.0f} MiB is over the {:.0f} MiB of RAM less "
                                "engine.reserve_mb and {:.0f} MiB of usable swap".format(
                                    name, phase["total"], limit, usable_swap))
        verdict = max(verdict, VERDICTS.index(phase["verdict"]))
    need = max(b[0] for b in builds) if builds else 0.0
    # edge.backends.build checks MemAvailable + SwapFree - reserve against the estimate before
    # a build starts, and stops the child once its own memory passes engine.budget_mb.
    at_build = [r["mib"] for r in rows if r["phase"] == "build" and
                (r["item"].startswith(("L4T", "desktop", "system", "daemon")))]
    available = total_ram - sum(at_build) + (reading["swap_total"] or 0.0)
    if builds and available - reserve < need:
        verdict = 2
        problems.append("the build pre-check will refuse to start: about {:.0f} MiB of memory "
                        "+ swap will be available, less engine.reserve_mb {:.0f}, for a build "
                        "expected to need {:.0f} MiB".format(available, reserve, need))
    if builds and need > budget:
        verdict = 2
        problems.append("a build is expected to need {:.0f} MiB, over engine.budget_mb {:.0f}: "
                        "it would be stopped".format(need, budget))
    result = {"board": _board_summary(reading, board), "backend": backend,
              "tensorrt": "{}.{}".format(*version) if backend == "trt" else None,
              "tactic_sources": setting if backend == "trt" else None,
              "build_libraries": list(build_libs), "run_libraries": list(run_libs),
              "tasks": [card.name for card in cards],
              "cameras": ["{}x{}".format(w, h) for _, (w, h) in cameras],
              "workspace_mb": workspace, "reserve_mb": reserve, "budget_mb": budget,
              "rows": [dict((k, v) for k, v in r.items()) for r in rows],
              "phases": phases, "limit_mib": limit, "usable_swap_mib": usable_swap,
              "disk_swap_mib": disk_swap, "build_need_mib": need,
              "build_available_mib": available,
              "verdict": VERDICTS[verdict], "problems": problems}
    result["advice"] = advice(result, reading, cfg)
    return result


def _board_summary(reading, board):
    return {"key": reading["board"], "name": board["name"] if board else
            ("a Jetson" if reading["jetson"] else "not a Jetson"),
            "model": reading["model"], "l4t": reading["l4t"], "jetson": reading["jetson"],
            "mem_total_mib": reading["mem_total"], "mem_available_mib": reading["mem_available"],
            "swap_total_mib": reading["swap_total"], "zram_mib": reading["zram"],
            "desktop": bool(reading["desktop_running"] or reading["graphical_target"]),
            "desktop_running": reading["desktop_running"],
            "daemon_running": reading["daemon_running"], "measured": reading["measured"]}


def _saving(result, phase, predicate):
    return sum(r["mib"] for r in result["rows"] if r["phase"] == phase and predicate(r))


def advice(result, reading, cfg):
    """What to change, most effective first; empty when the plan fits."""
    if result["verdict"] == "fits":
        return []
    lines = []
    phases = result["phases"]
    short = {name: max(0.0, p["total"] - result["limit_mib"]) for name, p in phases.items()}
    refused = any("pre-check" in p for p in result["problems"])
    if result["board"]["desktop"] and reading["jetson"] and (
            max(short.values() or [0.0]) > 0 or refused):
        kind = reading["desktop_kind"] or "desktop_gnome"
        lines.append("turn the desktop off (frees about {} MiB, {}): sudo systemctl set-default "
                     "multi-user.target && sudo reboot (back on: sudo systemctl set-default "
                     "graphical.target)".format(mib(kind), "LXDE" if kind == "desktop_lxde"
                                                else "GNOME"))
    if result["build_libraries"]:
        saved = sum(mib(name) for name in result["build_libraries"])
        lines.append("set engine.tactic_sources: auto (builds with TensorRT's own kernels, no "
                     "cuBLAS/cuDNN: about {:.0f} MiB less per build; now {})".format(
                         saved, result["tactic_sources"]))
    zram = reading["zram"] or 0.0
    needed = max(short.values() or [0.0])
    if result["disk_swap_mib"] < 4096 and (needed > 0 or refused):
        size = max(4, int(math.ceil((needed + 1024) / 1024.0)))
        lines.append("add a {size} GB swap file (builds can swap the build child's host "
                     "memory out): sudo fallocate -l {size}G {f} && sudo chmod 600 {f} && "
                     "sudo mkswap {f} && sudo swapon {f} && echo '{f} none swap sw 0 0' | "
                     "sudo tee -a /etc/fstab (or: sudo tools/install-jetson "
                     "--add-swap)".format(size=size, f=SWAP_FILE))
    if zram > 0 and result["disk_swap_mib"] >= 1024:
        lines.append("with a swap file, turn zram off (it keeps its pages in RAM): sudo "
                     "systemctl disable nvzramconfig && sudo reboot")
    elif zram == 0 and result["disk_swap_mib"] == 0 and reading["jetson"]:
        lines.append("no swap at all: add the swap file above, or turn zram back on: sudo "
                     "systemctl enable nvzramconfig && sudo reboot")
    if short.get("build", 0) > 0 and result["workspace_mb"] > 128:
        lines.append("lower engine.workspace_mb to 128 (now {}): the build's scratch "
                     "memory".format(result["workspace_mb"]))
    if short.get("run", 0) > 0 and len(result["tasks"]) > 1:
        matcher = _saving(result, "run", lambda r: r["item"].startswith(
            ("engine " + result["tasks"][-1], "ONNX Runtime session " + result["tasks"][-1])))
        lines.append("run one task: matcher: null (about {:.0f} MiB less), or the matcher on "
                     "another device".format(matcher))
    frames = _saving(result, "run", lambda r: r["item"].startswith(("frame pool", "float32")))
    if short.get("run", 0) > 0 and frames > 32:
        lines.append("a smaller camera size, e.g. csi://0?width=640&height=480 (the frame "
                     "buffers take {:.0f} MiB now), or a smaller pipeline.pool".format(frames))
    if result["build_need_mib"] > result["budget_mb"]:
        lines.append("raise engine.budget_mb to at least {:.0f} (now {:.0f})".format(
            math.ceil(result["build_need_mib"]), result["budget_mb"]))
    if refused and result["reserve_mb"] > 64:
        lines.append("or lower engine.reserve_mb (now {:.0f}) if the rest of the board needs "
                     "less".format(result["reserve_mb"]))
    return lines


# -- printing -------------------------------------------------------------------------------

def lines(result, sources=True):
    """The plan as text lines (edge doctor, tools/install-jetson)."""
    board = result["board"]
    out = []
    memory = "{:.0f} MiB RAM".format(board["mem_total_mib"] or 0)
    swap = "swap {:.0f} MiB".format(board["swap_total_mib"] or 0)
    if board["zram_mib"]:
        swap += " (zram {:.0f})".format(board["zram_mib"])
    extra = []
    if board["mem_available_mib"] is not None:
        extra.append("{:.0f} MiB available now".format(board["mem_available_mib"]))
    if board["jetson"]:
        extra.append("desktop " + ("running" if board["desktop_running"] else
                                   "on at boot" if board["desktop"] else "off"))
    engine = "TensorRT {}, tactic_sources {}".format(result["tensorrt"],
                                                    result["tactic_sources"]) \
        if result["backend"] == "trt" else "ONNX Runtime"
    out.append("board    {} ({}), {}, {}, {}".format(
        board["name"], board["model"] or "no device-tree model", memory, swap,
        ", ".join(extra)))
    out.append("plan     {} on {}; cameras {}; {}".format(
        " + ".join(result["tasks"]) or "no task", engine, ", ".join(result["cameras"]),
        "a daemon is running: its memory is in the figures read now"
        if board["daemon_running"] else "every build first, one at a time, then the engines"))
    for phase in ("build", "run"):
        if phase not in result["phases"]:
            continue
        if phase == "build":
            out.append("  build {} (the largest of {} builds, one at a time, each in a child "
                       "process whose memory goes back before the engines load)".format(
                           result["build_card"], result["builds"]) if result["builds"] > 1
                       else "  build {} (in a child process whose memory goes back before the "
                       "engine loads)".format(result["build_card"]))
        else:
            out.append("  run   every engine loaded, frames flowing")
        for row in result["rows"]:
            if row["phase"] == phase:
                out.append("  {:<5} {:<58} {:>6.0f} MiB{}".format(
                    phase, row["item"][:58], row["mib"],
                    "  " + row["source"] if sources else ""))
        info = result["phases"][phase]
        out.append("  {:<5} {:<58} {:>6.0f} MiB  of {:.0f} (RAM less engine.reserve_mb): "
                   "{}".format(phase, "total", info["total"], result["limit_mib"],
                               info["verdict"]))
    verdict = result["verdict"]
    out.append("memory   {}{}".format(
        verdict.upper() if verdict == "does not fit" else verdict,
        ": " + "; ".join(result["problems"]) if result["problems"] else ""))
    for line in result["advice"]:
        out.append("change   " + line)
    return out
