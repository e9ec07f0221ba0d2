"""Pinned downloads checked against sha256, from the network or a local mirror folder.

A file lands under its final name only after its sha256 matched (temporary file, fsync,
rename), so a truncated or corrupt download is never used. `EDGE_MODEL_MIRROR` (or
`--mirror DIR`) reads the same file names from a local folder, searched recursively.
"""

import hashlib
import logging
import os
import shutil
import socket
import sys
import time

from edge.errors import ModelError, SinkError, UnavailableError
from edge.files import fsync_dir

logger = logging.getLogger(__name__)

MIRROR_ENV = "EDGE_MODEL_MIRROR"
_CHUNK = 1 << 20


def sha256_of(path):
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path, sha256, what):
    """ModelError unless the file at `path` has the pinned sha256."""
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelError(
            "{} {}: sha256 mismatch (file truncated or corrupt: {} bytes, sha256 {}..., expected "
            "{}...); delete it and fetch it again with `edge models fetch`".format(
                what, path, os.path.getsize(path), actual[:12], sha256[:12]))


def find_in_mirror(mirror, name):
    """The path of `name` in the mirror folder or below it, or None."""
    direct = os.path.join(mirror, name)
    if os.path.isfile(direct):
        return direct
    for root, _, files in os.walk(mirror):
        if name in files:
            return os.path.join(root, name)
    return None


def fetch(url, sha256, dest, mirror=None, what="file", progress=None):
    """Put the pinned file at `dest` (unless already there and valid); returns `dest`."""
    if os.path.isfile(dest):
        try:
            verify(dest, sha256, what)
            return dest
        except ModelError:
            logger.warning("%s %s does not match its sha256; fetching it again", what, dest)
    folder = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SinkError("{} folder {}: cannot create it ({}); set model_dir to a writable "
                        "folder".format(what, folder, e.strerror))
    tmp = "{}.part.{}".format(dest, os.getpid())
    try:
        mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
        if mirror:
            source = find_in_mirror(mirror, os.path.basename(dest))
            if source is None:
                raise UnavailableError("{} {}: not in the mirror folder {}; put it there or unset "
                                       "--mirror / {}".format(what, os.path.basename(dest),
                                                              mirror, MIRROR_ENV))
            try:
                with open(source, "rb"):
                    pass
            except OSError as e:
                raise UnavailableError("{} {}: cannot read it from the mirror ({}); fix its "
                                       "permissions or the --mirror folder".format(
                                           what, source, e.strerror))
            shutil.copyfile(source, tmp)
        else:
            _download(url, tmp, what, progress)
        actual = sha256_of(tmp)
        if actual != sha256:
            raise ModelError("{} {}: sha256 mismatch after download from {} (got {}..., expected "
                             "{}...); the file is refused; check the URL or the mirror".format(
                                 what, os.path.basename(dest), mirror or url, actual[:12],
                                 sha256[:12]))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(folder)
    except OSError as e:
        raise SinkError("{} {}: cannot write ({}); free space or choose another model_dir"
                        .format(what, dest, e.strerror or e))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _download(url, tmp, what, progress):
    import urllib.error
    import urllib.request
    progress = progress or Progress(os.path.basename(tmp.split(".part.")[0]))
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                done += len(block)
                progress(done, total)
            progress(done, total, final=True)
    except (urllib.error.URLError, socket.timeout, ConnectionError, ValueError) as e:
        raise UnavailableError("{} download {}: {}; check the network or use --mirror DIR / {}"
                               .format(what, url, getattr(e, "reason", e), MIRROR_ENV))


class Progress:
    """A one-line progress report on stderr: redrawn on a terminal, a few lines in a log."""

    def __init__(self, name, stream=None):
        self.name = name
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0

    def __call__(self, done, total, final=False):
        now = time.monotonic()
        if not final and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        pct = " {:3.0f}%".format(100.0 * done / total) if total else ""
        line = "fetching {}: {:.1f} MB{}".format(self.name, done / 1e6, pct)
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
