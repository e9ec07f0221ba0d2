"""The memory plan (edge.memoryplan): the board table, the live board read from a recorded
/proc and /etc, the plans for a Nano 2GB, a Nano 4GB and an Orin Nano 8GB, their verdicts and
advice, and a source for every figure."""

import os
import re
import shutil

import pytest

from edge import config, memoryplan
from tests.conftest import ROOT

SHIPPED = os.path.join(ROOT, "systemd", "edge.yaml")    # csi://0, yolox-nano
DATA = os.path.join(ROOT, "tests", "data", "sysfs")
MIB_KIB = 1024


def settings(matcher=None, **engine):
    """The shipped config (yolox-nano on csi://0), with a matcher and engine settings."""
    overrides = {"matcher": matcher, "model_dir": "/nonexistent"}
    overrides.update(("engine." + key, value) for key, value in engine.items())
    return config.load(SHIPPED, overrides, require_task=False)


def fake_board(folder, model, release, total_mib, available_mib, zram_mib=0.0, zram_devices=4,
               swap_file_mib=0, processes=(), graphical=None, base=None):
    """A / tree with what edge.memoryplan reads: meminfo, swaps, device-tree model, L4T
    release, processes (comm, cmdline) and the default systemd target."""
    root = str(folder)
    if base:
        shutil.copytree(base, root)
    for sub in ("proc/device-tree", "etc/systemd/system"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    swap_kib = int((zram_mib + swap_file_mib) * MIB_KIB)
    with open(os.path.join(root, "proc", "meminfo"), "w") as f:
        f.write("MemTotal:       {} kB\nMemFree:         {} kB\nMemAvailable:   {} kB\n"
                "SwapTotal:      {} kB\nSwapFree:       {} kB\n".format(
                    int(total_mib * MIB_KIB), int(available_mib * MIB_KIB / 2),
                    int(available_mib * MIB_KIB), swap_kib, swap_kib))
    with open(os.path.join(root, "proc", "swaps"), "w") as f:
        f.write("Filename\t\t\t\tType\t\tSize\tUsed\tPriority\n")
        for index in range(zram_devices if zram_mib else 0):
            f.write("/dev/zram{}                              partition\t{}\t0\t5\n".format(
                index, int(zram_mib * MIB_KIB / zram_devices)))
        if swap_file_mib:
            f.write("/var/swapfile                           file\t\t{}\t0\t-2\n".format(
                int(swap_file_mib * MIB_KIB)))
    if model is not None:
        with open(os.path.join(root, "proc", "device-tree", "model"), "w") as f:
            f.write(model + "\0")
    if release is not None:
        with open(os.path.join(root, "etc", "nv_tegra_release"), "w") as f:
            f.write(release + "\n")
    for pid, (comm, cmdline) in enumerate(processes, start=1000):
        os.makedirs(os.path.join(root, "proc", str(pid)))
        with open(os.path.join(root, "proc", str(pid), "comm"), "w") as f:
            f.write(comm + "\n")
        with open(os.path.join(root, "proc", str(pid), "cmdline"), "wb") as f:
            f.write(cmdline.replace(" ", "\0").encode() + b"\0")
    if graphical is not None:
        target = os.path.join(root, "etc", "systemd", "system", "default.target")
        if os.path.lexists(target):
            os.remove(target)
        os.symlink("/lib/systemd/system/{}.target".format(
            "graphical" if graphical else "multi-user"), target)
    return root


NANO_RELEASE = ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
                "DATE: Sat Feb 19 17:05:08 UTC 2022")
LXDE = (("Xorg", "/usr/lib/xorg/Xorg :0"), ("lxsession", "/usr/bin/lxsession -s LXDE"))


@pytest.fixture
def nano_2gb(tmp_path):
    """A Nano 2GB as its image ships: 1980 MiB, zram of half of it (990 MiB over four
    devices), the LXDE desktop running, 1270 MiB available."""
    def make(**changes):
        options = dict(model="NVIDIA Jetson Nano 2GB Developer Kit", release=NANO_RELEASE,
                       total_mib=1980, available_mib=1270, zram_mib=990, processes=LXDE,
                       graphical=True)
        options.update(changes)
        return fake_board(tmp_path / "root{}".format(len(os.listdir(str(tmp_path)))),
                          **options)
    return make


