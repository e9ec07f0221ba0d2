"""`edge health`: ask devices for a fresh health report over MQTT, from any machine.

Exit status: 0 when every device answered healthy, 1 when any answered unhealthy, 2 when any
did not answer within the timeout (2 wins over 1), so cron, Nagios-style checks and fleet CI
can use it as it is.
"""

import json
import threading
import time
import uuid

from edge import mqtt

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_SILENT = 0, 1, 2


class Asker:
    """A short-lived MQTT client that sends `health` commands and collects the replies."""

    def __init__(self, settings, prefix):
        self.settings = settings
        self.prefix = prefix
        self.session = uuid.uuid4().hex[:12]
        self.replies = {}           # device -> reply dict
        self.statuses = {}          # device -> retained status dict
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        client = mqtt.make_client("edge-health-{}".format(self.session))
        mqtt.secure(client, settings)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *args: self.subscribed.set()
        client.on_message = self._on_message
        self.client = client

    def reply_topic(self, device):
        return "{}/_health/{}/{}".format(self.prefix, self.session, device)

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        if mqtt._reason_code(rc) == 0:
            client.subscribe([("{}/_health/{}/+".format(self.prefix, self.session), 1),
                              ("{}/+/status".format(self.prefix), 1)])
            self.connected.set()

    def _on_message(self, client, userdata, message):
        try:
            payload = json.loads(message.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return
        parts = message.topic.split("/")
        with self.lock:
            if message.topic.endswith("/status") and isinstance(payload, dict):
                self.statuses[parts[-2]] = payload
            elif "/_health/" in message.topic:
                self.replies[parts[-1]] = payload

    def start(self, timeout):
        from edge.errors import UnavailableError
        try:
            self.client.connect(self.settings["host"], self.settings["port"],
                                self.settings["keepalive"])
        except (OSError, ValueError) as e:
            raise UnavailableError("mqtt {}: cannot connect ({}); check --mqtt".format(
                self.settings["display"], getattr(e, "strerror", None) or e))
        self.client.loop_start()
        if not (self.connected.wait(timeout) and self.subscribed.wait(timeout)):
            self.client.loop_stop()
            raise UnavailableError("mqtt {}: no connection within {:.0f} s; check --mqtt and "
                                   "the broker".format(self.settings["display"], timeout))

    def ask(self, devices):
        for device in devices:
            request = {"id": "health-{}".format(self.session),
                       "reply_to": self.reply_topic(device)}
            self.client.publish("{}/{}/cmd/health".format(self.prefix, device),
                                json.dumps(request), qos=1)

    def wait(self, devices, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(d in self.replies for d in devices):
                    return
            time.sleep(0.05)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def check(url, devices, prefix="edge", timeout=5.0, all_devices=False, credentials=None):
    """{device: result} with result {"answered", "healthy", "reasons", "report"}; exit status.

    `credentials`: keyword arguments of edge.mqtt.with_credentials (user, TLS files).
    """
    settings = mqtt.with_credentials(mqtt.parse_url(url), **(credentials or {}))
    asker = Asker(settings, prefix)
    asker.start(timeout)
    try:
        if all_devices:
            time.sleep(min(1.0, timeout))      # retained statuses arrive right after subscribe
            with asker.lock:
                seen = sorted(d for d, s in asker.statuses.items() if s.get("state") != "offline")
            devices = sorted(set(devices) | set(seen))
        asker.ask(devices)
        asker.wait(devices, timeout)
        with asker.lock:
            replies = dict(asker.replies)
            statuses = dict(asker.statuses)
    finally:
        asker.close()
    results = {}
    for device in devices:
        reply = replies.get(device)
        if reply is None:
            status = statuses.get(device) or {}
            results[device] = {"answered": False, "healthy": False, "state": status.get("state"),
                               "reasons": ["no answer within {:.0f} s".format(timeout)],
                               "report": None}
        elif not reply.get("ok"):
            results[device] = {"answered": True, "healthy": False, "state": None,
                               "reasons": [(reply.get("error") or {}).get("message", "error")],
                               "report": None}
        else:
            report = reply["result"]
            results[device] = {"answered": True, "healthy": report["verdict"]["healthy"],
                               "state": report["state"],
                               "reasons": report["verdict"]["reasons"], "report": report}
    if any(not r["answered"] for r in results.values()):
        code = EXIT_SILENT
    elif any(not r["healthy"] for r in results.values()):
        code = EXIT_UNHEALTHY
    else:
        code = EXIT_HEALTHY
    return results, code


def table(results):
    """A readable table: device, state, fps per task, temperature, verdict."""
    rows = [("DEVICE", "STATE", "FPS", "TEMP C", "MEM %", "VERDICT")]
    for device, r in sorted(results.items()):
        report = r["report"] or {}
        tasks = report.get("tasks") or {}
        fps = " ".join("{}={}".format(n, "-" if t.get("fps") is None else t["fps"])
                       for n, t in sorted(tasks.items())) or "-"
        system = report.get("system") or {}
        temps = [v for v in (system.get("temperatures") or {}).values() if v is not None]
        memory = (system.get("memory") or {}).get("used_percent")
        verdict = "healthy" if r["healthy"] else "; ".join(r["reasons"]) or "unhealthy"
        rows.append((device, r["state"] or ("silent" if not r["answered"] else "-"), fps,
                     "{:.0f}".format(max(temps)) if temps else "-",
                     "-" if memory is None else "{:.0f}".format(memory), verdict))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row[:5], widths)) + "  " + row[5]
                     for row in rows)
