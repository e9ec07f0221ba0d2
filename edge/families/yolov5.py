"""YOLOv5 (and v7-style exports): decoded boxes (1, N, 5 + C): cx, cy, w, h, objectness, classes."""

from edge.families import register
from edge.families.yolo import YoloFamily


@register
class Yolov5(YoloFamily):
    """score = objectness * class score; boxes already in network pixels."""

    name = "yolov5"

    def decode(self, g, card, raw):
        out = raw[0]
        scores = g.op("Mul", [g.slice(out, 4, 5, 2), g.slice(out, 5, 1 << 30, 2)], "scores")
        return g.slice(out, 0, 4, 2), scores
