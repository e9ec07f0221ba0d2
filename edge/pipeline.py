"""The pipeline: capture thread -> one thread per task -> publisher, sharing one frame pool.

Threads: "capture" fills slots; each task's thread ("detect", "match") infers the slots it is
handed and puts the message on the publisher's queue; "publish" writes the sinks. A slot goes
back to the pool when the last task that was handed it is done.
"""

import logging
import os
import threading
import time

from edge.capture import Capture
from edge.errors import EdgeError
from edge.frames import FramePool, Handoff

logger = logging.getLogger(__name__)


def _int_env(name):
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


class TaskRunner(threading.Thread):
    """Runs one task on the frames of its hand-off until the hand-off closes."""

    def __init__(self, task, handoff, pool, publisher, stop_event, limit=None):
        super().__init__(name=task.name, daemon=True)
        self.limit = limit        # stop the run after this many frames (--max-frames)
        self.on_failure = None    # called when this task fails (the pipeline decides)
        # Fault injection for the watchdog tests: hang like a stuck inference after N frames.
        self.stall_after = _int_env("EDGE_FAULT_STALL_AFTER_FRAMES")
        self.task = task
        self.handoff = handoff
        self.pool = pool
        self.publisher = publisher
        self.stop_event = stop_event
        self.error = None

    def run(self):
        while True:
            frame = self.handoff.get(timeout=0.2)
            if frame is None:
                if self.handoff.closed:
                    return
                continue
            try:
                if self.stall_after is not None and self.task.frames >= self.stall_after:
                    logger.warning("fault injection: task %s stalls", self.task.name)
                    self.stop_event.wait()
                if self.error is None and not self._done():
                    started = time.time()
                    messages = self.task.process(frame)
                    for message in messages:
                        self.publisher.put(self.task.topic, message)
                        self.task.last_message = message
                    if messages:
                        done = time.time()
                        infer = self.task.infer_ms
                        self.task.stats.record((done - frame.ts) * 1000.0,
                                               (started - frame.ts) * 1000.0, infer,
                                               (done - started) * 1000.0 - infer)
                    if self._done():
                        self.stop_event.set()
            except EdgeError as e:
                logger.error("task %s failed: %s", self.task.name, e)
                self._fail(e)
            except Exception as e:  # a bug: logged with its traceback, the task stops
                logger.exception("task %s failed on frame %d", self.task.name, frame.index)
                self._fail(e)
            finally:
                self.pool.release(frame)

    def _fail(self, error):
        """Keep the error for health and the exit status; the run stops only when every
        task has failed: one failing task (an engine that cannot build) leaves the others
        working, and the frames handed to it go straight back to the pool."""
        self.error = error
        if self.on_failure is not None:
            self.on_failure()

    def _done(self):
        return self.limit is not None and self.task.frames >= self.limit


class Pipeline:
    """Capture, tasks and publisher for one source; `run()` returns when the run is over."""

    def __init__(self, source, tasks, publisher, pool_size=6, max_frames=None, allocate=None):
        self.source = source
        self.tasks = tasks
        self.publisher = publisher
        self.stop_event = threading.Event()
        self.max_frames = max_frames
        self.pool = FramePool(pool_size, allocate=allocate)
        live = source.live
        self.handoffs = [Handoff(self.pool, depth=1 if live else 2, newest=live) for _ in tasks]
        # --max-frames counts the frames the first task processed (live sources drop frames)
        self.runners = [TaskRunner(t, h, self.pool, publisher, self.stop_event,
                                   limit=max_frames if i == 0 else None)
                        for i, (t, h) in enumerate(zip(tasks, self.handoffs))]
        for runner in self.runners:
            runner.on_failure = self._task_failed
        self.capture = Capture(source, self.pool, self._deliver, self.stop_event,
                               on_exit=self._close_handoffs)
        self.delivered = 0
        self.idle = 0            # frames no task was due on (a matcher waiting for its rate)
        self.started = None
        self._taps = []          # one-shot requests for a copy of the next frame

    def _deliver(self, frame):
        """Hand a filled slot to every task due on it; False once the run should end."""
        if self.stop_event.is_set():
            return False
        if self._taps:
            self._serve_taps(frame)
        now = time.monotonic()
        due = [(r.task, r.handoff) for r in self.runners
               if r.error is None and r.task.due(frame, now)]
        frame.refs = len(due)
        if not due:
            self.pool.release(frame)     # no task wants this frame: straight back
            self.idle += 1
            return True
        for _, handoff in due:
            if not handoff.put(frame, self.stop_event):
                self.pool.release(frame)
        self.delivered += 1
        return True

    def tap(self, timeout=5.0):
        """(copy of the next captured frame, its index), or None when none came in time.

        The copy is made only on request (snapshots, set_reference), never per frame.
        """
        request = {"event": threading.Event(), "image": None, "index": None}
        self._taps.append(request)
        if not request["event"].wait(timeout):
            if request in self._taps:
                self._taps.remove(request)
            return None
        return request["image"], request["index"]

    def _serve_taps(self, frame):
        taps, self._taps = self._taps, []
        for request in taps:
            request["image"] = frame.image.copy()
            request["index"] = frame.index
            request["event"].set()

    def _task_failed(self):
        if all(r.error is not None for r in self.runners):
            self.stop_event.set()

    def _close_handoffs(self):
        for handoff in self.handoffs:
            handoff.close()

    def open(self):
        """Open the source; SourceError when it cannot be."""
        self.capture.start_source()

    def start(self):
        self.started = time.monotonic()
        for runner in self.runners:
            runner.start()
        self.capture.start()

    def stop(self):
        """Ask every thread to finish the frames in flight and end."""
        self.stop_event.set()

    def alive(self):
        return self.capture.is_alive() or any(r.is_alive() for r in self.runners)

    def wait(self, timeout=None):
        """Wait until capture and tasks are done (or timeout); True when they are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def join(self, timeout=5.0):
        """After stop(): give threads `timeout` seconds, then return what is still queued."""
        self.capture.join(timeout)
        self._close_handoffs()
        for runner in self.runners:
            runner.join(timeout)
        for handoff in self.handoffs:
            handoff.drain()

    def error(self):
        """The first error of the run (source or task), or None."""
        if self.capture.error is not None:
            return self.capture.error
        for runner in self.runners:
            if runner.error is not None:
                return runner.error
        return None
