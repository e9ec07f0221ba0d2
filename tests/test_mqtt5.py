"""MQTT 5 requests: the reply goes to the request's response topic with its correlation data,
when that topic is one replies may go to."""

import json
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT


def test_response_topic_and_correlation_data_are_honoured(broker, tmp_path, model_dir):
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from edge.mqtt import make_client
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("mqtt: {protocol: '5'}\n")
    proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", str(cfg), "--source",
                             "test://?width=320&height=240&fps=10", "--detector", "yolox-nano",
                             "--model-dir", model_dir, "--mqtt", broker.url, "--device-id",
                             "cam5", "--state-dir", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got, ready, online = [], threading.Event(), threading.Event()
    client = make_client("robot-v5", protocol="5")

    def on_message(c, u, m):
        if m.topic.endswith("/status") and json.loads(m.payload)["state"] == "online":
            online.set()
        elif m.topic.startswith(("edge/cam5/reply/", "robots/")):
            got.append((m.topic, json.loads(m.payload),
                        getattr(m.properties, "CorrelationData", None)))
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(
        [("edge/cam5/reply/#", 1), ("robots/#", 1), ("edge/cam5/status", 1)])
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert ready.wait(10) and online.wait(30)
        def ask(request_id, response_topic, correlation):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            props.CorrelationData = correlation
            before = len(got)
            client.publish("edge/cam5/cmd/ping", json.dumps({"id": request_id}), qos=1,
                           properties=props)
            deadline = time.monotonic() + 10
            while len(got) == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(got) > before, "no reply to " + request_id
            return got[before]

        topic, reply, correlation = ask("v5", "edge/cam5/reply/robot-r1", b"\x01req-42")
        assert topic == "edge/cam5/reply/robot-r1"
        assert reply["ok"] and reply["id"] == "v5" and correlation == b"\x01req-42"
        # Elsewhere: refused, on the default reply topic, still with the correlation data.
        topic, reply, correlation = ask("v6", "robots/r1/responses", b"\x02req-43")
        assert topic == "edge/cam5/reply/v6" and correlation == b"\x02req-43"
        assert reply["error"]["code"] == "bad_request" and "response topic" in \
            reply["error"]["message"]
        assert not [g for g in got if g[0].startswith("robots/")]
        # Oversized requests: refused (too_large) just over commands.max_bytes and far over
        # it alike; the device keeps no more than commands.max_bytes + 8 KiB of either
        # (tests/test_command_limits.py measures it). A ping after each is answered.
        for request_id, size in (("big", 70000), ("huge", 4 << 20)):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "edge/cam5/reply/" + request_id
            client.publish("edge/cam5/cmd/ping", json.dumps(
                {"id": request_id, "pad": "x" * size}), qos=1, properties=props)
            after = "edge/cam5/reply/after-" + request_id
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = after
            client.publish("edge/cam5/cmd/ping", json.dumps({"id": "p-" + request_id}), qos=1,
                           properties=props)
            deadline = time.monotonic() + 10
            while after not in [g[0] for g in got] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert after in [g[0] for g in got], "the device answers after " + request_id
        replies = {g[0]: g[1] for g in got}
        assert replies["edge/cam5/reply/big"]["error"]["code"] == "too_large"
        assert replies["edge/cam5/reply/huge"]["error"] == {
            "code": "too_large", "message": "request of {} bytes; the limit is 65536".format(
                len(json.dumps({"id": "huge", "pad": "x" * (4 << 20)})))}
    finally:
        client.loop_stop()
        proc.terminate()
        proc.wait(20)
    assert paho is not None
