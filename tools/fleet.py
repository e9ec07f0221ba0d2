#!/usr/bin/env python3
"""Fleet benchmark: N real `edge run` daemons on this machine, one broker, `edge health --all`.

    tools/fleet 100 [--fps 1] [--size 160x120] [--rounds 3] [--json FILE]

Starts a private Mosquitto, builds the detector's engine once (`edge build`, shared by every
daemon through `engine.dir`; each daemon has its own state folder), then N daemons at once
on `test://?fps=F&width=W&height=H` with one inference thread each. It reports:

- time to online: from the first start until every daemon's retained status is `online`;
- `edge health --all --timeout T`: wall time of the whole command (a new process, as an
  operator runs it), devices that answered, exit status, and the requests it published
  (one on `{prefix}/_all/cmd/health`; per-device ones only for devices that stay silent);
  and the same check run in this process (edge.remote.check): connection to last answer,
  without a new interpreter's start-up, which a loaded host slows down most;
- memory per daemon: RSS (shared library pages counted in each) and PSS (shared pages split
  between the processes sharing them: what the fleet really costs the machine), mean, min,
  max; the machine's available memory before and after;
- CPU: the daemons' CPU time per second of wall time while they run (1.0 = one core).

Before each start it checks MemAvailable: it stops starting daemons when fewer than
`--reserve-mb` would be left, and says how many it started, so an N too large for the
machine is reported rather than swapping it to a halt. Exit status 0 when every daemon it
started came online and every `edge health --all` round had all of them answer, else 1.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.soak import Mosquitto, PersistentSubscriber  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def mem_available_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    return None


def proc_memory_mb(pid):
    """(RSS, PSS) of a process in MiB; None where it is gone."""
    rss = pss = None
    try:
        with open("/proc/{}/smaps_rollup".format(pid)) as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) / 1024.0
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return rss, pss


def cpu_seconds(pid):
    """User + system CPU seconds of a process (and its waited-for children)."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return None


