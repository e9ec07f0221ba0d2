"""Camera motion compensation (edge.tracking.motion): the estimate on real pictures moved by
known motions, the tracker and the lines following the camera, the robot's rotation, and
what `edge run` reports. The benchmark over held-out clips is tests/test_bench_motion.py."""

import math
import os

import cv2
import numpy as np
import pytest

from edge import cards, config, schemas, validate
from edge.frames import Frame
from edge.tracking import CameraTracking
from edge.tracking.kalman import BoxKalman
from edge.tracking.motion import (CameraMotion, ImageMotion, RobotMotion, apply, describe,
                                  identity)
from edge.tracking.tracker import Tracker
from tests.conftest import COCO8

CARD = cards.load("yolox-nano")
PERSON = 0
SIZE = (640, 480)
CORNERS = np.array([[0, 0], [640, 0], [0, 480], [640, 480], [320, 240]], np.float64)


def scene(name="000000000049.jpg", split="val"):
    """A real photograph enlarged to 1600x1200: the world the camera looks at."""
    image = cv2.imread(os.path.join(COCO8, "images", split, name))
    return cv2.resize(image, (1600, 1200))


def view(world, x, y, angle=0.0, zoom=1.0):
    """The 640x480 picture of a camera centred on world (x, y), turned `angle` degrees
    (counter-clockwise on the screen) and zoomed; and the matrix world -> picture."""
    matrix = cv2.getRotationMatrix2D((x, y), angle, zoom)
    matrix[:, 2] += (SIZE[0] * 0.5 - x, SIZE[1] * 0.5 - y)
    return cv2.warpAffine(world, matrix, SIZE, borderMode=cv2.BORDER_REPLICATE), matrix


def between(a, b):
    """The motion from picture a to picture b, given each one's world -> picture matrix."""
    full = np.vstack([b, [0, 0, 1]]) @ np.linalg.inv(np.vstack([a, [0, 0, 1]]))
    return full[:2]


def error_px(estimated, true):
    """The largest distance, over the picture's corners and centre, between where the two
    motions take them."""
    return float(np.abs(apply(estimated, CORNERS) - apply(true, CORNERS)).max())


def frame_of(image, index, ts=None):
    frame = Frame(0, (SIZE[1], SIZE[0], 3))
    frame.image[:] = image
    frame.index = index
    frame.ts = 1000.0 + index / 15.0 if ts is None else ts
    return frame


# -- the estimate --------------------------------------------------------------------------

@pytest.mark.parametrize("step", [
    dict(dx=12.0, dy=0.0),                          # a pan
    dict(dx=3.0, dy=-2.0, zoom=1.012),              # a slow pan while zooming in
    dict(dx=-6.0, dy=9.0, angle=1.5),               # vibration: a jolt and a roll
])
def test_a_known_motion_is_found_to_a_pixel(step):
    world = scene()
    estimator = ImageMotion()
    x, y, angle, zoom = 800.0, 600.0, 0.0, 1.0
    previous = None
    errors = []
    for i in range(8):
        picture, matrix = view(world, x, y, angle, zoom)
        found = estimator.estimate(picture, np.zeros((0, 4)))
        if previous is None:
            assert found is None                    # nothing to compare the first with
        else:
            assert found is not None, i
            errors.append(error_px(found, between(previous, matrix)))
        previous = matrix
        x, y = x + step["dx"], y + step["dy"]
        angle += step.get("angle", 0.0)
        zoom *= step.get("zoom", 1.0)
    assert max(errors) < 1.0, errors


def test_objects_moving_on_their_own_do_not_pull_the_estimate():
    """A pan of 5 px while a big patch (a third of the picture) moves 20 px the other way:
    its box is masked out, as the detector's boxes are, and RANSAC keeps the scene."""
    world = scene()
    patch = cv2.resize(scene("000000000025.jpg", "train"), (220, 220))
    estimator = ImageMotion()
    previous = None
    errors = []
    for i in range(6):
        picture, matrix = view(world, 800.0 + 5.0 * i, 600.0)
        left = 300 - 20 * i
        picture[130:350, left:left + 220] = patch
        boxes = np.array([[left, 130, left + 220, 350]], np.float64)
        found = estimator.estimate(picture, boxes)
        if previous is not None:
            errors.append(error_px(found, between(previous, matrix)))
        previous = matrix
    assert max(errors) < 1.0, errors


def test_a_blank_wall_gives_no_motion_and_is_counted():
    motion = CameraMotion("auto")
    wall = np.full((SIZE[1], SIZE[0], 3), 128, np.uint8)
    for i in range(5):
        assert motion.estimate(frame_of(wall, i), np.zeros((0, 4))) is None
    summary = motion.summary()
    # the first frame has nothing to compare with: not a failure
    assert (summary["fits"], summary["failures"]) == (0, 4), summary
    assert motion.last is None


