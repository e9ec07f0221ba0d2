"""Issue 24: what a hostile tester found in calibrations, zones and lines, and reloads.

Real calibration files (the Middlebury motorcycle pair's, copied and altered), real `edge run`
processes where the exit status and the message are the point, a real daemon reloaded by its
`reload` command and by SIGHUP on a real broker.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from urllib.parse import quote

import numpy as np
import pytest

from edge import config, validate
from edge.errors import EXIT_CONFIG, ConfigError
from edge.frames import Frame
from edge.stereo import calibration
from tests.conftest import ROOT, SHARED, Subscriber, run_edge

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
LEFT = os.path.join(PAIR, "motorcycle_left.png")
RIGHT = os.path.join(PAIR, "motorcycle_right.png")
CALIB = os.path.join(PAIR, "calib.txt")
MIDDLEBURY = open(CALIB).read()
CAM1 = "cam1=[994.978 0 342.279; 0 994.978 254.877; 0 0 1]\n"
F, CX, CY, DOFFS, BASELINE = 994.978, 311.193, 254.877, 31.086, 193.001


def altered(tmp_path, old, new, name="calib.txt", text=MIDDLEBURY):
    """A copy of the pair's calib.txt with `old` replaced by `new`."""
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return str(path)


def write_opencv(path, width=741, height=500, t=(-BASELINE, 0.0, 0.0), k1=None):
    """The pair's cameras as an OpenCV stereo calibration (YAML, as cv::FileStorage writes)."""
    import cv2
    k = np.array([[F, 0, CX], [0, F, CY], [0, 0, 1]])
    k2 = k.copy()
    k2[0, 2] = CX + DOFFS
    storage = cv2.FileStorage(str(path), cv2.FILE_STORAGE_WRITE)
    for key, value in (("image_width", width), ("image_height", height),
                       ("K1", k if k1 is None else k1), ("D1", np.zeros((1, 5))), ("K2", k2),
                       ("D2", np.zeros((1, 5))), ("R", np.eye(3)),
                       ("T", np.array(t, np.float64).reshape(3, 1))):
        storage.write(key, value)
    storage.release()
    return str(path)


def calibration_error(path):
    """The one-line ConfigError calibration.load raises for `path`."""
    with pytest.raises(ConfigError) as info:
        calibration.load(path)
    message = str(info.value)
    assert message.startswith("calibration {}: ".format(path)), message
    assert "\n" not in message and info.value.exit_code == EXIT_CONFIG
    return message


def stereo_uri():
    return "stereo://?left={}&right={}".format(quote(LEFT, safe=""), quote(RIGHT, safe=""))


def edge_run_error(tmp_path, calib):
    """`edge run` on the pair with `calib`: (exit status, its one `edge: error:` line)."""
    rc, _, err = run_edge("run", "--source", stereo_uri(), "--calib", calib, "--jsonl",
                          str(tmp_path / "o.jsonl"), "--state-dir", str(tmp_path / "state"))
    lines = [line for line in err.splitlines() if line.startswith("edge: ")]
    assert len(lines) == 1, err
    return rc, lines[0]


# -- 17, 23: calibration values that are not numbers, or absurd ------------------------------

@pytest.mark.parametrize("old, new, words", [
    ("width=741", "width=nan", "width must be a finite number"),
    ("width=741", "width=inf", "width must be a finite number"),
    ("width=741", "width=741.5", "whole number"),
    ("height=500", "height=0", "image size 741x0"),
    ("ndisp=80", "ndisp=nan", "ndisp must be a finite number"),
    ("ndisp=80", "ndisp=inf", "ndisp must be a finite number"),
    ("ndisp=80", "ndisp=2000", "ndisp 2000"),
    ("doffs=31.086", "doffs=nan", "doffs must be a finite number"),
    ("baseline=193.001", "baseline=nan", "baseline must be a finite number"),
    ("baseline=193.001", "baseline=inf", "baseline must be a finite number"),
    ("baseline=193.001", "baseline=-193", "baseline -193 mm"),
    ("baseline=193.001", "baseline=0.193", "in millimetres"),
    ("baseline=193.001", "baseline=1e9", "baseline 1e+09 mm"),
    ("cam0=[994.978 0 311.193", "cam0=[nan 0 311.193", "cam0 must hold finite numbers"),
])
def test_a_calibration_value_that_is_not_a_finite_sane_number_is_refused(tmp_path, old, new,
                                                                        words):
    message = calibration_error(altered(tmp_path, old, new))
    assert words in message, message


