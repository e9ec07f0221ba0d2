"""The health report: every part's state, the system's figures, and a verdict with reasons.

`Health.report()` builds the retained `health` payload; the "health" thread publishes it
every `health.interval` seconds and whenever the verdict changes, and keeps the `status`
topic at `online` or `degraded` to match.
"""

import logging
import platform
import threading
import time

from edge import __version__
from edge.urls import redacted

logger = logging.getLogger(__name__)

# The reason a device gives while its broker is away: reported locally (logs, systemd STATUS=,
# `edge doctor`), never as the `status` topic's reason, which nobody could read meanwhile.
MQTT_DOWN = "mqtt broker unreachable"


TEXT_MAX = 1000    # characters of one string in a report (an exception's text can be any)
# Seconds messages may wait with none leaving while the broker is connected, before the
# queue counts as stuck: a QoS 1 backlog drains in well under that, one acknowledgement at a
# time, unless the broker (or the client library) stopped taking messages.
STALLED_S = 10.0


def _bounded(value):
    """The report with every string cut to TEXT_MAX characters: robots drop a report with a
    string past the API document's maxLength (16384), and a verdict quotes errors."""
    if isinstance(value, str):
        return value if len(value) <= TEXT_MAX else value[:TEXT_MAX - 1] + "\u2026"
    if isinstance(value, dict):
        return {key: _bounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_bounded(item) for item in value]
    return value


def verdict(report, limits, every_frame=()):
    """(healthy, reasons) for a report under the configured limits; `every_frame`: the
    tasks that run on every frame (health.min_fps holds them, not the background ones)."""
    reasons = []
    source = report["source"]
    cameras = report.get("cameras")
    if cameras:
        for name, camera in sorted(cameras.items()):
            if camera["state"] in ("reconnecting", "failed"):
                reasons.append("camera {} {}: {}".format(name, camera["state"],
                                                         camera.get("error") or "no frames"))
    elif source["state"] in ("reconnecting", "failed"):
        reasons.append("camera {}: {}".format(source["state"], source.get("error") or "no frames"))
    for name, task in report["tasks"].items():
        if task.get("error"):
            reasons.append("task {} failed: {}".format(name, task["error"]))
        elif limits.get("min_fps") and name in every_frame and task["fps"] is not None and \
                report["uptime_s"] > 30 and task["fps"] < limits["min_fps"]:
            reasons.append("task {} at {:.1f} fps, below {:.1f}".format(
                name, task["fps"], limits["min_fps"]))
    for label, engine in report["engines"].items():
        if engine["state"] == "failed":
            reasons.append("engine {} failed: {}".format(label, engine.get("error")))
    mqtt = report["mqtt"]
    if mqtt and not mqtt["connected"] and mqtt.get("error"):
        reasons.append("{}: {}".format(MQTT_DOWN, mqtt["error"]))
    if mqtt and mqtt.get("dropped_recent"):
        reasons.append("publish queue dropping ({} messages in the last interval)".format(
            mqtt["dropped_recent"]))
    if mqtt and (mqtt.get("stalled_s") or 0) >= STALLED_S and \
            not (not mqtt["connected"] and mqtt.get("error")):
        reasons.append("publish queue stuck: nothing has left it for {:.0f} s ({} messages "
                       "waiting)".format(mqtt["stalled_s"], mqtt["queue"]))
    jsonl = report.get("jsonl")
    if jsonl and jsonl.get("error"):
        reasons.append(jsonl["error"])
    system = report["system"] or {}
    for name, celsius in sorted((system.get("temperatures") or {}).items()):
        if celsius is not None and celsius >= limits["temperature_c"]:
            reasons.append("temperature {} {:.0f} C >= {:.0f} C".format(
                name, celsius, limits["temperature_c"]))
    memory = system.get("memory") or {}
    if memory.get("used_percent") is not None and \
            memory["used_percent"] >= limits["memory_percent"]:
        reasons.append("memory {:.0f}% used >= {:.0f}%".format(memory["used_percent"],
                                                               limits["memory_percent"]))
    if system.get("throttled"):
        reasons.append("throttled")
    reload = report.get("reload")
    if reload and not reload["ok"]:
        reasons.append("reload failed, the previous configuration runs: {}".format(
            reload["error"]))
    return not reasons, reasons


# A summary's state for several cameras: the first of these any camera is in.
_WORST_FIRST = ("failed", "reconnecting", "opening", "open", "finished", "stopped")


