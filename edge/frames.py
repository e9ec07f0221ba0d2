"""A fixed pool of frame slots and the hand-off between capture and the tasks.

Frames are never allocated per frame: the capture thread writes into a free slot, the tasks
read it in place, and the slot goes back to the pool when the last task releases it. A slot's
image is reallocated only when the source delivers a different size (image folders of mixed
sizes); live cameras keep one size for the whole run.
"""

import collections
import threading

import numpy as np


class Frame:
    """One slot of the pool: an image buffer and what the source knows about it."""

    __slots__ = ("slot", "image", "index", "ts", "name", "refs", "outputs", "allocate", "right")

    def __init__(self, slot, shape, allocate=None):
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


class FramePool:
    """A fixed set of frame slots shared by capture and every task."""

    def __init__(self, size, shape=(480, 640, 3), allocate=None):
        if size < 2:
            raise ValueError("a frame pool needs at least 2 slots")
        self.frames = [Frame(i, shape, allocate) for i in range(size)]
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


class Handoff:
    """A bounded hand-off of frames from capture to a task.

    With `newest=True` (live sources) a full hand-off drops its oldest frame and returns the
    slot to the pool, counting the drop, so the task always gets the newest frame. With
    `newest=False` (files, folders) `put` waits for room: nothing is dropped.
    """

    def __init__(self, pool, depth=1, newest=True):
        self.pool = pool
        self.depth = depth
        self.newest = newest
        self.dropped = 0
        self._items = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self):
        return len(self._items)

    def put(self, frame, stop_event=None):
        """Queue a frame (its refs already counted); False when stopped before it fit."""
        with self._cond:
            while len(self._items) >= self.depth:
                if self.newest:
                    old = self._items.popleft()
                    self.dropped += 1
                    self._cond.release()
                    try:
                        self.pool.release(old)
                    finally:
                        self._cond.acquire()
                    continue
                if self._closed or (stop_event is not None and stop_event.is_set()):
                    return False
                self._cond.wait(0.1)
            self._items.append(frame)
            self._cond.notify_all()
            return True

    def get(self, timeout=None):
        """The next frame, or None on timeout or when closed and empty."""
        with self._cond:
            if not self._items:
                if self._closed:
                    return None
                self._cond.wait_for(lambda: self._items or self._closed, timeout)
                if not self._items:
                    return None
            frame = self._items.popleft()
            self._cond.notify_all()
            return frame

    def close(self):
        """No more frames will come; `get` returns None once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self):
        return self._closed

    def drain(self):
        """Return every queued slot to the pool (at shutdown)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        for frame in items:
            self.pool.release(frame)
