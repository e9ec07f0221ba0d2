"""stereo:// - two views per frame: the left one in `frame.image`, the right one in `frame.right`.

- `stereo://?left=URI&right=URI`: two sources. Two image files, or two folders paired in
  sorted-name order (a pair where either side does not decode, or whose two images differ in
  size, is skipped, logged and counted); two video files frame by frame; two cameras or
  streams paired by capture time: each camera is read by its own thread, and a frame with no
  partner within `tolerance_ms` (default 20: two free-running 30 fps cameras are at most
  17 ms apart) is dropped and counted. Videos and cameras of two sizes stay an error: every
  frame would differ, so the fix is the mode, not a skip.
- `stereo://?source=URI&layout=side-by-side`: one camera whose frames hold both views, left
  half and right half (USB stereo cameras).
URIs inside the query keep their own query percent-encoded (`test://%3Fwidth%3D320`).

With a calibration attached (`calibrate`, from config stereo.calib) the source checks the
frame size against it and, for raw cameras (an OpenCV calibration), remaps both views
through the rectification maps computed once; every task then sees rectified frames.
"""

import collections
import logging
import os
import threading
import time

import numpy as np

from edge.errors import ConfigError, SourceError
from edge.frames import Frame
from edge.sources import Source, open_source, register
from edge.sources.pattern import check_params, int_param

logger = logging.getLogger(__name__)

LAYOUTS = ("side-by-side",)
PAIR_TIMEOUT = 5.0          # s without a pair before a live source counts as failed
READER_BUFFERS = 4          # frames per camera thread: one being read, the 3 newest read


def _scratch():
    return Frame(0, (2, 2, 3))


