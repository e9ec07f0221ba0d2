"""Running the real pipeline for measurements: frames replayed from memory, a pipeline run to
its end, a real `edge run`'s peak memory, and a local broker for benchmarks and demos."""

import logging
import os
import time

import numpy as np

from edge.sources import Source

logger = logging.getLogger(__name__)


class ReplaySource(Source):
    """Frames decoded once and replayed from memory at the CPU cost of a camera's DMA.

    A slot is written once with a decoded frame; after that the slot is delivered again with
    the frame it holds (a new index and timestamp), as a camera writes into the buffer it is
    given without the CPU copying. Without `fps` it never drops (throughput); with `fps` it
    paces itself like a camera and is live (newest frame wins), which is how latency is
    measured.
    """

    def __init__(self, frames, count, fps=None):
        super().__init__("replay://", "", {})
        self.frames = frames
        self.count = count
        self.index = 0
        self.interval = 1.0 / fps if fps else None
        self.live = fps is not None
        self._next = None
        self._written = {}          # slot number -> the image array written into it

    def read_into(self, frame):
        if self.index >= self.count:
            return False
        if self.interval is not None:
            now = time.monotonic()
            self._next = now if self._next is None else self._next + self.interval
            if self._next > now:
                time.sleep(self._next - now)
        if self._written.get(frame.slot) is not frame.image:
            image = self.frames[self.index % len(self.frames)]
            np.copyto(frame.ensure_shape(image.shape[0], image.shape[1]), image)
            self._written[frame.slot] = frame.image
        frame.index = self.index
        frame.ts = time.time()
        frame.name = None
        self.index += 1
        return True


def start_local_broker(workdir):
    """A Mosquitto on a free loopback port for demos and benchmarks: (process, url) or
    (None, None) when mosquitto is not installed."""
    import shutil
    import socket
    import subprocess
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(workdir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write("listener {} 127.0.0.1\nallow_anonymous true\n".format(port))
    proc = subprocess.Popen([binary, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, "mqtt://127.0.0.1:{}".format(port)
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    return None, None


def run_to_end(sources, task_list, link, qos):
    """Run a real pipeline of these sources (a Source, or [(name, Source)]) and tasks to its
    end, engines prepared first as the daemon does: (the pipeline, seconds it ran)."""
    from edge.pipeline import Pipeline
    from edge.publisher import Publisher
    from edge.stats import TaskStats
    publisher = Publisher(link, None, qos=qos, limit=100000)
    # The backend's allocator, as the daemon's pipeline: mapped frame slots on a Jetson.
    pipeline = Pipeline(sources, task_list, publisher, pool_size=6,
                        allocate=task_list[0].maker.allocate)
    for task in task_list:
        task.frames = 0
        task.stats = TaskStats()
        task.camera_stats = {}
    pipeline.open()
    pipeline.prepare()          # a batching task learns how many cameras share the size
    publisher.start()
    started = time.perf_counter()
    pipeline.start()
    pipeline.wait()
    elapsed = time.perf_counter() - started
    pipeline.join()
    undelivered = publisher.flush(30)
    if undelivered:
        logger.warning("bench: %d messages not delivered", undelivered)
    error = pipeline.error()
    if error is not None:
        raise error
    return pipeline, elapsed


def run_pipeline(source, task_list, link, qos, count_task=0):
    """Run a real pipeline to its end; (frames per second of task 0, stats summary)."""
    _, elapsed = run_to_end(source, task_list, link, qos)
    counted = task_list[count_task]
    return counted.frames / elapsed, counted.stats.summary()


def edge_run_peak_rss(cfg, workdir, args, name="daemon"):
    """Peak RSS (MB) of a real `edge run ARGS` with the bench's backend, models and engines
    (a finite source: it ends by itself), or None when it failed."""
    import subprocess
    import sys
    import yaml
    config_path = os.path.join(workdir, name + ".yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump({"backend": cfg["backend"], "model_dir": cfg["model_dir"],
                        "model_mirror": cfg["model_mirror"], "engine": cfg["engine"],
                        "pipeline": cfg["pipeline"]}, f)
    command = [sys.executable, "-m", "edge", "run", "-c", config_path] + list(args) + [
        "--state-dir", os.path.join(workdir, "daemon"), "--jsonl", os.devnull]
    # VmHWM polled while it runs: wait4's ru_maxrss would include the RSS of this process,
    # which the child had between fork and exec (Linux keeps the larger of the two).
    from edge.backends.build import process_kib
    peak_kib = 0
    log_path = os.path.join(workdir, name + ".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        while proc.poll() is None:
            peak_kib = max(peak_kib, process_kib(proc.pid, "VmHWM"))
            time.sleep(0.05)
    if proc.returncode != 0:
        with open(log_path, "rb") as log:
            logger.warning("bench: edge run for the RSS figure failed: %s",
                           log.read().decode(errors="replace")[-300:])
        return None
    return round(peak_kib / 1024.0, 1)
