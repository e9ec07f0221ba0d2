"""Model files: pinned fetches from a mirror or a URL, and truncated or corrupt files refused."""

import functools
import glob
import hashlib
import http.server
import json
import os
import shutil
import threading

import pytest

from conftest import COCO8_VAL, MODELS, free_port, run_edge
from edge import cards, fetch, models
from edge.errors import ModelError, UnavailableError

YOLOX = cards.load("yolox-nano")
YOLOX_FILE = "yolox_nano.onnx"
YOLOX_SHA = YOLOX.model["sha256"]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def truncated_copy(folder, size=100000):
    """The yolox model in `folder`, cut after `size` bytes, as an interrupted copy leaves it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, YOLOX_FILE)
    with open(os.path.join(MODELS, YOLOX_FILE), "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(size))
    return path


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("edge: error:")]


def assert_user_error(rc, err, code):
    """Exit code, exactly one `edge: error:` line and no traceback; returns the line."""
    assert rc == code, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def no_temp_files(folder):
    return not glob.glob(os.path.join(folder, "*.part.*"))


# --- fetch from the mirror -------------------------------------------------------------------

def test_fetch_from_the_mirror(tmp_path):
    dest = str(tmp_path / "models" / YOLOX_FILE)     # the folder is created
    got = fetch.fetch(YOLOX.model["url"], YOLOX_SHA, dest, mirror=MODELS)
    assert got == dest
    assert sha256(dest) == YOLOX_SHA
    assert os.listdir(str(tmp_path / "models")) == [YOLOX_FILE]
    assert no_temp_files(str(tmp_path / "models"))


def test_a_second_fetch_is_a_no_op(tmp_path):
    dest = str(tmp_path / YOLOX_FILE)
    fetch.fetch(YOLOX.model["url"], YOLOX_SHA, dest, mirror=MODELS)
    os.utime(dest, ns=(1000000000, 1000000000))     # an old mtime a rewrite would change
    before = os.stat(dest)
    # the mirror is not even needed: a valid file is kept as it is
    fetch.fetch(YOLOX.model["url"], YOLOX_SHA, dest, mirror=str(tmp_path / "no-mirror"))
    after = os.stat(dest)
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert no_temp_files(str(tmp_path))


def test_the_mirror_is_searched_below_its_folder(tmp_path):
    mirror = tmp_path / "mirror" / "upstream" / "model"
    mirror.mkdir(parents=True)
    shutil.copyfile(os.path.join(MODELS, YOLOX_FILE), str(mirror / YOLOX_FILE))
    dest = str(tmp_path / "models" / YOLOX_FILE)
    fetch.fetch(YOLOX.model["url"], YOLOX_SHA, dest, mirror=str(tmp_path / "mirror"))
    assert sha256(dest) == YOLOX_SHA


def test_the_mirror_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.MIRROR_ENV, MODELS)
    dest = str(tmp_path / YOLOX_FILE)
    fetch.fetch("http://127.0.0.1:{}/x.onnx".format(free_port()), YOLOX_SHA, dest)
    assert sha256(dest) == YOLOX_SHA


# --- truncated files in the model folder -----------------------------------------------------

def test_ensure_detects_a_truncated_model(tmp_path):
    folder = str(tmp_path / "models")
    path = truncated_copy(folder)
    with pytest.raises(ModelError) as info:
        models.ensure(YOLOX, folder, mirror=MODELS)
    message = str(info.value)
    assert info.value.exit_code == 65
    assert "sha256 mismatch" in message and "`edge models fetch" in message
    assert path in message
    # ensure reports it and leaves the file alone: it is neither loaded nor silently replaced
    assert os.path.getsize(path) == 100000


def test_ensure_returns_a_good_model(model_dir):
    path = models.ensure(YOLOX, model_dir, fetch_missing=False)
    assert path == os.path.join(model_dir, YOLOX_FILE)


def test_ensure_without_fetching_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="edge models fetch yolox-nano"):
        models.ensure(YOLOX, str(tmp_path), fetch_missing=False)


def test_edge_run_refuses_a_truncated_model(tmp_path):
    folder = str(tmp_path / "models")
    truncated_copy(folder)
    out = tmp_path / "out.jsonl"
    rc, _, err = run_edge("run", "--model-dir", folder, "--detector", "yolox-nano", "--source",
                          COCO8_VAL, "--jsonl", str(out), "--backend", "ort")
    line = assert_user_error(rc, err, 65)
    assert "sha256 mismatch" in line and "edge models fetch" in line
    assert not out.exists() or out.read_text() == ""
    assert "engine yolox-nano" not in err       # never loaded


def test_models_fetch_replaces_a_truncated_file(tmp_path):
    folder = str(tmp_path / "models")
    path = truncated_copy(folder)
    rc, out, err = run_edge("models", "fetch", "yolox-nano", "--mirror", MODELS,
                            "--model-dir", folder)
    assert rc == 0, err
    assert "yolox-nano" in out and "ok" in out
    assert sha256(path) == YOLOX_SHA
    assert os.listdir(folder) == [YOLOX_FILE]


# --- refused sources -------------------------------------------------------------------------

def test_a_corrupt_file_in_the_mirror_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / YOLOX_FILE).write_bytes(b"\x00garbage" * 4096)
    folder = tmp_path / "models"
    with pytest.raises(ModelError) as info:
        fetch.fetch(YOLOX.model["url"], YOLOX_SHA, str(folder / YOLOX_FILE), mirror=str(mirror))
    assert info.value.exit_code == 65
    assert "sha256 mismatch" in str(info.value) and str(mirror) in str(info.value)
    assert os.listdir(str(folder)) == []


def test_a_corrupt_file_in_the_mirror_through_the_cli(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / YOLOX_FILE).write_bytes(b"not a model")
    folder = tmp_path / "models"
    rc, _, err = run_edge("models", "fetch", "yolox-nano", "--mirror", str(mirror),
                          "--model-dir", str(folder))
    assert "refused" in assert_user_error(rc, err, 65)
    assert not folder.exists() or os.listdir(str(folder)) == []


def test_a_file_missing_from_the_mirror_is_unavailable(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    folder = tmp_path / "models"
    with pytest.raises(UnavailableError) as info:
        fetch.fetch(YOLOX.model["url"], YOLOX_SHA, str(folder / YOLOX_FILE), mirror=str(mirror))
    assert info.value.exit_code == 69
    assert YOLOX_FILE in str(info.value) and str(mirror) in str(info.value)
    assert os.listdir(str(folder)) == []


def test_an_unreachable_url_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    url = "http://127.0.0.1:{}/x.onnx".format(free_port())    # nothing listens there
    folder = tmp_path / "models"
    with pytest.raises(UnavailableError) as info:
        fetch.fetch(url, YOLOX_SHA, str(folder / "x.onnx"), mirror=None)
    assert info.value.exit_code == 69
    assert url in str(info.value)
    assert os.listdir(str(folder)) == []


@pytest.fixture
def http_mirror():
    """A real HTTP server on loopback serving the shared models folder."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=MODELS)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:{}".format(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_a_download_over_http(tmp_path, monkeypatch, http_mirror):
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    dest = str(tmp_path / YOLOX_FILE)
    fetch.fetch(http_mirror + "/" + YOLOX_FILE, YOLOX_SHA, dest, mirror=None,
                progress=lambda *a, **k: None)
    assert sha256(dest) == YOLOX_SHA
    assert no_temp_files(str(tmp_path))


def test_a_download_of_the_wrong_file_is_refused(tmp_path, monkeypatch, http_mirror):
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    url = http_mirror + "/README.md"
    with pytest.raises(ModelError) as info:
        fetch.fetch(url, YOLOX_SHA, str(tmp_path / YOLOX_FILE), mirror=None,
                    progress=lambda *a, **k: None)
    assert url in str(info.value)
    assert os.listdir(str(tmp_path)) == []


def test_a_missing_url_is_unavailable(tmp_path, monkeypatch, http_mirror):
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    url = http_mirror + "/nosuch.onnx"          # HTTP 404
    with pytest.raises(UnavailableError) as info:
        fetch.fetch(url, YOLOX_SHA, str(tmp_path / "nosuch.onnx"), mirror=None,
                    progress=lambda *a, **k: None)
    assert url in str(info.value)
    assert os.listdir(str(tmp_path)) == []


# --- first use and model checks in `edge run` ------------------------------------------------

def test_edge_run_fetches_the_model_on_first_use(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    out = tmp_path / "out.jsonl"
    rc, _, err = run_edge("run", "--model-dir", str(folder), "--mirror", MODELS, "--detector",
                          "yolox-nano", "--source", COCO8_VAL, "--jsonl", str(out),
                          "--backend", "ort")
    assert rc == 0, err
    assert sha256(str(folder / YOLOX_FILE)) == YOLOX_SHA
    assert os.listdir(str(folder)) == [YOLOX_FILE]
    messages = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(messages) == 4
    assert sorted(m["frame"]["name"] for m in messages) == sorted(os.listdir(COCO8_VAL))


def test_a_pinned_file_that_is_not_onnx(tmp_path):
    garbage = b"this is not an ONNX model\n" * 100
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "garbage.onnx").write_bytes(garbage)
    card = tmp_path / "garbage.yaml"
    card.write_text(
        "name: garbage\ntask: detect\nfamily: yolox\n"
        "model:\n  file: garbage.onnx\n  url: https://example.com/garbage.onnx\n"
        "  sha256: {}\n"
        "input:\n  size: [416, 416]\nlabels: coco80\n".format(hashlib.sha256(garbage).hexdigest()))
    rc, _, err = run_edge("run", "--model-dir", str(folder), "--detector", str(card),
                          "--source", COCO8_VAL, "--backend", "ort")
    line = assert_user_error(rc, err, 65)
    assert "not a valid ONNX file" in line and "garbage" in line


def test_models_list_prints_both_cards(model_dir):
    rc, out, err = run_edge("models", "list", "--model-dir", model_dir)
    assert rc == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()
            and not line.startswith("model folder")}
    assert rows["yolox-nano"][1:] == ["detect", "yolox", YOLOX_FILE, "present"]
    assert rows["coarse-loftr"][1:] == ["match", "loftr-coarse", "coarse_loftr_teacher.onnx",
                                        "present"]
    assert "model folder: {}".format(model_dir) in out


def test_models_list_on_an_empty_folder(tmp_path):
    rc, out, err = run_edge("models", "list", "--model-dir", str(tmp_path))
    assert rc == 0, err
    assert out.count("missing") == 2
