"""Stereo depth (issue 15) on the real Middlebury motorcycle pair and its ground truth:
calibration files, the stereo source, disparity -> depth on the backend, spatial
coordinates of detections, `edge depth`, and the figures the README reports."""

import json
import os
import subprocess
import sys
import time
import tracemalloc
from urllib.parse import urlencode

import cv2
import numpy as np
import pytest

from edge import config, daemon, mqtt, schemas
from edge.backends import trtcheck
from edge.commands import Commands
from edge.errors import EXIT_CONFIG, ConfigError, SourceError
from edge.frames import Frame
from edge.sources import first_frame, open_source
from edge.stereo import calibration
from edge.stereo import conversion as depth
from edge.stereo.task import DepthTask
from tests.conftest import ROOT, SHARED, run_edge

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
LEFT = os.path.join(PAIR, "motorcycle_left.png")
RIGHT = os.path.join(PAIR, "motorcycle_right.png")
CALIB = os.path.join(PAIR, "calib.txt")
F, CX, CY, DOFFS, BASELINE = 994.978, 311.193, 254.877, 31.086, 193.001


def stereo_uri(left=LEFT, right=RIGHT, **extra):
    query = {"left": left, "right": right}
    query.update(extra)
    return "stereo://?" + urlencode(query)


def truth_depth():
    """The ground truth as depth (mm), 0 where unknown."""
    disparity = np.load(os.path.join(PAIR, "motorcycle_disp.npz"))["arr_0"]
    known = np.isfinite(disparity)
    out = np.zeros(disparity.shape, np.float32)
    out[known] = F * BASELINE / (disparity[known] + DOFFS)
    return out


def read_one(source):
    frame = first_frame(source)
    assert frame is not None
    return frame


def write_opencv_calibration(path, t=(-BASELINE, 0.0, 0.0), skip=()):
    """The Middlebury pair's cameras as an OpenCV stereo calibration (raw cameras)."""
    k1 = np.array([[F, 0, CX], [0, F, CY], [0, 0, 1]])
    k2 = k1.copy()
    k2[0, 2] = CX + DOFFS
    storage = cv2.FileStorage(str(path), cv2.FILE_STORAGE_WRITE)
    for key, value in (("image_width", 741), ("image_height", 500), ("K1", k1),
                       ("D1", np.zeros((1, 5))), ("K2", k2), ("D2", np.zeros((1, 5))),
                       ("R", np.eye(3)), ("T", np.array(t, np.float64).reshape(3, 1))):
        if key not in skip:
            storage.write(key, value)
    storage.release()
    return str(path)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("state"))
    return config.load(None, {"state_dir": state, "model_mirror": os.path.join(SHARED, "models"),
                              "stereo.calib": CALIB}, require_task=False)


@pytest.fixture(scope="module")
def maker(cfg):
    return daemon.engine_maker(cfg)


@pytest.fixture(scope="module")
def pair_depth(cfg, maker):
    """StereoDepth on the pair and its filled slot."""
    settings = dict(cfg["stereo"], convert="graph")
    stereo = depth.StereoDepth(calibration.load(CALIB), maker, 741, 500, settings)
    slot = stereo.slot()
    stereo.compute(cv2.imread(LEFT), cv2.imread(RIGHT), slot)
    return stereo, slot


# -- calibration ---------------------------------------------------------------------------

def test_middlebury_calibration_is_read_as_written():
    c = calibration.load(CALIB)
    assert (c.width, c.height, c.ndisp) == (741, 500, 80) and c.maps is None
    assert (c.focal, c.cx, c.cy, c.baseline_mm) == (F, CX, CY, BASELINE)
    assert c.doffs == pytest.approx(DOFFS)


