"""Several cameras in one daemon (issue 16): real sources, engines, broker and schemas.

- three finite cameras (two image folders and a finite test pattern) in one `edge run`:
  every frame of each delivered exactly once, on its camera's topics, naming its camera,
  every message valid against the API document;
- detection of several cameras' frames as one batch gives what one frame at a time gives,
  and a model with batch 1 baked in runs one frame at a time;
- a live camera that fails is reopened with backoff while the others go on, and health,
  snapshots and set_reference speak per camera;
- stereo depth and matching with named cameras; config errors; the inbox's fairness.
"""

import collections
import json
import os
import shutil
import threading
import time
from urllib.parse import urlencode

import cv2
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edge import cameras, cards, config, daemon, graph, models, mqtt, schemas, sources, tasks
from edge import client as edge_client
from edge.commands import Commands
from edge.errors import ConfigError
from edge.frames import FramePool, Inbox
from edge.health import Health, camera_reports, verdict
from edge.pipeline import Pipeline
from edge.publisher import JsonlSink, Publisher
from tests.conftest import COCO8, COCO8_ALL, SHARED, free_port, run_edge
from tools.soak import wait_until

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
LIMITS = {"temperature_c": 85.0, "memory_percent": 95.0, "min_fps": 0.0}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def image_folder(root, name, paths, size=None):
    """A folder holding these images (resized to `size`, else copied)."""
    folder = os.path.join(str(root), name)
    os.makedirs(folder)
    for path in paths:
        target = os.path.join(folder, os.path.basename(path))
        if size is None:
            shutil.copy(path, target)
        else:
            cv2.imwrite(target, cv2.resize(cv2.imread(path), size))
    return folder


@pytest.fixture(scope="module")
def maker(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("state"))
    cfg = config.load(None, {"state_dir": state, "backend": "ort"}, require_task=False)
    return daemon.engine_maker(cfg)


def detector(maker, model_dir, batching=False, model=None):
    card = cards.load("yolox-nano")
    if model is None:
        return tasks.create(card, maker, model_dir, device="robot", batching=batching)
    from edge.tasks.detect import DetectTask
    return DetectTask(card, maker, model, device="robot", batching=batching)


def run_pipeline(named, task_list, jsonl):
    """Named cameras through a pipeline into a JSONL file, to their end; (pipeline, messages)."""
    sink = JsonlSink(jsonl)
    publisher = Publisher(None, sink, limit=10000)
    pipeline = Pipeline(named, task_list, publisher, pool_size=3)
    pipeline.open()
    pipeline.prepare()
    publisher.start()
    pipeline.start()
    assert pipeline.wait(120), "the run ends by itself"
    pipeline.join()
    publisher.flush(10)
    sink.close()
    return pipeline, read_jsonl(jsonl)


# -- three finite cameras in one edge run ----------------------------------------------------

