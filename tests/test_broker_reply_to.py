"""A command's `reply_to` cannot make a device write anything but its own answers, even on a
broker with no ACL at all: the device refuses every topic outside `{prefix}/{device}/reply/`
and `{prefix}/_health/<session>/{device}` with `bad_request` on its own `reply/<id>` (edge/commands.py), so the
broker's rules (docs/broker.md) are a second wall, not the only one. A real daemon on an open
Mosquitto."""

import json
import time

from tests.conftest import Subscriber
from tools.soak import start_edge, wait_until

REFUSED = [
    "edge/cam2/status", "edge/cam2/reply/x", "edge/cam2/detections/front",   # another device
    "edge/cam1/status", "edge/cam1/health", "edge/cam1/detections",          # its own state
    "edge/cam1/detections/front", "edge/cam1/events/rear", "edge/cam1/depth/front",
    "edge/cam1/snapshot/x", "edge/cam1/cmd/ping", "edge/_all/cmd/health",    # commands
    "edge/cam1/reply", "edge/_healthy/x", "$SYS/broker/connection/site-a/state", "robots/x",
    # `edge health` files answers by the last level: never under another device's name
    "edge/_health/s1/cam2", "edge/_health/s1", "edge/_health/s1/cam1/x",
]


def test_reply_to_outside_the_devices_answers_is_refused_on_an_open_broker(broker, tmp_path,
                                                                           model_dir):
    watcher = Subscriber(broker.port, "#")
    system = Subscriber(broker.port, "$SYS/broker/connection/#")
    proc = start_edge(str(tmp_path), [
        "--source", "front=test://?width=160&height=120&fps=2", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--device-id", "cam1", "--mqtt", broker.url],
        "commands: {rate: 1000.0, burst: 1000}\n")     # every request answered at once
    try:
        # (commands are taken from the connect on: `starting` will do)
        assert watcher.wait_for(lambda s: s.json("status"), 60), \
            open(str(tmp_path / "edge.log")).read()
        requests = [("edge/cam1/cmd/ping", {"id": "r{}".format(i), "reply_to": topic})
                    for i, topic in enumerate(REFUSED)]
        # a fleet-wide request: its reply_to plus /cam1, here another device's topic
        requests.append(("edge/_all/cmd/ping", {"id": "b1", "reply_to": "edge/cam2"}))
        # and the answers it may give: its own reply/ topics and `edge health`'s
        requests += [("edge/cam1/cmd/ping", {"id": "ok1", "reply_to": "edge/cam1/reply/me/1"}),
                     ("edge/_all/cmd/ping", {"id": "ok2", "reply_to": "edge/_health/s1"})]
        for topic, request in requests:
            watcher.client.publish(topic, json.dumps(request), qos=1)
        expected = ["edge/cam1/reply/{}".format(r["id"]) for _, r in requests[:-2]] + [
            "edge/cam1/reply/me/1", "edge/_health/s1/cam1"]

        def answered():
            with watcher.lock:
                return {t for t, _, _ in watcher.messages} >= set(expected)
        assert wait_until(answered, 30), (sorted(set(expected) - {
            t for t, _, _ in watcher.messages}), open(str(tmp_path / "edge.log")).read())
        time.sleep(0.3)
        with watcher.lock:
            messages = list(watcher.messages)
        replies = {}
        for topic, payload, _ in messages:
            try:
                message = json.loads(payload)
            except ValueError:
                continue
            if isinstance(message, dict) and "ok" in message:     # an answer, wherever it went
                assert topic in expected, (topic, message)
                replies[topic] = message
        for topic in expected[:-2]:
            assert replies[topic]["error"]["code"] == "bad_request", replies[topic]
            assert "reply_to" in replies[topic]["error"]["message"]
        assert replies["edge/cam1/reply/me/1"]["ok"] and replies["edge/_health/s1/cam1"]["ok"]
        assert "edge/cam2/cam1" not in [t for t, _, _ in messages]
        assert system.messages == []
    finally:
        proc.terminate()
        proc.wait(20)
        watcher.close()
        system.close()
