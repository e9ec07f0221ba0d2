"""`edge bench --stereo URI --calib FILE`: what stereo depth costs, at the bench's frame size.

- disparity_ms: grey views + the estimator (StereoSGBM on a CPU host), median per pair;
- convert_ms: disparity -> depth by the conversion graph on the backend (ONNX Runtime here,
  TensorRT on a Jetson), beside convert_numpy_ms (vectorised numpy) and convert_loop_ms (a
  plain Python loop over the pixels), the speed-ups over the loop, and which of graph and
  numpy the pipeline uses (`stereo.convert`);
- box_ms: the median depth of one box (spatial), and per frame for the frame's detections;
- with_depth: detection's throughput with depth at `stereo.max_hz` beside it (a camera's
  mode: detection never waits), against detection alone, in adjacent pairs of runs of
  alternating order; the depth rate reached and its time per map.
The pairs are resized to the bench's size, and the calibration with them (f, cx and doffs
scale with the width, cy with the height): right for timing, approximate for depth.
"""

import statistics
import time

import numpy as np

from edge.stereo import calibration as calibrations
from edge.stereo import conversion as depths
from edge.bench.replay import ReplaySource, run_pipeline
from edge.frames import Frame


class StereoReplaySource(ReplaySource):
    """ReplaySource for stereo frames: each slot's left and right views written once."""

    def __init__(self, pairs, count):
        super().__init__([left for left, _ in pairs], count)
        self.pairs = pairs
        self._right = {}

    def read_into(self, frame):
        if not super().read_into(frame):
            return False
        right = frame.ensure_right(frame.height, frame.width)
        if self._right.get(frame.slot) is not right:
            np.copyto(right, self.pairs[(frame.index) % len(self.pairs)][1])
            self._right[frame.slot] = right
        return True


def load_pairs(uri, width, height, limit=16):
    """Up to `limit` (left, right) BGR pairs of a stereo source, resized to width x height."""
    import cv2
    from edge import sources
    from edge.errors import SourceError
    source = sources.open_source(uri)
    source.open()
    frame = Frame(0, (2, 2, 3))
    pairs, size = [], None
    try:
        while len(pairs) < limit and source.read_into(frame):
            size = (frame.width, frame.height)
            pairs.append(tuple(cv2.resize(view, (width, height), interpolation=cv2.INTER_AREA)
                               for view in (frame.image, frame.right)))
    finally:
        source.close()
    if not pairs:
        raise SourceError("bench: stereo source {} gave no pair".format(uri))
    return pairs, size


def scaled(calibration, width, height):
    """The calibration of frames resized from its size to width x height."""
    sx, sy = width / float(calibration.width), height / float(calibration.height)
    return calibrations.StereoCalibration(
        calibration.path, width, height, calibration.focal * sx, calibration.cx * sx,
        calibration.cy * sy, calibration.baseline_mm, calibration.doffs * sx)


