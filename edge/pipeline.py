"""The pipeline: a capture thread per camera -> one thread per task -> decode thread -> publisher.

Threads: each camera's "capture" thread fills slots of its own pool; each task's thread
("detect", "match") takes frames from its inbox, one lane per camera served round-robin,
and runs its engines on them (several cameras' frames as one batch where the task batches);
"decode" turns the outputs into messages and puts them on the publisher's queue, while the
task's thread already infers the next frames; "publish" writes the sinks. A slot goes back to
its camera's pool when the last task that was handed it has decoded it (the outputs it is
bound to stay valid until then).
"""

import collections
import logging
import os
import threading
import time

from edge.cameras import Camera
from edge.errors import EdgeError, SourceError
from edge.frames import Inbox, release
from edge.tasks import Side

logger = logging.getLogger(__name__)

# What observers (health, /metrics) read of a running pipeline: Pipeline.snapshot(), plain
# values taken at one moment, never the threads, inboxes and stats themselves.
CameraView = collections.namedtuple(
    "CameraView",
    "name uri state frames fps reopens dropped skipped error unpaired width height")
CameraView.__doc__ = """One camera: its URI for display, capture state and counts, the frames
its lanes dropped, (stereo) the frames that found no partner, else None, and the size of its
newest frame (None before the first)."""
LaneView = collections.namedtuple("LaneView", "camera queued dropped frames fps infer total")
LaneView.__doc__ = """One task's share of one camera: frames waiting and dropped, frames done,
their rate (None before there is one), and the histograms (counts per edge.stats.BUCKETS_MS
bucket, sum in ms) of the engine run and of capture-to-queued."""
TaskView = collections.namedtuple(
    "TaskView", "name model background queue dropped error summary health cameras")
TaskView.__doc__ = """One task: its figures (TaskStats.summary), what the task adds for health
(Task.health), and a LaneView per camera it serves (`cameras`)."""
PipelineView = collections.namedtuple("PipelineView", "cameras tasks uris")
PipelineView.__doc__ = """The cameras and tasks, and every source URI (stereo pairs' sides too:
health redacts their passwords)."""


def _newest_size(pool):
    """(width, height) of the newest frame a pool's slots hold, (None, None) before any: each
    slot keeps the size of the frame last written into it."""
    newest = max(pool.frames, key=lambda frame: frame.index)
    return (newest.width, newest.height) if newest.index >= 0 else (None, None)


def _int_env(name):
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


class TaskRunner(threading.Thread):
    """Runs one task's engines on the frames of its inbox until every lane has closed."""

    def __init__(self, task, inbox, decoder, stop_event, limit=None, batch=1, topic=None,
                 cameras=None):
        super().__init__(name=task.name, daemon=True)
        self.limit = limit        # stop the run after this many frames (--max-frames)
        self.batch = batch        # frames taken at once: one per camera where the task batches
        self.on_failure = None    # called when this task fails (the pipeline decides)
        self.on_exit = None       # called from this thread as it ends
        # Fault injection for the watchdog tests: hang like a stuck inference after N frames.
        self.stall_after = _int_env("EDGE_FAULT_STALL_AFTER_FRAMES")
        self.task = task
        self.inbox = inbox
        self.decoder = decoder
        self.stop_event = stop_event
        self.topic = topic or (lambda kind, camera: kind)   # (kind, camera) -> topic
        self.cameras = cameras    # camera name -> Camera whose figures this task's frames make
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
            want = self.batch
            if self.limit is not None:
                want = max(1, min(want, self.limit - self.inferred))
            frames = self.inbox.take(timeout=0.2, limit=want)
            if frames is None:
                return
            try:
                if frames and self.stall_after is not None and \
                        self.inferred >= self.stall_after:
                    logger.warning("fault injection: task %s stalls", self.task.name)
                    self.stop_event.wait()
                if frames and self.error is None and not self._done():
                    started = time.time()
                    results = self.task.infer_frames(frames)
                    ended = time.time()
                    self.inferred += len(frames)
                    for frame, inferred in zip(frames, results):
                        self.decoder.put((self, frame, started, ended, inferred))
                    frames = []           # the decoder releases them
                    if self._done():
                        self.stop_event.set()
            except Exception as e:
                self.fail(e, frames[0] if frames else None)
            finally:
                for frame in frames or ():
                    release(frame)

    def decode(self, frame, started, ended, inferred):
        """Messages for an inferred frame onto the publisher's queue (decode thread).

        Stages (ms): capture to published, capture to inference start, inference (with the
        slot's binding; a batch's whole run), inference end to published (the wait for and
        the work of decoding).
        """
        if self.error is not None:
            return
        try:
            messages = self.task.decode(frame, inferred)
            publisher = self.decoder.publisher
            for message in messages:
                if isinstance(message, Side):
                    publisher.put(self.topic(message.topic, frame.camera), message.message,
                                  qos=message.qos)
                    continue
                publisher.put(self.topic(self.task.topic, frame.camera), message)
                self.task.last_messages[frame.camera] = message
            if messages:
                done = time.time()
                total = (done - frame.ts) * 1000.0
                stages = (total, (started - frame.ts) * 1000.0, (ended - started) * 1000.0,
                          (done - ended) * 1000.0)
                self.task.stats.record(*stages)
                self.task.stats_for(frame.camera).record(*stages)
                if self.cameras is not None:
                    self.cameras[frame.camera].stats.record(total)
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

    def __init__(self, publisher):
        super().__init__(name="decode", daemon=True)
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
                release(frame)


