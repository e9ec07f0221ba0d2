"""Writing files so that a crash or a full disk never leaves a torn one.

Write to a temporary file beside the target, fsync it, rename it over the target, fsync the
folder: a reader sees the old file or the new one, never half of either.
"""

import os


def atomic_write(path, data):
    """Write bytes to path atomically; the temporary file is removed on any failure."""
    tmp = "{}.tmp.{}".format(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(folder):
    """Make a rename durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
