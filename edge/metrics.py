"""Prometheus metrics: `/metrics` on a local port (config `metrics.port`, `--metrics-port`).

A scrape builds every figure from the daemon's own state at that moment (a fresh health
report, with the system figures of the latest health interval, and the tasks' latency
histograms), so the hot path does no work for metrics and nothing is imported unless the port
is set. The names are listed in the README ("Prometheus metrics"); the `camera` label is
`default` until sources are named.

prometheus-client renders the text format; `edge` serves it with a small HTTP server of its
own, since `start_http_server` cannot be stopped in the releases a Python 3.6 device can
install (0.8 to 0.17; it hands back its server from 0.20 on) and bounds neither its threads
nor how long a client may keep one. Ours stops with the daemon, whatever its clients do.
"""

import logging
import threading
from http.server import BaseHTTPRequestHandler

from edge.errors import ConfigError
from edge.httpserve import ThreadPerClientServer

logger = logging.getLogger(__name__)

CAMERA = "default"      # the camera label of a single unnamed source
ENGINE_STATES = ("building", "ready", "failed")
_MS = 1000.0
_PERCENT = 100.0

# edge_info: one label per fact of the health report's `versions`, the backend's part spread
# over backend, backend_version and backend_device so that a fleet query reads the same on
# ONNX Runtime and TensorRT devices. The `device` label is the device id, as everywhere.
INFO_LABELS = ("version", "python", "backend", "backend_version", "backend_device", "cuda",
               "jetpack", "l4t", "board", "os")
# The key under which a backend's describe() gives the version of the runtime it wraps (the
# API document's BackendVersions); a new backend adds its key here and there.
RUNTIME_VERSION_KEYS = ("onnxruntime", "tensorrt")

# The server: a thread per connection, at most MAX_CLIENTS at once; a connection that sends
# nothing (or stops reading) for TIMEOUT_S seconds is dropped. Prometheus sends its request
# at once and scrapes every 15 s or so: a few handlers are plenty, and more connections wait
# in the listen backlog (edge.httpserve, capped by net.core.somaxconn) for a free one.
MAX_CLIENTS = 16
TIMEOUT_S = 5.0


def _prometheus():
    try:
        import prometheus_client
        from prometheus_client import core
    except ImportError as e:
        raise ConfigError("metrics.port is set but prometheus-client is not installed ({}); "
                          "install it (pip install 'prometheus-client>=0.8') or unset "
                          "metrics.port".format(e))
    return prometheus_client, core