def rows(result, phase):
    return {row["item"]: row for row in result["rows"] if row["phase"] == phase}


def test_the_board_table_recognises_each_board():
    assert memoryplan.board_for("NVIDIA Jetson Nano 2GB Developer Kit", 1980)["key"] == \
        "nano-2gb"
    assert memoryplan.board_for("NVIDIA Jetson Nano Developer Kit", 3964)["key"] == "nano-4gb"
    # the 2GB module on the 4GB's carrier board: MemTotal tells them apart
    assert memoryplan.board_for("NVIDIA Jetson Nano Developer Kit", 1980)["key"] == "nano-2gb"
    assert memoryplan.board_for("NVIDIA Jetson Orin Nano Developer Kit", 7441)["key"] == \
        "orin-nano-8gb"
    assert memoryplan.board_for("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit "
                                "Super", 7578)["key"] == "orin-nano-8gb"
    assert memoryplan.board_for("NVIDIA Jetson Orin Nano Developer Kit", 3400) is None
    assert memoryplan.board_for("Raspberry Pi 4 Model B Rev 1.4", 3800) is None
    assert memoryplan.board_for(None, 1980) is None


def test_the_live_board_is_read_from_proc_and_etc(nano_2gb):
    reading = memoryplan.read_board(nano_2gb())
    assert reading["board"] == "nano-2gb" and reading["jetson"]
    assert reading["l4t"] == "32.7.1"
    assert reading["mem_total"] == pytest.approx(1980)
    assert reading["mem_available"] == pytest.approx(1270)
    assert reading["zram"] == pytest.approx(990)
    assert reading["swap_total"] == pytest.approx(990)
    assert reading["desktop_running"] and reading["graphical_target"]
    assert reading["desktop_kind"] == "desktop_lxde"
    assert not reading["daemon_running"]
    headless = memoryplan.read_board(nano_2gb(processes=(), graphical=False))
    assert not headless["desktop_running"] and headless["graphical_target"] is False


def test_nano_2gb_detector_only_fits(nano_2gb):
    result = memoryplan.plan(settings(), root=nano_2gb())
    assert result["board"]["name"] == "Jetson Nano 2GB"
    assert result["backend"] == "trt" and result["tensorrt"] == "8.2"
    assert result["tasks"] == ["yolox-nano"] and result["cameras"] == ["1280x720"]
    # engine.tactic_sources: auto on a Jetson: the build loads neither cuBLAS nor cuDNN...
    assert result["build_libraries"] == []
    build = rows(result, "build")
    assert not any("cuDNN" in item for item in build)
    assert build["child: workspace"]["mib"] == 256
    assert build["system as measured now (MemTotal - MemAvailable)"]["mib"] == \
        pytest.approx(710)
    # ...but TensorRT 8.2 may load them at run time all the same: counted, UNCONFIRMED
    run = rows(result, "run")
    assert run["cuDNN"]["mib"] == 406 and "UNCONFIRMED" in run["cuDNN"]["source"]
    assert run["CUDA context"]["mib"] == 225
    assert result["phases"]["build"]["total"] < result["limit_mib"]
    assert result["phases"]["run"]["total"] < result["limit_mib"]
    assert result["limit_mib"] == pytest.approx(1980 - 128)
    assert result["verdict"] == "fits" and result["advice"] == [] and not result["problems"]
    for row in result["rows"]:
        assert row["source"], row


def test_nano_2gb_detector_and_matcher(nano_2gb):
    alone = memoryplan.plan(settings(), root=nano_2gb())
    both = memoryplan.plan(settings("coarse-loftr"), root=nano_2gb())
    assert both["tasks"] == ["yolox-nano", "coarse-loftr"]
    run = rows(both, "run")
    assert "engine coarse-loftr: weights FP16 + activations" in run
    # one build at a time: the build phase is the larger build, not the sum
    assert both["phases"]["build"]["total"] == pytest.approx(alone["phases"]["build"]["total"])
    assert both["phases"]["run"]["total"] > alone["phases"]["run"]["total"]
    assert both["verdict"] == "fits"


