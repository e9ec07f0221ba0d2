"""`edge bench`: what the pipeline costs beyond inference, measured in one run.

For one detection card and one set of frames (decoded once, replayed from memory, so
capture costs the CPU what a hardware camera's DMA does: nothing):
- raw_fps: the engine exactly as the pipeline runs it (rewritten graph, fused
  preprocessing) in a loop on frames in memory; beside it raw_model_fps, the original model
  on tensors already preprocessed, to show what the fused preprocessing costs;
- pipeline_fps: the real pipeline (capture thread, task thread, publisher) from the replayed
  source to a real broker, with per-stage latency percentiles and the capture-to-received
  latency seen by a subscriber; and the same over the image folder (JPEG decode per frame);
- peer_fps: the loop a user would write by hand (read frame -> OpenCV letterbox in numpy ->
  session.run on the original model -> numpy decode + NMS -> publish), on the same frames;
- alloc_per_frame_bytes: Python allocations of the hot path per frame (tracemalloc);
- tracking: the tracker with zones and lines (the decode step's share) per frame at 50
  moving objects, and the Python memory it keeps per frame (must be 0: no growth); the
  pipeline's frames/s with tracking as configured against without (tracked_fps, in the same
  rounds), and camera motion compensation's cost per frame at 640x480 (camera_motion);
- with --matcher, detection's throughput while matching runs at its rate beside it, over
  runs long enough for the rate to hold, and the peak RSS of a real `edge run` with both;
- with --stereo and --calib, stereo depth's figures (edge.bench.depth);
- with --cameras N, N cameras in one daemon against one alone, batched and not, and their
  memory against N daemons (edge.bench.cameras).
The throughput figures are measured in rounds that alternate raw, pipeline and peer runs, and
the ratios are the medians of each round's ratios: on a shared machine the speed drifts by
tens of percent over a minute, and alternating keeps each comparison within seconds.
Prints a table; --json writes the figures, --plot draws them.
"""

import collections
import json
import logging
import os
import resource
import statistics
import threading
import time

import numpy as np

from edge import cards, graph, models, mqtt, sources
from edge.bench.replay import ReplaySource, edge_run_peak_rss, run_pipeline, start_local_broker
from edge.frames import Frame
from edge.sources import Source

logger = logging.getLogger(__name__)


def load_frames(source_uri, width, height, limit=64):
    """Up to `limit` frames of the source, resized to width x height (one engine size)."""
    import cv2
    source = sources.open_source(source_uri)
    source.open()
    frames = []
    slot = Frame(0, (height, width, 3))
    try:
        while len(frames) < limit and source.read_into(slot):
            frames.append(cv2.resize(slot.image, (width, height), interpolation=cv2.INTER_AREA))
    finally:
        source.close()
    if not frames:
        from edge.errors import SourceError
        raise SourceError("bench: source {} gave no frame".format(source_uri))
    return frames


def bound_slots(engine, frames, allocate=None):
    """Up to 8 slots holding the frames, each bound to the engine once, as the pipeline's;
    `allocate` is the backend's (mapped memory on a Jetson: the zero-copy path)."""
    slots = []
    for i, image in enumerate(frames[:8]):
        slot = Frame(i, image.shape, allocate)
        np.copyto(slot.image, image)
        slots.append((slot, engine.bind(slot)))
    return slots


def raw_fps(engine, slots, seconds):
    """Frames per second of the engine alone on bound slots."""
    for slot, binding in slots[:2]:
        engine.infer(binding)                        # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        engine.infer(slots[done % len(slots)][1])
        done += 1
    return done / (time.perf_counter() - started)


def letterbox(image, size, pad=114):
    """The usual hand-written YOLOX letterbox: resize, pad top-left, CHW float32."""
    import cv2
    w, h = size
    r = min(w / image.shape[1], h / image.shape[0])
    resized = cv2.resize(image, (int(image.shape[1] * r), int(image.shape[0] * r)),
                         interpolation=cv2.INTER_LINEAR)
    canvas = np.full((h, w, 3), pad, np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return canvas.transpose(2, 0, 1)[None].astype(np.float32), r


def peer_session(model_path):
    """The original model as a user loads it: ONNX Runtime's defaults."""
    import onnxruntime
    return onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])


