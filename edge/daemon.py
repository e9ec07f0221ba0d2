"""`edge run`: the daemon. Source, tasks, publisher, MQTT link, health and commands.

The MQTT link, publisher, health and command threads live for the whole process; the
pipeline (source + tasks) is rebuilt on reload (SIGHUP or the `reload` command) from the
config file, with engines whose key did not change loaded from the cache.
"""

import collections
import logging
import signal
import threading
import time

from edge import backends, cameras, cards, config as configuration, mqtt, references, sources
from edge import systemd, tasks
from edge.errors import ConfigError, EdgeError, UnavailableError
from edge.pipeline import Pipeline
from edge.publisher import JsonlSink, Publisher
from edge.urls import redact

logger = logging.getLogger(__name__)


def engine_maker(config):
    """The backend with its engine cache and build budget, as the config says."""
    from edge.backends.build import EngineMaker
    from edge.backends.cache import EngineCache
    backend = backends.select(config["backend"], threads=config["pipeline"]["threads"],
                              workspace_mb=config["engine"]["workspace_mb"],
                              tactic_sources=config["engine"]["tactic_sources"])
    engine = config["engine"]
    return EngineMaker(backend, EngineCache(engine["dir"], engine["cache_mb"]),
                       engine["budget_mb"] * 2 ** 20, engine["build_timeout"],
                       engine["reserve_mb"] * 2 ** 20, engine["precision"])


def reference_store(config):
    """The device's references: those stored over MQTT, and `reference:` / --reference (the
    run's own, in memory: never stored)."""
    store = references.ReferenceStore(config["state_dir"], config["match"]["max_references"],
                                      config["max_image_pixels"])
    if config["reference"]:
        store.configure(config["reference"])
    return store


def open_cameras(config):
    """[(camera name or None, unopened Source)] of the config's cameras."""
    return [(name, sources.open_source(uri, config["max_image_pixels"]))
            for name, uri in cameras.configured(config)]


def configured_tasks(config):
    """[(task class, card)] of the tasks the configuration names (`detector`, `matcher`,
    each kind's `config_key`), in KINDS order; ConfigError for a card of another kind."""
    found = []
    for cls in tasks.kinds():
        name = config.get(cls.config_key)
        if not name:
            continue
        card = cards.load(name)
        if card.task != cls.name:
            raise ConfigError("{}: card {} is a {} card; use it as --{}".format(
                cls.config_key, card.name, card.task, tasks.kind(card.task).config_key))
        found.append((cls, card))
    return found


def build_tasks(config, maker, store, source=None):
    """The configured tasks, models fetched and checked; with a stereo source and
    stereo.calib, the depth task last (detection asks it for `spatial`). `source`: a Source
    or [(camera name, Source)] (open_cameras)."""
    from edge.stereo import task as stereo_depth
    depth = stereo_depth.create(config, maker, source) if source is not None else None
    built = []
    for cls, card in configured_tasks(config):
        built.append(tasks.create(card, maker, config["model_dir"], mirror=config["model_mirror"],
                                  **cls.options(config, maker, store, depth)))
    if depth is not None:
        built.append(depth)
    return built


def _system_status():
    """(edge.system's report, sampled CPU included; closing it; the build watch's reader of
    a process's GPU memory, through jtop where it runs); Nones where edge.system is not
    usable."""
    try:
        from edge import system
    except ImportError:
        return None, None, None
    from edge.backends.build import gpu_memory_reader
    sampler = system.CpuSampler()
    client = system.open_jtop()

    def status():
        report = system.system_status(jtop_client=client)
        if report.get("source") != "jtop":
            report["cpu_percent"] = sampler.sample()
        return report
    return status, lambda: system.close_jtop(client), gpu_memory_reader(client)


