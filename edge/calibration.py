"""Stereo calibration: what turns a disparity into millimetres, and the rectification maps.

Two file formats, chosen by content:
- Middlebury 2014 `calib.txt` (`cam0=[f 0 cx; 0 f cy; 0 0 1]`, `cam1=...`, `doffs`,
  `baseline` in mm, `width`, `height`): a pair that is already rectified, so no maps.
- OpenCV's stereo calibration as written by cv::FileStorage (YAML or XML): `K1`, `D1`, `K2`,
  `D2` (or `M1`/`M2`), `R`, `T` (in mm) and the image size (`image_width` + `image_height`, or
  `image_size: [w, h]`): raw cameras. `cv2.stereoRectify` and `initUndistortRectifyMap` run
  once here; the stereo source remaps every frame through the maps.

After rectification both cameras share the focal length f and the row of every point;
the left camera's principal point is (cx, cy) and the right one's is (cx + doffs, cy), so a
disparity d (pixels) is at depth Z = f * B / (d + doffs) mm, in the left camera's optical
frame (x right, y down, z forward). Anything missing or inconsistent is one ConfigError
naming the file and the fix.
"""

import logging
import os
import re

import numpy as np

from edge.errors import ConfigError

logger = logging.getLogger(__name__)

# A rectified pair has one focal length and one principal row; more apart than this (px) is
# a calibration of something else.
TOLERANCE_PX = 1.0


class StereoCalibration:
    """A rectified stereo geometry: focal length, principal point, baseline, doffs, size."""

    def __init__(self, path, width, height, focal, cx, cy, baseline_mm, doffs=0.0, maps=None,
                 ndisp=None):
        self.path = path
        self.width = int(width)
        self.height = int(height)
        self.focal = float(focal)          # px, of the rectified left camera (fx = fy)
        self.cx = float(cx)                # px
        self.cy = float(cy)                # px
        self.baseline_mm = float(baseline_mm)
        self.doffs = float(doffs)          # px: right cx minus left cx
        self.maps = maps                   # None, or ((m1, m2) left, (m1, m2) right) for remap
        self.ndisp = ndisp                 # the file's disparity bound, when it gives one

    @property
    def size(self):
        """(width, height) of the frames this calibration is for."""
        return self.width, self.height

    @property
    def focal_baseline(self):
        """f * B in px * mm: depth Z = focal_baseline / (d + doffs)."""
        return self.focal * self.baseline_mm

    def check_size(self, width, height, what):
        """ConfigError unless frames of `what` are the calibration's size."""
        if (width, height) != self.size:
            raise ConfigError(
                "calibration {}: it is for {}x{} frames but {} delivers {}x{}; calibrate at "
                "the camera's resolution or set the source's size to {}x{}".format(
                    self.path, self.width, self.height, what, width, height, self.width,
                    self.height))

    def point(self, u, v, z):
        """(x, y, z) mm in the left camera's optical frame of pixel (u, v) at depth z mm."""
        return (u - self.cx) * z / self.focal, (v - self.cy) * z / self.focal, z

    def describe(self):
        return "{}x{}, f {:.1f} px, baseline {:.1f} mm, doffs {:.1f} px{}".format(
            self.width, self.height, self.focal, self.baseline_mm, self.doffs,
            ", rectification maps" if self.maps else "")


def load(path):
    """The StereoCalibration in `path` (Middlebury calib.txt or OpenCV YAML/XML)."""
    if not path:
        raise ConfigError("stereo.calib: no calibration file given; set stereo.calib (or "
                          "--calib) to a Middlebury calib.txt or an OpenCV stereo YAML/XML")
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise ConfigError("calibration {}: file not found; check stereo.calib (or --calib)"
                          .format(path)) from None
    except OSError as e:
        raise ConfigError("calibration {}: cannot be read ({}); check its permissions".format(
            path, e.strerror)) from None
    text = head.decode("utf-8", "replace")
    if re.search(r"^\s*cam0\s*=", text, re.M):
        calibration = _middlebury(path)
    elif text.lstrip().startswith(("%YAML", "<?xml", "<opencv_storage")) or \
            path.lower().endswith((".yaml", ".yml", ".xml")):
        calibration = _opencv(path)
    else:
        raise ConfigError("calibration {}: neither a Middlebury calib.txt (cam0=..., cam1=..., "
                          "baseline=...) nor an OpenCV FileStorage YAML/XML (K1, D1, K2, D2, R, "
                          "T); give one of those".format(path))
    logger.info("calibration %s: %s", path, calibration.describe())
    return calibration


