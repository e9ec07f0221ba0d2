"""Disparity estimators: a rectified grey pair in, a fixed-point disparity map out.

Each estimator registers itself by name and writes into a preallocated int16 (H, W) buffer
whose value is disparity * `scale_inverse` (StereoSGBM: 1/16 px; VPI: Q10.5, 1/32 px), and
says which raw values mean "no disparity" (`lowest_valid`): the conversion to depth
(edge.stereo.conversion) takes both as constants of its graph. `auto` picks VPI's CUDA
estimator where `import vpi` works (a Jetson with JetPack's VPI), else OpenCV's StereoSGBM
(everywhere).
"""

import logging

import numpy as np

from edge.errors import ConfigError

logger = logging.getLogger(__name__)

_ESTIMATORS = {}


def register(name):
    """Class decorator: register an estimator under `name` (config stereo.disparity)."""
    def wrap(cls):
        _ESTIMATORS[name] = cls
        cls.name = name
        return cls
    return wrap


class Estimator:
    """Fills an int16 disparity map from a rectified grey (H, W) uint8 pair, left as reference."""

    name = None
    scale_inverse = 16       # raw value = disparity (px) * scale_inverse
    tested = True

    def __init__(self, width, height, min_disparity=0, num_disparities=64, block_size=5):
        self.width = width
        self.height = height
        self.min_disparity = min_disparity
        self.num_disparities = num_disparities
        self.block_size = block_size

    @property
    def lowest_valid(self):
        """The smallest raw value that is a disparity (smaller ones mean unknown)."""
        return self.min_disparity * self.scale_inverse

    @classmethod
    def available(cls):
        """None when usable here, else the reason it is not."""
        return None

    def compute(self, left, right, out):
        """Write the raw disparity of the pair into `out` (int16, H x W)."""
        raise NotImplementedError

    def describe(self):
        return "{} ({} disparities from {}, block {})".format(
            self.name, self.num_disparities, self.min_disparity, self.block_size)


@register("sgbm")
class SgbmEstimator(Estimator):
    """OpenCV's semi-global block matching (Hirschmüller 2008), three-way variant.

    MODE_SGBM_3WAY: on the Middlebury motorcycle pair as accurate as the full 5-direction
    SGBM (density 0.84, median error 0.25 % against 0.28 %) in half the time.
    """

    def __init__(self, width, height, min_disparity=0, num_disparities=64, block_size=5):
        super().__init__(width, height, min_disparity, num_disparities, block_size)
        import cv2
        area = block_size * block_size
        # P1/P2: the smoothness penalties OpenCV's documentation recommends for grey images.
        self.matcher = cv2.StereoSGBM_create(
            minDisparity=min_disparity, numDisparities=num_disparities, blockSize=block_size,
            P1=8 * area, P2=32 * area, disp12MaxDiff=1, uniquenessRatio=10,
            speckleWindowSize=100, speckleRange=2, preFilterCap=63,
            mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY)

    def compute(self, left, right, out):
        result = self.matcher.compute(left, right, out)
        if result is not out:     # older bindings return a new array instead of filling `out`
            np.copyto(out, result)


@register("vpi")
class VpiEstimator(Estimator):
    """VPI's CUDA stereo disparity estimator (census + semi-global matching), on a Jetson.

    UNTESTED: CI has no Jetson; written against VPI 1.1's Python API (JetPack 4.6:
    `vpi.asimage`, `Image.convert`, `vpi.stereodisp(left, right, window=, maxdisp=)`, Q10.5
    output where 0 is "no disparity"). Check it with `edge depth --backend trt` on the device
    before relying on it, as the TensorRT path was.
    """

    scale_inverse = 32
    tested = False

    def __init__(self, width, height, min_disparity=0, num_disparities=64, block_size=5):
        super().__init__(width, height, min_disparity, num_disparities, block_size)
        import vpi
        self.vpi = vpi
        if min_disparity:
            raise ConfigError("stereo.min_disparity: VPI's estimator searches from 0; set it "
                              "to 0 or use stereo.disparity: sgbm")

    @property
    def lowest_valid(self):
        return 1      # VPI writes 0 where the confidence is too low

    @classmethod
    def available(cls):
        try:
            import vpi  # noqa: F401
        except ImportError as e:
            return "vpi is not installed ({}); it comes with JetPack on a Jetson".format(e)
        return None

    def compute(self, left, right, out):
        vpi = self.vpi
        with vpi.Backend.CUDA:
            pair = [vpi.asimage(image).convert(vpi.Format.Y16_ER, scale=1)
                    for image in (left, right)]
            disparity = vpi.stereodisp(pair[0], pair[1], window=self.block_size,
                                       maxdisp=self.num_disparities)
        np.copyto(out, disparity.cpu(), casting="unsafe")


def names():
    """The names config stereo.disparity accepts."""
    return ("auto",) + tuple(sorted(_ESTIMATORS))


def resolve(name):
    """The estimator `name` stands for here (`auto`: vpi where it imports, else sgbm);
    ConfigError when it is unknown or cannot run."""
    if name == "auto":
        name = "vpi" if VpiEstimator.available() is None else "sgbm"
    cls = _ESTIMATORS.get(name)
    if cls is None:
        raise ConfigError("stereo.disparity: {!r} is not an estimator; use one of {}".format(
            name, ", ".join(names())))
    reason = cls.available()
    if reason is not None:
        raise ConfigError("stereo.disparity: {} cannot run here: {}; use sgbm".format(
            name, reason))
    return name


def create(name, width, height, min_disparity=0, num_disparities=64, block_size=5):
    """The estimator `name` (or `auto`) for frames of width x height."""
    cls = _ESTIMATORS[resolve(name)]
    if not cls.tested:
        logger.warning("disparity estimator %s is untested (no Jetson in CI); compare its "
                       "output with stereo.disparity: sgbm before relying on it", cls.name)
    return cls(width, height, min_disparity, num_disparities, block_size)