def peer_loop(card, session, frames, count, publish):
    """The single-threaded loop people write by hand; returns frames per second."""
    import cv2
    from edge.families.yolox import grid
    name = session.get_inputs()[0].name
    cells, strides = grid(*card.input_size)
    score_t, iou_t = card.thresholds["score"], card.thresholds["iou"]
    session.run(None, {name: letterbox(frames[0], card.input_size)[0]})
    started = time.perf_counter()
    for i in range(count):
        image = frames[i % len(frames)]
        blob, r = letterbox(image, card.input_size)
        out = session.run(None, {name: blob})[0][0]
        xy = (out[:, :2] + cells) * strides
        wh = np.exp(out[:, 2:4]) * strides
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1) / r
        scores = out[:, 4:5] * out[:, 5:]
        cls = scores.argmax(1)
        best = scores.max(1)
        keep = best > score_t
        dets = []
        if keep.any():
            b = boxes[keep]
            idx = cv2.dnn.NMSBoxesBatched(
                [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for x1, y1, x2, y2 in b],
                best[keep].tolist(), cls[keep].tolist(), score_t, iou_t)
            for k in np.array(idx).reshape(-1):
                dets.append({"label": card.label(int(cls[keep][k])),
                             "score": float(best[keep][k]),
                             "box": [float(v) for v in b[k]]})
        publish(json.dumps({"frame": i, "detections": dets}))
    return count / (time.perf_counter() - started)


