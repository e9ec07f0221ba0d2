"""What every YOLO-style detector shares: one image input and a (K, 6) detection output.

A family only turns its raw outputs into box centres and class scores (`decode`); the rest
runs in the graph for all of them: best class, corners, undo the letterbox into frame
pixels, clip to the frame, and keep the K best-scoring candidates (the card's `candidates`),
so the CPU reads K x 6 floats instead of the whole raw tensor.
"""

import numpy as np
from onnx import TensorProto, helper

from edge import graph

DETECTIONS = "detections"   # (K, 6) float32: x1, y1, x2, y2, score, class; best score first


class YoloFamily:
    """Base of the detector families; subclasses implement `decode`."""

    name = None
    task = "detect"

    def decode(self, g, card, raw):
        """Node outputs (centres and sizes (1, N, 4) in network pixels, scores (1, N, C))."""
        raise NotImplementedError

    def graph_inputs(self, g, card, geometry, net_inputs, network_input):
        if len(net_inputs) != 1:
            raise ValueError("a {} model has one image input, this one has {}".format(
                self.name, len(net_inputs)))
        g.rename_output(network_input, net_inputs[0].name)
        return [graph.frame_input(geometry)]

    def graph_outputs(self, g, card, geometry, raw_infos):
        boxes, scores = self.decode(g, card, [i.name for i in raw_infos])
        score = g.op("ReduceMax", [scores], "score", axes=[2], keepdims=1)      # (1, N, 1)
        cls = g.op("ArgMax", [scores], "class", axis=2, keepdims=1)             # (1, N, 1)
        cls = g.op("Cast", [cls], "class_float", to=TensorProto.FLOAT)
        centre = g.slice(boxes, 0, 2, 2)
        half = g.op("Mul", [g.slice(boxes, 2, 4, 2), g.const(0.5)], "half_size")
        corners = g.op("Concat", [g.op("Sub", [centre, half]), g.op("Add", [centre, half])],
                       "corners", axis=2)
        # network pixels -> frame pixels: undo the padding, then the resize
        offset = np.array([geometry.pad_x, geometry.pad_y] * 2, np.float32)
        scale = np.array([1 / geometry.sx, 1 / geometry.sy] * 2, np.float32)
        corners = g.op("Mul", [g.op("Sub", [corners, g.const(offset)]), g.const(scale)],
                       "frame_pixels")
        limit = np.array([geometry.frame_w, geometry.frame_h] * 2, np.float32)
        corners = g.op("Min", [g.op("Max", [corners, g.const(np.zeros(4))]), g.const(limit)],
                       "clipped")
        rows = g.op("Concat", [corners, score, cls], "rows", axis=2)           # (1, N, 6)
        count = self.candidate_count(_shape(raw_infos[0]))
        k = min(card.candidates, count)
        flat = g.op("Reshape", [score, g.const([1, count], np.int64)], "score_flat")
        _, index = g.op("TopK", [flat, g.const([k], np.int64)], "topk", outputs=2, axis=1)
        index = g.op("Reshape", [index, g.const([k], np.int64)], "topk_index")
        best = g.op("Gather", [rows, index], "best", axis=1)                   # (1, K, 6)
        out = g.rename_output(g.op("Reshape", [best, g.const([k, 6], np.int64)]), DETECTIONS)
        return [helper.make_tensor_value_info(out, TensorProto.FLOAT, [k, 6])]

    def candidate_count(self, shape):
        """N, the number of raw candidates, from the shape of the model's output."""
        return shape[1]


def _shape(info):
    dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
    if len(dims) != 3 or not all(dims):
        raise ValueError("output {} has shape {}; a fixed 3-d shape is needed".format(
            info.name, dims))
    return dims
