"""Stereo depth: disparity -> millimetres on the backend, and what is read from a depth map.

The conversion is data-parallel per pixel, so it is a graph (`conversion_model`) run by the
same backends as the models: TensorRT on the GPU of a Jetson, ONNX Runtime elsewhere. For a
raw disparity r (the estimator's fixed point, edge.stereo.disparity):

    d = r / scale_inverse                     pixels
    Z = f * B / (d + doffs)                   mm, 0 where r < lowest_valid or Z is outside
                                              [depth_min_mm, depth_max_mm]

A depth map is float32 (H, W) in mm over the rectified left image, 0 where unknown; files
(`save`) write NaN there instead. X and Y of a pixel follow from Z (edge.stereo.calibration,
`StereoCalibration.point`): detections get the median Z of the central part of their box
and X, Y of the box centre (`spatial`), as DepthAI computes spatial coordinates.
`to_depth_numpy` and `to_depth_loop` compute the same map vectorised and pixel by pixel:
`edge bench --stereo` measures all three, and the tests hold the graph to both. The pipeline
uses the graph, or numpy where that is faster (`stereo.convert: auto` times both at start:
on a CPU host the two are within a millisecond and either may win).
"""

import io
import logging
import math
import os
import time

import numpy as np

from edge.stereo import disparity
from edge.errors import SinkError
from edge.nodes import FRAME_INPUT, GraphBuilder

logger = logging.getLogger(__name__)

OUTPUT = "depth"


class ConversionCard:
    """What the engine maker needs to know about the conversion graph: a name, FP32.

    FP32 because f * B alone (192,000 px * mm for the Middlebury pair) overflows FP16.
    """

    task = "depth"
    precision = "fp32"

    def __init__(self, name):
        self.name = name


def conversion_model(width, height, calibration, scale_inverse, lowest_valid, min_mm, max_mm):
    """The graph raw disparity (float32 H x W, input `frame`) -> depth mm (float32 H x W)."""
    from onnx import TensorProto, helper       # onnx only where a graph is made (RSS)
    from edge.graph import standalone_model
    g = GraphBuilder("depth")
    # (r + doffs * s) / s = d + doffs: one Add, then f * B * s / (r + doffs * s) = Z.
    shifted = g.op("Add", [FRAME_INPUT, g.const(calibration.doffs * scale_inverse)], "shift")
    z = g.op("Div", [g.const(calibration.focal_baseline * scale_inverse), shifted], "z")
    zero = g.const(0.0, hint="unknown")
    # Three selections rather than And/Not: every operator here is in TensorRT 8.2's parser
    # for FP32, and an infinite or negative Z (d + doffs <= 0) falls out with the range.
    z = g.op("Where", [g.op("Less", [z, g.const(float(min_mm))], "near"), zero, z], "clip_near")
    z = g.op("Where", [g.op("Greater", [z, g.const(float(max_mm))], "far"), zero, z],
             "clip_far")
    # Raw values are integers: > lowest - 0.5 is >= lowest without opset 12's GreaterOrEqual.
    known = g.op("Greater", [FRAME_INPUT, g.const(lowest_valid - 0.5)], "known")
    g.op("Where", [known, z, zero], "depth")
    g.rename_output(g.nodes[-1].output[0], OUTPUT)
    return standalone_model(
        g, [helper.make_tensor_value_info(FRAME_INPUT, TensorProto.FLOAT, [height, width])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [height, width])])


def to_depth_numpy(raw, calibration, scale_inverse, lowest_valid, min_mm, max_mm, out,
                   known):
    """The conversion vectorised in numpy, into preallocated `out` (float32) and `known`
    (bool) of raw's shape."""
    np.add(raw, calibration.doffs * scale_inverse, out=out, casting="unsafe")
    with np.errstate(divide="ignore"):
        np.divide(calibration.focal_baseline * scale_inverse, out, out=out)
    np.greater_equal(raw, lowest_valid, out=known)
    known &= out >= min_mm
    known &= out <= max_mm
    out[~known] = 0.0
    return out


def to_depth_loop(raw, calibration, scale_inverse, lowest_valid, min_mm, max_mm, out):
    """The conversion as a plain loop over the pixels: the baseline the others are measured
    against, and an independent check of them."""
    fb, doffs = calibration.focal_baseline, calibration.doffs
    height, width = raw.shape
    for v in range(height):
        for u in range(width):
            r = raw[v, u]
            z = 0.0
            if r >= lowest_valid:
                d = r / scale_inverse + doffs
                if d > 0:
                    z = fb / d
                    if z < min_mm or z > max_mm:
                        z = 0.0
            out[v, u] = z
    return out


