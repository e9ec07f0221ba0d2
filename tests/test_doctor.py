"""edge doctor: versions, engines built or loaded, outputs checked against references."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_edge
from tests.test_memoryplan import LXDE, NANO_RELEASE, fake_board


def test_doctor_checks_every_card_on_the_samples(tmp_path, model_dir):
    rc, out, err = run_edge("doctor", "--backend", "ort", "--model-dir", model_dir,
                            "--state-dir", str(tmp_path))
    assert rc == 0, out + err
    assert "backend  backend=ort" in out and "python" in out
    lines = [l for l in out.splitlines() if l.startswith(("yolox-nano", "coarse-loftr"))]
    assert len(lines) == 2 and all(" ok " in l and "latency p50" in l for l in lines), out
    # the memory plan of this host (not a Jetson: ONNX Runtime), a section of its own
    assert "memory   fits" in out, out
    assert any(l.startswith("  run   ONNX Runtime session yolox-nano") for l in out.splitlines())


def test_doctor_reports_an_engine_that_disagrees(tmp_path, model_dir):
    """A reference that no longer matches (another model, a broken engine) fails the check."""
    cards = tmp_path / "engines"
    shutil.copytree(os.path.join(ROOT, "engines"), str(cards))
    path = cards / "samples" / "reference-outputs.json"
    stored = json.loads(path.read_text())
    stored["yolox-nano"]["detections"][0][0] += 25.0          # a box edge 25 px away
    path.write_text(json.dumps(stored))
    rc, out, err = run_edge("doctor", "yolox-nano", "--backend", "ort", "--model-dir",
                            model_dir, "--state-dir", str(tmp_path),
                            env={"EDGE_CARDS": str(cards)})
    assert rc == 1, out + err
    assert "FAIL" in out and "box edges within 25.00 px" in out


def nano_2gb(folder, zram_mib=990):
    """A Nano 2GB as its image ships: LXDE running, zram of half its 1980 MiB (or none)."""
    return fake_board(folder, "NVIDIA Jetson Nano 2GB Developer Kit", NANO_RELEASE,
                      total_mib=1980, available_mib=1270, zram_mib=zram_mib, processes=LXDE,
                      graphical=True)


def memory(*args, env=None):
    """`python -m edge.doctor --memory ARGS`: (returncode, stdout, stderr)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "edge.doctor", "--memory"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                          env=full_env, cwd=ROOT, universal_newlines=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_doctor_memory_prints_the_plan_and_passes_when_it_fits(tmp_path):
    root = nano_2gb(tmp_path / "root")
    shipped = os.path.join(ROOT, "systemd", "edge.yaml")       # yolox-nano on csi://0
    rc, out, err = memory("-c", shipped, "--root", root)
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "config   " + shipped
    assert lines[1].startswith("board    Jetson Nano 2GB (NVIDIA Jetson Nano 2GB Developer Kit), "
                               "1980 MiB RAM, swap 990 MiB (zram 990)")
    assert "desktop running" in lines[1]
    assert "yolox-nano on TensorRT 8.2, tactic_sources auto" in lines[2]
    # every figure with its source
    cuda = next(l for l in lines if l.startswith("  run   CUDA context"))
    assert "225 MiB" in cuda and "wang-xinyu/tensorrtx#1160" in cuda
    assert "memory   fits" in lines
    assert not any(l.startswith("change   ") for l in lines)


def test_doctor_memory_says_what_does_not_fit_and_exits_1(tmp_path):
    root = nano_2gb(tmp_path / "root", zram_mib=0)
    config = tmp_path / "edge.yaml"
    config.write_text("source: csi://0\ndetector: yolox-nano\nmatcher: coarse-loftr\n"
                      "engine:\n  tactic_sources: default\n")
    rc, out, err = memory("-c", str(config), "--root", root)
    assert rc == 1, out + err
    verdict = next(l for l in out.splitlines() if l.startswith("memory   DOES NOT FIT"))
    assert "build: 1964 MiB is over the 1852 MiB" in verdict      # 710 MiB in use now
    assert "pre-check will refuse to start" in verdict
    changes = [l for l in out.splitlines() if l.startswith("change   ")]
    text = "\n".join(changes)
    assert "engine.tactic_sources: auto" in text
    assert "sudo fallocate -l 4G /var/swapfile" in text
    assert "sudo systemctl set-default multi-user.target" in text
    assert "memory   the configuration does not fit this board" in out
    # the plan as data
    rc, out, _ = memory("-c", str(config), "--root", root, "--json")
    plan = json.loads(out)
    assert rc == 1 and plan["verdict"] == "does not fit"
    assert all(set(row) >= {"item", "mib", "source", "phase"} for row in plan["rows"])


def test_doctor_memory_reports_a_bad_config(tmp_path):
    config = tmp_path / "edge.yaml"
    config.write_text("engine:\n  workspace_mb: lots\n")
    rc, out, err = memory("-c", str(config))
    assert rc == 78 and "engine.workspace_mb" in err


def cli_has_memory_flag():
    rc, out, _ = run_edge("doctor", "--help")
    return rc == 0 and "--memory" in out


def test_edge_doctor_memory_flag(tmp_path):
    """`edge doctor --memory`: the same plan and exit status through the command line."""
    if not cli_has_memory_flag():
        pytest.skip("edge/cli.py does not pass --memory to edge.doctor.memory yet")
    root = nano_2gb(tmp_path / "root", zram_mib=0)
    config = tmp_path / "edge.yaml"
    config.write_text("source: csi://0\ndetector: yolox-nano\nengine:\n"
                      "  tactic_sources: default\n")
    rc, out, err = run_edge("doctor", "--memory", "-c", str(config),
                            env={"EDGE_MEMORY_ROOT": root})
    assert rc == 1, out + err
    assert "memory   DOES NOT FIT" in out and "change   " in out
    rc, out, err = run_edge("doctor", "--memory", "-c",
                            os.path.join(ROOT, "systemd", "edge.yaml"),
                            env={"EDGE_MEMORY_ROOT": nano_2gb(tmp_path / "ok")})
    assert rc == 0 and "memory   fits" in out, out + err
