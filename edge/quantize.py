"""INT8 by explicit quantization: the card's network as a QDQ graph, calibrated on frames.

`calibrate(card, model_path, images, count, out_path)` writes the card's network (the model
file of the card, before edge.graph.rewrite fuses the preprocessing in front and the family's
decoding behind) with QuantizeLinear/DequantizeLinear pairs, in the form TensorRT's ONNX parser
builds an INT8 engine from and ONNX Runtime runs on a CPU: INT8 with zero points 0 (symmetric),
weights per output channel, activations per tensor. `edge.graph.rewrite` then fuses the float
preprocessing and decoding around it as around the float network, for any frame size.

Calibration frames are made from the images deterministically: files in sorted order, each
seen through a fixed list of views (crops at several scales and places, mirrored or not), a
view resized to a frame size, and that frame letterboxed by the card's own preprocessing
graph (edge.graph.preprocess_model), so the network sees what it sees in the daemon. The
same images and count give the same scales and the same bytes.

Needs onnxruntime's quantization tooling (x86/aarch64 hosts with `pip install onnxruntime`);
a Jetson with TensorRT alone calibrates on a host and copies the file.
"""

import contextlib
import io
import logging
import os
import time

import numpy as np

from edge.errors import ConfigError, InstallError, ModelError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OPSET = 13       # per-axis QuantizeLinear/DequantizeLinear (per-channel weights) need 13
DEFAULT_COUNT = 120
# (crop scale of the largest crop of the frame's aspect, anchor x, anchor y (0 left/top ..
# 1 right/bottom), mirrored): each image is seen through these in turn
VIEWS = ((1.0, 0.5, 0.5, False), (1.0, 0.5, 0.5, True), (0.75, 0.0, 0.0, False),
         (0.75, 1.0, 1.0, True), (0.75, 1.0, 0.0, False), (0.75, 0.0, 1.0, True),
         (0.55, 0.5, 0.5, False), (0.55, 0.2, 0.8, True), (0.55, 0.8, 0.2, False),
         (0.4, 0.3, 0.3, True), (0.4, 0.7, 0.7, False), (0.4, 0.5, 0.5, True))
# frame sizes (width, height), taken in turn per pass over the views
FRAME_SIZES = ((640, 480), (1280, 720), (480, 640))

# The recipe measured with tools/bench_int8.py (yolox-nano, held-out coco8 frames):
# - TensorRT's form: INT8 with zero points 0 for activations and weights, weights per output
#   channel, activations per tensor;
# - Q/DQ only where TensorRT wants them, on the inputs of Conv (activation and weight): a
#   Conv's output feeds its SiLU (Sigmoid, Mul), which TensorRT fuses into the convolution
#   at higher precision. Quantizing the raw Conv outputs (ONNX Runtime's default) rounds the
#   stem's pre-activations (range +-112, step 0.93) and wrecked every detection;
# - biases float (QuantizeBias off): ONNX Runtime would make them INT32 DequantizeLinear,
#   which TensorRT does not import (its DequantizeLinear takes INT8);
# - ranges from the 99.99th percentile of each tensor's histogram, not min/max: SiLU
#   outputs have long tails;
# - the convolutions in KEEP_FLOAT stay float (FP16 on a GPU): the layers whose INT8 input
#   moves the scores most, one at a time (tools/bench_int8.py --sensitivity).
RECIPE = {
    "calibrate_method": "Percentile",
    "percentile": 99.99,
    "per_channel": True,
    "op_types": ("Conv",),
    "keep_float": None,           # None: KEEP_FLOAT of the card's model, else node names
    "extra_options": {},
}
# Frames per calibration step: the calibrator holds every intermediate tensor of the frames
# of a step in memory (about 130 MB a frame for yolox-nano at 416 x 416); the histograms of a percentile
# calibration are merged step by step, so the step changes the ranges a little.
STEP = 8

# model sha256 -> the Conv nodes kept float: the 40 of yolox-nano's 113 whose INT8 input
# alone moved its scores most (ranked on coco8 train frames with min/max ranges; 46% of its
# multiply-adds). With the 20 most sensitive float, held-out recall/precision were
# 0.95/0.94; with 40, 0.97/0.97; with none, 0.03/0.29. A new model is ranked with
# `tools/bench_int8.py --sensitivity`.
KEEP_FLOAT = {
    "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14": (
        "Conv_41", "Conv_44", "Conv_47", "Conv_50", "Conv_53", "Conv_56", "Conv_59",
        "Conv_62", "Conv_67", "Conv_70", "Conv_73", "Conv_85", "Conv_92", "Conv_95",
        "Conv_105", "Conv_113", "Conv_116", "Conv_119", "Conv_131", "Conv_141", "Conv_165",
        "Conv_168", "Conv_175", "Conv_178", "Conv_181", "Conv_187", "Conv_197", "Conv_212",
        "Conv_228", "Conv_231", "Conv_237", "Conv_254", "Conv_257", "Conv_263", "Conv_266",
        "Conv_270", "Conv_354", "Conv_368", "Conv_381", "Conv_387"),
}


