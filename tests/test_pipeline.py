"""The pipeline's stages in one process: real sources, real engines (ONNX Runtime), a real
publisher writing JSONL; the decode thread overlapping inference, and its failures."""

import json

import pytest

from edge import cards, config, daemon, sources, tasks
from edge.errors import ModelError
from edge.pipeline import Pipeline
from edge.publisher import JsonlSink, Publisher
from tools.soak import wait_until

FRAMES = 24


@pytest.fixture(scope="module")
def maker(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("state"))
    cfg = config.load(None, {"state_dir": state, "backend": "ort"}, require_task=False)
    return daemon.engine_maker(cfg), cfg


def detector(maker, model_dir, device="pipe"):
    engine_maker, cfg = maker
    return tasks.create(cards.load("yolox-nano"), engine_maker, model_dir, device=device)


def run(task_list, jsonl_path, frames=FRAMES, max_frames=None):
    """A finite test pattern through a pipeline into a JSONL file; (pipeline, messages)."""
    sink = JsonlSink(jsonl_path)
    publisher = Publisher(None, sink, limit=1000)
    source = sources.open_source("test://?width=320&height=240&fps=0&frames={}".format(frames))
    pipeline = Pipeline(source, task_list, publisher, pool_size=4, max_frames=max_frames)
    pipeline.open()
    publisher.start()
    pipeline.start()
    assert pipeline.wait(60), "the run ends by itself"
    pipeline.join()
    publisher.flush(10)
    sink.close()
    with open(jsonl_path) as f:
        return pipeline, [json.loads(line) for line in f]


def test_every_frame_is_decoded_once_in_order_and_every_slot_comes_back(tmp_path, maker,
                                                                         model_dir):
    pipeline, messages = run([detector(maker, model_dir)], str(tmp_path / "o.jsonl"))
    assert [m["frame"]["index"] for m in messages] == list(range(FRAMES))
    assert [m["seq"] for m in messages] == list(range(1, FRAMES + 1))
    pool = pipeline.cameras[0].pool
    assert pool.free == len(pool), "no slot is left behind"
    assert not pipeline.alive() and pipeline.error() is None


def test_decoding_overlaps_the_next_inference(tmp_path, maker, model_dir):
    """While a frame is decoded, the task's thread already infers the next: each decode
    waits (up to 10 s) for the next frame's inference to end, which could never happen if
    inference waited for decoding. Not a race against the clock: it holds on a loaded laptop."""
    task = detector(maker, model_dir)
    decode = task.decode
    overlapped = []

    def slow_decode(frame, inferred):
        # frame k+1 inferred (inferred >= k + 2) before the decoding of frame k ends
        overlapped.append(wait_until(lambda: runner.inferred >= frame.index + 2, 10.0)
                          if frame.index < 11 else None)
        return decode(frame, inferred)
    task.decode = slow_decode
    sink = JsonlSink(str(tmp_path / "o.jsonl"))
    publisher = Publisher(None, sink)
    pipeline = Pipeline(sources.open_source("test://?width=320&height=240&fps=0&frames=12"),
                        [task], publisher, pool_size=4)
    runner = pipeline.runners[0]
    pipeline.open()
    publisher.start()
    pipeline.start()
    assert pipeline.wait(60)
    pipeline.join()
    publisher.flush(10)
    sink.close()
    assert overlapped == [True] * 11 + [None], overlapped


def test_max_frames_publishes_exactly_that_many(tmp_path, maker, model_dir):
    pipeline, messages = run([detector(maker, model_dir)], str(tmp_path / "o.jsonl"),
                             frames=200, max_frames=7)
    assert [m["frame"]["index"] for m in messages] == list(range(7))
    assert pipeline.cameras[0].pool.free == len(pipeline.cameras[0].pool)


@pytest.mark.parametrize("error", [ModelError("engine x: damaged"), ZeroDivisionError("bug")])
def test_a_task_failing_in_decode_stops_alone_and_returns_its_slots(tmp_path, maker, model_dir,
                                                                    error):
    """One task's decode fails (an EdgeError, or a bug) on its 5th frame: that task stops,
    the other decodes every frame, every slot comes back, and the error is the run's."""
    good = detector(maker, model_dir, device="good")
    bad = detector(maker, model_dir, device="bad")
    decode = bad.decode
    calls = []

    def failing(frame, inferred):
        calls.append(frame.index)
        if len(calls) == 5:
            raise error
        return decode(frame, inferred)
    bad.decode = failing
    pipeline, messages = run([good, bad], str(tmp_path / "o.jsonl"))
    devices = [m["device"] for m in messages]
    assert devices.count("good") == FRAMES
    assert devices.count("bad") == 4, "nothing from the failed task after its failure"
    assert pipeline.runners[1].error is error and pipeline.error() is error
    assert pipeline.runners[0].error is None
    assert pipeline.cameras[0].pool.free == len(pipeline.cameras[0].pool)
