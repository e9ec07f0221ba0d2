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
        raise ModelError("model {} ({}): not a valid ONNX file: {}; delete it and run `edge "
                         "models fetch {}`".format(path, card.name, str(e).splitlines()[0][:200],
                                                    card.name))
    return model
