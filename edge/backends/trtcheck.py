"""What TensorRT's ONNX parser imports, and a check of a rewritten graph against it.

Nothing here needs TensorRT: CI runs `problems()` on every graph `edge build --export-onnx`
writes, so a graph the Nano's parser would refuse (or import wrongly) fails a test on a
machine without a GPU. The rules come from the onnx-tensorrt sources at each release:

- `OPS_82`: the operators TensorRT 8.2's parser imports and the types it imports them for,
  from docs/operators.md at onnx-tensorrt `release/8.2-GA` (commit 85e79f6, November 2021).
  8.2 is the oldest version edge supports and the newest a Jetson Nano runs, so its list
  binds every graph. INT64 and DOUBLE count as INT32 and FP32: "TensorRT will attempt to
  cast down INT64 to INT32 and DOUBLE down to FLOAT" (the same page).
- Every input's type, not only the first: the list covers the inputs of the operator's
  data type variable in the ONNX schema (`_TABLE_INPUTS` lists the exceptions), and the
  other inputs (indices, shapes, axes) must be types the parser has at all.
- `PARSER_OPSETS`: the newest opset each parser documents ("supports operators up to Opset
  13" at 8.2, 17 at 8.4-8.6, "opset 9 to opset 20" at 10.0). Beyond it a parser may import
  a node in an older form without a word: 8.2's ReduceMax reads only the `axes` attribute
  (onnx2trt_utils.cpp, reduceTensor), so an opset-18 ReduceMax, whose axes are an input,
  would reduce every axis.
- Inputs: no UINT8 before 8.5 ("Unsupported ONNX data type: UINT8"); from 8.5 a UINT8
  network input may only be cast to FLOAT or HALF (8.5 NvInfer.h, UINT8 restrictions).
- Our own rule, for FP16 engines: no `Equal` on floating-point tensors. With the FP16 flag
  TensorRT picks each layer's precision, so two float results that are equal in FP32 need
  not be equal in the engine, and an equality test on them silently fails.
- QDQ graphs (engine.precision int8, edge.quantize): QuantizeLinear/DequantizeLinear as the
  QuantDequantLinearHelper of builtin_op_importers.cpp takes them at release/8.0-GA
  (lines 1097-1215), 8.2-GA (1123-1241), 8.5-GA (1184-1310), 8.6-GA (1157-1307) and
  onnxOpImporters.cpp at 10.1-GA (1346-1520): the scale an initializer, positive; the zero
  point given (three inputs, required through 8.5; from 8.6 two may do, but not for INT8
  with a constant zero point), INT8 and 0 (symmetric; 8.5 refuses UINT8 outright); several
  scales only along a weight's output channels (activations per tensor); a
  DequantizeLinear reads INT8 (no INT32 bias). A Conv's weights may then be a
  DequantizeLinear of an initializer instead of the initializer (the 8.0 Conv importer
  takes weights as a tensor, lines 604-616). Per-axis Q/DQ needs opset 13.
"""

from onnx import TensorProto, shape_inference

