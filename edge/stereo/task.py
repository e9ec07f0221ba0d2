"""Stereo depth as a background task: where each detected object is in 3D.

Beside detection, at its own rate (`stereo.max_hz` on live sources, like the matcher), the
task turns a frame's two views into a depth map (edge.stereo.conversion: disparity
estimator, then the conversion graph on the backend) held in buffers bound to the frame's
slot. Detection asks `add_spatial(frame, detections)` from its decode step and each
detection gains `spatial` ({x, y, z} mm, camera optical frame) or None:
- files and folders (nothing is dropped): depth runs on every frame, and detection waits
  for the map of its own frame, so every answer belongs to its own pair;
- cameras: detection never waits; it takes the map of its own frame if that is done, else
  the newest map if its frame was captured within `stereo.max_age` seconds.
With `stereo.grid` set, each depth frame also publishes a coarse grid of median depths on
`{prefix}/{device}/depth`, for obstacle avoidance.
"""

import logging
import threading
import time

import numpy as np

from edge.stereo import calibration as calibrations
from edge.stereo import conversion as depths
from edge.stereo import disparity
from edge.errors import ConfigError, SourceError
from edge.tasks import register
from edge.tasks.base import Task

logger = logging.getLogger(__name__)

# s a detection waits for the depth of its own frame (files and folders) before it gives up
# with spatial null: far beyond what a disparity takes, short enough to end a stopped run.
SYNC_TIMEOUT = 10.0
KEY = "depth"          # frame.outputs key of the slot's depth buffers


@register
class DepthTask(Task):
    """Disparity and depth of stereo frames; spatial coordinates for detections."""

    name = "depth"
    topic = "depth"
    background = True

    def __init__(self, maker, calibration, settings, device="edge", sync=False, camera=None):
        estimator = disparity.resolve(settings["disparity"])
        super().__init__(depths.ConversionCard("stereo-" + estimator), maker, None)
        self.calibration = calibration
        self.settings = settings
        self.device = device
        self.sync = sync                     # files/folders: every frame, detection waits
        self.camera = camera                 # the stereo camera's name (None: unnamed)
        self.max_hz = settings["max_hz"]     # cameras: the depth rate (0: every frame)
        self.max_age = settings["max_age"]
        self.stereo = None                   # edge.stereo.conversion.StereoDepth for the frame size
        self.failed = False
        self._cond = threading.Condition()
        self._latest = None                  # copy of the newest map, under _cond
        self._latest_ts = None
        self._last = None
        self._warned = False
        self.grid = depths.parse_grid(settings["grid"]) if settings["grid"] else None
        self._cells = None

    def serves(self, camera):
        return camera == self.camera

    def due(self, frame, now):
        if frame.camera != self.camera:
            return False
        if self.sync or self.max_hz <= 0:
            return True
        if self._last is None or now - self._last >= 1.0 / self.max_hz:
            self._last = now
            return True
        return False

    def build(self, frame):
        if self.stereo is None:
            self.calibration.check_size(frame.width, frame.height, "the stereo source")
            _, card, model, label = depths.conversion(self.calibration, frame.width,
                                                      frame.height, self.settings)
            self.maker.ensure(model, card, label)

    def prepare(self, frame):
        self.stereo_for(frame.width, frame.height)

    def stereo_for(self, width, height):
        """The StereoDepth for frames of this size (the calibration's: made once)."""
        if self.stereo is None:
            self.calibration.check_size(width, height, "the stereo source")
            started = time.monotonic()
            self.stereo = depths.StereoDepth(self.calibration, self.maker, width, height,
                                             self.settings)
            self.engines[(width, height, None)] = self.stereo.engine
            self._latest = np.zeros((height, width), np.float32)
            if self.grid:
                self._cells = depths.grid_cells(width, height, *self.grid)
            logger.info("depth for %dx%d frames ready in %.1f s: %s, conversion by %s", width,
                        height, time.monotonic() - started, self.stereo.estimator.describe(),
                        self.stereo.method)
        elif (width, height) != (self.stereo.width, self.stereo.height):
            self.calibration.check_size(width, height, "the stereo source")
        return self.stereo

    def engine_labels(self):
        return [self.stereo.label] if self.stereo is not None else []

    def infer_frame(self, frame):
        """Depth of the frame into its slot's buffers; (times, grid or None)."""
        try:
            return self._infer(frame)
        except Exception:
            with self._cond:
                self.failed = True       # detection must not wait for maps that won't come
                self._cond.notify_all()
            raise

    def _infer(self, frame):
        started = time.time()
        if frame.right is None:
            raise SourceError("depth: frame {} has no right view; use a stereo:// source".format(
                frame.index))
        stereo = self.stereo_for(frame.width, frame.height)
        slot = frame.outputs.get(KEY)
        if slot is None:
            slot = frame.outputs[KEY] = stereo.slot()     # once per frame slot
        with self._cond:
            slot.done = False
            slot.index = frame.index
        matched_ms, converted_ms = stereo.compute(frame.image, frame.right, slot)
        grid = depths.grid_medians(slot.depth, self._cells, self.grid[0]) if self.grid else None
        with self._cond:
            slot.done = True
            slot.ts = frame.ts
            np.copyto(self._latest, slot.depth)     # for cameras and snapshots
            self._latest_ts = frame.ts
            self._cond.notify_all()
        return started, time.time(), matched_ms, converted_ms, grid

    def decode(self, frame, inferred):
        started, ended, matched_ms, converted_ms, grid = inferred
        self.frames += 1
        if grid is None:
            # Nothing to publish: the frame still counts in this task's health figures.
            done = time.time()
            self.stats.record((done - frame.ts) * 1000.0, (started - frame.ts) * 1000.0,
                              (ended - started) * 1000.0, (done - ended) * 1000.0)
            return []
        msg = self.new_message(frame, matched_ms + converted_ms)
        msg["latency_ms"]["disparity"] = round(matched_ms, 3)
        msg["latency_ms"]["convert"] = round(converted_ms, 3)
        msg["grid"] = {"columns": self.grid[0], "rows": self.grid[1]}
        msg["range_mm"] = [self.settings["depth_min_mm"], self.settings["depth_max_mm"]]
        msg["depth_mm"] = grid
        return [msg]

    # -- for detection (decode thread) -----------------------------------------------------

    def add_spatial(self, frame, detections):
        """Set each detection's `spatial` from the depth of this frame, else the newest."""
        settings = self.settings
        with self._cond:
            if self.sync and not self._cond.wait_for(
                    lambda: self._own(frame) is not None or self.failed, SYNC_TIMEOUT):
                if not self._warned:
                    logger.warning("depth of frame %d not ready within %.0f s: spatial null",
                                   frame.index, SYNC_TIMEOUT)
                    self._warned = True
            depth = self._own(frame)
            if depth is None and not self.sync and self._latest_ts is not None and \
                    abs(frame.ts - self._latest_ts) <= self.max_age:
                depth = self._latest
            for det in detections:
                det["spatial"] = None if depth is None else depths.spatial(
                    depth, det["box"], self.calibration, settings["box_scale"],
                    settings["min_valid"])

    def _own(self, frame):
        # The map in the frame's own slot, if it is this frame's and done: it stays there
        # until every task has decoded the frame and the slot is reused.
        slot = frame.outputs.get(KEY)
        if slot is not None and slot.done and slot.index == frame.index:
            return slot.depth
        return None

    def picture(self):
        """The newest depth map, colourised (BGR), or None before the first one."""
        from edge import draw
        with self._cond:
            if self._latest_ts is None:
                return None
            latest = self._latest.copy()
        return draw.depth(latest)


