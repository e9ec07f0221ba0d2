"""test:// - a synthetic moving pattern, for trying the pipeline without a camera.

`test://?width=640&height=480&fps=30&frames=N`: a fixed gradient with a bright square that
bounces around it. `frames=N` ends after N frames (a finite source that never drops), otherwise
it is endless. With `fps` > 0 it is live, like a camera: the tasks get the newest frame and the
others are dropped (counted). `fps=0` runs as fast as the pipeline takes frames: a frame is drawn
only when the pipeline has room for it, as a file is read, so nothing is drawn to be dropped.
"""

import logging
import time

import numpy as np

from edge.errors import ConfigError
from edge.sources import Source, register

logger = logging.getLogger(__name__)

MAX_SIZE = 8192


def check_params(source, allowed):
    """Raise ConfigError for a query parameter the kind does not know (a typo is never silent)."""
    unknown = sorted(set(source.params) - set(allowed))
    if unknown:
        raise ConfigError("source {!r}: unknown parameter {!r}; use {}".format(
            source.display, unknown[0], ", ".join(sorted(allowed)) or "none"))


def int_param(source, name, default, low, high):
    """The integer query parameter `name`, within [low, high]; ConfigError naming it if not."""
    raw = source.params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError("source {!r}: {}={!r} is not valid; use an integer {}..{}".format(
            source.display, name, raw, low, high))
    return value


@register("test")
class PatternSource(Source):
    """A gradient with a moving bright square, drawn in place into each slot."""

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        check_params(self, ("width", "height", "fps", "frames"))
        self.width = int_param(self, "width", 640, 1, MAX_SIZE)
        self.height = int_param(self, "height", 480, 1, MAX_SIZE)
        self.fps = int_param(self, "fps", 30, 0, 1000)
        self.frames = int_param(self, "frames", 0, 1, 10 ** 9)   # 0: endless
        # Live only when paced by a clock. At fps=0 a live lane would have it draw frames as
        # fast as the CPU allows, nearly all of them dropped unread (15 000 a second, halving
        # the detector's rate); a lane that waits for room, as a file's, paces it instead.
        self.live = self.frames == 0 and self.fps > 0
        self._index = 0
        self._background = None
        self._next_due = 0.0

    def open(self):
        """Precompute the background so each frame is one copy plus a small square."""
        h, w = self.height, self.width
        ramp_x = np.linspace(0, 255, w, dtype=np.float32)
        ramp_y = np.linspace(0, 255, h, dtype=np.float32)
        background = np.empty((h, w, 3), np.uint8)   # (H, W, 3) BGR
        background[:, :, 0] = ramp_x[None, :]
        background[:, :, 1] = ramp_y[:, None]
        background[:, :, 2] = 64
        self._background = background
        self._side = max(1, min(h, w) // 6)
        self._next_due = time.monotonic()
        logger.info("test pattern %dx%d at %s fps", w, h, self.fps or "max")

    def read_into(self, frame):
        """Draw the next pattern frame into `frame`; False after `frames` frames."""
        if self.frames and self._index >= self.frames:
            return False
        self._pace()
        image = frame.ensure_shape(self.height, self.width)
        np.copyto(image, self._background)
        y, x = self._square_at(self._index)
        image[y:y + self._side, x:x + self._side] = 255   # a slice view: no full-frame array
        frame.index = self._index
        frame.ts = time.time()
        frame.name = None
        self._index += 1
        return True

    def _pace(self):
        # Frames are due at a fixed rate from monotonic time; a consumer that fell behind by
        # more than a frame restarts the schedule instead of getting a burst of catch-up frames.
        if not self.fps:
            return
        now = time.monotonic()
        if self._next_due > now:
            time.sleep(self._next_due - now)
        elif now - self._next_due > 1.0 / self.fps:
            self._next_due = now
        self._next_due += 1.0 / self.fps

    def _square_at(self, index):
        # Bounces off the edges, 7 px/frame across and 5 px/frame down, so every frame differs.
        span_y = max(1, self.height - self._side)
        span_x = max(1, self.width - self._side)
        return _bounce(index * 5, span_y), _bounce(index * 7, span_x)

    def close(self):
        """Nothing to release; the background stays for a reopen."""


def _bounce(distance, span):
    # Position after travelling `distance` px back and forth over [0, span].
    distance %= 2 * span
    return distance if distance <= span else 2 * span - distance
