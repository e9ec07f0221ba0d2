"""YOLOX (Megvii): raw per-anchor outputs before grid decode, (1, N, 5 + C)."""

import numpy as np

from edge.families import register
from edge.families.yolo import YoloFamily

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

    def decode(self, g, card, raw):
        cells, strides = grid(*card.input_size)
        out = raw[0]
        centre = g.op("Mul", [g.op("Add", [g.slice(out, 0, 2, 2), g.const(cells[None])]),
                              g.const(strides[None])], "centre")
        size = g.op("Mul", [g.op("Exp", [g.slice(out, 2, 4, 2)]), g.const(strides[None])], "size")
        boxes = g.op("Concat", [centre, size], "boxes", axis=2)
        scores = g.op("Mul", [g.slice(out, 4, 5, 2), g.slice(out, 5, 1 << 30, 2)], "scores")
        return boxes, scores
