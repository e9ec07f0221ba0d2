"""Rolling per-stage timings for health and benchmarks: fps, latency percentiles, counts.

Samples go into preallocated numpy ring buffers, so recording a frame allocates nothing.
"""

import bisect
import threading
import time

import numpy as np

WINDOW = 256          # latest frames the percentiles are taken over
# ms: upper bounds of the cumulative latency histograms (Prometheus `le`, in seconds there),
# from a desktop GPU's few ms to a Nano's matcher's seconds
BUCKETS_MS = (2.5, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0,
              750.0, 1000.0, 2000.0, 5000.0)
HISTOGRAMS = ("total", "infer")     # the stages histograms are kept for (every frame since start)
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
        # stage -> [count per bucket (the last one: above every bound)], sum of ms; fixed
        # size, so recording allocates nothing that grows
        self.histograms = {name: ([0] * (len(BUCKETS_MS) + 1), [0.0])
                           for name in HISTOGRAMS if name in stages}
        self._histogram_rows = [(stages.index(name), counts, total)
                                for name, (counts, total) in self.histograms.items()]
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
            for row, counts, total in self._histogram_rows:
                if row < len(values):
                    counts[bisect.bisect_left(BUCKETS_MS, values[row])] += 1
                    total[0] += values[row]

    def histogram(self, stage):
        """(cumulative counts per bound of BUCKETS_MS then +Inf, sum in ms) since start."""
        counts, total = self.histograms[stage]
        with self._lock:
            counts, total = list(counts), total[0]
        cumulative, running = [], 0
        for count in counts:
            running += count
            cumulative.append(running)
        return cumulative, total

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
