#!/usr/bin/env python3
"""Soak benchmark: `edge run` on test:// for a long time while the broker restarts.

    .venv/bin/python tools/soak.py --duration 1800 --restart-every 180

Starts a private Mosquitto (persistence on, so sessions and queued messages survive its
restarts), a subscriber with a persistent session (QoS 1, subscribed before the run), and
`edge run --source test://... --mqtt ...?qos=1 --jsonl ...`. Every `--restart-every` seconds
the broker is stopped for `--down` seconds and started again on the same port. Every
`--sample-every` seconds it samples the daemon: resident memory (VmRSS), threads
(/proc/PID/status Threads), open file descriptors (/proc/PID/fd) and the publish queue depth
(from the newest `health` report). At the end the daemon is stopped with SIGTERM and the
`seq` numbers of the JSONL file are compared with those the subscriber received.

Prints a table of samples and a summary (RSS growth after warm-up, thread and descriptor
range, QoS 1 messages lost, duplicates); `--json FILE` writes both for other tools. Exit
status 0 when the run meets the limits (RSS growth < --max-rss-growth-mb, threads and fds
within 1 after warm-up, no lost message), 1 otherwise.

The pieces (Mosquitto, PersistentSubscriber, start_edge, process sampling) are reused by
the fault tests in tests/.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary():
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if os.path.exists("/usr/sbin/mosquitto") else None)


class Mosquitto:
    """A real mosquitto on 127.0.0.1:port that can be stopped and started again (same port).

    With `persistence`, the broker saves sessions, subscriptions and queued QoS 1 messages
    to `{folder}/mosquitto.db` when it stops and loads them when it starts.
    """

    def __init__(self, folder, port=None, persistence=True, extra=""):
        self.folder = folder
        self.port = port or free_port()
        self.conf = os.path.join(folder, "mosquitto-{}.conf".format(self.port))
        # `user root`: run as root (CI), mosquitto would switch to the `mosquitto` user, which
        # cannot write the persistence file into a private temporary folder. Ignored when
        # not run as root.
        lines = ["listener {} 127.0.0.1".format(self.port), "allow_anonymous true",
                 "user root"]
        if persistence:
            lines += ["persistence true",
                      "persistence_location {}/".format(folder.rstrip("/")),
                      "persistence_file mosquitto-{}.db".format(self.port)]
        else:
            lines.append("persistence false")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n" + extra)
        self.proc = None
        self.starts = 0

    @property
    def url(self):
        return "mqtt://127.0.0.1:{}".format(self.port)

    def start(self, timeout=10.0):
        self.proc = start_mosquitto(self.conf, self.port,
                                    os.path.join(self.folder, "mosquitto.log"), timeout)
        self.starts += 1
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()        # SIGTERM: mosquitto saves its persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def running(self):
        return self.proc is not None and self.proc.poll() is None


def start_mosquitto(conf, port, log_path, timeout=10.0):
    """mosquitto with config file `conf`, once it accepts connections on 127.0.0.1:port (its
    output appended to log_path); RuntimeError when it does not within `timeout` s."""
    binary = mosquitto_binary()
    if binary is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    deadline = time.monotonic() + timeout
    with open(log_path, "ab") as log:
        while True:
            # The port may still be in TIME_WAIT right after a stop: retry the start.
            proc = subprocess.Popen([binary, "-c", conf], stdout=log, stderr=subprocess.STDOUT)
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    return proc
                except OSError:
                    time.sleep(0.05)
            if time.monotonic() >= deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                raise RuntimeError("mosquitto did not start on port {}".format(port))
            time.sleep(0.2)


def _paho_client(client_id, clean_session):
    import paho.mqtt.client as paho
    if hasattr(paho, "CallbackAPIVersion"):
        return paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                           clean_session=clean_session, protocol=paho.MQTTv311)
    return paho.Client(client_id=client_id, clean_session=clean_session,
                       protocol=paho.MQTTv311)


class PersistentSubscriber:
    """A robot's subscriber: fixed client id, clean_session=False, QoS 1.

    The broker keeps its subscription and queues QoS 1 messages for it while it is away
    (and, with persistence, across broker restarts). Records every message received in
    order with paho's DUP flag. `delay` sleeps in on_message: a consumer that cannot keep up.
    `persistent=False` makes it an ordinary clean-session client (retained messages, ...).
    """

    def __init__(self, port, topics=("#",), client_id=None, qos=1, delay=0.0,
                 persistent=True):
        self.port = port
        self.topics = list(topics)
        self.qos = qos
        self.delay = delay
        self.client_id = client_id or "soak-sub-{}-{}".format(os.getpid(), time.monotonic_ns())
        self.messages = []          # (topic, payload bytes, dup, retain, monotonic time)
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.connects = 0
        self.sessions_lost = 0      # reconnects where the broker had forgotten the session
        self.persistent = persistent
        self.client = _paho_client(self.client_id, not persistent)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        if getattr(rc, "value", rc) != 0:
            return
        self.connects += 1
        present = getattr(flags, "session_present", None)
        if present is None and isinstance(flags, dict):
            present = flags.get("session present")
        if self.connects > 1 and not present:
            self.sessions_lost += 1
        # A persistent session keeps the subscription: subscribing again would hide a
        # broker that lost it (and with it the messages queued meanwhile).
        if self.connects == 1 or not self.persistent:
            client.subscribe([(t, self.qos) for t in self.topics])

    def _on_subscribe(self, client, userdata, *args):
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.dup), bool(msg.retain),
                                  time.monotonic()))
        if self.delay:
            time.sleep(self.delay)

    def start(self, timeout=10.0):
        """Connect (the broker must be up) and subscribe; the session then persists."""
        self.client.connect("127.0.0.1", self.port, 30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise RuntimeError("subscriber could not subscribe on port {}".format(self.port))
        return self

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()

    def payloads(self, suffix):
        """Decoded JSON payloads of the topics ending in /suffix, in arrival order."""
        with self.lock:
            items = [p for t, p, _, _, _ in self.messages if t.endswith("/" + suffix)]
        return [json.loads(p) for p in items]

    def seqs(self, suffix="detections"):
        return [m["seq"] for m in self.payloads(suffix)]

    def count(self, suffix="detections"):
        with self.lock:
            return sum(1 for t, _, _, _, _ in self.messages if t.endswith("/" + suffix))

    def wait_for(self, predicate, timeout):
        return wait_until(predicate, timeout)


def wait_until(predicate, timeout):
    """Whether `predicate()` came true within `timeout` s (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def read_jsonl(path):
    """The JSON lines of a file (a torn last line, from a killed writer, is left out)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def delivery(sent, received):
    """Compare the seq numbers a daemon wrote (JSONL) with those a subscriber received.

    Returns {"lost": [...], "duplicates": n, "in_order": bool}: `in_order` is whether the
    received numbers, keeping the first arrival of each, are the sent ones in their order.
    """
    first = []
    seen = set()
    for seq in received:
        if seq not in seen:
            seen.add(seq)
            first.append(seq)
    wanted = set(sent)
    return {"lost": [s for s in sent if s not in seen],
            "duplicates": len(received) - len(first),
            "in_order": [s for s in first if s in wanted] == [s for s in sent if s in seen],
            "unexpected": [s for s in first if s not in wanted]}


def start_edge(folder, args, config="", env=None, log_name="edge.log"):
    """`python -m edge run ARGS` in a real process, its output in folder/log_name."""
    cfg = os.path.join(folder, "edge-{}.yaml".format(time.monotonic_ns()))
    with open(cfg, "w") as f:
        f.write(config or "{}\n")
    full_env = dict(os.environ, **(env or {}))
    log = open(os.path.join(folder, log_name), "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", cfg] + list(args),
                                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def stop_edge(proc, timeout=30):
    """SIGTERM to a process of start_edge and its exit status (killed after `timeout` s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def process_sample(pid):
    """{"rss_kb", "threads", "fds"} of a live process, from /proc."""
    fields = {}
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir("/proc/{}/fd".format(pid)))}