# Operator -> types the 8.2 parser imports it for (onnx-tensorrt release/8.2-GA operators.md).
OPS_82 = {
    "Abs": "FP32 FP16 INT32", "Acos": "FP32 FP16", "Acosh": "FP32 FP16", "Add": "FP32 FP16 INT32",
    "And": "BOOL", "ArgMax": "FP32 FP16", "ArgMin": "FP32 FP16", "Asin": "FP32 FP16",
    "Asinh": "FP32 FP16", "Atan": "FP32 FP16", "Atanh": "FP32 FP16",
    "AveragePool": "FP32 FP16 INT8 INT32", "BatchNormalization": "FP32 FP16",
    "Cast": "FP32 FP16 INT32 INT8 BOOL", "Ceil": "FP32 FP16", "Celu": "FP32 FP16",
    "Clip": "FP32 FP16 INT8", "Concat": "FP32 FP16 INT32 INT8 BOOL",
    "Constant": "FP32 FP16 INT32 INT8 BOOL", "ConstantOfShape": "FP32", "Conv": "FP32 FP16 INT8",
    "ConvTranspose": "FP32 FP16 INT8", "Cos": "FP32 FP16", "Cosh": "FP32 FP16",
    "CumSum": "FP32 FP16", "DepthToSpace": "FP32 FP16 INT32", "DequantizeLinear": "INT8",
    "Div": "FP32 FP16 INT32", "Dropout": "FP32 FP16", "Einsum": "FP32 FP16",
    "Elu": "FP32 FP16 INT8", "Equal": "FP32 FP16 INT32", "Erf": "FP32 FP16", "Exp": "FP32 FP16",
    "Expand": "FP32 FP16 INT32 BOOL", "EyeLike": "FP32 FP16 INT32 BOOL",
    "Flatten": "FP32 FP16 INT32 BOOL", "Floor": "FP32 FP16", "GRU": "FP32 FP16",
    "Gather": "FP32 FP16 INT8 INT32", "GatherElements": "FP32 FP16 INT8 INT32",
    "GatherND": "FP32 FP16 INT8 INT32", "Gemm": "FP32 FP16 INT8",
    "GlobalAveragePool": "FP32 FP16 INT8", "GlobalLpPool": "FP32 FP16 INT8",
    "GlobalMaxPool": "FP32 FP16 INT8", "Greater": "FP32 FP16 INT32",
    "GreaterOrEqual": "FP32 FP16 INT32", "HardSigmoid": "FP32 FP16 INT8",
    "Identity": "FP32 FP16 INT32 INT8 BOOL", "If": "FP32 FP16 INT32 BOOL",
    "ImageScaler": "FP32 FP16", "InstanceNormalization": "FP32 FP16", "IsNaN": "FP32 FP16 INT32",
    "LRN": "FP32 FP16", "LSTM": "FP32 FP16", "LeakyRelu": "FP32 FP16 INT8",
    "Less": "FP32 FP16 INT32", "LessOrEqual": "FP32 FP16 INT32", "Log": "FP32 FP16",
    "LogSoftmax": "FP32 FP16", "Loop": "FP32 FP16 INT32 BOOL", "LpNormalization": "FP32 FP16",
    "LpPool": "FP32 FP16 INT8", "MatMul": "FP32 FP16", "Max": "FP32 FP16 INT32",
    "MaxPool": "FP32 FP16 INT8", "Mean": "FP32 FP16 INT32", "Min": "FP32 FP16 INT32",
    "Mul": "FP32 FP16 INT32", "Neg": "FP32 FP16 INT32", "NonMaxSuppression": "FP32 FP16",
    "Not": "BOOL", "Or": "BOOL", "PRelu": "FP32 FP16 INT8", "Pad": "FP32 FP16 INT8 INT32",
    "ParametricSoftplus": "FP32 FP16 INT8", "Pow": "FP32 FP16", "QuantizeLinear": "FP32 FP16",
    "RNN": "FP32 FP16", "RandomUniform": "FP32 FP16", "RandomUniformLike": "FP32 FP16",
    "Range": "FP32 FP16 INT32", "ReduceL1": "FP32 FP16", "ReduceL2": "FP32 FP16",
    "ReduceLogSum": "FP32 FP16", "ReduceLogSumExp": "FP32 FP16", "ReduceMax": "FP32 FP16",
    "ReduceMean": "FP32 FP16", "ReduceMin": "FP32 FP16", "ReduceProd": "FP32 FP16",
    "ReduceSum": "FP32 FP16", "ReduceSumSquare": "FP32 FP16", "Relu": "FP32 FP16 INT8",
    "Reshape": "FP32 FP16 INT32 INT8 BOOL", "Resize": "FP32 FP16", "ReverseSequence": "FP32 FP16",
    "Round": "FP32 FP16 INT8", "ScaledTanh": "FP32 FP16 INT8", "Scan": "FP32 FP16",
    "Scatter": "FP32 FP16 INT8 INT32", "ScatterElements": "FP32 FP16 INT8 INT32",
    "ScatterND": "FP32 FP16 INT8 INT32", "Selu": "FP32 FP16 INT8",
    "Shape": "FP32 FP16 INT32 INT8 BOOL", "Sigmoid": "FP32 FP16 INT8",
    "Sign": "FP32 FP16 INT8 INT32", "Sin": "FP32 FP16", "Sinh": "FP32 FP16",
    "Size": "FP32 FP16 INT32 INT8 BOOL", "Slice": "FP32 FP16 INT32 INT8 BOOL",
    "Softmax": "FP32 FP16", "Softplus": "FP32 FP16 INT8", "Softsign": "FP32 FP16 INT8",
    "SpaceToDepth": "FP32 FP16 INT32", "Split": "FP32 FP16 INT32 BOOL", "Sqrt": "FP32 FP16",
    "Squeeze": "FP32 FP16 INT32 INT8 BOOL", "Sub": "FP32 FP16 INT32", "Sum": "FP32 FP16 INT32",
    "Tan": "FP32 FP16", "Tanh": "FP32 FP16 INT8", "ThresholdedRelu": "FP32 FP16 INT8",
    "Tile": "FP32 FP16 INT32 BOOL", "TopK": "FP32 FP16", "Transpose": "FP32 FP16 INT32 INT8 BOOL",
    "Unsqueeze": "FP32 FP16 INT32 INT8 BOOL", "Upsample": "FP32 FP16",
    "Where": "FP32 FP16 INT32 BOOL",
}