class DaemonCollector:
    """A prometheus-client collector reading one daemon (`app`: its snapshot, and its health
    report of that snapshot) at each scrape."""

    def __init__(self, app):
        self.app = app
        _, self.core = _prometheus()

    def collect(self):
        core = self.core
        app = self.app
        view = app.snapshot()
        report = app.health.report(sample_system=False, view=view)
        device = [("device", view.device)]

        def family(kind, name, help_text, labels=()):
            cls = {"gauge": core.GaugeMetricFamily, "counter": core.CounterMetricFamily,
                   "histogram": core.HistogramMetricFamily}[kind]
            return cls(name, help_text, labels=[k for k, _ in device] + list(labels))

        info = family("gauge", "edge_info", "Versions of the device (value 1); an empty "
                      "label is a fact this device does not have.", INFO_LABELS)
        info.add_metric([view.device] + info_values(report["versions"]), 1)
        yield info
        yield _one(family("gauge", "edge_uptime_seconds", "Seconds since the daemon started."),
                   view.device, report["uptime_s"])
        yield _one(family("gauge", "edge_healthy", "1 when the health verdict is healthy."),
                   view.device, 1 if report["verdict"]["healthy"] else 0)
        yield from self._source(family, view.device, report)
        yield from self._tasks(family, view)
        yield from self._engines(family, view.device, report)
        yield from self._outputs(family, view, report)
        yield from self._system(family, view.device, report)

    def _source(self, family, device, report):
        named = report.get("cameras") or {}
        cameras = sorted(named.items()) if named else [(CAMERA, report["source"])]
        for name, help_text, key in (
                ("edge_source_frames", "Frames captured.", "frames"),
                ("edge_source_dropped_frames", "Frames a live source dropped because every "
                 "task was still busy (newest frame kept).", "dropped"),
                ("edge_source_skipped_frames", "Frames a file or folder skipped (damaged, "
                 "too large).", "skipped"),
                ("edge_source_reopens", "Times the source was opened again after a "
                 "failure.", "reopens")):
            metric = family("counter", name, help_text, ("camera",))
            for camera, figures in cameras:
                metric.add_metric([device, camera], figures.get(key, 0))
            yield metric

    def _tasks(self, family, view):
        device = view.device
        labels = ("task", "model", "camera")
        frames = family("counter", "edge_task_frames", "Frames a task processed.", labels)
        dropped = family("counter", "edge_task_dropped_frames", "Frames a task dropped: it "
                         "was busy with an older one.", labels)
        queue = family("gauge", "edge_task_queue_frames", "Frames waiting for a task.", labels)
        fps = family("gauge", "edge_task_fps", "Frames per second a task processed over the "
                     "last 10 s.", labels)
        infer = family("histogram", "edge_inference_seconds", "Time of the engine run per "
                       "frame.", labels)
        latency = family("histogram", "edge_frame_latency_seconds", "Capture to message "
                         "queued for publishing, per frame.", labels)
        from edge.stats import BUCKETS_MS
        bounds = ["{:g}".format(b / _MS) for b in BUCKETS_MS] + ["+Inf"]
        for task in (view.pipeline.tasks if view.pipeline is not None else []):
            for lane in task.cameras:
                values = [device, task.name, task.model, lane.camera or CAMERA]
                frames.add_metric(values, lane.frames)
                dropped.add_metric(values, lane.dropped)
                queue.add_metric(values, lane.queued)
                if lane.fps is not None:
                    fps.add_metric(values, lane.fps)
                for metric, (counts, total_ms) in ((infer, lane.infer), (latency, lane.total)):
                    metric.add_metric(values, list(zip(bounds, counts)), total_ms / _MS)
        yield from (frames, dropped, queue, fps, infer, latency)

    def _engines(self, family, device, report):
        state = family("gauge", "edge_engine_state", "1 for the state an engine is in "
                       "(building, ready, failed), 0 for the others.", ("engine", "state"))
        elapsed = family("gauge", "edge_engine_build_seconds", "Seconds the engine's build "
                         "or load took (so far, while building).", ("engine",))
        for label, engine in sorted(report["engines"].items()):
            for name in ENGINE_STATES:
                state.add_metric([device, label, name], 1 if engine["state"] == name else 0)
            elapsed.add_metric([device, label], engine.get("elapsed_s") or 0.0)
        yield state
        yield elapsed

    def _outputs(self, family, view, report):
        device = view.device
        mqtt = report["mqtt"]
        if mqtt is not None:
            yield _one(family("gauge", "edge_mqtt_connected", "1 while connected to the "
                              "broker."), device, 1 if mqtt["connected"] else 0)
            yield _one(family("counter", "edge_mqtt_connects", "Connections made to the "
                              "broker (reconnects included)."), device, mqtt["connects"])
        publisher = view.publisher
        if publisher is not None:
            yield _one(family("gauge", "edge_publish_queue_messages", "Messages waiting to "
                              "be published, or handed to MQTT and not yet acknowledged."),
                       device, publisher.queue)
            yield _one(family("counter", "edge_publish_dropped_messages", "Messages dropped "
                              "because the publish queue was full (oldest first)."),
                       device, publisher.dropped)
            yield _one(family("counter", "edge_publish_sent_messages", "Messages handed to "
                              "MQTT (or written, without MQTT)."), device, publisher.sent)
        commands = report.get("commands")
        if commands:
            metric = family("counter", "edge_commands", "Command requests by outcome: "
                            "handled, dropped (no reply: queue full or past the reply budget), rate_limited.",
                            ("outcome",))
            for outcome in ("handled", "dropped", "rate_limited"):
                metric.add_metric([device, outcome], commands[outcome])
            yield metric

    def _system(self, family, device, report):
        system = report["system"] or {}
        # Ratios 0..1, Prometheus' convention for a share; the health report keeps percent.
        cpu = family("gauge", "edge_cpu_busy_ratio", "Busy share per CPU core over the latest "
                     "health interval, 0 to 1.", ("core",))
        for core, percent in enumerate(system.get("cpu_percent") or []):
            if percent is not None:
                cpu.add_metric([device, str(core)], _ratio(percent))
        yield cpu
        memory = system.get("memory") or {}
        swap = system.get("swap") or {}
        gpu = system.get("gpu") or {}
        fan = system.get("fan") or {}
        for name, help_text, value in (
                ("edge_memory_used_ratio", "Share of memory in use, 0 to 1.",
                 _ratio(memory.get("used_percent"))),
                ("edge_memory_available_bytes", "Memory available to programs.",
                 _mib(memory.get("available_mb"))),
                ("edge_memory_total_bytes", "Physical memory.", _mib(memory.get("total_mb"))),
                ("edge_swap_used_bytes", "Swap in use.", _mib(swap.get("used_mb"))),
                ("edge_swap_total_bytes", "Swap space.", _mib(swap.get("total_mb"))),
                ("edge_gpu_load_ratio", "GPU load, 0 to 1.", _ratio(gpu.get("load_percent"))),
                ("edge_fan_speed_ratio", "Fan speed (PWM duty cycle), 0 to 1.",
                 _ratio(fan.get("percent")))):
            if value is not None:
                yield _one(family("gauge", name, help_text), device, value)
        temperatures = family("gauge", "edge_temperature_celsius", "Temperature per sensor.",
                              ("sensor",))
        for sensor, celsius in sorted((system.get("temperatures") or {}).items()):
            if celsius is not None:
                temperatures.add_metric([device, sensor], celsius)
        yield temperatures
        power = system.get("power") or {}
        watts = family("gauge", "edge_power_watts", "Power per rail (`total`: the board).",
                       ("rail",))
        if power.get("total_mw") is not None:
            watts.add_metric([device, "total"], power["total_mw"] / 1000.0)
        for rail, milliwatts in sorted((power.get("rails") or {}).items()):
            value = milliwatts.get("mw") if isinstance(milliwatts, dict) else milliwatts
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                watts.add_metric([device, rail], value / 1000.0)
        yield watts


