"""Coarse LoFTR (Kolkir/Coarse_LoFTR_TRT): a confidence matrix between two coarse grids.

Inputs: the reference image and the live frame, each as captured (uint8 BGR); the graph makes
them gray, resizes them to the card's size and scales them. The model outputs the dual-softmax
confidence matrix (1, N0, N1) over the 1/16-resolution cells of both images. The graph then
keeps, for every reference cell, its best frame cell and that confidence, zeroed unless the
pair is a mutual nearest neighbour above the card's threshold and away from the border: the
CPU reads (N0, 2) floats instead of the N0 x N1 matrix (5.8 MB at 640 x 480).

Before that, the model's own attention layers are made FP16-safe (`rewrite_model`): the sum
over the source tokens in each linear attention's normaliser overflows FP16 (below).
"""

import numpy as np

from edge import nodes
from edge.families import register

STRIDE = 16                    # coarse cells are 16 x 16 pixels of the network input
REFERENCE_INPUT = "reference"
MATCHES = "matches"            # (N0, 2) float32: best frame cell index, score (0: no match)


def cells(width, height):
    """(columns, rows) of the coarse grid for a network input of width x height."""
    return width // STRIDE, height // STRIDE


def border_mask(columns, rows, border):
    """(columns * rows,) float32: 1 for cells at least `border` cells from the edge."""
    mask = np.zeros((rows, columns), np.float32)
    if rows > 2 * border and columns > 2 * border:
        mask[border:rows - border, border:columns - border] = 1.0
    return mask.reshape(-1)


@register
class LoftrCoarse:
    """Mutual nearest neighbours of the confidence matrix, computed in the graph."""

    name = "loftr-coarse"
    task = "match"
    batches = False      # one frame and one reference per run (matching runs at 1 Hz)
    # engine.precision int8 (edge.precision): its matches under INT8 are not measured, and
    # its attention already needed rewriting to survive FP16
    int8_problem = ("Coarse LoFTR is not quantized (its matches under INT8 are not "
                    "measured; its attention needed rewriting even for FP16)")

    def rewrite_model(self, model):
        """Make every linear attention's normaliser FP16-safe, in place (edge.graph's hook)."""
        return fp16_safe_attention(model)

    def graph_inputs(self, g, card, geometry, net_inputs, network_input):
        if len(net_inputs) != 2:
            raise ValueError("a {} model has two image inputs, this one has {}".format(
                self.name, len(net_inputs)))
        ref_w, ref_h = geometry.reference_size
        ref_geometry = nodes.Geometry(card, ref_w, ref_h)
        reference = nodes.preprocess(g, card, ref_geometry, REFERENCE_INPUT,
                                     geometry.frame_dtype)
        g.rename_output(reference, net_inputs[0].name)
        g.rename_output(network_input, net_inputs[1].name)
        return [nodes.frame_input(geometry),
                nodes.frame_input(geometry, ref_w, ref_h, REFERENCE_INPUT)]

    def graph_outputs(self, g, card, geometry, raw_infos):
        from onnx import TensorProto, helper     # only when a graph is rewritten
        columns, rows = cells(*card.input_size)
        count = columns * rows
        mask = border_mask(columns, rows, card.thresholds["border"])
        conf = raw_infos[0].name                                              # (1, N0, N1)
        conf = g.op("Mul", [conf, g.const(mask.reshape(1, count, 1))], "border_ref")
        conf = g.op("Mul", [conf, g.const(mask.reshape(1, 1, count))], "border_cur")
        row_max = g.reduce_max(conf, [2], 0, "row_max")                      # (1, N0)
        best = g.op("ArgMax", [conf], "best", axis=2, keepdims=0)              # (1, N0) int64
        back = g.op("ArgMax", [conf], "back", axis=1, keepdims=0)              # (1, N1) int64
        best = g.op("Reshape", [best, g.const([count], np.int64)], "best_flat")
        # Mutual: the best reference cell of reference cell i's best frame cell is i. Compared
        # as indices, not as the two maxima: under FP16 TensorRT picks each reduction's
        # precision itself, and two float maxima of one value need not compare equal.
        back_of_best = g.op("Gather", [back, best], "back_of_best", axis=1)    # (1, N0)
        cell = g.const(np.arange(count, dtype=np.int64).reshape(1, count), np.int64, "cells")
        mutual = g.op("Cast", [g.op("Equal", [back_of_best, cell])], "mutual",
                      to=TensorProto.FLOAT)
        above = g.op("Cast", [g.op("Greater", [row_max, g.const(
            np.float32(card.thresholds["score"]))])], "above", to=TensorProto.FLOAT)
        score = g.op("Mul", [g.op("Mul", [row_max, mutual]), above], "score")   # (1, N0)
        best = g.op("Cast", [best], "best_float", to=TensorProto.FLOAT)
        best = g.op("Reshape", [best, g.const([count, 1], np.int64)], "best_column")
        score = g.op("Reshape", [score, g.const([count, 1], np.int64)], "score_column")
        out = g.rename_output(g.op("Concat", [best, score], "pairs", axis=1), MATCHES)
        return [helper.make_tensor_value_info(out, TensorProto.FLOAT, [count, 2])]