# (major, minor) -> the newest opset the parser documents; a version takes the entry of the
# newest release at or below it.
PARSER_OPSETS = ((8, 2, 13), (8, 4, 17), (10, 0, 20))

UINT8_INPUTS = (8, 5)

# ONNX element type -> the parser's name for it (INT64/DOUBLE are cast down, see above).
_TYPES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.DOUBLE: "FP32",
          TensorProto.INT32: "INT32", TensorProto.INT64: "INT32", TensorProto.INT8: "INT8",
          TensorProto.BOOL: "BOOL", TensorProto.UINT8: "UINT8"}
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)

# Which inputs the table's types are about. operators.md gives one type list per operator;
# the ONNX schema says which inputs share a type: by default the list covers every input of
# the first input's type variable (Concat's and Sum's all, Clip's min and max, Pad's value)
# and not the others (Gather's indices, TopK's K, Resize's sizes, Reshape's shape), which
# need only be types the parser has. The exceptions, op -> input positions the list covers:
# Where's list is its X and Y (the condition is BOOL); ConstantOfShape's FP32 is its output
# (the `value` attribute), its input is a shape.
_TABLE_INPUTS = {"Where": (1, 2), "ConstantOfShape": ()}
# operators.md restrictions about one input's type: Range takes floating-point start, limit
# and delta only as initializers.
_FLOAT_CONSTANT_INPUTS = {"Range": (0, 1, 2)}
_NO_TYPE_RULE = ("Shape", "Size")   # they read only the shape of their input

# Inputs that the 8.2 parser needs as initializers (operators.md "Restrictions" and the
# importers): op -> input positions.
_CONSTANT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Slice": (3,), "Squeeze": (1,),
                    "Unsqueeze": (1,), "TopK": (1,)}
_RESIZE_MODES = ("nearest", "linear")
_RESIZE_COORDINATES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                       "asymmetric", "align_corners")


def parser_opset(version):
    """The newest opset TensorRT `version` ((major, minor)) documents importing."""
    newest = None
    for major, minor, opset in PARSER_OPSETS:
        if tuple(version[:2]) >= (major, minor):
            newest = opset
    return newest


def problems(model, version=(8, 2)):
    """What TensorRT `version` ((major, minor)) would refuse or get wrong in `model`, one
    line per problem; an empty list when the graph is fine."""
    found = []
    opset = _default_opset(model)
    limit = parser_opset(version)
    label = "TensorRT {}.{}".format(*version[:2])
    if limit is not None and opset > limit:
        found.append("opset {}: {} imports up to opset {}; export the model at opset {} or "
                     "lower".format(opset, label, limit, limit))
    graph = shape_inference.infer_shapes(model).graph
    types = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    constants = {t.name for t in graph.initializer}
    for t in graph.initializer:
        types[t.name] = t.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
    found.extend(_input_problems(graph, constants, types, version, label))
    dequantized = {node.output[0] for node in graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in constants}
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        found.extend(_node_problems(node, types, constants | dequantized, version, opset))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found.extend(qdq_problems(node, initializers))
    return found


