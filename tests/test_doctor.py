"""edge doctor: versions, engines built or loaded, outputs checked against references."""

import json
import os
import shutil

from tests.conftest import ROOT, run_edge


def test_doctor_checks_every_card_on_the_samples(tmp_path, model_dir):
    rc, out, err = run_edge("doctor", "--backend", "ort", "--model-dir", model_dir,
                            "--state-dir", str(tmp_path))
    assert rc == 0, out + err
    assert "backend  backend=ort" in out and "python" in out
    lines = [l for l in out.splitlines() if l.startswith(("yolox-nano", "coarse-loftr"))]
    assert len(lines) == 2 and all(" ok " in l and "latency p50" in l for l in lines), out


def test_doctor_reports_an_engine_that_disagrees(tmp_path, model_dir):
    """A reference that no longer matches (another model, a broken engine) fails the check."""
    cards = tmp_path / "engines"
    shutil.copytree(os.path.join(ROOT, "engines"), str(cards))
    path = cards / "samples" / "reference-outputs.json"
    stored = json.loads(path.read_text())
    stored["yolox-nano"]["detections"][0][0] += 25.0          # a box edge 25 px away
    path.write_text(json.dumps(stored))
    rc, out, err = run_edge("doctor", "yolox-nano", "--backend", "ort", "--model-dir",
                            model_dir, "--state-dir", str(tmp_path),
                            env={"EDGE_CARDS": str(cards)})
    assert rc == 1, out + err
    assert "FAIL" in out and "box edges within 25.00 px" in out
