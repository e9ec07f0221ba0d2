"""Camera motion between frames, so that tracks follow a camera that pans, zooms or shakes.

The tracker's Kalman filter predicts each box in image coordinates as if the camera stood
still: on a robot, every turn of the camera becomes a prediction error and ids are lost.
Global motion compensation (BoT-SORT's GMC, Aharon et al. 2022) estimates the camera's
motion from one frame to the next and moves every track's state with it before association.

Per frame (`ImageMotion`): the frame is scaled down to about WORK_WIDTH pixels wide and made
grey; the corners found in the previous frame, away from the boxes detected there (objects
move on their own), are followed into this frame by pyramidal Lucas-Kanade optical flow, and
a similarity (shift, rotation, uniform scale) is fitted to them with RANSAC. A fit with too
few points or inliers, or an implausible one (a blank wall, a scene change), gives no motion
for that frame (counted as a failure): the tracker then predicts as for a still camera.

A robot that knows its camera's rotation (IMU, wheel odometry) may send it instead
(`RobotMotion`, fed by the `motion` topic): rotations of the camera dominate the image
motion of a scene farther away than the robot moves between frames.

A motion is a 2 x 3 float64 affine matrix mapping pixels of the previous frame to pixels of
this one (x' = A[:, :2] @ (x, y) + A[:, 2]); None means none known.
"""

import math
import threading
import time

import numpy as np

MODES = ("auto", "robot", "off")
WORK_WIDTH = 160         # pixels the flow runs at: 0.4 px of error there is 1.6 px at 640
MAX_CORNERS = 100
MIN_POINTS = 12          # corners followed, and RANSAC inliers, below which a fit fails
RANSAC_PX = 0.75         # inlier threshold, pixels at the working size
MAX_SCALE_STEP = 0.25    # a zoom of more than 25 % in one frame is no camera motion
ROBOT_FRESH_S = 0.5      # a robot's rotation older than this is not used


def identity():
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def apply(motion, points):
    """Points (n, 2) moved by `motion` (a new array)."""
    return points @ motion[:, :2].T + motion[:, 2]


def scale_of(motion):
    """The uniform scale of a similarity (or the mean scale of an affine)."""
    return math.sqrt(abs(motion[0, 0] * motion[1, 1] - motion[0, 1] * motion[1, 0]))


def describe(motion, width, height):
    """{dx, dy, scale, angle}: where the frame's centre moved (pixels), the zoom factor and
    the rotation (degrees, counter-clockwise in the picture) of a motion, for messages."""
    centre = np.array([[width * 0.5, height * 0.5]])
    moved = apply(motion, centre)[0] - centre[0]
    return {"dx": round(float(moved[0]), 2), "dy": round(float(moved[1]), 2),
            "scale": round(scale_of(motion), 5),
            "angle": round(math.degrees(math.atan2(-motion[1, 0], motion[0, 0])), 3)}


class ImageMotion:
    """The camera's motion from frame to frame, from the frames themselves (OpenCV: corners,
    pyramidal Lucas-Kanade flow, a RANSAC similarity), with fixed buffers per frame size."""

    def __init__(self):
        import cv2
        self.cv2 = cv2
        # One OpenCV thread for the process: on a picture of 160x120 its thread pool only
        # fights the inference engine for the cores. With the pool (2 threads on the 2-core
        # host) the pipeline ran at 0.76-0.78 of its untracked frames/s, with one at
        # 0.97-1.02 (alternating rounds; tracking without compensation 0.91-0.99). The price:
        # OpenCV's StereoSGBM (stereo depth without VPI) alone takes 52 ms a pair instead of
        # 30-38 (741x500, README: Camera motion compensation).
        cv2.setNumThreads(1)
        self._size = None
        self._small = self._grey = self._previous = self._mask = None
        self._points = None          # corners of the previous frame (k, 1, 2) float32
        self._factor = 1.0           # full-size pixels per working pixel

    def _ensure(self, width, height):
        if self._size == (width, height):
            return
        self._size = (width, height)
        self._factor = max(1.0, width / float(WORK_WIDTH))
        w = max(16, int(round(width / self._factor)))
        h = max(16, int(round(height / self._factor)))
        self._small = np.empty((h, w, 3), np.uint8)
        self._grey = np.empty((h, w), np.uint8)
        self._previous = np.empty((h, w), np.uint8)
        self._mask = np.empty((h, w), np.uint8)
        self._points = None

    def estimate(self, image, boxes):
        """The motion from the previous frame given to this one, to `image` (H, W, 3) BGR;
        None for the first frame and when no fit can be trusted. `boxes` (n, 4) x1, y1, x2,
        y2: this frame's detections, masked out of the corners the next frame follows."""
        cv2 = self.cv2
        height, width = image.shape[:2]
        self._ensure(width, height)
        small, grey = self._small, self._grey
        cv2.resize(image, (small.shape[1], small.shape[0]), dst=small,
                   interpolation=cv2.INTER_LINEAR)
        cv2.cvtColor(small, cv2.COLOR_BGR2GRAY, dst=grey)
        motion = None
        if self._points is not None:
            motion = self._fit(self._previous, grey, self._points)
        self._points = self._corners(grey, boxes)
        self._previous, self._grey = grey, self._previous     # swap: no copy
        return motion

    def _corners(self, grey, boxes):
        mask = self._mask
        mask.fill(255)
        if boxes.shape[0]:
            cells = np.round(boxes / self._factor).astype(np.int64)
            np.clip(cells, 0, max(mask.shape), out=cells)
            for x1, y1, x2, y2 in cells:
                mask[y1:y2 + 1, x1:x2 + 1] = 0
        points = self.cv2.goodFeaturesToTrack(grey, MAX_CORNERS, 0.01, 4, mask=mask,
                                              blockSize=3)
        if points is None or len(points) < 3 * MIN_POINTS:
            # objects fill the picture: corners on them beat too few (RANSAC keeps the
            # majority); with just MIN_POINTS outside them, RANSAC kept 5-11 inliers and the
            # fit failed (tools/bench_motion.py: 19 failures in 720 frames, none since)
            points = self.cv2.goodFeaturesToTrack(grey, MAX_CORNERS, 0.01, 4, blockSize=3)
        return points if points is not None and len(points) >= MIN_POINTS else None

    def _fit(self, previous, grey, points):
        cv2 = self.cv2
        moved, status, _ = cv2.calcOpticalFlowPyrLK(previous, grey, points, None,
                                                    winSize=(11, 11), maxLevel=2)
        good = status[:, 0] == 1
        if int(good.sum()) < MIN_POINTS:
            return None
        matrix, inliers = cv2.estimateAffinePartial2D(points[good], moved[good],
                                                      method=cv2.RANSAC,
                                                      ransacReprojThreshold=RANSAC_PX)
        if matrix is None or inliers is None or int(inliers.sum()) < MIN_POINTS:
            return None
        if abs(scale_of(matrix) - 1.0) > MAX_SCALE_STEP:
            return None
        f = self._factor                  # back to full-size pixels: only the shift scales
        matrix[:, 2] *= f
        return matrix


