"""`edge bench --cameras N`: what serving N cameras from one daemon costs, at the bench's size.

- raw: the engines alone on the same N frames, the one-frame engine N times against the
  batched engine once, alternating, median of the ratios (> 1: the batch is faster);
- together: one camera alone, then N cameras in one pipeline, each replaying its own frames
  from memory (camera i gets frames i, i + N, ... of the bench's set), `--frames` frames in
  all per run: frames per second of all cameras together, each camera's, and the slowest
  over the fastest; N cameras one frame at a time (round-robin) and as batches (one run of
  an engine with a batch dimension per round of frames). Ratios over one camera alone are
  the medians of `--rounds` rounds of the three runs, every other round in reverse order;
- live: N cameras each paced at what one camera alone reached, N times what detection can
  take: each camera's fps and drops (every camera keeps its newest frame), slowest over
  fastest, one at a time and batched;
- memory: the peak RSS of one `edge run` with N cameras against N `edge run`s with one
  camera each (N times the peak of one).
"""

import statistics
import time

from edge.bench.replay import ReplaySource, edge_run_peak_rss, run_to_end


def run_cameras(sources, task, link, qos):
    """Run a pipeline of `sources` ([(name, Source)], or a Source) with one task to its end:
    {fps of all frames together, cameras: {name: fps, frames, dropped}}."""
    pipeline, elapsed = run_to_end(sources, [task], link, qos)
    cameras = {}
    views = pipeline.snapshot().cameras
    for camera, view in zip(pipeline.cameras, views):
        stats = camera.stats
        count = stats.count
        # when this camera's last frame was finished, from the start of the run
        last = stats.when[:min(count, stats.when.shape[0])].max() - pipeline.started \
            if count else 0.0
        cameras[camera.name or "alone"] = {
            "fps": round(count / last, 2) if last > 0 else 0.0, "frames": count,
            "dropped": view.dropped}
    return {"fps": task.frames / elapsed, "cameras": cameras}


def raw_batch(single, batched, frames, cameras, seconds, allocate=None, block=0.5):
    """(ms of N frames one at a time, ms of them as one batch, median ratio of the two) of
    the engines alone on the same frames, in alternating blocks of `block` seconds for
    `seconds` (blocks, not single runs: ONNX Runtime's threads spin a while after a run, and
    the engine that just ran would slow the other down)."""
    from edge.frames import Frame
    import numpy as np
    slots = []
    for i in range(cameras):
        slot = Frame(i, frames[i % len(frames)].shape, allocate)
        np.copyto(slot.image, frames[i % len(frames)])
        slots.append(slot)
    bindings = [single.bind(slot) for slot in slots]
    batch_binding = batched.bind_batch()

    def one_at_a_time():
        for binding in bindings:
            single.infer(binding)

    def as_batch():
        batched.infer_batch(batch_binding, slots)

    def timed(run):
        run()                                          # warm-up after the other engine
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < block:
            run()
            done += 1
        return (time.perf_counter() - started) * 1000.0 / done

    one, many, ratios = [], [], []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(ratios) < 3:
        one.append(timed(one_at_a_time))
        many.append(timed(as_batch))
        ratios.append(one[-1] / many[-1])
    return {"one_at_a_time_ms": round(statistics.median(one), 2),
            "batch_ms": round(statistics.median(many), 2),
            "batch_speedup": round(statistics.median(ratios), 3), "runs": len(ratios)}


def _fairness(result):
    rates = [c["fps"] for c in result["cameras"].values()]
    return round(min(rates) / max(rates), 3) if max(rates) > 0 else 0.0


