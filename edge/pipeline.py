"""The pipeline: capture thread -> one thread per task -> decode thread -> publisher.

Threads: "capture" fills slots; each task's thread ("detect", "match") runs its engines on
the slots it is handed; "decode" turns the outputs into messages and puts them on the
publisher's queue, while the task's thread already infers the next frame; "publish" writes
the sinks. A slot goes back to the pool when the last task that was handed it has decoded
it (the outputs it is bound to stay valid until then).
"""

import collections
import logging
import os
import threading
import time

from edge.capture import Capture
from edge.errors import EdgeError
from edge.frames import FramePool, Handoff
from edge.tasks import Side

logger = logging.getLogger(__name__)


def _int_env(name):
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


class TaskRunner(threading.Thread):
    """Runs one task's engines on the frames of its hand-off until the hand-off closes."""

    def __init__(self, task, handoff, pool, decoder, stop_event, limit=None):
        super().__init__(name=task.name, daemon=True)
        self.limit = limit        # stop the run after this many frames (--max-frames)
        self.on_failure = None    # called when this task fails (the pipeline decides)
        self.on_exit = None       # called from this thread as it ends
        # Fault injection for the watchdog tests: hang like a stuck inference after N frames.
        self.stall_after = _int_env("EDGE_FAULT_STALL_AFTER_FRAMES")
        self.task = task
        self.handoff = handoff
        self.pool = pool
        self.decoder = decoder
        self.stop_event = stop_event
        self.inferred = 0
        self.error = None

    def run(self):
        try:
            self._loop()
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def _loop(self):
        while True:
            frame = self.handoff.get(timeout=0.2)
            if frame is None:
                if self.handoff.closed:
                    return
                continue
            try:
                if self.stall_after is not None and self.inferred >= self.stall_after:
                    logger.warning("fault injection: task %s stalls", self.task.name)
                    self.stop_event.wait()
                if self.error is None and not self._done():
                    started = time.time()
                    inferred = self.task.infer_frame(frame)
                    self.inferred += 1
                    self.decoder.put((self, frame, started, time.time(), inferred))
                    frame = None          # the decoder releases it
                    if self._done():
                        self.stop_event.set()
            except Exception as e:
                self.fail(e, frame)
            finally:
                if frame is not None:
                    self.pool.release(frame)

    def decode(self, frame, started, ended, inferred):
        """Messages for an inferred frame onto the publisher's queue (decode thread).

        Stages (ms): capture to published, capture to inference start, inference (with the
        slot's binding), inference end to published (the wait for and the work of decoding).
        """
        if self.error is not None:
            return
        try:
            messages = self.task.decode(frame, inferred)
            for message in messages:
                if isinstance(message, Side):
                    self.decoder.publisher.put(message.topic, message.message, qos=message.qos)
                    continue
                self.decoder.publisher.put(self.task.topic, message)
                self.task.last_message = message
            if messages:
                done = time.time()
                self.task.stats.record((done - frame.ts) * 1000.0, (started - frame.ts) * 1000.0,
                                       (ended - started) * 1000.0, (done - ended) * 1000.0)
        except Exception as e:
            self.fail(e, frame)

    def fail(self, error, frame):
        """Keep the error for health and the exit status; the run stops only when every
        task has failed: one failing task (an engine that cannot build) leaves the others
        working, and the frames handed to it go straight back to the pool."""
        if isinstance(error, EdgeError):
            logger.error("task %s failed: %s", self.task.name, error)
        else:   # a bug: logged with its traceback, the task stops
            logger.exception("task %s failed on frame %d", self.task.name,
                             frame.index if frame is not None else -1)
        self.error = error
        if self.on_failure is not None:
            self.on_failure()

    def _done(self):
        return self.limit is not None and self.inferred >= self.limit


class Decoder(threading.Thread):
    """The decode thread: inferred frames -> messages -> publisher, then the slot is free.

    Its queue needs no bound of its own: every item holds a pool slot.
    """

    def __init__(self, pool, publisher):
        super().__init__(name="decode", daemon=True)
        self.pool = pool
        self.publisher = publisher
        self._items = collections.deque()     # (runner, frame, started, ended, inferred)
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item):
        """Queue (runner, frame, inference start and end in unix s, the task's result)."""
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def close(self):
        """Decode what is queued, then end."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def run(self):
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                runner, frame, started, ended, inferred = self._items.popleft()
            try:
                runner.decode(frame, started, ended, inferred)
            finally:
                self.pool.release(frame)


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
        self.decoder = Decoder(self.pool, publisher)
        # --max-frames counts the frames the first task processed (live sources drop frames)
        self.runners = [TaskRunner(t, h, self.pool, self.decoder, self.stop_event,
                                   limit=max_frames if i == 0 else None)
                        for i, (t, h) in enumerate(zip(tasks, self.handoffs))]
        self._running = len(self.runners)
        self._lock = threading.Lock()
        for runner in self.runners:
            runner.on_failure = self._task_failed
            runner.on_exit = self._runner_ended
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

    def _runner_ended(self):
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.decoder.close()   # nothing more will come: decode the rest and end

    def _close_handoffs(self):
        for handoff in self.handoffs:
            handoff.close()

    def open(self):
        """Open the source; SourceError when it cannot be."""
        self.capture.start_source()

    def prepare(self):
        """Build or load every task's engines for the source's first frame, one after another,
        before any frame flows (builds never overlap, and a Nano's memory holds only one).

        A task whose engine fails is failed alone, as if it had failed on a frame; the run
        stops when every task has failed. Without a first frame yet (a live source that
        failed) engines are built on the first frame instead.
        """
        frame = self.capture.prime()
        if frame is None:
            return
        for runner in self.runners:
            try:
                runner.task.prepare(frame)
            except Exception as e:
                runner.fail(e, None)

    def start(self):
        self.started = time.monotonic()
        self.decoder.start()
        for runner in self.runners:
            runner.start()
        if not self.runners:
            self.decoder.close()
        self.capture.start()

    def stop(self):
        """Ask every thread to finish the frames in flight and end."""
        self.stop_event.set()

    def alive(self):
        return self.capture.is_alive() or any(r.is_alive() for r in self.runners) or \
            self.decoder.is_alive()

    def wait(self, timeout=None):
        """Wait until capture and tasks are done (or timeout); True when they are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # Joins, not polling: the run's end is seen the moment its last thread ends.
        for thread in [self.capture] + self.runners + [self.decoder]:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.alive()

    def join(self, timeout=5.0):
        """After stop(): give threads `timeout` seconds, then return what is still queued."""
        if self.started is None:       # stopped while preparing: only the source is open
            self.capture.abandon()
            return
        self.capture.join(timeout)
        self._close_handoffs()
        for runner in self.runners:
            runner.join(timeout)
        self.decoder.close()
        self.decoder.join(timeout)
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