def summarise(samples, warmup_s):
    """Growth and ranges over the samples taken after `warmup_s` seconds."""
    after = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    rss = [s["rss_kb"] for s in after]
    threads = [s["threads"] for s in after]
    fds = [s["fds"] for s in after]
    queue = [s["queue"] for s in after if s["queue"] is not None]
    return {"samples": len(after), "rss_start_mb": rss[0] / 1024.0,
            "rss_end_mb": rss[-1] / 1024.0, "rss_growth_mb": (rss[-1] - rss[0]) / 1024.0,
            "rss_max_growth_mb": (max(rss) - rss[0]) / 1024.0,
            "threads_min": min(threads), "threads_max": max(threads),
            "fds_min": min(fds), "fds_max": max(fds),
            "queue_max": max(queue) if queue else None}


def soak(duration=60.0, restart_every=20.0, down=2.0, sample_every=3.0, warmup=20.0,
         fps=15, width=320, height=240, model_dir=None, workdir=None, out=sys.stdout,
         queue=1000, device="soak"):
    """Run the soak; returns {"samples": [...], "summary": {...}, "delivery": {...}, ...}."""
    workdir = workdir or tempfile.mkdtemp(prefix="edge-soak-")
    model_dir = model_dir or os.path.join(workdir, "models")
    if not os.path.isdir(model_dir) or not os.listdir(model_dir):
        mirror = os.environ.get("EDGE_MODEL_MIRROR") or os.path.join(SHARED, "models")
        subprocess.check_call([sys.executable, "-m", "edge", "models", "fetch", "yolox-nano",
                               "--mirror", mirror, "--model-dir", model_dir], cwd=ROOT,
                              stdout=subprocess.DEVNULL)
    broker = Mosquitto(workdir).start()
    sub = PersistentSubscriber(broker.port, ["edge/{}/#".format(device)]).start()
    jsonl = os.path.join(workdir, "out.jsonl")
    config = ("mqtt: {{queue: {}, flush_timeout: 30}}\nhealth: {{interval: {}}}\n"
              .format(queue, max(1.0, min(sample_every, 5.0))))
    proc = start_edge(workdir, [
        "--source", "test://?width={}&height={}&fps={}".format(width, height, fps),
        "--detector", "yolox-nano", "--model-dir", model_dir,
        "--state-dir", os.path.join(workdir, "state"), "--device-id", device,
        "--mqtt", broker.url + "?qos=1", "--jsonl", jsonl], config)
    samples = []
    restarts = 0
    started = time.monotonic()
    next_sample = started + sample_every
    next_restart = started + restart_every
    up_at = 0.0
    header = "{:>7} {:>9} {:>7} {:>5} {:>6} {:>8} {:>7}".format(
        "t_s", "rss_mb", "threads", "fds", "queue", "results", "broker")
    print(header, file=out)
    try:
        while time.monotonic() - started < duration:
            if proc.poll() is not None:
                raise RuntimeError("edge run ended early with status {}; see {}".format(
                    proc.returncode, os.path.join(workdir, "edge.log")))
            now = time.monotonic()
            if restart_every and now >= next_restart and broker.running():
                broker.stop()
                up_at = now + down
            elif not broker.running() and now >= up_at:
                broker.start()
                restarts += 1
                next_restart = time.monotonic() + restart_every
            if now >= next_sample:
                sample = process_sample(proc.pid)
                health = sub.payloads("health")
                mqtt = health[-1].get("mqtt") if health else None
                sample.update(t=round(now - started, 1), queue=mqtt["queue"] if mqtt else None,
                              results=len(read_jsonl(jsonl)), broker=broker.running())
                samples.append(sample)
                print("{t:>7.1f} {rss:>9.1f} {threads:>7} {fds:>5} {queue:>6} {results:>8} "
                      "{broker:>7}".format(rss=sample["rss_kb"] / 1024.0,
                                           queue="-" if sample["queue"] is None
                                           else sample["queue"],
                                           broker="up" if sample["broker"] else "down",
                                           **{k: v for k, v in sample.items()
                                              if k not in ("queue", "broker")}),
                      file=out)
                out.flush()
                next_sample += sample_every
            time.sleep(0.05)
        if not broker.running():
            broker.start()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        sent = [m["seq"] for m in read_jsonl(jsonl)]
        sub.wait_for(lambda: set(sub.seqs()) >= set(sent), 30)
        result = delivery(sent, sub.seqs())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()
        broker.stop()
    summary = summarise(samples, warmup)
    summary.update(exit_status=rc, restarts=restarts, results=len(sent),
                   sessions_lost=sub.sessions_lost,
                   lost=len(result["lost"]), duplicates=result["duplicates"],
                   in_order=result["in_order"], duration_s=duration, warmup_s=warmup)
    print("", file=out)
    print("after {:.0f} s warm-up ({} samples): RSS {:.1f} -> {:.1f} MB (growth {:+.2f} MB, "
          "max {:+.2f} MB); threads {}..{}; fds {}..{}; queue max {}".format(
              warmup, summary["samples"], summary["rss_start_mb"], summary["rss_end_mb"],
              summary["rss_growth_mb"], summary["rss_max_growth_mb"], summary["threads_min"],
              summary["threads_max"], summary["fds_min"], summary["fds_max"],
              summary["queue_max"]), file=out)
    print("{} broker restarts; {} results; QoS 1 lost {}, duplicates {}, in order {}; "
          "edge exit status {}".format(restarts, len(sent), summary["lost"],
                                       summary["duplicates"], summary["in_order"], rc),
          file=out)
    return {"samples": samples, "summary": summary, "delivery": result, "workdir": workdir}


