"""What a robot installs: `pip install .` without extras brings edge.client, `edge listen` and
`edge health` with paho-mqtt alone, and a daemon command there says which extra to add.

The main test builds a fresh venv from this checkout (about 15 s with pip's cache, from PyPI)
and runs the robot's commands in it against a real Mosquitto.
"""

import configparser
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from edge import cli, schemas
from tests.conftest import ROOT

# The daemon's packages (import names) a robot's install must not bring, with the `cpu`
# extra's ONNX Runtime and OpenCV.
HEAVY = ("numpy", "yaml", "onnx", "onnxruntime", "cv2", "scipy", "psutil", "prometheus_client")
# What pip itself puts in a venv, beside what a package brings.
PIP_OWN = {"pip", "setuptools", "wheel", "pkg-resources"}


def _extras():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))

    def listed(value):
        return [line.strip() for line in value.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    extras = {name: listed(value) for name, value in parser["options.extras_require"].items()}
    return listed(parser["options"]["install_requires"]), extras


def _name(requirement):
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_install_requires_is_the_clients_and_the_extras_give_the_daemon():
    requires, extras = _extras()
    assert [_name(r) for r in requires] == ["paho-mqtt"]
    # `.[cpu,test]` (tools/test) and `.[cpu,client]` (tools/demo) are whole dev hosts: the
    # cpu extra repeats the daemon's packages (an extra cannot name another for old pips)
    assert set(extras["daemon"]) <= set(extras["cpu"])
    assert {_name(r) for r in extras["daemon"]} == {
        "numpy", "pyyaml", "onnx", "psutil", "scipy", "prometheus-client"}
    # the daemon command's one-line error names each (prometheus-client has its own, and
    # is imported only when metrics.port is set)
    assert {_name(p) for p in cli.DAEMON_MODULES.values()} == \
        {_name(r) for r in extras["daemon"]} - {"prometheus-client"}


def test_install_jetson_installs_the_daemon_extra():
    """tools/install-jetson installs the daemon's packages itself (then edge --no-deps): the
    same ranges as the `daemon` extra."""
    with open(os.path.join(ROOT, "tools", "install-jetson")) as f:
        script = f.read()
    line = re.search(r'run "\$\{pip\[@\]\}" ("numpy.*?)\n\n', script, re.S).group(1)
    listed = set(re.findall(r'"([^"$]+)"', line))
    daemon = _extras()[1]["daemon"] + _extras()[0]
    assert {_name(r) for r in listed} == {_name(r) for r in daemon}
    # the same ranges (prometheus-client's upper bound for 3.6 is in its constraints)
    assert {r for r in daemon if ";" not in r} <= listed


def test_json_rendering_of_the_api_document_is_current():
    with open(schemas.PATH, encoding="utf-8") as f:
        wanted = schemas.render_json(yaml.safe_load(f))
    with open(schemas.JSON_PATH, encoding="utf-8") as f:
        assert f.read() == wanted, \
            "edge/schemas/asyncapi.json is stale: run python3 tools/render_schema_json.py"


def test_the_client_side_imports_nothing_heavy():
    """In this venv too (where everything is installed): a robot's imports and the CLI's
    parser load none of the daemon's modules."""
    code = ("import sys, edge.client, edge.listen, edge.remote, edge.topics, edge.cli\n"
            "edge.cli.parser()\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:]))))")
    out = subprocess.check_output([sys.executable, "-c", code] + list(HEAVY), cwd=ROOT)
    assert out.decode().strip() == ""


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory):
    """A fresh venv with `pip install .` of this checkout, no extras; its bin folder."""
    folder = tmp_path_factory.mktemp("light") / "venv"
    started = time.monotonic()
    subprocess.check_call([sys.executable, "-m", "venv", str(folder)])
    pip = subprocess.run(
        [str(folder / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", ROOT],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert pip.returncode == 0, "pip install . failed (PyPI unreachable?):\n" + pip.stdout
    print("light venv: {:.1f} s".format(time.monotonic() - started))
    return folder / "bin"


def _run(bin_folder, args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # (cwd away from the checkout: nothing of it may be imported instead of the install)
    return subprocess.run([str(bin_folder / args[0])] + args[1:], cwd=str(bin_folder), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, **kwargs)


def test_a_plain_install_brings_the_client_alone(light_venv, broker):
    listed = _run(light_venv, ["python", "-m", "pip", "list", "--format", "json",
                               "--disable-pip-version-check"], timeout=60)
    names = {p["name"].lower() for p in json.loads(listed.stdout)} - PIP_OWN
    assert names == {"edge", "paho-mqtt"}

    code = ("import importlib.util, sys\n"
            "missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]\n"
            "import edge, edge.client, edge.listen, edge.remote\n"
            "from edge import schemas\n"
            "assert edge.__file__.startswith(sys.prefix), edge.__file__\n"
            "doc = schemas.document()['components']['messages']\n"
            "schemas.check('detections', doc['Detections']['examples'][0]['payload'])\n"
            "print(' '.join(missing))")
    imported = _run(light_venv, ["python", "-c", code] + list(HEAVY), timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == list(HEAVY)

    assert _run(light_venv, ["edge", "--help"], timeout=30).returncode == 0
    unknown = _run(light_venv, ["edge", "frob"], timeout=30)
    assert unknown.returncode == 2 and "invalid choice: 'frob'" in unknown.stderr

    # `edge listen` receives what a device publishes
    payload = dict(schemas.document()["components"]["messages"]["Detections"]["examples"][0][
        "payload"], device="cam1")
    payload.pop("camera", None)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    listener = subprocess.Popen(
        [str(light_venv / "edge"), "listen", "cam1", "--mqtt", broker.url, "--count", "1",
         "--json"], cwd=str(light_venv), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True)
    try:
        subscribed = listener.stderr.readline()
        assert "edge listen: subscribed to edge/cam1/detections" in subscribed, \
            subscribed + listener.stderr.read()
        import paho.mqtt.publish as publish
        publish.single("edge/cam1/detections", json.dumps(payload), qos=1,
                       hostname="127.0.0.1", port=broker.port)
        out, err = listener.communicate(timeout=20)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert listener.returncode == 0, err
    assert json.loads(out) == payload

    # `edge health`: the broker is asked, no device answers (exit 2: silent or none found)
    health = _run(light_venv, ["edge", "health", "--all", "--mqtt", broker.url,
                               "--timeout", "1"], timeout=30)
    assert health.returncode == 2, health.stderr
    assert "no device found under edge/+/status" in health.stdout

    # a daemon command: one line naming the extra and the pip command, no traceback
    run = _run(light_venv, ["edge", "run", "--source", "test://"], timeout=30)
    assert run.returncode == 78
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("edge: error: edge run needs the daemon's packages (")
    assert "pip install '{}[daemon]'".format(ROOT) in run.stderr
