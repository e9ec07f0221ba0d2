"""Class names: what robots and people expect, the names COCO itself uses."""

import json
import os

import yaml

from edge import cards
from tests.conftest import COCO8, run_edge


def coco_names():
    """The 80 COCO 2017 names, in the models' class order, as the coco8 dataset lists them."""
    with open(os.path.join(COCO8, "coco8.yaml")) as f:
        names = yaml.safe_load(f)["names"]
    return [names[i] for i in range(80)]


def test_the_bundled_detector_uses_coco_names():
    assert cards.load("yolox-nano").labels == coco_names()


def test_detections_carry_coco_names(tmp_path, model_dir):
    """A potted plant beside a vase (coco8 train 000000000030): `potted plant`, not darknet's
    `pottedplant`."""
    out = str(tmp_path / "out.jsonl")
    rc, _, err = run_edge("run", "--source", os.path.join(COCO8, "images", "train",
                                                         "000000000030.jpg"),
                          "--detector", "yolox-nano", "--model-dir", model_dir, "--jsonl", out,
                          "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    with open(out) as f:
        detections = json.loads(f.readline())["detections"]
    names = coco_names()
    assert "potted plant" in [d["label"] for d in detections], detections
    assert all(d["label"] == names[d["class_id"]] for d in detections), detections
