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
frame (x right, y down, z forward). Anything missing, inconsistent, not a finite number or
beyond what a camera pair can be (the bounds below) is one ConfigError naming the file, the
key and the fix; the image size is checked against max_image_pixels before anything of that
size is allocated (OpenCV's remap tables take 12 bytes a pixel).
"""

import logging
import math
import os
import re

import numpy as np

from edge import imagefiles
from edge.errors import ConfigError

logger = logging.getLogger(__name__)

# A rectified pair has one focal length and one principal row; more apart than this (px) is
# a calibration of something else.
TOLERANCE_PX = 1.0
# A calibration is a few matrices: a few KB. More than this is another file (or an attack on
# the parser's memory).
MAX_FILE_BYTES = 1 << 20
# The distance between the cameras (mm). Under 1 mm is a baseline written in metres (0.12 for
# 120 mm: every depth would be 1000 times too near, below depth_min_mm); over 100 m is no
# pair a Jetson runs.
MIN_BASELINE_MM, MAX_BASELINE_MM = 1.0, 1e5
# The horizontal field of view the focal length gives over the image width (degrees): a lens
# sees more than 1 and less than 179 degrees.
MIN_FOV_DEG, MAX_FOV_DEG = 1.0, 179.0
# Largest side of a matrix in the file (K, R: 3x3; D: up to 1x14; T: 3x1), checked before
# OpenCV allocates what its rows and cols say.
MAX_MATRIX_SIDE = 16


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


def load(path, max_pixels=None, maps=True):
    """The StereoCalibration in `path` (Middlebury calib.txt or OpenCV YAML/XML).

    `max_pixels`: config `max_image_pixels`; a calibration for larger frames is refused.
    `maps=False` checks an OpenCV calibration without making its remap tables (a reload's
    check while the running pipeline holds its own).
    """
    max_pixels = max_pixels or imagefiles.DEFAULT_MAX_PIXELS
    if not path:
        raise ConfigError("stereo.calib: no calibration file given; set stereo.calib (or "
                          "--calib) to a Middlebury calib.txt or an OpenCV stereo YAML/XML")
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise ConfigError("calibration {}: file not found; check stereo.calib (or --calib)"
                          .format(path)) from None
    except OSError as e:
        raise ConfigError("calibration {}: cannot be read ({}); check its permissions".format(
            path, e.strerror)) from None
    if size > MAX_FILE_BYTES:
        raise ConfigError("calibration {}: {} bytes, and a calibration is a few KB (at most "
                          "{}); check stereo.calib (or --calib) names the calibration".format(
                              path, size, MAX_FILE_BYTES))
    text = head.decode("utf-8", "replace")
    if re.search(r"^\s*cam0\s*=", text, re.M):
        calibration = _middlebury(path, max_pixels)
    elif text.lstrip().startswith(("%YAML", "<?xml", "<opencv_storage")) or \
            path.lower().endswith((".yaml", ".yml", ".xml")):
        calibration = _opencv(path, max_pixels, maps)
    else:
        raise ConfigError("calibration {}: neither a Middlebury calib.txt (cam0=..., cam1=..., "
                          "baseline=...) nor an OpenCV FileStorage YAML/XML (K1, D1, K2, D2, R, "
                          "T); give one of those".format(path))
    logger.info("calibration %s: %s", path, calibration.describe())
    return calibration


# -- Middlebury 2014 ---------------------------------------------------------------------

MIDDLEBURY_KEYS = {"size": "width and height", "focal": "cam0's f", "baseline": "baseline"}


def _middlebury(path, max_pixels):
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
    width, height = _size(path, _number(path, "width", values["width"]),
                          _number(path, "height", values["height"]), max_pixels,
                          MIDDLEBURY_KEYS["size"])
    cam0 = _matrix(path, "cam0", values["cam0"])
    cam1 = _matrix(path, "cam1", values["cam1"]) if "cam1" in values else None
    baseline = _number(path, "baseline", values["baseline"])
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
    ndisp = None
    if "ndisp" in values:
        ndisp = _number(path, "ndisp", values["ndisp"])
        if ndisp != int(ndisp) or not 1 <= ndisp <= width:
            raise ConfigError("calibration {}: ndisp {:g} is not a disparity range of these "
                              "frames; it is a whole number of pixels from 1 to the width "
                              "({})".format(path, ndisp, width))
        ndisp = int(ndisp)
    return _checked(path, StereoCalibration(path, width, height, cam0[0, 0], cam0[0, 2],
                                            cam0[1, 2], baseline, doffs, ndisp=ndisp),
                    cam0[1, 1], MIDDLEBURY_KEYS)


def _matrix(path, key, text):
    rows = [row.split() for row in text.strip().strip("[]").split(";")]
    try:
        matrix = np.array([[float(v) for v in row] for row in rows], np.float64)
    except ValueError:
        matrix = None
    if matrix is None or matrix.shape != (3, 3):
        raise ConfigError("calibration {}: {} must be a 3x3 matrix as [f 0 cx; 0 f cy; 0 0 1] "
                          "(got {!r})".format(path, key, text[:80]))
    if not np.isfinite(matrix).all():
        raise ConfigError("calibration {}: {} must hold finite numbers, no nan or inf (got "
                          "{!r})".format(path, key, text[:80]))
    return matrix


def _number(path, key, text):
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("calibration {}: {} must be a number (got {!r})".format(
            path, key, text[:40])) from None
    if not math.isfinite(value):
        raise ConfigError("calibration {}: {} must be a finite number (got {!r})".format(
            path, key, text[:40]))
    return value


def _size(path, width, height, max_pixels, keys):
    """(width, height) as ints: whole numbers >= 1, at most `max_pixels` together; checked
    before anything of that size is made."""
    if not (math.isfinite(width) and math.isfinite(height)) or width != int(width) or \
            height != int(height) or width < 1 or height < 1:
        raise ConfigError("calibration {}: image size {:g}x{:g} is not valid; {} are whole "
                          "numbers of pixels, 1 or more".format(path, width, height, keys))
    width, height = int(width), int(height)
    if width * height > max_pixels:
        raise ConfigError("calibration {}: image size {}x{} is {} pixels, over "
                          "max_image_pixels ({}); check {}, or raise max_image_pixels for a "
                          "camera that large".format(path, width, height, width * height,
                                                     max_pixels, keys))
    return width, height


# -- OpenCV FileStorage ------------------------------------------------------------------

OPENCV_KEYS = {"size": "image_width and image_height", "focal": "K1 and K2", "baseline": "T"}


def _opencv(path, max_pixels, make_maps=True):
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
        width, height = _size(path, *_image_size(storage, path), max_pixels=max_pixels,
                              keys=OPENCV_KEYS["size"])
        k1 = _mat(storage, path, ("K1", "M1"), (3, 3))
        k2 = _mat(storage, path, ("K2", "M2"), (3, 3))
        d1 = _mat(storage, path, ("D1",), None)
        d2 = _mat(storage, path, ("D2",), None)
        r = _mat(storage, path, ("R",), (3, 3))
        t = _mat(storage, path, ("T",), None).reshape(-1)
    finally:
        storage.release()
    if t.size != 3:
        raise ConfigError("calibration {}: T must hold 3 numbers (the right camera's "
                          "translation in mm)".format(path))
    if np.abs(r.T.dot(r) - np.eye(3)).max() > 1e-2 or np.linalg.det(r) < 0:
        raise ConfigError("calibration {}: R is not a rotation (R^T R must be the identity, "
                          "det R = 1); write the R that stereoCalibrate returned".format(path))
    if np.abs(t).max() > MAX_BASELINE_MM:
        raise ConfigError("calibration {}: baseline {:g} mm (T): more than {:g} m between "
                          "the cameras; T is in millimetres".format(
                              path, float(np.abs(t).max()), MAX_BASELINE_MM / 1000))
    if float(np.linalg.norm(t)) == 0.0:
        raise ConfigError("calibration {}: zero baseline (T is all zeros); recalibrate the "
                          "pair".format(path))
    size = (width, height)
    try:
        # alpha=0: only valid pixels in the rectified images; principal points made equal
        # (CALIB_ZERO_DISPARITY), so doffs is 0.
        r1, r2, p1, p2, _, _, _ = cv2.stereoRectify(k1, d1, k2, d2, size, r, t.reshape(3, 1),
                                                    flags=cv2.CALIB_ZERO_DISPARITY, alpha=0)
        if not (np.isfinite(p1).all() and np.isfinite(p2).all() and p2[0, 0] != 0):
            raise ConfigError("calibration {}: OpenCV cannot rectify with it (the rectified "
                              "projections are not finite); check K1, D1, K2, D2, R and "
                              "T".format(path))
        maps = None
        if make_maps:
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
                    p1[1, 1], OPENCV_KEYS)


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
            matrix = _read_mat(node, path, key)
            if shape is not None and matrix.shape != shape:
                raise ConfigError("calibration {}: {} must be {}x{} (got {})".format(
                    path, key, shape[0], shape[1], "x".join(str(v) for v in matrix.shape)))
            return matrix
    raise ConfigError("calibration {}: {} is missing; an OpenCV stereo calibration holds K1, "
                      "D1, K2, D2, R, T and the image size".format(path, " or ".join(keys)))


def _read_mat(node, path, key):
    """An opencv-matrix node as float64 (rows, cols), finite. Its rows and cols are checked
    against its data before OpenCV reads it: OpenCV allocates what they say first (100000 x
    100000: 80 GB) and asserts the count after."""
    import cv2
    rows, cols, data = (node.getNode(k) for k in ("rows", "cols", "data")) if node.isMap() \
        else (None, None, None)
    if rows is None or rows.empty() or cols.empty() or not data.isSeq():
        raise ConfigError("calibration {}: {} is not an opencv-matrix (rows, cols, dt, data); "
                          "write it with cv::FileStorage".format(path, key))
    r, c, count = rows.real(), cols.real(), data.size()
    if not (math.isfinite(r) and math.isfinite(c)) or r != int(r) or c != int(c) or \
            not (1 <= r <= MAX_MATRIX_SIDE and 1 <= c <= MAX_MATRIX_SIDE):
        raise ConfigError("calibration {}: {}: {:g}x{:g} is not the size of a calibration "
                          "matrix (1 to {} rows and columns)".format(path, key, r, c,
                                                                      MAX_MATRIX_SIDE))
    if int(r) * int(c) != count:
        raise ConfigError("calibration {}: {}: {}x{} does not match its {} numbers; rows, "
                          "cols and data must agree".format(path, key, int(r), int(c), count))
    try:
        matrix = node.mat()
    except (cv2.error, SystemError) as e:
        raise ConfigError("calibration {}: {}: OpenCV cannot read it ({})".format(
            path, key, _cv_reason(e))) from None
    if matrix is None:
        raise ConfigError("calibration {}: {} is not an opencv-matrix".format(path, key))
    matrix = np.asarray(matrix, np.float64)
    if not np.isfinite(matrix).all():
        raise ConfigError("calibration {}: {} must hold finite numbers, no .nan or .inf".format(
            path, key))
    return matrix


def _image_size(storage, path):
    """(width, height) as the file gives them (floats, checked by _size)."""
    node = storage.getNode("image_size")
    if node.isSeq() and node.size() == 2:
        return node.at(0).real(), node.at(1).real()
    if not node.empty():
        matrix = _read_mat(node, path, "image_size") if node.isMap() else None
        if matrix is None or matrix.size != 2:
            raise ConfigError("calibration {}: image_size must be [width, height]".format(path))
        return tuple(float(v) for v in matrix.reshape(-1))
    width, height = storage.getNode("image_width"), storage.getNode("image_height")
    if not width.empty() and not height.empty():
        return width.real(), height.real()
    raise ConfigError("calibration {}: the image size is missing; add image_width and "
                      "image_height (or image_size: [w, h])".format(path))


def _checked(path, calibration, fy, keys):
    """The calibration, unless a value is beyond what a camera pair can be; `keys` names
    the file's keys in the messages."""
    c = calibration
    if not math.isfinite(c.baseline_mm):
        raise ConfigError("calibration {}: the baseline is not a finite number; check "
                          "{}".format(path, keys["baseline"]))
    if c.baseline_mm == 0:
        raise ConfigError("calibration {}: zero baseline; the baseline is the distance between "
                          "the cameras in mm and must be > 0".format(path))
    if c.baseline_mm < 0:
        raise ConfigError("calibration {}: baseline {:g} mm; the distance between the cameras "
                          "is > 0".format(path, c.baseline_mm))
    if c.baseline_mm < MIN_BASELINE_MM:
        raise ConfigError("calibration {}: baseline {:g} mm; {} is in millimetres, and two "
                          "cameras are more than {:g} mm apart (was it written in metres? "
                          "{:g} m is {:g} mm)".format(path, c.baseline_mm, keys["baseline"],
                                                      MIN_BASELINE_MM, c.baseline_mm,
                                                      c.baseline_mm * 1000))
    if c.baseline_mm > MAX_BASELINE_MM:
        raise ConfigError("calibration {}: baseline {:g} mm: more than {:g} m between the "
                          "cameras; {} is in millimetres".format(
                              path, c.baseline_mm, MAX_BASELINE_MM / 1000, keys["baseline"]))
    if not c.focal > 0 or abs(fy - c.focal) > TOLERANCE_PX:
        raise ConfigError("calibration {}: inconsistent focal length (fx {:g}, fy {:g}); a "
                          "rectified camera has fx = fy > 0".format(path, c.focal, fy))
    fov = math.degrees(2 * math.atan(c.width / (2.0 * c.focal)))
    if not MIN_FOV_DEG <= fov <= MAX_FOV_DEG:
        raise ConfigError("calibration {}: focal length {:g} px gives a {:.3g} degree field of "
                          "view over {} px, and a lens sees {:g} to {:g}; check {} (in "
                          "pixels)".format(path, c.focal, fov, c.width, MIN_FOV_DEG,
                                           MAX_FOV_DEG, keys["focal"]))
    if not abs(c.doffs) <= c.width:
        raise ConfigError("calibration {}: doffs {:g} px puts the right camera's principal "
                          "point outside its {} px wide image; doffs is cam1's cx - cam0's cx, "
                          "between -{} and {}".format(path, c.doffs, c.width, c.width, c.width))
    if not (0 <= c.cx <= c.width and 0 <= c.cy <= c.height):
        raise ConfigError("calibration {}: the principal point ({:g}, {:g}) lies outside the "
                          "{}x{} image; check the size and the camera matrix".format(
                              path, c.cx, c.cy, c.width, c.height))
    return calibration