def camera_report(camera):
    """One camera's part of the report (a CameraView): state, figures, last error."""
    report = {"uri": camera.uri, "state": camera.state, "frames": camera.frames,
              "fps": camera.fps, "reopens": camera.reopens, "dropped": camera.dropped,
              "skipped": camera.skipped, "error": camera.error}
    if camera.unpaired is not None:      # stereo sources: frames that found no partner
        report["unpaired"] = camera.unpaired
    return report


def camera_reports(view, display):
    """(`source`, `cameras` or None) of the report, from a pipeline's snapshot (None: no
    pipeline): the one unnamed camera is `source`; named cameras are `cameras` by name, and
    `source` sums them up (worst state, totals)."""
    if view is None:
        return {"uri": display, "state": "stopped", "frames": 0, "reopens": 0, "dropped": 0,
                "skipped": 0, "error": None}, None
    reports = [(camera.name, camera_report(camera)) for camera in view.cameras]
    if reports[0][0] is None:
        source = dict(reports[0][1])
        del source["fps"]                 # the detect task's fps says it
        return source, None
    cameras = dict(reports)
    states = {report["state"] for report in cameras.values()}
    errors = ["{}: {}".format(name, report["error"]) for name, report in reports
              if report["error"]]
    source = {"uri": display, "state": next(s for s in _WORST_FIRST if s in states),
              "error": errors[0] if errors else None}
    for key in ("frames", "reopens", "dropped", "skipped", "unpaired"):
        values = [report[key] for report in cameras.values() if key in report]
        if values:
            source[key] = sum(values)
    source = {key: source[key] for key in ("uri", "state", "frames", "reopens", "dropped",
                                           "skipped", "error", "unpaired") if key in source}
    return source, cameras