# -- Middlebury 2014 ---------------------------------------------------------------------

def _middlebury(path):
    values = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ConfigError("calibration {} line {}: expected key=value (got {!r})".format(
                    path, number, line[:60]))
            key, value = (part.strip() for part in line.split("=", 1))
            values[key] = value
    for key in ("cam0", "baseline", "width", "height"):
        if key not in values:
            raise ConfigError("calibration {}: {} is missing; a Middlebury calib.txt has cam0, "
                              "cam1, doffs, baseline, width and height".format(path, key))
    cam0 = _matrix(path, "cam0", values["cam0"])
    cam1 = _matrix(path, "cam1", values["cam1"]) if "cam1" in values else None
    baseline = _number(path, "baseline", values["baseline"])
    width = _number(path, "width", values["width"])
    height = _number(path, "height", values["height"])
    if "doffs" in values:
        doffs = _number(path, "doffs", values["doffs"])
    elif cam1 is not None:
        doffs = cam1[0, 2] - cam0[0, 2]
    else:
        raise ConfigError("calibration {}: neither doffs nor cam1 is given; add doffs (the "
                          "x difference of the principal points)".format(path))
    if cam1 is not None:
        checks = (("cam1's cx - cam0's cx", cam1[0, 2] - cam0[0, 2], doffs, "doffs"),
                  ("cam1's focal length", cam1[0, 0], cam0[0, 0], "cam0's"),
                  ("cam1's cy", cam1[1, 2], cam0[1, 2], "cam0's"))
        for what, got, want, against in checks:
            if abs(got - want) > TOLERANCE_PX:
                raise ConfigError("calibration {}: inconsistent: {} is {:g} but {} is {:g}; a "
                                  "rectified pair shares its focal length and rows, and doffs "
                                  "is cam1's cx - cam0's cx".format(path, what, got, against,
                                                                    want))
    ndisp = int(_number(path, "ndisp", values["ndisp"])) if "ndisp" in values else None
    return _checked(path, StereoCalibration(path, width, height, cam0[0, 0], cam0[0, 2],
                                            cam0[1, 2], baseline, doffs, ndisp=ndisp),
                    cam0[1, 1])


def _matrix(path, key, text):
    rows = [row.split() for row in text.strip().strip("[]").split(";")]
    try:
        matrix = np.array([[float(v) for v in row] for row in rows], np.float64)
    except ValueError:
        matrix = None
    if matrix is None or matrix.shape != (3, 3):
        raise ConfigError("calibration {}: {} must be a 3x3 matrix as [f 0 cx; 0 f cy; 0 0 1] "
                          "(got {!r})".format(path, key, text[:80]))
    return matrix


def _number(path, key, text):
    try:
        return float(text)
    except ValueError:
        raise ConfigError("calibration {}: {} must be a number (got {!r})".format(
            path, key, text[:40])) from None


# -- OpenCV FileStorage ------------------------------------------------------------------

