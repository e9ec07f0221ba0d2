"""Sources and the capture thread, against real files, folders and the test pattern."""

import os
import shutil
import threading
import time
import tracemalloc

import cv2
import numpy as np
import pytest

from edge.capture import Capture
from edge.errors import ConfigError, SourceError
from edge.frames import Frame, FramePool
from edge.sources import Source, open_source, parse_uri
from edge.sources.video import csi_pipeline, has_gstreamer

COCO_VAL = "/work/shared/data/coco8/images/val"


def read_all(source, limit=1000):
    """Open, read every frame as (index, name, image copy), close."""
    source.open()
    frame = Frame(0, (1, 1, 3))
    out = []
    try:
        while len(out) < limit and source.read_into(frame):
            out.append((frame.index, frame.name, frame.image.copy()))
    finally:
        source.close()
    return out


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --- parse_uri -------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, expected", [
    (COCO_VAL, ("images", COCO_VAL, {})),
    ("images:///data/shots", ("images", "/data/shots", {})),
    ("/dev/video0", ("v4l2", "/dev/video0", {})),
    ("v4l2:///dev/video1?width=1280", ("v4l2", "/dev/video1", {"width": "1280"})),
    ("clips/a.mp4", ("file", "clips/a.mp4", {})),
    ("file:///tmp/a.mp4", ("file", "/tmp/a.mp4", {})),
    ("rtsp://u:p@cam.local:554/live?ch=1", ("rtsp", "rtsp://u:p@cam.local:554/live?ch=1",
                                            {"ch": "1"})),
    ("csi://0?width=1920&height=1080", ("csi", "0", {"width": "1920", "height": "1080"})),
    ("test://?fps=5", ("test", "", {"fps": "5"})),
])
def test_parse_uri(uri, expected):
    assert parse_uri(uri) == expected


def test_open_source_picks_the_kind_without_opening():
    assert type(open_source("csi://1?width=1920&flip=2")).__name__ == "CsiSource"
    assert type(open_source("/dev/video7")).__name__ == "V4l2Source"
    assert type(open_source(COCO_VAL)).__name__ == "ImageFolderSource"
    with pytest.raises(ConfigError, match="flip"):
        open_source("csi://0?flip=9")


# --- test:// ---------------------------------------------------------------------------------

def test_pattern_has_the_configured_size_and_moves():
    frames = read_all(open_source("test://?width=320&height=200&fps=0&frames=3"))
    assert [index for index, _, _ in frames] == [0, 1, 2]
    for _, name, image in frames:
        assert image.shape == (200, 320, 3) and image.dtype == np.uint8
        assert name is None
    assert not np.array_equal(frames[0][2], frames[1][2])


def test_pattern_defaults_and_live():
    source = open_source("test://")
    assert (source.width, source.height, source.fps, source.live) == (640, 480, 30, True)
    assert open_source("test://?frames=2").live is False


@pytest.mark.timing
def test_pattern_is_paced():
    source = open_source("test://?width=64&height=48&fps=50")
    source.open()
    frame = Frame(0, (48, 64, 3))
    start = time.monotonic()
    for _ in range(11):
        assert source.read_into(frame)
    elapsed = time.monotonic() - start
    assert 0.15 < elapsed < 0.5      # 10 frame intervals of 20 ms


def test_pattern_frames_param_ends_the_source():
    assert len(read_all(open_source("test://?width=32&height=32&fps=0&frames=5"))) == 5


def test_pattern_reuses_the_slot_buffer():
    source = open_source("test://?width=640&height=480&fps=0")
    source.open()
    frame = Frame(0, (480, 640, 3))
    image, pointer = frame.image, frame.image.ctypes.data
    tracemalloc.start()
    try:
        for _ in range(20):
            assert source.read_into(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frame.image is image and frame.image.ctypes.data == pointer
    assert peak < image.nbytes // 10     # nothing near a frame's size was allocated


@pytest.mark.parametrize("query, param", [
    ("width=abc", "width"), ("width=0", "width"), ("height=-5", "height"),
    ("width=9000", "width"), ("fps=-1", "fps"), ("frames=0", "frames"), ("widht=5", "widht"),
])
def test_pattern_bad_params(query, param):
    uri = "test://?" + query
    with pytest.raises(ConfigError) as info:
        open_source(uri)
    message = str(info.value)
    assert param in message and uri in message
    assert "\n" not in message


# --- images:// -------------------------------------------------------------------------------

def test_image_folder_in_name_order_with_names_and_sizes():
    source = open_source(COCO_VAL)
    assert source.live is False
    frames = read_all(source)
    names = sorted(os.listdir(COCO_VAL))
    assert [name for _, name, _ in frames] == names
    assert [index for index, _, _ in frames] == list(range(len(names)))
    for _, name, image in frames:
        expected = cv2.imread(os.path.join(COCO_VAL, name))
        assert np.array_equal(image, expected)


def test_image_folder_skips_bad_files(tmp_path, caplog):
    good = sorted(os.listdir(COCO_VAL))[:2]
    shutil.copy(os.path.join(COCO_VAL, good[0]), str(tmp_path / "a.jpg"))
    (tmp_path / "b.jpg").write_bytes(b"")                          # zero bytes
    (tmp_path / "c.PNG").write_text("not an image at all\n")       # text renamed .png
    shutil.copy(os.path.join(COCO_VAL, good[1]), str(tmp_path / "d.JPEG"))
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    gray = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)
    cv2.imwrite(str(tmp_path / "e.png"), gray)
    bgra = np.zeros((10, 20, 4), np.uint8)
    bgra[..., 2] = 200
    cv2.imwrite(str(tmp_path / "f.png"), bgra)

    source = open_source("images://" + str(tmp_path))
    frames = read_all(source)
    assert [name for _, name, _ in frames] == ["a.jpg", "d.JPEG", "e.png", "f.png"]
    assert source.skipped == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "b.jpg" in warnings[0] and "c.PNG" in warnings[1]
    assert frames[2][2].shape == (30, 40, 3) and frames[3][2].shape == (10, 20, 3)
    assert (frames[3][2][..., 2] == 200).all()