def create(config, maker, sources):
    """The depth task of a stereo run (the calibration attached to its stereo source), or
    None without stereo.calib; ConfigError when the sources and stereo.calib disagree.

    `sources`: a Source (the one unnamed camera) or [(camera name, Source)]; one of them at
    most may be a stereo pair, the one stereo.calib calibrates.
    """
    from edge.stereo.source import StereoSource
    if not isinstance(sources, (list, tuple)):
        sources = [(None, sources)]
    settings = config["stereo"]
    pairs = [(name, source) for name, source in sources if isinstance(source, StereoSource)]
    if not settings["calib"]:
        if pairs:
            raise ConfigError("source {}: stereo depth needs the pair's calibration; set "
                              "stereo.calib (a Middlebury calib.txt or an OpenCV stereo "
                              "YAML/XML)".format(pairs[0][1].display))
        return None
    if not pairs:
        raise ConfigError("stereo.calib is set but source {} has one view; use "
                          "stereo://?left=URI&right=URI (or leave stereo.calib out)".format(
                              ", ".join(source.display for _, source in sources)))
    if len(pairs) > 1:
        raise ConfigError("sources: cameras {} are stereo pairs, and stereo.calib calibrates "
                          "one; keep one stereo:// camera per daemon".format(
                              ", ".join(name for name, _ in pairs)))
    camera, source = pairs[0]
    calibration = calibrations.load(settings["calib"], config["max_image_pixels"])
    source.calibrate(calibration)
    return DepthTask(maker, calibration, settings, device=config["device_id"],
                     sync=not source.live, camera=camera)