def _opencv(path):
    import cv2
    try:
        storage = cv2.FileStorage(path, cv2.FILE_STORAGE_READ)
    except (cv2.error, SystemError) as e:   # some builds wrap the parse error in SystemError
        raise ConfigError("calibration {}: OpenCV cannot parse it ({}); write it with "
                          "cv::FileStorage (YAML or XML)".format(
                              path, _cv_reason(e))) from None
    try:
        if not storage.isOpened():
            raise ConfigError("calibration {}: OpenCV cannot open it as YAML/XML".format(path))
        k1 = _mat(storage, path, ("K1", "M1"), (3, 3))
        k2 = _mat(storage, path, ("K2", "M2"), (3, 3))
        d1 = _mat(storage, path, ("D1",), None)
        d2 = _mat(storage, path, ("D2",), None)
        r = _mat(storage, path, ("R",), (3, 3))
        t = _mat(storage, path, ("T",), None).reshape(-1)
        width, height = _image_size(storage, path)
    finally:
        storage.release()
    if t.size != 3:
        raise ConfigError("calibration {}: T must hold 3 numbers (the right camera's "
                          "translation in mm)".format(path))
    if float(np.linalg.norm(t)) == 0.0:
        raise ConfigError("calibration {}: zero baseline (T is all zeros); recalibrate the "
                          "pair".format(path))
    size = (int(width), int(height))
    try:
        # alpha=0: only valid pixels in the rectified images; principal points made equal
        # (CALIB_ZERO_DISPARITY), so doffs is 0.
        r1, r2, p1, p2, _, _, _ = cv2.stereoRectify(k1, d1, k2, d2, size, r, t.reshape(3, 1),
                                                    flags=cv2.CALIB_ZERO_DISPARITY, alpha=0)
        maps = tuple(cv2.initUndistortRectifyMap(k, d, rect, p, size, cv2.CV_16SC2)
                     for k, d, rect, p in ((k1, d1, r1, p1), (k2, d2, r2, p2)))
    except cv2.error as e:
        raise ConfigError("calibration {}: OpenCV cannot rectify with it ({}); check K1, D1, "
                          "K2, D2, R and T".format(path, _cv_reason(e))) from None
    # P2 = [f 0 cx2 Tx*f; 0 f cy 0; 0 0 1 0]: the baseline is -Tx (T's units: mm).
    baseline = abs(p2[0, 3] / p2[0, 0])
    if abs(p1[1, 2] - p2[1, 2]) > TOLERANCE_PX or abs(t[0]) < abs(t[1]):
        raise ConfigError("calibration {}: the cameras are not side by side (T = {}); edge "
                          "needs a horizontal stereo pair, left camera first".format(
                              path, [round(float(v), 2) for v in t]))
    return _checked(path, StereoCalibration(path, width, height, p1[0, 0], p1[0, 2], p1[1, 2],
                                            baseline, p2[0, 2] - p1[0, 2], maps=maps),
                    p1[1, 1])


def _cv_reason(error):
    # A SystemError carries the cv2.error as its cause. cv2.error's text is "OpenCV(v) file:line:
    # error: (code:kind) what in function 'where'"; the parser puts the file, line and reason
    # in `where`, other functions their name.
    error = error.__cause__ or error
    text = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    match = re.search(r"error: \([^)]*\) (.*?) in function '(.*)'", text)
    if match:
        text = match.group(2) if "(" in match.group(2) else match.group(1)
    return text[:160]


def _mat(storage, path, keys, shape):
    for key in keys:
        node = storage.getNode(key)
        if not node.empty():
            matrix = node.mat()
            if matrix is None:
                raise ConfigError("calibration {}: {} is not an opencv-matrix".format(path, key))
            matrix = np.asarray(matrix, np.float64)
            if shape is not None and matrix.shape != shape:
                raise ConfigError("calibration {}: {} must be {}x{} (got {})".format(
                    path, key, shape[0], shape[1], "x".join(str(v) for v in matrix.shape)))
            return matrix
    raise ConfigError("calibration {}: {} is missing; an OpenCV stereo calibration holds K1, "
                      "D1, K2, D2, R, T and the image size".format(path, " or ".join(keys)))


def _image_size(storage, path):
    node = storage.getNode("image_size")
    if node.isSeq() and node.size() == 2:
        return node.at(0).real(), node.at(1).real()
    if not node.empty() and node.mat() is not None and node.mat().size == 2:
        return tuple(float(v) for v in node.mat().reshape(-1))
    width, height = storage.getNode("image_width"), storage.getNode("image_height")
    if not width.empty() and not height.empty():
        return width.real(), height.real()
    raise ConfigError("calibration {}: the image size is missing; add image_width and "
                      "image_height (or image_size: [w, h])".format(path))


def _checked(path, calibration, fy):
    c = calibration
    if c.baseline_mm <= 0:
        raise ConfigError("calibration {}: zero baseline; the baseline is the distance between "
                          "the cameras in mm and must be > 0".format(path))
    if c.focal <= 0 or abs(fy - c.focal) > TOLERANCE_PX:
        raise ConfigError("calibration {}: inconsistent focal length (fx {:g}, fy {:g}); a "
                          "rectified camera has fx = fy > 0".format(path, c.focal, fy))
    if c.width <= 0 or c.height <= 0 or c.width != int(c.width):
        raise ConfigError("calibration {}: image size {}x{} is not valid".format(
            path, c.width, c.height))
    if not (0 <= c.cx <= c.width and 0 <= c.cy <= c.height):
        raise ConfigError("calibration {}: the principal point ({:g}, {:g}) lies outside the "
                          "{}x{} image; check the size and the camera matrix".format(
                              path, c.cx, c.cy, c.width, c.height))
    return calibration