class _Input:
    """What a backend binds as input 0 (`frame`): here the raw disparity as float32."""

    __slots__ = ("image",)

    def __init__(self, image):
        self.image = image


class DepthSlot:
    """One set of depth buffers bound to the conversion engine: the raw disparity in, the
    depth map out, and which frame it holds."""

    __slots__ = ("input", "binding", "index", "ts", "done", "timings")

    def __init__(self, engine, height, width):
        self.input = _Input(np.zeros((height, width), np.float32))
        self.binding = engine.bind(self.input)
        self.index = -1          # frame index whose depth this holds
        self.ts = 0.0
        self.done = False
        self.timings = (0.0, 0.0)  # disparity ms, conversion ms

    @property
    def depth(self):
        """float32 (H, W) mm, 0 where unknown; valid until the slot is computed again."""
        return self.binding.outputs[OUTPUT]


def conversion(calibration, width, height, settings):
    """(disparity estimator, card, conversion graph, engine label) for frames of this size."""
    estimator = disparity.create(settings["disparity"], width, height,
                                 settings["min_disparity"], settings["num_disparities"],
                                 settings["block_size"])
    card = ConversionCard("stereo-{}".format(estimator.name))
    model = conversion_model(width, height, calibration, estimator.scale_inverse,
                             estimator.lowest_valid, settings["depth_min_mm"],
                             settings["depth_max_mm"])
    return estimator, card, model, "{}-{}x{}".format(card.name, width, height)


class StereoDepth:
    """Depth maps for frames of one size: estimator, conversion engine and buffers made once.

    `slot()` makes a set of output buffers; `compute(left, right, slot)` fills it from a
    rectified BGR pair. Grey images and the raw disparity are shared: one compute at a time.
    """

    def __init__(self, calibration, maker, width, height, settings):
        import cv2
        self.cv2 = cv2
        self.calibration = calibration
        self.settings = settings
        self.width, self.height = width, height
        self.estimator, self.card, self.model, self.label = conversion(calibration, width,
                                                                       height, settings)
        self.engine = maker.make(self.model, self.card, self.label, background=True)
        self.backend = maker.backend.name          # where the graph runs: "ort", "trt"
        self.left = np.zeros((height, width), np.uint8)    # grey, rectified
        self.right = np.zeros((height, width), np.uint8)
        self.raw = np.zeros((height, width), np.int16)     # disparity * scale_inverse
        self.known = np.zeros((height, width), bool)       # numpy conversion's scratch
        self.constants = (calibration, self.estimator.scale_inverse,
                          self.estimator.lowest_valid, settings["depth_min_mm"],
                          settings["depth_max_mm"])
        self.timings = {}
        self.converter = settings.get("convert", "graph")
        if self.converter == "auto":
            self.converter = self._faster()

    @property
    def method(self):
        """How disparity becomes depth here, for people: "numpy" or "graph on <backend>"."""
        return "numpy" if self.converter == "numpy" else "graph on " + self.backend

    def slot(self):
        """New output buffers bound to the engine (one per frame slot, made once)."""
        return DepthSlot(self.engine, self.height, self.width)

    def compute(self, left_bgr, right_bgr, slot):
        """Fill `slot` with the depth of a rectified BGR pair; (disparity ms, conversion ms)."""
        started = time.perf_counter()
        self.cv2.cvtColor(left_bgr, self.cv2.COLOR_BGR2GRAY, dst=self.left)
        self.cv2.cvtColor(right_bgr, self.cv2.COLOR_BGR2GRAY, dst=self.right)
        self.estimator.compute(self.left, self.right, self.raw)
        matched = time.perf_counter()
        self.convert(slot)
        converted = time.perf_counter()
        slot.timings = ((matched - started) * 1000.0, (converted - matched) * 1000.0)
        return slot.timings

    def convert(self, slot, converter=None):
        """The depth of the last computed disparity into `slot`: by the conversion graph on
        the backend, or vectorised numpy (`converter`, default the one chosen)."""
        if (converter or self.converter) == "numpy":
            to_depth_numpy(self.raw, *(self.constants + (slot.depth, self.known)))
        else:
            np.copyto(slot.input.image, self.raw, casting="unsafe")
            self.engine.infer(slot.binding)

    def _faster(self, runs=15):
        """`graph` or `numpy`, whichever converts faster here (`stereo.convert: auto`): on a
        Jetson the graph runs on the GPU, on a CPU host the two are close and either may win.
        Timed alternately on a disparity ramp; the results are the same either way."""
        slot = self.slot()
        self.raw[:] = np.arange(self.width, dtype=np.int16)[None, :] % 1024 - 16
        for name in ("graph", "numpy"):
            self.timings[name] = []
        for _ in range(runs):
            for name in ("graph", "numpy"):
                started = time.perf_counter()
                self.convert(slot, name)
                self.timings[name].append((time.perf_counter() - started) * 1000.0)
        medians = {name: float(np.median(times)) for name, times in self.timings.items()}
        faster = "graph" if medians["graph"] <= medians["numpy"] else "numpy"
        logger.info("disparity -> depth for %dx%d: graph on %s %.2f ms, numpy %.2f ms; "
                    "using %s", self.width, self.height, self.backend, medians["graph"],
                    medians["numpy"], faster)
        return faster

    def close(self):
        self.engine.close()