def bench_cameras(cfg, card, frames, count, cameras, rounds, link, qos, seconds, workdir,
                  raw_seconds=2.0):
    """The figures of several cameras in one daemon (see the module's docstring)."""
    from edge import daemon, tasks
    maker = daemon.engine_maker(cfg)

    def detector(batching):
        return tasks.create(card, maker, cfg["model_dir"], mirror=cfg["model_mirror"],
                            device="bench", track={"enabled": False}, batching=batching)

    alone, together, batched = detector(False), detector(False), detector(True)
    size = (frames[0].shape[1], frames[0].shape[0])
    batched.plan({size: cameras})
    raw = raw_batch(alone.engine_for(*size), batched.engine_for(*size), frames, cameras,
                    seconds, maker.allocate)
    per_camera = max(1, count // cameras)
    views = [frames[i::cameras] or frames for i in range(cameras)]

    def named(fps=None, frames_each=per_camera):
        return [("cam{}".format(i), ReplaySource(views[i], frames_each, fps))
                for i in range(cameras)]

    runs = (("alone", lambda: run_cameras(ReplaySource(frames, per_camera * cameras), alone,
                                          link, qos)),
            ("together", lambda: run_cameras(named(), together, link, qos)),
            ("batched", lambda: run_cameras(named(), batched, link, qos)))
    measured = []
    for i in range(max(1, rounds)):
        # every other round in reverse order: a machine whose speed drifts favours no run
        done = {key: run() for key, run in (runs if i % 2 == 0 else runs[::-1])}
        measured.append({"alone_fps": done["alone"]["fps"], "together": done["together"],
                         "batched": done["batched"]})
    alone_fps = statistics.median(r["alone_fps"] for r in measured)
    results = {
        "cameras": cameras, "frames": per_camera * cameras, "rounds": len(measured),
        "raw": raw,
        "batch_engine": [label for label in batched.engine_labels()],
        "alone_fps": round(alone_fps, 2),
        "together_fps": round(statistics.median(r["together"]["fps"] for r in measured), 2),
        "batched_fps": round(statistics.median(r["batched"]["fps"] for r in measured), 2),
        "together_over_alone": round(statistics.median(
            r["together"]["fps"] / r["alone_fps"] for r in measured), 3),
        "batched_over_alone": round(statistics.median(
            r["batched"]["fps"] / r["alone_fps"] for r in measured), 3),
        "batched_over_together": round(statistics.median(
            r["batched"]["fps"] / r["together"]["fps"] for r in measured), 3),
        "together_fairness": round(statistics.median(
            _fairness(r["together"]) for r in measured), 3),
        "batched_fairness": round(statistics.median(
            _fairness(r["batched"]) for r in measured), 3),
        "per_round": [{"alone_fps": round(r["alone_fps"], 2),
                       "together": r["together"], "batched": r["batched"]} for r in measured],
    }
    # Live: each camera as fast as one camera alone is processed, so N times too many frames.
    paced = max(10, int(alone_fps * seconds))
    live = {"fps_each": round(alone_fps, 2), "frames_each": paced}
    for key, task in (("together", together), ("batched", batched)):
        result = run_cameras(named(alone_fps, paced), task, link, qos)
        result["fairness"] = _fairness(result)
        live[key] = result
    results["live"] = live
    sources = []
    for i in range(cameras):
        sources += ["--source", "cam{}=test://?width={}&height={}&fps=0&frames=60".format(
            i, frames[0].shape[1], frames[0].shape[0])]
    one_rss = edge_run_peak_rss(cfg, workdir, [
        "--source", "test://?width={}&height={}&fps=0&frames=60".format(
            frames[0].shape[1], frames[0].shape[0]), "--detector", card.path], "one-camera")
    many_rss = edge_run_peak_rss(cfg, workdir, sources + ["--detector", card.path],
                                 "cameras")
    results["memory"] = {"one_daemon_mb": many_rss, "one_camera_daemon_mb": one_rss,
                         "separate_daemons_mb": None if one_rss is None else
                         round(one_rss * cameras, 1)}
    return results


def table_lines(c):
    """The figures as lines of `edge bench`'s table."""
    def rates(result):
        return " ".join("{:.1f}".format(x["fps"]) for x in result["cameras"].values())

    last = c["per_round"][-1]
    live = c["live"]
    memory = c["memory"]
    raw = c["raw"]
    return [
        "  engines alone on {} frames: one at a time {} ms, one batch {} ms: the batch {}x "
        "as fast (median of {} pairs of alternating blocks)".format(
            c["cameras"], raw["one_at_a_time_ms"], raw["batch_ms"], raw["batch_speedup"],
            raw["runs"]),
        "  {} cameras, {} frames a run: alone {} fps; together {} fps = {} of alone "
        "(cameras {} fps, slowest/fastest {}); batched {} fps = {} of alone, {} of "
        "together (cameras {} fps, slowest/fastest {}; engine {}); medians of {} rounds"
        .format(c["cameras"], c["frames"], c["alone_fps"], c["together_fps"],
                c["together_over_alone"], rates(last["together"]), c["together_fairness"],
                c["batched_fps"], c["batched_over_alone"], c["batched_over_together"],
                rates(last["batched"]), c["batched_fairness"],
                ", ".join(c["batch_engine"]), c["rounds"]),
        "  live, each camera at {} fps: one at a time {} fps each (dropped {}), slowest/"
        "fastest {}; batched {} fps each (dropped {}), slowest/fastest {}".format(
            live["fps_each"], rates(live["together"]),
            " ".join(str(x["dropped"]) for x in live["together"]["cameras"].values()),
            live["together"]["fairness"], rates(live["batched"]),
            " ".join(str(x["dropped"]) for x in live["batched"]["cameras"].values()),
            live["batched"]["fairness"]),
        "  memory: one edge run with {} cameras {} MB peak RSS; {} edge runs with one camera "
        "{} x {} = {} MB".format(c["cameras"], memory["one_daemon_mb"], c["cameras"],
                                 c["cameras"], memory["one_camera_daemon_mb"],
                                 memory["separate_daemons_mb"]),
    ]
