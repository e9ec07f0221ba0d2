"""Logging for journald: syslog priorities when stderr is the journal stream."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_journal_lines_carry_syslog_priorities(tmp_path):
    """A real process whose stderr is a file named in JOURNAL_STREAM, as systemd sets it."""
    err = tmp_path / "journal"
    with open(str(err), "wb") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ, JOURNAL_STREAM="{}:{}".format(st.st_dev, st.st_ino))
        code = ("import logging; from edge import logs; logs.setup(); "
                "log = logging.getLogger('edge.x'); log.info('hello'); log.warning('careful'); "
                "log.error('bad\\nsecond line'); log.debug('hidden')")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=f, check=True)
    lines = err.read_text().splitlines()
    assert lines == ["<6>edge.x: hello", "<4>edge.x: careful", "<3>edge.x: bad | second line"]


def test_plain_lines_elsewhere(tmp_path):
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.run([sys.executable, "-c", "import logging; from edge import logs; "
                           "logs.setup(); logging.getLogger('edge.y').warning('w')"],
                          cwd=ROOT, env=env, stderr=subprocess.PIPE, check=True)
    line = proc.stderr.decode().strip()
    assert line.endswith("WARNING edge.y: w") and not line.startswith("<")
