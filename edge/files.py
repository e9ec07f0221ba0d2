"""Writing files so that a crash or a full disk never leaves a torn one.

Write to a temporary file beside the target, fsync it, rename it over the target, fsync the
folder: a reader sees the old file or the new one, never half of either.
"""

import logging
import os
import re

logger = logging.getLogger(__name__)
TEMPORARY = re.compile(r"\.tmp\.(\d+)\Z")     # atomic_write's "<target>.tmp.<pid>"


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


def remove_stale_temporaries(folder):
    """Remove atomic_write's temporary files in `folder` whose writer is gone (killed by
    SIGKILL or a power cut mid-write): never trusted, only taking space (a reference's can be
    tens of MB). Those of live processes are left alone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = TEMPORARY.search(name)
        if match and int(match.group(1)) != os.getpid() and \
                not pid_alive(int(match.group(1))):
            try:
                os.unlink(os.path.join(folder, name))
                logger.info("removed %s, left by a process that was killed", name)
            except OSError:
                pass


def pid_alive(pid):
    """Whether a process with this id exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # alive, but another user's
        return True
    return True
