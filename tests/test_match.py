"""Feature matching: Middlebury precision through `edge run`, coordinate mapping, references,
scheduling beside detection."""

import json
import os

import cv2
import numpy as np
import pytest

from edge import cards
from edge.errors import ConfigError, SourceError
from edge.references import ReferenceStore, name_from_path
from edge.tasks.match import cell_centres, verify
from tests.conftest import SHARED, run_edge

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
LEFT = os.path.join(PAIR, "motorcycle_left.png")
RIGHT = os.path.join(PAIR, "motorcycle_right.png")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def precision(matches, disparity, tolerance=16.0):
    """Share of matches (with known disparity) whose right point is within tolerance px."""
    rows = np.array([m[:4] for m in matches], np.float64)
    h, w = disparity.shape
    xs = np.clip(np.round(rows[:, 0]).astype(int), 0, w - 1)
    ys = np.clip(np.round(rows[:, 1]).astype(int), 0, h - 1)
    d = disparity[ys, xs]
    known = np.isfinite(d)
    error = np.hypot(rows[:, 2] - (rows[:, 0] - d), rows[:, 3] - rows[:, 1])
    return float((error[known] <= tolerance).mean()), int(known.sum())


def run_match(tmp_path, model_dir, source, reference, *extra):
    jsonl = str(tmp_path / "out.jsonl")
    rc, out, err = run_edge("run", "--matcher", "coarse-loftr", "--reference", reference,
                            "--source", source, "--model-dir", model_dir, "--state-dir",
                            str(tmp_path / "state"), "--jsonl", jsonl, *extra)
    assert rc == 0, err
    return read_jsonl(jsonl)


def test_middlebury_precision_through_edge_run(tmp_path, model_dir):
    messages = run_match(tmp_path, model_dir, RIGHT, LEFT)
    assert len(messages) == 1
    msg = messages[0]
    assert msg["reference"] == {"name": "motorcycle_left", "width": 741, "height": 500}
    assert (msg["frame"]["width"], msg["frame"]["height"]) == (741, 500)
    disparity = np.load(os.path.join(PAIR, "motorcycle_disp.npz"))["arr_0"]
    p, known = precision(msg["matches"], disparity)
    print("middlebury: {} matches, {} with known disparity, precision {:.3f}, {} inliers".format(
        msg["count"], known, p, msg["inliers"]))
    assert msg["count"] >= 300 and len(msg["matches"]) == msg["count"]
    assert p >= 0.95
    assert msg["homography"] is not None and len(msg["homography"]) == 9
    assert msg["inliers"] >= 8
    scores = [m[4] for m in msg["matches"]]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.2


def test_top_k_caps_the_list_but_count_is_full(tmp_path, model_dir):
    config = tmp_path / "edge.yaml"
    config.write_text("match: {top_k: 50}\n")
    msg = run_match(tmp_path, model_dir, RIGHT, LEFT, "-c", str(config))[0]
    assert len(msg["matches"]) == 50 and msg["count"] >= 300


def test_reference_and_frame_of_different_sizes_map_to_their_own_pixels(tmp_path, model_dir):
    """The frame is the reference scaled to 60% x 50%: every match must follow that scaling."""
    left = cv2.imread(LEFT)
    small = cv2.resize(left, (int(741 * 0.6), 250), interpolation=cv2.INTER_AREA)
    frame = str(tmp_path / "small.png")
    cv2.imwrite(frame, small)
    msg = run_match(tmp_path, model_dir, frame, LEFT)[0]
    assert msg["frame"]["width"] == small.shape[1] and msg["reference"]["width"] == 741
    rows = np.array([m[:4] for m in msg["matches"]])
    assert len(rows) >= 100
    # One coarse cell is 16 network px: 741/640*16 = 18.5 px in the reference.
    err = np.hypot(rows[:, 2] - rows[:, 0] * small.shape[1] / 741.0,
                   rows[:, 3] - rows[:, 1] * 0.5)
    assert np.median(err) <= 6.0 and (err <= 16).mean() >= 0.95
    h = np.array(msg["homography"]).reshape(3, 3)
    np.testing.assert_allclose(h[0, 0], small.shape[1] / 741.0, atol=0.03)
    np.testing.assert_allclose(h[1, 1], 0.5, atol=0.03)