class Pipeline:
    """Cameras, tasks and publisher of one run; `run()` returns when the run is over.

    `sources`: a Source (the one unnamed camera: today's topics and payloads) or a list of
    (name, Source) for named cameras.
    """

    def __init__(self, sources, tasks, publisher, pool_size=6, max_frames=None, allocate=None):
        if not isinstance(sources, (list, tuple)):
            sources = [(None, sources)]
        self.cameras = [Camera(i, name, source, pool_size, allocate)
                        for i, (name, source) in enumerate(sources)]
        self.named = {camera.name: camera for camera in self.cameras}
        self.tasks = tasks
        self.publisher = publisher
        self.stop_event = threading.Event()
        self.max_frames = max_frames
        lanes = [(1, True) if camera.live else (2, False) for camera in self.cameras]
        self.inboxes = [Inbox(lanes) for _ in tasks]
        self.decoder = Decoder(publisher)
        self._topics = {}
        # --max-frames counts the frames the first task processed (live sources drop frames);
        # the first task's frames are also each camera's figures in health
        self.runners = [TaskRunner(t, inbox, self.decoder, self.stop_event,
                                   limit=max_frames if i == 0 else None,
                                   batch=len(self.cameras) if t.batching else 1,
                                   topic=self.topic,
                                   cameras=self.named if i == 0 else None)
                        for i, (t, inbox) in enumerate(zip(tasks, self.inboxes))]
        self._running = len(self.runners)
        self._capturing = len(self.cameras)
        self._lock = threading.Lock()
        for runner in self.runners:
            runner.on_failure = self._task_failed
            runner.on_exit = self._runner_ended
        for camera in self.cameras:
            camera.start_capture(lambda frame, camera=camera: self._deliver(camera, frame),
                                 self.stop_event,
                                 on_exit=lambda camera=camera: self._camera_ended(camera))
        self.delivered = 0
        self.idle = 0            # frames no task was due on (a matcher waiting for its rate)
        self.started = None
        self._taps = []          # one-shot requests for a copy of a camera's next frame

    def topic(self, kind, camera):
        """The topic of a task's messages of a kind (`detections`, `events`) from a camera:
        the kind alone for the one unnamed camera, `{kind}/{camera}` under the device."""
        if camera is None:
            return kind
        key = (kind, camera)
        topic = self._topics.get(key)
        if topic is None:       # made once per camera and kind: nothing per frame
            topic = self._topics[key] = self.publisher.topic("{}/{}".format(kind, camera))
        return topic

    def camera_names(self):
        """The names of the cameras ([] for the one unnamed camera)."""
        return [c.name for c in self.cameras if c.name is not None]

    def _deliver(self, camera, frame):
        """Hand a filled slot to every task due on it; False once the run should end."""
        if self.stop_event.is_set():
            return False
        if self._taps:
            self._serve_taps(camera, frame)
        now = time.monotonic()
        due = [(r.task, r.inbox) for r in self.runners
               if r.error is None and r.task.due(frame, now)]
        frame.refs = len(due)
        if not due:
            release(frame)     # no task wants this frame: straight back
            self.idle += 1
            return True
        for _, inbox in due:
            if not inbox.put(camera.index, frame, self.stop_event):
                release(frame)
        self.delivered += 1
        return True

    def tap(self, timeout=5.0, camera=None):
        """(copy of the next captured frame of a camera (default: the first), its index), or
        None when none came in time.

        The copy is made only on request (snapshots, set_reference), never per frame.
        """
        name = self.cameras[0].name if camera is None else camera
        request = {"event": threading.Event(), "image": None, "index": None, "camera": name}
        self._taps.append(request)
        if not request["event"].wait(timeout):
            try:
                self._taps.remove(request)
            except ValueError:      # the capture thread took it as it expired: served
                pass
            if not request["event"].is_set():
                return None
        return request["image"], request["index"]

    def _serve_taps(self, camera, frame):
        taps = [r for r in self._taps if r["camera"] == camera.name]
        for request in taps:
            try:
                self._taps.remove(request)
            except ValueError:      # it expired meanwhile: its asker has gone
                continue
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

    def _camera_ended(self, camera):
        for inbox in self.inboxes:
            inbox.close(camera.index)
        with self._lock:
            self._capturing -= 1
            last = self._capturing == 0
        if not last and camera.capture.error is not None:
            logger.error("camera %s failed: %s; the other cameras go on", camera.label(),
                         camera.capture.error)

    def open(self):
        """Open every camera; SourceError when one cannot be opened, except a live camera
        among several: that one is reopened with backoff by its thread while the others run.
        """
        errors = []
        for camera in self.cameras:
            try:
                camera.capture.start_source()
            except SourceError as e:
                errors.append((camera, e))
        live_down = [(c, e) for c, e in errors if c.live]
        if errors and (len(errors) == len(self.cameras) or len(live_down) < len(errors)):
            for camera in self.cameras:
                camera.capture.abandon()
            raise errors[0][1]
        for camera, error in live_down:
            camera.capture.state = "reconnecting"
            logger.warning("camera %s cannot be opened (%s); the others start, it is retried",
                           camera.label(), error)

    def prepare(self):
        """Build every task's engines for each camera's first frame, one after another, then
        load them, before any frame flows: builds never overlap, and none runs while the
        daemon holds a loaded engine (a Nano 2GB holds a build or the engines, not both). A
        task that batches learns first how many cameras share each frame size.

        A task whose engine fails is failed alone, as if it had failed on a frame; the run
        stops when every task has failed. Without a first frame yet (a live camera that
        failed) engines are built on the first frame instead.
        """
        firsts = [frame for frame in (c.capture.prime() for c in self.cameras)
                  if frame is not None]
        sizes = collections.Counter((frame.width, frame.height) for frame in firsts)
        for step in ("build", "prepare"):
            for runner in self.runners:
                if runner.error is not None:
                    continue
                try:
                    if step == "build":
                        runner.task.plan(sizes)
                    for frame in firsts:
                        if runner.task.serves(frame.camera):
                            getattr(runner.task, step)(frame)
                except Exception as e:
                    runner.fail(e, None)

    def start(self):
        self.started = time.monotonic()
        self.decoder.start()
        for runner in self.runners:
            runner.start()
        if not self.runners:
            self.decoder.close()
        for camera in self.cameras:
            camera.capture.start()

    def stop(self):
        """Ask every thread to finish the frames in flight and end."""
        self.stop_event.set()

    def alive(self):
        return any(c.capture.is_alive() for c in self.cameras) or \
            any(r.is_alive() for r in self.runners) or self.decoder.is_alive()

    def wait(self, timeout=None):
        """Wait until capture and tasks are done (or timeout); True when they are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # Joins, not polling: the run's end is seen the moment its last thread ends.
        threads = [c.capture for c in self.cameras] + self.runners + [self.decoder]
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.alive()

    def join(self, timeout=5.0):
        """After stop(): give threads `timeout` seconds, then return what is still queued."""
        if self.started is None:       # stopped while preparing: only the sources are open
            for camera in self.cameras:
                camera.capture.abandon()
            return
        for camera in self.cameras:
            camera.capture.join(timeout)
        for inbox in self.inboxes:
            inbox.close()
        for runner in self.runners:
            runner.join(timeout)
        self.decoder.close()
        self.decoder.join(timeout)
        for inbox in self.inboxes:
            inbox.drain()

    def snapshot(self):
        """A PipelineView of this moment (the cameras' and tasks' figures)."""
        from edge.stats import BUCKETS_MS
        lanes = [inbox.figures() for inbox in self.inboxes]
        cameras = []
        uris = []
        for camera in self.cameras:
            capture, source = camera.capture, camera.source
            cameras.append(CameraView(
                camera.name, source.display, capture.state, capture.frames,
                camera.stats.summary()["fps"], capture.reopens,
                sum(figures[camera.index][1] for figures in lanes),
                getattr(source, "skipped", 0),
                capture.last_error or (str(capture.error) if capture.error else None),
                getattr(source, "unpaired", None), *_newest_size(camera.pool)))
            uris.append(source.uri)
            uris.extend(side.uri for side in getattr(source, "sides", ()))
        empty = ([0] * (len(BUCKETS_MS) + 1), 0.0)
        tasks = []
        for runner, figures in zip(self.runners, lanes):
            task = runner.task
            views = []
            for camera in self.cameras:
                if not task.serves(camera.name):
                    continue
                stats = task.camera_stats.get(camera.name)
                queued, dropped = figures[camera.index]
                views.append(LaneView(
                    camera.name, queued, dropped, stats.count if stats else 0,
                    stats.summary()["fps"] if stats else None,
                    stats.histogram("infer") if stats else empty,
                    stats.histogram("total") if stats else empty))
            tasks.append(TaskView(
                task.name, task.card.name, task.background, sum(q for q, _ in figures),
                sum(d for _, d in figures), str(runner.error) if runner.error else None,
                task.stats.summary(), task.health(), views))
        return PipelineView(cameras, tasks, uris)

    def error(self):
        """The first error of the run (a camera's or a task's), or None."""
        for camera in self.cameras:
            if camera.capture.error is not None:
                return camera.capture.error
        for runner in self.runners:
            if runner.error is not None:
                return runner.error
        return None
