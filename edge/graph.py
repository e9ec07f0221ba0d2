"""Rewriting ONNX models so that they take the frame as captured.

`rewrite(model, card, frame_w, frame_h)` returns a new model whose input `frame` is the
uint8 (H, W, 3) BGR image from the frame pool. The card's preprocessing (edge.nodes) runs as
the first nodes of the graph, and the model family (edge.families) appends the first step of
post-processing (grid decode, top-k, ...) so the CPU reads back little. The same graph runs
under ONNX Runtime and TensorRT.
"""

import onnx
from onnx import TensorProto, helper

from edge import families
from edge.nodes import (FRAME_INPUT, OPSET, Geometry, GraphBuilder, frame_info, model_opset,
                        preprocess)


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


def rewrite(model, card, frame_w, frame_h, reference_size=None, frame_dtype="uint8"):
    """The card's model with fused preprocessing in front and the family's outputs at the end.

    `reference_size` (width, height) is the size of the second image of two-image families;
    `frame_dtype` is uint8, or float32 for backends without uint8 inputs (TensorRT < 8.5).
    """
    family = families.get(card.family)
    geometry = Geometry(card, frame_w, frame_h)
    geometry.reference_size = reference_size
    geometry.frame_dtype = frame_dtype
    model = _copy(model)
    graph = model.graph
    g = GraphBuilder("edge", model_opset(model))
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
