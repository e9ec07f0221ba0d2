"""Named reference images for the matcher, kept under the state folder across restarts.

Names are restricted to letters, digits, `_` and `-` (no paths, no dots), so a name can never
reach outside `{state_dir}/references/`. Images are stored as PNG written atomically
(temporary file, fsync, rename): a crash leaves the old image or the new one, never half.
"""

import logging
import os
import re
import threading

from edge.errors import ConfigError, SourceError
from edge.files import atomic_write

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")   # \Z: `$` also matches before "\n"
MAX_SIDE = 4096        # larger references are refused: the graph is specialised to their size


def check_name(name):
    """The name if it is safe; ConfigError saying what is allowed otherwise."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError("reference name {!r}: use 1-64 letters, digits, _ or - (starting with "
                          "a letter or digit)".format(name))
    return name


def name_from_path(path):
    """A safe reference name from an image file name (`dock.png` -> `dock`)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = re.sub(r"[^A-Za-z0-9_-]", "_", stem).lstrip("_-")[:64]
    return name or "reference"


def default_state_dir():
    """$EDGE_STATE_DIR, $STATE_DIRECTORY (systemd), else ~/.local/state/edge."""
    return (os.environ.get("EDGE_STATE_DIR") or os.environ.get("STATE_DIRECTORY") or
            os.path.join(os.environ.get("XDG_STATE_HOME") or
                         os.path.expanduser("~/.local/state"), "edge"))


def _check_image(image, what):
    if image is None or image.ndim != 3 or image.shape[2] != 3 or image.dtype.name != "uint8":
        raise SourceError("{}: not a readable 3-channel 8-bit image".format(what))
    h, w = image.shape[:2]
    if min(h, w) < 32 or max(h, w) > MAX_SIDE:
        raise SourceError("{}: {}x{} pixels; references must be 32 to {} pixels a side".format(
            what, w, h, MAX_SIDE))
    return image


class ReferenceStore:
    """The reference images of one device: `{state_dir}/references/{name}.png`."""

    def __init__(self, state_dir):
        self.folder = os.path.join(state_dir, "references")
        self.version = 0            # bumped on every change, so tasks reload
        self._lock = threading.Lock()
        self._cache = {}            # name -> BGR image
        self._names = self._scan()  # kept in memory: the scheduler asks on every frame

    def _path(self, name):
        return os.path.join(self.folder, check_name(name) + ".png")

    def _scan(self):
        if not os.path.isdir(self.folder):
            return []
        return sorted(f[:-4] for f in os.listdir(self.folder)
                      if f.endswith(".png") and NAME.match(f[:-4]))

    def names(self):
        """Stored reference names, sorted."""
        return self._names

    def get(self, name):
        """The BGR image of a reference; SourceError when missing or unreadable."""
        import cv2
        with self._lock:
            if name in self._cache:
                return self._cache[name]
            path = self._path(name)
            if not os.path.isfile(path):
                raise SourceError("reference {!r}: not stored in {}".format(name, self.folder))
            image = _check_image(cv2.imread(path, cv2.IMREAD_COLOR), "reference " + path)
            self._cache[name] = image
            return image

    def put(self, name, image):
        """Store a BGR image under `name` (replacing one of that name), atomically."""
        import cv2
        path = self._path(name)
        _check_image(image, "reference {!r}".format(name))
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise SourceError("reference {!r}: cannot encode as PNG".format(name))
        os.makedirs(self.folder, exist_ok=True)
        atomic_write(path, encoded.tobytes())
        with self._lock:
            self._cache[name] = image.copy()
            self._names = self._scan()
            self.version += 1
        logger.info("reference %s stored (%dx%d)", name, image.shape[1], image.shape[0])
        return {"name": name, "width": image.shape[1], "height": image.shape[0]}

    def put_file(self, name, path):
        """Store the image file at `path` under `name`."""
        import cv2
        image = cv2.imread(path, cv2.IMREAD_COLOR) if os.path.isfile(path) else None
        if image is None:
            raise SourceError("reference image {}: missing or not an image; give a PNG or JPEG "
                              "file".format(path))
        return self.put(name, image)

    def delete(self, name):
        """Remove a reference; False when there was none of that name."""
        path = self._path(name)
        with self._lock:
            self._cache.pop(name, None)
            if not os.path.isfile(path):
                return False
            os.unlink(path)
            self._names = self._scan()
            self.version += 1
        logger.info("reference %s deleted", name)
        return True

    def describe(self):
        """[{name, width, height}] of every stored reference."""
        out = []
        for name in self.names():
            try:
                image = self.get(name)
            except SourceError:
                continue
            out.append({"name": name, "width": image.shape[1], "height": image.shape[0]})
        return out
