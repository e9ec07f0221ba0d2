"""engine.precision (edge.precision): who may have INT8, a card's calibrated graph beside the
engines, and `edge run --precision int8` on the CPU backend with the real model and images.

TensorRT is not on this host: its refusal is checked through TrtBackend's own int8_problem
with the device's facts faked (a Jetson Nano's, an Orin's, ...), the only part that differs.
"""

import os
import shutil
import types

import pytest

from edge import cards, precision
from edge.backends import trt
from edge.errors import ConfigError
from tests.conftest import COCO8_VAL, SHARED, run_edge

TRAIN = os.path.join(SHARED, "data", "coco8", "images", "train")

NANO = {"backend": "trt", "tensorrt": "8.2.1", "device": "NVIDIA Tegra X1",
        "compute_capability": "5.3"}
TX2 = dict(NANO, device="NVIDIA Tegra X2", compute_capability="6.2")
XAVIER_JP5 = dict(NANO, tensorrt="8.5.2", device="Xavier", compute_capability="7.2")
ORIN_JP6 = dict(NANO, tensorrt="10.3.0", device="Orin", compute_capability="8.7")
ORIN_JP5_OLD = dict(ORIN_JP6, tensorrt="8.4.1")


def trt_backend(facts):
    """A TrtBackend whose device facts are `facts` (no GPU here: nothing else is used)."""
    backend = trt.TrtBackend.__new__(trt.TrtBackend)
    backend.fingerprint = lambda: dict(facts)
    return backend


@pytest.mark.parametrize("facts, refused", [
    (NANO, "compute capability 5.3"), (TX2, "compute capability 6.2"),
    (ORIN_JP5_OLD, "TensorRT 8.4.1"), (XAVIER_JP5, None), (ORIN_JP6, None)])
def test_int8_is_refused_where_it_cannot_pay(facts, refused):
    problem = trt_backend(facts).int8_problem()
    if refused is None:
        assert problem is None
    else:
        assert refused in problem


def test_int8_on_a_jetson_nano_is_refused_at_start_with_the_reason_and_the_alternative(
        tmp_path):
    card = cards.load("yolox-nano")
    with pytest.raises(ConfigError) as e:
        precision.resolve(card, "int8", trt_backend(NANO), str(tmp_path), lambda: None)
    line = str(e.value)
    assert "\n" not in line
    assert "engine.precision int8" in line and "5.3" in line and "use fp16" in line


def test_auto_and_fp16_leave_the_card_as_it_is_and_fp32_on_a_gpu_is_a_copy(tmp_path):
    card = cards.load("yolox-nano")
    cpu = types.SimpleNamespace(name="ort", int8_problem=lambda: None)
    for requested in ("auto", "fp16", "fp32"):
        assert precision.resolve(card, requested, cpu, str(tmp_path), None) is card
    gpu = trt_backend(ORIN_JP6)
    assert precision.resolve(card, "fp16", gpu, str(tmp_path), None) is card
    made = precision.resolve(card, "fp32", gpu, str(tmp_path), None)
    assert made is not card and made.precision == "fp32" and made.data["precision"] == "fp32"
    assert card.precision == "fp16"


def test_a_family_that_is_not_quantized_keeps_its_precision(tmp_path, caplog):
    card = cards.load("coarse-loftr")
    made = precision.resolve(card, "int8", trt_backend(ORIN_JP6), str(tmp_path), None)
    assert made is card and made.precision == "fp16"
    assert "coarse-loftr keeps fp16" in caplog.text


def test_int8_without_a_calibrated_graph_or_default_images_names_edge_calibrate(tmp_path):
    text = open(cards.find("yolox-nano")).read()
    text = text.replace("name: yolox-nano", "name: yolox-plain")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("calibration"))
    (tmp_path / "yolox-plain.yaml").write_text(text + "\n")
    shutil.copytree(os.path.join(os.path.dirname(cards.find("yolox-nano")), "labels"),
                    str(tmp_path / "labels"))
    card = cards.load(str(tmp_path / "yolox-plain.yaml"))
    cpu = types.SimpleNamespace(name="ort", int8_problem=lambda: None)
    with pytest.raises(ConfigError, match=r"edge calibrate yolox-plain --images DIR"):
        precision.resolve(card, "int8", cpu, str(tmp_path / "engines"), None)


