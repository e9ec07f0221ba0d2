"""The graphs TensorRT would receive, checked where no GPU is.

`edge build --export-onnx DIR` writes each card's rewritten graph as the backend would hand it
to TensorRT's ONNX parser. Every exported graph must pass onnx's checker, use only operators
and types TensorRT 8.2's parser imports (edge/backends/trtcheck.py, from onnx-tensorrt's
operators.md at release/8.2-GA), never compare floats with Equal (FP16-fragile), and take
frames in the dtype each TensorRT version accepts. The checker itself is tested on small
graphs with each kind of problem, so a check that stopped looking would fail here too.
"""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from edge.backends import trtcheck
from tests.conftest import newest_opset, np_dtype, run_edge

# (TensorRT version, frame dtype it takes): JetPack 4.6.1 (the Nano), 5.0, 5.1, 6.0, 6.1+.
VERSIONS = [("8.2.1.8", np.float32), ("8.4.1.5", np.float32), ("8.5.2.2", np.uint8),
            ("8.6.2", np.uint8), ("10.3.0", np.uint8)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dir):
    """{version: [(path, model)]} for every shipped card at 640x480."""
    found = {}
    for version, _ in VERSIONS:
        folder = str(tmp_path_factory.mktemp("export-" + version))
        code, out, err = run_edge("build", "yolox-nano", "coarse-loftr", "--size", "640x480",
                                  "--model-dir", model_dir, "--export-onnx", folder,
                                  "--tensorrt", version)
        assert code == 0, out + err
        names = sorted(os.listdir(folder))
        assert len(names) == 2, names
        assert out.count("ok for TensorRT " + version) == 2, out
        found[version] = [(os.path.join(folder, n), onnx.load(os.path.join(folder, n)))
                          for n in names]
    return found


@pytest.mark.parametrize("version, frame_dtype", VERSIONS)
def test_exported_graphs_are_what_tensorrt_imports(exported, version, frame_dtype):
    release = tuple(int(p) for p in version.split(".")[:2])
    for path, model in exported[version]:
        onnx.checker.check_model(model, full_check=True)
        assert trtcheck.problems(model, release) == [], path
        # Frames (and a matcher's reference) in the dtype this TensorRT takes as input.
        inputs = [i for i in model.graph.input
                  if i.name not in {t.name for t in model.graph.initializer}]
        assert {i.name for i in inputs} <= {"frame", "reference"}
        for tensor in inputs:
            dtype = np_dtype(tensor.type.tensor_type.elem_type)
            assert dtype == frame_dtype, (path, tensor.name)


def test_no_exported_graph_compares_floats_for_equality(exported):
    """Coarse LoFTR's mutual test compares argmax indices, not the two float maxima."""
    equals = 0
    for models in exported.values():
        for path, model in models:
            inferred = shape_inference.infer_shapes(model).graph
            types = {v.name: v.type.tensor_type.elem_type
                     for v in list(inferred.value_info) + list(inferred.input)}
            types.update({t.name: t.data_type for t in inferred.initializer})
            for node in inferred.node:
                if node.op_type == "Equal":
                    equals += 1
                    assert {types[i] for i in node.input} <= {TensorProto.INT32,
                                                               TensorProto.INT64}, path
    assert equals == len(VERSIONS)       # the matcher's one Equal, in each export


@pytest.mark.parametrize("opset", [newest_opset(17)], ids="opset{}".format)
def test_a_newer_opset_model_exports_for_tensorrt_8_5_but_not_8_2(tmp_path, model_dir, opset):
    """TensorRT 8.2 imports up to opset 13: its ReduceMax would ignore opset 18's axes input
    (an axes attribute is all it reads), so a newer model is refused, not built wrongly.
    At opset 17, or 16 where onnx knows no newer (1.11, JetPack 4.6's): the test id says."""
    from onnx import version_converter
    from edge import cards, graph
    card = cards.load("yolox-nano")
    model = version_converter.convert_version(
        onnx.load(os.path.join(model_dir, "yolox_nano.onnx")), opset)
    assert trtcheck.problems(graph.rewrite(model, card, 640, 480), (8, 5)) == []
    problems = trtcheck.problems(graph.rewrite(model, card, 640, 480, frame_dtype="float32"),
                                 (8, 2))
    assert problems == ["opset {}: TensorRT 8.2 imports up to opset 13; export the model at "
                        "opset 13 or lower".format(opset)]


def test_export_refuses_a_tensorrt_edge_does_not_support(tmp_path, model_dir):
    code, _, err = run_edge("build", "yolox-nano", "--size", "640x480", "--model-dir",
                            model_dir, "--export-onnx", str(tmp_path), "--tensorrt", "8.0.1")
    assert code == 78
    assert "TensorRT 8.0.1 is older than 8.2: upgrade to JetPack 4.6.1+" in err
    assert os.listdir(str(tmp_path)) == []