def test_cell_centres_map_into_each_image():
    card = cards.load("coarse-loftr")
    ref = cell_centres(card, 741, 500)
    cur = cell_centres(card, 320, 240)
    assert ref.shape == cur.shape == (1200, 2)
    np.testing.assert_allclose(ref[0], [8 * 741 / 640, 8 * 500 / 480], rtol=1e-6)
    np.testing.assert_allclose(cur[41], [24 * 320 / 640, 24 * 240 / 480], rtol=1e-6)
    np.testing.assert_allclose(ref[-1], [(640 - 8) * 741 / 640, (480 - 8) * 500 / 480],
                               rtol=1e-6)


def test_homography_is_null_with_too_few_inliers():
    rows = np.array([[0, 0, 1, 1, 0.9], [10, 0, 11, 1, 0.9], [0, 10, 1, 11, 0.9]], np.float32)
    h, mask = verify(rows, 8.0, 8)
    assert h is None and not mask.any()
    grid = np.array([[x, y] for x in range(0, 100, 20) for y in range(0, 100, 20)], np.float32)
    rows = np.hstack([grid, grid + [5, 3], np.full((len(grid), 1), 0.5)]).astype(np.float32)
    h, mask = verify(rows, 2.0, 8)
    assert h is not None and mask.all()
    np.testing.assert_allclose(h.reshape(-1)[[2, 5]], [5, 3], atol=1e-3)


def test_reference_store_names_persistence_and_atomicity(tmp_path):
    store = ReferenceStore(str(tmp_path))
    image = cv2.imread(LEFT)
    assert store.put("dock-1", image) == {"name": "dock-1", "width": 741, "height": 500}
    for bad in ["../etc/passwd", "a/b", "", ".hidden", "x" * 65, "a b", "dock.png", None, 5]:
        with pytest.raises(ConfigError):
            store.put(bad, image)
    with pytest.raises(SourceError):
        store.put("tiny", image[:10, :10])
    with pytest.raises(SourceError):
        store.configure(str(tmp_path / "nope.png"))
    again = ReferenceStore(str(tmp_path))      # a restart
    assert again.names() == ["dock-1"]
    assert (again.get("dock-1") == image).all()
    assert os.listdir(str(tmp_path / "references")) == ["dock-1.png"]
    assert again.delete("dock-1") and not again.delete("dock-1")
    assert again.names() == [] and name_from_path("/x/My Dock.v2.png") == "My_Dock_v2"


def test_configured_references_are_the_runs_own_and_the_store_is_bounded(tmp_path):
    """`reference:` / --reference: matched, listed, never written; set_reference's store
    holds at most `limit` in all and refuses more with the fix in the message."""
    store = ReferenceStore(str(tmp_path), limit=3)
    image = cv2.imread(LEFT)
    assert store.configure(LEFT) == "motorcycle_left"
    assert not os.path.exists(str(tmp_path / "references")), "a configured one is not stored"
    store.put("a", image)
    store.put("b", image)
    with pytest.raises(ConfigError, match=r"3 references already.*max_references.*delete"):
        store.put("c", image)
    store.put("a", image[:100])                 # replacing one is not one more
    with pytest.raises(ConfigError, match="comes from the configuration"):
        store.put("motorcycle_left", image)
    with pytest.raises(ConfigError, match="comes from the configuration"):
        store.delete("motorcycle_left")
    assert store.names() == ["a", "b", "motorcycle_left"]
    assert [r["name"] for r in store.describe()] == store.names()
    assert sorted(os.listdir(str(tmp_path / "references"))) == ["a.png", "b.png"]
    assert ReferenceStore(str(tmp_path)).names() == ["a", "b"], "a restart keeps the stored"