@pytest.mark.parametrize("ext, params", [
    (".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".png", []), (".bmp", []),
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])])
def test_image_size_is_read_from_the_header(ext, params):
    """Sizes of real files of each format read (lossy VP8 and lossless VP8L WebP too), from
    their header alone: the check that runs before anything is decoded."""
    from edge import imagefiles
    image = cv2.imread(os.path.join(COCO_VAL, sorted(os.listdir(COCO_VAL))[0]))[:123, :211]
    ok, data = cv2.imencode(ext, image, params)
    assert ok
    assert imagefiles.size(data.tobytes()) == (211, 123)
    assert imagefiles.size(data.tobytes()[:600]) in ((211, 123), None)   # header only
    with pytest.raises(SourceError, match="211x123 pixels, over the limit of 20000"):
        imagefiles.decode(data.tobytes(), "image x" + ext, 20000)


def test_an_image_format_whose_header_is_not_read_is_refused(tmp_path):
    from edge import imagefiles
    image = np.zeros((20, 30, 3), np.uint8)
    for ext in (".tiff", ".ppm"):
        data = cv2.imencode(ext, image)[1].tobytes()
        assert imagefiles.size(data) is None
        with pytest.raises(SourceError, match="not a JPEG, PNG, BMP or WebP image"):
            imagefiles.decode(data, "image x" + ext, 10 ** 6)


def test_image_folder_loop():
    frames = read_all(open_source("images://" + COCO_VAL + "?loop=1"), limit=10)
    assert len(frames) == 10
    assert frames[4][1] == frames[0][1] and frames[9][0] == 9


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source("images://" + str(tmp_path / "nope")).open()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="holds no"):
        open_source(str(tmp_path)).open()


def test_image_folder_where_nothing_decodes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    source = open_source(str(tmp_path))
    with pytest.raises(SourceError, match="can be decoded"):
        read_all(source)


# --- file:// ---------------------------------------------------------------------------------

