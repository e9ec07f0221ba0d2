"""The precision a card's engines are built at (`engine.precision`, `--precision`), and INT8's
rules: which boards may have it, which cards, and where a card's calibrated graph is kept.

- `auto` (the default): the card's own `precision` (fp16) on TensorRT, fp32 on the CPU
  backend (ONNX Runtime has no fast FP16 on a CPU);
- `fp16`, `fp32`: that, on TensorRT; the CPU backend runs fp32 either way;
- `int8`: explicit quantization. The card's network is calibrated once into a QDQ graph
  (edge.quantize, `edge calibrate`), kept next to the engines, and every engine of the card
  is built from it (the float preprocessing and decoding fused around it as usual).
  TensorRT builds INT8 kernels where the graph has Q/DQ pairs and FP16 ones elsewhere; ONNX
  Runtime runs the same graph on the CPU, so the accuracy measured there is the device's.
  Refused at start-up on a GPU without fast INT8 (compute capability below 6.1: the Jetson
  Nano's Maxwell is 5.3) and on a TensorRT too old for QDQ graphs; a card whose family is
  not quantized (Coarse LoFTR) keeps its `auto` precision, with a warning.
"""

import logging
import os

from edge.errors import ConfigError

logger = logging.getLogger(__name__)

CHOICES = ("auto", "fp16", "fp32", "int8")
# INT8 that pays needs DP4A or tensor cores: from compute capability 6.1 (Pascal's GP10x),
# except 6.2 (Jetson TX2's Pascal, no DP4A); Maxwell (5.3, the Jetson Nano) has none.
NO_FAST_INT8 = ((6, 2),)
# The parsers of 8.0 and 8.2 take these QDQ graphs too (edge.backends.trtcheck), but INT8
# engines are built and supported from 8.5 (JetPack 5, Orin and Xavier): docs/int8.md.
MIN_INT8_TENSORRT = (8, 5)
SUFFIX = ".int8.onnx"


def calibrated_path(folder, card):
    """Where the card's calibrated QDQ graph is kept: beside the engines, named after the
    card and its model file's sha256 (a new model needs a new calibration)."""
    return os.path.join(folder, "{}-{}{}".format(card.name, card.model["sha256"][:12], SUFFIX))


def gpu_int8_problem(facts):
    """Why a TensorRT device cannot build INT8 engines that pay, from its facts
    (`Backend.fingerprint()`: compute_capability "5.3", tensorrt "8.2.1", device name), or
    None."""
    capability = str(facts.get("compute_capability") or "0.0")
    try:
        major, minor = (int(v) for v in capability.split(".")[:2])
    except ValueError:
        return "its compute capability ({}) is unknown".format(capability)
    if (major, minor) < (6, 1) or (major, minor) in NO_FAST_INT8:
        return ("{} (compute capability {}) has no fast INT8 kernels: INT8 would run slower "
                "than FP16 there".format(facts.get("device") or "this GPU", capability))
    return tensorrt_int8_problem(str(facts.get("tensorrt") or "0"))


def tensorrt_int8_problem(version):
    """Why TensorRT `version` ("8.2.1") is not given QDQ graphs, or None."""
    try:
        parts = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        parts = (0, 0)
    if parts < MIN_INT8_TENSORRT:
        return ("TensorRT {} is older than {}.{}, the first this project builds INT8 engines "
                "with".format(version, *MIN_INT8_TENSORRT))
    return None


def resolve(card, requested, backend, folder, model_path):
    """The card as its engines are built at `requested` on `backend`: the same card, or a
    copy whose `precision` is the one used and, for int8, whose `calibrated` is the QDQ
    graph's path in `folder` (made now from the card's own calibration images where it has
    none yet; `model_path()` gives the card's model file). ConfigError where int8 cannot be
    had."""
    if requested == "auto":
        return card
    if requested == "int8":
        from edge import families
        reason = families.get(card.family).int8_problem
        if reason:
            logger.warning("engine.precision int8: %s keeps %s: %s", card.name,
                           card.precision if backend.name == "trt" else "fp32", reason)
            return card
        problem = backend.int8_problem()
        if problem:
            raise ConfigError("engine.precision int8: refused on this device: {}; use fp16 "
                              "(engine.precision: auto, the default)".format(problem))
        made = card.at_precision("int8")
        made.calibrated = ensure_calibrated(card, folder, model_path)
        return made
    # fp16, fp32: TensorRT builds that; the CPU backend runs fp32 either way, as for auto
    if backend.name != "trt" or card.precision == requested:
        return card
    return card.at_precision(requested)


def ensure_calibrated(card, folder, model_path):
    """The card's calibrated graph in `folder`: the one there, else one calibrated now from
    the card's `calibration` images (`model_path()`: its model file); ConfigError naming
    `edge calibrate` without either."""
    path = calibrated_path(folder, card)
    if os.path.isfile(path):
        return path
    default = card.calibration["images"]
    if not default:
        raise ConfigError("engine.precision int8: {} has no calibrated graph ({}); make it "
                          "with `edge calibrate {} --images DIR` from a few hundred of your "
                          "camera's frames".format(card.name, path, card.name))
    from edge import quantize
    logger.info("engine.precision int8: calibrating %s on its default images (%s), once",
                card.name, default)
    quantize.calibrate(card, model_path(), default, card.calibration["count"], path)
    return path


def calibrate(config, card, images, count, progress=None):
    """`edge calibrate`: the card's calibrated graph from `images` (`count` frames) written
    beside the configuration's engines; edge.quantize.calibrate's result. ConfigError for a
    bad count or a card whose family is not quantized."""
    from edge import families, models, quantize
    if not 1 <= count <= 100000:
        raise ConfigError("edge calibrate: --count {}: give 1 to 100000 frames (a few hundred "
                          "are plenty)".format(count))
    reason = families.get(card.family).int8_problem
    if reason:
        raise ConfigError("edge calibrate {}: {}".format(card.name, reason))
    folder = config["engine"]["dir"]
    os.makedirs(folder, exist_ok=True)
    model = models.ensure(card, config["model_dir"], config["model_mirror"])
    return quantize.calibrate(card, model, images, count, calibrated_path(folder, card),
                              progress=progress)
