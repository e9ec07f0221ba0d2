"""What every YOLO-style detector shares: one image input and a (K, 6) detection output.

A family only says where its raw outputs keep the boxes, the objectness (if any) and the
class scores (`split`), and how a box becomes a centre and size in network pixels
(`decode_boxes`). The rest runs in the graph for all of them: each candidate's score (best
class, times objectness), the K best candidates (the card's `candidates`), and only for
those K: their boxes, best class, corners, the letterbox undone into frame pixels, clipped
to the frame. So the CPU reads K x 6 floats instead of the whole raw tensor, and the graph
decodes K boxes instead of every anchor.
"""

import numpy as np

from edge import nodes

DETECTIONS = "detections"   # (K, 6) float32: x1, y1, x2, y2, score, class; best score first


class YoloFamily:
    """Base of the detector families; subclasses implement `split` (and `decode_boxes`)."""

    name = None
    task = "detect"
    batches = True       # several frames in one run: graph_outputs has a batched form
    int8_problem = None  # engine.precision int8 (edge.precision): why not, or None

    def split(self, g, card, raw):
        """Node outputs (boxes (1, N, 4) as the model gives them, objectness (1, N, 1) or
        None, class scores (1, N, C)) from the raw output names."""
        raise NotImplementedError

    def decode_boxes(self, g, card, boxes, index):
        """Centres and sizes (B, K, 4) in network pixels of the K boxes picked (B, K, 4),
        which are the anchors `index` of the raw output ((K,), batched (B, K)); as given by
        default."""
        return boxes

    def graph_inputs(self, g, card, geometry, net_inputs, network_input):
        if len(net_inputs) != 1:
            raise ValueError("a {} model has one image input, this one has {}".format(
                self.name, len(net_inputs)))
        g.rename_output(network_input, net_inputs[0].name)
        return [nodes.frame_input(geometry)]

    def graph_outputs(self, g, card, geometry, raw_infos):
        from onnx import TensorProto, helper     # only when a graph is rewritten
        boxes, objectness, classes = self.split(g, card, [i.name for i in raw_infos])
        # max over classes of objectness * class = objectness * max over classes (>= 0)
        score = g.reduce_max(classes, [2], 1, "best_class_score")
        if objectness is not None:
            score = g.op("Mul", [objectness, score], "score")                   # (B, N, 1)
        count = self.candidate_count(_shape(raw_infos[0]))
        k = min(card.candidates, count)
        if g.batched:
            top, cls, boxes, index = _pick_batched(g, score, classes, boxes, count, k)
        else:
            top, cls, boxes, index = _pick(g, score, classes, boxes, count, k)
        boxes = self.decode_boxes(g, card, boxes, index)
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
        rows = g.op("Concat", [corners, top, cls], "rows", axis=2)             # (B, K, 6)
        if g.batched:
            out = g.rename_output(rows, DETECTIONS)
            return [helper.make_tensor_value_info(out, TensorProto.FLOAT, [nodes.BATCH, k, 6])]
        out = g.rename_output(g.op("Reshape", [rows, g.const([k, 6], np.int64)]), DETECTIONS)
        return [helper.make_tensor_value_info(out, TensorProto.FLOAT, [k, 6])]

    def candidate_count(self, shape):
        """N, the number of raw candidates, from the shape of the model's output."""
        return shape[1]


def _pick(g, score, classes, boxes, count, k):
    """One frame: (score (1, K, 1), class (1, K, 1) float, boxes (1, K, 4) as the model
    gives them, anchor index (K,)) of the K best of `count` candidates."""
    from onnx import TensorProto
    flat = g.op("Reshape", [score, g.const([1, count], np.int64)], "score_flat")
    top, index = g.op("TopK", [flat, g.const([k], np.int64)], "topk", outputs=2, axis=1)
    index = g.op("Reshape", [index, g.const([k], np.int64)], "topk_index")      # (K,)
    top = g.op("Reshape", [top, g.const([1, k, 1], np.int64)], "top_score")     # (1, K, 1)
    picked = g.op("Gather", [classes, index], "picked_classes", axis=1)         # (1, K, C)
    cls = g.op("ArgMax", [picked], "class", axis=2, keepdims=1)                 # (1, K, 1)
    cls = g.op("Cast", [cls], "class_float", to=TensorProto.FLOAT)
    boxes = g.op("Gather", [boxes, index], "picked_boxes", axis=1)              # (1, K, 4)
    return top, cls, boxes, index


def _pick_batched(g, score, classes, boxes, count, k):
    """A batch of frames: as `_pick` per frame, shapes (B, K, ...), anchor index (B, K).

    Each frame's rows are picked with GatherElements (the same index along axis 1 in every
    column), so no shape depends on the batch size; the best class is taken for every
    candidate first and then picked, which is the same class as picking first.
    """
    from onnx import TensorProto
    flat = g.op("Reshape", [score, g.const([0, count], np.int64)], "score_flat")  # (B, N)
    top, index = g.op("TopK", [flat, g.const([k], np.int64)], "topk", outputs=2, axis=1)
    top = g.unsqueeze(top, [2], "top_score")                                   # (B, K, 1)
    rows = g.unsqueeze(index, [2], "topk_rows")                                # (B, K, 1)
    best = g.op("ArgMax", [classes], "class_all", axis=2, keepdims=1)          # (B, N, 1)
    cls = g.op("GatherElements", [best, rows], "class", axis=1)                # (B, K, 1)
    cls = g.op("Cast", [cls], "class_float", to=TensorProto.FLOAT)
    columns = g.op("Tile", [rows, g.const([1, 1, 4], np.int64)], "box_rows")   # (B, K, 4)
    boxes = g.op("GatherElements", [boxes, columns], "picked_boxes", axis=1)   # (B, K, 4)
    return top, cls, boxes, index


def objectness_layout(g, out):
    """The split of a (1, N, 5 + C) output: cx, cy, w, h, objectness, C class scores."""
    return g.slice(out, 0, 4, 2), g.slice(out, 4, 5, 2), g.slice(out, 5, 1 << 30, 2)


def _shape(info):
    # The first dimension is the batch: 1, or dynamic in a batched graph (edge.graph).
    dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
    if len(dims) != 3 or not all(dims[1:]):
        raise ValueError("output {} has shape {}; a fixed 3-d shape is needed".format(
            info.name, dims))
    return dims