def _one(metric, device, value):
    metric.add_metric([device], value)
    return metric


def _mib(value):
    return None if value is None else value * 2 ** 20


def _ratio(percent):
    # rounded: the percent figures have one decimal; 0.423, not 0.42300000000000004
    return None if percent is None else round(percent / _PERCENT, 4)


def info_values(versions):
    """edge_info's label values (INFO_LABELS order) from the health report's `versions`."""
    backend = versions.get("backend")
    if not isinstance(backend, dict):
        backend = {}
    runtime = next((backend[key] for key in RUNTIME_VERSION_KEYS if backend.get(key)), None)
    values = [versions.get("edge"), versions.get("python"), backend.get("backend"), runtime,
              backend.get("device"), versions.get("cuda"), versions.get("jetpack"),
              versions.get("l4t"), versions.get("board"), versions.get("os")]
    # Prometheus reads an empty label as an absent one: "" for what is not known here.
    return ["" if value is None else str(value) for value in values]


class MetricsServer:
    """`/metrics` over HTTP for one daemon, in a thread of its own ("metrics")."""

    def __init__(self, app, address, port):
        prometheus_client, _ = _prometheus()
        registry = prometheus_client.CollectorRegistry(auto_describe=False)
        registry.register(DaemonCollector(app))
        # The daemon's own CPU time, memory and open files (process_*): the default registry
        # has them, a registry of our own starts without. Reads /proc; nothing elsewhere.
        prometheus_client.ProcessCollector(registry=registry)
        exposition = prometheus_client.exposition
        # One scrape renders at a time: concurrent scrapers wait their turn here rather
        # than contend with the pipeline for its statistics locks all at once.
        render = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            timeout = TIMEOUT_S     # per socket operation: reading the request, writing back

            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    with render:
                        body = exposition.generate_latest(registry)
                except Exception:   # a bug in a collector: the scrape fails, not the daemon
                    logger.exception("metrics: scrape failed")
                    self.send_error(500, "scrape failed; see the device's log")
                    return
                self.send_response(200)
                self.send_header("Content-Type", exposition.CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass        # a scrape every 15 s would fill the journal

        try:
            self.server = ThreadPerClientServer((address, port), Handler, MAX_CLIENTS)
            self.server.name = "metrics"
        except OSError as e:
            raise ConfigError("metrics: cannot listen on {}:{} ({}); choose another "
                              "metrics.port (--metrics-port) or metrics.address".format(
                                  address, port, e.strerror or e))
        self.address = "{}:{}".format(address, self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                       daemon=True)

    def start(self):
        self.thread.start()
        logger.info("metrics on http://%s/metrics", self.address)
        return self

    def stop(self):
        """Stop serving at once: connections still open are cut, not waited for."""
        self.server.stopping.set()
        if self.thread.is_alive():      # shutdown() waits for serve_forever, if it ever ran
            self.server.shutdown()
        self.server.server_close()
        self.server.cut_clients()