# -- the checker finds each kind of problem ------------------------------------------------

def _model(nodes, inputs, outputs, initializers=(), opset=11):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _info(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_checker_finds_float_equality():
    model = _model([helper.make_node("ReduceMax", ["x"], ["a"], axes=[1], keepdims=0),
                    helper.make_node("ReduceMax", ["x"], ["b"], axes=[1], keepdims=0),
                    helper.make_node("Equal", ["a", "b"], ["y"], name="mutual")],
                   [_info("x", TensorProto.FLOAT, [2, 3])], [_info("y", TensorProto.BOOL, [2])])
    found = trtcheck.problems(model, (8, 2))
    assert len(found) == 1 and found[0].startswith("node mutual (Equal): Equal compares "
                                                   "floating-point tensors")


def test_checker_finds_uint8_inputs_before_8_5_and_reads_other_than_a_cast_after():
    cast = helper.make_node("Cast", ["frame"], ["f"], to=TensorProto.FLOAT)
    model = _model([cast], [_info("frame", TensorProto.UINT8, [4, 4, 3])],
                   [_info("f", TensorProto.FLOAT, [4, 4, 3])])
    assert any("TensorRT 8.2 has no UINT8 inputs" in p for p in trtcheck.problems(model, (8, 2)))
    assert trtcheck.problems(model, (8, 5)) == []
    model = _model([helper.make_node("Identity", ["frame"], ["f"], name="copy")],
                   [_info("frame", TensorProto.UINT8, [4, 4, 3])],
                   [_info("f", TensorProto.UINT8, [4, 4, 3])])
    assert any("may only be cast to FLOAT or FLOAT16, not read by node copy (Identity)" in p
               for p in trtcheck.problems(model, (8, 5)))


def test_checker_finds_operators_and_types_the_8_2_parser_does_not_import():
    model = _model([helper.make_node("NonZero", ["x"], ["y"], name="nz")],
                   [_info("x", TensorProto.FLOAT, [4])], [_info("y", TensorProto.INT64, [1, None])])
    assert trtcheck.problems(model, (8, 2)) == [
        "node nz (NonZero): TensorRT 8.2's ONNX parser does not import NonZero"]
    model = _model([helper.make_node("ArgMax", ["x"], ["y"], name="am", axis=0)],
                   [_info("x", TensorProto.INT32, [4])], [_info("y", TensorProto.INT64, [1])])
    assert trtcheck.problems(model, (8, 2)) == [
        "node am (ArgMax): input type INT32 is not imported (supported: FP32, FP16)"]


def test_checker_checks_every_input_type_not_only_the_first():
    """operators.md's type list covers the inputs of the operator's data type in the ONNX
    schema: Where's X and Y (its first input is the BOOL condition), every input of Concat;
    indices, shapes and axes need only be types the parser has."""
    where = _model([helper.make_node("Where", ["c", "x", "y"], ["o"], name="pick")],
                   [_info("c", TensorProto.BOOL, [4]), _info("x", TensorProto.INT8, [4]),
                    _info("y", TensorProto.INT8, [4])], [_info("o", TensorProto.INT8, [4])])
    assert trtcheck.problems(where, (8, 2)) == [
        "node pick (Where): input 1 (x) type INT8 is not imported (supported: FP32, FP16, "
        "INT32, BOOL)"]
    concat = _model([helper.make_node("Concat", ["a", "b"], ["o"], name="cat", axis=0)],
                    [_info("a", TensorProto.BOOL, [2]), _info("b", TensorProto.BOOL, [2])],
                    [_info("o", TensorProto.BOOL, [4])])
    assert trtcheck.problems(concat, (8, 2)) == []
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    fill = _model([helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="fill"),
                   helper.make_node("TopK", ["zeros", "k"], ["v", "i"], name="top", axis=0)],
                  [_info("shape", TensorProto.INT64, [1])],
                  [_info("v", TensorProto.FLOAT, [2]), _info("i", TensorProto.INT64, [2])],
                  [k])
    assert trtcheck.problems(fill, (8, 2)) == [], "a shape or a K is no data input"
    steps = _model([helper.make_node("Range", ["a", "b", "d"], ["o"], name="r")],
                   [_info(n, TensorProto.FLOAT, []) for n in "abd"],
                   [_info("o", TensorProto.FLOAT, [None])])
    assert trtcheck.problems(steps, (8, 2))[0] == (
        "node r (Range): input 0 (a) is floating-point, which Range takes only as an "
        "initializer")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "zero")
    quantize = _model([helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"],
                                        name="q")],
                      [_info("x", TensorProto.FLOAT, [4])], [_info("q", TensorProto.UINT8, [4])],
                      [scale, zero])
    assert "node q (QuantizeLinear): input 2 (zero) type UINT8 is not a type TensorRT's " \
        "parser imports" in trtcheck.problems(quantize, (8, 2))


