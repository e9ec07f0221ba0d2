"""Logging set-up: one line per event; under systemd, syslog priorities for journald.

When stderr is connected to the journal ($JOURNAL_STREAM, set by systemd), each line starts
with `<N>` (sd-daemon(3)): journald stores N as the priority, so `journalctl -p warning`
works, and it adds its own timestamps. Elsewhere lines carry a timestamp and the level.
"""

import logging
import os
import sys

# logging level -> syslog priority (sd-daemon(3), syslog(3))
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
              logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """`<priority>name: message`, one line (tracebacks joined, so they stay one entry)."""

    def format(self, record):
        text = super().format(record).replace("\n", " | ")
        priority = PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "<{}>{}".format(priority, text)


def journal_attached(stream=None):
    """True when the stream is the journal stream systemd set up for this service."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    stream = stream or sys.stderr
    try:
        device, inode = (int(v) for v in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == device and st.st_ino == inode


def setup(level=logging.INFO, stream=None):
    """Configure the root logger once for the process."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if journal_attached(stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