def test_calibrate_refuses_a_card_whose_family_is_not_quantized(tmp_path, model_dir):
    rc, _, err = run_edge("calibrate", "coarse-loftr", "--images", TRAIN, "--model-dir",
                          model_dir, "--state-dir", str(tmp_path))
    assert rc == 78, err
    assert "coarse-loftr" in err and "not quantized" in err


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, model_dir):
    """A state folder whose engines folder holds yolox-nano's graph from `edge calibrate`
    (24 frames of the train images), and what the command printed."""
    state = str(tmp_path_factory.mktemp("int8") / "state")
    rc, out, err = run_edge("calibrate", "yolox-nano", "--images", TRAIN, "--count", "24",
                            "--model-dir", model_dir, "--state-dir", state, timeout=600)
    assert rc == 0, err
    return state, out


def test_calibrate_then_run_int8_on_the_cpu(calibrated, model_dir, broker, subscriber):
    """`edge calibrate` writes the graph beside the engines; `edge run --precision int8`
    builds its engine from it (the cache file says int8), detects, and health says int8."""
    state, out = calibrated
    graph = precision.calibrated_path(os.path.join(state, "engines"),
                                      cards.load("yolox-nano"))
    assert os.path.isfile(graph) and graph in out
    sub = subscriber("edge/#")
    rc, _, err = run_edge("run", "--source", COCO8_VAL, "--detector", "yolox-nano",
                          "--precision", "int8", "--model-dir", model_dir, "--state-dir",
                          state, "--mqtt", broker.url + "?qos=1", "--device-id", "int8",
                          "--backend", "ort", timeout=600)
    assert rc == 0, err
    assert sub.wait_for(lambda s: len(s.json("detections")) == 4 and
                        s.json("status")[-1]["state"] == "offline"), err
    assert sum(len(m["detections"]) for m in sub.json("detections")) >= 4
    engines = sub.json("health")[-1]["engines"]
    assert engines and {e.get("precision") for e in engines.values()} == {"int8"}, engines
    assert any("-int8-" in name for name in os.listdir(os.path.join(state, "engines")))


def test_the_int8_graph_exported_for_tensorrt_8_5_passes_its_checks(calibrated, model_dir,
                                                                      tmp_path):
    """`edge build --export-onnx --precision int8` writes the rewritten QDQ graph as
    TensorRT 8.5 and 10 receive it, checked (symmetric zero points, per-channel weights);
    for 8.2 it is refused with the reason."""
    import onnx
    from onnx import numpy_helper
    from edge.backends import trtcheck
    state, _ = calibrated
    for version in ("8.5.2", "10.3.0"):
        folder = str(tmp_path / version)
        rc, out, err = run_edge("build", "yolox-nano", "--size", "640x480", "--precision",
                                "int8", "--export-onnx", folder, "--tensorrt", version,
                                "--model-dir", model_dir, "--state-dir", state)
        assert rc == 0, out + err
        (name,) = os.listdir(folder)
        assert name == "yolox-nano-640x480-int8-uint8.onnx"
        assert "ok for TensorRT " + version in out
        model = onnx.load(os.path.join(folder, name))
        assert trtcheck.problems(model, tuple(int(v) for v in version.split(".")[:2])) == []
        initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        zeros = [initializers[n.input[2]] for n in model.graph.node
                 if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert zeros and all(z.dtype == "int8" and not z.any() for z in zeros)
        assert any(initializers[n.input[1]].size > 1 for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in initializers)
    rc, out, err = run_edge("build", "yolox-nano", "--size", "640x480", "--precision", "int8",
                            "--export-onnx", str(tmp_path / "old"), "--tensorrt", "8.2",
                            "--model-dir", model_dir, "--state-dir", state)
    assert rc == 78 and "TensorRT 8.2 is older than 8.5" in err, out + err


def test_doctor_checks_an_int8_engine_against_the_float_reference_with_int8s_tolerance(
        calibrated, model_dir, tmp_path):
    state, _ = calibrated
    config = tmp_path / "int8.yaml"
    config.write_text("engine: {{precision: int8}}\nmodel_dir: {}\nstate_dir: {}\n".format(
        model_dir, state))
    rc, out, err = run_edge("doctor", "yolox-nano", "-c", str(config), timeout=600)
    line = [l for l in out.splitlines() if l.startswith("yolox-nano ")][-1]
    assert rc == 0 and " ok " in line and "(INT8)" in line, out + err
