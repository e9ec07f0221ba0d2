"""YOLOX (Megvii): raw per-anchor outputs before grid decode, (1, N, 5 + C)."""

import numpy as np

from edge.families import register
from edge.families.yolo import YoloFamily, objectness_layout

STRIDES = (8, 16, 32)


def grid(width, height):
    """(N, 2) cell offsets and (N, 1) strides in YOLOX output order (x fastest per level)."""
    cells, strides = [], []
    for stride in STRIDES:
        ys, xs = np.meshgrid(np.arange(height // stride), np.arange(width // stride),
                             indexing="ij")
        cells.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))
        strides.append(np.full((cells[-1].shape[0], 1), stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)


@register
class Yolox(YoloFamily):
    """xy = (xy + grid) * stride, wh = exp(wh) * stride, score = objectness * class score."""

    name = "yolox"

    def split(self, g, card, raw):
        return objectness_layout(g, raw[0])

    def decode_boxes(self, g, card, boxes, index):
        cells, strides = grid(*card.input_size)
        # (N, 3) cell x, cell y, stride: the picked anchors' rows, as (B, K, 3)
        table = g.const(np.concatenate([cells, strides], axis=1), hint="anchors")
        anchors = g.op("Gather", [table, index], "picked_anchors", axis=0)
        if not g.batched:                   # index (K,): (K, 3) -> (1, K, 3)
            anchors = g.unsqueeze(anchors, [0], "anchors_batch")
        stride = g.slice(anchors, 2, 3, 2)
        centre = g.op("Mul", [g.op("Add", [g.slice(boxes, 0, 2, 2), g.slice(anchors, 0, 2, 2)]),
                              stride], "centre")
        size = g.op("Mul", [g.op("Exp", [g.slice(boxes, 2, 4, 2)]), stride], "size")
        return g.op("Concat", [centre, size], "boxes", axis=2)
