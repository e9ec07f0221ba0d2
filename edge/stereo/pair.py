"""The depth map of one stereo pair of image files, written to .npy or .png (`edge depth`)."""

import os

from edge.errors import ConfigError


def depth_map(cfg, left, right, out):
    """Compute the depth of the pair `left`, `right` (image files) with the configuration's
    stereo settings and calibration, write it to `out`; the line that reports it."""
    from urllib.parse import urlencode
    import numpy as np
    from edge import daemon, sources
    from edge.stereo import calibration, conversion
    for path in (left, right):
        if not os.path.isfile(path):
            raise ConfigError("edge depth: {} is not an image file; give the left and the right "
                              "image of one pair".format(path))
    if not out.lower().endswith((".npy", ".png")):
        raise ConfigError("--out {}: use a .npy (float32 mm, NaN unknown) or .png (16-bit mm, "
                          "0 unknown) name".format(out))
    calib = calibration.load(cfg["stereo"]["calib"], cfg["max_image_pixels"])
    source = sources.open_source("stereo://?" + urlencode({"left": left, "right": right}),
                                 cfg["max_image_pixels"])
    source.calibrate(calib)
    frame = sources.first_frame(source)
    if frame is None:
        raise ConfigError("edge depth: {} and {} gave no pair of images".format(left, right))
    maker = daemon.engine_maker(cfg)
    stereo = conversion.StereoDepth(calib, maker, frame.width, frame.height, cfg["stereo"])
    slot = stereo.slot()
    matched_ms, converted_ms = stereo.compute(frame.image, frame.right, slot)
    known = slot.depth > 0
    path = conversion.save(out, slot.depth)
    return ("{}: {}x{}, {:.1%} of pixels with a depth, median {} mm; disparity {:.1f} ms ({}), "
            "conversion {:.1f} ms ({})".format(
                path, frame.width, frame.height, known.mean(),
                int(round(float(np.median(slot.depth[known])))) if known.any() else "-",
                matched_ms, stereo.estimator.name, converted_ms, stereo.method))