def test_off_estimates_nothing():
    motion = CameraMotion("off")
    world = scene()
    for i in range(3):
        assert motion.estimate(frame_of(view(world, 800 + 10 * i, 600)[0], i),
                               np.zeros((0, 4))) is None
    assert motion.summary()["fits"] == 0 and motion.image is None


def test_describe_names_the_scene_motion_in_the_picture():
    world = scene()
    a = view(world, 800.0, 600.0)[1]
    b = view(world, 812.0, 600.0, angle=2.0, zoom=1.05)[1]
    said = describe(between(a, b), *SIZE)
    # the camera moved right: the scene at the old centre, 12 px left of the new one, moved
    # left, turned counter-clockwise on the screen (towards the bottom) and zoomed
    turn = math.radians(2.0)
    assert said["dx"] == pytest.approx(-12.0 * 1.05 * math.cos(turn), abs=0.01)
    assert said["dy"] == pytest.approx(12.0 * 1.05 * math.sin(turn), abs=0.01)
    assert said["scale"] == pytest.approx(1.05, abs=1e-4)
    assert said["angle"] == pytest.approx(2.0, abs=1e-3)
    schemas.validate("detections", {
        "v": 1, "device": "cam1", "model": "yolox-nano", "seq": 1,
        "frame": {"index": 0, "ts": 1.0, "width": 640, "height": 480, "name": None},
        "latency_ms": {"total": 1.0, "infer": 1.0}, "detections": [], "camera_motion": said})


# -- the robot's rotation --------------------------------------------------------------------

def test_the_robots_rotation_moves_the_picture_as_a_camera_turning():
    robot = RobotMotion()
    assert robot.motion(0.1, *SIZE) is None         # nothing sent yet
    robot.put(0.0, 0.2, 0.0, 500.0)                  # turning right at 0.2 rad/s
    shift = robot.motion(0.1, *SIZE)
    # the scene moves left by f * wy * dt = 10 px; nothing else
    assert np.allclose(shift, [[1, 0, -10.0], [0, 1, 0]])
    robot.put(-0.1, 0.0, 0.0, 500.0)                 # tilting up (wx < 0): the scene moves up
    assert np.allclose(robot.motion(0.1, *SIZE), [[1, 0, 0], [0, 1, -5.0]])
    robot.put(0.0, 0.0, math.radians(10), 500.0)     # rolling clockwise, seen from behind
    said = describe(robot.motion(0.1, *SIZE), *SIZE)
    # the picture turns the other way (counter-clockwise on the screen) about its centre
    assert said["angle"] == pytest.approx(1.0, abs=1e-6)
    assert (said["dx"], said["dy"]) == (0.0, 0.0)
    assert robot.motion(0.1, *SIZE, now=robot._latest[4] + 1.0) is None   # stale


def test_robot_mode_uses_only_the_robot_and_counts_no_failures():
    robot = RobotMotion()
    motion = CameraMotion("robot", robot)
    world = scene()
    assert motion.estimate(frame_of(view(world, 800, 600)[0], 0), np.zeros((0, 4))) is None
    assert motion.estimate(frame_of(view(world, 810, 600)[0], 1), np.zeros((0, 4))) is None
    robot.put(0.0, 0.3, 0.0, 400.0)
    found = motion.estimate(frame_of(view(world, 820, 600)[0], 2), np.zeros((0, 4)))
    assert np.allclose(found, [[1, 0, -0.3 * 400 / 15.0], [0, 1, 0]])
    summary = motion.summary()
    assert (summary["fits"], summary["from_robot"], summary["failures"]) == (1, 1, 0)


def test_auto_prefers_a_fresh_robot_rotation_over_the_picture():
    robot = RobotMotion()
    motion = CameraMotion("auto", robot)
    world = scene()
    motion.estimate(frame_of(view(world, 800, 600)[0], 0), np.zeros((0, 4)))
    found = motion.estimate(frame_of(view(world, 812, 600)[0], 1), np.zeros((0, 4)))
    assert found[0, 2] == pytest.approx(-12.0, abs=0.5)      # from the picture
    robot.put(0.0, 0.0, 0.0, 400.0)                            # the robot says: still
    found = motion.estimate(frame_of(view(world, 824, 600)[0], 2), np.zeros((0, 4)))
    assert np.allclose(found, identity())
    assert motion.summary()["from_robot"] == 1 and motion.summary()["fits"] == 2


# -- the filter and the tracker follow the camera --------------------------------------------