def test_three_finite_cameras_deliver_every_frame_once_on_their_own_topics(
        tmp_path, broker, subscriber, model_dir):
    front = image_folder(tmp_path, "front", COCO8_ALL[:4])
    rear = image_folder(tmp_path, "rear", COCO8_ALL[4:])
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(json.dumps({
        "sources": [{"name": "front", "uri": front}, {"name": "rear", "uri": "images://" + rear},
                    {"name": "pattern", "uri": "test://?width=320&height=240&fps=0&frames=9"}],
        "detector": "yolox-nano", "health": {"interval": 1}}))
    sub = subscriber("edge/#")
    # robots: edge.client for every camera, and for one camera by its topics
    robots = {name: edge_client.Client(broker.url, devices=["robot"], cameras=only)
              for name, only in (("every", None), ("rear", ["rear"]))}
    for robot in robots.values():
        robot.connect()
    jsonl = str(tmp_path / "out.jsonl")
    try:
        rc, _, err = run_edge("run", "-c", str(cfg), "--mqtt", broker.url + "?qos=1",
                              "--device-id", "robot", "--jsonl", jsonl, "--model-dir",
                              model_dir)
        assert rc == 0, err
        got = {name: list(robot.messages(count=17 if name == "every" else 4, timeout=20))
               for name, robot in robots.items()}
    finally:
        for robot in robots.values():
            robot.close()
    assert robots["rear"].subscriptions == ["edge/robot/detections/rear"]
    assert collections.Counter(m.camera for m in got["every"]) == {
        "front": 4, "rear": 4, "pattern": 9}
    assert [m.camera for m in got["rear"]] == ["rear"] * 4
    assert all(m.topic == "edge/robot/detections/" + m.camera for m in got["every"])
    results = [m for m in read_jsonl(jsonl) if "detections" in m]
    delivered = collections.Counter(
        (m["camera"], m["frame"]["name"] or m["frame"]["index"]) for m in results)
    expected = collections.Counter(
        [("front", os.path.basename(p)) for p in COCO8_ALL[:4]] +
        [("rear", os.path.basename(p)) for p in COCO8_ALL[4:]] +
        [("pattern", i) for i in range(9)])
    assert delivered == expected, "every frame of each camera exactly once"
    for name in ("front", "rear", "pattern"):
        seqs = [m["seq"] for m in results if m["camera"] == name]
        assert seqs == list(range(1, len(seqs) + 1)), "seq counts per camera"
    assert sub.wait_for(lambda s: len([1 for t, _, _ in s.messages if "/detections" in t])
                        == len(results) and any(t.endswith("/status") and b"offline" in p
                                                for t, p, _ in s.messages))
    with sub.lock:
        received = list(sub.messages)
    kinds = collections.Counter()
    for topic, payload, _ in received:
        kind = schemas.kind_of_topic(topic)
        assert kind is not None, topic
        message = json.loads(payload)
        schemas.validate(kind, message)
        kinds[kind] += 1
        if kind in ("detections", "events"):
            levels = topic.split("/")
            assert levels[2] == kind and len(levels) == 4, "named cameras: {kind}/{camera}"
            assert message["camera"] == levels[3]
    assert kinds["detections"] == len(results)
    health = [json.loads(p) for t, p, _ in received if t == "edge/robot/health"][-1]
    assert set(health["cameras"]) == {"front", "rear", "pattern"}
    assert all(c["state"] == "finished" for c in health["cameras"].values())
    assert health["cameras"]["pattern"]["frames"] == 9 and health["source"]["frames"] == 17
    assert health["source"]["state"] == "finished" and health["verdict"]["healthy"]


# -- batches -----------------------------------------------------------------------------

def test_batched_detection_gives_what_one_frame_at_a_time_gives(tmp_path, maker, model_dir):
    """Three cameras of one size, each its own images: one batch per round of frames."""
    named = lambda: [(name, sources.open_source(image_folder(  # noqa: E731
        tmp_path / "{}-{}".format(name, time.monotonic_ns()), name, paths, (320, 240))))
        for name, paths in (("a", COCO8_ALL[:3]), ("b", COCO8_ALL[3:6]), ("c", COCO8_ALL[6:]))]
    batched = detector(maker, model_dir, batching=True)
    pipeline, by_batch = run_pipeline(named(), [batched], str(tmp_path / "batch.jsonl"))
    assert batched.engine_labels() == ["yolox-nano-320x240-b3"]
    assert pipeline.runners[0].batch == 3 and pipeline.error() is None
    single = detector(maker, model_dir)
    _, one_by_one = run_pipeline(named(), [single], str(tmp_path / "single.jsonl"))
    assert single.engine_labels() == ["yolox-nano-320x240"]

    def results(messages):
        return {(m["camera"], m["frame"]["name"]): m["detections"] for m in messages
                if "detections" in m}
    got, want = results(by_batch), results(one_by_one)
    assert len(got) == 8 and set(got) == set(want)
    assert sum(len(d) for d in want.values()) >= 5       # coco8 has objects: not vacuous
    for key, detections in want.items():
        # (track ids differ: a camera's ids never repeat in a process, across runs too)
        assert [d["class_id"] for d in got[key]] == [d["class_id"] for d in detections], key
        for a, b in zip(got[key], detections):
            np.testing.assert_allclose(a["box"], b["box"], atol=0.05)
            assert abs(a["score"] - b["score"]) <= 1e-3


