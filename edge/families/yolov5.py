"""YOLOv5 (and v7-style exports): decoded boxes (1, N, 5 + C): cx, cy, w, h, objectness, classes."""

from edge.families import register
from edge.families.yolo import YoloFamily, objectness_layout


@register
class Yolov5(YoloFamily):
    """score = objectness * class score; boxes already in network pixels."""

    name = "yolov5"

    def split(self, g, card, raw):
        return objectness_layout(g, raw[0])
