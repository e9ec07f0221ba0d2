"""End to end: coco8 images -> `edge run` (real process) -> real broker -> subscriber.

The detections received must equal those of an independent YOLOX implementation written
here with plain OpenCV and numpy (letterbox, original model, grid decode, per-class NMS).
"""

import json
import os
import shutil

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import COCO8_ALL, run_edge

SCORE, IOU = 0.3, 0.45


def reference_yolox(session, image):
    """YOLOX-Nano as its authors' demo runs it: [(class, score, box)], boxes in image pixels."""
    h, w = image.shape[:2]
    r = min(416 / h, 416 / w)
    padded = np.full((416, 416, 3), 114, np.uint8)
    resized = cv2.resize(image, (int(w * r), int(h * r)), interpolation=cv2.INTER_LINEAR)
    padded[:resized.shape[0], :resized.shape[1]] = resized
    blob = padded.transpose(2, 0, 1)[None].astype(np.float32)
    out = session.run(None, {"images": blob})[0][0]
    grids, strides = [], []
    for stride in (8, 16, 32):
        n = 416 // stride
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), stride))
    grids, strides = np.concatenate(grids), np.concatenate(strides)
    xy = (out[:, :2] + grids) * strides
    wh = np.exp(out[:, 2:4]) * strides
    # The YOLOX demo divides by r; the image was resized to int(w * r) x int(h * r) pixels, so
    # the exact inverse is per axis (up to 0.3% apart on coco8: 1 px on small boxes).
    sx, sy = resized.shape[1] / w, resized.shape[0] / h
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1) / [sx, sy, sx, sy]
    scores = out[:, 4:5] * out[:, 5:]
    cls = scores.argmax(1)
    best = scores.max(1)
    results = []
    for c in np.unique(cls[best > SCORE]):
        idx = np.nonzero((cls == c) & (best > SCORE))[0]
        keep = cv2.dnn.NMSBoxes([[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
                                 for b in boxes[idx]], best[idx].tolist(), SCORE, IOU)
        for k in np.array(keep).reshape(-1):
            i = idx[k]
            box = np.clip(boxes[i], 0, [w, h, w, h])
            results.append((int(c), float(best[i]), box))
    return results


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.fixture
def coco8_folder(tmp_path):
    folder = tmp_path / "coco8"
    folder.mkdir()
    for path in COCO8_ALL:
        shutil.copy(path, folder / os.path.basename(path))
    return str(folder)


def test_coco8_detections_over_mqtt_match_reference(broker, subscriber, model_dir, coco8_folder,
                                                    tmp_path):
    sub = subscriber("edge/#")
    jsonl = str(tmp_path / "out.jsonl")
    rc, out, err = run_edge("run", "--source", coco8_folder, "--detector", "yolox-nano",
                            "--model-dir", model_dir, "--mqtt", broker.url + "?qos=1",
                            "--device-id", "cam1", "--jsonl", jsonl)
    assert rc == 0, err
    assert sub.wait_for(lambda s: len(s.json("detections")) == 8 and
                        s.json("status")[-1]["state"] == "offline")
    messages = sub.json("detections")
    assert [m["seq"] for m in messages] == list(range(1, 9))
    assert sorted(m["frame"]["name"] for m in messages) == sorted(
        os.path.basename(p) for p in COCO8_ALL)
    with open(jsonl) as f:
        assert [json.loads(line) for line in f] == messages
    statuses = sub.json("status")
    assert "online" in [m["state"] for m in statuses] and statuses[-1]["state"] == "offline"
    assert statuses[-1]["reason"] == "finished"

    session = ort.InferenceSession(os.path.join(model_dir, "yolox_nano.onnx"),
                                   providers=["CPUExecutionProvider"])
    total = 0
    for message in messages:
        image = cv2.imread(os.path.join(coco8_folder, message["frame"]["name"]))
        assert (message["frame"]["width"], message["frame"]["height"]) == \
            (image.shape[1], image.shape[0])
        want = reference_yolox(session, image)
        got = message["detections"]
        assert len(got) == len(want), (message["frame"]["name"], got, want)
        for det in got:
            match = [w for w in want if w[0] == det["class_id"] and iou(w[2], det["box"]) >= 0.9
                     and abs(w[1] - det["score"]) <= 0.02]
            assert match, (message["frame"]["name"], det, want)
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= image.shape[1] and 0 <= y1 <= y2 <= image.shape[0]
        total += len(got)
    assert total >= 15     # coco8 holds plenty of objects: an empty run must not pass


def test_finite_run_without_broker_writes_jsonl(model_dir, tmp_path):
    jsonl = str(tmp_path / "out.jsonl")
    rc, out, err = run_edge("run", "--source", "test://?width=320&height=240&fps=0&frames=12",
                            "--detector", "yolox-nano", "--model-dir", model_dir,
                            "--jsonl", jsonl)
    assert rc == 0, err
    with open(jsonl) as f:
        lines = [json.loads(line) for line in f]
    assert [m["frame"]["index"] for m in lines] == list(range(12))
    assert all(m["frame"]["width"] == 320 and m["v"] == 1 for m in lines)


def test_max_frames_stops_a_live_source(model_dir, tmp_path):
    jsonl = str(tmp_path / "out.jsonl")
    rc, out, err = run_edge("run", "--source", "test://?fps=50", "--detector", "yolox-nano",
                            "--model-dir", model_dir, "--jsonl", jsonl, "--max-frames", "5")
    assert rc == 0, err
    with open(jsonl) as f:
        assert len(f.readlines()) == 5