@register("stereo")
class StereoSource(Source):
    """A left and a right view per frame, from two sources or one side-by-side camera."""

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        check_params(self, ("left", "right", "source", "layout", "tolerance_ms"))
        self.layout = params.get("layout")
        self.tolerance = int_param(self, "tolerance_ms", 20, 0, 10000) / 1000.0
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ConfigError("source {!r}: layout={!r} is not known; use {} (or leave it out "
                              "for two sources)".format(self.display, self.layout,
                                                        ", ".join(LAYOUTS)))
        if self.layout == "side-by-side":
            if "source" not in params or "left" in params or "right" in params:
                raise ConfigError("source {!r}: a side-by-side camera is one source; give it as "
                                  "stereo://?source=URI&layout=side-by-side".format(self.display))
            self.sides = (self._inner(params["source"]),)
        else:
            if "left" not in params or "right" not in params or "source" in params:
                raise ConfigError("source {!r}: give both views, stereo://?left=URI&right=URI "
                                  "(or source=URI&layout=side-by-side)".format(self.display))
            self.sides = (self._inner(params["left"]), self._inner(params["right"]))
            if self.sides[0].live != self.sides[1].live:
                raise ConfigError("source {!r}: left and right must both be cameras/streams or "
                                  "both files/folders".format(self.display))
        self.live = any(side.live for side in self.sides)
        self.calibration = None
        self._unpaired = 0       # frames dropped: no partner (within the tolerance, or at all)
        self.skipped = 0         # image pairs skipped: a side does not decode, sizes differ
        self._last_skip = None   # why the latest pair was skipped (for "none can be used")
        self._index = 0
        self._pairs = None       # image files: [(left path, right path)]
        self._next = 0
        self._readers = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._scratch = (_scratch(), _scratch())
        self._warned = 0.0

    def _inner(self, uri):
        from urllib.parse import unquote
        uri = unquote(uri)
        source = open_source(uri)
        if isinstance(source, StereoSource):
            raise ConfigError("source {!r}: a stereo source cannot hold another one".format(
                self.display))
        return source

    @property
    def unpaired(self):
        """Frames dropped without a partner: none within the tolerance, none at all (one side
        ended first), or overwritten by newer ones of their camera before one came."""
        return self._unpaired + sum(reader.overwritten for reader in self._readers)

    def calibrate(self, calibration):
        """Check frames against `calibration` and rectify them through its maps, if any."""
        self.calibration = calibration

    # -- opening and closing ---------------------------------------------------------------

    def open(self):
        """Open both sides (the image pairs listed, the cameras' threads started)."""
        from edge.sources.images import ImageFolderSource
        self.close()
        self._stop.clear()
        for side in self.sides:
            side.max_pixels = self.max_pixels     # each side decodes files under the same cap
            side.open()
        if len(self.sides) == 2 and all(isinstance(s, ImageFolderSource) for s in self.sides):
            left, right = (side.paths for side in self.sides)
            self._pairs = list(zip(left, right))
            self._next = 0
            if len(left) != len(right):
                self._unpaired += abs(len(left) - len(right))
                logger.warning("%s: %d left and %d right images; the last %d of the longer side "
                               "have no partner", self.display, len(left), len(right),
                               abs(len(left) - len(right)))
        elif len(self.sides) == 2 and self.live:
            self._readers = [_Reader(side, self._cond, self._stop, name)
                             for side, name in zip(self.sides, ("stereo-left", "stereo-right"))]
            for reader in self._readers:
                reader.start()

    def close(self):
        """Stop the camera threads and close both sides; safe to call twice."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for reader in self._readers:
            reader.join(2.0)
            self._unpaired += reader.overwritten
        self._readers = []
        for side in self.sides:
            side.close()

    # -- reading -------------------------------------------------------------------------

    def read_into(self, frame):
        """Fill frame.image (left) and frame.right; False at the end of finite sides."""
        if self._pairs is not None:
            return self._read_image_pair(frame)
        if self._readers:
            return self._read_matched(frame)
        if len(self.sides) == 1:
            return self._read_side_by_side(frame)
        return self._read_lockstep(frame)

    def _read_image_pair(self, frame):
        from edge.sources.images import _decode
        while self._next < len(self._pairs):
            left_path, right_path = self._pairs[self._next]
            self._next += 1
            left, right = (_decode(path, self.max_pixels, show=side.shown)
                           for side, path in zip(self.sides, (left_path, right_path)))
            if left is None or right is None:
                self.skipped += 1
                self._last_skip = "a side does not decode"
                continue
            if left.shape != right.shape:
                # One pair taken at another resolution is as unusable as one that does not
                # decode, and the pairs after it are still good: skipped and counted alike.
                self.skipped += 1
                self._last_skip = "{} is {}x{} but {} is {}x{}".format(
                    self.sides[0].shown(left_path), left.shape[1], left.shape[0],
                    self.sides[1].shown(right_path), right.shape[1], right.shape[0])
                logger.warning("%s: skipped the pair %s (the views of a pair must be the same "
                               "size)", self.display, self._last_skip)
                continue
            return self._deliver(frame, left, right, time.time(), os.path.basename(left_path))
        if self._pairs and self.skipped == len(self._pairs):
            raise SourceError("{}: none of the {} image pairs can be used (the last: {}); "
                              "replace them".format(self.display, len(self._pairs),
                                                    self._last_skip))
        return False

    def _read_lockstep(self, frame):
        left, right = self._scratch
        got_left = self.sides[0].read_into(left)
        got_right = self.sides[1].read_into(right)
        if not (got_left and got_right):
            if got_left or got_right:
                self._unpaired += 1
                logger.warning("%s: the %s side ended first; its other frames have no partner",
                               self.display, "right" if got_left else "left")
            return False
        return self._deliver(frame, left.image, right.image, left.ts, left.name)

    def _read_side_by_side(self, frame):
        both = self._scratch[0]
        if not self.sides[0].read_into(both):
            return False
        width = both.width // 2
        if both.width % 2:
            raise SourceError("{}: side-by-side frames must have an even width (got {}); check "
                              "the camera's mode".format(self.display, both.width))
        return self._deliver(frame, both.image[:, :width], both.image[:, width:], both.ts,
                             both.name)

    def _read_matched(self, frame):
        # The oldest frame of each camera: a pair when they are within the tolerance, else
        # the older one can never pair (the other camera only gets newer) and is dropped.
        deadline = time.monotonic() + PAIR_TIMEOUT
        left, right = self._readers
        with self._cond:
            while True:
                for reader in self._readers:
                    if reader.error is not None:
                        raise SourceError("{}: {}".format(self.display, reader.error))
                if self._stop.is_set():
                    raise SourceError("{} is closed".format(self.display))
                if left.ready and right.ready:
                    a, b = left.ready[0], right.ready[0]
                    if abs(a.ts - b.ts) <= self.tolerance:
                        left.ready.popleft()
                        right.ready.popleft()
                        break
                    older = left if a.ts < b.ts else right
                    older.free.append(older.ready.popleft())
                    self._unpaired += 1
                    self._warn_unpaired()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SourceError("{}: no pair of frames within {:.0f} ms for {:.0f} s; check "
                                      "both cameras deliver (and tolerance_ms)".format(
                                          self.display, self.tolerance * 1000, PAIR_TIMEOUT))
                self._cond.wait(remaining)
        try:
            return self._deliver(frame, a.image, b.image, a.ts, None)
        finally:
            with self._cond:
                left.free.append(a)
                right.free.append(b)

    def _warn_unpaired(self):
        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            logger.warning("%s: %d frames dropped so far without a partner within %.0f ms",
                           self.display, self.unpaired, self.tolerance * 1000)

    def _deliver(self, frame, left, right, ts, name):
        """Copy (or rectify) the two views into the slot; True."""
        height, width = left.shape[:2]
        if right.shape != left.shape:
            raise SourceError("{}: the left view is {}x{} but the right one {}x{}; use two "
                              "cameras in the same mode".format(self.display, width, height,
                                                                right.shape[1], right.shape[0]))
        calibration = self.calibration
        if calibration is not None:
            calibration.check_size(width, height, "source {}".format(self.display))
        out_left = frame.ensure_shape(height, width)
        out_right = frame.ensure_right(height, width)
        if calibration is not None and calibration.maps is not None:
            import cv2
            for view, out, (map1, map2) in ((left, out_left, calibration.maps[0]),
                                            (right, out_right, calibration.maps[1])):
                cv2.remap(view, map1, map2, cv2.INTER_LINEAR, dst=out)
        else:
            np.copyto(out_left, left)
            np.copyto(out_right, right)
        frame.index = self._index
        frame.ts = ts
        frame.name = name
        self._index += 1
        return True


class _Reader(threading.Thread):
    """One camera of a pair, read continuously into a few buffers; the pairing takes the
    oldest ready one, and when none is free the oldest ready one is overwritten."""

    def __init__(self, source, cond, stop, name):
        super().__init__(name=name, daemon=True)
        self.source = source
        self.cond = cond
        self.stop = stop
        self.free = collections.deque(_scratch() for _ in range(READER_BUFFERS))
        self.ready = collections.deque()     # filled frames, oldest first
        self.error = None
        self.overwritten = 0

    def run(self):
        while not self.stop.is_set():
            with self.cond:
                if self.free:
                    frame = self.free.popleft()
                elif self.ready:
                    frame = self.ready.popleft()
                    self.overwritten += 1
                else:          # both buffers are being copied out: wait for one back
                    self.cond.wait(0.05)
                    continue
            try:
                ok = self.source.read_into(frame)
            except Exception as e:  # the pairing raises it as the source's SourceError
                ok, self.error = False, e
            with self.cond:
                if ok:
                    self.ready.append(frame)
                else:
                    self.free.append(frame)
                    if self.error is None:
                        self.error = "{} ended".format(self.source.display)
                self.cond.notify_all()
            if not ok:
                return
