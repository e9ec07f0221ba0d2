"""Inference backends behind one small interface: load a rewritten graph, infer a slot.

A backend module registers a class with `register`. `select("auto")` picks TensorRT when
tensorrt, pycuda and a GPU are present, else ONNX Runtime; nothing outside a backend asks
which one it is.
"""

import logging

from edge.errors import ConfigError

logger = logging.getLogger(__name__)

_BACKENDS = {}
_MODULES = {"ort": "edge.backends.ort"}


def register(cls):
    """Class decorator: register a backend under its `name`."""
    _BACKENDS[cls.name] = cls
    return cls


class Engine:
    """A loaded graph. `bind(frame, extra)` prepares a slot once; `infer(binding)` runs it.

    Outputs are written into preallocated numpy arrays owned by the binding, so a slot's
    results stay valid until the slot is inferred again.
    """

    def bind(self, frame, extra=None):
        """A binding of the slot's image (and optional fixed inputs) to output buffers."""
        raise NotImplementedError

    def infer(self, binding):
        """Run the graph on a binding; its `outputs` hold the results afterwards."""
        raise NotImplementedError


class Backend:
    """Creates engines from rewritten ONNX graphs."""

    name = None

    @classmethod
    def available(cls):
        """None when usable here, else the reason it is not."""
        return None

    def load(self, model, label):
        """An Engine for an onnx.ModelProto; `label` names it in messages."""
        raise NotImplementedError

    def describe(self):
        """Versions and device, for health and logs."""
        return {"backend": self.name}


def _cls(name):
    import importlib
    if name not in _BACKENDS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    return _BACKENDS.get(name)


def names():
    """Every backend name the config accepts."""
    return ["auto"] + sorted(_MODULES)


def select(name, **options):
    """A Backend instance for `auto`, `ort` or `trt`; ConfigError when it cannot run here."""
    order = ["trt", "ort"] if name == "auto" else [name]
    reasons = []
    for candidate in order:
        if candidate not in _MODULES:
            if name != "auto":
                raise ConfigError("backend {!r}: not available in this version; use one of {}"
                                  .format(name, ", ".join(names())))
            continue
        cls = _cls(candidate)
        reason = cls.available() if cls else "not installed"
        if reason is None:
            return cls(**options)
        reasons.append("{}: {}".format(candidate, reason))
    raise ConfigError("backend {!r}: cannot run here ({}); install the `cpu` extra for ONNX "
                      "Runtime or the `gpu` extra with TensorRT".format(name, "; ".join(reasons)))
