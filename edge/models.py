"""Model files for cards: where they live, fetching them on first use, loading them safely."""

import logging
import os

from edge import fetch
from edge.errors import ModelError

logger = logging.getLogger(__name__)


def default_model_dir():
    """$EDGE_MODEL_DIR, else ~/.cache/edge/models (the unit sets CacheDirectory)."""
    return os.environ.get("EDGE_MODEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edge", "models")


def model_path(card, model_dir):
    """Where the card's model file lives."""
    return os.path.join(model_dir, card.model["file"])


def ensure(card, model_dir, mirror=None, fetch_missing=True):
    """The path of the card's model, checked against its sha256; fetched when missing."""
    path = model_path(card, model_dir)
    what = "model {} ({})".format(card.model["file"], card.name)
    if os.path.isfile(path):
        fetch.verify(path, card.model["sha256"], what)
        return path
    if not fetch_missing:
        raise ModelError("{}: missing in {}; run `edge models fetch {}`".format(
            what, model_dir, card.name))
    logger.info("model %s for %s is missing: fetching it", card.model["file"], card.name)
    return fetch.fetch(card.model["url"], card.model["sha256"], path, mirror=mirror, what=what)


def load_onnx(path, card):
    """The ONNX model at `path`; ModelError when it does not parse or is invalid."""
    import onnx
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError and others
        remake = "calibrate" if card.calibrated else "models fetch"
        raise ModelError("model {} ({}): not a valid ONNX file: {}; delete it and run `edge "
                         "{} {}`".format(path, card.name, str(e).splitlines()[0][:200],
                                         remake, card.name))
    check_inputs(model, card, path)
    return model


def check_inputs(model, card, path):
    """ConfigError when the card's input size or colour disagrees with the model's fixed
    input shape (N, C, H, W), which would otherwise fail at the first inference."""
    from edge.errors import ConfigError
    width, height = card.input_size
    channels = 1 if card.input["color"] == "gray" else 3
    for tensor in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in tensor.type.tensor_type.shape.dim]
        if len(dims) != 4:
            continue
        if dims[2] not in (None, height) or dims[3] not in (None, width):
            raise ConfigError("card {}: input.size: [{}, {}] but model {} takes {}x{} (width x "
                              "height) at input {!r}; set input.size to [{}, {}]".format(
                                  card.path, width, height, os.path.basename(path), dims[3],
                                  dims[2], tensor.name, dims[3], dims[2]))
        if dims[1] not in (None, channels):
            raise ConfigError("card {}: input.color: {} gives {} channel(s) but model {} takes "
                              "{} at input {!r}; use {}".format(
                                  card.path, card.input["color"], channels,
                                  os.path.basename(path), dims[1], tensor.name,
                                  "gray" if dims[1] == 1 else "bgr or rgb"))
