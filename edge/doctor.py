"""`edge doctor`: the first thing to run on a new device.

Prints the versions (TensorRT, CUDA, JetPack, board), connects to the configured broker as
the daemon would (credentials, TLS) and says why it cannot, prints the memory plan of the
configuration on this board (edge.memoryplan: what each build and the running daemon take,
whether it fits, what to change), builds or loads each card's engine for
the shipped sample images (engines/samples/), checks its outputs against ONNX Runtime on the
same rewritten graph when onnxruntime is installed, else against the reference outputs
stored beside the samples, and prints per-engine latency. Exit 0 when every engine agrees
and the memory plan does not say "does not fit".

`memory` prints the plan alone, without building anything (`edge doctor --memory`, and
`python -m edge.doctor --memory [-c FILE] [--root DIR] [--json]`, which tools/install-jetson
runs): exit 0 when it fits or is tight, 1 when it does not fit.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from edge import cards, tasks
from edge.frames import Frame

REFERENCE_FILE = "reference-outputs.json"


def samples_dir():
    """engines/samples/ next to the cards."""
    for folder in cards.search_path():
        path = os.path.join(folder, "samples")
        if os.path.isdir(path):
            return path
    return None


def run_card(card, maker, cfg, folder, runs=20):
    """(outputs dict of the first run, latency ms list) for one card on its samples."""
    import cv2
    frame_name, reference_name = tasks.kind(card.task).samples
    image = cv2.imread(os.path.join(folder, frame_name))
    # the sample reference is bound directly: nothing is stored, the device's references
    # stay as they are
    reference = cv2.imread(os.path.join(folder, reference_name)) if reference_name else None
    task = tasks.create(card, maker, cfg["model_dir"], mirror=cfg["model_mirror"],
                        device="doctor")
    frame = Frame(0, image.shape, maker.allocate)
    np.copyto(frame.image, image)
    engine, binding = task.binding_for(frame, None if reference is None else "doctor", reference)
    engine.infer(binding)
    outputs = {k: v.copy() for k, v in binding.outputs.items()}
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        engine.infer(binding)
        latencies.append((time.perf_counter() - started) * 1000.0)
    return task, outputs, latencies


def ort_reference(card, cfg, folder):
    """The same card on ONNX Runtime (the CPU backend), or None when it is not installed."""
    from edge import backends
    from edge.backends.build import EngineMaker
    from edge.backends.cache import EngineCache
    cls = backends._cls("ort")
    if cls is None or cls.available() is not None:
        return None
    engine = cfg["engine"]
    maker = EngineMaker(cls(), EngineCache(engine["dir"], engine["cache_mb"]),
                        engine["budget_mb"] * 2 ** 20, engine["build_timeout"])
    task, outputs, _ = run_card(card, maker, cfg, folder, runs=0)
    return task.summarise(card, outputs)


def check_broker(cfg, out):
    """Connect to the configured broker once; 0 when it accepts (or none is configured)."""
    from edge import mqtt
    if not cfg["mqtt"]["url"]:
        out("{:<8} not configured (mqtt.url)".format("mqtt"))
        return 0
    settings = mqtt.configured(cfg["mqtt"])
    problem = mqtt.probe(settings, cfg["mqtt"]["protocol"])
    out("{:<8} {} {}".format("mqtt", settings["display"],
                             "ok" if problem is None else "FAILED: " + problem))
    return 0 if problem is None else 1


ROOT_ENV = "EDGE_MEMORY_ROOT"    # testing hook: a recorded / tree read instead of the board's


def memory_root():
    """The root the memory plan reads /proc, /sys and /etc under."""
    return os.environ.get(ROOT_ENV) or "/"


def _planned(cfg, names=()):
    """The config to plan for: its own tasks, else the cards doctor checks."""
    if tasks.card_names(cfg) or not names:
        return cfg
    planned = dict(cfg)
    for name in names:
        try:
            task = cards.load(name).task
        except Exception:     # a broken card is doctor's finding, reported per card
            continue
        key = tasks.kind(task).config_key
        if not planned.get(key):
            planned[key] = name
    return planned


def memory_section(cfg, out=print, root=None, names=(), sources=True):
    """Print the memory plan of `cfg` on this board; the plan (edge.memoryplan.plan)."""
    from edge import memoryplan
    result = memoryplan.plan(_planned(cfg, names), root=root or memory_root())
    for line in memoryplan.lines(result, sources=sources):
        out(line)
    if not sources:
        out("memory   each figure's source: edge doctor --memory, docs/memory.md")
    if result["verdict"] == "does not fit":
        out("memory   the configuration does not fit this board: change what the lines "
            "above say, then check again with: edge doctor --memory (docs/memory.md)")
    return result


def memory(cfg, out=print, root=None, as_json=False):
    """`edge doctor --memory`: the plan alone; 0 when it fits or is tight, 1 when it does
    not fit."""
    from edge import memoryplan
    if as_json:
        result = memoryplan.plan(cfg, root=root or memory_root())
        out(json.dumps(result, indent=1, sort_keys=True))
    else:
        result = memory_section(cfg, out, root)
    return 1 if result["verdict"] == "does not fit" else 0


def main(argv=None):
    """`python -m edge.doctor --memory`: the plan without the rest of the CLI."""
    from edge import config, installed
    from edge.errors import EdgeError
    parser = argparse.ArgumentParser(prog="python -m edge.doctor",
                                     description="the memory plan of a configuration on "
                                                 "this board (docs/memory.md)")
    parser.add_argument("--memory", action="store_true", required=True,
                        help="print the memory plan; exit 1 when it does not fit")
    parser.add_argument("-c", "--config", help="YAML config file (default: {} when it "
                                               "exists)".format(installed.CONFIG))
    parser.add_argument("--root", help="read /proc, /sys and /etc under this folder (tests)")
    parser.add_argument("--json", action="store_true", help="the plan as JSON")
    args = parser.parse_args(argv)
    path = installed.config_path(args.config)
    try:
        cfg = config.load(path, {}, require_task=False, folders=installed.folders(path))
    except EdgeError as e:
        print("edge: error: {}".format(e), file=sys.stderr)
        return e.exit_code
    if not args.json:
        print("config   {}".format(path or "none (defaults)"))
    return memory(cfg, root=args.root, as_json=args.json)


def doctor(cfg, names, write_reference=False, out=print):
    """Run the checks; the exit status (0 all good, 1 a mismatch or failure)."""
    from edge import daemon
    from edge.daemon import _versions
    maker = daemon.engine_maker(cfg)
    versions = _versions(maker.backend.describe())
    for key in ("board", "jetpack", "l4t", "cuda", "os", "python", "edge"):
        if key in versions:
            out("{:<8} {}".format(key, versions[key] if versions[key] is not None else "-"))
    out("backend  {}".format(", ".join("{}={}".format(k, v) for k, v in
                                      sorted(maker.backend.describe().items()) if v)))
    status = check_broker(cfg, out)
    try:
        plan = memory_section(cfg, out, names=names, sources=False)
    except Exception as e:   # the plan is a finding like the others, never a crash
        out("memory   plan not made: {}".format(e))
    else:
        if plan["verdict"] == "does not fit":
            status = 1
    folder = samples_dir()
    if folder is None:
        out("doctor: engines/samples/ not found; reinstall edge")
        return 1
    stored_path = os.path.join(folder, REFERENCE_FILE)
    stored = {}
    if os.path.isfile(stored_path):
        with open(stored_path) as f:
            stored = json.load(f)
    for name in names:
        card = cards.load(name)
        try:
            task, outputs, latencies = run_card(card, maker, cfg, folder)
        except Exception as e:   # every failure is a finding, reported per card
            out("{:<14} FAILED: {}".format(card.name, e))
            status = 1
            continue
        got = task.summarise(card, outputs)
        if write_reference:
            stored[card.name] = got
        if maker.backend.name == "ort":
            want, against = stored.get(card.name), "stored reference outputs"
        else:
            want, against = ort_reference(card, cfg, folder), "ONNX Runtime"
            if want is None:
                want, against = stored.get(card.name), "stored reference outputs"
        if want is None:
            ok, detail = False, "no reference to compare with"
        else:
            ok, detail = task.compare(task.card, got, want)   # its precision's tolerance
        latencies.sort()
        out("{:<14} {}  {} vs {}; latency p50 {:.1f} ms, p95 {:.1f} ms".format(
            card.name, "ok  " if ok else "FAIL", detail, against,
            latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95) - 1]))
        status = status if ok else 1
    if write_reference:
        with open(stored_path, "w") as f:
            json.dump(stored, f, indent=1, sort_keys=True)
        out("reference outputs written to {}".format(stored_path))
    return status


if __name__ == "__main__":
    sys.exit(main())