@pytest.mark.parametrize("suffix", [".yaml", ".xml"])
def test_opencv_calibration_rectifies_to_the_same_depths(tmp_path, cfg, maker, pair_depth,
                                                         suffix):
    """The pair's cameras written as raw OpenCV K/D/R/T: maps are made once, the source
    rectifies through them, and the depths agree with the Middlebury calibration's."""
    c = calibration.load(write_opencv_calibration(tmp_path / ("stereo" + suffix)))
    assert c.maps is not None and c.maps[0][0].shape == (500, 741, 2)
    assert c.doffs == pytest.approx(0.0, abs=1e-6) and c.baseline_mm == pytest.approx(BASELINE)
    source = open_source(stereo_uri())
    source.calibrate(c)
    frame = read_one(source)
    raw = cv2.imread(LEFT)
    assert not np.array_equal(frame.image, raw)        # rectified, not copied
    expected = cv2.remap(raw, c.maps[0][0], c.maps[0][1], cv2.INTER_LINEAR)
    assert np.array_equal(frame.image, expected)
    # after rectification the disparities are d + doffs, zoomed: search further
    settings = dict(cfg["stereo"], num_disparities=112)
    stereo = depth.StereoDepth(c, maker, 741, 500, settings)
    slot = stereo.slot()
    stereo.compute(frame.image, frame.right, slot)
    ours = np.median(slot.depth[slot.depth > 0])
    middlebury = np.median(pair_depth[1].depth[pair_depth[1].depth > 0])
    assert abs(ours - middlebury) / middlebury < 0.03, (ours, middlebury)


MIDDLEBURY = open(CALIB).read()


@pytest.mark.parametrize("edit, expect", [
    (lambda t: t.replace("baseline=193.001", "baseline=0"), "zero baseline"),
    (lambda t: t.replace("cam1=[994.978", "cam1=[990.0"), "inconsistent: cam1's focal length"),
    (lambda t: t.replace("doffs=31.086", "doffs=12"), "inconsistent: cam1's cx - cam0's cx"),
    (lambda t: t.replace("0 994.978 254.877; 0 0 1]\ncam1", "0 994.978 254.877]\ncam1"),
     "cam0 must be a 3x3 matrix"),
    (lambda t: t.replace("width=741\n", ""), "width is missing"),
    (lambda t: t.replace("width=741", "width=wide"), "width must be a number"),
    (lambda t: "just some text\n", "neither a Middlebury calib.txt"),
])
def test_a_bad_middlebury_calibration_is_one_error_naming_the_file(tmp_path, edit, expect):
    path = tmp_path / "calib.txt"
    path.write_text(edit(MIDDLEBURY))
    with pytest.raises(ConfigError) as info:
        calibration.load(str(path))
    message = str(info.value)
    assert message.startswith("calibration {}: ".format(path)) and expect in message, message
    assert "\n" not in message


@pytest.mark.parametrize("t, skip, expect", [
    ((0.0, 0.0, 0.0), (), "zero baseline"),
    ((0.0, -120.0, 0.0), (), "not side by side"),
    ((-BASELINE, 0.0, 0.0), ("K2",), "K2 or M2 is missing"),
    ((-BASELINE, 0.0, 0.0), ("image_width",), "the image size is missing"),
])
def test_a_bad_opencv_calibration_is_one_error_naming_the_file(tmp_path, t, skip, expect):
    path = write_opencv_calibration(tmp_path / "stereo.yaml", t, skip)
    with pytest.raises(ConfigError, match=expect) as info:
        calibration.load(path)
    assert str(info.value).startswith("calibration {}: ".format(path))


