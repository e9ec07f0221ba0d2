"""tools/fleet with a small fleet: real daemons come online, `edge health --all` asks them with
one broadcast request and every one answers; the tool reports the figures it measured."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, SHARED


def test_tools_fleet_with_five_daemons(tmp_path):
    out = str(tmp_path / "fleet.json")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fleet.py"), "5",
                           "--rounds", "2", "--timeout", "20", "--json", out,
                           "--mirror", os.path.join(SHARED, "models")],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300)
    text = proc.stdout.decode()
    assert proc.returncode == 0, text
    result = json.load(open(out))
    assert result["started"] == result["online"] == 5 and result["time_to_online_s"] > 0
    for round_ in result["health_all"]:
        # one request reached the fleet; nobody had to be asked on its own topic (that
        # happens only at half the timeout, for devices that stayed silent)
        assert round_["answered"] == round_["healthy"] == round_["listed"] == 5, round_
        assert round_["exit"] == 0 and round_["broadcast_requests"] == 1, round_
        assert round_["direct_requests"] == 0, round_
    assert 20 < result["rss_mb"]["mean"] < 1000 and 0 < result["pss_mb"]["mean"]
    assert "time to online" in text and "edge health --all #2" in text
    assert not os.path.exists(result["folder"])      # cleaned up without --keep