def _quantization():
    """onnxruntime.quantization, or InstallError saying how to get it."""
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise InstallError("INT8 calibration needs onnxruntime's quantization tooling ({}); "
                           "run `pip install onnxruntime onnx` on a host (x86 or aarch64) and "
                           "copy the calibrated .onnx to the device".format(e))
    return quantization


def image_files(images):
    """Sorted image paths from a folder or a list of files; ConfigError when there are none."""
    if isinstance(images, str):
        if not os.path.isdir(images):
            raise ConfigError("calibration images {}: not a folder; give a folder of JPEG or "
                              "PNG images (frames of your own camera are best)".format(images))
        paths = [os.path.join(images, name) for name in os.listdir(images)
                 if name.lower().endswith(IMAGE_SUFFIXES)]
    else:
        paths = list(images)
    paths = sorted(paths)
    if not paths:
        raise ConfigError("calibration images {}: no .jpg/.png/.bmp/.webp files; give a "
                          "folder of images (frames of your own camera are best)".format(images))
    return paths


def view(image, frame_size, crop):
    """The (H, W, 3) uint8 frame of `frame_size` (width, height) seen in `image` through
    `crop` (scale, anchor x, anchor y, mirrored), as a camera of that size would show it."""
    import cv2
    scale, ax, ay, mirrored = crop
    width, height = frame_size
    ih, iw = image.shape[:2]
    fit = min(iw / float(width), ih / float(height)) * scale   # crop pixels per frame pixel
    cw, ch = max(1, int(round(width * fit))), max(1, int(round(height * fit)))
    x = int(round((iw - cw) * ax))
    y = int(round((ih - ch) * ay))
    part = image[y:y + ch, x:x + cw]
    if mirrored:
        part = part[:, ::-1]
    interpolation = cv2.INTER_AREA if fit > 1 else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(part, (width, height), interpolation=interpolation))


