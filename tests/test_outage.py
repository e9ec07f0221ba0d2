"""Broker outages with real parts: a real Mosquitto stopped and started on the same port,
real `edge run` processes, a robot's subscriber with a persistent session.

Delivery guarantee, by design: QoS 1 is AT LEAST ONCE and in order. While the broker is away
the publisher holds messages in its bounded queue and hands them to paho after the reconnect,
oldest first. paho keeps every QoS 1 message it took until the broker acknowledges it and
sends it again (DUP) after a reconnect, so a broker that stops after receiving a message but
before its PUBACK reaches edge gets it twice: duplicates are possible, losses are not (within
the queue bound). Order holds because the publisher hands no new message to paho until the
re-sent ones are acknowledged. The tests compare the `seq` numbers a subscriber receives
with those in the JSONL sink, which holds every result the daemon produced.
"""

import json
import time

from tools.soak import Mosquitto, PersistentSubscriber, delivery, read_jsonl, start_edge

DEVICE = "outage"


def edge_args(tmp_path, model_dir, broker, frames, extra=()):
    return ["--source", "test://?width=320&height=240&fps=30&frames={}".format(frames),
            "--detector", "yolox-nano", "--model-dir", model_dir, "--device-id", DEVICE,
            "--mqtt", broker.url + "?qos=1", "--jsonl", str(tmp_path / "out.jsonl")] + list(
                extra)


def log_of(tmp_path):
    with open(str(tmp_path / "edge.log"), errors="replace") as f:
        return f.read()


def wait_lines(path, count, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_jsonl(path)) >= count:
            return True
        time.sleep(0.05)
    return False


def persistent_session(broker, topics=("edge/{}/detections".format(DEVICE),)):
    """A robot's subscription made before the run, kept by the broker while it is away."""
    return PersistentSubscriber(broker.port, topics, client_id="robot-{}".format(
        broker.port)).start()


def retained(broker, suffix, timeout=10):
    """The retained message on edge/DEVICE/suffix, read by a fresh clean-session client."""
    sub = PersistentSubscriber(broker.port, ["edge/{}/{}".format(DEVICE, suffix)],
                               persistent=False).start()
    try:
        sub.wait_for(lambda: sub.count(suffix) > 0, timeout)
        found = sub.payloads(suffix)
        return found[-1] if found else None
    finally:
        sub.close()