def box_region(box, scale, width, height):
    """(left, top, right, bottom) integer pixels of the box scaled by `scale` about its
    centre, clipped to the image; empty when the box lies outside it."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    half_w, half_h = (x2 - x1) * scale / 2.0, (y2 - y1) * scale / 2.0
    left = min(width, max(0, int(math.floor(cx - half_w))))
    top = min(height, max(0, int(math.floor(cy - half_h))))
    right = min(width, max(0, int(math.ceil(cx + half_w))))
    bottom = min(height, max(0, int(math.ceil(cy + half_h))))
    return left, top, right, bottom


def spatial(depth, box, calibration, scale=0.5, min_valid=0.1):
    """{"x", "y", "z"} mm of a box (source pixels) from the median known depth of its central
    part (`scale` of its width and height), or None when less than `min_valid` of that part
    has a depth. X and Y are those of the box centre at that depth."""
    height, width = depth.shape
    left, top, right, bottom = box_region(box, scale, width, height)
    if right <= left or bottom <= top:
        return None
    region = depth[top:bottom, left:right]
    values = region[region > 0]
    if values.size == 0 or values.size < min_valid * region.size:
        return None
    z = float(np.median(values))
    x, y, z = calibration.point((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0, z)
    return {"x": round(x, 1), "y": round(y, 1), "z": round(z, 1)}


def grid_cells(width, height, columns, rows):
    """[(top, bottom, left, right)] of the grid's cells, row by row (made once per size)."""
    xs = np.linspace(0, width, columns + 1).round().astype(int)
    ys = np.linspace(0, height, rows + 1).round().astype(int)
    return [(int(ys[r]), int(ys[r + 1]), int(xs[c]), int(xs[c + 1]))
            for r in range(rows) for c in range(columns)]


def grid_medians(depth, cells, columns):
    """Rows of the median known depth (int mm) of each cell, None where a cell has none."""
    values = []
    for top, bottom, left, right in cells:
        region = depth[top:bottom, left:right]
        known = region[region > 0]
        values.append(int(round(float(np.median(known)))) if known.size else None)
    return [values[i:i + columns] for i in range(0, len(values), columns)]


def parse_grid(text):
    """(columns, rows) of a "COLUMNSxROWS" setting; ValueError when it is not one."""
    columns, rows = (int(v) for v in text.lower().split("x"))
    if not (1 <= columns <= 256 and 1 <= rows <= 256):
        raise ValueError(text)
    return columns, rows


def save(path, depth):
    """Write a depth map (mm, 0 unknown) atomically: .npy float32 with NaN where unknown,
    .png 16-bit mm with 0 where unknown (depths above 65535 mm are clipped)."""
    from edge.files import atomic_write
    lower = path.lower()
    if lower.endswith(".npy"):
        buffer = io.BytesIO()
        np.save(buffer, np.where(depth > 0, depth, np.nan).astype(np.float32))
        data = buffer.getvalue()
    elif lower.endswith(".png"):
        import cv2
        millimetres = np.clip(np.round(depth), 0, 65535).astype(np.uint16)
        ok, encoded = cv2.imencode(".png", millimetres)
        data = encoded.tobytes()
    else:
        raise SinkError("depth output {}: use a .npy (float32 mm) or .png (16-bit mm) "
                        "name".format(path))
    try:
        atomic_write(path, data)
    except OSError as e:
        raise SinkError("depth output {}: cannot be written ({}); check the folder".format(
            path, e.strerror or e)) from None
    return os.path.abspath(path)