FRAMES, WIDTH, HEIGHT = 20, 160, 120


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A real MJPG AVI: frame i is a flat grey of level 10 * i with a white bar at x = 8 * i."""
    path = str(tmp_path_factory.mktemp("video") / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 20, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(FRAMES):
        image = np.full((HEIGHT, WIDTH, 3), 10 * i, np.uint8)
        image[:, 8 * i:8 * i + 4] = 255
        writer.write(image)
    writer.release()
    return path


def test_video_file_reads_every_frame_in_order(clip):
    source = open_source(clip)
    assert source.live is False
    frames = read_all(source)
    assert [index for index, _, _ in frames] == list(range(FRAMES))
    for i, (_, name, image) in enumerate(frames):
        assert name is None and image.shape == (HEIGHT, WIDTH, 3)
        assert abs(float(np.median(image)) - 10 * i) < 6
        assert image[:, 8 * i + 1].mean() > 200


def test_video_file_decodes_into_the_slot(clip):
    source = open_source("file://" + clip)
    source.open()
    frame = Frame(0, (HEIGHT, WIDTH, 3))
    image = frame.image
    for _ in range(5):
        assert source.read_into(frame)
    assert frame.image is image
    source.close()


def test_truncated_video_ends_without_crashing(clip, tmp_path, caplog):
    data = open(clip, "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:len(data) // 2])
    frames = read_all(open_source(str(cut)))
    assert 0 < len(frames) < FRAMES
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_video_file_missing_or_not_a_video(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "none.mp4")).open()
    junk = tmp_path / "junk.avi"
    junk.write_text("this is not a video")
    with pytest.raises(SourceError, match="cannot decode"):
        open_source(str(junk)).open()


# --- v4l2:// and csi:// ----------------------------------------------------------------------

def test_csi_pipeline():
    assert csi_pipeline(1, 1920, 1080, 30, 2) == (
        "nvarguscamerasrc sensor-id=1 ! "
        "video/x-raw(memory:NVMM), width=1920, height=1080, framerate=30/1, format=NV12 ! "
        "nvvidconv flip-method=2 ! video/x-raw, width=1920, height=1080, format=BGRx ! "
        "videoconvert ! video/x-raw, format=BGR ! appsink drop=true max-buffers=1")


def test_csi_defaults_and_missing_gstreamer_message():
    source = open_source("csi://0")
    assert (source.sensor_id, source.width, source.height, source.fps, source.flip) == \
        (0, 1280, 720, 30, 0)
    if not has_gstreamer():      # pip wheels: the error must say what to install instead
        with pytest.raises(SourceError, match="GStreamer.*JetPack"):
            source.open()


def test_missing_camera_fails_the_start():
    pool = FramePool(2)
    capture = Capture(open_source("v4l2:///dev/video99"), pool, lambda f: True,
                      threading.Event())
    with pytest.raises(SourceError, match="/dev/video99"):
        capture.start_source()
    assert capture.state == "failed"


# --- the capture thread ----------------------------------------------------------------------

class FlakyCamera(Source):
    """A live camera that can be unplugged: the real test pattern, failing while unplugged."""

    live = True

    def __init__(self):
        super().__init__("flaky://", "", {})
        self.pattern = open_source("test://?width=64&height=48&fps=200")
        self.unplugged = threading.Event()
        self.opens = self.closes = 0

    def open(self):
        if self.unplugged.is_set():
            raise SourceError("flaky camera is unplugged")
        self.opens += 1
        self.pattern.open()

    def read_into(self, frame):
        if self.unplugged.is_set():
            raise SourceError("flaky camera stopped delivering frames")
        return self.pattern.read_into(frame)

    def close(self):
        self.closes += 1


class Collector:
    """A deliver callable that records frames and hands slots straight back."""

    def __init__(self, pool, stop_after=None):
        self.pool = pool
        self.indexes = []
        self.names = []
        self.stop_after = stop_after

    def __call__(self, frame):
        self.indexes.append(frame.index)
        self.names.append(frame.name)
        if self.stop_after is not None and len(self.indexes) >= self.stop_after:
            return False              # refused: the slot stays the capture thread's to release
        self.pool.release(frame)
        return True


def test_capture_reopens_a_live_source_that_comes_back():
    pool = FramePool(3, (48, 64, 3))
    stop = threading.Event()
    camera = FlakyCamera()
    deliver = Collector(pool)
    capture = Capture(camera, pool, deliver, stop, reopen_backoff=(0.01, 0.04))
    capture.start_source()
    capture.start()
    try:
        assert wait_for(lambda: capture.frames >= 5)
        camera.unplugged.set()
        assert wait_for(lambda: capture.state == "reconnecting")
        time.sleep(0.15)                  # several failed reopens, backoff capped at 40 ms
        assert capture.reopens == 0
        before = capture.frames
        camera.unplugged.clear()
        assert wait_for(lambda: capture.frames >= before + 5)
        assert capture.reopens >= 1 and capture.state == "open"
        assert "unplugged" in capture.last_error or "stopped" in capture.last_error
    finally:
        stop.set()
        capture.join(2)
    assert not capture.is_alive()
    assert capture.state == "stopped" and capture.error is None
    assert deliver.indexes == sorted(deliver.indexes)
    assert pool.free == len(pool)
    assert camera.closes >= 2              # closed on failure and again at the end


def test_capture_delivers_a_folder_in_order_and_finishes():
    pool = FramePool(2)
    deliver = Collector(pool)
    ended = threading.Event()
    capture = Capture(open_source(COCO_VAL), pool, deliver, threading.Event(),
                      on_exit=ended.set)
    capture.start_source()
    capture.start()
    capture.join(5)
    assert not capture.is_alive() and ended.is_set()
    assert capture.finished and capture.state == "finished" and capture.error is None
    assert deliver.names == sorted(os.listdir(COCO_VAL))
    assert capture.frames == 4 and pool.free == 2


def test_capture_stops_when_deliver_refuses():
    pool = FramePool(2)
    deliver = Collector(pool, stop_after=3)
    capture = Capture(open_source("test://?width=32&height=32&fps=0"), pool, deliver,
                      threading.Event())
    capture.start_source()
    capture.start()
    capture.join(5)
    assert not capture.is_alive()
    assert capture.state == "stopped" and capture.frames == 2 and len(deliver.indexes) == 3
    assert pool.free == 2


def test_capture_error_of_a_finite_source_is_fatal(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    pool = FramePool(2)
    capture = Capture(open_source(str(tmp_path)), pool, Collector(pool), threading.Event())
    capture.start_source()
    capture.start()
    capture.join(5)
    assert capture.state == "failed" and isinstance(capture.error, SourceError)
    assert capture.reopens == 0 and pool.free == 2
