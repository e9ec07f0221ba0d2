#!/usr/bin/env python3
"""Where a daemon's memory goes: imports one by one, then a real `edge run` mapped by library.

    .venv/bin/python tools/footprint.py [--seconds 20] [--root CHECKOUT] [--json FILE]

1. Imports: a fresh interpreter imports the daemon's libraries one after another (numpy,
   PyYAML, paho-mqtt, psutil, ONNX Runtime, onnx, OpenCV) and prints the RSS each adds. Shared
   libraries and the Python objects a library makes at import are in these figures.
2. The daemon: `edge run` on `test://?fps=1&width=320&height=240` with yolox-nano on ONNX
   Runtime (one thread), once to build the engine into a fresh state folder and once more
   from that cache, as a device starts every day. After `--seconds` its
   /proc/PID/smaps is summed by what each mapping belongs to: the Python interpreter, numpy
   (with its OpenBLAS), ONNX Runtime, onnx (with protobuf), OpenCV (with its bundled libraries),
   other shared libraries, and anonymous memory (the heap: Python objects, the engine's
   weights and ONNX Runtime's buffers, thread stacks). Which of onnx and OpenCV are loaded
   at all is listed.

`--root DIR` runs the daemon of another checkout (e.g. an older commit, for a before/after
comparison) with this machine's venv. The figures are those of this machine (x86-64, Python
of the venv); a Jetson's differ in size but go to the same places.
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
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

IMPORTS = ["numpy", "yaml", "paho.mqtt.client", "psutil", "onnxruntime", "onnx", "cv2"]

_STEPS = r"""
import importlib, json, sys
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
steps = [("python", rss())]
for name in sys.argv[1:]:
    importlib.import_module(name)
    steps.append((name, rss()))
print(json.dumps(steps))
"""

# (category, substrings of a mapping's path), first match wins
CATEGORIES = [
    ("onnxruntime", ("/onnxruntime/",)),
    ("onnx + protobuf", ("/onnx/", "/google/", "/ml_dtypes/", "protobuf")),
    ("opencv", ("/cv2/", "opencv")),
    ("numpy + openblas", ("/numpy/", "numpy.libs", "openblas")),
    ("python", ("libpython", "/bin/python", "lib-dynload")),
    ("other python packages", ("site-packages",)),
    ("other shared libraries", (".so",)),
]


def import_steps():
    """[(module, RSS MiB after importing it)] in a fresh interpreter, cumulative."""
    out = subprocess.check_output([sys.executable, "-c", _STEPS] + IMPORTS)
    return json.loads(out.decode())


def smaps(pid):
    """{category: RSS MiB} of a process, and the mapped paths."""
    totals = {}
    paths = set()
    current = None
    with open("/proc/{}/smaps".format(pid)) as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):         # a mapping's header line
                parts = line.split()
                path = parts[5] if len(parts) > 5 else ""
                paths.add(path)
                current = _category(path)
            elif first == "Rss:" and current is not None:
                totals[current] = totals.get(current, 0.0) + int(line.split()[1]) / 1024.0
    return totals, paths


def _category(path):
    if not path or path.startswith("["):
        return "anonymous (heap, engine, stacks)"
    for name, marks in CATEGORIES:
        if any(mark in path for mark in marks):
            return name
    return "other files"


def daemon(root, seconds, folder):
    """(smaps totals, VmRSS, loaded flags) of `edge run` started from a warm engine cache."""
    models = os.path.join(folder, "models")
    state = os.path.join(folder, "state")
    config = os.path.join(folder, "edge.yaml")
    with open(config, "w") as f:
        # a still test pattern: no camera motion compensation, whose OpenCV a real camera
        # source loads anyway (docs/performance.md: The daemon's footprint)
        f.write("pipeline: {threads: 1}\ntrack: {motion: \"off\"}\n")
    env = dict(os.environ)
    env.setdefault("EDGE_MODEL_MIRROR", os.path.join(SHARED, "models"))
    args = [sys.executable, "-m", "edge", "run", "-c", config, "--detector", "yolox-nano",
            "--backend", "ort", "--model-dir", models, "--state-dir", state,
            "--jsonl", os.path.join(folder, "out.jsonl"), "--device-id", "footprint"]
    source = "test://?fps=1&width=320&height=240"
    subprocess.check_call(args + ["--source", source + "&frames=2"], cwd=root, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(args + ["--source", source], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
        if proc.poll() is not None:
            raise SystemExit("footprint: edge run ended early (exit {})".format(proc.returncode))
        totals, paths = smaps(proc.pid)
        with open("/proc/{}/status".format(proc.pid)) as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    loaded = {"onnx": any("/onnx/" in p for p in paths),
              "opencv": any("/cv2/" in p for p in paths),
              "onnxruntime": any("/onnxruntime/" in p for p in paths)}
    rss = int(status["VmRSS"].split()[0]) / 1024.0
    return {name: round(value, 1) for name, value in totals.items()}, round(rss, 1), loaded


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="how long the daemon runs before it is measured")
    parser.add_argument("--root", default=ROOT, help="checkout whose daemon is measured")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    steps = import_steps()
    print("imports (fresh interpreter, cumulative RSS):")
    previous = None
    for name, rss in steps:
        print("  {:<18} {:6.1f} MiB{}".format(
            name, rss, "" if previous is None else "  (+{:.1f})".format(rss - previous)))
        previous = rss
    folder = tempfile.mkdtemp(prefix="edge-footprint-")
    totals, rss, loaded = daemon(os.path.abspath(args.root), args.seconds, folder)
    print("edge run from {} (engine cached, {:.0f} s on test:// 320x240 at 1 fps): "
          "RSS {:.1f} MiB".format(args.root, args.seconds, rss))
    for name, value in sorted(totals.items(), key=lambda kv: -kv[1]):
        print("  {:<34} {:6.1f} MiB".format(name, value))
    print("  loaded: " + ", ".join("{} {}".format(k, "yes" if v else "no")
                                   for k, v in sorted(loaded.items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"imports": steps, "daemon": {"rss_mb": rss, "by_mapping": totals,
                                                    "loaded": loaded, "root": args.root}},
                      f, indent=1, sort_keys=True)
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
