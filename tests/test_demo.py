"""tools/demo.py, the main job a new user runs, end to end with a real broker it starts."""

import json
import os
import re
import subprocess
import sys

import cv2

from tests.conftest import MODELS, ROOT, SHARED


def test_demo_prints_messages_and_writes_annotated_picture(tmp_path, model_dir):
    out = tmp_path / "demo-out"
    env = dict(os.environ, EDGE_MODEL_MIRROR=MODELS, EDGE_MODEL_DIR=model_dir,
               EDGE_DATA_MIRROR=os.path.join(SHARED, "data"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--out",
                           str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          timeout=120)
    text = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    received = [line for line in text.splitlines() if "edge/demo/detections" in line]
    assert len(received) == 8, text
    assert "zebra" in text and "giraffe" in text
    picture = cv2.imread(str(out / "annotated.jpg"))
    assert picture is not None and picture.shape[0] >= 320
    with open(out / "messages.jsonl") as f:
        assert len([json.loads(line) for line in f]) == 8
    # tracking: the clip's giraffe and zebra get ids and enter the zone; the camera pans
    # over them (compensated), so they cross no line
    events = [line for line in text.splitlines() if line.strip().startswith("event")]
    assert any("giraffe" in e and "track_start" in e for e in events), text
    assert any("zebra" in e and "zone_enter left" in e for e in events), text
    assert not any("line_cross" in e for e in events), text
    assert re.search(r"estimated in \d+ of 90 frames: the picture moved -\d+\.\d px a frame "
                     r"on average \(dx\); no line crossed: True", text), text
    picture = cv2.imread(str(out / "tracking.jpg"))
    assert picture is not None and picture.shape[0] >= 320
    with open(out / "matches.jsonl") as f:
        match = json.loads(f.readline())
    assert match["count"] >= 300 and match["homography"] is not None
    picture = cv2.imread(str(out / "matches.jpg"))
    assert picture.shape[1] == 2 * 741    # reference and frame side by side
    bike = [line for line in text.splitlines() if line.startswith("demo: motorcycle")]
    # in mm, as the messages carry it; the ground truth's median depth is 2376 mm
    z = re.search(r" z (\d+) mm$", bike[0]) if len(bike) == 1 else None
    assert z and abs(int(z.group(1)) - 2376) < 0.05 * 2376, text
    picture = cv2.imread(str(out / "depth.jpg"))
    assert picture.shape[1] == 2 * 741    # the left image and its depth side by side
