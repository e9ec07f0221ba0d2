"""tools/render_broker.py: the shipped broker files are what it renders from the API document
and the example roster, every channel of the document has its readers, and a roster it
cannot render is one line naming the problem. (The rights themselves run on real brokers in
tests/test_acl.py and tests/test_bridge.py.)"""

import copy
import os
import subprocess
import sys

import pytest

from edge import schemas
from tests.conftest import ROOT
from tools import render_broker

SCRIPT = os.path.join(ROOT, "tools", "render_broker.py")


@pytest.fixture
def run(capsys):
    """The script's main(ARGS) in this process: (exit status, stdout, stderr)."""
    def run(*args):
        capsys.readouterr()
        try:
            code = render_broker.main(list(args))
        except SystemExit as e:      # argparse
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_the_shipped_files_are_rendered_from_the_document_and_the_roster():
    proc = subprocess.run([sys.executable, SCRIPT, "--check"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    for path, text in render_broker.examples().items():
        assert open(path, encoding="utf-8").read() == text, path


def test_every_channel_has_its_rights_and_a_new_one_is_an_error():
    chans = render_broker.channels(schemas.document())
    assert set(schemas.document()["channels"]) <= {c.template for c in chans}
    doc = copy.deepcopy(schemas.document())
    doc["channels"]["{prefix}/{device_id}/tracks/{camera}"] = {
        "subscribe": {"operationId": "tracks_of_camera"}}
    with pytest.raises(render_broker.RenderError) as info:
        render_broker.channels(doc)
    assert "{prefix}/{device_id}/tracks/{camera} (operationId tracks_of_camera" in str(info.value)
    doc = copy.deepcopy(schemas.document())
    doc["channels"]["{prefix}/other/status"] = {"subscribe": {"operationId": "status"}}
    with pytest.raises(render_broker.RenderError, match="only under .prefix./.device_id./"):
        render_broker.channels(doc)


def test_the_bridge_carries_every_topic_devices_publish_and_every_command():
    chans = render_broker.channels(schemas.document())
    lines = render_broker.bridge_topics(chans, "edge")
    assert lines[-1] == "topic edge/+/cmd/+ in 1", "edge/+/cmd/+ covers edge/_all/cmd/+"
    out = [line.split()[1] for line in lines if line.endswith(" out 1")]
    for template, item in schemas.document()["channels"].items():
        if "subscribe" in item:
            assert render_broker.topic_filter(template, "edge") in out, template
    assert "edge/+/detections/+" in out and "edge/_health/+/+" in out
    conf = open(render_broker.SITE_CONF).read()
    assert all(line + "\n" in conf for line in lines)


@pytest.mark.parametrize("wide, narrow, result", [
    ("edge/+/cmd/+", "edge/_all/cmd/+", True),
    ("edge/+/cmd/+", "edge/cam1/cmd/#", False),
    ("edge/#", "edge", True),
    ("edge/cam1/status", "edge/+/status", False),
    ("+/broker/connection/+/state", "$SYS/broker/connection/+/state", False),
    ("edge/+/detections", "edge/+/detections/+", False),
])
def test_covers(wide, narrow, result):
    assert render_broker.covers(wide, narrow) is result


def test_a_site_broker_gets_its_own_devices_and_a_roster_may_have_another_prefix(tmp_path,
                                                                                   run):
    roster = tmp_path / "fleet.yaml"
    roster.write_text("prefix: acme/vision\ndevices: [dock-1, dock-2, yard]\nrobots: [r1]\n"
                      "operators: [ops]\nsites: {north: [dock-1, dock-2], south: [yard]}\n")
    code, out, err = run("--roster", str(roster), "--site", "south", "--acl", "-")
    assert code == 0, err
    users = [line.split()[1] for line in out.splitlines() if line.startswith("user ")]
    assert users == ["yard", "r1", "ops"]
    assert "topic write acme/vision/yard/detections/+\n" in out
    assert "topic write acme/vision/_health/+/yard\n" in out and "dock-1" not in out
    assert "pattern" not in out.replace("`pattern", "")
    code, out, err = run("--roster", str(roster), "--central-acl", str(tmp_path / "central"))
    text = (tmp_path / "central").read_text()
    assert code == 0 and "user north\n" in text
    assert "topic write acme/vision/dock-2/status\n" in text
    assert "topic write $SYS/broker/connection/south/state\n" in text
    assert "topic read acme/vision/yard/cmd/+\n" in text
    code, out, err = run("--roster", str(roster), "--bridge-topics", "-")
    assert code == 0 and "topic acme/vision/+/cmd/+ in 1\n" in out


@pytest.mark.parametrize("text, message", [
    ("devices: [cam1]\nrobots: [cam1]\n", "robots[0]: 'cam1' is already one of the devices"),
    ("robots: ['robot arm']\n", "robots[0]: 'robot arm' is no user name"),
    ("robots: ['#']\n", "robots[0]: '#' is no user name"),
    ("devices: [cam1]\nsites: {a: [cam2]}\n", "sites.a: 'cam2' is not in devices"),
    ("devices: [cam1]\nsites: {a: [cam1], b: [cam1]}\n", "sites.b: 'cam1' is already behind a"),
    ("prefix: 'edge/#'\n", "prefix: 'edge/#' is no topic prefix"),
    ("device: [cam1]\n", "unknown key 'device'"),
    ("[cam1]\n", "must be a mapping"),
])
def test_a_roster_it_cannot_render_is_one_line_naming_the_problem(tmp_path, run, text,
                                                                   message):
    roster = tmp_path / "fleet.yaml"
    roster.write_text(text)
    code, out, err = run("--roster", str(roster), "--acl", "-")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("render_broker: error: " + str(roster)) and message in err, err


def test_an_unknown_site_and_check_with_a_roster_are_refused(run):
    code, out, err = run("--site", "nowhere", "--acl", "-")
    assert code == 2 and "--site 'nowhere'" in err and "site-a, site-b" in err
    code, out, err = run("--check", "--roster", "x.yaml", "--acl", "-")
    assert code == 2 and "--check" in err