def test_a_deleted_reference_releases_its_memory(tmp_path, model_dir):
    """Every slot the matcher ran on held a binding (the reference image and its outputs) per
    reference; those of a deleted reference must go, or set/delete cycles grow for good."""
    from edge import backends, tasks
    from edge.backends.build import EngineMaker
    from edge.backends.cache import EngineCache
    from edge.frames import Frame
    store = ReferenceStore(str(tmp_path / "state"))
    maker = EngineMaker(backends.select("ort"), EngineCache(str(tmp_path / "engines")),
                        2 << 30)
    task = tasks.create(cards.load("coarse-loftr"), maker, model_dir, store=store, max_hz=0)
    frame = Frame(0, (240, 320, 3))
    frame.image[:] = cv2.resize(cv2.imread(RIGHT), (320, 240))
    frame.ts = 0.0
    store.put("a", cv2.resize(cv2.imread(LEFT), (320, 240)))
    store.put("b", cv2.resize(cv2.imread(LEFT), (160, 120)))
    assert len(task.process(frame)) == 2
    held = [k for k in frame.outputs if isinstance(k, tuple)]
    assert sorted(held) == [("match", "a"), ("match", "b")]
    assert store.delete("a")
    assert [m["reference"]["name"] for m in task.process(frame)] == ["b"]
    assert [k for k in frame.outputs if isinstance(k, tuple)] == [("match", "b")]
    assert "a" not in store._cache


def test_reference_flags_store_nothing(tmp_path, model_dir):
    """edge run --reference, edge build --reference and edge doctor leave the device's
    stored references as they were (none here), and doctor writes no temporary store."""
    state = tmp_path / "state"
    temp = tmp_path / "tmp"
    temp.mkdir()
    run_match(tmp_path, model_dir, RIGHT, LEFT)
    rc, out, err = run_edge("build", "coarse-loftr", "--reference", LEFT, "--size", "320x240",
                            "--model-dir", model_dir, "--state-dir", str(state))
    assert rc == 0 and "ready" in out, out + err
    rc, out, err = run_edge("doctor", "coarse-loftr", "--backend", "ort", "--model-dir",
                            model_dir, "--state-dir", str(state), env={"TMPDIR": str(temp)})
    assert rc == 0, out + err
    assert not os.path.exists(str(state / "references"))
    assert not [n for n in os.listdir(str(temp)) if n.startswith("edge")], os.listdir(str(temp))


def test_detection_and_matching_together_on_one_source(tmp_path, model_dir):
    config = tmp_path / "edge.yaml"
    config.write_text("match: {every: 10}\n")
    jsonl = str(tmp_path / "out.jsonl")
    rc, out, err = run_edge("run", "-c", str(config), "--detector", "yolox-nano", "--matcher",
                            "coarse-loftr", "--reference", LEFT, "--source",
                            "test://?width=320&height=240&fps=0&frames=30", "--model-dir",
                            model_dir, "--state-dir", str(tmp_path / "state"), "--jsonl", jsonl)
    assert rc == 0, err
    messages = read_jsonl(jsonl)
    detections = [m for m in messages if "detections" in m]
    matches = [m for m in messages if "matches" in m]
    assert [m["frame"]["index"] for m in detections] == list(range(30))
    assert [m["frame"]["index"] for m in matches] == [0, 10, 20]
    assert all(m["model"] == "coarse-loftr" and m["reference"]["name"] == "motorcycle_left"
               for m in matches)


def test_matching_at_its_rate_on_a_live_source_does_not_stall_detection(tmp_path, model_dir):
    config = tmp_path / "edge.yaml"
    config.write_text("match: {max_hz: 2}\n")
    jsonl = str(tmp_path / "out.jsonl")
    rc, out, err = run_edge("run", "-c", str(config), "--detector", "yolox-nano", "--matcher",
                            "coarse-loftr", "--reference", LEFT, "--source",
                            "test://?width=320&height=240&fps=20", "--max-frames", "40",
                            "--model-dir", model_dir, "--state-dir", str(tmp_path / "state"),
                            "--jsonl", jsonl)
    assert rc == 0, err
    messages = read_jsonl(jsonl)
    detections = [m for m in messages if "detections" in m]
    matches = [m for m in messages if "matches" in m]
    assert len(detections) == 40
    span = detections[-1]["frame"]["ts"] - detections[0]["frame"]["ts"]
    # 2 Hz over the run's span (about 2 s at 20 fps), plus the first frame.
    assert 1 <= len(matches) <= 2 * span + 2


def test_matcher_without_reference_is_idle_not_failing(tmp_path, model_dir):
    jsonl = str(tmp_path / "out.jsonl")
    rc, out, err = run_edge("run", "--matcher", "coarse-loftr", "--source",
                            "test://?width=320&height=240&fps=0&frames=3", "--model-dir",
                            model_dir, "--state-dir", str(tmp_path / "state"), "--jsonl", jsonl)
    assert rc == 0, err
    assert "no reference image stored" in err
    assert read_jsonl(jsonl) == []