# -- FP16-safe linear attention ------------------------------------------------------------
# LoFTR's LinearAttention, per head, with Q = elu(q) + 1 and K = elu(k) + 1 over S source
# tokens and the values divided by v_length (= S):
#     KV = sum_s K_s V_s / v_length      Z = 1 / (Q . sum_s K_s + eps)      out = Q KV Z v_length
# The export (Kolkir/Coarse_LoFTR_TRT, opset 11) has, per attention block (4 layers, self and
# cross, each run for both images: 8 blocks):
#     K = Add(Elu(k), 1)                                                  (1, S, H, D)
#     ksum = ReduceSum(K, axes=[1], keepdims=0)                           (1, H, D)
#     den = Add(ReduceSum(Mul(Q, Unsqueeze(ksum)), axes=[-1]), eps)       (1, L, H)
#     Z = Mul(Div(1, den), 1); out = Mul(Mul(Squeeze(Q KV), Unsqueeze(Z)), v_length)
# On the Middlebury pair (FP32) sum_s K reaches 5.5e4 and den 1.04e5, above FP16's largest
# 65504 (inf in up to 5% of the normalisers, then NaN), and Z (9.6e-6 to 3.7e-4) falls among
# FP16's subnormals. Scaling K by 1/S on the normaliser's side only (the mean of K instead of
# its sum), eps by 1/S and v_length by 1/S is exact: Z becomes S Z and
# out = Q KV (S Z) (v_length / S) is unchanged up to float rounding, while den stays below 100
# and Z within 0.01..0.44 (tools/fp16_emulation.py prints these figures). KV is left as it
# was: scaling K before KV too would put its products K_s V_s / v_length / S among FP16's
# subnormals.


def fp16_safe_attention(model):
    """Rewrite every linear attention normaliser of the model in place (see above); the
    number of attention blocks rewritten (0 for a model without that pattern)."""
    return len(_rewrite_normalisers(model.graph, attention_normalisers(model)))


def attention_normalisers(model):
    """[(ksum node, den Add node, v_length Mul node, v_length)] of each linear attention
    block, in graph order. v_length is the number of source tokens S, baked in at export."""
    graph = model.graph
    constants = _scalars(graph)
    producers = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        if not _reduces(node, constants, [1]):
            continue
        k = producers.get(node.input[0])
        if k is None or not _is_elu_plus_one(k, producers, constants):
            continue
        chain = _chain(node.output[0], consumers, ["Unsqueeze", "Mul", "ReduceSum", "Add"])
        if chain is None or not _reduces(chain[2], constants, [-1]) or \
                _scalar_input(chain[3], constants) is None:
            continue
        v_length = _v_length_mul(chain[3].output[0], consumers, constants)
        if v_length is None:
            continue
        tokens = float(constants[v_length.input[_scalar_input(v_length, constants)]])
        if tokens >= 1:
            found.append((node, chain[3], v_length, tokens))
    return found


