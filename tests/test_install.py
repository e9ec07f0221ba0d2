"""tools/install-jetson: shellcheck-clean, and its --dry-run plans the right commands and
changes nothing (on this machine, which is not a Jetson, and on a simulated JetPack 4.6)."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_memoryplan import LXDE, NANO_RELEASE, fake_board

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "install-jetson")
TOUCHED = ("/etc/edge", "/opt/edge", "/etc/systemd/system/edge.service", "/usr/local/bin/edge",
           "/var/lib/edge", "/var/cache/edge")


def run(*args, env=None):
    environ = dict(os.environ)
    environ.update(env or {})
    return subprocess.run([SCRIPT] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30, env=environ)


def commands(stdout):
    """The planned commands: the lines a dry run prints with "+ "."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.fixture
def untouched():
    """Fails the test if the script created or removed any installed path."""
    before = {path: os.path.lexists(path) for path in TOUCHED}
    yield
    after = {path: os.path.lexists(path) for path in TOUCHED}
    assert after == before


@pytest.fixture
def jetson(tmp_path):
    """Files of a Jetson Nano 4GB on JetPack 4.6.1 (L4T R32.7.1), read instead of /proc, /etc."""
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Nano Developer Kit\0")
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, "
                       "EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        4059116 kB\nMemFree:          123456 kB\n"
                       "SwapTotal:       2029552 kB\nSwapFree:        2029552 kB\n")
    return {"EDGE_INSTALL_DT_MODEL": str(model), "EDGE_INSTALL_TEGRA_RELEASE": str(release),
            "EDGE_INSTALL_MEMINFO": str(meminfo)}