class DaemonView(collections.namedtuple("DaemonView", (
        "device started pipeline starting publisher link engines commands motion reload "
        "source_display uris"))):
    """The daemon for observers (health, metrics), read in one go: its device name and start
    time; the pipeline's view (edge.pipeline.PipelineView, None while engines are prepared)
    and whether frames flow yet (`starting`); the publisher's and the broker link's views
    (None without them); the engines its tasks hold, (label, precision); the counts of the
    commands and `motion` topics (None without MQTT); the latest reload; the sources as
    shown, and every source URI configured or running (what redaction hides)."""


class Daemon:
    """One `edge run`: long-lived MQTT link, publisher, health and commands; a pipeline."""

    def __init__(self, config, config_path=None, overrides=None):
        # zones and lines saved over the web API win over the file's (edge.web)
        self.config = configuration.with_saved_regions(config)
        self.config_path = config_path
        self.overrides = overrides or {}
        self.device = config["device_id"]
        self.started = time.time()
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.link = None
        self.publisher = None
        self.jsonl = None
        self.pipeline = None
        self.tasks = []
        self.store = None
        self.maker = None
        self._gpu_memory = None   # a build process's GPU memory, from the system's readers
        self.health = None
        self.commands = None
        self.motion = None          # edge.motioninput.MotionInput: the `motion` topics
        self.metrics = None         # edge.metrics.MetricsServer when metrics.port is set
        self.web = None             # edge.web.WebServer when web.port is set
        self.regions_lock = threading.Lock()    # held by a reload, tried by the web API
        if config["web"]["port"]:
            from edge.web import read_token
            read_token(config["web"])       # a bad token file fails now, before any build
        self.source_display = cameras.display(config)    # no camera passwords in health
        self.generations = 0
        self.last_reload = None     # {"ts", "ok", "error"} of the latest reload, for health
        # systemd: the build child must not inherit NOTIFY_SOCKET (it would pose as us)
        self.ready = False
        self.build_beats = 0     # build progress events: the watchdog's food while building
        # Work of the pipelines a reload replaced: a new pipeline counts from 0, and progress
        # must never go back (the watchdog pings only once it passes its last count).
        self._work_before = 0
        self._pipeline_started = 0.0
        self.notifier = systemd.Notifier.from_environ(unset_environment=True)
        self.watchdog = systemd.Watchdog(self.notifier, self.progress)

    # -- the operations commands and signals use --------------------------------------

    def snapshot(self):
        """A DaemonView of this moment."""
        pipeline = self.pipeline
        view = pipeline.snapshot() if pipeline is not None else None
        uris = list(view.uris) if view is not None else []
        if self.config:
            uris.extend(uri for _, uri in cameras.configured(self.config))
        return DaemonView(
            self.device, self.started, view, pipeline is None or pipeline.started is None,
            self.publisher.snapshot() if self.publisher is not None else None,
            self.link.snapshot() if self.link is not None else None,
            [(label, task.precision) for task in self.tasks for label in task.engine_labels()],
            self.commands.counts() if self.commands is not None else None,
            self.motion.counts() if self.motion is not None else None,
            self.last_reload, self.source_display, uris)

    def next_frame(self, timeout=5.0, camera=None):
        """A copy of the next captured frame of a camera (default: the first) and its index
        (snapshots, references)."""
        pipeline = self.pipeline
        return pipeline.tap(timeout, camera) if pipeline is not None else None

    def request_reload(self):
        """Check the config file now and have the main loop rebuild the pipeline from it; the
        EdgeError of a config that does not load (the running one stays)."""
        try:
            self._load_checked()
        except EdgeError as e:
            self._reloaded(e)
            raise
        self.reload_event.set()

    def _load_checked(self):
        """The config file loaded, and the files it names that a rebuild would read and can
        be checked without opening a camera (the stereo calibration); an EdgeError, while
        the running pipeline is still untouched, when one is bad."""
        config = configuration.with_saved_regions(
            configuration.load(self.config_path, self.overrides))
        if config["stereo"]["calib"]:
            from edge.stereo import calibration
            calibration.load(config["stereo"]["calib"], config["max_image_pixels"], maps=False)
        return config

    def _reloaded(self, error=None):
        """Keep a reload's outcome for health (the operator who asked learns it there)."""
        if error is not None:
            logger.error("reload failed, keeping the running configuration: %s", error)
        self.last_reload = {"ts": round(time.time(), 3), "ok": error is None,
                            "error": None if error is None else str(error)}

    def progress(self):
        """Work done so far: frames the tasks processed, frames no task was due on, build
        progress. The watchdog is fed only while this grows, so a hung inference thread,
        a camera that delivers nothing, or a stuck build gets the service restarted."""
        return self._work_before + self._work_now() + self.build_beats

    def _work_now(self):
        """Frames the current pipeline's tasks processed or had no work on."""
        pipeline = self.pipeline
        return sum(t.frames for t in self.tasks) + (pipeline.idle if pipeline else 0)

    def _on_build(self, state):
        self.build_beats += 1

    def _tick_systemd(self, preparing=False):
        """Called from the main loop every 0.1 s: READY once working, extensions, watchdog."""
        from edge.backends import build
        if not self.ready:
            building = any(s["state"] == "building" for s in build.states().values())
            working = any(t.frames for t in self.tasks)
            if building:
                # First boot on a Nano: the engine build takes minutes; keep the start job
                # alive while it makes progress (TimeoutStartSec= alone would kill it).
                self.watchdog.extend_while_building(60)
            elif preparing:
                pass    # loading engines: READY comes once frames flow; a hang times out
            elif working or time.monotonic() - self._pipeline_started > 5.0:
                self.ready = True
                self.notifier.ready("running {} on {}".format(
                    ", ".join(t.card.name for t in self.tasks), self.source_display))
        self.watchdog.tick()

    def _on_report(self, report):
        from edge.health import summary_line
        self.notifier.status(summary_line(report))

    # -- life cycle --------------------------------------------------------------------

    def _open_outputs(self):
        config = self.config
        qos = 0
        if config["mqtt"]["url"]:
            settings = mqtt.configured(config["mqtt"])
            self.link = mqtt.MqttLink(settings, self.device, config["mqtt"]["prefix"],
                                      queue_limit=config["mqtt"]["queue"],
                                      protocol=config["mqtt"]["protocol"],
                                      max_packet=config["commands"]["max_bytes"] +
                                      mqtt.PACKET_HEADROOM)
            qos = settings["qos"]
        self.jsonl = JsonlSink(config["jsonl"]) if config["jsonl"] else None
        self.publisher = Publisher(self.link, self.jsonl, qos=qos, limit=config["mqtt"]["queue"])

    def _build_pipeline(self, config):
        """A new pipeline for the config; raises (and leaves the old one) when it is bad."""
        opened = open_cameras(config)
        maker = engine_maker(config)
        store = reference_store(config) if any(
            cls.references for cls, _ in configured_tasks(config)) else None
        built = build_tasks(config, maker, store, opened)
        pipeline = Pipeline(opened, built, self.publisher, pool_size=config["pipeline"]["pool"],
                            max_frames=config["max_frames"], allocate=maker.allocate)
        pipeline.open()
        return pipeline, built, store, maker

    def _start_services(self):
        from edge.commands import Commands
        from edge.health import Health
        from edge.motioninput import MotionInput
        config = self.config
        status, close, self._gpu_memory = _system_status()
        self._close_system = close or (lambda: None)
        self.health = Health(self, config["health"]["interval"], config["health"],
                             system_status=status,
                             versions=_versions(self.maker.backend.describe()),
                             on_report=self._on_report)
        from edge.backends import build
        build.add_listener(self._on_build)
        if config["metrics"]["port"]:
            from edge.metrics import MetricsServer
            self.metrics = MetricsServer(self, config["metrics"]["address"],
                                         config["metrics"]["port"]).start()
        if config["web"]["port"]:
            from edge.web import WebServer
            self.web = WebServer(self, config["web"]).start()
        if self.link is not None:
            self.link.on_change = self.health.wake.set     # a fresh verdict, now
            self.commands = Commands(self, **config["commands"])
            self.link.on_command = self.commands.submit
            self.motion = MotionInput(self.link, lambda: [
                name for name, _ in cameras.configured(self.config)])
            self.link.on_motion = self.motion.submit
            self.commands.start()
            self.link.start()
        self.publisher.start()

    def run(self):
        """Run until the source ends or a signal stops it; 0, or raises the run's error."""
        self._open_outputs()
        self.pipeline, self.tasks, self.store, self.maker = self._build_pipeline(self.config)
        self._close_system = lambda: None
        restore = _handle_signals(self.stop_event, self.reload_event)
        reason = "finished"
        try:
            self._start_services()
            start = True
            while True:
                if start and not self._start_pipeline():
                    reason = "stopped"
                    break
                ended = self._wait()
                if ended == "reload":
                    start = self._reload()
                    continue
                reason = ended
                break
            self.pipeline.join()
            return self._finish()
        except Exception as e:   # EdgeError or a bug: the last status says which
            reason = "error: {}".format(e)
            raise
        finally:
            restore()
            self._shutdown(reason)

    def _start_pipeline(self):
        """Build the engines, then start the pipeline; False when a signal stopped us first."""
        self.generations += 1
        self.source_display = cameras.display(self.config)
        if not self.health.is_alive():
            self.health.start()        # reports the builds while they run
        if not self._prepare():
            return False
        self._pipeline_started = time.monotonic()
        self.pipeline.start()
        # `status` leaves `starting` with the first health report of the running pipeline:
        # `online` or `degraded` as its verdict says (never online before anything was checked)
        self.health.wake.set()          # report the running pipeline now
        logger.info("running %s on %s with %s", ", ".join(t.card.name for t in self.tasks),
                    self.source_display, self.maker.backend.describe())
        return True

    def _prepare(self):
        """Build or load every engine the tasks need before frames flow (Pipeline.prepare),
        in a thread, while this one keeps systemd's start job extended and watches for a
        stop; False when a signal came first (the build child dies with us)."""
        errors = []
        if self._gpu_memory is not None:
            self.maker.gpu_memory = self._gpu_memory    # jtop's table, once it is open

        def prepare():
            try:
                self.pipeline.prepare()
            except Exception as e:  # a finite source that fails: the run's error
                errors.append(e)
        worker = threading.Thread(target=prepare, name="prepare", daemon=True)
        worker.start()
        while worker.is_alive():
            if self.stop_event.wait(0.1):
                logger.info("stopping while engines are prepared")
                self.notifier.stopping("stopping")
                return False
            self._tick_systemd(preparing=True)
        if errors:
            raise errors[0]
        return True

    def _wait(self):
        """'finished' (source ended or error), 'stopped' (signal) or 'reload'."""
        while self.pipeline.alive():
            if self.stop_event.wait(0.1):
                logger.info("stopping: finishing frames in flight")
                self.notifier.stopping("stopping: finishing frames in flight")
                self.pipeline.stop()
                return "stopped"
            if self.reload_event.is_set():
                return "reload"
            self._tick_systemd()
        return "finished"

    def _reload(self):
        """Rebuild the pipeline from the config file; True when there is a new one to start.

        A config that does not load leaves the running pipeline alone. The source must be
        closed before the new one opens it (a camera opens once), so a config that loads but
        cannot be built brings the previous configuration back.
        """
        self.reload_event.clear()
        logger.info("reloading %s", self.config_path or "the configuration")
        self.notifier.reloading("reloading")
        self.ready = False        # READY=1 again once the new pipeline works
        # the web API changes no zone from reading the saved ones to the new tasks (503)
        with self.regions_lock:
            return self._rebuild()

    def _rebuild(self):
        """The reload's work: the config loaded, the running pipeline stopped, the new one
        built (or the running configuration's again)."""
        try:
            config = self._load_checked()
        except EdgeError as e:
            self._reloaded(e)
            return False
        for key in ("mqtt", "device_id", "jsonl", "health", "commands", "metrics", "web"):
            if config[key] != self.config[key]:
                logger.warning("reload: %s changed; it takes effect after a restart", key)
                config[key] = self.config[key]
        self.pipeline.stop()
        self.pipeline.join()
        self._work_before += self._work_now()
        try:
            new = self._build_pipeline(config)
            self._reloaded()
        except Exception as e:  # an EdgeError, or a bug: the running configuration comes back
            if not isinstance(e, EdgeError):
                logger.exception("reload: building the pipeline failed")
                e = EdgeError("internal error: {}: {}".format(type(e).__name__, e))
            self._reloaded(e)
            config, new = self.config, self._build_pipeline(self.config)
        self.config = config
        self.pipeline, self.tasks, self.store, self.maker = new
        return True

    def _finish(self):
        config = self.config
        self._stop_health()
        undelivered = self.publisher.flush(config["mqtt"]["flush_timeout"])
        error = self.pipeline.error()
        if error is not None:
            raise error
        if undelivered and self.link:
            raise UnavailableError(
                "mqtt {}: {} of {} messages not delivered within {:.0f} s ({}); check the "
                "broker URL (--mqtt) and that the broker runs".format(
                    self.link.settings["display"], undelivered, self.publisher.accepted,
                    config["mqtt"]["flush_timeout"], self.link.probe_error()))
        logger.info("done: %d frames, %d messages, %d dropped", self.pipeline.delivered,
                    self.publisher.accepted, self.publisher.dropped)
        return 0

    def _shutdown(self, reason):
        if self.pipeline is not None and self.pipeline.alive():
            self.pipeline.stop()
            self.pipeline.join()
        self._stop_health()
        if self.metrics is not None:
            self.metrics.stop()
        if self.web is not None:
            self.web.stop()
        if self.commands is not None:
            self.commands.stop()
        if self.publisher is not None and self.publisher.is_alive():
            self.publisher.flush(min(2.0, self.config["mqtt"]["flush_timeout"]))
        if self.link is not None:
            # redacted whole, then cut: a URL cut before its `@` would escape redaction
            self.link.stop(redact(reason)[:200])
        if self.jsonl is not None:
            self.jsonl.close()
        self._close_system()
        self.notifier.close()

    def _stop_health(self):
        """Stop the health thread and queue the final figures as the retained report, so an
        operator sees how the run ended (source finished, frames, drops) rather than the
        figures of its last interval. Once: a stopped health thread is left alone."""
        if self.health is None or not self.health.is_alive():
            return
        self.health.stop()
        self.health.join(2.0)
        try:
            self.health.publish()
        except Exception:   # a report must never stand in the way of the shutdown
            logger.exception("final health report failed")


def _versions(backend):
    """Versions for health: edge.system's full set where it is available."""
    import platform
    from edge import __version__
    try:
        from edge import system
    except ImportError:
        return {"edge": __version__, "python": platform.python_version(), "backend": backend}
    return system.versions(backend)


def run(config, config_path=None, overrides=None):
    """Run the daemon for a loaded config; returns the exit status or raises an EdgeError."""
    return Daemon(config, config_path, overrides).run()


def _handle_signals(stop_event, reload_event):
    """SIGTERM/SIGINT set the stop event, SIGHUP the reload event (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def stop(signum, _frame):
        stop_event.set()

    def reload(signum, _frame):
        reload_event.set()

    for sig, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
        previous[sig] = signal.signal(sig, handler)

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)
    return restore