def test_a_missing_or_unparsable_calibration_is_named(tmp_path):
    with pytest.raises(ConfigError, match="calibration .*nope.txt: file not found"):
        calibration.load(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("%YAML:1.0\n---\nK1: [1, 2\n")
    with pytest.raises(ConfigError, match=r"calibration .*bad.yaml: OpenCV cannot parse it"):
        calibration.load(str(bad))


def test_bad_calibration_in_edge_run_exits_78_naming_the_file(tmp_path):
    bad = tmp_path / "calib.txt"
    bad.write_text(MIDDLEBURY.replace("baseline=193.001", "baseline=0"))
    small = tmp_path / "small.txt"        # a calibration for another frame size
    small.write_text(MIDDLEBURY.replace("width=741", "width=640"))
    for calib, expect in ((bad, "zero baseline"), (small, "it is for 640x500 frames but")):
        rc, _, err = run_edge("run", "--source", stereo_uri(), "--calib", str(calib),
                              "--jsonl", str(tmp_path / "o.jsonl"),
                              "--state-dir", str(tmp_path / "state"))
        lines = [line for line in err.splitlines() if line.startswith("edge: error:")]
        assert rc == EXIT_CONFIG and len(lines) == 1, err
        assert "calibration {}".format(calib) in lines[0] and expect in lines[0], lines[0]


def test_stereo_source_and_calibration_must_come_together(tmp_path):
    for args, expect in ((["--source", stereo_uri()], "needs the pair's calibration"),
                         (["--source", LEFT, "--calib", CALIB], "has one view")):
        rc, _, err = run_edge("run", "--detector", "yolox-nano", "--jsonl",
                              str(tmp_path / "o.jsonl"), "--state-dir", str(tmp_path), *args)
        assert rc == EXIT_CONFIG and expect in err, err


@pytest.mark.parametrize("text, expect", [
    ("stereo:\n  depth_min_mm: 5000\n  depth_max_mm: 4000\n",
     "stereo.depth_min_mm (5000) must be below stereo.depth_max_mm (4000)"),
    ("stereo:\n  grid: 16by12\n", "stereo.grid: must be a string (or null) (got '16by12'); "
                                   "COLUMNSxROWS"),
    ("stereo:\n  num_disparities: 100\n", "a multiple of 16"),
    ("stereo:\n  block_size: 4\n", "an odd number"),
])
def test_stereo_settings_are_checked(tmp_path, text, expect):
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), {"detector": "yolox-nano"})
    assert str(info.value).startswith("config {}: ".format(path)), str(info.value)
    assert expect in str(info.value), str(info.value)