def qdq_problems(node, initializers):
    """What TensorRT's QuantizeLinear/DequantizeLinear importer (8.0 to 10.x, module
    docstring) refuses in one such node, one line each; `initializers` by name."""
    import numpy as np
    from onnx import numpy_helper
    where = "{} {}".format(node.op_type, node.name or node.output[0])
    found = []
    scale = initializers.get(node.input[1])
    if scale is None:
        found.append("{}: scale {} is not an initializer".format(where, node.input[1]))
    elif not np.all(numpy_helper.to_array(scale) > 0):
        found.append("{}: scale {} is not positive".format(where, node.input[1]))
    elif numpy_helper.to_array(scale).size > 1 and node.input[0] not in initializers:
        found.append("{}: per-axis scales on an activation ({}); TensorRT quantizes "
                     "activations per tensor".format(where, node.input[0]))
    if len(node.input) < 3 or not node.input[2]:
        found.append("{}: no zero point; TensorRT 8.0-8.5 need all three inputs".format(where))
        return found
    zero = initializers.get(node.input[2])
    if zero is None:
        found.append("{}: zero point {} is not an initializer".format(where, node.input[2]))
    elif zero.data_type != TensorProto.INT8:
        found.append("{}: zero point {} is {}; TensorRT quantizes to INT8".format(
            where, node.input[2], TensorProto.DataType.Name(zero.data_type)))
    elif np.any(numpy_helper.to_array(zero) != 0):
        found.append("{}: zero point {} is not 0; TensorRT quantizes symmetrically".format(
            where, node.input[2]))
    data = initializers.get(node.input[0])
    if node.op_type == "DequantizeLinear" and data is not None and \
            data.data_type != TensorProto.INT8:
        found.append("{}: dequantizes {} {}; TensorRT's DequantizeLinear takes INT8".format(
            where, TensorProto.DataType.Name(data.data_type), node.input[0]))
    return found


def _default_opset(model):
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def _name(node):
    return "node {} ({})".format(node.name or (node.output[0] if node.output else "?"),
                                 node.op_type)


def _input_problems(graph, constants, types, version, label):
    found = []
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for info in graph.input:
        if info.name in constants:
            continue
        elem = info.type.tensor_type.elem_type
        if elem != TensorProto.UINT8:
            if _TYPES.get(elem) is None:
                found.append("input {}: type {} is not a TensorRT input type".format(
                    info.name, TensorProto.DataType.Name(elem)))
            continue
        if tuple(version[:2]) < UINT8_INPUTS:
            found.append("input {}: {} has no UINT8 inputs (from 8.5 on); rewrite the graph "
                         "with float32 frames".format(info.name, label))
            continue
        for node in consumers.get(info.name, []):
            to = _attribute(node, "to")
            if node.op_type != "Cast" or to not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                found.append("input {}: a UINT8 input may only be cast to FLOAT or FLOAT16, "
                             "not read by {}".format(info.name, _name(node)))
    return found


def _table_positions(node, opset):
    """Positions of the node's inputs that the table's type list is about (see
    _TABLE_INPUTS); from the ONNX schema at the model's opset, or input 0 alone where the
    schema is unknown."""
    if node.op_type in _TABLE_INPUTS:
        return [i for i in _TABLE_INPUTS[node.op_type] if i < len(node.input)]
    from onnx import defs
    try:
        formal = defs.get_schema(node.op_type, opset, "").inputs
    except Exception:  # noqa: BLE001 (onnx raises SchemaError; older releases others)
        formal = []
    if not formal:
        return [0] if node.input else []
    variadic = defs.OpSchema.FormalParameterOption.Variadic
    kinds = []
    for i in range(len(node.input)):
        if i < len(formal):
            kinds.append(_type_str(formal[i]))
        elif formal[-1].option == variadic:
            kinds.append(_type_str(formal[-1]))     # Concat, Sum, Max, ...: all one variable
        else:
            kinds.append(None)
    return [i for i, kind in enumerate(kinds) if kind is not None and kind == kinds[0]]