def shape_computed_at_run_time(model):
    """YOLOX with its Reshapes' shapes computed by a node, as dynamic exports do: the batch
    of 1 they hold cannot be read, so the model cannot be batched."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for i, node in enumerate([n for n in model.graph.node if n.op_type == "Reshape"]):
        name = "computed_shape_{}".format(i)
        constant = helper.make_node("Constant", [], [name + "_c"],
                                    value=numpy_helper.from_array(values[node.input[1]]))
        identity = helper.make_node("Identity", [name + "_c"], [name])
        position = list(model.graph.node).index(node)
        model.graph.node.insert(position, identity)
        model.graph.node.insert(position, constant)
        node.input[1] = name
    return model


def test_a_model_with_batch_1_baked_in_runs_one_frame_at_a_time(tmp_path, maker, model_dir,
                                                                 caplog):
    card = cards.load("yolox-nano")
    original = models.load_onnx(os.path.join(model_dir, "yolox_nano.onnx"), card)
    assert graph.batch_problem(original, card) is None        # YOLOX's [1, 85, -1]: unbaked
    baked = shape_computed_at_run_time(original)
    problem = graph.batch_problem(baked, card)
    assert problem.startswith("node Reshape_405 (Reshape) does not keep the images")
    assert graph.batch_problem(original, cards.load("coarse-loftr")) == \
        "family loftr-coarse has no batched form"
    with pytest.raises(ValueError):
        graph.rewrite(baked, card, 320, 240, batched=True)
    named = [(name, sources.open_source("test://?width=320&height=240&fps=0&frames=4"))
             for name in ("a", "b")]
    task = detector(maker, model_dir, batching=True, model=baked)
    pipeline, messages = run_pipeline(named, [task], str(tmp_path / "o.jsonl"))
    assert task.engine_labels() == ["yolox-nano-320x240"], "batch 1: one frame per run"
    assert "runs one frame at a time: node Reshape_405" in caplog.text
    assert collections.Counter(m["camera"] for m in messages if "detections" in m) == \
        {"a": 4, "b": 4}
    assert pipeline.error() is None


# -- a live camera that fails --------------------------------------------------------------

class App:
    """What Commands and Health read of a daemon, around a running pipeline."""

    def __init__(self, pipeline, task_list, store=None):
        self.device = "robot"
        self.started = time.time()
        self.link = mqtt.MqttLink(mqtt.parse_url("mqtt://127.0.0.1:1"), "robot")  # not started
        self.publisher = Publisher(self.link)                                      # not started
        self.pipeline = pipeline
        self.tasks = task_list
        self.store = store
        self.source_display = "front=..., web=..."
        self.config = self.commands = self.motion = self.last_reload = None

    snapshot = daemon.Daemon.snapshot

    def next_frame(self, timeout=5.0, camera=None):
        return self.pipeline.tap(timeout, camera)


def test_a_failing_camera_is_reopened_while_the_others_go_on(tmp_path, maker, model_dir):
    from edge.references import ReferenceStore
    from tests.test_faults import start_camera
    port = free_port()
    web = start_camera(port)
    task = detector(maker, model_dir)
    sink = JsonlSink(str(tmp_path / "o.jsonl"))
    publisher = Publisher(None, sink, limit=10000)
    pipeline = Pipeline([("front", sources.open_source("test://?width=160&height=120&fps=10")),
                         ("web", sources.open_source(
                             "http://127.0.0.1:{}/stream.mjpg".format(port)))],
                        [task], publisher, pool_size=3)
    app = App(pipeline, [task], ReferenceStore(str(tmp_path / "state")))
    commands = Commands(app)
    front, webcam = pipeline.named["front"], pipeline.named["web"]
    try:
        pipeline.open()
        pipeline.prepare()
        publisher.start()
        pipeline.start()
        assert wait_until(lambda: task.seqs.get("front", 0) >= 3 and
                          task.seqs.get("web", 0) >= 3, 60)
        _, reply = commands.handle("snapshot", json.dumps({"id": "s1", "camera": "web"}).encode())
        schemas.validate("reply", reply)
        assert reply["ok"] and reply["result"]["camera"] == "web"
        assert reply["result"]["frame"]["width"] == 320            # the web camera's frame
        _, reply = commands.handle("snapshot", json.dumps({"id": "s2"}).encode())
        assert reply["ok"] and reply["result"]["camera"] == "front"   # default: the first
        _, reply = commands.handle("snapshot", json.dumps({"id": "s3", "camera": "x"}).encode())
        schemas.validate("reply", reply)
        assert reply["error"] == {"code": "not_found", "message": "no camera 'x' on this "
                                  "device; its cameras: front, web"}
        _, reply = commands.handle("set_reference", json.dumps(
            {"id": "r1", "name": "door", "camera": "web"}).encode())
        assert reply["ok"] and app.store.get("door").shape == (240, 320, 3)

        web.kill()                 # the web camera vanishes; the front one goes on
        web.wait()
        assert wait_until(lambda: webcam.capture.state == "reconnecting", 20)
        source, per_camera = camera_reports(pipeline.snapshot(), app.source_display)
        assert per_camera["web"]["state"] == "reconnecting" and per_camera["web"]["error"]
        assert source["state"] == "reconnecting" and source["error"].startswith("web: ")
        report = Health(app, 10.0, LIMITS).report()
        schemas.validate("health", report)
        healthy, reasons = verdict(report, LIMITS)
        assert not healthy and reasons[0].startswith("camera web reconnecting: ")
        before = task.seqs["front"]
        time.sleep(1.5)
        assert task.seqs["front"] >= before + 5, "the front camera never waits for the web one"
        assert front.capture.state == "open"

        web = start_camera(port)   # back: reopened with backoff, frames flow again
        assert wait_until(lambda: webcam.capture.state == "open" and
                          webcam.capture.reopens >= 1, 30)
        seen = task.seqs["web"]
        assert wait_until(lambda: task.seqs["web"] >= seen + 3, 30)
        report = Health(app, 10.0, LIMITS).report()
        schemas.validate("health", report)
        assert report["cameras"]["web"]["reopens"] >= 1 and report["verdict"]["healthy"]
        assert report["cameras"]["front"]["fps"] > 0
    finally:
        pipeline.stop()
        pipeline.join()
        publisher.flush(5)
        sink.close()
        web.kill()
    assert pipeline.error() is None
    for camera in pipeline.cameras:
        assert camera.pool.free == len(camera.pool), "every slot comes back"
    messages = [m for m in read_jsonl(str(tmp_path / "o.jsonl")) if "detections" in m]
    assert {m["camera"] for m in messages} == {"front", "web"}


def test_a_live_camera_down_at_start_does_not_keep_the_others_from_starting(tmp_path, maker,
                                                                            model_dir):
    task = detector(maker, model_dir)
    publisher = Publisher(None, None)
    dead = "http://127.0.0.1:{}/stream.mjpg".format(free_port())
    pipeline = Pipeline([("front", sources.open_source("test://?width=160&height=120&fps=20")),
                         ("web", sources.open_source(dead))], [task], publisher, pool_size=3)
    pipeline.open()
    assert pipeline.named["web"].capture.state == "reconnecting"
    pipeline.prepare()
    publisher.start()
    pipeline.start()
    try:
        assert wait_until(lambda: task.seqs.get("front", 0) >= 3, 30)
        assert pipeline.named["web"].capture.state == "reconnecting"
    finally:
        pipeline.stop()
        pipeline.join()
        publisher.flush(2)
    # alone, a camera that cannot be opened still fails the start, as it always did
    alone = Pipeline([("web", sources.open_source(dead))], [task], publisher, pool_size=3)
    with pytest.raises(Exception) as info:
        alone.open()
    assert "stream.mjpg" in str(info.value)


# -- stereo depth and matching with named cameras -------------------------------------------

def test_depth_and_matches_name_their_camera(tmp_path, model_dir):
    stereo = "stereo://?" + urlencode({"left": os.path.join(PAIR, "motorcycle_left.png"),
                                       "right": os.path.join(PAIR, "motorcycle_right.png")})
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(json.dumps({
        "sources": [{"name": "pair", "uri": stereo},
                    {"name": "mono", "uri": os.path.join(COCO8, "images", "val")}],
        "detector": "yolox-nano", "matcher": "coarse-loftr",
        "reference": os.path.join(PAIR, "motorcycle_left.png"),
        "stereo": {"calib": os.path.join(PAIR, "calib.txt"), "grid": "4x3"},
        "match": {"every": 1}}))
    jsonl = str(tmp_path / "out.jsonl")
    rc, _, err = run_edge("run", "-c", str(cfg), "--jsonl", jsonl, "--model-dir", model_dir,
                          "--state-dir", str(tmp_path / "state"), timeout=300)
    assert rc == 0, err
    messages = read_jsonl(jsonl)
    depth = [m for m in messages if "depth_mm" in m]
    matches = [m for m in messages if "matches" in m]
    found = [m for m in messages if "detections" in m]
    assert [m["camera"] for m in depth] == ["pair"]
    assert collections.Counter(m["camera"] for m in matches) == {"pair": 1, "mono": 4}
    assert collections.Counter(m["camera"] for m in found) == {"pair": 1, "mono": 4}
    for m in depth:
        schemas.validate("depth", m)
    for m in matches:
        schemas.validate("matches", m)
    for m in found:
        schemas.validate("detections", m)
        # spatial only for the stereo camera's detections
        assert all(("spatial" in d) == (m["camera"] == "pair") for d in m["detections"])
    assert any(d["spatial"] for m in found if m["camera"] == "pair" for d in m["detections"])


# -- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("sources_value, error", [
    ([], "sources: must be a list of mappings (or null) (got []); list at least one camera"),
    ([{"name": "front", "uri": "test://"}, {"name": "front", "uri": "/dev/video1"}],
     "sources[1].name: 'front' is already the name of sources[0]; each must differ"),
    ([{"name": "front/left", "uri": "test://"}],
     "sources[0].name: must be a string (got 'front/left'); 1-64 letters, digits, _ . -"),
    ([{"name": "#", "uri": "test://"}], "sources[0].name: must be a string (got '#')"),
    ([{"name": "front"}], "sources[0].uri: missing; it must be a string"),
    ([{"name": "front", "uri": "test://", "fps": 3}], "sources[0].fps: unknown key"),
    ("csi://0", "sources: must be a list of mappings (or null) (got 'csi://0')"),
])
def test_bad_sources_are_one_config_error_naming_the_key(tmp_path, sources_value, error):
    path = tmp_path / "edge.yaml"
    path.write_text(json.dumps({"sources": sources_value, "detector": "yolox-nano"}))
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    message = str(info.value)
    assert message.startswith("config {}: ".format(path)) and error in message, message
    assert "\n" not in message and info.value.exit_code == 78


def test_source_and_sources_together_and_flags(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(json.dumps({"source": "test://", "detector": "yolox-nano",
                                "sources": [{"name": "a", "uri": "test://"}]}))
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert "source and sources: set one" in str(info.value)
    # flags replace the file's cameras, whichever key they use
    cfg = config.load(str(path), {"source": "/dev/video0"})
    assert cameras.configured(cfg) == [(None, "/dev/video0")]
    cfg = config.load(str(path), {"sources": [{"name": "b", "uri": "test://?fps=5"}]})
    assert cameras.configured(cfg) == [("b", "test://?fps=5")]
    assert cameras.parse_flags(["test://?fps=30"]) == ("test://?fps=30", None)
    assert cameras.parse_flags(["front=test://?fps=30", "rear=/dev/video1"]) == (None, [
        {"name": "front", "uri": "test://?fps=30"}, {"name": "rear", "uri": "/dev/video1"}])
    for flags, error in ((["front=csi://0", "/dev/video1"], "name each camera"),
                         (["csi://0", "/dev/video1"], "name each camera"),
                         (["a=csi://0", "a=/dev/video1"], "camera 'a' is named twice")):
        with pytest.raises(ConfigError) as info:
            cameras.parse_flags(flags)
        assert error in str(info.value)
    code, _, err = run_edge("run", "--source", "front=test://", "--source", "test://?fps=5",
                            "--detector", "yolox-nano")
    assert code == 78 and err.count("\n") == 1 and "--source 'test://?fps=5'" in err


@pytest.mark.parametrize("topic, kind", [
    ("edge/robot/detections/front", "detections"), ("edge/robot/matches/rear", "matches"),
    ("edge/robot/events/front", "events"), ("edge/robot/depth/pair", "depth"),
    ("edge/robot/detections/front/x", None), ("edge/robot/status/front", None)])
def test_per_camera_topics_have_their_kind(topic, kind):
    assert schemas.kind_of_topic(topic) == kind


# -- the inbox -------------------------------------------------------------------------------

def test_the_inbox_serves_cameras_round_robin_and_keeps_each_live_cameras_newest_frame():
    pools = [FramePool(4, (2, 2, 3), camera=name) for name in ("live", "file", "slow")]
    inbox = Inbox([(1, True), (2, False), (1, True)])
    frames = {}
    for lane, pool in enumerate(pools[:2]):
        for _ in range(2 if lane == 1 else 3):
            frame = pool.acquire(0)
            frame.refs = 1
            frame.index = len(frames)
            frames[frame.index] = frame
            assert inbox.put(lane, frame)
    assert inbox.lanes[0].dropped == 2 and pools[0].free == 3, "the newest wins, slots back"
    full = threading.Event()
    extra = pools[1].acquire(0)
    extra.refs = 1

    def blocked():
        inbox.put(1, extra)      # a file's lane is full: its capture waits, nothing dropped
        full.set()
    thread = threading.Thread(target=blocked)
    thread.start()
    assert not full.wait(0.3)
    taken = [[f.camera for f in inbox.take(0.1)] for _ in range(3)]
    assert taken == [["live"], ["file"], ["file"]]     # the slow camera holds nobody up
    assert full.wait(2)
    thread.join()
    assert [f.camera for f in inbox.take(0.1, limit=3)] == ["file"]
    assert inbox.take(0.05) == []
    inbox.close()
    assert inbox.take(0.05) is None
    assert inbox.lanes[1].dropped == 0
