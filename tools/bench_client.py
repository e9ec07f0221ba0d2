#!/usr/bin/env python3
"""What edge.client costs a robot: per-message check and parse time, and end-to-end rate.

    .venv/bin/python tools/bench_client.py [--messages 2000] [--detections 10] [--mqtt URL]

A detections message with `--detections` objects (the API document's example, its first
detection repeated, with track ids and `spatial`) is decoded from JSON, checked against
the API document (jsonschema) and parsed into objects, each step timed alone over many
rounds; then `--messages` copies go at QoS 1 through a real Mosquitto (a local one on a
free port unless --mqtt is given) into a Client, timed from the first publish to the last
message handed to the consumer. Prints ms per message for each step and messages/s.
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edge import client as edge_client  # noqa: E402
from edge import mqtt, schemas  # noqa: E402
from edge.bench.replay import start_local_broker  # noqa: E402


def payload(detections):
    """The document's detections example with `detections` objects."""
    example = schemas.document()["components"]["messages"]["Detections"]["examples"][0]
    message = copy.deepcopy(example["payload"])
    message["device"] = "bench"       # the sender is the topic (edge/bench/...): they agree
    first = message["detections"][0]
    message["detections"] = [dict(first, track_id=i + 1,
                                  spatial={"x": 10.0 * i, "y": -5.0, "z": 1500.0 + i})
                             for i in range(detections)]
    schemas.validate("detections", message)
    return message


def per_message_ms(step, rounds):
    step()      # once before the clock: the first check builds the validator
    started = time.perf_counter()
    for _ in range(rounds):
        step()
    return 1000.0 * (time.perf_counter() - started) / rounds


def steps(message, rounds):
    """ms per message: strict JSON decode, check (schemas.check, strict=False, as the
    client does), parse."""
    raw = json.dumps(message).encode()
    decoded = schemas.loads(raw)
    return {"json_ms": per_message_ms(lambda: schemas.loads(raw), rounds),
            "check_ms": per_message_ms(lambda: schemas.check("detections", decoded,
                                                             strict=False), rounds),
            "parse_ms": per_message_ms(lambda: edge_client.parse("detections", decoded),
                                       rounds)}


def through_broker(url, message, count):
    """messages/s from the first publish to the last message the consumer got."""
    raw = json.dumps(message).encode()
    settings = mqtt.parse_url(url)
    publisher = mqtt.make_client("bench-client-pub-{}".format(os.getpid()))
    publisher.max_inflight_messages_set(100)
    publisher.connect(settings["host"], settings["port"], 30)
    publisher.loop_start()
    got = []
    with edge_client.Client(url, devices=["bench"], queue_size=count + 1) as client:
        def consume():
            got.extend(client.messages(count=count, timeout=30))
        consumer = threading.Thread(target=consume)
        consumer.start()
        started = time.perf_counter()
        for _ in range(count):
            publisher.publish("edge/bench/detections", raw, qos=1)
        consumer.join()
        elapsed = time.perf_counter() - started
        stats = client.stats()
    publisher.disconnect()
    publisher.loop_stop()
    return {"messages": len(got), "per_s": len(got) / elapsed, "dropped": stats["dropped"],
            "invalid": stats["invalid"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--detections", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=500, help="rounds of each timed step")
    parser.add_argument("--mqtt", help="broker URL (default: a local mosquitto, free port)")
    args = parser.parse_args()
    message = payload(args.detections)
    figures = steps(message, args.rounds)
    broker, url, workdir = None, args.mqtt, tempfile.mkdtemp(prefix="edge-bench-client-")
    try:
        if url is None:
            broker, url = start_local_broker(workdir)
            if url is None:
                raise SystemExit("bench_client: mosquitto is not installed")
        figures.update(through_broker(url, message, args.messages))
    finally:
        if broker is not None:
            broker.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    from importlib.metadata import version
    print("edge.client, detections with {} objects ({} bytes), paho-mqtt {}, jsonschema {}, "
          "Python {}".format(args.detections, len(json.dumps(message)), version("paho-mqtt"),
                             version("jsonschema"), sys.version.split()[0]))
    print("  json decode   {json_ms:.3f} ms a message".format(**figures))
    print("  check         {check_ms:.3f} ms a message (the API document, jsonschema)".format(
        **figures))
    print("  parse         {parse_ms:.3f} ms a message (namedtuples)".format(**figures))
    print("  through the broker: {messages} messages at {per_s:.0f} a second (QoS 1; "
          "dropped {dropped}, invalid {invalid})".format(**figures))


if __name__ == "__main__":
    main()
