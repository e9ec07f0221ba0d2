"""Faults injected for real into `edge run` processes: a camera stream that dies and comes
back, damaged video files and images, damaged engines and models, a full disk, consumers that
cannot keep up, SIGKILL at random moments.

`python tests/test_faults.py serve-mjpeg PORT` is the MJPEG camera the stream tests run and
kill (a separate process, as a network camera is).
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:       # run as a script: the MJPEG camera
    sys.path.insert(0, ROOT)

from tools.soak import PersistentSubscriber, read_jsonl, start_edge, stop_edge  # noqa: E402

COCO = os.path.join(os.path.dirname(ROOT), "shared", "data", "coco8", "images", "val")
PAIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "middlebury-motorcycle")


# --- helpers ---------------------------------------------------------------------------------

def log_of(folder, name="edge.log"):
    with open(os.path.join(str(folder), name), errors="replace") as f:
        return f.read()


def wait_until(predicate, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.05)
    return predicate()


def run(tmp_path, args, config="", timeout=120):
    """`edge run ARGS` to the end: (exit status, log text)."""
    log = "run-{}.log".format(time.monotonic_ns())
    proc = start_edge(str(tmp_path), args, config, log_name=log)
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log_of(tmp_path, log)


def error_lines(log):
    return [l for l in log.splitlines() if l.startswith("edge: error:")]


def health_of(sub):
    reports = sub.payloads("health")
    return reports[-1] if reports else None


# --- a live camera that disappears and returns --------------------------------------------

def serve_mjpeg(port):
    """An MJPEG-over-HTTP camera: multipart/x-mixed-replace JPEGs of a moving square, 20 fps."""
    import http.server
    import socketserver

    class Camera(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            index = 0
            try:
                while True:
                    image = np.zeros((240, 320, 3), np.uint8)
                    image[:, :, 0] = np.linspace(0, 255, 320, dtype=np.uint8)[None, :]
                    x = (index * 7) % 280
                    image[100:140, x:x + 40] = 255
                    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                    index += 1
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    Server(("127.0.0.1", port), Camera).serve_forever()


def start_camera(port):
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve-mjpeg",
                             str(port)], cwd=ROOT)
    import socket
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("the MJPEG camera did not start on port {}".format(port))


CAMERA_PASSWORD = "pw-of-the-camera"


def test_http_camera_that_disappears_and_returns_is_reopened(tmp_path, broker, model_dir):
    from tests.conftest import free_port
    port = free_port()
    camera = start_camera(port)
    sub = PersistentSubscriber(broker.port, ["edge/cam/health"], persistent=False).start()
    jsonl = str(tmp_path / "out.jsonl")
    proc = start_edge(str(tmp_path), [
        "--source", "http://cam:{}@127.0.0.1:{}/stream.mjpg".format(CAMERA_PASSWORD, port),
        "--detector", "yolox-nano",
        "--model-dir", model_dir, "--mqtt", broker.url, "--device-id", "cam",
        "--jsonl", jsonl], "health: {interval: 1}\n")
    try:
        assert wait_until(lambda: len(read_jsonl(jsonl)) >= 5, 60, proc), log_of(tmp_path)
        camera.kill()            # the camera vanishes: power cut, cable, reboot
        camera.wait()
        assert wait_until(lambda: (health_of(sub) or {}).get("source", {}).get("state") ==
                          "reconnecting", 20, proc), log_of(tmp_path)
        report = health_of(sub)
        assert report["state"] == "degraded" and report["source"]["error"]
        time.sleep(1.5)
        before = len(read_jsonl(jsonl))
        camera = start_camera(port)
        assert wait_until(lambda: (health_of(sub) or {}).get("source", {}).get("state") ==
                          "open" and health_of(sub)["source"]["reopens"] >= 1, 30, proc), \
            log_of(tmp_path)
        assert wait_until(lambda: len(read_jsonl(jsonl)) >= before + 5, 30, proc), \
            "messages resume after the camera returns"
        assert proc.poll() is None, "the daemon never exits on a camera fault"
        log = log_of(tmp_path)
        assert "reopening in" in log and "reopened" in log
        assert "Traceback" not in log
        assert "cam:***@127.0.0.1" in log and CAMERA_PASSWORD not in log, \
            "the camera's password never reaches the log"
        assert CAMERA_PASSWORD not in json.dumps(report)
        assert stop_edge(proc) == 0, log_of(tmp_path)
    finally:
        stop_edge(proc)
        camera.kill()
        sub.close()


# --- damaged files -------------------------------------------------------------------------

def write_clip(path, frames=16):
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    rng = np.random.default_rng(1)
    for i in range(frames):
        image = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)   # large JPEGs per frame
        cv2.rectangle(image, (10 + 10 * i, 60), (70 + 10 * i, 120), (255, 255, 255), -1)
        writer.write(image)
    writer.release()


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_video_publishes_what_decodes_and_ends_cleanly(tmp_path, model_dir, damage):
    clip = str(tmp_path / "clip.avi")
    write_clip(clip)
    size = os.path.getsize(clip)
    with open(clip, "r+b") as f:
        if damage == "truncated":
            f.truncate(size * 55 // 100)
        else:
            f.seek(size // 2)
            # Seeded: the damage always breaks one frame's data where later frames decode
            # (FFmpeg conceals some random damage, and the test must not depend on luck).
            f.write(np.random.default_rng(2).bytes(size // 5))
    jsonl = str(tmp_path / "out.jsonl")
    rc, log = run(tmp_path, ["--source", clip, "--detector", "yolox-nano", "--model-dir",
                             model_dir, "--jsonl", jsonl])
    assert rc == 0, log
    frames = [m["frame"]["index"] for m in read_jsonl(jsonl) if "frame" in m]   # no events
    assert "Traceback" not in log and not error_lines(log)
    assert "truncated or corrupt" in log
    if damage == "truncated":
        assert 0 < len(frames) < 16 and frames == list(range(len(frames))), frames
        return
    # Overwritten in the middle: the frames that decode after the damage are published too,
    # at their place in the file (the gap is the frames skipped, counted and logged).
    first_gap = next(i for i, f in enumerate(frames) if f != i)
    skipped = frames[first_gap] - first_gap
    assert 0 < first_gap and 0 < skipped <= 25 and len(frames) > first_gap, frames
    assert frames == sorted(set(frames)) and len(frames) < 16, frames
    assert "do not decode (damaged); skipped" in log, log
    from edge.frames import Frame
    from edge.sources import open_source
    source = open_source(clip)       # health's source.skipped reads this count
    source.open()
    frame = Frame(0, (240, 320, 3))
    while source.read_into(frame):
        pass
    source.close()
    assert source.skipped == skipped


def test_video_file_where_nothing_decodes_is_a_clear_error(tmp_path, model_dir):
    clip = str(tmp_path / "clip.avi")
    write_clip(clip, 4)
    # Seeded noise: os.urandom now and then made bytes from which the codec got a frame.
    noise = np.random.default_rng(7).integers(0, 256, os.path.getsize(clip), dtype=np.uint8)
    with open(clip, "r+b") as f:
        f.seek(0)
        f.write(noise.tobytes())
    assert not cv2.VideoCapture(clip).read()[0], "the noise must hold no frame"
    rc, log = run(tmp_path, ["--source", clip, "--detector", "yolox-nano", "--model-dir",
                             model_dir, "--jsonl", str(tmp_path / "out.jsonl")])
    assert rc == 66, log
    assert len(error_lines(log)) == 1 and clip in error_lines(log)[0], log
    assert "Traceback" not in log


def test_unreadable_images_are_skipped_counted_and_named_once(tmp_path, broker, model_dir):
    folder = tmp_path / "shots"
    folder.mkdir()
    good = sorted(os.listdir(COCO))[:2]
    for name in good:
        shutil.copy(os.path.join(COCO, name), str(folder / name))
    (folder / "a-empty.jpg").write_bytes(b"")
    (folder / "b-text.png").write_text("this is not a picture\n")
    whole = open(os.path.join(COCO, good[0]), "rb").read()
    (folder / "c-truncated.jpg").write_bytes(whole[:len(whole) // 2])
    bad = ["a-empty.jpg", "b-text.png", "c-truncated.jpg"]
    sub = PersistentSubscriber(broker.port, ["edge/shots/health"], persistent=False).start()
    jsonl = str(tmp_path / "out.jsonl")
    # Looping over the folder for 60 frames keeps the run longer than a health interval, so
    # a report after the first pass is the retained one.
    rc, log = run(tmp_path, ["--source", "images://{}?loop=1".format(folder), "--detector",
                             "yolox-nano", "--model-dir", model_dir, "--mqtt", broker.url,
                             "--device-id", "shots", "--jsonl", jsonl, "--max-frames", "60"],
                  "health: {interval: 1}\n")
    try:
        assert rc == 0, log
        names = [m["frame"]["name"] for m in read_jsonl(jsonl) if "frame" in m]
        assert len(names) == 60 and set(names) == set(good), names
        for name in bad:
            lines = [l for l in log.splitlines() if "skipped image" in l and name in l]
            assert len(lines) == 1, (name, log)
        assert "Premature end of JPEG" not in log, "the truncated JPEG is never decoded"
        assert sub.wait_for(lambda: health_of(sub) is not None, 10)
        assert health_of(sub)["source"]["skipped"] >= len(bad), health_of(sub)
    finally:
        sub.close()


def png_bomb(path, width, height):
    """A valid grey PNG of width x height black pixels: a few hundred KB on disk, width x
    height x 3 bytes once decoded to BGR."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)                 # filter byte + a row of black
    idat = b"".join([packer.compress(row) for _ in range(height)] + [packer.flush()])
    with open(str(path), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
            ">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", idat) +
            chunk(b"IEND", b""))