def test_nano_2gb_with_cublas_and_cudnn_is_tight_on_zram(nano_2gb):
    result = memoryplan.plan(settings("coarse-loftr", tactic_sources="default"),
                             root=nano_2gb())
    assert result["build_libraries"] == ["cublas", "cudnn"]
    assert result["phases"]["build"]["verdict"] == "tight"
    assert result["verdict"] == "tight"
    assert any("fits only by swapping" in p for p in result["problems"])
    text = "\n".join(result["advice"])
    assert "engine.tactic_sources: auto" in text
    assert "sudo systemctl set-default multi-user.target" in text and "LXDE" in text
    assert "sudo fallocate -l 4G /var/swapfile" in text


def test_nano_2gb_without_swap_does_not_fit_and_says_what_to_change(nano_2gb):
    root = nano_2gb(zram_mib=0)
    result = memoryplan.plan(settings("coarse-loftr", tactic_sources="default"), root=root)
    assert result["verdict"] == "does not fit"
    assert result["phases"]["build"]["verdict"] == "does not fit"
    # and the build's pre-check (edge.backends.build) would refuse to start it
    assert any("pre-check will refuse" in p for p in result["problems"])
    text = "\n".join(result["advice"])
    for change in ("engine.tactic_sources: auto", "sudo fallocate -l 4G /var/swapfile",
                   "sudo systemctl enable nvzramconfig", "engine.workspace_mb to 128",
                   "set-default multi-user.target"):
        assert change in text, change
    lines = memoryplan.lines(result)
    assert any(line.startswith("memory   DOES NOT FIT") for line in lines)
    assert sum(line.startswith("change   ") for line in lines) == len(result["advice"])


def test_a_swap_file_with_zram_on_advises_turning_zram_off(nano_2gb):
    root = nano_2gb(swap_file_mib=4096, available_mib=400)
    result = memoryplan.plan(settings("coarse-loftr", tactic_sources="default"), root=root)
    assert result["disk_swap_mib"] == pytest.approx(4096)
    assert result["verdict"] == "tight"
    assert any("sudo systemctl disable nvzramconfig" in line for line in result["advice"])
    assert not any("fallocate" in line for line in result["advice"])


def test_a_budget_below_the_build_does_not_fit(nano_2gb):
    result = memoryplan.plan(settings(budget_mb=300), root=nano_2gb())
    assert result["verdict"] == "does not fit"
    assert any("over engine.budget_mb 300" in p for p in result["problems"])
    assert any("raise engine.budget_mb to at least" in line for line in result["advice"])


def test_a_running_daemon_is_not_counted_twice(nano_2gb):
    """With the service up, MemAvailable already lacks the daemon: the plan falls back to
    the published figures for the system and the desktop."""
    service = ("python3", "/opt/edge/venv/bin/python3 /usr/local/bin/edge run -c "
                          "/etc/edge/edge.yaml")
    root = nano_2gb(processes=LXDE + (service,), available_mib=300)
    result = memoryplan.plan(settings(), root=root)
    assert result["board"]["daemon_running"]
    run = rows(result, "run")
    assert run["L4T system, no desktop"]["mib"] == memoryplan.mib("system_nano")
    assert run["desktop (LXDE, running)"]["mib"] == memoryplan.mib("desktop_lxde")
    assert result["verdict"] == "fits"


def test_nano_4gb_recorded_tree(tmp_path):
    root = fake_board(tmp_path / "nano", None, None, total_mib=3964.3, available_mib=2290.7,
                      zram_mib=1982, processes=(("gnome-shell", "/usr/bin/gnome-shell"),),
                      graphical=True, base=os.path.join(DATA, "nano-jp46"))
    result = memoryplan.plan(settings("coarse-loftr"), root=root)
    assert result["board"]["key"] == "nano-4gb" and result["tensorrt"] == "8.2"
    assert result["verdict"] == "fits"