def test_broker_down_at_start_every_message_arrives_once_in_order(tmp_path, model_dir):
    """The broker is down when `edge run` starts and comes up seconds later: the messages
    produced meanwhile wait in the queue and reach the robot in order (QoS 1)."""
    broker = Mosquitto(str(tmp_path))
    broker.start()
    sub = persistent_session(broker)
    broker.stop()            # the robot's session is saved; edge starts with no broker
    jsonl = str(tmp_path / "out.jsonl")
    proc = start_edge(str(tmp_path), edge_args(tmp_path, model_dir, broker, 40),
                      "mqtt: {queue: 1000, flush_timeout: 30}\n")
    try:
        assert wait_lines(jsonl, 8, proc), log_of(tmp_path)
        up_at = time.time()
        broker.start()
        assert proc.wait(90) == 0, log_of(tmp_path)
        sent = [m["seq"] for m in read_jsonl(jsonl)]
        assert sent == list(range(1, 41))
        held = [m for m in read_jsonl(jsonl) if m["frame"]["ts"] < up_at]
        assert len(held) >= 8, "results were produced while the broker was down"
        assert sub.wait_for(lambda: set(sub.seqs()) >= set(sent), 20), sub.seqs()
        result = delivery(sent, sub.seqs())
        assert result["lost"] == [] and result["unexpected"] == []
        assert result["in_order"], sub.seqs()
        # Nothing was in flight when the broker came up: exactly once here.
        assert result["duplicates"] == 0, sub.seqs()
        assert sub.sessions_lost == 0
        assert "mqtt connected" in log_of(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()


def test_broker_restart_mid_run_delivers_every_message_at_least_once_in_order(tmp_path,
                                                                              model_dir):
    """The broker stops after ~25 messages and comes back 2 s later (persistence on: the
    robot's session and the messages queued for it survive). Every seq of the JSONL arrives
    at least once; with duplicates removed (a message in flight when the broker stopped is
    sent again), they arrive in the JSONL's order."""
    broker = Mosquitto(str(tmp_path))
    broker.start()
    sub = persistent_session(broker)
    jsonl = str(tmp_path / "out.jsonl")
    proc = start_edge(str(tmp_path), edge_args(tmp_path, model_dir, broker, 70),
                      "mqtt: {queue: 1000, flush_timeout: 30}\n")
    try:
        assert sub.wait_for(lambda: sub.count() >= 25, 60), log_of(tmp_path)
        down_at = time.time()
        broker.stop()
        time.sleep(2.0)
        up_at = time.time()
        broker.start()
        assert proc.wait(90) == 0, log_of(tmp_path)
        messages = read_jsonl(jsonl)
        sent = [m["seq"] for m in messages]
        assert sent == list(range(1, 71))
        assert any(down_at < m["frame"]["ts"] < up_at for m in messages), \
            "results were produced while the broker was down"
        assert sub.wait_for(lambda: set(sub.seqs()) >= set(sent), 20), sub.seqs()
        result = delivery(sent, sub.seqs())
        assert result["lost"] == [] and result["unexpected"] == []
        assert result["in_order"], sub.seqs()
        assert sub.sessions_lost == 0, "the broker kept the robot's session over its restart"
        log = log_of(tmp_path)
        assert "connection lost" in log and log.count("mqtt connected") >= 2, log
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()


def test_queue_overflow_drops_the_oldest_counts_them_and_health_says_so(tmp_path, model_dir):
    """`mqtt.queue: 20` and the broker away for most of the run: the oldest messages are
    dropped (the robot gets an unbroken run of the newest ones), the drops are counted in the
    retained health report and the final log line. The run ends with exit 0: every message
    still queued was delivered, and dropping the oldest beyond the configured bound is the
    documented policy, not a failure to reach the broker (that is exit 69, which a run whose
    broker never comes back gets; see test_cli_errors)."""
    broker = Mosquitto(str(tmp_path))
    broker.start()
    sub = persistent_session(broker)
    broker.stop()
    jsonl = str(tmp_path / "out.jsonl")
    proc = start_edge(str(tmp_path), edge_args(tmp_path, model_dir, broker, 45),
                      "mqtt: {queue: 20, flush_timeout: 30}\nhealth: {interval: 1}\n")
    try:
        assert wait_lines(jsonl, 38, proc), log_of(tmp_path)
        broker.start()
        assert proc.wait(90) == 0, log_of(tmp_path)
        sent = [m["seq"] for m in read_jsonl(jsonl)]
        assert sent == list(range(1, 46)), "the JSONL sink holds every result"
        assert sub.wait_for(lambda: sub.count() and sub.seqs()[-1] == 45, 20), sub.seqs()
        got = sub.seqs()
        assert got == sent[sent.index(got[0]):], "an unbroken run of the newest messages"
        assert got[0] > 1
        health = retained(broker, "health")
        assert health is not None and health["mqtt"]["dropped"] > 0, health
        done = [l for l in log_of(tmp_path).splitlines() if "done:" in l][-1]
        dropped = int(done.split(",")[-1].split()[0])
        assert dropped >= got[0] - 1, done
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()


def test_publisher_bounds_memory_and_keeps_order_while_disconnected():
    """The Publisher on its own: a link that stays down, a tiny bound, many messages."""
    import threading
    from edge.publisher import Publisher

    class DownLink:
        connects = 0
        connected = threading.Event()

        def topic(self, suffix):
            return "edge/x/" + suffix

    publisher = Publisher(DownLink(), qos=1, limit=20)
    publisher.start()
    for i in range(1000):
        publisher.put("detections", {"seq": i + 1})
        assert publisher.depth <= 20
    undelivered = publisher.flush(0.3)
    assert undelivered == 20 and publisher.dropped == 980
    kept = [json.loads(entry[1])["seq"] for entry in publisher._outbox]
    assert kept == list(range(981, 1001)), "the newest, in order"


def test_publisher_survives_a_message_paho_refuses(broker, subscriber):
    """A reply topic paho cannot encode (a command's `reply_to` with a lone surrogate) costs
    that one message, not the publish thread: later messages still go out, in order."""
    from edge import mqtt
    from edge.publisher import Publisher
    sub = subscriber("edge/x/detections")
    link = mqtt.MqttLink(mqtt.parse_url(broker.url), "x")
    publisher = Publisher(link, qos=1, limit=100)
    link.start()
    publisher.start()
    try:
        assert link.connected.wait(10)
        publisher.put("detections", {"seq": 1})
        publisher.put("robot/\ud800/reply", {"v": 1, "id": "r", "ok": True, "result": {}})
        publisher.put("detections", {"seq": 2})
        publisher.put("detections", b"not json, sent as it is")
        assert publisher.flush(10) == 0
        assert sub.wait_for(lambda s: len(s.messages) >= 3, 10)
        assert [p for _, p, _ in sub.messages] == [b'{"seq":1}', b'{"seq":2}',
                                                   b"not json, sent as it is"]
        assert publisher.failed == 1 and publisher.sent == 3
    finally:
        link.stop()


def test_an_unreachable_broker_is_a_warning_with_its_cause_and_degrades_until_it_is_back(
        tmp_path, model_dir):
    """Nothing listens on the broker's port: within seconds a WARNING names the cause and
    systemd's STATUS= says DEGRADED; once the broker runs, the device is healthy again and
    the retained `status` it publishes is `online` (the outage was only ever local news)."""
    from tests.test_lifecycle import NotifySocket
    broker = Mosquitto(str(tmp_path), persistence=False)
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    proc = start_edge(str(tmp_path), [
        "--source", "test://?width=320&height=240&fps=10", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--device-id", DEVICE, "--mqtt", broker.url],
        "health: {interval: 1}\n", env={"NOTIFY_SOCKET": notify.path})

    def status_lines():
        notify.drain(0.2)
        return [m for _, m in notify.messages if m.startswith("STATUS=")]
    try:
        deadline = time.monotonic() + 30
        while not any("DEGRADED: mqtt broker unreachable: connection refused" in m
                      for m in status_lines()) and time.monotonic() < deadline:
            pass
        assert any("DEGRADED: mqtt broker unreachable" in m for m in status_lines()), \
            log_of(tmp_path)
        warnings = [l for l in log_of(tmp_path).splitlines()
                    if "WARNING edge.mqtt" in l and "connection refused by 127.0.0.1" in l]
        assert len(warnings) == 1, log_of(tmp_path)      # once per cause, not per retry
        broker.start()
        seen = len(status_lines())
        deadline = time.monotonic() + 30
        while not [m for m in status_lines()[seen:] if "mqtt up" in m and "DEGRADED" not in m] \
                and time.monotonic() < deadline:
            pass
        assert [m for m in status_lines()[seen:] if "DEGRADED" not in m], log_of(tmp_path)
        status = retained(broker, "status")
        assert status["state"] == "online" and status["reason"] is None, status
    finally:
        proc.kill()
        proc.wait()
        broker.stop()


def test_a_broker_name_that_does_not_resolve_is_named_as_such(tmp_path, model_dir):
    proc = start_edge(str(tmp_path), [
        "--source", "test://?width=320&height=240&fps=10", "--detector", "yolox-nano",
        "--model-dir", model_dir, "--mqtt", "mqtt://no-such-broker.invalid:1883"])
    try:
        deadline = time.monotonic() + 30
        while "DNS: cannot resolve no-such-broker.invalid" not in log_of(tmp_path) and \
                time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert "WARNING edge.mqtt" in log_of(tmp_path) and \
            "DNS: cannot resolve no-such-broker.invalid" in log_of(tmp_path), log_of(tmp_path)
    finally:
        proc.kill()
        proc.wait()
