"""What a user reads of a command's choices (issue 24): `edge depth` names the conversion it
used, not the backend it would have used."""

import os
import re

from tests.conftest import SHARED, run_edge

PAIR = os.path.join(SHARED, "data", "middlebury-motorcycle")
LEFT = os.path.join(PAIR, "motorcycle_left.png")
RIGHT = os.path.join(PAIR, "motorcycle_right.png")
CALIB = os.path.join(PAIR, "calib.txt")


def edge_depth(tmp_path, convert):
    """`edge depth` of the Middlebury pair on ONNX Runtime with `stereo.convert`:
    (printed method, stderr)."""
    config = tmp_path / "edge-{}.yaml".format(convert)
    config.write_text("stereo: {{convert: {}}}\n".format(convert))
    rc, out, err = run_edge("depth", LEFT, RIGHT, "--calib", CALIB, "--out",
                            str(tmp_path / "depth.npy"), "-c", str(config), "--backend", "ort",
                            "--state-dir", str(tmp_path / "state"))
    assert rc == 0, err
    found = re.search(r"conversion \d+\.\d ms \(([^)]*)\)", out)
    assert found, out
    return found.group(1), err


def test_edge_depth_names_the_conversion_it_chose(tmp_path):
    """`stereo.convert: auto` times the graph and numpy; the log line names the backend
    (not an engine class) and the choice, and the summary names that same choice. Forced
    the other way, the summary names the other."""
    chosen, err = edge_depth(tmp_path, "auto")
    timed = re.search(r"disparity -> depth for 741x500: graph on ort \d+\.\d\d ms, numpy "
                      r"\d+\.\d\d ms; using (graph|numpy)", err)
    assert timed, err
    assert "Engine" not in err
    method = {"graph": "graph on ort", "numpy": "numpy"}
    assert chosen == method[timed.group(1)]
    other = "numpy" if timed.group(1) == "graph" else "graph"
    assert edge_depth(tmp_path, other)[0] == method[other]