def alloc_per_frame(task, frames, count=50):
    """Peak Python bytes allocated while processing one frame, median over `count` frames.

    tracemalloc restarts per frame (that resets its peak on Python 3.6 too); numpy's buffers
    are traced, so a per-frame array shows up at its full size.
    """
    import tracemalloc
    slot = Frame(0, frames[0].shape)
    np.copyto(slot.image, frames[0])
    for _ in range(3):
        task.process(slot)
    peaks = []
    for i in range(count):
        slot.index = i
        slot.ts = time.time()
        tracemalloc.start()
        messages = task.process(slot)
        json.dumps(messages[0], separators=(",", ":"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return int(statistics.median(peaks))


def tracking_cost(card, objects=50, frames=600, seed=0):
    """The decode step's tracking (tracker, 2 zones, 2 lines, events) at `objects` objects
    moving and bouncing in a 1280x720 frame with box jitter: ms per frame (p50, p95), and the
    Python memory still held per frame after `frames` more frames (tracemalloc)."""
    import tracemalloc
    from edge import config, validate
    from edge.tracking import CameraTracking
    settings = validate.check({"zones": [
        {"name": "left", "points": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]], "normalized": True},
        {"name": "corner", "points": [[0.7, 0.7], [1, 0.7], [1, 1]], "normalized": True}],
        "lines": [{"name": "middle", "points": [[0.5, 0], [0.5, 1]], "normalized": True},
                  {"name": "across", "points": [[0, 0.5], [1, 0.5]], "normalized": True}],
        "motion": "off"},         # measured on its own (motion_cost): these frames are blank
        config.SPEC["track"], "bench", "track.")
    tracking = CameraTracking(settings, card, "bench", camera="bench-{}".format(seed))
    rng = np.random.RandomState(seed)
    size = rng.uniform(30, 160, (objects, 2))
    pos = rng.uniform(0, 1, (objects, 2)) * ([1280, 720] - size)
    vel = rng.normal(0, 3, (objects, 2))
    rows = np.zeros((objects, 6), np.float32)
    rows[:, 5] = rng.randint(0, 3, objects)
    frame = Frame(0, (720, 1280, 3))

    def step(i):
        pos[:] += vel
        out = (pos < 0) | (pos + size > [1280, 720])
        vel[out] *= -1
        np.clip(pos, 0, [1280, 720] - size, out=pos)
        rows[:, :2] = pos + rng.normal(0, 1.5, (objects, 2))
        rows[:, 2:4] = pos + size + rng.normal(0, 1.5, (objects, 2))
        rows[:, 4] = rng.uniform(0.3, 0.95, objects)
        frame.index = i
        frame.ts = time.time()
        started = time.perf_counter()
        tracking.update(rows, frame)
        return (time.perf_counter() - started) * 1000.0

    for i in range(100):                  # warm up: every track confirmed
        step(i)
    times = [step(100 + i) for i in range(frames)]
    tracemalloc.start()
    for i in range(frames // 2):
        step(100 + frames + i)
    held = tracemalloc.get_traced_memory()[0]
    for i in range(frames // 2):
        step(100 + frames + frames // 2 + i)
    grown = tracemalloc.get_traced_memory()[0] - held
    tracemalloc.stop()
    return {"objects": objects, "ms": _percentiles(times),
            "tracks": int(tracking.tracker.active().size),
            "growth_bytes_per_frame": round(grown / float(frames // 2), 1)}


def motion_cost(image, frames=200, size=(640, 480)):
    """Camera motion compensation's estimate per frame (edge.tracking.motion, mode auto) at
    `size`, on a camera panning 8 px and zooming 0.2 % per frame over `image` (a frame of the
    bench's source, enlarged): ms p50 and p95, and how many frames found a fit."""
    import cv2
    from edge.tracking.motion import CameraMotion
    width, height = size
    canvas = cv2.resize(image, (2 * width, 2 * height))
    motion = CameraMotion("auto")
    frame = Frame(0, (height, width, 3))
    times = []
    for i in range(frames):
        t = i % 100                         # there and back every 100 frames
        x = 8.0 * (t if t < 50 else 100 - t)
        zoom = 1.0 + 0.002 * (t if t < 50 else 100 - t)
        matrix = np.array([[zoom, 0.0, -x], [0.0, zoom, -0.5 * height]])
        cv2.warpAffine(canvas, matrix, size, dst=frame.image, borderMode=cv2.BORDER_REPLICATE)
        frame.index, frame.ts = i, i / 30.0
        started = time.perf_counter()
        motion.estimate(frame, np.zeros((0, 4)))
        times.append((time.perf_counter() - started) * 1000.0)
    return {"size": list(size), "ms": _percentiles(times[1:]), "fits": motion.fits,
            "frames": frames}


class Receiver:
    """A subscriber on the bench broker: when each result message arrived."""

    def __init__(self, settings, topic):
        self.arrivals = []
        self.ready = threading.Event()
        self.client = mqtt.make_client("edge-bench-{}".format(os.getpid()))
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, 0)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(settings["host"], settings["port"], 30)
        self.client.loop_start()
        self.ready.wait(5)

    def _on_message(self, client, userdata, message):
        try:
            ts = json.loads(message.payload)["frame"]["ts"]
        except (ValueError, KeyError, TypeError):
            return
        self.arrivals.append((time.time(), ts))

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


Options = collections.namedtuple("Options", (
    "detector source width height frames seconds mqtt matcher reference images rounds "
    "match_seconds stereo calib depth_seconds cameras live_seconds"))
Options.__new__.__defaults__ = (None, None, None, None, 5, 10.0, None, None, 4.0, None, 5.0)
Options.__doc__ = """What `edge bench` measures (its flags): the detection card, the source of
the frames and their size, frames per pipeline run and seconds per raw run; optionally a
broker URL (else a local Mosquitto), a matcher and its reference, an image folder, rounds,
matching's seconds, a stereo source with its calibration and seconds, a camera count and the
live run's seconds."""


def bench(cfg, options):
    """All the figures of the benchmark (`options`: an Options) as a dict."""
    detector, source_uri, width, height = (options.detector, options.source, options.width,
                                           options.height)
    frames_count, seconds, mqtt_url = options.frames, options.seconds, options.mqtt
    matcher, reference, images_uri = options.matcher, options.reference, options.images
    rounds, match_seconds = options.rounds, options.match_seconds
    stereo, calib, depth_seconds = options.stereo, options.calib, options.depth_seconds
    cameras, live_seconds = options.cameras, options.live_seconds
    import tempfile
    from edge import daemon, tasks
    maker = daemon.engine_maker(cfg)
    card = cards.load(detector)
    detect = tasks.create(card, maker, cfg["model_dir"], mirror=cfg["model_mirror"],
                          device="bench")
    frames = load_frames(source_uri, width, height)
    results = {"card": card.name, "backend": maker.backend.describe(),
               "frame_size": [width, height], "frames": frames_count,
               "cpu_count": os.cpu_count()}
    engine = detect.engine_for(width, height)
    model_path = models.model_path(card, cfg["model_dir"])
    results["raw_model_fps"] = _raw_model_fps(card, model_path, frames[0], seconds)
    results["host_cast_ms"] = host_cast_ms(frames[0])

    workdir = tempfile.mkdtemp(prefix="edge-bench-")
    broker = None
    if mqtt_url is None:
        broker, mqtt_url = start_local_broker(workdir)
        if mqtt_url is None:
            from edge.errors import UnavailableError
            raise UnavailableError("bench: mosquitto is not installed and no --mqtt URL was "
                                   "given; install mosquitto or pass --mqtt")
    settings = mqtt.parse_url(mqtt_url)
    qos = settings["qos"]
    link = mqtt.MqttLink(settings, "bench", "edge", queue_limit=100000)
    link.start()
    link.connected.wait(10)
    receiver = Receiver(settings, "edge/bench/detections")
    peer_client = mqtt.make_client("edge-bench-peer-{}".format(os.getpid()))
    peer_client.connect(settings["host"], settings["port"], 30)
    peer_client.loop_start()
    try:
        session = peer_session(model_path)

        def publish(payload):
            peer_client.publish("edge/bench-peer/detections", payload)
        slots = bound_slots(engine, frames, maker.allocate)
        # the same detector with tracking as configured (camera motion compensation included)
        tracked = tasks.create(card, maker, cfg["model_dir"], mirror=cfg["model_mirror"],
                               device="bench", track=dict(cfg["track"], enabled=True))
        measured = []
        for _ in range(max(1, rounds)):
            raw = raw_fps(engine, slots, seconds)
            fps, summary = run_pipeline(ReplaySource(frames, frames_count), [detect], link, qos)
            # right after the untracked run: after the peer loop, the broker still takes the
            # peer's backlog (its client publishes asynchronously) and slows what follows
            with_tracking = run_pipeline(ReplaySource(frames, frames_count), [tracked], link,
                                         qos)[0]
            peer = peer_loop(card, session, frames, frames_count, publish)
            measured.append({"raw_fps": raw, "pipeline_fps": fps, "peer_fps": peer,
                             "tracked_fps": with_tracking})
        results["rounds"] = measured
        for key in ("raw_fps", "pipeline_fps", "peer_fps", "tracked_fps"):
            results[key] = statistics.median(r[key] for r in measured)
        results["pipeline_over_raw"] = statistics.median(
            r["pipeline_fps"] / r["raw_fps"] for r in measured)
        results["pipeline_over_peer"] = statistics.median(
            r["pipeline_fps"] / r["peer_fps"] for r in measured)
        results["tracked_over_untracked"] = statistics.median(
            r["tracked_fps"] / r["pipeline_fps"] for r in measured)
        results["track_motion"] = cfg["track"]["motion"]
        results["stages_ms"] = summary["stages_ms"]       # frames queue up: throughput run
        # Latency as a camera sees it: frames paced at 80% of the engine's rate, newest wins.
        rate = 0.8 * results["raw_fps"]
        receiver.arrivals[:] = []
        paced = max(20, int(rate * 5))
        _, latency = run_pipeline(ReplaySource(frames, paced, fps=rate), [detect], link, qos)
        results["latency_run"] = {"fps": round(rate, 1), "frames": paced,
                                  "stages_ms": latency["stages_ms"]}
        time.sleep(0.5)
        received = np.array([(arrived - ts) * 1000.0 for arrived, ts in receiver.arrivals])
        results["received"] = len(received)
        results["capture_to_received_ms"] = _percentiles(received)
        stages = latency["stages_ms"]
        results["added_latency_p50_ms"] = round(stages["total"]["p50"] -
                                                stages["infer"]["p50"], 2)
        if images_uri:
            if "://" not in images_uri:
                images_uri = "images://" + os.path.abspath(os.path.expanduser(images_uri))
            source = sources.open_source(images_uri + ("&" if "?" in images_uri else "?") +
                                         "loop=1")
            detect_images = tasks.create(card, maker, cfg["model_dir"],
                                         mirror=cfg["model_mirror"], device="bench")
            detect_images.engine_for(width, height)
            limited = _Limited(source, frames_count)
            results["pipeline_images_fps"] = run_pipeline(limited, [detect_images], link,
                                                          qos)[0]
        results["alloc_per_frame_bytes"] = alloc_per_frame(detect, frames)
        results["tracking"] = tracking_cost(card)
        results["camera_motion"] = motion_cost(frames[0])
        if matcher:
            results["with_matcher"] = _with_matcher(cfg, maker, detect, matcher, reference,
                                                    frames, link, qos, workdir,
                                                    max(frames_count, int(
                                                        results["pipeline_fps"] *
                                                        match_seconds)))
            results["daemon_peak_rss_mb"] = daemon_peak_rss(cfg, card.path, matcher,
                                                            reference, width, height, workdir)
        if cameras:
            from edge.bench import cameras as benchcameras
            results["cameras"] = benchcameras.bench_cameras(
                cfg, card, frames, frames_count, cameras, rounds, link, qos, live_seconds,
                workdir, raw_seconds=max(seconds * rounds, 2.0))
        if stereo:
            from edge.bench import depth as benchdepth
            results["depth"] = benchdepth.bench_depth(
                cfg, maker, card, stereo, calib, width, height, link, qos,
                int(max(30, results["pipeline_fps"] * depth_seconds)), 2 * rounds)
    finally:
        receiver.close()
        peer_client.loop_stop()
        peer_client.disconnect()
        link.stop("bench finished")
        if broker is not None:
            broker.terminate()
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                                   1)
    return results


def _with_matcher(cfg, maker, detect, matcher, reference, frames, link, qos, workdir, count):
    """Detection's throughput with the matcher at 1 Hz beside it, against detection alone
    before and after, over `count` frames each (long enough that 1 Hz is 1 Hz: the first
    match runs at the first frame)."""
    from edge import tasks
    from edge.references import ReferenceStore
    store = ReferenceStore(workdir)
    image = store.get(store.configure(reference))
    match = tasks.create(cards.load(matcher), maker, cfg["model_dir"],
                         mirror=cfg["model_mirror"], device="bench", store=store, max_hz=1.0)
    match.engine_for(frames[0].shape[1], frames[0].shape[0], (image.shape[1], image.shape[0]))
    before, _ = run_pipeline(ReplaySource(frames, count), [detect], link, qos)
    started = time.perf_counter()
    both, _ = run_pipeline(ReplaySource(frames, count), [detect, match], link, qos)
    elapsed = time.perf_counter() - started
    after, _ = run_pipeline(ReplaySource(frames, count), [detect], link, qos)
    solo = (before + after) / 2.0
    return {"detect_fps": both, "solo_detect_fps": solo, "ratio": both / solo,
            "frames": count, "match_runs": match.frames,
            "match_hz": round(match.frames / elapsed, 3),
            "match_infer_ms": match.stats.summary()["stages_ms"]["infer"]}


def daemon_peak_rss(cfg, detector, matcher, reference, width, height, workdir):
    """Peak RSS (MB) of a real `edge run` with both tasks on this backend and frame size."""
    return edge_run_peak_rss(cfg, workdir, [
        "--source", "test://?width={}&height={}&fps=0&frames=60".format(width, height),
        "--detector", detector, "--matcher", matcher, "--reference", reference])


class _Limited(Source):
    """The first `count` frames of another source (an image folder looping)."""

    def __init__(self, inner, count):
        super().__init__(inner.uri, inner.location, inner.params)
        self.inner = inner
        self.live = False
        self.count = count
        self.done = 0

    def open(self):
        self.inner.open()

    def read_into(self, frame):
        if self.done >= self.count or not self.inner.read_into(frame):
            return False
        self.done += 1
        return True

    def close(self):
        self.inner.close()


def _raw_model_fps(card, model_path, image, seconds):
    """The original model on an already preprocessed tensor (ONNX Runtime, CPU)."""
    import onnxruntime
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    pre = onnxruntime.InferenceSession(
        graph.preprocess_model(card, image.shape[1], image.shape[0]).SerializeToString(),
        providers=["CPUExecutionProvider"])
    tensor = pre.run(None, {"frame": image})[0]
    feed = {session.get_inputs()[0].name: tensor}
    session.run(None, feed)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        done += 1
    return done / (time.perf_counter() - started)


def host_cast_ms(image, runs=50):
    """Median ms of the uint8 -> float32 frame copy TensorRT < 8.5 needs on the host (it has
    no uint8 inputs), from ordinary cached memory into a preallocated buffer."""
    staging = np.empty(image.shape, np.float32)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        np.copyto(staging, image, casting="unsafe")
        times.append((time.perf_counter() - started) * 1000.0)
    return round(float(np.median(times)), 3)


def _percentiles(values):
    if len(values) == 0:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(values, 50)), 2),
            "p95": round(float(np.percentile(values, 95)), 2)}


def table(r):
    """The figures as a few readable lines."""
    lines = [
        "edge bench: {} on {} ({}), {}x{} frames, {} CPUs".format(
            r["card"], r["backend"].get("backend"), r["backend"].get("device", ""),
            r["frame_size"][0], r["frame_size"][1], r["cpu_count"]),
        "  raw_fps        {:8.1f}  rewritten graph, fused preprocessing, frames in memory".format(
            r["raw_fps"]),
        "  raw_model_fps  {:8.1f}  original model on preprocessed tensors (ONNX Runtime)".format(
            r["raw_model_fps"]),
        "  pipeline_fps   {:8.1f}  capture -> infer -> publish to a real broker, replayed "
        "frames".format(r["pipeline_fps"]),
    ]
    if "pipeline_images_fps" in r:
        lines.append("  images_fps     {:8.1f}  the same from the image folder (JPEG decode per "
                     "frame)".format(r["pipeline_images_fps"]))
    lines += [
        "  peer_fps       {:8.1f}  hand-written single-threaded loop".format(r["peer_fps"]),
        "  pipeline/raw   {:8.3f}   pipeline/peer {:.3f}   (medians of {} alternating rounds; "
        "per round: {})".format(r["pipeline_over_raw"], r["pipeline_over_peer"],
                               len(r["rounds"]), " ".join(
                                   "{:.2f}".format(x["pipeline_fps"] / x["raw_fps"])
                                   for x in r["rounds"])),
        "  latency ms at {} fps: ".format(r["latency_run"]["fps"]) + "  ".join(
            "{} p50 {} p95 {}".format(k, v["p50"], v["p95"])
            for k, v in r["latency_run"]["stages_ms"].items()),
        "  added latency p50 {} ms (capture to publish minus inference); received by a "
        "subscriber p50 {} p95 {} ms".format(r["added_latency_p50_ms"],
                                             r["capture_to_received_ms"]["p50"],
                                             r["capture_to_received_ms"]["p95"]),
        "  alloc per frame {} bytes (peak, tracemalloc)   peak RSS {} MB".format(
            r["alloc_per_frame_bytes"], r["peak_rss_mb"]),
        "  host cast {} ms per frame (uint8 -> float32, what TensorRT < 8.5 adds on the "
        "CPU)".format(r["host_cast_ms"]),
    ]
    if "tracking" in r:
        t = r["tracking"]
        lines.append("  tracking       {} ms/frame p50 (p95 {}) at {} objects, 2 zones, 2 lines "
                     "(camera motion below); memory kept {} bytes/frame".format(t["ms"]["p50"], t["ms"]["p95"],
                                                         t["objects"],
                                                         t["growth_bytes_per_frame"]))
    if "tracked_fps" in r:
        lines.append("  tracked_fps    {:8.1f}  the pipeline with tracking (track.motion {}): "
                     "{:.3f} of without (medians of per-round ratios)".format(
                         r["tracked_fps"], r["track_motion"], r["tracked_over_untracked"]))
    if "camera_motion" in r:
        c = r["camera_motion"]
        lines.append("  camera motion  {} ms/frame p50 (p95 {}) at {}x{}, {} of {} frames "
                     "fitted (panning and zooming)".format(
                         c["ms"]["p50"], c["ms"]["p95"], c["size"][0], c["size"][1],
                         c["fits"], c["frames"]))
    if "with_matcher" in r:
        m = r["with_matcher"]
        lines.append("  with matcher at 1 Hz: detect {:.1f} fps = {:.3f} of solo {:.1f} ({} "
                     "matches in {} frames, {} Hz, match infer p50 {} ms)".format(
                         m["detect_fps"], m["ratio"], m["solo_detect_fps"], m["match_runs"],
                         m["frames"], m["match_hz"], m["match_infer_ms"]["p50"]))
        lines.append("  edge run with both tasks: peak RSS {} MB ({})".format(
            r.get("daemon_peak_rss_mb"), r["backend"].get("backend")))
    if "depth" in r:
        from edge.bench import depth as benchdepth
        lines += benchdepth.table_lines(r["depth"])
    if "cameras" in r:
        from edge.bench import cameras as benchcameras
        lines += benchcameras.table_lines(r["cameras"])
    return "\n".join(lines)


def plot(r, path):
    """A PNG with throughput bars and latency percentiles, drawn with OpenCV."""
    import cv2
    canvas = np.full((420, 760, 3), 255, np.uint8)
    bars = [("raw", r["raw_fps"]), ("raw model", r["raw_model_fps"]),
            ("pipeline", r["pipeline_fps"]), ("peer", r["peer_fps"])]
    if "pipeline_images_fps" in r:
        bars.insert(3, ("images", r["pipeline_images_fps"]))
    top = max(v for _, v in bars) or 1.0
    cv2.putText(canvas, "throughput (fps)", (20, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2)
    for i, (name, value) in enumerate(bars):
        x = 30 + i * 70
        h = int(300 * value / top)
        cv2.rectangle(canvas, (x, 370 - h), (x + 45, 370), (200, 120, 40), -1)
        cv2.putText(canvas, "{:.0f}".format(value), (x, 362 - h), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1)
        cv2.putText(canvas, name, (x - 5, 392), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(canvas, "latency p50 / p95 (ms)", (420, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.7,
                (0, 0, 0), 2)
    stages = list(r["latency_run"]["stages_ms"].items())
    worst = max((v["p95"] or 0) for _, v in stages) or 1.0
    for i, (name, v) in enumerate(stages):
        y = 70 + i * 70
        for j, (key, colour) in enumerate((("p50", (40, 160, 40)), ("p95", (40, 40, 200)))):
            w = int(250 * (v[key] or 0) / worst)
            cv2.rectangle(canvas, (480, y + j * 22), (480 + w, y + j * 22 + 18), colour, -1)
            cv2.putText(canvas, "{} {}".format(key, v[key]), (485 + w, y + j * 22 + 14),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(canvas, name, (420, y + 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.imwrite(path, canvas)
