"""MQTT 5 requests: the reply goes to the request's response topic with its correlation data."""

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
        elif m.topic == "robots/r1/responses":
            got.append((json.loads(m.payload), getattr(m.properties, "CorrelationData", None)))
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(
        [("robots/r1/responses", 1), ("edge/cam5/status", 1)])
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert ready.wait(10) and online.wait(30)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "robots/r1/responses"
        props.CorrelationData = b"\x01req-42"
        client.publish("edge/cam5/cmd/ping", json.dumps({"id": "v5"}), qos=1, properties=props)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got, "no reply on the MQTT 5 response topic"
        reply, correlation = got[0]
        assert reply["ok"] and reply["id"] == "v5" and correlation == b"\x01req-42"
    finally:
        client.loop_stop()
        proc.terminate()
        proc.wait(20)
    assert paho is not None
