"""Rolling per-task figures for health: fps, latency percentiles, counts.

Samples go into preallocated numpy ring buffers, so recording a frame allocates nothing.
"""

import threading
import time

import numpy as np

WINDOW = 256          # latest frames the percentiles are taken over


class TaskStats:
    """Frames, fps over the window, latency (capture to publish) and inference percentiles."""

    def __init__(self, window=WINDOW):
        self.total_ms = np.zeros(window, np.float64)
        self.infer_ms = np.zeros(window, np.float64)
        self.when = np.zeros(window, np.float64)     # monotonic seconds of each sample
        self.count = 0
        self.errors = 0
        self._lock = threading.Lock()

    def record(self, total_ms, infer_ms, now=None):
        """Add one processed frame."""
        with self._lock:
            i = self.count % self.total_ms.shape[0]
            self.total_ms[i] = total_ms
            self.infer_ms[i] = infer_ms
            self.when[i] = time.monotonic() if now is None else now
            self.count += 1

    def summary(self, now=None):
        """{frames, fps, latency_ms {p50, p95}, infer_ms {p50, p95}}; None where no data."""
        with self._lock:
            n = min(self.count, self.total_ms.shape[0])
            total = self.total_ms[:n].copy()
            infer = self.infer_ms[:n].copy()
            when = self.when[:n].copy()
        now = time.monotonic() if now is None else now
        fps = None
        if n >= 2:
            recent = when[when >= now - 10.0]      # the last 10 s of frames
            span = now - recent.min() if recent.size else 0.0
            fps = round(recent.size / span, 2) if recent.size >= 2 and span > 0 else 0.0
        return {"frames": self.count, "fps": fps,
                "latency_ms": _percentiles(total), "infer_ms": _percentiles(infer)}


def _percentiles(values):
    if values.size == 0:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2)}