def test_doffs_beyond_the_image_is_refused(tmp_path):
    """Without cam1 nothing cross-checks doffs: 1e308 ran with no pixel given a depth."""
    text = MIDDLEBURY.replace(CAM1, "")
    for doffs in ("1e308", "-5000"):
        message = calibration_error(altered(tmp_path, "doffs=31.086", "doffs=" + doffs,
                                            text=text))
        assert "doffs" in message and "741" in message, message


def test_a_focal_length_no_lens_has_is_refused(tmp_path):
    text = MIDDLEBURY.replace(CAM1, "")
    for focal in ("1e300", "0.001"):
        message = calibration_error(altered(tmp_path, "994.978 0 311.193; 0 994.978",
                                            "{0} 0 311.193; 0 {0}".format(focal), text=text))
        assert "field of view" in message, message


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace("image_width: 741", "image_width: .nan"), "image size"),
    (lambda t: t.replace("image_width: 741", "image_width: .inf"), "image size"),
    (lambda t: t.replace("image_width: 741", "image_width: 741.5"), "whole number"),
    (lambda t: t.replace("K1: !!opencv-matrix\n   rows: 3", "K1: !!opencv-matrix\n   rows: 4"),
     "K1: 4x3 does not match its 9 numbers"),
    (lambda t: t.replace("K1: !!opencv-matrix\n   rows: 3\n   cols: 3",
                         "K1: !!opencv-matrix\n   rows: 100000\n   cols: 100000"),
     "K1: 100000x100000"),
    (lambda t: t.replace("T: !!opencv-matrix\n   rows: 3", "T: !!opencv-matrix\n   rows: 2"),
     "T: 2x1 does not match its 3 numbers"),
    (lambda t: re.sub(r"(K1: !!opencv-matrix\n(?:   .*\n)*?   data: \[ )[^,]+", r"\1.nan", t),
     "K1 must hold finite numbers"),
    (lambda t: re.sub(r"(T: !!opencv-matrix\n(?:   .*\n)*?   data: \[ )[^,]+", r"\1-1e308", t),
     "baseline"),
    (lambda t: re.sub(r"(T: !!opencv-matrix\n(?:   .*\n)*?   data: \[ )[^,]+", r"\1-.inf", t),
     "T must hold finite numbers"),
    (lambda t: re.sub(r"(T: !!opencv-matrix\n(?:   .*\n)*?   data: \[ )[^,]+", r"\1-0.193", t),
     "in millimetres"),
    (lambda t: re.sub(r"(R: !!opencv-matrix\n(?:   .*\n)*?   data: \[ )[^,]+", r"\g<1>5.", t),
     "R is not a rotation"),
])
def test_an_opencv_calibration_with_nonsense_is_one_error_naming_the_key(tmp_path, edit, words):
    text = open(write_opencv(tmp_path / "good.yaml")).read()
    path = tmp_path / "stereo.yaml"
    path.write_text(edit(text))
    message = calibration_error(str(path))
    assert words in message, message


@pytest.mark.parametrize("old, new, words", [
    ("width=741", "width=nan", "width must be a finite number"),
    ("ndisp=80", "ndisp=inf", "ndisp must be a finite number"),
    ("baseline=193.001", "baseline=nan", "baseline must be a finite number"),
])
def test_edge_run_with_a_nan_calibration_exits_78_in_one_line(tmp_path, old, new, words):
    calib = altered(tmp_path, old, new)
    rc, line = edge_run_error(tmp_path, calib)
    assert rc == EXIT_CONFIG, line
    assert line.startswith("edge: error: calibration {}: ".format(calib)) and words in line, line


