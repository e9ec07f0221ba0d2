"""Object detection: the graph's (K, 6) best candidates -> thresholds -> class-aware NMS."""

import numpy as np

from edge.families.yolo import DETECTIONS
from edge.tasks import Task, envelope, register


def nms(rows, iou_threshold):
    """Indices of the rows kept by class-aware NMS; rows (n, 6) sorted by score, descending."""
    if rows.shape[0] == 0:
        return []
    # Shift each class to its own region so that boxes of different classes never overlap.
    offset = rows[:, 5:6] * (float(rows[:, :4].max()) + 1.0)
    x1, y1, x2, y2 = (rows[:, i] + offset[:, 0] for i in range(4))
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.arange(rows.shape[0])
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


def select(rows, score_threshold, iou_threshold):
    """(n, 6) rows above the score threshold that survive NMS, best first."""
    # The graph sorted the rows by score: the candidates are a prefix.
    count = int(np.searchsorted(-rows[:, 4], -score_threshold, side="right"))
    candidates = rows[:count]
    return candidates[nms(candidates, iou_threshold)]


@register
class DetectTask(Task):
    """Boxes in source-frame pixels on the `detections` topic."""

    name = "detect"
    topic = "detections"

    def __init__(self, card, engines, model, device="edge", depth=None):
        super().__init__(card, engines, model)
        self.device = device
        self.depth = depth      # stereo runs: the depth task (edge.tasks.depth) adds `spatial`
        self.score = card.thresholds["score"]
        self.iou = card.thresholds["iou"]

    def detections(self, outputs):
        """The kept detections as dicts, as published."""
        kept = select(outputs[DETECTIONS], self.score, self.iou)
        return [{"label": self.card.label(int(row[5])), "class_id": int(row[5]),
                 "score": round(float(row[4]), 4),
                 "box": [round(float(v), 2) for v in row[:4]]} for row in kept]

    def infer_frame(self, frame):
        engine, binding = self.binding_for(frame)
        return binding, self.infer(engine, binding)

    def decode(self, frame, inferred):
        binding, infer_ms = inferred
        self.frames += 1
        self.seq += 1
        msg = envelope(self.device, self.card.name, self.seq, frame, infer_ms)
        msg["detections"] = self.detections(binding.outputs)
        if self.depth is not None:
            self.depth.add_spatial(frame, msg["detections"])
        return [msg]
