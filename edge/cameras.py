"""Cameras: the sources of one pipeline, each with its name, frame pool and capture thread.

A run has one unnamed camera (`source:`, `--source URI`: today's topics and payloads) or a
list of named ones (`sources: [{name, uri}, ...]`, `--source NAME=URI` repeated). A named
camera's results go to per-camera topics (`{prefix}/{device_id}/detections/{name}`, ...) and
carry `camera: NAME`. Each camera has its own pool of frame slots and its own capture thread
(reopened with backoff when a live camera fails), so a slow or failing camera never takes
slots or time from the others; the tasks and their engines are shared.
"""

from edge import topics
from edge.capture import Capture
from edge.errors import ConfigError
from edge.frames import FramePool
from edge.stats import TaskStats

# Topic-safe: one MQTT topic level without wildcards or spaces, as device ids are.
NAME = topics.NAME
NAME_RULE = "1-64 letters, digits, _ . - starting with a letter or digit (one topic level)"


def name_problem(value):
    """None for a usable camera name, else what a name must be (config check)."""
    return None if NAME.match(value) else NAME_RULE


def configured(config):
    """[(name, uri)] of the config's cameras: `sources`, else the one unnamed `source`."""
    if config.get("sources"):
        return [(item["name"], item["uri"]) for item in config["sources"]]
    return [(None, config["source"])]


def display(config):
    """The config's cameras for logs and health: the URI, or NAME=URI, ... (no passwords)."""
    from edge.urls import redact
    return ", ".join(redact(uri, uri) if name is None else
                     "{}={}".format(name, redact(uri, uri)) for name, uri in configured(config))


def frame_sizes(size, cfg):
    """{(width, height): cameras of that size} of the config's cameras: --size WxH for each,
    else each camera's first frame."""
    import collections
    cameras = configured(cfg)
    if size:
        return collections.Counter({frame_size(size, None): len(cameras)})
    return collections.Counter(frame_size(None, uri, cfg["max_image_pixels"])
                               for _, uri in cameras)


def frame_size(size, source_uri, max_pixels=None):
    """(width, height) from --size WxH, else from the first frame of the source."""
    if size:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
            if width > 0 and height > 0:
                return width, height
        except ValueError:
            pass
        raise ConfigError("--size {!r}: expected WIDTHxHEIGHT, e.g. 1280x720".format(size))
    from edge import sources
    source = sources.open_source(source_uri, max_pixels)
    frame = sources.first_frame(source)
    if frame is None:
        raise ConfigError("source {} gave no frame to learn the size from; pass --size "
                          "WxH".format(source.display))
    return frame.width, frame.height


def parse_flags(values):
    """`--source` values as (source URI or None, sources list or None): one plain URI is the
    unnamed camera; NAME=URI (repeatable) are named cameras. ConfigError for a mix, or for a
    name given twice."""
    if not values:
        return None, None
    named = []
    plain = []
    for value in values:
        name, sep, uri = value.partition("=")
        if sep and NAME.match(name) and uri:
            named.append({"name": name, "uri": uri})
        else:
            plain.append(value)
    if plain and (named or len(plain) > 1):
        raise ConfigError("--source {!r}: name each camera when giving more than one "
                          "(--source front=URI --source rear=URI)".format(plain[-1]))
    if plain:
        return plain[0], None
    seen = set()
    for item in named:
        if item["name"] in seen:
            raise ConfigError("--source {}=...: camera {!r} is named twice; each name must "
                              "differ".format(item["name"], item["name"]))
        seen.add(item["name"])
    return None, named


class Camera:
    """One camera of a pipeline: source, frame pool, capture thread, figures.

    `index` is its lane in every task's inbox. `stats` records each frame the pipeline's
    first task finished (fps and capture-to-published latency in health).
    """

    def __init__(self, index, name, source, pool_size, allocate=None):
        self.index = index
        self.name = name                 # None: the one unnamed camera
        self.source = source
        self.pool = FramePool(pool_size, allocate=allocate, camera=name)
        self.capture = None
        self.stats = TaskStats(stages=("total",))

    def start_capture(self, deliver, stop_event, on_exit):
        """Make the capture thread (started by the pipeline)."""
        self.capture = Capture(self.source, self.pool, deliver, stop_event, on_exit=on_exit,
                               name="capture" if self.name is None else "capture-" + self.name)
        return self.capture

    @property
    def live(self):
        return self.source.live

    def label(self):
        """How logs and errors name it: its name, else its URI (passwords hidden)."""
        return self.name if self.name is not None else self.source.display
