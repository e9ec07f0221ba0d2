"""Shared fixtures: a real Mosquitto broker on a free loopback port, models, images."""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
MODELS = os.path.join(SHARED, "models")
COCO8 = os.path.join(SHARED, "data", "coco8")
COCO8_VAL = os.path.join(COCO8, "images", "val")
COCO8_ALL = [os.path.join(COCO8, "images", split, name)
             for split in ("train", "val")
             for name in sorted(os.listdir(os.path.join(COCO8, "images", split)))]

# The paho-mqtt releases the daemon is tested under besides the venv's 2.x (tools/test puts
# them in .paho/, a folder each): 1.5.1, and 1.6.1, the last for Python 3.6.
OLD_PAHOS = ("1.5.1", "1.6.1")


def paho_env(version):
    """os.environ for a child process that imports paho-mqtt `version` ("venv": the venv's
    own); skips the test where tools/test has not installed it."""
    env = dict(os.environ)
    if version != "venv":
        folder = os.path.join(ROOT, ".paho", version)
        if not os.path.exists(os.path.join(folder, "paho", "mqtt", "client.py")):
            pytest.skip("paho-mqtt {} is not in .paho/{}: tools/test installs it".format(
                version, version))
        env["PYTHONPATH"] = folder
    return env


def pytest_configure(config):
    """Engines and references of the suite live in a temporary state folder, not in ~."""
    import tempfile
    if "EDGE_STATE_DIR" not in os.environ:
        os.environ["EDGE_STATE_DIR"] = tempfile.mkdtemp(prefix="edge-test-state-")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary():
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if os.path.exists("/usr/sbin/mosquitto") else None)


class Broker:
    """A real mosquitto process on 127.0.0.1:port, restartable (same port)."""

    def __init__(self, folder, port=None, extra_conf=""):
        self.folder = folder
        self.port = port or free_port()
        self.conf = os.path.join(folder, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write("listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n{}".format(
                self.port, extra_conf))
        self.proc = None

    @property
    def url(self):
        return "mqtt://127.0.0.1:{}".format(self.port)

    def start(self):
        binary = mosquitto_binary()
        if binary is None:
            pytest.fail("mosquitto is not installed: run tools/test, which installs it")
        self.log = open(os.path.join(self.folder, "mosquitto.log"), "ab")
        self.proc = subprocess.Popen([binary, "-c", self.conf], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        pytest.fail("mosquitto did not start on port {}".format(self.port))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(str(tmp_path)).start()
    yield b
    b.stop()


class Subscriber:
    """A paho client collecting (topic, payload, retain) for a topic filter."""

    def __init__(self, port, topic="#", qos=1):
        import paho.mqtt.client as paho
        from edge.mqtt import make_client
        self.messages = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = make_client("test-sub-{}".format(time.monotonic_ns()))

        def on_connect(client, userdata, flags, rc, properties=None):
            client.subscribe(topic, qos)

        def on_subscribe(client, userdata, *args):
            self.connected.set()

        def on_message(client, userdata, msg):
            with self.lock:
                self.messages.append((msg.topic, msg.payload, msg.retain))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert self.connected.wait(5), "test subscriber could not subscribe"
        assert paho is not None

    def json(self, suffix):
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith("/" + suffix)]

    def wait_for(self, predicate, timeout=10):
        from tools.soak import wait_until
        return wait_until(lambda: predicate(self), timeout)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber(broker):
    subs = []

    def make(topic="#", qos=1):
        s = Subscriber(broker.port, topic, qos)
        subs.append(s)
        return s
    yield make
    for s in subs:
        s.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A model folder filled from the ../shared/models mirror, as `edge models fetch` does."""
    folder = str(tmp_path_factory.mktemp("models"))
    subprocess.check_call([sys.executable, "-m", "edge", "models", "fetch", "--mirror", MODELS,
                           "--model-dir", folder], stdout=subprocess.DEVNULL)
    return folder


def np_dtype(elem_type):
    """The numpy dtype of an ONNX element type (TensorProto.FLOAT, ...), on every onnx the
    tests run with: helper.tensor_dtype_to_np_dtype came in 1.13 (JetPack 4.6 has 1.11),
    onnx.mapping, 1.11's way, is gone from the newest."""
    from onnx import helper
    if hasattr(helper, "tensor_dtype_to_np_dtype"):
        return helper.tensor_dtype_to_np_dtype(elem_type)
    from onnx import mapping
    return mapping.TENSOR_TYPE_TO_NP_TYPE[elem_type]


def newest_opset(wanted, run=False):
    """`wanted`, or the newest default-domain opset the installed onnx knows (with `run`, and
    ONNX Runtime loads) if that is older: JetPack 4.6's onnx 1.11 knows 16 (its version
    converter crashes past it), its onnxruntime 1.10 loads up to 15."""
    import onnx
    opset = min(wanted, onnx.defs.onnx_opset_version())
    return _runtime_opset(opset) if run else opset


@functools.lru_cache()
def _runtime_opset(opset):
    """The newest opset up to `opset` at which ONNX Runtime (where installed) loads a model."""
    try:
        import onnxruntime
    except ImportError:
        return opset
    from onnx import TensorProto, helper
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy"]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              info[:1], info[1:])
    for version in range(opset, 11, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
        model.ir_version = 8       # what onnxruntime 1.10 reads
        try:
            onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])
            return version
        except Exception:  # noqa: BLE001 (its error for an opset newer than it knows)
            continue
    return 11


def run_edge(*args, timeout=120, env=None):
    """`python -m edge ARGS` in a real process: (returncode, stdout, stderr)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "edge"] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, env=full_env, cwd=ROOT)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
