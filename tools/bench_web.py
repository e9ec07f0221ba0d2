"""What the web port costs the pipeline: frames/s of one daemon with the web server off, on
with no viewer, and on with one viewer of the live picture, and the JPEG encode time.

    .venv/bin/python tools/bench_web.py [--rounds 3] [--seconds 8] [--fps 5]

One daemon runs in this process (yolox-nano on ONNX Runtime, a 640x480 camera panning over
two held-out coco8 photographs, looped, as fast as the detector takes frames). Its web
server is started and stopped between rounds, the modes alternate (off, idle, viewer, then
the other way round) so that a drift of the host's speed favours none, and the viewer is a
separate process reading the MJPEG stream at --fps. Targets (issue 27): idle >= 0.95 x off,
one viewer >= 0.9 x off.
"""

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

MODELS = os.path.join(os.path.dirname(ROOT), "shared", "models")
VAL = os.path.join(os.path.dirname(ROOT), "shared", "data", "coco8", "images", "val")
MODES = ("off", "idle", "viewer")
# The viewer: reads the stream and drops it, as a browser that keeps up would.
READER = ("import sys, urllib.request\n"
          "r = urllib.request.urlopen(sys.argv[1])\n"
          "while r.read(65536):\n"
          "    pass\n")


def pan_frames(folder, frames=45):
    """640x480 frames of a pan over two held-out photographs, as JPEGs."""
    import pan_clip
    pan_clip.write_folder(folder, [os.path.join(VAL, "000000000036.jpg"),
                                   os.path.join(VAL, "000000000061.jpg")], frames)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(daemon, seconds):
    """(frames/s the daemon's tasks processed over `seconds`, this process's CPU ms per
    frame): on a busy host the rate follows the other programs' load too, the CPU time per
    frame much less."""
    begun, cpu, count = time.monotonic(), time.process_time(), daemon.progress()
    daemon.stop_event.wait(seconds)
    frames = daemon.progress() - count
    return (frames / (time.monotonic() - begun),
            (time.process_time() - cpu) * 1000.0 / max(frames, 1))


def rounds(daemon, web_config, args, results, cpu, figures):
    """The benchmark proper, beside the daemon's main thread."""
    from edge.web import WebServer
    try:
        deadline = time.monotonic() + 120
        while daemon.progress() < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(args.warmup)
        for number in range(args.rounds):
            order = MODES if number % 2 == 0 else MODES[::-1]
            for mode in order:
                web = viewer = None
                if mode != "off":
                    web = WebServer(daemon, dict(web_config, port=free_port())).start()
                    daemon.web = web
                if mode == "viewer":
                    url = "http://{}/api/cameras/cam/stream?fps={}".format(web.address,
                                                                            args.fps)
                    viewer = subprocess.Popen([sys.executable, "-c", READER, url])
                time.sleep(args.settle)
                fps, cpu_ms = measure(daemon, args.seconds)
                results[mode].append(fps)
                cpu[mode].append(cpu_ms)
                if web is not None:
                    streams = web.streams.figures()
                    if mode == "viewer":
                        figures.append(streams)
                if viewer is not None:
                    viewer.terminate()
                    viewer.wait(5)
                if web is not None:
                    web.stop()
                    daemon.web = None
                print("round {} {:>6}: {:6.2f} frames/s, {:6.1f} CPU ms/frame".format(
                    number + 1, mode, fps, cpu_ms), flush=True)
    finally:
        daemon.stop_event.set()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured per mode and round")
    parser.add_argument("--fps", type=float, default=5.0, help="the viewer's rate")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="pipeline.threads (ONNX Runtime threads; 0: one per core)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from edge import cameras, config
    from edge.daemon import Daemon
    work = tempfile.mkdtemp(prefix="bench_web-")
    frames = os.path.join(work, "pan")
    os.mkdir(frames)
    pan_frames(frames)
    model_dir = os.path.join(work, "models")
    subprocess.check_call([sys.executable, "-m", "edge", "models", "fetch", "--mirror", MODELS,
                           "--model-dir", model_dir], stdout=subprocess.DEVNULL, cwd=ROOT)
    source, named = cameras.parse_flags(["cam=images://{}?loop=1".format(frames)])
    cfg = config.load(None, {"source": source, "sources": named, "detector": "yolox-nano",
                             "model_dir": model_dir, "state_dir": os.path.join(work, "state"),
                             "pipeline.threads": args.threads})
    web_config = dict(cfg["web"])
    daemon = Daemon(cfg)
    results = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}
    figures = []
    bench = threading.Thread(target=rounds, args=(daemon, web_config, args, results, cpu, figures),
                             name="bench", daemon=True)
    bench.start()
    daemon.run()
    bench.join(10)

    print()
    print("640x480, yolox-nano on ONNX Runtime (CPU), {} rounds of {:.0f} s per mode".format(
        args.rounds, args.seconds))
    off = statistics.median(results["off"])
    off_cpu = statistics.median(cpu["off"])
    for mode in MODES:
        values = results[mode]
        median = statistics.median(values)
        print("{:>6}: median {:6.2f} frames/s ({}), {:.3f} x off; CPU {:.1f} ms/frame, "
              "{:.3f} x off".format(mode, median, ", ".join("{:.2f}".format(v) for v in values),
                                    median / off, statistics.median(cpu[mode]),
                                    statistics.median(cpu[mode]) / off_cpu))
    encode = [f["cameras"]["cam"]["encode_ms"] for f in figures if f["cameras"].get("cam")]
    encoded = [f["cameras"]["cam"]["encoded"] for f in figures if f["cameras"].get("cam")]
    if encode:
        print("JPEG encode: {:.2f} ms per frame (median of the viewer rounds' means; "
              "{} frames encoded per round, at {} frames/s asked)".format(
                  statistics.median(encode), encoded, args.fps))
    idle = statistics.median(results["idle"]) / off
    viewer = statistics.median(results["viewer"]) / off
    print("targets: idle {:.3f} >= 0.95 {}; one viewer {:.3f} >= 0.9 {}".format(
        idle, "met" if idle >= 0.95 else "MISSED", viewer, "met" if viewer >= 0.9 else "MISSED"))


if __name__ == "__main__":
    main()
