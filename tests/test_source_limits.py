"""What a source may cost (issue 24): a test pattern at fps=0 draws only the frames the
pipeline takes; videos and file:// images over `max_image_pixels` are refused from their
header, before a frame is decoded; a stereo pair of two sizes is skipped and counted, not
the end of the run."""

import json
import logging
import os
import re
import shutil
import struct
import zlib
from urllib.parse import urlencode

import cv2
import numpy as np
import pytest

from edge import cards, config, daemon, imagefiles, tasks
from edge.errors import EXIT_NOINPUT, SourceError
from edge.frames import Frame
from edge.pipeline import Pipeline
from edge.publisher import JsonlSink, Publisher
from edge.sources import first_frame, open_source
from tests.conftest import SHARED, run_edge

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
LEFT = os.path.join(PAIR, "motorcycle_left.png")
RIGHT = os.path.join(PAIR, "motorcycle_right.png")
CALIB = os.path.join(PAIR, "calib.txt")
MiB = 1024 * 1024


# -- helpers ---------------------------------------------------------------------------------

def write_png(path, width, height):
    """A 1-bit grey PNG of width x height, all black, written by hand: 16000 x 16000 is
    about 30 KB on disk and 768 MB once decoded to BGR."""
    row = b"\x00" * (1 + (width + 7) // 8)          # filter byte, then 8 pixels a byte
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    with open(str(path), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" +
                chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) +
                chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return str(path)


def write_avi(path, width, height, frames=3):
    """A real MJPEG AVI from OpenCV's writer."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    for i in range(frames):
        writer.write(np.full((height, width, 3), 40 * i, np.uint8))
    writer.release()
    return str(path)


def claim_size(path, width, height):
    """Make an AVI's headers and every JPEG frame header claim width x height: a file of a
    few KB whose container says 12000x12000, as a hostile or broken file may."""
    data = bytearray(open(path, "rb").read())
    at = data.find(b"avih") + 8
    struct.pack_into("<II", data, at + 32, width, height)          # dwWidth, dwHeight
    at = data.find(b"strf") + 8
    struct.pack_into("<ii", data, at + 4, width, height)           # biWidth, biHeight
    at = data.find(b"\xff\xc0")
    while at >= 0:                                                 # baseline SOF0 headers
        struct.pack_into(">HH", data, at + 5, height, width)
        at = data.find(b"\xff\xc0", at + 2)
    with open(path, "wb") as f:
        f.write(data)
    return path


def reset_peak():
    """Reset this process's peak RSS (VmHWM); False where Linux does not let us."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def refused(uri, max_pixels=None):
    """The one-line SourceError opening and reading `uri` gives, and the peak RSS growth
    (bytes; None where it cannot be measured)."""
    source = open_source(uri, max_pixels)
    measured = reset_peak()
    before = memory_kb("VmRSS")
    with pytest.raises(SourceError) as info:
        first_frame(source)
    growth = (memory_kb("VmHWM") - before) * 1024 if measured else None
    message = str(info.value)
    assert "\n" not in message
    return message, growth


# -- test:// at fps=0 -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def maker(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("state"))
    cfg = config.load(None, {"state_dir": state, "backend": "ort"}, require_task=False)
    return daemon.engine_maker(cfg)


def test_a_pattern_at_fps_0_draws_only_the_frames_the_pipeline_takes(tmp_path, maker,
                                                                        model_dir):
    """An endless test://?fps=0 under a real detector: every frame drawn is inferred (none
    drawn to be dropped), in order, and the run's figures say so."""
    detector = tasks.create(cards.load("yolox-nano"), maker, model_dir, device="fps0")
    sink = JsonlSink(str(tmp_path / "o.jsonl"))
    publisher = Publisher(None, sink, limit=1000)
    source = open_source("test://?width=320&height=240&fps=0")
    pipeline = Pipeline(source, [detector], publisher, pool_size=4, max_frames=20)
    pipeline.open()
    pipeline.prepare()
    publisher.start()
    pipeline.start()
    assert pipeline.wait(60), "the run ends at --max-frames"
    pipeline.join()
    publisher.flush(10)
    sink.close()
    with open(str(tmp_path / "o.jsonl")) as f:
        indexes = [json.loads(line)["frame"]["index"] for line in f]
    taken = pipeline.runners[0].inferred
    captured = pipeline.cameras[0].capture.frames
    assert taken == 20 and indexes == list(range(20)), "consecutive frames, none skipped"
    # What is still in flight when the limit stops the run: a lane of 2 and the pool's slots.
    assert captured <= taken + len(pipeline.cameras[0].pool), (captured, taken)
    assert pipeline.inboxes[0].dropped == 0
    assert pipeline.cameras[0].pool.free == len(pipeline.cameras[0].pool)


def test_a_pattern_with_a_rate_is_still_a_live_camera():
    assert open_source("test://?fps=30").live and not open_source("test://?fps=0").live
    assert not open_source("test://?fps=30&frames=5").live


# -- max_image_pixels for videos and file:// images ---------------------------------------------

def test_a_file_uri_png_over_the_limit_is_refused_from_its_header(tmp_path):
    path = write_png(tmp_path / "huge.png", 16000, 16000)
    assert os.path.getsize(path) < 100 * 1024
    message, growth = refused("file://" + path)
    assert message.startswith("image file {}: 16000x16000 pixels".format(path)), message
    assert "limit of {} (max_image_pixels)".format(imagefiles.DEFAULT_MAX_PIXELS) in message
    assert "raise max_image_pixels" in message
    if growth is not None:
        assert growth < 100 * MiB, "{:.0f} MiB spent on a refused image".format(growth / MiB)


def test_a_file_uri_png_within_the_limit_still_plays(tmp_path):
    path = write_png(tmp_path / "small.png", 64, 48)
    frame = first_frame(open_source("file://" + path, max_pixels=64 * 48))
    assert frame is not None and frame.image.shape == (48, 64, 3)


def test_a_video_whose_container_claims_huge_frames_is_refused_when_opened(tmp_path):
    path = claim_size(write_avi(tmp_path / "claims.avi", 64, 64), 12000, 12000)
    assert os.path.getsize(path) < 64 * 1024
    source = open_source(path)
    with pytest.raises(SourceError) as info:
        source.open()          # before the first read: nothing was decoded
    message = str(info.value)
    assert message.startswith("video file {}: 12000x12000 pixels a frame, over the limit of {} "
                              "(max_image_pixels)".format(path, imagefiles.DEFAULT_MAX_PIXELS))
    assert "ffmpeg -i IN -vf scale=" in message and "\n" not in message
    source.close()


def test_video_frames_are_held_to_max_image_pixels(tmp_path):
    """A real MJPEG file at the limit plays; one pixel under it, it is refused from the
    container's size, without a frame decoded."""
    path = write_avi(tmp_path / "clip.avi", 320, 240)
    frame, got = Frame(0, (2, 2, 3)), 0
    source = open_source("file://" + path, max_pixels=320 * 240)
    source.open()
    while source.read_into(frame):
        got += 1
    source.close()
    assert got == 3 and frame.image.shape == (240, 320, 3)
    message, _ = refused(path, max_pixels=320 * 240 - 1)
    assert "320x240 pixels a frame, over the limit of 76799" in message, message


def test_edge_run_refuses_a_huge_file_uri_image_with_exit_66(tmp_path, model_dir):
    path = write_png(tmp_path / "huge.png", 16000, 16000)
    rc, _, err = run_edge("run", "--source", "file://" + path, "--detector", "yolox-nano",
                          "--model-dir", model_dir, "--backend", "ort", "--jsonl",
                          str(tmp_path / "o.jsonl"), "--state-dir", str(tmp_path / "state"))
    lines = [line for line in err.splitlines() if line.startswith("edge: error:")]
    assert rc == EXIT_NOINPUT and len(lines) == 1, err
    assert path in lines[0] and "16000x16000" in lines[0] and "max_image_pixels" in lines[0]


# -- stereo pairs of two sizes --------------------------------------------------------------

def pair_folders(tmp_path, odd=1, count=3):
    """left/ and right/ with `count` copies of the Middlebury pair; pair `odd` has a right
    image 100 px narrower."""
    left, right = tmp_path / "left", tmp_path / "right"
    left.mkdir()
    right.mkdir()
    narrow = cv2.imread(RIGHT)[:, :-100]
    for i in range(count):
        shutil.copy(LEFT, str(left / "{}.png".format(i)))
        if i == odd:
            cv2.imwrite(str(right / "{}.png".format(i)), narrow)
        else:
            shutil.copy(RIGHT, str(right / "{}.png".format(i)))
    return str(left), str(right)


def stereo_uri(left, right):
    return "stereo://?" + urlencode({"left": left, "right": right})


def test_a_pair_of_two_sizes_is_skipped_counted_and_named(tmp_path, caplog):
    left, right = pair_folders(tmp_path)
    source = open_source(stereo_uri(left, right))
    source.open()
    frame, names = Frame(0, (2, 2, 3)), []
    with caplog.at_level(logging.WARNING, logger="edge.stereo.source"):
        while source.read_into(frame):
            names.append(frame.name)
    source.close()
    assert names == ["0.png", "2.png"] and source.skipped == 1
    (warning,) = [r.getMessage() for r in caplog.records if "skipped the pair" in r.getMessage()]
    assert os.path.join(left, "1.png") in warning and os.path.join(right, "1.png") in warning
    assert "741x500" in warning and "641x500" in warning


def test_edge_depth_on_one_pair_of_two_sizes_names_both_files(tmp_path):
    narrow = str(tmp_path / "narrow.png")
    cv2.imwrite(narrow, cv2.imread(RIGHT)[:, :-100])
    rc, _, err = run_edge("depth", LEFT, narrow, "--calib", CALIB, "--out",
                          str(tmp_path / "d.npy"), "--state-dir", str(tmp_path / "state"))
    lines = [line for line in err.splitlines() if line.startswith("edge: error:")]
    assert rc == EXIT_NOINPUT and len(lines) == 1, err
    assert "{} is 741x500 but {} is 641x500".format(LEFT, narrow) in lines[0], lines[0]
    assert not (tmp_path / "d.npy").exists()


def test_edge_run_goes_on_past_a_pair_of_two_sizes(tmp_path):
    """The daemon's stereo path: three pairs, the second of two sizes: two depth messages,
    exit 0, and the skipped pair in the source's figures."""
    left, right = pair_folders(tmp_path)
    path = tmp_path / "edge.yaml"
    path.write_text("stereo:\n  calib: {}\n  grid: 4x3\n".format(CALIB))
    jsonl = tmp_path / "out.jsonl"
    rc, _, err = run_edge("run", "-c", str(path), "--source", stereo_uri(left, right),
                          "--jsonl", str(jsonl), "--backend", "ort",
                          "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    messages = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [m["frame"]["index"] for m in messages] == [0, 1], messages
    assert "skipped the pair" in err and "641x500" in err