def edge(*args, timeout=600):
    """`python -m edge ARGS`: (exit status, stdout, stderr, wall seconds)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edge"] + list(args), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return (proc.returncode, proc.stdout.decode(), proc.stderr.decode(),
            time.monotonic() - started)


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": round(sum(values) / len(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1)}


def run(args):
    folder = tempfile.mkdtemp(prefix="edge-fleet-")
    width, height = (int(v) for v in args.size.lower().split("x"))
    models = os.path.join(folder, "models")
    mirror = args.mirror or os.environ.get("EDGE_MODEL_MIRROR") or os.path.join(SHARED, "models")
    engines = os.path.join(folder, "engines")
    rc, out, err, _ = edge("build", args.detector, "--size", args.size, "--backend", "ort",
                           "--model-dir", models, "--mirror", mirror,
                           "--state-dir", os.path.join(folder, "build-state"))
    if rc != 0:
        raise SystemExit("fleet: edge build failed: " + err.strip())
    os.rename(os.path.join(folder, "build-state", "engines"), engines)
    broker = Mosquitto(folder, persistence=False).start()
    watcher = PersistentSubscriber(broker.port, topics=["edge/+/status", "edge/+/cmd/health"],
                                   persistent=False).start()
    config = os.path.join(folder, "edge.yaml")
    with open(config, "w") as f:
        f.write("pipeline: {{threads: 1, pool: 3}}\nengine: {{dir: {}}}\n"
                "health: {{interval: {}}}\nmqtt: {{keepalive: 30}}\n".format(
                    json.dumps(engines), args.health_interval))
    source = "test://?fps={}&width={}&height={}".format(args.fps, width, height)
    env = dict(os.environ, EDGE_MODEL_MIRROR=mirror)
    daemons = []          # (device id, Popen)
    result = {"requested": args.n, "fps": args.fps, "size": args.size, "cores": os.cpu_count(),
              "nice": args.nice,
              "mem_available_mb_before": round(mem_available_mb() or 0)}
    stopped_for_memory = None
    started = time.monotonic()
    try:
        for i in range(args.n):
            available = mem_available_mb()
            if available is not None and available < args.reserve_mb + args.per_daemon_mb:
                stopped_for_memory = round(available)
                break
            device = "fleet{:03d}".format(i)
            log = open(os.path.join(folder, device + ".log"), "wb")
            daemons.append((device, subprocess.Popen(
                [sys.executable, "-m", "edge", "run", "-c", config, "--source", source,
                 "--detector", args.detector, "--backend", "ort", "--model-dir", models,
                 "--state-dir", os.path.join(folder, device), "--device-id", device,
                 "--mqtt", broker.url], cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None)))
            log.close()
            if args.stagger:
                time.sleep(args.stagger)
        names = {d for d, _ in daemons}
        result["started"] = len(daemons)
        if stopped_for_memory is not None:
            result["stopped_for_memory"] = "started {} of {}: {} MiB available, under the "\
                "--reserve-mb {} + --per-daemon-mb {}".format(
                    len(daemons), args.n, stopped_for_memory, args.reserve_mb,
                    args.per_daemon_mb)

        def online():
            states = {}
            for message in watcher.payloads("status"):
                states[message["device"]] = message["state"]
            return {d for d in names if states.get(d) == "online"}
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline and len(online()) < len(names):
            if any(p.poll() is not None for _, p in daemons):
                break
            time.sleep(0.1)
        result["online"] = len(online())
        result["time_to_online_s"] = round(time.monotonic() - started, 1) \
            if result["online"] == len(names) else None
        result["exited"] = sorted(d for d, p in daemons if p.poll() is not None)
        time.sleep(args.settle)
        cpu_before = {d: cpu_seconds(p.pid) for d, p in daemons}
        cpu_started = time.monotonic()
        rounds = []
        from edge import remote
        for _ in range(args.rounds):
            # The same check in this process, whose imports are done: the time from the
            # connection to the last answer, without a new Python's start-up.
            began = time.monotonic()
            answers, _ = remote.check(broker.url, [], timeout=args.timeout, all_devices=True)
            in_process = time.monotonic() - began
            in_process_answered = sum(1 for r in answers.values() if r["answered"])
            time.sleep(1.0)
            with watcher.lock:
                seen = len(watcher.messages)
            rc, out, err, wall = edge("health", "--all", "--json", "--mqtt", broker.url,
                                      "--timeout", str(args.timeout),
                                      timeout=args.timeout + 60)
            try:
                answers = json.loads(out)
            except ValueError:
                answers = {}
            time.sleep(0.5)      # requests the command published reach the watcher
            with watcher.lock:
                requests = [t for t, _, _, _, _ in watcher.messages[seen:]
                            if t.endswith("/cmd/health")]
            rounds.append({"wall_s": round(wall, 2), "exit": rc,
                           "in_process_s": round(in_process, 2),
                           "in_process_answered": in_process_answered,
                           "answered": sum(1 for r in answers.values() if r["answered"]),
                           "healthy": sum(1 for r in answers.values() if r["healthy"]),
                           "listed": len(answers),
                           "broadcast_requests": sum(1 for t in requests if "/_all/" in t),
                           "direct_requests": sum(1 for t in requests if "/_all/" not in t),
                           "error": err.strip().splitlines()[-1] if rc not in (0, 1, 2) and
                           err.strip() else None})
        result["health_all"] = rounds
        elapsed = time.monotonic() - cpu_started
        used = [cpu_seconds(p.pid) - cpu_before[d] for d, p in daemons
                if cpu_seconds(p.pid) is not None and cpu_before[d] is not None]
        result["fleet_cpu_cores"] = round(sum(used) / elapsed, 2) if elapsed > 0 else None
        memory = [proc_memory_mb(p.pid) for _, p in daemons]
        result["rss_mb"] = stats([m[0] for m in memory])
        result["pss_mb"] = stats([m[1] for m in memory])
        result["pss_total_mb"] = round(sum(m[1] for m in memory if m[1] is not None))
        result["mem_available_mb_during"] = round(mem_available_mb() or 0)
    finally:
        for _, proc in daemons:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in daemons:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        watcher.close()
        broker.stop()
    result["folder"] = folder
    if not args.keep:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    return result


def table(result):
    lines = ["fleet: {} daemons requested, {} started, {} online ({} cores, test source {} "
             "fps {}{})".format(result["requested"], result["started"], result["online"],
                                result["cores"], result["fps"], result["size"],
                                ", daemons at nice {}".format(result["nice"])
                                if result["nice"] else "")]
    if result.get("stopped_for_memory"):
        lines.append("  memory: " + result["stopped_for_memory"])
    if result.get("exited"):
        lines.append("  exited early: " + ", ".join(result["exited"]))
    lines.append("  time to online: {}".format(
        "{} s".format(result["time_to_online_s"]) if result["time_to_online_s"] is not None
        else "not all online within the start timeout"))
    for i, r in enumerate(result.get("health_all", []), 1):
        lines.append("  edge health --all #{}: {:.2f} s as a command, {}/{} answered, {} healthy, "
                     "exit {}, requests: {} broadcast, {} direct{}; in process {:.2f} s, {} "
                     "answered".format(
                         i, r["wall_s"], r["answered"], result["started"], r["healthy"],
                         r["exit"], r["broadcast_requests"], r["direct_requests"],
                         " ({})".format(r["error"]) if r["error"] else "", r["in_process_s"],
                         r["in_process_answered"]))
    for key, name in (("rss_mb", "RSS"), ("pss_mb", "PSS")):
        s = result.get(key) or {}
        lines.append("  {} per daemon: mean {} MiB, min {}, max {}".format(
            name, s.get("mean"), s.get("min"), s.get("max")))
    lines.append("  PSS of the fleet: {} MiB; memory available before {} MiB, during {} MiB"
                 .format(result.get("pss_total_mb"), result["mem_available_mb_before"],
                         result.get("mem_available_mb_during")))
    lines.append("  daemons' CPU while idle-running and answering: {} cores".format(
        result.get("fleet_cpu_cores")))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="daemons to start")
    parser.add_argument("--fps", type=int, default=1, help="test source frame rate")
    parser.add_argument("--size", default="160x120", help="test source frame size WxH")
    parser.add_argument("--detector", default="yolox-nano")
    parser.add_argument("--timeout", type=float, default=5.0, help="edge health --timeout")
    parser.add_argument("--rounds", type=int, default=3, help="edge health --all runs")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds between all online and the first health run")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between daemon starts (0: all at once)")
    parser.add_argument("--health-interval", type=float, default=10.0)
    parser.add_argument("--nice", type=int, default=0,
                        help="run the daemons at this niceness: they stand for devices with "
                             "CPUs of their own, and need not starve the operator's command")
    parser.add_argument("--reserve-mb", type=float, default=2048.0,
                        help="memory to leave to the rest of the machine")
    parser.add_argument("--per-daemon-mb", type=float, default=160.0,
                        help="memory a daemon is expected to need")
    parser.add_argument("--mirror", help="model mirror (default $EDGE_MODEL_MIRROR or "
                                         "../shared/models)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (daemon logs, broker log)")
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    ok = result["online"] == result["started"] == args.n and all(
        r["answered"] == result["started"] for r in result["health_all"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
