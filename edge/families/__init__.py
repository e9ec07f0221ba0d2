"""Model families: how a model's graph is fed and what its outputs become.

A family is a small module that registers a class with `register`. The class says which
task it serves, adds the family's nodes (built with edge.nodes) when `edge.graph.rewrite`
fuses the card into the model (`graph_inputs`, `graph_outputs`), and says whether those have a
batched form (`batches`: several cameras' frames in one run); nothing outside the family asks
which it is. A family may also rewrite the model's own nodes first (`rewrite_model(model)`,
optional: Coarse LoFTR makes its attention FP16-safe there), and whether its cards may run
at engine.precision int8 (`int8_problem`: None, or why not).
"""

_FAMILIES = {}


def register(cls):
    """Class decorator: register a family under its `name`."""
    _FAMILIES[cls.name] = cls()
    return cls


def _load_builtin():
    from edge.families import loftr, yolov5, yolov8, yolox  # noqa: F401


def names():
    """Registered family names."""
    _load_builtin()
    return sorted(_FAMILIES)


def get(name):
    """The family registered as `name` (cards are validated against `names()` first)."""
    _load_builtin()
    return _FAMILIES[name]
