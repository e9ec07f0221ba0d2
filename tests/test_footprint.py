"""The daemon's footprint: started from its engine cache it reads no ONNX model and imports
neither onnx nor OpenCV where nothing needs it (camera motion compensation, `track.motion`
auto, does, as every camera source does); a changed card is checked against its model
again. tools/footprint.py runs and attributes a real daemon's memory."""

import json
import os
import shutil
import subprocess
import sys

import yaml

from tests.conftest import ROOT
from tools.soak import read_jsonl

# `edge ARGS`, then which heavy modules the process imported, as JSON on the last line
WATCH = """
import json, sys
from edge.cli import main
code = main(sys.argv[1:])
print(json.dumps({"exit": code, "onnx": "onnx" in sys.modules, "cv2": "cv2" in sys.modules}))
"""


def edge_watched(*args):
    proc = subprocess.run([sys.executable, "-c", WATCH] + list(args), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.decode().strip().splitlines()[-1]), proc.stderr.decode()


def test_a_daemon_started_from_its_cache_imports_neither_onnx_nor_opencv(tmp_path, model_dir):
    state = str(tmp_path / "state")
    jsonl = str(tmp_path / "out.jsonl")

    still = tmp_path / "still.yaml"
    still.write_text("track: {motion: \"off\"}\n")     # a still camera: OpenCV not needed

    def run(detector, config=str(still)):
        return edge_watched("run", "-c", config, "--source",
                            "test://?width=320&height=240&frames=3",
                            "--detector", detector, "--model-dir", model_dir,
                            "--state-dir", state, "--jsonl", jsonl, "--backend", "ort")
    first, _ = run("yolox-nano")         # builds: the graph is rewritten with onnx
    assert first == {"exit": 0, "onnx": True, "cv2": False}
    engines = sorted(os.listdir(os.path.join(state, "engines")))
    second, log = run("yolox-nano")
    assert second == {"exit": 0, "onnx": False, "cv2": False}, log
    assert sorted(os.listdir(os.path.join(state, "engines"))) == engines
    assert len(read_jsonl(jsonl)) == 6
    # camera motion compensation (the default) estimates with OpenCV
    moving = tmp_path / "moving.yaml"
    moving.write_text("track: {motion: auto}\n")
    fourth, log = run("yolox-nano", str(moving))
    assert fourth == {"exit": 0, "onnx": False, "cv2": True}, log
    # a card that differs (fewer candidates: another graph) is read and rewritten again
    card = yaml.safe_load(open(os.path.join(ROOT, "engines", "yolox-nano.yaml")))
    card["candidates"] = 50
    path = str(tmp_path / "yolox-nano-50.yaml")
    yaml.safe_dump(card, open(path, "w"))
    shutil.copy(os.path.join(ROOT, "engines", "labels", "coco80.txt"), str(tmp_path))
    third, log = run(path)
    assert third == {"exit": 0, "onnx": True, "cv2": False}, log
    assert len(os.listdir(os.path.join(state, "engines"))) == len(engines) + 2


def test_tools_footprint_attributes_a_daemons_memory(tmp_path):
    out = str(tmp_path / "footprint.json")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "footprint.py"),
                           "--seconds", "3", "--json", out], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout.decode()
    result = json.load(open(out))
    steps = dict(result["imports"])
    assert steps["onnx"] > steps["onnxruntime"] > steps["python"] > 0
    daemon = result["daemon"]
    assert daemon["loaded"] == {"onnx": False, "opencv": False, "onnxruntime": True}
    assert daemon["by_mapping"]["onnxruntime"] > 0
    assert 0.8 * daemon["rss_mb"] < sum(daemon["by_mapping"].values()) < 1.2 * daemon["rss_mb"]