def test_depth_alone_publishes_its_grid(tmp_path, pair_depth):
    """stereo.calib without a detector is a run of its own: depth grids on the depth topic,
    each cell the median of the ground truth where the map has a depth (the first 64
    columns have none: no match can be searched there)."""
    path = tmp_path / "edge.yaml"
    path.write_text("stereo:\n  calib: {}\n  grid: 4x3\n".format(CALIB))
    jsonl = tmp_path / "out.jsonl"
    rc, _, err = run_edge("run", "-c", str(path), "--source", stereo_uri(), "--jsonl",
                          str(jsonl), "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    (message,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    schemas.validate("depth", message)
    assert message["grid"] == {"columns": 4, "rows": 3}
    truth, seen = truth_depth(), pair_depth[1].depth > 0
    cells = depth.grid_cells(741, 500, 4, 3)
    for (top, bottom, left, right), got in zip(cells, sum(message["depth_mm"], [])):
        part = truth[top:bottom, left:right][seen[top:bottom, left:right]]
        expected = np.median(part[part > 0])
        assert got is not None and abs(got - expected) / expected < 0.02, (got, expected)


# -- the stereo source -------------------------------------------------------------------

def test_two_image_files_are_one_pair():
    frame = read_one(open_source(stereo_uri()))
    assert np.array_equal(frame.image, cv2.imread(LEFT))
    assert np.array_equal(frame.right, cv2.imread(RIGHT))
    assert frame.name == "motorcycle_left.png" and frame.index == 0


def test_folders_pair_by_sorted_name_and_count_what_cannot_pair(tmp_path):
    left, right = tmp_path / "left", tmp_path / "right"
    left.mkdir()
    right.mkdir()
    images = [np.full((20, 30, 3), v, np.uint8) for v in (10, 20, 30)]
    for i, image in enumerate(images):
        cv2.imwrite(str(left / "{}.png".format(i)), image)
        cv2.imwrite(str(right / "{}.png".format(i)), 255 - image)
    (left / "1.png").write_bytes(b"not a png")        # pair 1 cannot be decoded
    cv2.imwrite(str(left / "3.png"), images[0])       # a left image without a right one
    source = open_source(stereo_uri(str(left), str(right)))
    source.open()
    frame, got = Frame(0, (2, 2, 3)), []
    while source.read_into(frame):
        got.append((frame.name, int(frame.image[0, 0, 0]), int(frame.right[0, 0, 0])))
    source.close()
    assert got == [("0.png", 10, 245), ("2.png", 30, 225)]
    assert source.skipped == 1 and source.unpaired == 1 and not source.live


def test_a_side_by_side_camera_is_split_into_its_halves(tmp_path):
    both = tmp_path / "both.png"
    cv2.imwrite(str(both), np.hstack([cv2.imread(LEFT), cv2.imread(RIGHT)]))
    frame = read_one(open_source("stereo://?" + urlencode({"source": str(both),
                                                           "layout": "side-by-side"})))
    assert np.array_equal(frame.image, cv2.imread(LEFT))
    assert np.array_equal(frame.right, cv2.imread(RIGHT))


def test_two_video_files_are_read_frame_by_frame():
    uri = stereo_uri("test://?width=64&height=48&frames=3&fps=0",
                     "test://?width=64&height=48&frames=2&fps=0")
    source = open_source(uri)
    source.open()
    frame, count = Frame(0, (2, 2, 3)), 0
    while source.read_into(frame):
        count += 1
        assert np.array_equal(frame.image, frame.right)     # the same pattern frame
    source.close()
    assert count == 2 and source.unpaired == 1


def test_cameras_pair_by_capture_time_and_count_the_unpaired():
    """Two live cameras at 30 and 10 fps (their clocks start together, so every third frame
    of the fast one is taken with a frame of the slow one) and a 15 ms tolerance: each pair
    after the first leaves two frames of the fast camera without a partner, counted."""
    uri = stereo_uri("test://?width=64&height=48&fps=30", "test://?width=64&height=48&fps=10",
                     tolerance_ms="15")
    source = open_source(uri)
    assert source.live
    source.open()
    frame = Frame(0, (2, 2, 3))
    try:
        for _ in range(3):
            assert source.read_into(frame)
            assert frame.right.shape == frame.image.shape == (48, 64, 3)
    finally:
        source.close()
    assert source.unpaired >= 3, source.unpaired


def test_cameras_that_never_pair_fail_as_a_source_error(monkeypatch):
    from edge.stereo import source as stereo
    monkeypatch.setattr(stereo, "PAIR_TIMEOUT", 0.5)
    source = open_source(stereo_uri("test://?width=32&height=24&fps=20",
                                    "test://?width=32&height=24&fps=20", tolerance_ms="0"))
    source.open()
    try:
        with pytest.raises(SourceError, match="no pair of frames within 0 ms"):
            source.read_into(Frame(0, (2, 2, 3)))
    finally:
        source.close()


@pytest.mark.parametrize("query, expect", [
    ({"left": LEFT}, "give both views"),
    ({"left": LEFT, "right": RIGHT, "colour": "x"}, "unknown parameter 'colour'"),
    ({"left": LEFT, "right": RIGHT, "layout": "top-bottom"}, "layout='top-bottom' is not known"),
    ({"left": LEFT, "right": RIGHT, "layout": "side-by-side"}, "a side-by-side camera is one"),
    ({"left": LEFT, "right": "test://?fps=5"}, "must both be cameras/streams or both files"),
    ({"left": LEFT, "right": RIGHT, "tolerance_ms": "-3"}, "tolerance_ms='-3' is not valid"),
    ({"left": stereo_uri(), "right": RIGHT}, "cannot hold another one"),
])
def test_stereo_uri_mistakes_are_config_errors(query, expect):
    with pytest.raises(ConfigError, match=expect):
        open_source("stereo://?" + urlencode(query))


# -- disparity -> depth --------------------------------------------------------------------

def test_the_conversion_graph_equals_numpy_and_a_per_pixel_loop(pair_depth):
    stereo, slot = pair_depth
    c, estimator = stereo.calibration, stereo.estimator
    constants = (c, estimator.scale_inverse, estimator.lowest_valid, 100.0, 10000.0)
    vectorised = depth.to_depth_numpy(stereo.raw, *(constants + (
        np.zeros((500, 741), np.float32), np.zeros((500, 741), bool))))
    looped = depth.to_depth_loop(stereo.raw, *(constants + (np.zeros((500, 741)),)))
    graph = slot.depth
    assert np.array_equal(graph > 0, looped > 0) and np.array_equal(vectorised > 0, looped > 0)
    assert np.allclose(graph, looped, rtol=1e-6) and np.allclose(vectorised, looped, rtol=1e-6)
    assert ((graph > 0) & (stereo.raw < 0)).sum() == 0           # no disparity: no depth
    assert graph[graph > 0].min() >= 100.0 and graph.max() <= 10000.0


def test_auto_conversion_takes_the_faster_and_both_give_the_same_map(cfg, maker, pair_depth):
    stereo = depth.StereoDepth(calibration.load(CALIB), maker, 741, 500, cfg["stereo"])
    assert stereo.converter in ("graph", "numpy")
    assert len(stereo.timings["graph"]) == len(stereo.timings["numpy"]) == 15
    slot = stereo.slot()
    stereo.compute(cv2.imread(LEFT), cv2.imread(RIGHT), slot)
    graph = pair_depth[1].depth
    for converter in ("graph", "numpy"):
        stereo.convert(slot, converter)
        assert np.array_equal(slot.depth > 0, graph > 0)
        assert np.allclose(slot.depth, graph, rtol=1e-6)


def test_the_conversion_graph_is_one_tensorrt_8_2_parses():
    model = depth.conversion_model(640, 480, calibration.load(CALIB), 16, 0, 100.0, 10000.0)
    assert trtcheck.problems(model, (8, 2)) == []


def test_depth_limits_cut_the_map(cfg, maker):
    settings = dict(cfg["stereo"], depth_min_mm=2500.0, depth_max_mm=3000.0)
    stereo = depth.StereoDepth(calibration.load(CALIB), maker, 741, 500, settings)
    slot = stereo.slot()
    stereo.compute(cv2.imread(LEFT), cv2.imread(RIGHT), slot)
    known = slot.depth[slot.depth > 0]
    assert known.size > 1000 and known.min() >= 2500.0 and known.max() <= 3000.0


def test_accuracy_against_the_ground_truth_meets_the_targets(tmp_path):
    """tools/depth_accuracy.py, the figures of the README: density, median and large errors
    of the depth map, and the motorcycle's spatial.z against the ground truth."""
    out = tmp_path / "accuracy.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "depth_accuracy.py"),
                           "--json", str(out), "--state-dir", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()[-2000:]
    figures = json.loads(out.read_text())
    assert figures["density"] >= 0.80
    assert figures["median_error_percent"] <= 1.0
    assert figures["over_5_percent_share"] <= 0.08
    assert figures["motorcycle_z_error_percent"] <= 5.0
    assert "MISSED" not in proc.stdout.decode()


# -- spatial, grid, picture ----------------------------------------------------------------

def test_spatial_is_the_median_of_the_central_part_at_the_box_centre():
    c = calibration.load(CALIB)
    plane = np.full((500, 741), 2000.0, np.float32)
    plane[:, :370] = 3000.0                 # the box's left quarter is farther: outside
    box = [300.0, 100.0, 500.0, 300.0]      # central half: x 350..450, y 150..250
    plane[150:250, 350:370] = 3000.0        # 20 of 100 columns of the central part
    got = depth.spatial(plane, box, c, 0.5, 0.1)
    assert got["z"] == 2000.0
    assert got["x"] == pytest.approx((400.0 - CX) * 2000.0 / F, abs=0.05)
    assert got["y"] == pytest.approx((200.0 - CY) * 2000.0 / F, abs=0.05)
    sparse = np.zeros((500, 741), np.float32)
    sparse[150:155, 350:450] = 1500.0       # 5 % of the central part has a depth
    assert depth.spatial(sparse, box, c, 0.5, 0.1) is None
    assert depth.spatial(sparse, box, c, 0.5, 0.04)["z"] == 1500.0
    assert depth.spatial(plane, [800.0, 10.0, 900.0, 50.0], c) is None      # off the image


def test_grid_medians_per_cell():
    depth_map = np.zeros((480, 640), np.float32)
    depth_map[:240, :320] = 1000.0
    depth_map[240:, 320:] = np.linspace(2000, 4000, 240 * 320).reshape(240, 320)
    cells = depth.grid_cells(640, 480, 2, 2)
    assert depth.grid_medians(depth_map, cells, 2) == [[1000, None], [None, 3000]]


def test_a_colourised_depth_picture_marks_the_unknown_black(pair_depth):
    from edge import draw
    picture = draw.depth(pair_depth[1].depth)
    assert picture.shape == (500, 741, 3) and picture.dtype == np.uint8
    assert (picture[pair_depth[1].depth == 0] == 0).all()
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50


# -- the depth task ------------------------------------------------------------------------

def stereo_tasks(cfg, maker, uri=None, detector="yolox-nano", **stereo):
    settings = dict(cfg, detector=detector, stereo=dict(cfg["stereo"], **stereo))
    source = open_source(uri or stereo_uri())
    return source, daemon.build_tasks(settings, maker, None, source)


def test_files_get_the_depth_of_their_own_pair(tmp_path, model_dir):
    """Two pairs with the same left image, the second's right view shifted 8 px (8 px more
    disparity): each detection's spatial.z is its own pair's, as the ground truth says."""
    left, right = tmp_path / "left", tmp_path / "right"
    left.mkdir()
    right.mkdir()
    image = cv2.imread(RIGHT)
    shifted = np.zeros_like(image)
    shifted[:, :-8] = image[:, 8:]
    for name, view in (("a.png", image), ("b.png", shifted)):
        os.symlink(LEFT, str(left / name))
        cv2.imwrite(str(right / name), view)
    jsonl = tmp_path / "out.jsonl"
    rc, _, err = run_edge("run", "--source", stereo_uri(str(left), str(right)),
                          "--calib", CALIB, "--detector", "yolox-nano", "--jsonl", str(jsonl),
                          "--model-dir", model_dir, "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    messages = [json.loads(line) for line in jsonl.read_text().splitlines()]
    messages = [m for m in messages if "detections" in m]     # not the tracking events
    assert [m["frame"]["name"] for m in messages] == ["a.png", "b.png"]
    disparity = np.load(os.path.join(PAIR, "motorcycle_disp.npz"))["arr_0"]
    bikes = []
    for message, extra in zip(messages, (0, 8)):
        bike = next(d for d in message["detections"] if d["label"] == "motorcycle")
        left_, top, right_, bottom = depth.box_region(bike["box"], 0.5, 741, 500)
        part = disparity[top:bottom, left_:right_]
        expected = np.median(F * BASELINE / (part[np.isfinite(part)] + extra + DOFFS))
        assert abs(bike["spatial"]["z"] - expected) / expected < 0.03, (extra, bike, expected)
        schemas.validate("detections", message)
        bikes.append(bike["spatial"]["z"])
    assert bikes[1] < 0.95 * bikes[0]


def test_cameras_never_wait_for_depth(cfg, maker):
    """Live mode: without a map spatial is null at once; then the newest map serves frames
    captured within stereo.max_age of it, and not older ones."""
    c = calibration.load(CALIB)
    task = DepthTask(maker, c, dict(cfg["stereo"], max_age=1.0), sync=False)
    frame = read_one(open_source(stereo_uri()))
    box = {"box": [110.0, 65.0, 710.0, 446.0]}
    started = time.monotonic()
    task.add_spatial(frame, [box])
    assert box["spatial"] is None and time.monotonic() - started < 0.5
    task.prepare(frame)
    task.process(frame)
    later = Frame(1, (2, 2, 3))
    later.index, later.ts = 1, frame.ts + 0.5
    task.add_spatial(later, [box])
    assert 2000 < box["spatial"]["z"] < 2800
    later.ts = frame.ts + 5.0
    task.add_spatial(later, [box])
    assert box["spatial"] is None


def test_depth_frames_allocate_nothing_that_grows(cfg, maker):
    source, (task,) = stereo_tasks(cfg, maker, detector=None, grid="16x12")
    frame = read_one(source)
    task.prepare(frame)
    for _ in range(3):
        task.process(frame)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20):
        frame.index += 1
        messages = task.process(frame)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(messages) == 1 and len(messages[0]["depth_mm"]) == 12
    assert grown < 64 * 1024, grown


def test_a_snapshot_can_show_the_depth_map(cfg, maker):
    source, (task,) = stereo_tasks(cfg, maker, detector=None)
    frame = read_one(source)
    task.prepare(frame)

    class App:        # the daemon's attributes Commands reads
        device, started, tasks = "cam1", time.time(), [task]
        link = mqtt.MqttLink(mqtt.parse_url("mqtt://127.0.0.1:1"), "cam1")   # never started

        def next_frame(self, timeout=5.0):
            return frame.image.copy(), frame.index
    commands = Commands(App())
    _, reply = commands.handle("snapshot", json.dumps({"id": "s1", "depth": True}).encode())
    assert not reply["ok"] and reply["error"]["code"] == "unavailable"   # no map yet
    task.process(frame)
    _, reply = commands.handle("snapshot", json.dumps({"id": "s2", "depth": True,
                                                       "max_bytes": 400000}).encode())
    schemas.validate("reply", reply)
    assert reply["ok"] and reply["result"]["frame"]["width"] == 2 * 741


# -- edge depth ----------------------------------------------------------------------------

def test_edge_depth_writes_npy_and_png(tmp_path):
    npy, png = tmp_path / "depth.npy", tmp_path / "depth.png"
    for out in (npy, png):
        rc, text, err = run_edge("depth", LEFT, RIGHT, "--calib", CALIB, "--out", str(out),
                                 "--state-dir", str(tmp_path / "state"))
        assert rc == 0, err
        assert str(out) in text and "of pixels with a depth" in text
    mm = np.load(str(npy))
    assert mm.dtype == np.float32 and mm.shape == (500, 741)
    known = np.isfinite(mm)
    truth = truth_depth()
    both = known & (truth > 0)
    assert both.sum() / float((truth > 0).sum()) >= 0.8
    assert np.median(np.abs(mm[both] - truth[both]) / truth[both]) < 0.01
    sixteen = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert sixteen.dtype == np.uint16 and np.array_equal(sixteen > 0, known)
    assert np.abs(sixteen[known] - mm[known]).max() <= 0.5


@pytest.mark.parametrize("args, expect", [
    ([LEFT, RIGHT, "--calib", CALIB, "--out", "depth.tiff"], "--out depth.tiff: use a .npy"),
    ([LEFT, RIGHT, "--calib", "missing.txt", "--out", "d.npy"], "missing.txt: file not found"),
    ([LEFT, RIGHT, "--out", "d.npy"], "no calibration file given"),
    ([PAIR, RIGHT, "--calib", CALIB, "--out", "d.npy"], "is not an image file"),
])
def test_edge_depth_mistakes_exit_78(tmp_path, args, expect):
    rc, _, err = run_edge("depth", "--state-dir", str(tmp_path), *args)
    assert rc == EXIT_CONFIG and expect in err, err


def test_depth_bench_reports_every_figure(cfg, maker, tmp_path):
    """edge.bench.depth on a short run: the figures exist and are sane (speeds are read
    from `edge bench --stereo`, never asserted as timings)."""
    from edge import cards, mqtt
    from edge.bench import depth as benchdepth
    from edge.bench.replay import start_local_broker
    broker, url = start_local_broker(str(tmp_path))
    link = mqtt.MqttLink(mqtt.parse_url(url), "bench", "edge", queue_limit=10000)
    link.start()
    try:
        link.connected.wait(5)
        figures = benchdepth.bench_depth(dict(cfg, model_dir=cfg["model_dir"]), maker,
                                         cards.load("yolox-nano"), stereo_uri(), CALIB, 320,
                                         240, link, 0, 12, rounds=1, runs=3)
    finally:
        link.stop("done")
        broker.terminate()
    for key in ("disparity_ms", "convert_ms", "convert_numpy_ms", "convert_loop_ms",
                "convert_speedup", "box_ms", "density"):
        assert figures[key] > 0, key
    with_depth = figures["with_depth"]
    assert with_depth["detect_fps"] > 0 and with_depth["solo_detect_fps"] > 0
    assert with_depth["depth_hz"] > 0 and len(benchdepth.table_lines(figures)) == 3
