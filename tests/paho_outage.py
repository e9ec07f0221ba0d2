"""A broker that dies with messages still in paho's buffer, run under one paho-mqtt version.

    python tests/paho_outage.py FOLDER      (paho from PYTHONPATH: tests/test_paho_versions.py)

Deterministic, not a race: the broker is stopped (SIGSTOP) while the publisher hands it
512 KiB QoS 0 results, so the socket fills and paho holds some it has not written; then it
is killed (those are lost with the connection: paho 2.x marks them failed) and a new one
starts on the same port. A QoS 1 message is handed to paho while no broker runs (paho keeps
it for the reconnect). Prints one JSON object of what happened; tests/test_paho_versions.py
judges it.
"""

import json
import logging
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edge import health, mqtt  # noqa: E402
from edge.publisher import Publisher  # noqa: E402
from tools.soak import Mosquitto, PersistentSubscriber, wait_until  # noqa: E402


class Records(logging.Handler):
    """Warnings and errors of edge's loggers, with their tracebacks' last lines."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append("{} {}: {}{}".format(
            record.levelname, record.name, record.getMessage(),
            " | " + record.exc_text.splitlines()[-1] if record.exc_info and
            self.format(record) and record.exc_text else ""))


def main(folder):
    import paho.mqtt
    records = Records()
    logging.getLogger("edge").addHandler(records)
    out = {"paho": paho.mqtt.__version__, "paho_file": paho.mqtt.__file__}
    broker = Mosquitto(folder, persistence=False).start()
    link = mqtt.MqttLink(mqtt.parse_url(broker.url), "dev")
    publisher = Publisher(link, qos=0, limit=1000)
    link.start()
    publisher.start()
    try:
        assert link.connected.wait(10), "no connection"
        # The broker stops reading: the socket's buffers fill, paho keeps the rest.
        broker.proc.send_signal(signal.SIGSTOP)
        big = b"x" * (512 * 1024)
        for _ in range(40):
            publisher.put("r/big", big)
        sent = -1
        while publisher.sent != sent:      # until nothing more is handed over
            sent = publisher.sent
            time.sleep(0.5)
        out["held_when_stopped"] = publisher.depth
        time.sleep(2.5)
        out["stalled_s"] = publisher.stalled_s
        broker.proc.kill()
        broker.proc.wait()
        broker.proc = None
        out["noticed_loss"] = wait_until(lambda: not link.connected.is_set(), 10)
        # paho takes a QoS 1 message while no broker runs and sends it after the reconnect
        queued = link.publish(link.topic("r/queued"), b"{}", 1)
        out["queued_taken"] = mqtt.taken(queued)
        time.sleep(1.0)
        broker.start()
        out["reconnected"] = wait_until(lambda: link.connects >= 2, 20)
        subscriber = PersistentSubscriber(broker.port, ["r/#"], qos=1,
                                          persistent=False).start()
        reached = time.monotonic()
        for i in range(30):
            publisher.put("r/after", {"i": i})
            time.sleep(0.1)
        out["after_received"] = subscriber.wait_for(
            lambda: subscriber.count("after") > 0, 15) and subscriber.count("after")
        out["after_s"] = round(time.monotonic() - reached, 2)
        out["queued_delivered"] = wait_until(lambda: mqtt.delivered(queued), 10) and \
            not mqtt.lost(queued)
        out["drained"] = wait_until(lambda: publisher.depth == 0, 15)
        out["stalled_after_s"] = publisher.stalled_s
        out["lost"], out["delivered"], out["failed"] = (publisher.lost, publisher.delivered,
                                                        publisher.failed)
        out["stuck_reason"] = [r for r in health.verdict(_report(publisher, link), {
            "temperature_c": 90, "memory_percent": 95})[1] if "stuck" in r]
        subscriber.close()
    finally:
        try:
            out["undelivered_at_stop"] = publisher.flush(5.0)
            link.stop(timeout=2.0)
            out["stopped"] = True
        except Exception as e:      # what SIGTERM once ended with
            out["stopped"] = "{}: {}".format(type(e).__name__, e)
        broker.stop()
    out["log"] = records.lines
    print(json.dumps(out))


def _report(publisher, link):
    """The parts of a health report the verdict reads about the queue."""
    return {"source": {"state": "running"}, "tasks": {}, "engines": {}, "system": None,
            "uptime_s": 60, "mqtt": {"connected": link.connected.is_set(),
                                     "queue": publisher.depth, "error": None,
                                     "stalled_s": publisher.stalled_s, "dropped_recent": 0}}


if __name__ == "__main__":
    main(sys.argv[1])
