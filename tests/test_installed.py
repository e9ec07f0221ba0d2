"""`edge doctor` and `edge build` beside the installed service: without -c they read its config
(/etc/edge/edge.yaml) and fill its folders, not the caller's; as root they act as its user."""

import os
import subprocess
import sys
import tempfile

import pytest

from edge import cli, installed
from tests.conftest import MODELS, ROOT


@pytest.fixture
def service(tmp_path, monkeypatch):
    """An installed service in a temporary tree: its config, its folders, and a home of the
    caller's own that must stay empty. `edge build` adds a progress printer to the process's
    build listeners: it goes with the test."""
    from edge.backends import build
    monkeypatch.setattr(build, "_listeners", list(build._listeners))
    config = tmp_path / "etc" / "edge.yaml"
    config.parent.mkdir()
    config.write_text("source: test://?width=320&height=240\ndetector: yolox-nano\n")
    folders = {"model_dir": str(tmp_path / "cache" / "models"),
               "state_dir": str(tmp_path / "lib")}
    monkeypatch.setattr(installed, "CONFIG", str(config))
    monkeypatch.setattr(installed, "FOLDERS", folders)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("EDGE_MODEL_DIR", raising=False)
    return str(config), folders, str(home)


def test_build_and_doctor_without_c_use_the_installed_config_and_folders(service, capsys):
    config, folders, home = service
    assert cli.main(["build", "--mirror", MODELS]) == 0
    out = capsys.readouterr().out
    assert "config: {}".format(config) in out and "yolox-nano: engine for 320x240" in out, out
    engines = os.listdir(os.path.join(folders["state_dir"], "engines"))
    assert any(name.startswith("yolox-nano-320x240-") for name in engines), engines
    assert os.listdir(folders["model_dir"]) == ["yolox_nano.onnx"]
    assert cli.main(["doctor", "--backend", "ort", "--mirror", MODELS]) == 0
    out = capsys.readouterr().out
    assert "config: {}".format(config) in out
    assert [l for l in out.splitlines() if l.startswith("yolox-nano") and " ok " in l], out
    assert not any(l.startswith("coarse-loftr") for l in out.splitlines()), \
        "the installed config's cards, not every card"
    for own in (".cache/edge", ".local/state/edge"):      # the caller's defaults
        assert not os.path.exists(os.path.join(home, own)), own


def test_a_config_given_with_c_wins_and_flags_win_over_the_service_folders(service, tmp_path,
                                                                           capsys):
    own = tmp_path / "mine.yaml"
    own.write_text("detector: yolox-nano\n")
    state = str(tmp_path / "elsewhere")
    assert cli.main(["build", "-c", str(own), "--size", "160x120", "--state-dir", state,
                     "--mirror", MODELS]) == 0
    assert "config: {}".format(own) in capsys.readouterr().out
    assert os.listdir(os.path.join(state, "engines"))


def test_an_installed_config_this_user_may_not_read_says_what_to_do(service, capsys):
    config, _, _ = service
    os.chmod(config, 0)
    if os.access(config, os.R_OK):
        pytest.skip("root reads any file")
    assert cli.main(["doctor", "--backend", "ort"]) == 78
    assert "sudo" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_as_root_the_tools_become_the_owner_of_the_service_state_folder():
    """What doctor and build write as root must stay the service's: they switch to the user
    (and groups) owning the state folder first."""
    folder = tempfile.mkdtemp(prefix="edge-service-state-")
    try:
        os.chown(folder, 65534, 65534)
        probe = ("import os, sys; from edge import installed\n"
                 "name = installed.become_owner(sys.argv[1])\n"
                 "open(os.path.join(sys.argv[1], 'written'), 'w').close()\n"
                 "print(name, os.getuid(), os.geteuid(), os.getgid(), os.environ['HOME'])\n")
        out = subprocess.check_output([sys.executable, "-c", probe, folder], cwd=ROOT).decode()
        name, uid, euid, gid, home = out.split()
        assert (uid, euid, gid) == ("65534", "65534", "65534"), out
        assert os.stat(os.path.join(folder, "written")).st_uid == 65534
        root_folder = tempfile.mkdtemp(prefix="edge-root-state-")
        out = subprocess.check_output([sys.executable, "-c", probe, root_folder],
                                      cwd=ROOT).decode()
        assert out.split()[:3] == ["None", "0", "0"], "a root-owned folder changes nothing"
        os.unlink(os.path.join(root_folder, "written"))
        os.rmdir(root_folder)
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
