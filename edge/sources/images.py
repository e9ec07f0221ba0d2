"""images:// - a folder of images, read in name order; each frame carries its file name.

A plain path to one image file is a folder of one.

`images:///data/shots` or a plain folder path; `?loop=1` starts over after the last image.
A folder is finite: the pipeline never drops its frames. Files that cannot be decoded, and
images larger than `max_image_pixels` (known from their header, before decoding: a small PNG
may hold gigabytes of pixels) are skipped with one warning each (once per file when looping)
and counted in `skipped`.
"""

import logging
import os
import time

import numpy as np

from edge import imagefiles
from edge.errors import SourceError
from edge.sources import Source, register
from edge.sources.pattern import check_params, int_param

logger = logging.getLogger(__name__)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@register("images")
class ImageFolderSource(Source):
    """The images of one folder, sorted by file name."""

    live = False

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        check_params(self, ("loop",))
        self.loop = bool(int_param(self, "loop", 0, 0, 1))
        self.folder = location
        self.paths = []
        self.skipped = 0
        self._bad = set()          # paths that did not decode (looping folders log them once)
        self._next = 0
        self._index = 0
        self._delivered_this_pass = 0

    def open(self):
        """List the folder; SourceError when it is missing or holds no images."""
        if os.path.isfile(self.folder) and self.folder.lower().endswith(EXTENSIONS):
            self.paths = [self.folder]      # a single image file: a folder of one
            self._next = 0
            self._delivered_this_pass = 0
            return
        try:
            names = sorted(os.listdir(self.folder))
        except FileNotFoundError:
            raise SourceError("image folder {} does not exist; check the --source path".format(
                self.shown(self.folder))) from None
        except OSError as exc:
            raise SourceError("image folder {} cannot be read ({}); check its permissions".format(
                self.shown(self.folder), exc.strerror)) from None
        self.paths = [os.path.join(self.folder, name) for name in names
                      if name.lower().endswith(EXTENSIONS)
                      and os.path.isfile(os.path.join(self.folder, name))]
        if not self.paths:
            raise SourceError("image folder {} holds no {} files; put images there or "
                              "choose another folder".format(
                                  self.shown(self.folder), "/".join(e[1:] for e in EXTENSIONS)))
        self._next = 0
        self._delivered_this_pass = 0
        logger.info("image folder %s: %d images", self.shown(self.folder), len(self.paths))

    def read_into(self, frame):
        """Decode the next readable image into `frame`; False after the last one."""
        while True:
            if self._next >= len(self.paths):
                if not self._delivered_this_pass:
                    # A folder where nothing decodes is a mistake, not an empty run (and
                    # looping over it would spin forever).
                    raise SourceError("none of the {} images in {} can be decoded; replace "
                                      "them".format(len(self.paths), self.shown(self.folder)))
                if not self.loop:
                    return False
                self._next = 0
                self._delivered_this_pass = 0
            path = self.paths[self._next]
            self._next += 1
            image = _decode(path, self.max_pixels, warn=path not in self._bad,
                            show=self.shown)
            if image is None:
                self._bad.add(path)      # named once in the log, counted every pass
                self.skipped += 1
                continue
            # decoding allocates; the slot keeps its buffer unless the size changes.
            np.copyto(frame.ensure_shape(image.shape[0], image.shape[1]), image)
            frame.index = self._index
            frame.ts = time.time()
            frame.name = os.path.basename(path)
            self._index += 1
            self._delivered_this_pass += 1
            return True


def _decode(path, max_pixels, warn=True, show=None):
    # (H, W, 3) uint8 BGR, or None after one warning: IMREAD_COLOR turns grey, 16-bit and
    # 4-channel images into 8-bit BGR. `show(path)`: the path as logs show it (no password;
    # called only to log, never per good frame).
    log = logger.warning if warn else logger.debug
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        log("skipped image %s: cannot be read (%s)", _shown(path, show), exc.strerror)
        return None
    if not data:
        log("skipped image %s: the file is empty", _shown(path, show))
        return None
    if _truncated_jpeg(data):
        log("skipped image %s: truncated JPEG (the image data has no end marker)",
            _shown(path, show))
        return None
    try:
        return imagefiles.decode(data, "image " + path, max_pixels)
    except SourceError as exc:
        log("skipped %s", _shown(str(exc), show))
        return None


def _shown(text, show):
    return text if show is None else show(text)


def _truncated_jpeg(data):
    # libjpeg decodes a JPEG cut short without an error, filling the missing part with grey.
    # A complete one has its end-of-image marker (FF D9) after its last start-of-scan (FF DA);
    # the scan data itself cannot hold either (every FF in it is followed by 00 or an RSTn).
    return data[:3] == b"\xff\xd8\xff" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
