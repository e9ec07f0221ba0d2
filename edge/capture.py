"""The capture thread: fills free frame slots from a source and hands them to the pipeline.

A live source that fails mid-run is closed and reopened with exponential backoff; a finite
source (file, folder, `test://?frames=N`) ends the thread at its end, and any error it raises
is fatal. The first open happens before the thread starts, so a source that cannot be opened
at all fails the start with its SourceError.
"""

import logging
import threading
import traceback

from edge.errors import SourceError

logger = logging.getLogger(__name__)

STATES = ("opening", "open", "reconnecting", "finished", "failed", "stopped")


class Capture(threading.Thread):
    """Reads a source into pool slots and passes each filled slot to `deliver(frame)`.

    `deliver` returns False when the pipeline is stopping; the thread then releases the slot
    once and ends. Counters: `frames` (delivered), `reopens`; `state` is one of STATES;
    `finished` is True at the end of a finite source; `error` holds the exception that failed
    the thread; `last_error` is the text of the latest source failure, for health reports.
    """

    def __init__(self, source, pool, deliver, stop_event, reopen_backoff=(0.5, 8.0),
                 on_exit=None, name="capture"):
        super().__init__(name=name, daemon=True)
        self.source = source
        self.pool = pool
        self.deliver = deliver
        self.stop_event = stop_event
        self.backoff_min, self.backoff_max = reopen_backoff
        self.on_exit = on_exit        # called from this thread as it ends, e.g. to close hand-offs
        self.frames = 0
        self.reopens = 0
        self.state = "opening"
        self.finished = False
        self.error = None
        self.last_error = None
        self._opened = False
        self._backoff = self.backoff_min
        self.first = None           # the frame `prime` read, handed on before any other

    def prime(self):
        """Read the first frame now, in the caller's thread, so that engines can be built
        for its size before the pipeline runs; None when the source has none yet (a live
        source that failed: the thread reopens it) or at all (an empty finite source).

        A finite source's first frame is delivered first when the thread starts; a live
        one's is dropped then, being as old as the engine builds took.
        """
        if not self._opened:
            return None          # a live camera that did not open: the thread reopens it
        frame = self.pool.acquire(timeout=5.0)
        if frame is None:
            return None
        try:
            ok = self.source.read_into(frame)
        except SourceError:
            self.pool.release(frame)
            if not self.source.live:
                raise
            return None
        except BaseException:
            self.pool.release(frame)
            raise
        if not ok:
            self.pool.release(frame)
            return None
        self.first = frame
        return frame

    def abandon(self):
        """Close a source that was opened (and maybe primed) but never run."""
        if self.first is not None:
            self.pool.release(self.first)
            self.first = None
        self.source.close()
        self.state = "stopped"

    def _primed(self):
        """The frame `prime` read, if it is still to be delivered."""
        frame, self.first = self.first, None
        if frame is not None and self.source.live:
            self.pool.release(frame)
            return None
        return frame

    def start_source(self, retrying=False):
        """Open the source now, in the caller's thread; raises SourceError if it cannot be.

        `retrying`: a failure is to be retried (state `reconnecting`, not `failed`).
        """
        self.state = "opening"
        try:
            self.source.open()
        except Exception as exc:
            self.source.close()
            self.state = "reconnecting" if retrying else "failed"
            self.last_error = self.source.shown(str(exc))
            raise
        self._opened = True
        self.state = "open"

    def run(self):
        try:
            if not self._opened:
                try:
                    self.start_source(retrying=self.source.live)
                except SourceError as exc:
                    # A live camera that was down when the pipeline started (one of several):
                    # reopened with backoff like one that fails later; a file is fatal.
                    if not self.source.live:
                        raise
                    self._reopen(exc)
            self._loop()
        except Exception as exc:   # the thread must not die silently: the supervisor reads .error
            self.error = exc
            self.state = "failed"
            if not isinstance(exc, SourceError):   # a SourceError is reported by the pipeline
                # the traceback as text, so that a URL it quotes shows no password
                logger.error("capture from %s failed: %s", self.source.display,
                             self.source.shown(traceback.format_exc().rstrip()))
        finally:
            if self.first is not None:        # stopped before it started
                self.pool.release(self.first)
                self.first = None
            self.source.close()
            if self.on_exit is not None:
                self.on_exit()

    def _loop(self):
        frame = self._primed()
        while not self.stop_event.is_set():
            if frame is None:
                frame = self.pool.acquire(timeout=0.2)
                if frame is None:
                    continue     # every slot is busy in the tasks; look at stop_event again
                try:
                    ok = self.source.read_into(frame)
                except SourceError as exc:
                    self.pool.release(frame)
                    frame = None
                    if not self.source.live:
                        raise
                    self._reopen(exc)
                    continue
                except BaseException:
                    self.pool.release(frame)
                    raise
                if not ok:
                    self.pool.release(frame)
                    self.finished = True
                    self.state = "finished"
                    logger.info("source %s ended after %d frames", self.source.display,
                                self.frames)
                    return
                self._backoff = self.backoff_min
            if not self.deliver(frame):
                break            # the pipeline is stopping: released below
            frame = None
            self.frames += 1
        if frame is not None:         # the primed frame, or one the pipeline would not take
            self.pool.release(frame)
        self.state = "stopped"

    def _reopen(self, exc):
        # Close, wait, reopen until it works or the pipeline stops; the wait doubles per
        # failure and goes back to the minimum after the next good frame.
        self.state = "reconnecting"
        self.last_error = self.source.shown(str(exc))
        self.source.close()
        while True:
            logger.warning("source %s failed (%s); reopening in %.1f s",
                           self.source.display, self.last_error, self._backoff)
            if self.stop_event.wait(self._backoff):
                return
            self._backoff = min(self._backoff * 2, self.backoff_max)
            try:
                self.source.open()
            except SourceError as again:
                self.source.close()
                self.last_error = self.source.shown(str(again))
                continue
            self.reopens += 1
            self.state = "open"
            logger.info("source %s reopened", self.source.display)
            return
