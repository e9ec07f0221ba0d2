"""Fixed pools of frame slots and the inbox that hands them from the cameras to a task.

Frames are never allocated per frame: a camera's capture thread writes into a free slot of
its own pool, the tasks read it in place, and the slot goes back to that pool when the last
task releases it. A slot's image is reallocated only when the source delivers a different
size (image folders of mixed sizes); live cameras keep one size for the whole run.
"""

import collections
import threading

import numpy as np


class Frame:
    """One slot of the pool: an image buffer and what the source knows about it."""

    __slots__ = ("slot", "image", "index", "ts", "name", "refs", "outputs", "allocate", "right",
                 "camera", "pool")

    def __init__(self, slot, shape, allocate=None, camera=None, pool=None):
        self.slot = slot
        # The backend's allocator: mapped pinned memory on a Jetson, so the GPU reads the
        # very bytes the capture wrote; plain numpy elsewhere.
        self.allocate = allocate or _zeros
        self.image = self.allocate(shape, np.uint8)   # (H, W, 3) uint8, BGR as captured
        self.index = -1        # frame number from the source, counting from 0
        self.ts = 0.0          # capture time, unix seconds
        self.name = None       # file name for image folders, else None
        self.refs = 0          # tasks still holding this slot
        self.outputs = {}      # task name -> preallocated output buffers bound to this slot
        self.right = None      # stereo sources: the right view (H, W, 3) uint8, else None
        self.camera = camera   # the name of the camera it comes from (None: the unnamed one)
        self.pool = pool       # the FramePool it belongs to (release returns it there)

    @property
    def height(self):
        return self.image.shape[0]

    @property
    def width(self):
        return self.image.shape[1]

    def ensure_shape(self, height, width):
        """Make the image buffer (height, width, 3); reallocates only when the size changes."""
        if self.image.shape[0] != height or self.image.shape[1] != width:
            self.image = self.allocate((height, width, 3), np.uint8)
        return self.image

    def ensure_right(self, height, width):
        """The right view's buffer (stereo sources), made on first use and on a size change."""
        if self.right is None or self.right.shape[:2] != (height, width):
            # Ordinary cached memory: no engine reads it, the disparity step's CPU does (mapped
            # memory is uncached for the CPU on a Nano).
            self.right = np.zeros((height, width, 3), np.uint8)
        return self.right


def _zeros(shape, dtype):
    return np.zeros(shape, dtype)


def release(frame):
    """Drop one task's hold on a slot of a pool (see FramePool.release)."""
    frame.pool.release(frame)


class FramePool:
    """A fixed set of frame slots of one camera, shared by its capture and every task."""

    def __init__(self, size, shape=(480, 640, 3), allocate=None, camera=None):
        if size < 2:
            raise ValueError("a frame pool needs at least 2 slots")
        self.frames = [Frame(i, shape, allocate, camera, self) for i in range(size)]
        self._free = collections.deque(self.frames)
        self._cond = threading.Condition()

    def __len__(self):
        return len(self.frames)

    @property
    def free(self):
        return len(self._free)

    def acquire(self, timeout=None):
        """A free slot, waiting up to timeout seconds; None when none became free."""
        with self._cond:
            if not self._free and not self._cond.wait_for(lambda: self._free, timeout):
                return None
            frame = self._free.popleft()
            frame.refs = 0
            return frame

    def release(self, frame):
        """Drop one task's hold on the slot; the last one returns it to the pool."""
        with self._cond:
            frame.refs -= 1
            if frame.refs <= 0:
                frame.refs = 0
                self._free.append(frame)
                self._cond.notify()


class Lane:
    """One camera's frames waiting in an Inbox."""

    __slots__ = ("depth", "newest", "items", "dropped", "closed")

    def __init__(self, depth, newest):
        self.depth = depth
        self.newest = newest      # live: a full lane drops its oldest frame (counted)
        self.items = collections.deque()
        self.dropped = 0
        self.closed = False


class Inbox:
    """The frames of every camera waiting for one task: one bounded lane per camera.

    A live camera's lane (`newest=True`) drops its oldest frame when full, returning the slot
    to its pool and counting the drop, so the task always gets that camera's newest frame. A
    finite source's lane (`newest=False`) makes `put` wait for room: nothing is dropped, and
    only that camera's capture thread waits. `take` serves the lanes round-robin, so a camera
    that delivers fast never starves one that delivers slowly, and a camera that delivers
    nothing (failed, reconnecting) holds nobody up.
    """

    def __init__(self, lanes):
        self.lanes = [Lane(depth, newest) for depth, newest in lanes]
        self._cond = threading.Condition()
        self._next = 0            # the lane `take` looks at first (round-robin)

    def __len__(self):
        return sum(len(lane.items) for lane in self.lanes)

    @property
    def dropped(self):
        return sum(lane.dropped for lane in self.lanes)

    def figures(self):
        """[(frames waiting, frames dropped)] per lane, read together."""
        with self._cond:
            return [(len(lane.items), lane.dropped) for lane in self.lanes]

    def put(self, lane, frame, stop_event=None):
        """Queue a frame of camera `lane` (its refs already counted); False when stopped (or
        the lane closed) before it fit."""
        queue = self.lanes[lane]
        with self._cond:
            while len(queue.items) >= queue.depth:
                if queue.newest:
                    old = queue.items.popleft()
                    queue.dropped += 1
                    self._cond.release()
                    try:
                        release(old)
                    finally:
                        self._cond.acquire()
                    continue
                if queue.closed or (stop_event is not None and stop_event.is_set()):
                    return False
                self._cond.wait(0.1)
            queue.items.append(frame)
            self._cond.notify_all()
            return True

    def take(self, timeout=None, limit=1):
        """Up to `limit` frames, at most one per camera, lanes served round-robin; an empty
        list when none came within `timeout`, None once every lane is closed and empty."""
        with self._cond:
            if not self._ready():
                if self._finished():
                    return None
                self._cond.wait_for(lambda: self._ready() or self._finished(), timeout)
                if not self._ready():
                    return None if self._finished() else []
            taken = []
            count = len(self.lanes)
            for step in range(count):
                queue = self.lanes[(self._next + step) % count]
                if queue.items:
                    taken.append(queue.items.popleft())
                    if len(taken) >= limit:
                        self._next = (self._next + step + 1) % count
                        break
            else:
                self._next = (self._next + 1) % count
            self._cond.notify_all()
            return taken

    def _ready(self):
        return any(lane.items for lane in self.lanes)

    def _finished(self):
        return all(lane.closed and not lane.items for lane in self.lanes)

    def close(self, lane=None):
        """No more frames will come from camera `lane` (None: from any)."""
        with self._cond:
            for queue in self.lanes if lane is None else [self.lanes[lane]]:
                queue.closed = True
            self._cond.notify_all()

    @property
    def closed(self):
        return all(lane.closed for lane in self.lanes)

    def drain(self):
        """Return every queued slot to its pool (at shutdown)."""
        with self._cond:
            items = [frame for lane in self.lanes for frame in lane.items]
            for lane in self.lanes:
                lane.items.clear()
            self._cond.notify_all()
        for frame in items:
            release(frame)
