"""`edge doctor`: the first thing to run on a new device.

Prints the versions (TensorRT, CUDA, JetPack, board), connects to the configured broker as
the daemon would (credentials, TLS) and says why it cannot, builds or loads each card's engine for
the shipped sample images (engines/samples/), checks its outputs against ONNX Runtime on the
same rewritten graph when onnxruntime is installed, else against the reference outputs
stored beside the samples, and prints per-engine latency. Exit 0 when every engine agrees.
"""

import json
import os
import time

import numpy as np

from edge import cards, tasks
from edge.frames import Frame

SAMPLES = {"detect": ("coco-000000000036.jpg", None),
           "match": ("motorcycle-right.jpg", "motorcycle-left.jpg")}
REFERENCE_FILE = "reference-outputs.json"
BOX_TOLERANCE_PX = 4.0       # FP16 engines move box edges by a pixel or two
SCORE_TOLERANCE = 0.03
MATCH_AGREEMENT = 0.8        # share of the reference's mutual-NN pairs the engine must find


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
    frame_name, reference_name = SAMPLES[card.task]
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


def summarise(card, task, outputs):
    """What the check compares: detections (box, score, class) or mutual-NN pairs."""
    if card.task == "detect":
        from edge.tasks.detect import select
        rows = select(outputs["detections"], card.thresholds["score"], card.thresholds["iou"])
        return {"detections": [[round(float(v), 2) for v in row] for row in rows]}
    pairs = outputs["matches"]
    index = np.flatnonzero(pairs[:, 1] > 0)
    return {"pairs": [[int(i), int(pairs[i, 0])] for i in index]}


def compare(card, got, want):
    """(ok, one-line detail) comparing summaries within FP16 tolerance."""
    if card.task == "detect":
        a, b = got["detections"], want["detections"]
        if len(a) != len(b):
            return False, "{} detections, expected {}".format(len(a), len(b))
        worst_box, worst_score = 0.0, 0.0
        for x, y in zip(sorted(a, key=lambda r: -r[4]), sorted(b, key=lambda r: -r[4])):
            if int(x[5]) != int(y[5]):
                return False, "class {} instead of {}".format(int(x[5]), int(y[5]))
            worst_box = max(worst_box, max(abs(p - q) for p, q in zip(x[:4], y[:4])))
            worst_score = max(worst_score, abs(x[4] - y[4]))
        ok = worst_box <= BOX_TOLERANCE_PX and worst_score <= SCORE_TOLERANCE
        return ok, "{} detections, box edges within {:.2f} px, scores within {:.3f}".format(
            len(a), worst_box, worst_score)
    got_pairs = {tuple(p) for p in got["pairs"]}
    want_pairs = {tuple(p) for p in want["pairs"]}
    agreement = len(got_pairs & want_pairs) / float(max(1, len(want_pairs)))
    return agreement >= MATCH_AGREEMENT, "{} matches, {:.0%} of the reference's {}".format(
        len(got_pairs), agreement, len(want_pairs))


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
    return summarise(card, task, outputs)


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
        got = summarise(card, task, outputs)
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
            ok, detail = compare(card, got, want)
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