def test_checker_finds_constants_the_parser_needs_and_resize_modes_it_lacks():
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    model = _model([helper.make_node("Shape", ["x"], ["n"]),
                    helper.make_node("TopK", ["x", "n"], ["v", "i"], name="top", axis=0)],
                   [_info("x", TensorProto.FLOAT, [4])],
                   [_info("v", TensorProto.FLOAT, [4]), _info("i", TensorProto.INT64, [4])])
    assert trtcheck.problems(model, (8, 2)) == [
        "node top (TopK): input 1 (n) must be an initializer"]
    model = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top", axis=0)],
                   [_info("x", TensorProto.FLOAT, [4])],
                   [_info("v", TensorProto.FLOAT, [2]), _info("i", TensorProto.INT64, [2])],
                   [k])
    assert trtcheck.problems(model, (8, 2)) == []
    sizes = numpy_helper.from_array(np.array([1, 3, 8, 8], np.int64), "sizes")
    empty = numpy_helper.from_array(np.array([], np.float32), "empty")
    model = _model([helper.make_node("Resize", ["x", "empty", "empty", "sizes"], ["y"],
                                     name="up", mode="cubic")],
                   [_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                   [_info("y", TensorProto.FLOAT, [1, 3, 8, 8])], [sizes, empty])
    assert trtcheck.problems(model, (8, 2)) == [
        "node up (Resize): mode cubic (supported: nearest, linear)"]


def test_parser_opsets_by_version():
    assert trtcheck.parser_opset((8, 2)) == 13
    assert trtcheck.parser_opset((8, 4)) == 17
    assert trtcheck.parser_opset((8, 6)) == 17
    assert trtcheck.parser_opset((10, 3)) == 20


def _qdq_conv(zero=0, zero_type=TensorProto.INT8, activation_scales=1, bias_type=None,
              with_zero=True):
    """x -> Q -> DQ -> Conv (weights: INT8 initializer -> per-channel DQ), as edge.quantize
    writes it, with one thing changed at a time."""
    def const(name, array, elem=None):
        tensor = numpy_helper.from_array(array, name)
        if elem is not None:
            tensor.data_type = elem
        return tensor
    inits = [const("s", np.full(activation_scales, 0.05, np.float32).reshape(
                 () if activation_scales == 1 else (activation_scales,))),
             const("z", np.array(zero, np.int8 if zero_type == TensorProto.INT8 else np.uint8)),
             const("w", np.ones((4, 3, 1, 1), np.int8)),
             const("ws", np.full(4, 0.01, np.float32)),
             const("wz", np.zeros(4, np.int8))]
    q_inputs = ["x", "s", "z"] if with_zero else ["x", "s"]
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"] if with_zero else ["xq", "s"],
                              ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq", axis=0)]
    conv_inputs = ["xd", "wd"]
    if bias_type is not None:
        inits += [const("b", np.zeros(4, np.int32)), const("bs", np.full(4, 0.0005, np.float32)),
                  const("bz", np.zeros(4, np.int32))]
        nodes.append(helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], name="bdq",
                                      axis=0))
        conv_inputs.append("bd")
    nodes.append(helper.make_node("Conv", conv_inputs, ["y"], name="conv"))
    return _model(nodes, [_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits, opset=13)


def test_a_qdq_graph_as_edge_quantizes_passes_and_its_conv_may_take_dequantized_weights():
    for release in ((8, 2), (8, 5), (10, 3)):
        assert trtcheck.problems(_qdq_conv(), release) == [], release


@pytest.mark.parametrize("change, expected", [
    ({"zero": 3}, "zero point z is not 0; TensorRT quantizes symmetrically"),
    ({"zero_type": TensorProto.UINT8}, "zero point z is UINT8; TensorRT quantizes to INT8"),
    ({"activation_scales": 3}, "per-axis scales on an activation (x)"),
    ({"bias_type": TensorProto.INT32}, "dequantizes INT32 b; TensorRT's DequantizeLinear takes "
                                       "INT8"),
    ({"with_zero": False}, "no zero point; TensorRT 8.0-8.5 need all three inputs"),
])
def test_the_checker_finds_what_tensorrt_refuses_in_a_qdq_graph(change, expected):
    found = trtcheck.problems(_qdq_conv(**change), (8, 5))
    assert any(expected in line for line in found), found
