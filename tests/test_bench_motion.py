"""Tracking under camera motion (tools/bench_motion.py): the held-out coco8 images in clips of
a zooming, a panning and a shaking camera, yolox-nano through edge's own engine, and edge's
tracking with `track.motion: auto` (the daemon's code path), `off`, and the true motion.

Detections are cached per clip in the tool's folder under the temp folder (keyed by the
model, the engine code, the backend and the clip): about 35 s the first time on the 2-core
host, seconds after.
"""

import os
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_motion  # noqa: E402

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(bench_motion.MODELS, "yolox_nano.onnx")) or
    not os.path.isdir(os.path.join(bench_motion.COCO8, "val")),
    reason="the shared models or coco8 are missing (../shared)")

PROFILES = bench_motion.PROFILES


@pytest.fixture(scope="module")
def results():
    clips, detector = bench_motion.prepare("val")
    profiles = bench_motion.evaluate(clips, detector.card, detector.task.floor,
                                     trackers=("edge off", "edge auto", "edge true"))
    # counted on what is published: boxes from the card's score threshold, with their ids
    return {profile: {who: t["published"] for who, t in r["trackers"].items()}
            for profile, r in profiles.items()}, profiles


@pytest.mark.parametrize("profile", PROFILES)
def test_at_least_ten_steady_objects_per_profile(results, profile):
    counts, _ = results
    assert counts[profile]["edge auto"]["steady"] >= 10, counts[profile]


@pytest.mark.parametrize("profile", PROFILES)
def test_the_estimated_motion_loses_no_id_the_true_motion_keeps(results, profile):
    counts, profiles = results
    auto, true = counts[profile]["edge auto"], counts[profile]["edge true"]
    assert auto["lost"] <= true["lost"], counts[profile]
    assert auto["switches"] <= true["switches"], counts[profile]
    motion = profiles[profile]["motion"]
    # a fit nearly every frame, within a pixel or two at the frame's corners
    assert motion["failures"] <= 0.1 * profiles[profile]["frames"], motion
    assert motion["error_px_p50"] < 1.0 and motion["error_px_p95"] < 3.0, motion


def test_without_compensation_more_objects_lose_their_id(results):
    counts, _ = results
    off = sum(counts[p]["edge off"]["lost"] for p in PROFILES)
    auto = sum(counts[p]["edge auto"]["lost"] for p in PROFILES)
    assert off > auto, counts


@pytest.mark.parametrize("profile", PROFILES)
def test_no_steady_object_loses_its_id_with_compensation(results, profile):
    counts, _ = results
    assert counts[profile]["edge auto"]["lost"] == 0, counts[profile]


def test_a_box_of_two_labelled_objects_together_is_no_object():
    import numpy as np
    # two horses side by side (coco8 val 000000000049.jpg's labels, canvas pixels), a rider
    # over them and a far-off person a few pixels tall
    labels = (np.array([[240, 1046, 428, 1312], [124, 1073, 244, 1301],
                        [299, 1095, 394, 1200], [281, 1201, 292, 1235]], np.float64),
              np.array([17, 17, 0, 0]))
    boxes = np.array([[122, 1070, 420, 1308],      # both horses as one
                      [252, 1069, 424, 1309],      # the right horse alone
                      [122, 1072, 282, 1305],      # the left horse alone
                      [280, 1100, 420, 1320]],     # the rider, legs and all
                     np.float64)
    together = bench_motion.two_together(boxes, np.array([17, 17, 17, 0]), labels)
    assert together.tolist() == [True, False, False, False]