def verdict(summary, max_rss_growth_mb=5.0):
    """The limits the issue sets; a list of what failed (empty: passed)."""
    failures = []
    if summary["rss_growth_mb"] >= max_rss_growth_mb:
        failures.append("RSS grew {:.2f} MB after warm-up (limit {:.1f})".format(
            summary["rss_growth_mb"], max_rss_growth_mb))
    if summary["threads_max"] - summary["threads_min"] > 1:
        failures.append("threads varied {}..{}".format(summary["threads_min"],
                                                       summary["threads_max"]))
    if summary["fds_max"] - summary["fds_min"] > 1:
        failures.append("file descriptors varied {}..{}".format(summary["fds_min"],
                                                               summary["fds_max"]))
    if summary["lost"]:
        failures.append("{} QoS 1 messages lost".format(summary["lost"]))
    if summary["sessions_lost"]:
        failures.append("the broker lost the subscriber's session {} times (persistence)"
                        .format(summary["sessions_lost"]))
    if not summary["in_order"]:
        failures.append("messages arrived out of order")
    if summary["exit_status"] != 0:
        failures.append("edge exited with status {}".format(summary["exit_status"]))
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds (1800)")
    parser.add_argument("--restart-every", type=float, default=180.0,
                        help="seconds between broker restarts (180; 0: never)")
    parser.add_argument("--down", type=float, default=2.0, help="seconds the broker is away")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds (10)")
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="seconds before growth is measured (120)")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--queue", type=int, default=1000, help="mqtt.queue")
    parser.add_argument("--model-dir", help="model files (default: fetched from the mirror)")
    parser.add_argument("--workdir", help="where the broker, logs and JSONL go (default: tmp)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=5.0)
    parser.add_argument("--json", help="write samples and summary to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    result = soak(args.duration, args.restart_every, args.down, args.sample_every,
                  args.warmup, args.fps, args.width, args.height, args.model_dir,
                  args.workdir, queue=args.queue)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    failures = verdict(result["summary"], args.max_rss_growth_mb)
    for failure in failures:
        print("soak: FAILED: " + failure, file=sys.stderr)
    print("soak: {}; files in {}".format("passed" if not failures else "failed",
                                         result["workdir"]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
