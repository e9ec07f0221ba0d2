"""A video in which real objects move: a camera panning and zooming over COCO photographs.

    .venv/bin/python tools/pan_clip.py OUT.mp4 [IMAGE ...]

The images (default: coco8's giraffe and zebra) are set side by side at one height, and a
window sweeps across them from left to right while it zooms in a little, so each animal
enters the view, crosses it from right to left and leaves. The tracking test and the demo
run `edge run` on it; it is made with OpenCV's VideoWriter (MJPG in an .avi, which every
OpenCV build reads back).
"""

import os
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO8 = os.path.join(os.path.dirname(ROOT), "shared", "data", "coco8", "images", "train")
IMAGES = [os.path.join(COCO8, "000000000025.jpg"),    # a giraffe
          os.path.join(COCO8, "000000000034.jpg")]    # a zebra


# A zone (the left half) and a line (its edge) for the clip: both animals cross into it.
TRACK_CONFIG = """\
track:
  max_lost: 10
  zones:
    - {name: left, normalized: true, points: [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}
  lines:
    - {name: middle, normalized: true, points: [[0.5, 0], [0.5, 1]]}
"""


def panorama(paths, height=426):
    """The images side by side, each scaled to `height`."""
    parts = []
    for path in paths:
        image = cv2.imread(path)
        if image is None:
            raise SystemExit("pan_clip: cannot read {}".format(path))
        parts.append(cv2.resize(image, (int(round(image.shape[1] * height / image.shape[0])),
                                        height), interpolation=cv2.INTER_AREA))
    return np.hstack(parts)


def windows(canvas_width, canvas_height, frames, size=(640, 480)):
    """(x, y, w, h) per frame: from the left edge to the right edge, zooming in by 15%."""
    aspect = size[1] / float(size[0])
    for i in range(frames):
        t = i / float(frames - 1)
        h = canvas_height * (1.0 - 0.15 * t)
        w = h / aspect
        x = (canvas_width - w) * t
        y = (canvas_height - h) * 0.5
        yield x, y, w, h


def pictures(images=None, frames=90, size=(640, 480)):
    """The clip's frames (BGR arrays of `size`), one by one."""
    canvas = panorama(images or IMAGES)
    for x, y, w, h in windows(canvas.shape[1], canvas.shape[0], frames, size):
        # an affine warp keeps the sub-pixel position: an integer crop would jerk the motion
        scale = size[0] / w
        matrix = np.float32([[scale, 0, -x * scale], [0, scale, -y * scale]])
        yield cv2.warpAffine(canvas, matrix, size, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)


def make(path, images=None, frames=90, size=(640, 480), fps=15):
    """Write the clip; returns the number of frames written."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    if not writer.isOpened():
        raise SystemExit("pan_clip: OpenCV cannot write {}".format(path))
    for picture in pictures(images, frames, size):
        writer.write(picture)
    writer.release()
    return frames


def write_folder(folder, images=None, frames=90, size=(640, 480)):
    """Write the clip's frames as numbered JPEGs into `folder` (a looping `images://`
    source); returns the folder."""
    os.makedirs(folder, exist_ok=True)
    for i, picture in enumerate(pictures(images, frames, size)):
        cv2.imwrite(os.path.join(folder, "{:03d}.jpg".format(i)), picture)
    return folder


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("pan_clip: {} frames in {}".format(make(sys.argv[1], sys.argv[2:] or None),
                                             sys.argv[1]))