def test_the_filter_moves_boxes_and_their_uncertainty_with_the_camera():
    kalman = BoxKalman(4)
    slots = np.array([0, 1])
    kalman.start(slots, np.array([[100, 100, 140, 200], [300, 50, 320, 90]], np.float64))
    var_before = kalman.var_p[slots].copy()
    motion = np.array([[1.1, 0.0, -30.0], [0.0, 1.1, 12.0]])     # zoom 10 %, then shift
    kalman.warp(slots, motion)
    boxes = kalman.boxes(slots)
    expected = np.hstack([apply(motion, np.array([[100, 100], [300, 50]], np.float64)),
                          apply(motion, np.array([[140, 200], [320, 90]], np.float64))])
    assert np.allclose(boxes, expected)
    assert np.allclose(kalman.var_p[slots], var_before * 1.21)
    untouched = BoxKalman(4)
    untouched.start(slots, np.array([[100, 100, 140, 200], [300, 50, 320, 90]], np.float64))
    untouched.warp(np.zeros(0, np.intp), motion)
    assert np.allclose(untouched.boxes(slots), [[100, 100, 140, 200], [300, 50, 320, 90]])


def test_a_fast_pan_keeps_ids_with_compensation_and_breaks_them_without():
    """Three still objects; the camera pans 45 px a frame, more than their boxes' width
    keeps overlapping after the filter learnt them still: the ids survive only when the
    tracker is told."""
    boxes = np.array([[100, 100, 140, 200], [300, 120, 340, 220], [450, 150, 480, 230]],
                     np.float64)

    def run(compensate):
        """The ids each object was given, by object."""
        tracker = Tracker(max_lost=5)
        shift = np.array([[1.0, 0.0, -45.0], [0.0, 1.0, 0.0]])
        given = [set() for _ in boxes]
        for i in range(30):
            # still for 10 frames (the filter learns no velocity), then a pan
            offset = 0.0 if i < 10 else -45.0 * (i - 9)
            moved = boxes + [offset, 0, offset, 0]
            seen = np.flatnonzero(moved[:, 0] > 0)           # those still in the picture
            result = tracker.update(moved[seen], np.full(seen.size, 0.9),
                                    np.zeros(seen.size, np.int64), i, SIZE,
                                    shift if compensate and i >= 10 else None)
            for j, track_id in zip(seen, result.ids):
                if track_id:
                    given[j].add(int(track_id))
        return given

    kept, lost = run(True), run(False)
    assert [len(ids) for ids in kept] == [1, 1, 1], kept
    # without: switches (an object given another's id, or new ones)
    assert sum(len(ids) for ids in lost) > 3, lost


def _track_settings(**track):
    return validate.check(track, config.SPEC["track"], "test", "track.")


def test_a_pan_alone_never_crosses_a_line_an_object_walking_does():
    """A line down the middle of the picture; the camera pans right over a real scene, 8 px
    a frame. A still person drifts left across the line in the picture: the camera's doing,
    no crossing. A person walking right at 14 px a frame drifts right in the picture and
    crosses it by walking: one crossing."""
    line = {"name": "middle", "points": [[320, 0], [320, 480]], "direction": "both"}
    world = scene()

    def people(i):
        picture, matrix = view(world, 800.0 + 8.0 * i, 600.0)
        still = apply(matrix, np.array([[900.0, 380.0], [940.0, 560.0]]))
        walker = apply(matrix, np.array([[680.0 + 14.0 * i, 620.0],
                                         [720.0 + 14.0 * i, 800.0]]))
        return picture, still, walker

    tracking = CameraTracking(_track_settings(lines=[line]), CARD, "cam1", camera="pan-line")
    events = []
    for i in range(40):
        picture, still, walker = people(i)
        rows = np.array([list(still.ravel()) + [0.9, PERSON],
                         list(walker.ravel()) + [0.9, PERSON]], np.float32)
        _, new = tracking.update(rows, frame_of(picture, i))
        events.extend(new)
    for event in events:
        schemas.validate("events", event)
    starts = {e["track_id"]: e["box"][0] for e in events if e["type"] == "track_start"}
    assert len(starts) == 2, events
    still_id = max(starts, key=lambda k: starts[k])        # it starts right of the walker
    walker_id = [k for k in starts if k != still_id][0]
    crossings = [(e["track_id"], e["direction"]) for e in events if e["type"] == "line_cross"]
    # drawn downwards, the line's right-hand side is the picture's left: walking right in
    # the picture is right_to_left
    assert crossings == [(walker_id, "right_to_left")], events
    assert tracking.motion.summary()["fits"] == 39

    # without compensation the pan alone makes the still person "cross" too
    plain = CameraTracking(_track_settings(lines=[line], motion="off"), CARD, "cam1",
                           camera="pan-line-off")
    crossed = []
    for i in range(40):
        picture, still, _ = people(i)
        _, new = plain.update(np.array([list(still.ravel()) + [0.9, PERSON]], np.float32),
                              frame_of(picture, i))
        crossed += [e["direction"] for e in new if e["type"] == "line_cross"]
    assert crossed == ["left_to_right"]


def test_track_motion_is_checked_like_every_setting():
    with pytest.raises(Exception) as error:
        _track_settings(motion="gyro")
    assert "track.motion" in str(error.value) and "auto" in str(error.value)
