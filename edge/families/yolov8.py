"""YOLOv8 and YOLO11 (Ultralytics): (1, 4 + C, N), boxes cx, cy, w, h, no objectness."""

from edge.families import register
from edge.families.yolo import YoloFamily


@register
class Yolov8(YoloFamily):
    """Channels first: transpose to (1, N, 4 + C); the class scores are the scores."""

    name = "yolov8"

    def split(self, g, card, raw):
        out = g.op("Transpose", [raw[0]], "channels_last", perm=[0, 2, 1])
        return g.slice(out, 0, 4, 2), None, g.slice(out, 4, 1 << 30, 2)

    def candidate_count(self, shape):
        return shape[2]