class RobotMotion:
    """The camera's rotation as the robot measures it, sent on the `motion` topic: angular
    velocity (rad/s) in the camera's optical frame (x right, y down, z forward, as ROS's
    `*_optical_frame`) and the focal length in pixels. Between two frames dt apart, a scene
    far away moves by (-f * wy * dt, f * wx * dt) pixels and turns by -wz * dt about the
    principal point (taken as the picture's centre)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latest = None          # (wx, wy, wz, focal_px, received monotonic)
        self.received = 0
        self.rejected = 0            # messages on its topic refused (edge.motioninput)
        self.last_error = None       # why the latest of them was refused, for people

    def put(self, wx, wy, wz, focal_px):
        with self._lock:
            self._latest = (wx, wy, wz, focal_px, time.monotonic())
            self.received += 1

    def reject(self, reason):
        """Count a message on this camera's `motion` topic that was refused, and why."""
        with self._lock:
            self.rejected += 1
            self.last_error = reason

    def motion(self, dt, width, height, now=None):
        """The motion over the last `dt` seconds; None without a fresh message."""
        with self._lock:
            latest = self._latest
        if latest is None or dt <= 0:
            return None
        wx, wy, wz, focal, at = latest
        if (time.monotonic() if now is None else now) - at > ROBOT_FRESH_S:
            return None
        turn = -wz * dt
        c, s = math.cos(turn), math.sin(turn)
        cx, cy = width * 0.5, height * 0.5
        # turn about the centre (y down: a positive turn is clockwise on the screen), shift
        return np.array([[c, -s, cx - c * cx + s * cy - focal * wy * dt],
                         [s, c, cy - s * cx - c * cy + focal * wx * dt]])


_robots = {}             # camera name (None: the unnamed camera) -> RobotMotion
_robots_lock = threading.Lock()


def robot_motion(camera):
    """The RobotMotion that the `motion` topic of a camera feeds, for this process (one per
    camera, kept across reloads like track ids)."""
    with _robots_lock:
        robot = _robots.get(camera)
        if robot is None:
            robot = _robots[camera] = RobotMotion()
        return robot


class CameraMotion:
    """One camera's motion source (`track.motion`) and its figures for health."""

    def __init__(self, mode, robot=None):
        if mode not in MODES:
            raise ValueError(mode)
        self.mode = mode
        self.robot = robot           # RobotMotion, or None where nothing sends
        self.image = ImageMotion() if mode == "auto" else None
        self.fits = 0                # frames with a motion (from either source)
        self.failures = 0            # frames the image gave no trusted fit
        self.from_robot = 0
        self._shift = 0.0            # sum of the centre's shifts, pixels
        self._ms = 0.0               # time spent estimating, ms
        self._estimated = 0
        self._last_ts = None
        self.last = None             # the last frame's motion, or None

    def estimate(self, frame, boxes):
        """This frame's motion (2 x 3) or None; `boxes` (n, 4): its detections."""
        if self.mode == "off":
            return None
        started = time.perf_counter()
        motion = None
        dt = None if self._last_ts is None else frame.ts - self._last_ts
        self._last_ts = frame.ts
        if self.robot is not None and dt is not None:
            motion = self.robot.motion(dt, frame.width, frame.height)
            if motion is not None:
                self.from_robot += 1
        if self.image is not None:
            # runs even when the robot's rotation is used, so that its corners stay current
            # for a frame the robot's messages stop
            found = self.image.estimate(frame.image, boxes)
            if motion is None:
                motion = found
                if found is None and dt is not None:
                    self.failures += 1
        if motion is not None:
            self.fits += 1
            centre = np.array([[frame.width * 0.5, frame.height * 0.5]])
            self._shift += float(np.hypot(*(apply(motion, centre)[0] - centre[0])))
        self._ms += (time.perf_counter() - started) * 1000.0
        self._estimated += 1
        self.last = motion
        return motion

    def summary(self):
        """For health: the mode, frames with a fit, failures, the mean shift and cost."""
        robot = self.robot
        return {"mode": self.mode, "fits": self.fits, "failures": self.failures,
                "from_robot": self.from_robot,
                "robot_messages": robot.received if robot is not None else 0,
                "robot_rejected": robot.rejected if robot is not None else 0,
                "mean_shift_px": round(self._shift / self.fits, 2) if self.fits else 0.0,
                "mean_ms": round(self._ms / self._estimated, 3) if self._estimated else 0.0}