def python36():
    """A working Python 3.6 (JetPack 4.6's), or None."""
    candidates = [shutil.which("python3.6")] + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")))
    for path in candidates:
        if path and subprocess.run([path, "-c", "pass"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL).returncode == 0:
            return path
    return None


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_help():
    result = run("--help")
    assert result.returncode == 0
    assert "--dry-run" in result.stdout and "--uninstall" in result.stdout


def test_unknown_option_is_a_usage_error():
    result = run("--frobnicate")
    assert result.returncode == 2
    assert "unknown option --frobnicate" in result.stderr


def test_refuses_a_machine_that_is_not_a_jetson(untouched):
    result = run("--dry-run")
    assert result.returncode != 0
    assert "not a Jetson" in result.stderr
    assert "--force" in result.stderr
    assert commands(result.stdout) == []


def test_refuses_an_unsupported_l4t(jetson, tmp_path, untouched):
    release = tmp_path / "old_release"
    release.write_text("# R32 (release), REVISION: 4.4, GCID: 23942405, BOARD: t210ref\n")
    result = run("--dry-run", env=dict(jetson, EDGE_INSTALL_TEGRA_RELEASE=str(release)))
    assert result.returncode != 0
    assert "L4T R32.4.4" in result.stderr and "not supported" in result.stderr


def test_dry_run_plans_the_install_and_changes_nothing(untouched):
    result = run("--dry-run", "--force")
    assert result.returncode == 0, result.stderr
    planned = commands(result.stdout)
    text = "\n".join(planned)
    assert "apt-get update" in planned
    assert any(c.startswith("env DEBIAN_FRONTEND=noninteractive apt-get install") and
               "python3-venv" in c and "protobuf-compiler" in c for c in planned)
    assert "mosquitto" not in text                       # only with --with-mosquitto
    if subprocess.run(["id", "-u", "edge"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        assert any(c.startswith("useradd --system") and c.endswith(" edge") for c in planned)
    assert "-m venv --system-site-packages /opt/edge/venv" in text
    assert "opencv" not in text                          # never pip-install OpenCV on a Jetson
    assert "pip install --no-deps --upgrade {}".format(ROOT) in text
    assert "install -m 0644 {}/systemd/edge.service /etc/systemd/system/edge.service".format(
        ROOT) in text
    assert "ln -sfn /opt/edge/venv/bin/edge /usr/local/bin/edge" in planned
    # No /etc/edge/edge.yaml here: a first install leaves the service off until the camera
    # and broker are configured.
    assert "systemctl daemon-reload" in planned
    assert not any(c.startswith(("systemctl enable", "systemctl restart", "systemctl start"))
                   for c in planned), planned
    assert "not enabled or started" in result.stderr and "systemctl enable --now edge" in \
        result.stderr
    assert "Time per step" in result.stdout


@pytest.mark.parametrize("edited", [False, True])
def test_the_service_starts_only_once_its_config_was_edited(tmp_path, untouched, edited):
    """The shipped config names csi://0 and a local broker: kept as shipped, the service is
    neither enabled nor started; once edited (a camera chosen), it is both."""
    config = tmp_path / "edge.yaml"
    shutil.copy(os.path.join(ROOT, "systemd", "edge.yaml"), str(config))
    if edited:
        with open(str(config), "a") as f:
            f.write("source: /dev/video0\n")
    result = run("--dry-run", "--force", env={"EDGE_INSTALL_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    planned = commands(result.stdout)
    assert ("systemctl enable edge.service" in planned) == edited
    assert ("systemctl restart --no-block edge.service" in planned) == edited
    assert ("not enabled or started" in result.stderr) != edited


def test_dry_run_options(untouched, tmp_path):
    configured = tmp_path / "edge.yaml"
    configured.write_text("source: /dev/video0\ndetector: yolox-nano\n")
    result = run("--dry-run", "--force", "--no-start", "--with-mosquitto", "--no-jtop",
                 env={"EDGE_INSTALL_CONFIG": str(configured)})
    assert result.returncode == 0, result.stderr
    planned = commands(result.stdout)
    assert any("mosquitto" in c for c in planned)
    assert not any("jetson-stats" in c for c in planned)
    assert not any(c.startswith("systemctl restart") for c in planned)
    assert "systemctl enable edge.service" in planned


def test_dry_run_on_jetpack_46_pins_python36_versions(jetson, untouched):
    python = python36()
    if python is None:
        pytest.skip("no python3.6 to stand in for JetPack 4.6's system Python")
    result = run("--dry-run", "--add-swap", env=dict(jetson, PYTHON=python))
    assert result.returncode == 0, result.stderr
    assert "L4T: R32.7.1" in result.stderr
    text = result.stdout
    for pin in ("numpy==1.19.4", "onnx==1.11.0", "pycuda==2022.1", "pip<22"):
        assert "\n{}\n".format(pin) in text, pin
    assert "jetson-stats\\<5" in text
    # 3.9 GiB of RAM and 1.9 GiB of zram swap: --add-swap adds a 4 GiB swap file.
    for command in ("fallocate -l 4G /var/swapfile", "mkswap /var/swapfile",
                    "swapon /var/swapfile"):
        assert command in commands(text)
    assert "/var/swapfile\\ none\\ swap\\ sw\\ 0\\ 0 >> /etc/fstab" in text


@pytest.fixture
def cuda(tmp_path):
    """A CUDA toolkit folder with an nvcc, as JetPack installs it in /usr/local/cuda."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 10.2'\n")
    nvcc.chmod(0o755)
    return {"EDGE_INSTALL_CUDA_HOME": str(tmp_path / "cuda")}


def test_pycuda_is_built_against_the_installed_numpy(jetson, cuda, untouched):
    """pycuda 2022.1's isolated build wants numpy 1.12.1 on Python 3.6, which has no aarch64
    wheel and does not compile on Ubuntu 18.04: it must build without isolation, after
    numpy, setuptools and wheel are in the venv."""
    result = run("--dry-run", env=dict(jetson, **cuda))
    assert result.returncode == 0, result.stderr
    planned = commands(result.stdout)
    pip = "/opt/edge/venv/bin/python -m pip install --constraint /opt/edge/constraints.txt"
    numpy = next(i for i, c in enumerate(planned) if c.startswith(pip + " numpy\\>=1.13"))
    tools = planned.index(pip + " --upgrade setuptools wheel")
    pycuda = [i for i, c in enumerate(planned) if "pycuda" in c]
    assert len(pycuda) == 1 and numpy < tools < pycuda[0]
    line = planned[pycuda[0]]
    cuda_home = cuda["EDGE_INSTALL_CUDA_HOME"]
    assert line.startswith("env PATH={}/bin:".format(cuda_home))
    assert "CPATH={}/include".format(cuda_home) in line and "CUDA_ROOT=" + cuda_home in line
    assert line.endswith(pip + " --no-build-isolation pycuda\\>=2020.1")
    assert "UNCONFIRMED" in result.stderr          # the build time is an estimate


def test_jetpack_46_python36_pins_what_the_pycuda_build_uses(jetson, cuda, untouched):
    python = python36()
    if python is None:
        pytest.skip("no python3.6 to stand in for JetPack 4.6's system Python")
    result = run("--dry-run", env=dict(jetson, PYTHON=python, **cuda))
    assert result.returncode == 0, result.stderr
    for pin in ("setuptools<60", "wheel<0.38", "numpy==1.19.4", "pycuda==2022.1"):
        assert "\n{}\n".format(pin) in result.stdout, pin


def test_jetpack_46_r32_6_is_refused_with_the_upgrade_command(jetson, tmp_path, untouched):
    """JetPack 4.6 (L4T R32.6.1) ships TensorRT 8.0, which the backend refuses: the service
    would exit 78 at its first start. The installer says so and how to upgrade in place."""
    release = tmp_path / "r32_6"
    release.write_text("# R32 (release), REVISION: 6.1, GCID: 27863751, BOARD: t210ref, "
                       "EABI: aarch64, DATE: Mon Jul 26 19:20:30 UTC 2021\n")
    result = run("--dry-run", env=dict(jetson, EDGE_INSTALL_TEGRA_RELEASE=str(release)))
    assert result.returncode != 0
    assert commands(result.stdout) == []
    errors = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1
    assert "L4T R32.6.1 (JetPack 4.6) ships TensorRT 8.0" in errors[0]
    assert ("sudo sed -i 's/r32\\.6/r32.7/g' /etc/apt/sources.list.d/nvidia-l4t-apt-source.list "
            "&& sudo apt-get update && sudo apt-get dist-upgrade") in errors[0]
    forced = run("--dry-run", "--force", env=dict(jetson, EDGE_INSTALL_TEGRA_RELEASE=str(release)))
    assert forced.returncode == 0 and "TensorRT 8.0" in forced.stderr


def test_with_tests_installs_what_the_gpu_tests_need_and_no_opencv(jetson, cuda, untouched):
    """`tools/test tests/gpu` on the device runs in the service's venv: the test extra and
    ONNX Runtime (the reference) go there, never opencv-python (it would shadow JetPack's)."""
    result = run("--dry-run", "--with-tests", env=dict(jetson, **cuda))
    assert result.returncode == 0, result.stderr
    planned = commands(result.stdout)
    assert any("apt-get install" in c and "mosquitto" in c for c in planned)
    pip = "/opt/edge/venv/bin/python -m pip install --constraint /opt/edge/constraints.txt"
    assert pip + " {}\\[test\\] onnxruntime\\>=1.10".format(ROOT) in planned
    assert "opencv" not in result.stdout


def test_low_memory_without_add_swap_prints_the_commands(jetson, untouched):
    result = run("--dry-run", env=jetson)
    assert result.returncode == 0, result.stderr
    assert "sudo fallocate -l 4G /var/swapfile" in result.stderr
    assert "/var/swapfile none swap sw 0 0" in result.stderr
    assert not any("swapfile" in c for c in commands(result.stdout))


def test_uninstall_keep_data(untouched):
    result = run("--uninstall", "--dry-run", "--force", "--keep-data")
    assert result.returncode == 0, result.stderr
    planned = commands(result.stdout)
    assert "systemctl disable --now edge.service" in planned
    assert "rm -f /etc/systemd/system/edge.service" in planned
    assert "rm -f /usr/local/bin/edge" in planned
    assert any(c.startswith("rm -rf /opt/edge") for c in planned)
    assert "userdel edge" in planned
    assert not any("/var/lib/edge" in c or "/var/cache/edge" in c or "/etc/edge" in c
                   for c in planned)


def test_uninstall_purge(untouched):
    result = run("--uninstall", "--dry-run", "--force", "--purge")
    assert result.returncode == 0, result.stderr
    assert "rm -rf /var/lib/edge /var/cache/edge /etc/edge" in commands(result.stdout)


def test_data_options_need_uninstall():
    result = run("--dry-run", "--force", "--purge")
    assert result.returncode == 2


@pytest.fixture
def nano_2gb(tmp_path):
    """A Nano 2GB without swap (zram turned off), LXDE running: files the installer reads
    (device tree, L4T release, meminfo) and the tree the memory plan reads. PYTHON is this
    test's Python, which has PyYAML: a dry run plans with the checkout, not the venv."""
    root = fake_board(tmp_path / "root", "NVIDIA Jetson Nano 2GB Developer Kit", NANO_RELEASE,
                      total_mib=1980, available_mib=1270, processes=LXDE, graphical=True)
    return {"EDGE_INSTALL_ROOT": root, "PYTHON": sys.executable,
            "EDGE_INSTALL_DT_MODEL": os.path.join(root, "proc", "device-tree", "model"),
            "EDGE_INSTALL_TEGRA_RELEASE": os.path.join(root, "etc", "nv_tegra_release"),
            "EDGE_INSTALL_MEMINFO": os.path.join(root, "proc", "meminfo")}


def test_a_config_that_does_not_fit_the_board_is_a_loud_warning(nano_2gb, tmp_path, untouched):
    """cuBLAS and cuDNN in the build, both tasks, no swap: the plan does not fit a Nano 2GB.
    The installer says so, with what to change, and still succeeds."""
    config = tmp_path / "edge.yaml"
    config.write_text("source: /dev/video0\ndetector: yolox-nano\nmatcher: coarse-loftr\n"
                      "engine:\n  tactic_sources: default\n")
    result = run("--dry-run", env=dict(nano_2gb, EDGE_INSTALL_CONFIG=str(config)))
    assert result.returncode == 0, result.stderr
    assert "== memory plan" in result.stderr
    assert "    board    Jetson Nano 2GB (NVIDIA Jetson Nano 2GB Developer Kit)" in result.stderr
    assert "    memory   DOES NOT FIT: build: " in result.stderr
    warning = next(l for l in result.stderr.splitlines() if "DOES NOT FIT THIS BOARD" in l)
    assert warning.startswith("install-jetson: warning: *** {}".format(config))
    assert "sudo edge doctor --memory" in warning
    changes = [l.strip() for l in result.stderr.splitlines() if l.strip().startswith("change ")]
    text = "\n".join(changes)
    assert "engine.tactic_sources: auto" in text and "/var/swapfile" in text
    assert "set-default multi-user.target" in text
    # the plan changes nothing: no command of its own
    assert not any("edge.doctor" in c for c in commands(result.stdout))


def test_the_shipped_config_fits_a_nano_2gb(nano_2gb, untouched):
    """A first install plans the config it installs (systemd/edge.yaml): it fits."""
    result = run("--dry-run", env=nano_2gb)
    assert result.returncode == 0, result.stderr
    assert "    memory   fits" in result.stderr
    assert "install-jetson: memory plan: {}/systemd/edge.yaml fits this board".format(ROOT) in \
        result.stderr
    assert "DOES NOT FIT" not in result.stderr