def frames(paths, count, sizes=FRAME_SIZES, views=VIEWS):
    """`count` (H, W, 3) uint8 BGR frames from the images, in a fixed order: frame i shows
    image i mod n through view (i // n) mod len(views) at size (i // (n * len(views))) mod
    len(sizes)."""
    import cv2
    images = []
    for path in paths:
        image = cv2.imread(path)
        if image is None:
            raise ConfigError("calibration image {}: cannot be read as an image".format(path))
        images.append(image)
    out = []
    for i in range(count):
        n = len(images)
        crop = views[(i // n) % len(views)]
        size = sizes[(i // (n * len(views))) % len(sizes)]
        out.append(view(images[i % n], size, crop))
    return out


def network_inputs(card, frames_list):
    """The network's input (1, C, H, W) float32 for each frame, made by the card's own
    preprocessing graph (edge.graph.preprocess_model) in ONNX Runtime on one thread."""
    import onnxruntime
    from edge.graph import preprocess_model
    sessions = {}
    out = []
    for frame in frames_list:
        size = (frame.shape[1], frame.shape[0])
        session = sessions.get(size)
        if session is None:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            session = sessions[size] = onnxruntime.InferenceSession(
                preprocess_model(card, *size).SerializeToString(), options,
                providers=["CPUExecutionProvider"])
        out.append(session.run(None, {"frame": frame})[0])
    return out


def with_opset(model, opset=OPSET):
    """The model converted to at least `opset` (per-channel Q/DQ needs 13)."""
    import onnx
    from edge.nodes import model_opset
    if model_opset(model) >= opset:
        return model
    return onnx.version_converter.convert_version(model, opset)


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of network inputs; `set_range` picks
    the slice the calibrator reads next (strided calibration, a few frames at a time)."""

    def __init__(self, name, inputs, progress=None):
        self.name = name
        self.inputs = inputs
        self.start, self.end = 0, len(inputs)
        self.at = 0
        self.progress = progress

    def get_next(self):
        if self.start + self.at >= self.end:
            return None
        self.at += 1
        done = self.start + self.at
        if self.progress is not None and (done % STEP == 0 or done == len(self.inputs)):
            self.progress("calibrate", done / float(len(self.inputs)))
        return {self.name: self.inputs[self.start + self.at - 1]}

    def __len__(self):
        return len(self.inputs)

    def set_range(self, start_index, end_index):
        self.start, self.end = start_index, min(end_index, len(self.inputs))
        self.at = 0


def name_nodes(model):
    """Give every unnamed node a name (`Op_index`): ONNX Runtime's quantizer and the
    keep-float lists go by node name."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = "{}_{}".format(node.op_type, i)
    return model


def quantize(model, inputs, recipe=None, progress=None):
    """The QDQ ModelProto of a float network `model` calibrated on `inputs` (network input
    arrays, in order) with `recipe` (RECIPE's keys; `keep_float`: node names)."""
    import tempfile

    import onnx
    q = _quantization()
    recipe = dict(RECIPE, **(recipe or {}))
    model = name_nodes(with_opset(model))
    initializers = {t.name for t in model.graph.initializer}
    name = [i.name for i in model.graph.input if i.name not in initializers][0]
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "OpTypesToExcludeOutputQuantization": list(recipe["op_types"] or ()),
             "CalibStridedMinMax": _step(len(inputs))}
    if recipe["calibrate_method"] == "Percentile":
        extra["CalibPercentile"] = recipe["percentile"]
    extra.update(recipe["extra_options"])
    with tempfile.TemporaryDirectory(prefix="edge-quantize.") as tmp:
        src = os.path.join(tmp, "float.onnx")
        dst = os.path.join(tmp, "qdq.onnx")
        onnx.save(model, src)
        with _quiet():
            q.quantize_static(
                src, dst, _Reader(name, inputs, progress),
                quant_format=q.QuantFormat.QDQ,
                op_types_to_quantize=list(recipe["op_types"]) if recipe["op_types"] else None,
                per_channel=recipe["per_channel"], activation_type=q.QuantType.QInt8,
                weight_type=q.QuantType.QInt8,
                nodes_to_exclude=list(recipe["keep_float"] or ()),
                calibrate_method=getattr(q.CalibrationMethod, recipe["calibrate_method"]),
                extra_options=extra)
        qdq = onnx.load(dst)
    qdq.producer_name = "edge.quantize"
    return qdq


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantization tooling prints its calibrator's figures to stdout and
    advice through the root logger itself; edge's own progress says what matters. (A filter
    on the root logger sees only what is logged on it directly, not the records of edge's
    module loggers passing through.)"""
    root = logging.getLogger()
    advice = _BelowError()
    root.addFilter(advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(advice)


class _BelowError(logging.Filter):
    def filter(self, record):
        return record.levelno >= logging.ERROR


def _step(count):
    """The largest number of frames <= STEP that divides `count` (the strided calibration
    of onnxruntime wants equal steps)."""
    return max(d for d in range(1, min(STEP, count) + 1) if count % d == 0)


def keep_float(card):
    """The nodes of the card's model that stay float (KEEP_FLOAT by the model's sha256)."""
    return KEEP_FLOAT.get(card.model["sha256"], ())


def calibrate(card, model_path, images, count=DEFAULT_COUNT, out_path=None, progress=None,
              recipe=None):
    """Calibrate the card's network on `count` frames made from `images` (a folder or
    paths) and write the QDQ model to `out_path` (atomically; None: not written).

    Returns {"model": the QDQ ModelProto, "path", "frames", "images", "seconds"};
    `progress(stage, fraction)` hears "frames", "calibrate" (0..1) and "done".
    """
    from edge import files
    from edge.models import load_onnx
    started = time.perf_counter()
    progress = progress or (lambda stage, fraction=None: None)
    if count < 1:
        raise ConfigError("calibration: count {} must be at least 1".format(count))
    paths = image_files(images)
    progress("frames", 0.0)
    inputs = network_inputs(card, frames(paths, count))
    model = load_onnx(model_path, card)
    recipe = dict(recipe or {})
    if recipe.get("keep_float") is None:
        recipe["keep_float"] = keep_float(card)
        if not recipe["keep_float"]:
            # yolox-nano with every convolution quantized kept 3 % of its detections
            logger.warning("%s: no measured list of layers to keep float for its model "
                           "(edge.quantize.KEEP_FLOAT): every convolution is quantized, "
                           "and the detections may be far from FP32's; rank the layers with "
                           "tools/bench_int8.py --sensitivity", card.name)
    qdq = quantize(model, inputs, recipe, progress)
    problems = check(qdq)
    if problems:
        raise ModelError("{}: the calibrated graph is not in TensorRT's INT8 form: {}".format(
            card.name, problems[0]))
    if out_path:
        files.atomic_write(out_path, qdq.SerializeToString())
    progress("done", 1.0)
    return {"model": qdq, "path": out_path, "frames": len(inputs), "images": len(paths),
            "seconds": time.perf_counter() - started}


def check(model):
    """Problems (one line each) of a QDQ model against TensorRT's explicit-quantization
    rules (edge.backends.trtcheck.qdq_problems: 8.0 to 10.x)."""
    from edge.backends.trtcheck import qdq_problems
    initializers = {t.name: t for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.extend(qdq_problems(node, initializers))
    return problems