def test_edge_run_with_opencv_rows_that_do_not_match_the_data_exits_78(tmp_path):
    text = open(write_opencv(tmp_path / "good.yaml")).read()
    calib = tmp_path / "stereo.yaml"
    calib.write_text(text.replace("K2: !!opencv-matrix\n   rows: 3",
                                  "K2: !!opencv-matrix\n   rows: 2"))
    rc, line = edge_run_error(tmp_path, str(calib))
    assert rc == EXIT_CONFIG and "K2: 2x3 does not match its 9 numbers" in line, line
    calib.write_text(text.replace("image_width: 741", "image_width: .nan"))
    rc, line = edge_run_error(tmp_path, str(calib))
    assert rc == EXIT_CONFIG and "image size" in line, line


# -- 20: a calibration's image size is bounded before anything is allocated ----------------

PEAK = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[0] + ".err",
                                                                          "w"))
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_a_huge_calibration_image_size_is_refused_before_any_map_is_made(tmp_path):
    """16000 x 16000 in an OpenCV YAML peaked at 3.06 GB (the remap tables) before the size
    mismatch was found; now max_image_pixels refuses it first, in a process of ordinary size."""
    calib = write_opencv(tmp_path / "huge.yaml", 16000, 16000)
    message = calibration_error(calib)
    assert "16000x16000" in message and "max_image_pixels" in message, message
    script = tmp_path / "peak.py"
    script.write_text(PEAK)
    out = subprocess.check_output(
        [sys.executable, str(script), sys.executable, "-m", "edge", "run", "--source",
         stereo_uri(), "--calib", calib, "--jsonl", str(tmp_path / "o.jsonl"),
         "--state-dir", str(tmp_path / "state")], cwd=ROOT, timeout=120)
    rc, peak_kb = (int(v) for v in out.split())
    err = open(str(script) + ".err").read()
    assert rc == EXIT_CONFIG and "max_image_pixels" in err, err
    assert peak_kb < 600 * 1024, "edge run peaked at {} MB".format(peak_kb // 1024)


def test_the_size_limit_is_the_configured_one(tmp_path):
    calib = write_opencv(tmp_path / "small.yaml")
    assert calibration.load(calib, max_pixels=741 * 500).size == (741, 500)
    with pytest.raises(ConfigError, match=r"741x500 is 370500 pixels, over max_image_pixels "
                                          r"\(370499\)"):
        calibration.load(calib, max_pixels=741 * 500 - 1)


def test_a_calibration_file_larger_than_any_calibration_is_refused(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(MIDDLEBURY + "# padding\n" * 200000)
    assert "bytes" in calibration_error(str(path))


# -- 17: a reload with a bad calibration keeps the daemon and its configuration ------------

def test_a_reload_with_a_bad_calibration_keeps_the_running_configuration(broker, tmp_path):
    """The reload command replies with the calibration's error and nothing stops; SIGHUP
    with the same file leaves the pipeline running too; health says why; a fixed file
    reloads."""
    calib = tmp_path / "calib.txt"
    calib.write_text(MIDDLEBURY)
    camera = quote("test://?width=741&height=500&fps=10", safe="")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("health: {{interval: 1}}\nsource: stereo://?left={0}&right={0}\n"
                   "stereo: {{calib: {1}, grid: 4x3, max_hz: 5}}\n".format(camera, calib))
    sub = Subscriber(broker.port, "edge/#")
    log = open(str(tmp_path / "edge.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "-c", str(cfg), "--mqtt", broker.url,
         "--device-id", "cam1", "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def text():
        return open(str(tmp_path / "edge.log")).read()

    def reply(request_id):
        assert sub.wait_for(lambda s: s.json("reply/" + request_id), 20), text()
        return sub.json("reply/" + request_id)[0]

    def depth_flows():
        before = len(sub.json("depth"))
        return sub.wait_for(lambda s: len(s.json("depth")) > before + 3, 20)

    try:
        assert sub.wait_for(lambda s: s.json("depth"), 60), text()
        calib.write_text(MIDDLEBURY.replace("width=741", "width=nan"))
        sub.client.publish("edge/cam1/cmd/reload", json.dumps({"id": "rl1"}), qos=1)
        answer = reply("rl1")
        assert answer["ok"] is False and answer["error"]["code"] == "failed", answer
        assert "calibration {}: width must be a finite number".format(calib) in \
            answer["error"]["message"], answer
        assert depth_flows(), text()
        proc.send_signal(signal.SIGHUP)
        assert sub.wait_for(lambda s: "reload failed" in text(), 20), text()
        assert depth_flows(), "the running configuration goes on: " + text()
        assert proc.poll() is None, text()
        health = sub.json("health")[-1]
        assert health["reload"]["ok"] is False and "width" in health["reload"]["error"]
        assert sub.json("status")[-1]["state"] != "offline"
        calib.write_text(MIDDLEBURY)
        sub.client.publish("edge/cam1/cmd/reload", json.dumps({"id": "rl2"}), qos=1)
        assert reply("rl2")["ok"] is True
        assert sub.wait_for(lambda s: (s.json("health")[-1].get("reload") or {}).get("ok"),
                            30), text()
        assert depth_flows(), text()
        assert "internal error" not in text() and "Traceback" not in text(), text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sub.close()
    assert proc.returncode == 0, text()


# -- 21, 23, 11: zones and lines ----------------------------------------------------------

def track_error(tmp_path, text):
    """The one-line ConfigError of a config file whose `track:` section is `text`."""
    path = tmp_path / "edge.yaml"
    path.write_text("detector: yolox-nano\ntrack:\n" + text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    message = str(info.value)
    assert message.startswith("config {}: ".format(path)) and "\n" not in message, message
    assert info.value.exit_code == EXIT_CONFIG
    return message


def square(i, size=10):
    return [[i, 0], [i + size, 0], [i + size, size], [i, size]]


def zones_yaml(zones):
    return "  zones: {}\n".format(json.dumps(zones))


def circle(count, cx=320, cy=240, radius=100):
    return [[round(cx + radius * np.cos(a), 1), round(cy + radius * np.sin(a), 1)]
            for a in np.linspace(0, 2 * np.pi, count, endpoint=False)]


@pytest.mark.parametrize("zones, points", [
    (config.MAX_ZONES, config.MAX_ALL_ZONE_POINTS // config.MAX_ZONES),     # a car park
    (config.MAX_ALL_ZONE_POINTS // config.MAX_ZONE_POINTS, config.MAX_ZONE_POINTS),
])
def test_as_many_zones_lines_and_points_as_the_limits_load(tmp_path, zones, points):
    zones = [{"name": "z{}".format(i), "points": circle(points)} for i in range(zones)]
    lines = [{"name": "l{}".format(i), "points": [[i, 0], [i, 480]], "direction": "to_right"}
             for i in range(config.MAX_LINES)]
    path = tmp_path / "edge.yaml"
    path.write_text("detector: yolox-nano\ntrack:\n" + zones_yaml(zones) +
                    "  lines: {}\n".format(json.dumps(lines)))
    loaded = config.load(str(path))["track"]
    assert len(loaded["zones"]) == len(zones) and len(loaded["lines"]) == config.MAX_LINES
    assert os.path.getsize(str(path)) < config.MAX_CONFIG_BYTES / 2    # the size limit's margin


def test_more_zones_lines_or_points_than_the_limits_are_refused_naming_the_key(tmp_path):
    many = [{"name": "z{}".format(i), "points": square(i)} for i in range(config.MAX_ZONES + 1)]
    message = track_error(tmp_path, zones_yaml(many))
    assert "track.zones: " in message and "at most {} zones".format(config.MAX_ZONES) in message
    lines = [{"name": "l{}".format(i), "points": [[i, 0], [i, 9]]}
             for i in range(config.MAX_LINES + 1)]
    message = track_error(tmp_path, "  lines: {}\n".format(json.dumps(lines)))
    assert "track.lines: " in message and "at most {} lines".format(config.MAX_LINES) in message
    message = track_error(tmp_path, zones_yaml([{"name": "z", "points": circle(
        config.MAX_ZONE_POINTS + 1)}]))
    assert "track.zones[0].points: " in message and \
        "at most {} points".format(config.MAX_ZONE_POINTS) in message
    assert len(message) < 400, message          # the value is shown short
    count = config.MAX_ALL_ZONE_POINTS // config.MAX_ZONE_POINTS + 1
    message = track_error(tmp_path, zones_yaml([{"name": "z{}".format(i), "points": circle(
        config.MAX_ZONE_POINTS)} for i in range(count)]))
    assert "track.zones: " in message and "at most {} points in all zones".format(
        config.MAX_ALL_ZONE_POINTS) in message, message


def test_a_config_file_too_large_to_be_one_is_refused_before_it_is_parsed(tmp_path):
    """200 000 zones: the YAML parse alone took minutes and a gigabyte."""
    path = tmp_path / "edge.yaml"
    with open(str(path), "w") as f:
        f.write("detector: yolox-nano\ntrack:\n  zones:\n")
        row = "    - {{name: z{}, points: [[0, 0], [10, 0], [10, 10], [0, 10]]}}\n"
        for i in range(200000):
            f.write(row.format(i))
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert time.monotonic() - started < 1.0
    message = str(info.value)
    assert message.startswith("config {}: ".format(path)) and "bytes" in message, message


@pytest.mark.parametrize("text, key, words", [
    ("  zones: [{name: a, points: [[0, 0], [.nan, 0], [9, 9]]}]\n", "track.zones[0].points[1]",
     "finite"),
    ("  zones: [{name: a, points: [[0, 0], [.inf, 0], [9, 9]]}]\n", "track.zones[0].points[1]",
     "finite"),
    ("  zones: [{name: a, points: [[0, 0], [1.0e+300, 0], [9, 9]]}]\n",
     "track.zones[0].points[1]", "1000000"),
    ("  lines: [{name: a, points: [[0, 0], [-.inf, 9]]}]\n", "track.lines[0].points[1]",
     "finite"),
    ("  lines: [{name: a, points: [[.nan, 0], [9, 9]]}]\n", "track.lines[0].points[0]",
     "finite"),
    ("  zones: [{name: a, points: [[0, 0], [10, 10], [10, 0], [0, 10]]}]\n",
     "track.zones[0].points", "edges cross"),
    ("  zones: [{name: a, points: [[0, 0], [20, 0], [20, 20], [10, -5], [0, 20]]}]\n",
     "track.zones[0].points", "edges cross"),
    ("  zones: [{name: a, points: [[0, 0], [10, 0], [20, 0]]}]\n", "track.zones[0].points",
     "all on one line"),
    ("  zones: [{name: \"a\\n\", points: [[0, 0], [9, 0], [9, 9]]}]\n", "track.zones[0].name",
     "no spaces"),
    ("  lines: [{name: \"door\\n\", points: [[0, 0], [9, 9]]}]\n", "track.lines[0].name",
     "no spaces"),
    ("  lines: [{name: door, points: [[320, 0]]}]\n", "track.lines[0].points",
     "2 points"),
    ("  lines: [{name: door, points: [[0, 100], [640, 100]], direction: to_left}]\n",
     "track.lines[0].direction", "to_top or to_bottom"),
    ("  lines: [{name: door, points: [[320, 0], [320, 480]], direction: to_bottom}]\n",
     "track.lines[0].direction", "to_left or to_right"),
])
def test_zones_and_lines_that_cannot_work_are_refused_with_the_reason(tmp_path, text, key,
                                                                      words):
    message = track_error(tmp_path, text)
    assert "{}: ".format(key) in message and words in message, message


def test_a_bow_tie_says_its_edges_cross_not_that_it_is_a_line(tmp_path):
    message = track_error(tmp_path, "  zones: [{name: a, points: [[0, 0], [10, 10], [10, 0], "
                                    "[0, 10]]}]\n")
    assert "one line" not in message, message
    assert "points[0] to points[1] and points[2] to points[3]" in message, message


def test_a_line_with_one_point_says_it_needs_two(tmp_path):
    message = track_error(tmp_path, "  lines: [{name: door, points: [[320, 0]]}]\n")
    assert "must be a list of 2 points" in message and "numbers" not in message, message


# -- 11: line directions named by the side of the picture crossed to -----------------------

def line_events(line, path, size=(640, 480)):
    """The line_cross directions of one person walking `path(i)` (box left edge, top)."""
    from edge import cards, schemas
    from edge.tracking import CameraTracking
    track = validate.check({"lines": [line]}, config.SPEC["track"], "test", "track.")
    tracking = CameraTracking(track, cards.load("yolox-nano"), "cam1", camera="dirs")
    frame = Frame(0, (size[1], size[0], 3))
    out = []
    for i in range(60):
        frame.index, frame.ts = i, 1000.0 + i / 10.0
        x, y = path(i)
        _, events = tracking.update(np.array([[x, y, x + 40, y + 100, 0.9, 0]], np.float32),
                                    frame)
        for event in events:
            schemas.validate("events", event)
        out += [e["direction"] for e in events if e["type"] == "line_cross"]
    return out, tracking.summary()["lines"]


def rightward(i):
    return 100 + 8 * i, 100


def leftward(i):
    return 580 - 8 * i, 100


def downward(i):
    return 300, 8 * i - 100


def test_to_right_counts_what_moves_right_in_the_picture_whichever_way_the_line_is_drawn():
    for points in ([[320, 0], [320, 480]], [[320, 480], [320, 0]]):
        line = {"name": "door", "points": points, "direction": "to_right"}
        crossed, _ = line_events(line, rightward)
        assert len(crossed) == 1, (points, crossed)
        assert line_events(line, leftward)[0] == [], points
        line["direction"] = "to_left"
        assert len(line_events(line, leftward)[0]) == 1 and \
            line_events(line, rightward)[0] == []


def test_to_bottom_and_to_top_on_a_horizontal_line():
    for points in ([[0, 240], [640, 240]], [[640, 240], [0, 240]]):
        line = {"name": "gate", "points": points, "direction": "to_bottom"}
        assert len(line_events(line, downward)[0]) == 1, points
        line["direction"] = "to_top"
        assert line_events(line, downward)[0] == [], points


def test_the_old_direction_names_keep_their_meaning():
    """left_to_right: from the left-hand side to the right-hand side walking from the first
    point to the second: on a line drawn downwards that is moving left in the picture."""
    line = {"name": "door", "points": [[320, 0], [320, 480]], "direction": "left_to_right"}
    assert line_events(line, leftward)[0] == ["left_to_right"]
    assert line_events(line, rightward)[0] == []
    line["direction"] = "right_to_left"
    assert line_events(line, rightward)[0] == ["right_to_left"]


def plain_inside(x, y, polygon):
    """The even-odd rule for one point, edge by edge, in plain Python."""
    inside = False
    for (x1, y1), (x2, y2) in zip(polygon, polygon[1:] + polygon[:1]):
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


def comb(x0, teeth=16, width=5.0):
    """A zone of 64 points whose vertical edges span the frame: every row crosses 32."""
    points = [[x0, 720.0]]
    x = x0
    for _ in range(teeth - 1):
        points += [[x, 10.0], [x + width, 10.0], [x + width, 700.0], [x + 2 * width, 700.0]]
        x += 2 * width
    return points + [[x, 10.0], [x + width, 10.0], [x + width, 720.0]]


def test_all_zones_at_once_agree_with_the_even_odd_rule_point_by_point():
    """The one-pass test of every zone (edge.tracking.zones.ZoneEdges) against a plain loop:
    polygons of every size, combs, points on vertex rows and edges, and nan."""
    from edge.tracking.zones import ZoneEdges
    rng = np.random.RandomState(7)
    polygons = [comb(100.0), comb(103.0)]
    for _ in range(40):
        count = rng.randint(3, config.MAX_ZONE_POINTS + 1)
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radius = rng.uniform(5, 300, count).round()
        cx, cy = rng.randint(0, 640), rng.randint(0, 480)
        polygons.append([[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))]
                         for r, a in zip(radius, angles)])
    points = rng.uniform(-50, 700, (300, 2))
    vertices = np.array([p for polygon in polygons for p in polygon])
    points[:100, 1] = vertices[rng.randint(0, len(vertices), 100), 1]    # on a vertex's row
    points[100:120] = vertices[rng.randint(0, len(vertices), 20)]         # on a vertex
    points[120, 0] = np.nan
    points[121, 1] = np.nan
    got = ZoneEdges([np.array(p) for p in polygons]).contains(points)
    want = np.array([[plain_inside(x, y, polygon) for polygon in polygons] for x, y in points])
    assert got.shape == (300, len(polygons)) and (got == want).all()
    assert want.any() and not want.all()
    assert not got[120:122].any()


# -- 21: the per-frame cost at the limits ----------------------------------------------------

def limit_regions(shape):
    """Zones of `shape` using every zone point the limits allow, and MAX_LINES lines, over
    a 1280x720 frame."""
    rng = np.random.RandomState(0)
    if shape == "combs":            # every row of the frame crosses 512 edges
        made = [comb(100.0 + 3 * i) for i in range(config.MAX_ALL_ZONE_POINTS // 64)]
    else:
        zones, points = LIMITS[shape]
        made = [circle(points, rng.uniform(200, 1080), rng.uniform(200, 520),
                       rng.uniform(60, 200)) for _ in range(zones)]
    lines = [{"name": "l{}".format(i), "points": [
        [rng.uniform(0, 1280), rng.uniform(0, 720)], [rng.uniform(0, 1280), rng.uniform(0, 720)]]}
        for i in range(config.MAX_LINES)]
    return validate.check({"zones": [{"name": "z{}".format(i), "points": p}
                                     for i, p in enumerate(made)], "lines": lines},
                          config.SPEC["track"], "test", "track.")


LIMITS = {"car park": (config.MAX_ZONES, config.MAX_ALL_ZONE_POINTS // config.MAX_ZONES),
          "outlines": (config.MAX_ALL_ZONE_POINTS // config.MAX_ZONE_POINTS,
                       config.MAX_ZONE_POINTS)}


def zone_step_ms(objects, shape, frames=60):
    """Median ms of Regions.move for `objects` moving tracks, zones and lines at the limits."""
    from edge.tracking.zones import Regions
    track = limit_regions(shape)
    regions = Regions(track["zones"], track["lines"], [None] * len(track["zones"]),
                      [None] * len(track["lines"]), 256)
    rng = np.random.RandomState(1)
    slots = np.arange(objects)
    classes = np.zeros(objects, np.int64)
    position = rng.uniform(0, 1, (objects, 2)) * (1240, 620)
    velocity = rng.uniform(-8, 8, (objects, 2))
    events = []

    def emit(*event):
        events.append(event)

    def boxes():
        return np.hstack([position, position + (40, 100)])
    regions.start(slots, classes, boxes(), 1280, 720, emit)
    times = []
    for _ in range(frames):
        position[:] = (position + velocity) % (1240, 620)
        b = boxes()
        started = time.perf_counter()
        regions.move(slots, classes, b, 1280, 720, emit)
        times.append((time.perf_counter() - started) * 1000.0)
    assert events
    return float(np.median(times))


@pytest.mark.timing
@pytest.mark.parametrize("shape", sorted(LIMITS) + ["combs"])
def test_zones_and_lines_at_their_limits_cost_a_few_milliseconds_a_frame(shape):
    """At the limits (MAX_LINES lines, and all the zone points there may be: as many small
    zones, as few large ones, or combs whose edges all span the frame), 50 objects (the
    bench's load) and 256 (max_tracks' default); docs/tracking.md reports these figures. The
    time includes the events, a few hundred a frame with 256 objects."""
    fifty, full = (zone_step_ms(objects, shape) for objects in (50, 256))
    print("{} at the limits: 50 objects {:.2f} ms, 256 objects {:.2f} ms".format(
        shape, fifty, full))
    assert fifty < 4.0 and full < 15.0, (fifty, full)
