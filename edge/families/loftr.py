"""Coarse LoFTR (Kolkir/Coarse_LoFTR_TRT): a confidence matrix between two coarse grids.

Inputs: the reference image and the live frame, each as captured (uint8 BGR); the graph makes
them gray, resizes them to the card's size and scales them. The model outputs the dual-softmax
confidence matrix (1, N0, N1) over the 1/16-resolution cells of both images. The graph then
keeps, for every reference cell, its best frame cell and that confidence, zeroed unless the
pair is a mutual nearest neighbour above the card's threshold and away from the border: the
CPU reads (N0, 2) floats instead of the N0 x N1 matrix (5.8 MB at 640 x 480).
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