def test_orin_nano_8gb_fits_with_both_tasks(tmp_path):
    root = fake_board(tmp_path / "orin", None, None, total_mib=7441.6, available_mib=5399.2,
                      zram_mib=3720.8, zram_devices=6, graphical=True,
                      base=os.path.join(DATA, "orin-jp6"))
    result = memoryplan.plan(settings("coarse-loftr"), root=root)
    assert result["board"]["key"] == "orin-nano-8gb"
    assert result["tensorrt"] == "8.6"             # L4T R36.3: JetPack 6.0
    # from 8.6 the runtime needs no cuBLAS/cuDNN; the builder loads its kernel library
    assert result["run_libraries"] == [] and result["build_libraries"] == []
    assert not any(row["item"] in ("cuDNN", "cuBLAS / cuBLAS LT") for row in result["rows"])
    assert "child: TensorRT's builder kernel library" in rows(result, "build")
    assert "float32 frame copies" not in " ".join(rows(result, "run"))   # uint8 inputs
    assert result["verdict"] == "fits" and result["advice"] == []


def test_not_a_jetson_plans_onnx_runtime(tmp_path):
    root = fake_board(tmp_path / "pc", None, None, total_mib=16000, available_mib=12000)
    result = memoryplan.plan(settings("coarse-loftr"), root=root)
    assert result["backend"] == "ort" and result["tensorrt"] is None
    run = rows(result, "run")
    assert "ONNX Runtime session coarse-loftr" in run and "CUDA context" not in run
    assert result["verdict"] == "fits"


def test_simulated_boards_match_docs_memory_md():
    """docs/memory.md's totals are this module's plans for the boards as they ship."""
    with open(os.path.join(ROOT, "docs", "memory.md")) as f:
        docs = f.read()
    for key in ("nano-2gb", "nano-4gb", "orin-nano-8gb"):
        for matcher in (None, "coarse-loftr"):
            result = memoryplan.plan(settings(matcher), memoryplan.simulate(key))
            row = "| {} | {} | {:.0f} | {:.0f} | {} |".format(
                next(b["name"] for b in memoryplan.BOARDS if b["key"] == key),
                " + ".join(result["tasks"]), result["phases"]["build"]["total"],
                result["phases"]["run"]["total"], result["verdict"])
            assert row in docs, row


def test_trt_build_estimate():
    size = 3660092
    base = (memoryplan.mib("build_python") + memoryplan.mib("cuda_init") + 256) * 2 ** 20
    assert memoryplan.trt_build(size, 256) == base + 3 * size
    assert memoryplan.trt_build(size, 256, ("cublas", "cudnn")) == \
        base + 3 * size + (241 + 406) * 2 ** 20
    assert memoryplan.ort_build(size) == 64 * 2 ** 20 + 4 * size


CITATION = re.compile(r"[\w.-]+/[\w.-]+(#\d+| [\w./-]+\.(md|py|dts|sh))|docs?\b|\.dts\b|"
                      r"tegrastats|/proc/|engine\.|pipeline\.|edge\.backends")


@pytest.mark.parametrize("name", sorted(memoryplan.FIGURES))
def test_every_figure_has_a_source(name):
    value, text = memoryplan.FIGURES[name]
    assert isinstance(value, (int, float))
    assert "UNCONFIRMED" in text or "measured" in text or CITATION.search(text), text


def test_every_board_and_model_figure_has_a_source():
    for board in memoryplan.BOARDS:
        for key in ("model", "mem_total", "desktop"):
            text = board["sources"][key]
            assert "UNCONFIRMED" in text or CITATION.search(text), (board["key"], key, text)
        assert board["system"] in memoryplan.FIGURES
        assert board["desktop"] in memoryplan.FIGURES
    for name, model in memoryplan.MODELS.items():
        assert "estimated here" in model["source"], name
        assert "measured here" in model["ort_source"], name