def _rewrite_normalisers(graph, blocks):
    from onnx import numpy_helper
    constants = _scalars(graph)
    replaced = set()
    means = {}           # ksum output -> the Mul node that scales its input by 1/S
    for position, (ksum, den, v_length, tokens) in enumerate(blocks):
        # Any scale cancels; S = v_length makes sum_s K a mean and the last Mul one by 1.
        prefix = "fp16_safe/attention{}/".format(position)
        inverse = numpy_helper.from_array(np.array(1.0 / tokens, np.float32),
                                          prefix + "inverse_tokens")
        graph.initializer.append(inverse)
        means[ksum.output[0]] = _node("Mul", [ksum.input[0], inverse.name],
                                      [prefix + "keys_over_tokens"], prefix + "mean_keys")
        ksum.input[0] = prefix + "keys_over_tokens"
        for node, what in ((den, "eps"), (v_length, "v_length")):
            slot = _scalar_input(node, constants)
            old = node.input[slot]
            value = np.array(constants[old] / tokens, np.float32).reshape(
                np.shape(constants[old]))
            graph.initializer.append(numpy_helper.from_array(value, prefix + what))
            node.input[slot] = prefix + what
            replaced.add(old)
    if means:
        nodes = []
        for node in graph.node:          # copies: the list is emptied before it is refilled
            if node.op_type == "ReduceSum" and node.output[0] in means:
                nodes.append(means[node.output[0]])
            nodes.append(_copy_node(node))
        del graph.node[:]
        graph.node.extend(nodes)
    _drop_unused(graph, replaced)
    return blocks


def _node(op, inputs, outputs, name):
    from onnx import helper
    return helper.make_node(op, inputs, outputs, name=name)


def _copy_node(node):
    from onnx import NodeProto
    copy = NodeProto()
    copy.CopyFrom(node)
    return copy


def _drop_unused(graph, names):
    """Remove the initializers and Constant nodes among `names` that nothing reads now."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name in names and t.name not in used]:
        graph.initializer.remove(tensor)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in names and
                 n.output[0] not in used]:
        graph.node.remove(node)


def _scalars(graph):
    """name -> numpy value of every one-element float initializer or Constant output (and
    of the one-dimensional int64 ones: a ReduceSum's axes from opset 13 on)."""
    from onnx import TensorProto, numpy_helper
    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(n.output[0], n.attribute[0].t) for n in graph.node
                if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    values = {}
    for name, tensor in tensors:
        if tensor.data_type == TensorProto.FLOAT and int(np.prod(tensor.dims)) == 1:
            values[name] = numpy_helper.to_array(tensor)
        elif tensor.data_type == TensorProto.INT64 and len(tensor.dims) == 1:
            values[name] = numpy_helper.to_array(tensor)      # a ReduceSum's axes (opset 13+)
    return values


def _scalar_input(node, constants):
    """Position of the node's one-element float constant input, or None."""
    for slot, name in enumerate(node.input):
        value = constants.get(name)
        if value is not None and value.dtype == np.float32:
            return slot
    return None


def _reduces(node, constants, axes):
    """Whether the node is a ReduceSum over exactly `axes` without keeping them."""
    from onnx import helper
    if node.op_type != "ReduceSum":
        return False
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    found = attributes.get("axes")
    if found is None and len(node.input) > 1:
        found = constants.get(node.input[1])          # an input from opset 13 on
    return found is not None and list(np.asarray(found).reshape(-1)) == axes and \
        attributes.get("keepdims", 1) == 0


def _is_elu_plus_one(node, producers, constants):
    if node.op_type != "Add" or len(node.input) != 2:
        return False
    slot = _scalar_input(node, constants)
    if slot is None or float(constants[node.input[slot]]) != 1.0:
        return False
    elu = producers.get(node.input[1 - slot])
    return elu is not None and elu.op_type == "Elu"


def _chain(name, consumers, ops):
    """The nodes of ops[0], ops[1], ... each the only reader of the previous one's output,
    starting from the only reader of `name`; None when the graph differs."""
    nodes = []
    for op in ops:
        readers = consumers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != op:
            return None
        nodes.append(readers[0])
        name = readers[0].output[0]
    return nodes


def _v_length_mul(name, consumers, constants, limit=8):
    """From den on along its only readers: past the Mul by Q KV (a tensor, not a constant),
    the first Mul by a scalar constant (v_length); None when there is none."""
    past_values = False
    for _ in range(limit):
        readers = consumers.get(name, [])
        if len(readers) != 1:
            return None
        node = readers[0]
        if node.op_type == "Mul":
            constant = _scalar_input(node, constants) is not None
            if past_values and constant:
                return node
            past_values = past_values or not constant
        name = node.output[0]
    return None