def run_measured(args, timeout=120):
    """`edge run ARGS` in a process of its own: (exit status, stderr, peak RSS in MiB)."""
    probe = ("import resource, subprocess, sys\n"
             "p = subprocess.run([sys.executable, '-m', 'edge', 'run'] + sys.argv[1:], "
             "stderr=subprocess.PIPE)\n"
             "sys.stderr.buffer.write(p.stderr)\n"
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    proc = subprocess.run([sys.executable, "-c", probe] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, cwd=ROOT)
    rc, kib = proc.stdout.decode().split()[-2:]
    return int(rc), proc.stderr.decode(errors="replace"), int(kib) / 1024.0


def test_decompression_bombs_are_refused_from_their_header(tmp_path, model_dir):
    """A 0.4 MB PNG of 20000 x 20000 pixels (1.2 GB decoded) in an image folder is skipped,
    counted and named from its header, never decoded; as a reference it is refused."""
    folder = tmp_path / "shots"
    folder.mkdir()
    good = sorted(os.listdir(COCO))[:2]
    for name in good:
        shutil.copy(os.path.join(COCO, name), str(folder / name))
    png_bomb(folder / "bomb.png", 20000, 20000)
    assert os.path.getsize(str(folder / "bomb.png")) < 1 << 20
    jsonl = str(tmp_path / "out.jsonl")
    rc, err, peak_mb = run_measured(["--source", str(folder), "--detector", "yolox-nano",
                                     "--model-dir", model_dir, "--jsonl", jsonl, "--state-dir",
                                     str(tmp_path / "state")])
    assert rc == 0, err
    assert sorted(m["frame"]["name"] for m in read_jsonl(jsonl) if "frame" in m) == good
    lines = [l for l in err.splitlines() if "skipped image" in l and "bomb.png" in l]
    assert len(lines) == 1 and "20000x20000 pixels, over the limit" in lines[0] and \
        "max_image_pixels" in lines[0], err
    print("peak RSS with the bomb in the folder: {:.0f} MiB".format(peak_mb))
    assert peak_mb < 800, "the bomb was decoded"
    rc, err, peak_mb = run_measured(["--source", os.path.join(PAIR, "motorcycle_right.png"),
                                     "--matcher", "coarse-loftr", "--reference",
                                     str(folder / "bomb.png"), "--model-dir", model_dir,
                                     "--state-dir", str(tmp_path / "state")])
    lines = error_lines(err)
    assert rc == 66 and len(lines) == 1 and "bomb.png: 20000x20000 pixels" in lines[0], err
    assert peak_mb < 800, "the reference was decoded before it was refused"


# --- engines and models -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_state(tmp_path_factory, model_dir):
    """A state folder holding the yolox-nano engine for 320x240 frames, built by edge run."""
    state = tmp_path_factory.mktemp("built-state")
    rc, log = run(state, ["--source", "test://?width=320&height=240&frames=1", "--detector",
                          "yolox-nano", "--model-dir", model_dir, "--state-dir",
                          str(state / "state")])
    assert rc == 0, log
    return str(state / "state")


def engine_files(state):
    return sorted(p for p in glob.glob(os.path.join(state, "engines", "yolox-nano-*.onnx"))
                  if not p.endswith(".onnx.onnx"))


def side_file_ok(path):
    from edge.backends.cache import EngineCache
    meta = json.load(open(path + ".json"))
    return EngineCache(os.path.dirname(path)).lookup(path, meta["key"])


def damage_engine(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    elif how == "other-version":
        # Built by another onnxruntime: its side file carries that build's key and material.
        import hashlib
        meta = json.load(open(path + ".json"))
        meta["material"]["backend"]["onnxruntime"] = "0.0.1"
        text = json.dumps(meta["material"], sort_keys=True, separators=(",", ":"))
        meta["key"] = hashlib.sha256(text.encode()).hexdigest()
        json.dump(meta, open(path + ".json", "w"))
    else:
        # A file another version wrote under a side file that matches it (size, sha256, key):
        # only loading it can tell (TensorRT: "serialized engine version mismatch").
        import hashlib
        data = b"\x00engine of another version\x00" * 1000
        open(path, "wb").write(data)
        meta = json.load(open(path + ".json"))
        meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        json.dump(meta, open(path + ".json", "w"))


@pytest.mark.parametrize("how", ["truncated", "other-version", "header-mismatch"])
def test_damaged_or_foreign_engine_is_rebuilt_by_edge_run(tmp_path, built_state, model_dir,
                                                            how):
    state = str(tmp_path / "state")
    shutil.copytree(built_state, state)
    path = engine_files(state)[0]
    damage_engine(path, how)
    jsonl = str(tmp_path / "out.jsonl")
    rc, log = run(tmp_path, ["--source", "test://?width=320&height=240&frames=3",
                             "--detector", "yolox-nano", "--model-dir", model_dir,
                             "--state-dir", state, "--jsonl", jsonl])
    assert rc == 0, log
    assert "rebuilding" in log and "built in" in log, log
    assert len(read_jsonl(jsonl)) == 3
    assert "Traceback" not in log
    assert engine_files(state) == [path] and side_file_ok(path)


def corrupt_copy(model_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in os.listdir(model_dir):
        shutil.copy(os.path.join(model_dir, name), str(models / name))
    return str(models)


def test_model_file_changed_on_disk_exits_65_with_one_line(tmp_path, model_dir):
    models = corrupt_copy(model_dir, tmp_path)
    path = os.path.join(models, "yolox_nano.onnx")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xde\xad\xbe\xef" * 64)
    rc, log = run(tmp_path, ["--source", "test://?frames=2", "--detector", "yolox-nano",
                             "--model-dir", models, "--jsonl", str(tmp_path / "o.jsonl")])
    assert rc == 65, log
    lines = error_lines(log)
    assert len(lines) == 1 and "sha256 mismatch" in lines[0] and path in lines[0], log
    assert "Traceback" not in log


def test_corrupt_onnx_pinned_by_its_card_exits_65_with_one_line(tmp_path, model_dir):
    """A card whose sha256 pins a truncated ONNX file: the hash matches, the parse fails."""
    import hashlib
    import yaml
    models = str(tmp_path / "models")
    os.makedirs(models)
    data = open(os.path.join(model_dir, "yolox_nano.onnx"), "rb").read()[:200000]
    open(os.path.join(models, "broken.onnx"), "wb").write(data)
    card = yaml.safe_load(open(os.path.join(ROOT, "engines", "yolox-nano.yaml")))
    card["name"] = "broken-nano"
    card["model"] = {"file": "broken.onnx", "url": "https://example.invalid/broken.onnx",
                     "sha256": hashlib.sha256(data).hexdigest()}
    card_path = str(tmp_path / "broken-nano.yaml")
    yaml.safe_dump(card, open(card_path, "w"))
    shutil.copy(os.path.join(ROOT, "engines", "labels", "coco80.txt"), str(tmp_path))
    rc, log = run(tmp_path, ["--source", "test://?frames=2", "--detector", card_path,
                             "--model-dir", models, "--jsonl", str(tmp_path / "o.jsonl")])
    assert rc == 65, log
    lines = error_lines(log)
    assert len(lines) == 1 and "not a valid ONNX file" in lines[0], log
    assert "Traceback" not in log


class Tmpfs:
    """A small tmpfs mounted for one test (skips when mounting is not permitted)."""

    def __init__(self, path, size, options=""):
        os.makedirs(path, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size={}{}".format(
                                    size, "," + options if options else ""),
                                 "tmpfs", path], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        if result.returncode != 0:
            pytest.skip("cannot mount a tmpfs here ({})".format(
                result.stdout.decode(errors="replace").strip()))
        self.path = path

    def fill(self):
        """Write until ENOSPC: the disk is full (to the last block)."""
        for name, chunk in (("filler", 65536), ("filler2", 512)):
            try:
                with open(os.path.join(self.path, name), "wb", buffering=0) as f:
                    while True:
                        f.write(b"\0" * chunk)
            except OSError:
                pass

    def unmount(self):
        subprocess.call(["umount", "-l", self.path])


def test_full_disk_runs_the_new_engine_uncached_and_keeps_the_cached_one_intact(
        tmp_path, broker, model_dir):
    """The engine folder's disk fills up. The detector's engine, built before, is in the
    cache; the matcher needs a new one, and writing it fails with ENOSPC. ONNX Runtime needs
    no artefact: the matcher runs uncached after one warning naming the folder and the fix,
    detection keeps publishing, the device stays healthy; the cached engine stays intact and
    later loads without a rebuild."""
    disk = Tmpfs(str(tmp_path / "engines"), "16m")
    try:
        state = str(tmp_path / "state")
        config = "engine: {{dir: {}}}\nhealth: {{interval: 1}}\n".format(disk.path)
        rc, log = run(tmp_path, ["--source", "test://?width=320&height=240&frames=1",
                                 "--detector", "yolox-nano", "--model-dir", model_dir,
                                 "--state-dir", state], config)
        assert rc == 0, log
        cached = glob.glob(os.path.join(disk.path, "yolox-nano-320x240-*.onnx"))
        assert len(cached) == 1
        before = open(cached[0], "rb").read()
        disk.fill()
        sub = PersistentSubscriber(broker.port, ["edge/full/health"], persistent=False).start()
        jsonl = str(tmp_path / "out.jsonl")
        proc = start_edge(str(tmp_path), [
            "--source", "test://?width=320&height=240&fps=15", "--detector", "yolox-nano",
            "--matcher", "coarse-loftr", "--reference", os.path.join(PAIR, "motorcycle_left.png"),
            "--model-dir", model_dir, "--state-dir", state, "--mqtt", broker.url,
            "--device-id", "full", "--jsonl", jsonl], config)
        try:
            def matching():
                messages = read_jsonl(jsonl)
                return any("matches" in m for m in messages) and \
                    sum("detections" in m for m in messages) >= 20
            assert wait_until(matching, 60, proc), log_of(tmp_path)
            warnings = [l for l in log_of(tmp_path).splitlines() if "runs uncached" in l]
            assert len(warnings) == 1 and "No space left" in warnings[0] and \
                disk.path in warnings[0] and "set engine.dir" in warnings[0], warnings
            assert wait_until(lambda: health_of(sub) is not None, 10)
            report = health_of(sub)
            assert report["state"] == "online" and report["tasks"]["match"]["error"] is None
            uncached = [e for label, e in report["engines"].items()
                        if label.startswith("coarse-loftr")]
            assert uncached and uncached[0]["phase"] == "uncached", report["engines"]
            assert proc.poll() is None
        finally:
            stop_edge(proc)
            sub.close()
        assert open(cached[0], "rb").read() == before and side_file_ok(cached[0])
        assert not glob.glob(os.path.join(disk.path, "coarse-loftr-*.onnx.json")), \
            "no half-written engine is trusted"
        rc, log = run(tmp_path, ["--source", "test://?width=320&height=240&frames=2",
                                 "--detector", "yolox-nano", "--model-dir", model_dir,
                                 "--state-dir", state], config)
        assert rc == 0 and "built in" not in log, log
    finally:
        disk.unmount()


def test_full_disk_while_building_runs_uncached_with_one_warning(tmp_path, model_dir):
    disk = Tmpfs(str(tmp_path / "engines"), "256k")
    try:
        disk.fill()
        jsonl = str(tmp_path / "o.jsonl")
        rc, log = run(tmp_path, ["--source", "test://?width=320&height=240&frames=2",
                                 "--detector", "yolox-nano", "--model-dir", model_dir,
                                 "--state-dir", str(tmp_path / "state"), "--jsonl", jsonl],
                      "engine: {{dir: {}}}\n".format(disk.path))
        assert rc == 0 and not error_lines(log), log
        warnings = [l for l in log.splitlines() if "runs uncached" in l]
        assert len(warnings) == 1 and "No space left" in warnings[0], log
        assert disk.path in warnings[0] and "free space there" in warnings[0]
        assert "Traceback" not in log and "internal error" not in log, log
        assert len(read_jsonl(jsonl)) == 2
        # `edge build` exists to fill the cache: there a full one is an error
        from tests.conftest import run_edge
        config = tmp_path / "build.yaml"
        config.write_text("engine: {{dir: {}}}\n".format(disk.path))
        rc, out, err = run_edge("build", "yolox-nano", "-c", str(config), "--size", "320x240",
                                "--model-dir", model_dir, "--state-dir", str(tmp_path / "state"))
        lines = error_lines(err)
        assert rc == 70 and len(lines) == 1 and "No space left" in lines[0], err
    finally:
        disk.unmount()


def test_a_backend_that_needs_its_artefact_fails_with_one_clear_error(tmp_path):
    """TensorRT cannot run without its built engine: a full engine folder is one error
    naming the folder and the fix (`edge build` likewise never runs uncached)."""
    import onnx
    from edge import cards, graph
    from edge.backends.build import BuildError, EngineMaker
    from edge.backends.cache import EngineCache
    from tests.build_backends import ArtefactOnlyBackend
    card = cards.load("yolox-nano")
    model = graph.rewrite(onnx.load(os.path.join(os.path.dirname(ROOT), "shared", "models",
                                                 "yolox_nano.onnx")), card, 320, 240)
    disk = Tmpfs(str(tmp_path / "engines"), "256k")
    try:
        disk.fill()
        maker = EngineMaker(ArtefactOnlyBackend(), EngineCache(disk.path), 2 << 30)
        with pytest.raises(BuildError) as info:
            maker.make(model, card, "yolox-nano-320x240")
        message = str(info.value)
        assert "No space left" in message and disk.path in message and "set engine.dir" in \
            message and info.value.exit_code == 70
    finally:
        disk.unmount()


def test_a_read_only_or_full_state_folder_is_no_crash(tmp_path, broker, subscriber, model_dir):
    """--state-dir read-only: the run works (engines uncached, the --reference in memory).
    Full: set_reference replies `failed` naming the folder and the fix, not `internal`."""
    readonly = Tmpfs(str(tmp_path / "ro"), "1m", "ro")
    try:
        rc, log = run(tmp_path, ["--source", "test://?width=320&height=240&frames=2",
                                 "--detector", "yolox-nano", "--matcher", "coarse-loftr",
                                 "--reference", os.path.join(PAIR, "motorcycle_left.png"),
                                 "--model-dir", model_dir, "--state-dir", readonly.path,
                                 "--jsonl", str(tmp_path / "ro.jsonl")])
        assert rc == 0 and not error_lines(log), log
        assert "Read-only file system" in log and "runs uncached" in log
        assert any("matches" in m for m in read_jsonl(str(tmp_path / "ro.jsonl")))
    finally:
        readonly.unmount()
    full = Tmpfs(str(tmp_path / "full"), "256k")
    sub = subscriber("edge/fullstate/#")
    try:
        full.fill()
        proc = start_edge(str(tmp_path), [
            "--source", "test://?width=320&height=240&fps=10", "--matcher", "coarse-loftr",
            "--model-dir", model_dir, "--state-dir", full.path, "--mqtt", broker.url,
            "--device-id", "fullstate"], "")
        try:
            assert sub.wait_for(lambda s: any(m["state"] == "online"
                                              for m in s.json("status")), 60), log_of(tmp_path)
            # online comes before the first frame; the command is answered `unavailable`
            # until one has arrived, and the reply says to retry, as a robot would
            for attempt in range(20):
                rid = "r{}".format(attempt)
                sub.client.publish("edge/fullstate/cmd/set_reference", json.dumps(
                    {"id": rid, "name": "dock"}), qos=1)
                assert sub.wait_for(lambda s: s.json(rid), 15), log_of(tmp_path)
                reply = sub.json(rid)[0]
                if reply.get("error", {}).get("code") != "unavailable":
                    break
                time.sleep(0.5)
            assert reply["error"]["code"] == "failed", reply
            assert "No space left" in reply["error"]["message"] and full.path in \
                reply["error"]["message"] and "free space" in reply["error"]["message"]
            assert proc.poll() is None
        finally:
            stop_edge(proc)
    finally:
        full.unmount()


def test_full_disk_while_storing_leaves_no_untrusted_artefact(tmp_path):
    """The side file cannot be written (disk full after the build): the artefact moved into
    place is removed again and the error names the folder."""
    from edge.backends.build import BuildError
    from edge.backends.cache import EngineCache
    disk = Tmpfs(str(tmp_path / "engines"), "1m")
    try:
        cache = EngineCache(disk.path)
        path = os.path.join(disk.path, "m-320x240-ort-fp32-0123456789ab.onnx")
        open(path + ".build", "wb").write(os.urandom(200000))
        disk.fill()
        with pytest.raises(BuildError) as info:
            cache.store(path, path + ".build", "k" * 64, {})
        assert "No space left" in str(info.value) and disk.path in str(info.value)
        assert not os.path.exists(path) and not os.path.exists(path + ".json")
        assert not glob.glob(path + "*.tmp.*")
    finally:
        disk.unmount()


def test_temporary_files_of_killed_writers_are_cleaned_live_ones_kept(tmp_path):
    from edge.backends.cache import EngineCache
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "engines"
    folder.mkdir()
    (folder / "m.onnx.json.tmp.{}".format(dead.pid)).write_bytes(b"{")
    (folder / "m.onnx.json.tmp.{}".format(os.getppid())).write_bytes(b"{")
    assert not EngineCache(str(folder)).lookup(str(folder / "m.onnx"), "k")
    assert sorted(os.listdir(str(folder))) == ["m.onnx.json.tmp.{}".format(os.getppid())]


def test_a_reference_write_cut_short_by_kill_leaves_nothing_after_a_restart(tmp_path):
    """A kill -9 while a reference was stored leaves `NAME.png.tmp.PID` (tens of MB): the
    next start's store removes those of dead writers and keeps the references."""
    from edge.references import ReferenceStore
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "references"
    folder.mkdir()
    image = cv2.imread(os.path.join(PAIR, "motorcycle_left.png"))
    cv2.imwrite(str(folder / "dock.png"), image)
    (folder / "dock.png.tmp.{}".format(dead.pid)).write_bytes(b"\x89PNG" + b"\0" * 2 ** 20)
    (folder / "gate.png.tmp.{}".format(os.getppid())).write_bytes(b"\x89PNG")   # alive
    store = ReferenceStore(str(tmp_path))
    assert store.names() == ["dock"]
    assert sorted(os.listdir(str(folder))) == ["dock.png",
                                               "gate.png.tmp.{}".format(os.getppid())]


# --- consumers that cannot keep up ----------------------------------------------------------

def rate(messages, start, end):
    """Results per second whose capture time lies in [start, end)."""
    return sum(1 for m in messages if start <= m["frame"]["ts"] < end) / (end - start)


@pytest.mark.timing
@pytest.mark.parametrize("qos", [0, 1])
def test_slow_subscriber_never_slows_the_pipeline(tmp_path, broker, model_dir, qos):
    """A robot whose on_message takes 0.5 s subscribes: the daemon's result rate stays
    (>= 0.8 of the rate in the 2 s just before, in the same run), the broker absorbs the
    backlog (QoS 0: it drops for that subscriber; QoS 1: it queues for it), and with QoS 1
    edge's publish queue stays within its bound and drops nothing. On a loaded laptop the
    rate also moves with the other programs: up to three tries (the slow subscriber leaves
    between them), one of which must hold; a pipeline that waited for the subscriber would
    slow down in all three."""
    jsonl = str(tmp_path / "out.jsonl")
    proc = start_edge(str(tmp_path), [
        "--source", "test://?width=320&height=240&fps=30", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--mqtt", "{}?qos={}".format(broker.url, qos),
        "--device-id", "slow", "--jsonl", jsonl], "mqtt: {queue: 50}\nhealth: {interval: 1}\n")
    monitor = PersistentSubscriber(broker.port, ["edge/slow/health"], persistent=False).start()
    slow = None
    rates = []
    try:
        assert wait_until(lambda: len(read_jsonl(jsonl)) >= 5, 60, proc), log_of(tmp_path)
        window = 2.0
        for _ in range(3):
            if slow is not None:
                slow.close()
            first = time.time()
            time.sleep(window)
            slow = PersistentSubscriber(broker.port, ["edge/slow/detections"], qos=qos,
                                        delay=0.5, persistent=False).start()
            second = time.time() + 0.5
            time.sleep(window + 0.5)
            messages = read_jsonl(jsonl)
            rates.append((rate(messages, first, first + window),
                          rate(messages, second, second + window)))
            print("results/s without and with the slow subscriber: {:.1f}, {:.1f}".format(
                *rates[-1]))
            if rates[-1][0] > 2 and rates[-1][1] / rates[-1][0] >= 0.8:
                break
        before, after = rates[-1]
        assert before > 2 and after / before >= 0.8, rates
        assert slow.count() < len([m for m in messages if m["frame"]["ts"] >= second - 0.5]), \
            "the subscriber really could not keep up"
        queues = [r["mqtt"]["queue"] for r in monitor.payloads("health")]
        assert max(queues) <= 50 + 20, queues    # mqtt.queue waiting + paho's window
        if qos == 1:
            assert health_of(monitor)["mqtt"]["dropped"] == 0, health_of(monitor)
        assert proc.poll() is None
        assert stop_edge(proc) == 0, log_of(tmp_path)
    finally:
        stop_edge(proc)
        monitor.close()
        if slow is not None:
            slow.close()


# --- SIGKILL at random moments -----------------------------------------------------------------

def build_children(folder):
    """Live engine build processes writing into `folder` (their output log is there)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open("/proc/{}/cmdline".format(pid), "rb").read()
            if b"edge.backends.buildjob" not in cmdline:
                continue
            if os.readlink("/proc/{}/fd/1".format(pid)).startswith(folder):
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_sigkill_at_random_moments_leaves_no_trusted_damage(tmp_path, model_dir):
    """Five runs matching a configured reference (held in memory: a run never writes it),
    building engines (a new frame size each run) and writing JSONL, each killed with SIGKILL
    0.2-3 s after its start (seeded). Afterwards: temporary files may be left over but nothing
    half-written is trusted: every engine with a side file passes its check, the JSONL holds
    whole lines (a torn last line at most per kill), no reference was stored, and the next
    start is clean."""
    from edge.references import ReferenceStore
    rng = random.Random(7)
    state = str(tmp_path / "state")
    jsonl = str(tmp_path / "out.jsonl")
    reference = os.path.join(PAIR, "motorcycle_left.png")
    orphans = []
    for kill in range(5):
        width = 320 + 32 * kill
        proc = start_edge(str(tmp_path), [
            "--source", "test://?width={}&height=240&fps=15".format(width), "--detector",
            "yolox-nano", "--matcher", "coarse-loftr", "--reference", reference,
            "--model-dir", model_dir, "--state-dir", state, "--jsonl", jsonl],
            "match: {every: 5}\n")
        time.sleep(rng.uniform(0.2, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        orphans += build_children(state)
    # An engine build child outlives a daemon killed alone (systemd kills the whole unit);
    # it never writes a side file, so what it leaves is not trusted. Let them end.
    assert wait_until(lambda: not build_children(state), 60)
    engines = os.path.join(state, "engines")
    for side in glob.glob(os.path.join(engines, "*.json")):
        assert side_file_ok(side[:-len(".json")]), side
    lines = open(jsonl, "rb").read().splitlines() if os.path.exists(jsonl) else []
    torn = [l for l in lines if not l.startswith(b"{") or not l.endswith(b"}")]
    assert len(torn) <= 5, torn
    leftovers = sorted(os.listdir(engines)) if os.path.isdir(engines) else []
    # The next start: clean, whatever was left.
    rc, log = run(tmp_path, ["--source", "test://?width=320&height=240&frames=3", "--detector",
                             "yolox-nano", "--matcher", "coarse-loftr", "--reference", reference,
                             "--model-dir", model_dir, "--state-dir", state, "--jsonl",
                             str(tmp_path / "after.jsonl")], "match: {every: 1}\n")
    assert rc == 0, (leftovers, log)
    assert "Traceback" not in log
    results = read_jsonl(str(tmp_path / "after.jsonl"))
    assert len([m for m in results if "detections" in m]) == 3
    assert len([m for m in results if "matches" in m]) == 3
    assert ReferenceStore(state).names() == [], \
        "--reference is the run's own: never stored, so never half-written"
    print("orphaned build children:", len(set(orphans)), "leftovers:", leftovers)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve-mjpeg":
        serve_mjpeg(int(sys.argv[2]))