def _type_str(parameter):
    """A schema input's type variable ("T"): `type_str` in newer onnx, `typeStr` in 1.11
    (JetPack 4.6's)."""
    return getattr(parameter, "type_str", None) or parameter.typeStr


def _type_problems(node, types, constants, version, supported, opset):
    """Every input's type: those the table covers against its list, the others against the
    types the parser has at all (INT64 and DOUBLE cast down, no UINT8 but a cast frame)."""
    found = []
    reported = set()
    covered = [] if node.op_type in _NO_TYPE_RULE else _table_positions(node, opset)
    for position, name in enumerate(node.input):
        elem = types.get(name) if name else None
        if not elem or elem in reported:
            continue
        kind = _TYPES.get(elem)
        if kind == "UINT8" and node.op_type == "Cast" and position == 0 and \
                tuple(version[:2]) >= UINT8_INPUTS:
            kind = "FP32"    # 8.5+: UINT8 inputs are cast (the input rule checks the target)
        where = "input" if position == 0 else "input {} ({})".format(position, name)
        if position in covered:
            if kind in supported.split():
                continue
            found.append("{}: {} type {} is not imported (supported: {})".format(
                _name(node), where, TensorProto.DataType.Name(elem),
                supported.replace(" ", ", ")))
        elif node.op_type not in _NO_TYPE_RULE and kind in (None, "UINT8"):
            found.append("{}: {} type {} is not a type TensorRT's parser imports".format(
                _name(node), where, TensorProto.DataType.Name(elem)))
        else:
            continue
        reported.add(elem)
    for position in _FLOAT_CONSTANT_INPUTS.get(node.op_type, ()):
        name = node.input[position] if position < len(node.input) else ""
        if name and types.get(name) in _FLOATS and name not in constants:
            found.append("{}: input {} ({}) is floating-point, which {} takes only as an "
                         "initializer".format(_name(node), position, name, node.op_type))
    return found


def _node_problems(node, types, constants, version, opset):
    if node.domain not in ("", "ai.onnx"):
        return ["{}: domain {!r} is not imported by the ONNX parser".format(_name(node),
                                                                            node.domain)]
    supported = OPS_82.get(node.op_type)
    if supported is None:
        return ["{}: TensorRT 8.2's ONNX parser does not import {}".format(_name(node),
                                                                         node.op_type)]
    found = _type_problems(node, types, constants, version, supported, opset)
    elem = types.get(node.input[0]) if node.input and node.input[0] else None
    if node.op_type == "Equal" and elem in _FLOATS:
        found.append("{}: Equal compares floating-point tensors, which an FP16 engine may "
                     "compute at different precisions; compare indices instead".format(
                         _name(node)))
    for position in _CONSTANT_INPUTS.get(node.op_type, ()):
        if position < len(node.input) and node.input[position] and \
                node.input[position] not in constants:
            found.append("{}: input {} ({}) must be an initializer".format(
                _name(node), position, node.input[position]))
    if node.op_type == "Resize":
        found.extend(_resize_problems(node, constants))
    return found


def _resize_problems(node, constants):
    found = []
    mode = _attribute(node, "mode", b"nearest")
    coordinates = _attribute(node, "coordinate_transformation_mode", b"half_pixel")
    if mode.decode() not in _RESIZE_MODES:
        found.append("{}: mode {} (supported: {})".format(_name(node), mode.decode(),
                                                          ", ".join(_RESIZE_MODES)))
    if coordinates.decode() not in _RESIZE_COORDINATES:
        found.append("{}: coordinate_transformation_mode {} (supported: {})".format(
            _name(node), coordinates.decode(), ", ".join(_RESIZE_COORDINATES)))
    # Opset 11+: with a fourth input the 8.2 importer passes `sizes` to the layer as a tensor
    # (IResizeLayer::setInput(1)), so it may be computed (a batched graph's [batch, 3, h, w]);
    # without one it reads `scales` as weights ("Resize scales must be an initializer!").
    sizes = node.input[3] if len(node.input) > 3 else ""
    scales = node.input[2] if len(node.input) > 2 else ""
    if not sizes and scales and scales not in constants:
        found.append("{}: scales must be an initializer".format(_name(node)))
    return found


def _attribute(node, name, default=None):
    from onnx import helper
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default