def _median_ms(function, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def bench_depth(cfg, maker, card, stereo_uri, calib_path, width, height, link, qos,
                frames_count, rounds=6, runs=20):
    """The depth figures as a dict (see the module's docstring)."""
    from edge import tasks
    pairs, native = load_pairs(stereo_uri, width, height)
    calibration = calibrations.load(calib_path, cfg["max_image_pixels"])
    calibration.check_size(native[0], native[1], "bench source {}".format(stereo_uri))
    calibration = scaled(calibration, width, height)
    settings = cfg["stereo"]
    stereo = depths.StereoDepth(calibration, maker, width, height, settings)
    slot = stereo.slot()
    estimator = stereo.estimator
    stereo.compute(pairs[0][0], pairs[0][1], slot)          # warm-up
    timings = [stereo.compute(pairs[i % len(pairs)][0], pairs[i % len(pairs)][1], slot)
               for i in range(runs)]
    raw = stereo.raw
    out = np.zeros(raw.shape, np.float32)
    known = np.zeros(raw.shape, bool)
    constants = (calibration, estimator.scale_inverse, estimator.lowest_valid,
                 settings["depth_min_mm"], settings["depth_max_mm"])
    graph_times, numpy_times = [], []
    for _ in range(5 * runs):
        # Alternating, so that both see the same state of a shared machine. The graph's time
        # is what the pipeline pays: the int16 -> float32 copy into its input, then the run.
        graph_times.append(_median_ms(lambda: stereo.convert(slot, "graph"), 1))
        numpy_times.append(_median_ms(
            lambda: depths.to_depth_numpy(raw, *(constants + (out, known))), 1))
    convert_ms, numpy_ms = statistics.median(graph_times), statistics.median(numpy_times)
    loop_ms = _median_ms(lambda: depths.to_depth_loop(raw, *(constants + (out,))), 1)
    results = {"pairs": len(pairs), "estimator": estimator.describe(),
               "conversion_backend": maker.backend.name, "converter": stereo.converter,
               "disparity_ms": round(statistics.median(t[0] for t in timings), 2),
               "convert_ms": round(convert_ms, 3), "convert_numpy_ms": round(numpy_ms, 3),
               "convert_loop_ms": round(loop_ms, 1),
               "convert_speedup": round(loop_ms / convert_ms, 1),
               "convert_numpy_speedup": round(loop_ms / numpy_ms, 1),
               "density": round(float((slot.depth > 0).mean()), 3)}

    detect = tasks.create(card, maker, cfg["model_dir"], mirror=cfg["model_mirror"],
                          device="bench")
    first = Frame(0, pairs[0][0].shape)
    np.copyto(first.image, pairs[0][0])
    boxes = [d["box"] for d in detect.process(first)[0]["detections"]] or \
        [[x, y, x + width / 4.0, y + height / 4.0] for x in (0, width / 2.0)
         for y in (0, height / 2.0)]
    depth_map = slot.depth

    def all_boxes():
        for box in boxes:
            depths.spatial(depth_map, box, calibration, settings["box_scale"],
                           settings["min_valid"])
    frame_ms = _median_ms(all_boxes, max(runs, 50))
    results.update({"boxes": len(boxes), "box_ms": round(frame_ms / len(boxes), 4),
                    "boxes_per_frame_ms": round(frame_ms, 3)})
    results["with_depth"] = _with_depth(cfg, maker, card, detect, calibration, settings,
                                        pairs, link, qos, frames_count, rounds)
    stereo.close()
    return results


def _with_depth(cfg, maker, card, detect, calibration, settings, pairs, link, qos, count,
                rounds):
    """Detection's throughput with depth at its rate beside it, against detection alone:
    `rounds` adjacent pairs of runs, in alternating order (alone first, then with first), so
    that a drift of the machine's speed weighs on both sides; the ratio is the median of
    the pairs' ratios."""
    from edge import tasks
    from edge.stereo.task import DepthTask
    depth = DepthTask(maker, calibration, settings, device="bench", sync=False)
    with_depth = tasks.create(card, maker, cfg["model_dir"], mirror=cfg["model_mirror"],
                              device="bench", depth=depth)
    probe = Frame(0, pairs[0][0].shape)
    depth.prepare(probe)
    measured = []
    for i in range(max(1, rounds)):
        figures = {}
        for which in (("alone", "with") if i % 2 == 0 else ("with", "alone")):
            if which == "alone":
                figures["solo_detect_fps"], _ = run_pipeline(
                    StereoReplaySource(pairs, count), [detect], link, qos)
                continue
            started = time.perf_counter()
            figures["detect_fps"], _ = run_pipeline(StereoReplaySource(pairs, count),
                                                    [with_depth, depth], link, qos)
            figures["depth_hz"] = depth.frames / (time.perf_counter() - started)
        figures["ratio"] = figures["detect_fps"] / figures["solo_detect_fps"]
        measured.append(figures)
    infer = depth.stats.summary()["stages_ms"]["infer"]
    return {"rounds": measured, "frames": count, "max_hz": settings["max_hz"],
            "ratio": round(statistics.median(r["ratio"] for r in measured), 3),
            "detect_fps": round(statistics.median(r["detect_fps"] for r in measured), 1),
            "solo_detect_fps": round(statistics.median(r["solo_detect_fps"] for r in measured),
                                     1),
            "depth_hz": round(statistics.median(r["depth_hz"] for r in measured), 2),
            "depth_infer_ms": infer}


def table_lines(d):
    """The depth figures as lines of `edge bench`'s table."""
    w = d["with_depth"]
    return [
        "  depth ({}, {} pairs): disparity {} ms; conversion: graph on {} {} ms, numpy {} "
        "ms, per-pixel loop {} ms (graph {}x, numpy {}x faster; in use: {}); {:.0%} of "
        "pixels with a depth".format(
            d["estimator"], d["pairs"], d["disparity_ms"], d["conversion_backend"],
            d["convert_ms"], d["convert_numpy_ms"], d["convert_loop_ms"], d["convert_speedup"],
            d["convert_numpy_speedup"], d["converter"], d["density"]),
        "  spatial: {} ms per box, {} ms for the {} boxes of a frame".format(
            d["box_ms"], d["boxes_per_frame_ms"], d["boxes"]),
        "  with depth at {} Hz: detect {} fps = {} of solo {} fps (depth {} Hz, {} ms per "
        "map p50; median of {} pairs of runs of {} frames: {})".format(
            w["max_hz"], w["detect_fps"], w["ratio"], w["solo_detect_fps"], w["depth_hz"],
            w["depth_infer_ms"]["p50"], len(w["rounds"]), w["frames"],
            " ".join("{:.2f}".format(r["ratio"]) for r in w["rounds"])),
    ]