class Health(threading.Thread):
    """Builds and publishes health reports for one running daemon (`app`: its reports read
    only `app.snapshot()`; they go out through `app.publisher` and `app.link`)."""

    def __init__(self, app, interval, limits, system_status=None, versions=None,
                 on_report=None):
        super().__init__(name="health", daemon=True)
        self.app = app
        self.interval = interval
        self.limits = limits
        self.system_status = system_status     # callable -> system dict, or None
        self.versions = versions or {"edge": __version__, "python": platform.python_version()}
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.healthy = None
        self.status = None              # (state, reason) last given to the `status` topic
        self.on_report = on_report      # callable(report): the systemd STATUS= line
        self._dropped_seen = 0
        self._system = None             # the latest system figures sampled

    def report(self, sample_system=True, view=None):
        """The health payload (DESIGN.md, `health` topic), from the daemon's snapshot
        (`view`: one taken already, edge.daemon.DaemonView).

        `sample_system=False`: the system figures of the latest sampled report (a scrape of
        /metrics must not shorten the CPU sampler's interval or wake jtop)."""
        # The system first: sampling it takes a while, and the daemon (the connection's
        # state) is read after it, so a report never calls the broker down just after it
        # connected.
        system = None if sample_system else self._system
        if self.system_status is not None and sample_system:
            try:
                system = self._system = self.system_status()
            except Exception:   # a broken sensor must not take health down
                logger.exception("system status failed")
        daemon = view or self.app.snapshot()
        now = time.time()
        view = daemon.pipeline
        source, cameras = camera_reports(view, daemon.source_display)
        tasks = {}
        for task in (view.tasks if view is not None else []):
            summary = dict(task.summary, model=task.model, queue=task.queue,
                           dropped=task.dropped, error=task.error)
            summary.update(task.health)
            tasks[task.name] = summary
        from edge.backends import build
        # The engines the tasks hold now (loaded from the cache or built in this run), plus
        # builds running or failed; engines dropped since (a reload, an LRU eviction) are not.
        engines = {}
        builds = build.states()
        for engine_label, precision in daemon.engines:
            engines[engine_label] = dict(builds.get(engine_label) or {
                "state": "ready", "phase": "loaded", "progress": 1.0, "elapsed_s": 0.0,
                "error": None, "peak_mb": 0.0})
            if precision:
                engines[engine_label]["precision"] = precision
        for label, state in sorted(builds.items()):
            if state["state"] != "ready":
                engines.setdefault(label, state)
        publisher, link = daemon.publisher, daemon.link
        mqtt = None
        if publisher is not None and link is not None:
            mqtt = {"connected": link.connected,
                    "queue": publisher.queue, "sent": publisher.sent,
                    "delivered": publisher.delivered, "lost": publisher.lost,
                    "stalled_s": publisher.stalled_s, "dropped": publisher.dropped,
                    "dropped_recent": publisher.dropped - self._dropped_seen,
                    "connects": link.connects, "error": link.error}
        jsonl = publisher.jsonl if publisher is not None else None
        report = {"v": 1, "device": daemon.device, "ts": round(now, 3),
                  "uptime_s": round(now - daemon.started, 1), "state": None,
                  "versions": self.versions, "source": source,
                  **({"cameras": cameras} if cameras else {}), "tasks": tasks,
                  "engines": engines, "mqtt": mqtt, **({"jsonl": jsonl} if jsonl else {}),
                  "commands": daemon.commands, "motion_topic": daemon.motion,
                  "reload": daemon.reload, "system": system}
        # Cameras' errors may quote their URLs (a camera's, FFmpeg's, an exception's text):
        # no password reaches the report, its verdict, `status` or the log.
        report = _bounded(redacted(report, *daemon.uris))
        healthy, reasons = verdict(report, self.limits, [
            task.name for task in (view.tasks if view is not None else [])
            if not task.background])
        report["verdict"] = {"healthy": healthy, "reasons": reasons}
        report["state"] = "online" if healthy else "degraded"
        if healthy and daemon.starting:
            report["state"] = "starting"     # engines are built or loaded before frames flow
        return report

    def publish(self):
        """Publish a fresh report now; returns it."""
        report = self.report()
        self._dropped_seen = report["mqtt"]["dropped"] if report["mqtt"] else 0
        healthy = report["verdict"]["healthy"]
        if healthy != self.healthy:
            reasons = report["verdict"]["reasons"]
            if healthy:
                if self.healthy is not None:
                    logger.info("health: healthy again")
            elif all(r.startswith(MQTT_DOWN) for r in reasons):
                # edge.mqtt warned of the outage already, with its cause: once is enough
                logger.info("health: %s", "; ".join(reasons))
            else:
                logger.warning("health: %s", "; ".join(reasons))
            self.healthy = healthy
        remote = [r for r in report["verdict"]["reasons"] if not r.startswith(MQTT_DOWN)]
        if remote:
            status = ("degraded", remote[0])
        elif report["state"] == "starting":
            status = ("starting", "preparing engines")
        else:
            status = ("online", None)
        if self.app.link is not None and (self.status is None or status[0] != self.status[0]):
            self.app.link.set_status(*status)
        self.status = status
        if self.app.publisher is not None:
            self.app.publisher.control("health", report, retain=True)
        return report

    def run(self):
        while not self.stop_event.is_set():
            try:
                report = self.publish()
                logger.info("health: %s", summary_line(report))
                if self.on_report is not None:
                    self.on_report(report)
            except Exception:   # health must outlive any one bad report
                logger.exception("health report failed")
            self.wake.wait(self.interval)
            self.wake.clear()

    def stop(self):
        self.stop_event.set()
        self.wake.set()


def summary_line(report):
    """One line for logs and systemd STATUS: fps per task, states."""
    parts = []
    for name, task in sorted(report["tasks"].items()):
        fps = task["fps"]
        parts.append("{} {} fps".format(name, "-" if fps is None else "{:.1f}".format(fps)))
    cameras = report.get("cameras")
    if cameras:
        parts.append("cameras " + ", ".join("{} {}{}".format(
            name, camera["state"], "" if camera["fps"] is None else
            " {:.1f} fps".format(camera["fps"])) for name, camera in sorted(cameras.items())))
    else:
        parts.append("source {}".format(report["source"]["state"]))
    building = [l for l, e in report["engines"].items() if e["state"] == "building"]
    if building:
        parts.append("building " + ", ".join(building))
    mqtt = report["mqtt"]
    if mqtt:
        # "connecting" until the first connection or error: "down" at start-up misleads
        state = "up" if mqtt["connected"] else "down" if mqtt["error"] or mqtt["connects"] \
            else "connecting"
        parts.append("mqtt {} (queue {})".format(state, mqtt["queue"]))
    if not report["verdict"]["healthy"]:
        parts.append("DEGRADED: " + "; ".join(report["verdict"]["reasons"]))
    return ", ".join(parts)
