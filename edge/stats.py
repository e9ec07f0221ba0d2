"""Rolling per-stage timings for health and benchmarks: fps, latency percentiles, counts.

Samples go into preallocated numpy ring buffers, so recording a frame allocates nothing.
"""

import threading
import time

import numpy as np

WINDOW = 256          # latest frames the percentiles are taken over
# ms: capture -> queued for publishing, capture -> inference start, the engine run, inference
# end -> queued for publishing (waiting for the decode thread, decoding, building messages)
STAGES = ("total", "queue", "infer", "post")


class TaskStats:
    """Frames, fps over the last 10 s, and per-stage latency percentiles over the window."""

    def __init__(self, window=WINDOW, stages=STAGES):
        self.stages = stages
        self.samples = np.zeros((len(stages), window), np.float64)
        self.when = np.zeros(window, np.float64)     # monotonic seconds of each sample
        self.count = 0
        self._lock = threading.Lock()

    def record(self, *values, **kwargs):
        """Add one processed frame: one value (ms) per stage, in `stages` order."""
        now = kwargs.get("now")
        with self._lock:
            i = self.count % self.when.shape[0]
            for row, value in enumerate(values):
                self.samples[row, i] = value
            self.when[i] = time.monotonic() if now is None else now
            self.count += 1

    def summary(self, now=None):
        """{frames, fps, latency_ms {p50, p95}, infer_ms {p50, p95}, stages_ms {...}}."""
        with self._lock:
            n = min(self.count, self.when.shape[0])
            samples = self.samples[:, :n].copy()
            when = self.when[:n].copy()
        now = time.monotonic() if now is None else now
        fps = None
        if n >= 2:
            recent = when[when >= now - 10.0]      # the last 10 s of frames
            span = now - recent.min() if recent.size else 0.0
            fps = round(recent.size / span, 2) if recent.size >= 2 and span > 0 else 0.0
        stages = {name: _percentiles(samples[i]) for i, name in enumerate(self.stages)}
        out = {"frames": self.count, "fps": fps, "stages_ms": stages}
        if "total" in stages:
            out["latency_ms"] = stages["total"]
        if "infer" in stages:
            out["infer_ms"] = stages["infer"]
        return out


def _percentiles(values):
    if values.size == 0:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2)}
