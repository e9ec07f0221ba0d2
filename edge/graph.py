"""Rewriting ONNX models so that they take the frame as captured.

`rewrite(model, card, frame_w, frame_h)` returns a new model whose input `frame` is the
uint8 (H, W, 3) BGR image from the frame pool. The card's preprocessing (edge.nodes) runs as
the first nodes of the graph, and the model family (edge.families) appends the first step of
post-processing (grid decode, top-k, ...) so the CPU reads back little. The same graph runs
under ONNX Runtime and TensorRT.

`rewrite(..., batched=True)` makes the graph for several cameras' frames at once: `frame` is
(batch, H, W, 3) with a dynamic first dimension and every output gains it. The model must
keep images apart along its first dimension; `with_batch` checks that and rewrites the
Reshapes of models exported with batch 1 baked into their shapes.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge import families
from edge.nodes import (BATCH, FRAME_INPUT, OPSET, Geometry, GraphBuilder, frame_info,
                        model_opset, preprocess)


def preprocess_model(card, frame_w, frame_h):
    """A model holding only the fused preprocessing: frame in, network input out."""
    geometry = Geometry(card, frame_w, frame_h)
    g = GraphBuilder("pre")
    out = g.rename_output(preprocess(g, card, geometry, FRAME_INPUT), "input")
    channels = 1 if card.input["color"] == "gray" else 3
    return standalone_model(
        g, [frame_info(frame_w, frame_h)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                       [1, channels, geometry.net_h, geometry.net_w])])


def rewrite(model, card, frame_w, frame_h, reference_size=None, frame_dtype="uint8",
            batched=False):
    """The card's model with fused preprocessing in front and the family's outputs at the end.

    `reference_size` (width, height) is the size of the second image of two-image families;
    `frame_dtype` is uint8, or float32 for backends without uint8 inputs (TensorRT < 8.5);
    `batched`: frames (batch, H, W, 3) (ValueError when the model or family cannot).
    """
    family = families.get(card.family)
    geometry = Geometry(card, frame_w, frame_h)
    geometry.reference_size = reference_size
    geometry.frame_dtype = frame_dtype
    geometry.batched = batched
    if batched:
        problem = batch_problem(model, card)
        if problem:
            raise ValueError(problem)
        model = with_batch(model)[0]
    else:
        model = _copy(model)
    # The family's own changes to the model's nodes (LoFTR: FP16-safe attention), on the copy.
    rewrite_model = getattr(family, "rewrite_model", None)
    if rewrite_model is not None:
        rewrite_model(model)
    graph = model.graph
    g = GraphBuilder("edge", model_opset(model), batched)
    net_inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    network_input = preprocess(g, card, geometry, FRAME_INPUT, frame_dtype)
    inputs = family.graph_inputs(g, card, geometry, net_inputs, network_input)
    outputs = family.graph_outputs(g, card, geometry, list(graph.output))
    # Our nodes that feed the model go first, the ones reading its outputs after it.
    pre_nodes, post_nodes = _split_nodes(g.nodes, {i.name for i in net_inputs})
    new_graph = helper.make_graph(
        pre_nodes + list(graph.node) + post_nodes, graph.name or "edge",
        inputs, outputs, list(graph.initializer) + g.initializers)
    return _finish(new_graph, model)


def postprocess_model(card, frame_w, frame_h, raw_infos):
    """A model holding only the family's post-processing: raw outputs in, results out."""
    family = families.get(card.family)
    geometry = Geometry(card, frame_w, frame_h)
    g = GraphBuilder("post")
    outputs = family.graph_outputs(g, card, geometry, list(raw_infos))
    return standalone_model(g, list(raw_infos), outputs)


