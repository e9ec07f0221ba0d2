"""`edge run`: assemble source, tasks, publisher and MQTT link from a config and run them."""

import logging
import signal
import threading


from edge import backends, cards, mqtt, references, sources, tasks
from edge.errors import ConfigError, UnavailableError
from edge.pipeline import Pipeline
from edge.publisher import JsonlSink, Publisher

logger = logging.getLogger(__name__)


def engine_maker(config):
    """The backend with its engine cache and build budget, as the config says."""
    from edge.backends.build import EngineMaker
    from edge.backends.cache import EngineCache
    backend = backends.select(config["backend"], threads=config["pipeline"]["threads"],
                              workspace_mb=config["engine"]["workspace_mb"])
    return EngineMaker(backend, EngineCache(config["engine"]["dir"]),
                       config["engine"]["budget_mb"] * 2 ** 20,
                       config["engine"]["build_timeout"])


def build_tasks(config, maker):
    """The configured tasks, models fetched and checked."""
    built = []
    for key, task in (("detector", "detect"), ("matcher", "match")):
        if not config[key]:
            continue
        card = cards.load(config[key])
        if card.task != task:
            raise ConfigError("{}: card {} is a {} card; use it as --{}".format(
                key, card.name, card.task, "detector" if card.task == "detect" else "matcher"))
        options = {"device": config["device_id"]}
        if task == "match":
            options.update(config["match"], store=reference_store(config))
        built.append(tasks.create(card, maker, config["model_dir"],
                                  mirror=config["model_mirror"], **options))
    return built


def reference_store(config):
    """The device's references, with `reference:` / --reference stored first."""
    store = references.ReferenceStore(config["state_dir"])
    if config["reference"]:
        name = references.name_from_path(config["reference"])
        store.put_file(name, config["reference"])
    return store


def run(config, stop_event=None):
    """Run the pipeline until the source ends or a signal stops it; returns 0 or raises."""
    source = sources.open_source(config["source"])
    maker = engine_maker(config)
    link = None
    if config["mqtt"]["url"]:
        settings = mqtt.parse_url(config["mqtt"]["url"], config["mqtt"]["qos"],
                                  config["mqtt"]["keepalive"])
        link = mqtt.MqttLink(settings, config["device_id"], config["mqtt"]["prefix"],
                             queue_limit=config["mqtt"]["queue"])
    built = build_tasks(config, maker)
    jsonl = JsonlSink(config["jsonl"]) if config["jsonl"] else None
    qos = settings["qos"] if link else 0
    publisher = Publisher(link, jsonl, qos=qos, limit=config["mqtt"]["queue"])
    pipeline = Pipeline(source, built, publisher, pool_size=config["pipeline"]["pool"],
                        max_frames=config["max_frames"], allocate=maker.allocate)
    pipeline.open()
    stop_event = stop_event or threading.Event()
    restore = _handle_signals(stop_event)
    reason = "finished"
    try:
        if link:
            link.start()
            link.set_status("online")
        publisher.start()
        pipeline.start()
        logger.info("running %s on %s with %s", ", ".join(t.card.name for t in built),
                    config["source"], maker.backend.describe())
        while pipeline.alive():
            if stop_event.wait(0.1):
                reason = "stopped"
                logger.info("stopping: finishing frames in flight")
                pipeline.stop()
                break
        pipeline.join()
        undelivered = publisher.flush(config["mqtt"]["flush_timeout"])
        error = pipeline.error()
        if error is not None:
            reason = "error: {}".format(error)
            raise error
        if undelivered and link:
            raise UnavailableError(
                "mqtt {}: {} of {} messages not delivered within {:.0f} s ({}); check the "
                "broker URL (--mqtt) and that the broker runs".format(
                    link.settings["display"], undelivered, publisher.accepted,
                    config["mqtt"]["flush_timeout"], link.probe_error()))
        logger.info("done: %d frames, %d messages, %d dropped", pipeline.delivered,
                    publisher.accepted, publisher.dropped)
        return 0
    finally:
        restore()
        if link:
            link.stop(reason if len(reason) < 200 else reason[:200])
        if jsonl:
            jsonl.close()


def _handle_signals(stop_event):
    """SIGTERM and SIGINT set the stop event (main thread only); returns an undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, _frame):
        stop_event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)
    return restore


