"""The matcher's reference images: the configured one, and those stored over MQTT.

A reference from the configuration (`reference:` or `--reference IMAGE`) belongs to the run:
it is read into memory and never written anywhere. References added with the
`set_reference` command are kept under the state folder across restarts,
`{state_dir}/references/{name}.png`, written atomically (temporary file, fsync, rename: a
crash leaves the old image or the new one, never half). Together they are at most `limit`
(config `match.max_references`); a deleted one's memory goes with it.

Names are restricted to letters, digits, `_` and `-` (no paths, no dots), so a name can never
reach outside `{state_dir}/references/`.
"""

import logging
import os
import re
import threading

from edge.errors import ConfigError, SinkError, SourceError
from edge.files import atomic_write, remove_stale_temporaries

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
    """The references of one device: configured (in memory) and stored (under the state
    folder), at most `limit` in all."""

    def __init__(self, state_dir, limit=64, max_pixels=None):
        from edge import imagefiles
        self.folder = os.path.join(state_dir, "references")
        self.limit = limit
        self.max_pixels = max_pixels or imagefiles.DEFAULT_MAX_PIXELS
        self.version = 0            # bumped on every change, so tasks reload
        self._lock = threading.Lock()
        self._configured = {}       # name -> BGR image, from the configuration
        self._cache = {}            # name -> BGR image of stored references read so far
        self._stored = self._scan()
        self._names = self._stored  # kept in memory: the scheduler asks on every frame

    def _path(self, name):
        return os.path.join(self.folder, check_name(name) + ".png")

    def _scan(self):
        if not os.path.isdir(self.folder):
            return []
        remove_stale_temporaries(self.folder)   # a write cut short by kill -9
        return sorted(f[:-4] for f in os.listdir(self.folder)
                      if f.endswith(".png") and NAME.match(f[:-4]))

    def _changed(self):
        """Call with the lock held after a change of either set."""
        self._names = sorted(set(self._configured) | set(self._stored))
        self.version += 1

    def names(self):
        """Every reference's name (configured and stored), sorted."""
        return self._names

    def configure(self, path):
        """Add the image file at `path` as a configured reference, named after the file (in
        memory only: the run's own, not stored); its name."""
        name = name_from_path(path)
        if not os.path.isfile(path):
            raise SourceError("reference image {}: missing; give a PNG or JPEG file".format(
                path))
        image = _check_image(self._read(path, "reference image " + path),
                             "reference image " + path)
        with self._lock:
            self._configured[name] = image
            self._changed()
        return name

    def _read(self, path, what):
        """A reference file's image, its size checked from the header before decoding."""
        from edge import imagefiles
        return imagefiles.read(path, what, self.max_pixels, MAX_SIDE)

    def get(self, name):
        """The BGR image of a reference; SourceError when missing or unreadable."""
        with self._lock:
            if name in self._configured:
                return self._configured[name]
            if name in self._cache:
                return self._cache[name]
            path = self._path(name)
            if not os.path.isfile(path):
                raise SourceError("reference {!r}: not stored in {}".format(name, self.folder))
            image = _check_image(self._read(path, "reference " + path), "reference " + path)
            self._cache[name] = image
            return image

    def put(self, name, image):
        """Store a BGR image under `name` (replacing one of that name), atomically.

        ConfigError for a configured name or one past the limit, SourceError for an image
        unfit as a reference, SinkError when the folder cannot be written (a full disk).
        """
        import cv2
        path = self._path(name)
        _check_image(image, "reference {!r}".format(name))
        with self._lock:
            if name in self._configured:
                raise ConfigError("reference {!r} comes from the configuration (reference:); "
                                  "choose another name".format(name))
            if name not in self._names and len(self._names) >= self.limit:
                raise ConfigError("{} references already, the limit (match.max_references); "
                                  "delete one first (delete_reference)".format(self.limit))
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise SourceError("reference {!r}: cannot encode as PNG".format(name))
        try:
            os.makedirs(self.folder, exist_ok=True)
            atomic_write(path, encoded.tobytes())
        except OSError as e:
            raise SinkError("reference {!r}: cannot write it in {} ({}); free space there or "
                            "set state_dir to a writable folder".format(
                                name, self.folder, e.strerror or e))
        with self._lock:
            self._cache[name] = image.copy()
            self._stored = self._scan()
            self._changed()
        logger.info("reference %s stored (%dx%d)", name, image.shape[1], image.shape[0])
        return {"name": name, "width": image.shape[1], "height": image.shape[0]}

    def delete(self, name):
        """Remove a stored reference and free its image; False when there was none of that
        name; ConfigError for a configured one."""
        path = self._path(name)
        with self._lock:
            if name in self._configured:
                raise ConfigError("reference {!r} comes from the configuration (reference:); "
                                  "remove it there".format(name))
            self._cache.pop(name, None)
            if not os.path.isfile(path):
                return False
            try:
                os.unlink(path)
            except OSError as e:
                raise SinkError("reference {!r}: cannot delete {} ({})".format(
                    name, path, e.strerror or e))
            self._stored = self._scan()
            self._changed()
        logger.info("reference %s deleted", name)
        return True

    def describe(self):
        """[{name, width, height}] of every reference."""
        out = []
        for name in self.names():
            try:
                image = self.get(name)
            except SourceError:
                continue
            out.append({"name": name, "width": image.shape[1], "height": image.shape[0]})
        return out