def _split_nodes(nodes, feeds):
    """Nodes that end in a model input (preprocessing) and the rest (post-processing)."""
    produced = {}
    for node in nodes:
        for out in node.output:
            produced[out] = node
    pre = set()
    stack = [produced[f] for f in feeds if f in produced]
    while stack:
        node = stack.pop()
        if id(node) in pre:
            continue
        pre.add(id(node))
        stack.extend(produced[i] for i in node.input if i in produced)
    return ([n for n in nodes if id(n) in pre], [n for n in nodes if id(n) not in pre])


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def standalone_model(g, inputs, outputs):
    """A checked model of the builder's nodes alone (opset 11), readable by every backend."""
    graph = helper.make_graph(g.nodes, g.prefix, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 7   # readable by ONNX Runtime and the TensorRT 8.2 parser
    onnx.checker.check_model(model)
    return model


def _finish(graph, original):
    model = helper.make_model(graph, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    model.producer_name = "edge"
    onnx.checker.check_model(model)
    return model


# -- batches -----------------------------------------------------------------------------
# Whether a model keeps images apart along its first dimension is read from its nodes: the
# batch must reach every output through operators that work per image. Shape inference
# cannot tell (ONNX's loses a symbolic batch at the first Resize with scales), so this walks
# the graph: operators that never mix images, operators whose axis (attribute or constant
# input) is not the first, and Reshapes whose constant shape keeps the first dimension. A
# Reshape to [1, ...] on a batch is a batch of 1 baked in at export (YOLOX's ONNX exports
# have three): its 1 becomes 0, "copy the input's first dimension".

_PER_IMAGE = frozenset((
    "Abs", "Add", "And", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Conv",
    "ConvTranspose", "Cos", "DepthToSpace", "Div", "Dropout", "Elu", "Equal", "Erf", "Exp",
    "Floor", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
    "LRN", "LeakyRelu", "Less", "LessOrEqual", "Log", "LpPool", "Max", "MaxPool", "Mean",
    "Min", "Mish", "Mul", "Neg", "Not", "Or", "PRelu", "Pow", "QuantizeLinear",
    "DequantizeLinear", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "SpaceToDepth", "Sqrt", "Sub",
    "Sum", "Tanh", "ThresholdedRelu", "Where", "Xor"))
# operator -> (attribute, default): work along one axis, per image unless it is axis 0
_ALONG_AXIS = {"Concat": ("axis", None), "Softmax": ("axis", 1), "LogSoftmax": ("axis", 1),
               "Split": ("axis", 0), "Gather": ("axis", 0), "ArgMax": ("axis", 0),
               "ArgMin": ("axis", 0), "Flatten": ("axis", 1), "TopK": ("axis", -1),
               "Hardmax": ("axis", 1)}
# operator -> position of a constant `axes` input (newer opsets), else the `axes` attribute
_ALONG_AXES = {"Squeeze": 1, "Unsqueeze": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceMean": 1,
               "ReduceSum": 1, "ReduceProd": 1, "ReduceL1": 1, "ReduceL2": 1,
               "ReduceLogSumExp": 1, "ReduceSumSquare": 1, "Slice": 3}


def _attribute(node, name, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _constants(graph):
    """name -> numpy array of every initializer and Constant node output."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _keeps_batch(node, carrying, constants):
    """(keeps: whether the node's outputs keep the batch of its inputs first, the Reshape
    shape to write instead of a baked batch 1, or None)."""
    op = node.op_type
    inputs = [name for name in node.input if name]
    if op in _PER_IMAGE:
        return True, None
    if op == "Reshape":
        shape = constants.get(node.input[1])
        if node.input[0] not in carrying or shape is None or shape.size == 0 or \
                _attribute(node, "allowzero", 0):
            return False, None
        if shape[0] == 0:
            return True, None
        if shape[0] == 1:
            fixed = shape.copy()
            fixed[0] = 0
            return True, fixed
        return False, None
    if op == "Transpose":
        perm = _attribute(node, "perm")
        return perm is not None and perm[0] == 0, None
    if op in ("Resize", "Upsample"):
        # scales [1, ...] keep the batch; constant sizes [1, ...] would bake it
        scales = constants.get(node.input[2 if op == "Resize" and len(node.input) > 2 else 1])
        if len(node.input) > 3 and node.input[3]:
            return False, None
        return scales is not None and scales.size > 0 and scales[0] == 1, None
    if op == "Concat":
        return _attribute(node, "axis") != 0 and all(i in carrying for i in inputs), None
    if op in _ALONG_AXIS:
        if op == "Gather" and node.input[1] in carrying:
            return False, None
        name, default = _ALONG_AXIS[op]
        axis = _attribute(node, name, default)
        return axis is not None and axis != 0 and node.input[0] in carrying, None
    if op in _ALONG_AXES:
        position = _ALONG_AXES[op]
        axes = constants.get(node.input[position]) if len(node.input) > position and \
            node.input[position] else _attribute(node, "axes")
        if axes is None:        # every axis (a reduction over all, a Slice of all axes)
            return False, None
        return node.input[0] in carrying and 0 not in list(np.asarray(axes).reshape(-1)), None
    if op in ("MatMul", "Gemm"):
        transposed = op == "Gemm" and _attribute(node, "transA", 0)
        return node.input[0] in carrying and node.input[1] not in carrying and \
            not transposed, None
    if op == "Pad":
        pads = constants.get(node.input[1]) if len(node.input) > 1 else _attribute(node, "pads")
        if pads is None:
            return False, None
        pads = np.asarray(pads).reshape(-1)
        return node.input[0] in carrying and pads[0] == 0 and pads[pads.size // 2] == 0, None
    if op == "Tile":
        repeats = constants.get(node.input[1])
        return repeats is not None and repeats[0] == 1 and node.input[1] not in carrying, None
    return False, None


def batch_problem(model, card=None):
    """None when the model (and the card's family) can run several frames at once, else
    why not, one line."""
    if card is not None and not getattr(families.get(card.family), "batches", False):
        return "family {} has no batched form".format(card.family)
    return with_batch(model)[1]


def with_batch(model):
    """(a copy of the model whose image input has a dynamic first dimension `batch`, with
    the Reshapes that baked batch 1 rewritten; None) or (None, why it cannot take one)."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return None, "the model has {} inputs; a batch needs one".format(len(inputs))
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value != 1):
        return None, "input {} does not start with a batch dimension of 1".format(
            inputs[0].name)
    constants = _constants(graph)
    carrying = {inputs[0].name}
    fixes = {}
    for position, node in enumerate(graph.node):
        if not any(name in carrying for name in node.input):
            continue
        keeps, fixed = _keeps_batch(node, carrying, constants)
        if not keeps:
            return None, "node {} ({}) does not keep the images of a batch apart".format(
                node.name or node.output[0], node.op_type)
        carrying.update(node.output)
        if fixed is not None:
            fixes[position] = fixed
    for output in graph.output:
        if output.name not in carrying:
            return None, "output {} does not come from the image input per image".format(
                output.name)
    copy = _copy(model)
    replaced = set()
    for position, fixed in fixes.items():
        node = copy.graph.node[position]
        replaced.add(node.input[1])
        name = node.input[1] + "/keep_batch"
        copy.graph.initializer.append(numpy_helper.from_array(fixed.astype(np.int64), name))
        node.input[1] = name
    used = {name for node in copy.graph.node for name in node.input}
    for tensor in [t for t in copy.graph.initializer
                   if t.name in replaced and t.name not in used]:
        copy.graph.initializer.remove(tensor)     # the baked shapes no node reads any more
    for info in [i for i in copy.graph.input if i.name == inputs[0].name] + \
            list(copy.graph.output):
        info.type.tensor_type.shape.dim[0].dim_param = BATCH
    del copy.graph.value_info[:]     # shapes recorded at batch 1
    return copy, None
