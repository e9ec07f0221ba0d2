"""The `edge` command line: run, models (see DESIGN.md, Command line)."""

import argparse
import logging
import os
import sys

from edge import __version__, installed, tasks
from edge.errors import EXIT_FAILURE, EXIT_OK, EdgeError, InstallError

logger = logging.getLogger("edge")

# Modules of setup.cfg's `daemon` extra. A plain `pip install` is a robot's (edge.client,
# edge listen, edge health: paho-mqtt alone), so every other command imports what it needs
# inside itself, and one run there says which extra to add.
DAEMON_MODULES = {"numpy": "numpy", "yaml": "PyYAML", "onnx": "onnx", "psutil": "psutil",
                  "scipy": "scipy"}     # module: its package


def _run(args):
    from edge import cameras, config, daemon
    source, named = cameras.parse_flags(args.source)
    overrides = {
        "source": source, "sources": named,
        "mqtt.url": args.mqtt, "jsonl": args.jsonl, "device_id": args.device_id,
        "backend": args.backend, "max_frames": args.max_frames, "model_mirror": args.mirror,
        "model_dir": args.model_dir, "reference": args.reference, "state_dir": args.state_dir,
        "stereo.calib": args.calib,
        "metrics.port": args.metrics_port, "web.port": args.web_port,
        "engine.precision": args.precision,
    }
    overrides.update((k.config_key, getattr(args, k.config_key)) for k in tasks.KINDS)
    cfg = config.load(args.config, overrides)
    if args.debug:
        cfg["log_level"] = "debug"
    logging.getLogger().setLevel(cfg["log_level"].upper())
    return daemon.run(cfg, args.config, overrides)


def _models_list(args):
    from edge import cards, models
    model_dir = args.model_dir or models.default_model_dir()
    rows = []
    for name, path in sorted(cards.available().items()):
        card = cards.load(path)
        file_path = models.model_path(card, model_dir)
        state = "present" if os.path.isfile(file_path) else "missing"
        rows.append((name, card.task, card.family, card.model["file"], state))
    widths = [max(len(r[i]) for r in rows + [("card", "task", "family", "file", "state")])
              for i in range(5)]
    for row in [("card", "task", "family", "file", "state")] + rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print("model folder: {}".format(model_dir))
    return EXIT_OK


def _models_fetch(args):
    from edge import cards, fetch, models
    model_dir = args.model_dir or models.default_model_dir()
    names = args.names or sorted(cards.available())
    for name in names:
        card = cards.load(name)
        dest = models.model_path(card, model_dir)
        fetch.fetch(card.model["url"], card.model["sha256"], dest, mirror=args.mirror,
                    what="model {} ({})".format(card.model["file"], card.name))
        print("{}: {} ok (sha256 {}...)".format(card.name, dest, card.model["sha256"][:12]))
    return EXIT_OK


def _build(args):
    """`edge build`: build (or check) the engines the config needs, with progress;
    --export-onnx: write their graphs instead (edge.engines)."""
    from edge import cameras, engines
    overrides = {"source": args.source, "backend": args.backend, "model_dir": args.model_dir,
                 "model_mirror": args.mirror, "reference": args.reference,
                 "state_dir": args.state_dir, "engine.precision": args.precision}
    cfg = _beside_the_service(args.config, overrides)
    names = args.cards or tasks.card_names(cfg)
    if not names:
        from edge.errors import ConfigError
        raise ConfigError("edge build: no card to build; name cards (edge build yolox-nano) or "
                          "configure {} with -c (or in {})".format(
                              "/".join(k.config_key for k in tasks.KINDS), installed.CONFIG))
    sizes = cameras.frame_sizes(args.size, cfg)
    if args.export_onnx:
        found = engines.export_onnx(cfg, names, sizes, args.export_onnx, args.tensorrt)
        return EXIT_FAILURE if found else EXIT_OK
    engines.build_all(cfg, names, sizes)
    return EXIT_OK


def _calibrate(args):
    """`edge calibrate`: the card's network calibrated into its INT8 graph beside the
    engines, where engine.precision int8 takes it (edge.precision)."""
    from edge import cards, precision
    overrides = {"model_dir": args.model_dir, "model_mirror": args.mirror,
                 "state_dir": args.state_dir}
    cfg = _beside_the_service(args.config, overrides)
    made = precision.calibrate(
        cfg, cards.load(args.card), args.images, args.count,
        progress=lambda stage, fraction=None: print("calibrating {}: {}{}".format(
            args.card, stage, "" if fraction is None else " {:.0%}".format(fraction)),
            file=sys.stderr, flush=True))
    print("{}: calibrated on {} frames from {} images in {:.1f} s, written to {} "
          "(engine.precision int8 uses it)".format(args.card, made["frames"], made["images"],
                                                   made["seconds"], made["path"]))
    return EXIT_OK


def _beside_the_service(path, overrides):
    """The config of `edge build` / `edge doctor`: `-c FILE`, else the installed service's
    with its folders (as root: as the service's user); says which."""
    from edge import config
    path = installed.config_path(path)
    cfg = config.load(path, overrides, require_task=False, folders=installed.folders(path))
    if path == installed.CONFIG:
        installed.become_owner(cfg["state_dir"])
    print("config: {} (models {}, engines {})".format(
        path or "none (defaults and flags)", cfg["model_dir"], cfg["engine"]["dir"]))
    return cfg


def _health(args):
    """`edge health`: fresh reports from devices over MQTT; exit 0 healthy, 1 unhealthy, 2 silent
    or offline (or no device found)."""
    import json
    from edge import remote
    from edge.errors import ConfigError
    if not args.devices and not args.all:
        raise ConfigError("edge health: name devices (edge health cam1 cam2) or pass --all")
    if not 0 < args.timeout <= 3600:    # (NaN too)
        raise ConfigError("edge health: --timeout {:g}: seconds, more than 0 and at most "
                          "3600".format(args.timeout))
    results, code = remote.check(args.mqtt, args.devices, prefix=args.prefix,
                                 timeout=args.timeout, all_devices=args.all,
                                 credentials=_credentials(args))
    if args.json:
        print(json.dumps(results, indent=1, sort_keys=True))
    else:
        print(remote.table(results) if results else "no device found under {}/+/status".format(
            args.prefix))
    return code


def _listen(args):
    """`edge listen`: what robots receive, printed (readable or JSON lines), filtered."""
    from edge import listen
    return listen.listen(args.mqtt, args.devices, args.topic, cameras=args.camera,
                         labels=args.label, min_score=args.min_score, count=args.count,
                         as_json=args.json, prefix=args.prefix,
                         credentials=_credentials(args))


def _precision_flag(command):
    command.add_argument("--precision", choices=("auto", "fp16", "fp32", "int8"),
                         help="engine precision (engine.precision): auto is the card's "
                              "(fp16) on a GPU, fp32 on the CPU; int8 needs `edge "
                              "calibrate` or the card's calibration images")


def _broker_flags(command):
    """--mqtt, --prefix and the credential flags of the commands that are broker clients."""
    command.add_argument("--mqtt", default="mqtt://localhost:1883", help="broker URL")
    command.add_argument("--prefix", default="edge", help="topic prefix (default edge)")
    command.add_argument("--username", help="broker user name")
    command.add_argument("--password-file",
                         help="file holding the password (or EDGE_MQTT_PASSWORD)")
    command.add_argument("--ca-file", help="CA certificate for mqtts://")
    command.add_argument("--cert-file", help="client certificate")
    command.add_argument("--key-file", help="client certificate's key")


def _credentials(args):
    """The credential flags as keyword arguments of edge.mqtt.with_credentials."""
    return {"username": args.username, "password_file": args.password_file,
            "ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}


def _bench(args):
    """`edge bench`: raw, pipeline and peer throughput, latency, allocation; --json, --plot."""
    import json
    from edge import cameras, config
    from edge.bench import main as bench
    overrides = {"backend": args.backend, "model_dir": args.model_dir,
                 "model_mirror": args.mirror, "state_dir": args.state_dir,
                 "engine.precision": args.precision}
    cfg = config.load(args.config, overrides, require_task=False)
    if args.cameras is not None and args.cameras < 2:
        from edge.errors import ConfigError
        raise ConfigError("--cameras {}: give 2 or more (one camera is what the rest of the "
                          "bench measures)".format(args.cameras))
    width, height = cameras.frame_size(args.size, None)
    images = args.images
    if images is None and os.path.isdir(os.path.expanduser(args.source)):
        images = args.source
    results = bench.bench(cfg, bench.Options(
        detector=args.detector, source=args.source, width=width, height=height,
        frames=args.frames, seconds=args.seconds, mqtt=args.mqtt, matcher=args.matcher,
        reference=args.reference, images=images, rounds=args.rounds,
        match_seconds=args.match_seconds, stereo=args.stereo,
        calib=args.calib or cfg["stereo"]["calib"], depth_seconds=args.depth_seconds,
        cameras=args.cameras, live_seconds=args.live_seconds))
    print(bench.table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    if args.plot:
        bench.plot(results, args.plot)
    return EXIT_OK


def _track(args):
    """`edge track`: the tracker offline, MOTChallenge det.txt in, results out."""
    import time
    from edge import cameras, config
    from edge.tracking import mot
    overrides = {"track.high_score": args.high_score, "track.low_score": args.low_score}
    cfg = config.load(args.config, overrides, require_task=False)
    detections = mot.read_detections(args.detections)
    started = time.perf_counter()
    size = cameras.frame_size(args.size, None) if args.size else None
    results = mot.track(detections, cfg["track"], fill_gaps=not args.no_fill, size=size)
    elapsed = time.perf_counter() - started
    mot.write_results(results, args.out)
    frames = int(detections[:, 0].max()) if detections.shape[0] else 0
    print("{}: {} frames, {} detections -> {} tracks, {} result lines in {} ({:.2f} ms a "
          "frame)".format(args.detections, frames, detections.shape[0],
                          len(set(results[:, 1].astype(int))), results.shape[0], args.out,
                          1000.0 * elapsed / max(frames, 1)))


def _depth(args):
    """`edge depth LEFT RIGHT --calib FILE --out DEPTH.npy|.png`: one pair's depth map."""
    from edge import config
    from edge.stereo import pair
    overrides = {"backend": args.backend, "state_dir": args.state_dir, "stereo.calib": args.calib}
    cfg = config.load(args.config, overrides, require_task=False)
    print(pair.depth_map(cfg, args.left, args.right, args.out))
    return EXIT_OK


def _doctor(args):
    """`edge doctor`: versions, engines built or loaded, outputs checked, latency."""
    from edge import cards, doctor
    overrides = {"backend": args.backend, "model_dir": args.model_dir,
                 "model_mirror": args.mirror, "state_dir": args.state_dir}
    cfg = _beside_the_service(args.config, overrides)
    if args.memory:
        return doctor.memory(cfg)
    names = args.cards or tasks.card_names(cfg) or sorted(cards.available())
    return doctor.doctor(cfg, names, write_reference=args.write_reference)


def parser():
    """The argument parser (also used by the documentation)."""
    top = argparse.ArgumentParser(prog="edge", description="Jetson vision sensor over MQTT.")
    top.add_argument("--version", action="version", version="edge " + __version__)
    top.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline in the foreground")
    run.add_argument("-c", "--config", help="YAML config file (flags override it)")
    run.add_argument("--source", action="append",
                     help="source URI: test://, images:///dir, file.mp4, /dev/video0, "
                          "rtsp://..., csi://0; NAME=URI (repeatable) for named cameras")
    for k in tasks.KINDS:
        run.add_argument("--" + k.config_key,
                         help="{} (e.g. {})".format(k.help, k.example))
    run.add_argument("--reference", help="image the matcher matches in this run (named after "
                                         "its file; not stored)")
    run.add_argument("--state-dir", help="folder for references and engines")
    run.add_argument("--calib", help="stereo calibration (Middlebury calib.txt or OpenCV "
                                     "YAML/XML) for a stereo:// source: depth and `spatial`")
    run.add_argument("--mqtt", help="broker URL mqtt://host[:port][?qos=0|1&keepalive=S]")
    run.add_argument("--jsonl", help="also append every message to this file")
    run.add_argument("--device-id", help="device name in topics (default: host name)")
    run.add_argument("--backend", choices=("auto", "trt", "ort"))
    _precision_flag(run)
    run.add_argument("--max-frames", type=int, help="stop after N frames")
    run.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (metrics.port)")
    run.add_argument("--web-port", type=int, metavar="PORT",
                     help="serve the live page and its API on 127.0.0.1:PORT (web.port; "
                          "docs/web.md)")
    run.add_argument("--model-dir", help="folder of model files")
    run.add_argument("--mirror", help="local folder to fetch models from (or EDGE_MODEL_MIRROR)")
    run.set_defaults(func=_run)

    bld = sub.add_parser("build", help="build or refresh engines now, with progress")
    bld.add_argument("cards", nargs="*", metavar="CARD", help="cards (default: the configured "
                                                               "detector and matcher)")
    bld.add_argument("-c", "--config", help="YAML config file (default: {} when it exists, "
                                            "with the service's folders)".format(
                                                installed.CONFIG))
    bld.add_argument("--size", help="frame size WxH of every camera (default: each "
                                    "camera's first frame)")
    bld.add_argument("--source", help="source URI to learn the frame size from")
    bld.add_argument("--reference", help="reference image for matcher engines (not stored)")
    bld.add_argument("--backend", choices=("auto", "trt", "ort"))
    _precision_flag(bld)
    bld.add_argument("--model-dir", help="folder of model files")
    bld.add_argument("--mirror", help="local folder to fetch models from")
    bld.add_argument("--state-dir", help="folder for references and engines")
    bld.add_argument("--export-onnx", metavar="DIR",
                     help="write each rewritten graph as TensorRT receives it into DIR, check "
                          "it against TensorRT's ONNX parser, and build nothing")
    bld.add_argument("--tensorrt", metavar="VERSION",
                     help="with --export-onnx: the TensorRT version to export for (default: "
                          "the installed one, else 8.2, the Jetson Nano's)")
    bld.set_defaults(func=_build)

    hl = sub.add_parser("health", help="ask devices for a fresh health report over MQTT")
    hl.add_argument("devices", nargs="*", metavar="DEVICE")
    hl.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for answers")
    hl.add_argument("--all", action="store_true",
                    help="every device whose status the broker retains, offline ones too")
    hl.add_argument("--json", action="store_true", help="print the reports as JSON")
    _broker_flags(hl)
    hl.set_defaults(func=_health)

    from edge.client import TOPICS
    ls = sub.add_parser("listen", help="print what robots receive from devices over MQTT, "
                                       "filtered (readable or JSON lines)")
    ls.add_argument("devices", nargs="*", metavar="DEVICE", help="devices (default: all)")
    ls.add_argument("--topic", action="append", choices=TOPICS,
                    help="what to receive (default detections; repeat for several)")
    ls.add_argument("--camera", action="append", metavar="NAME",
                    help="only messages whose `camera` is NAME (repeat for several)")
    ls.add_argument("--label", action="append", metavar="L",
                    help="only detections and events of label L (repeat for several)")
    ls.add_argument("--min-score", type=float, metavar="S",
                    help="only detections and events scoring at least S (0..1)")
    ls.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    ls.add_argument("--json", action="store_true",
                    help="print each message's payload as a JSON line")
    _broker_flags(ls)
    ls.set_defaults(func=_listen)

    bn = sub.add_parser("bench", help="throughput and latency: raw engine, pipeline, peer loop")
    bn.add_argument("--source", required=True, help="frames to replay (folder, video, test://)")
    bn.add_argument("--detector", default="yolox-nano", help="detection card")
    bn.add_argument("--size", default="640x480", help="frame size WxH the frames are resized to")
    bn.add_argument("--frames", type=int, default=300, help="frames per pipeline and peer run")
    bn.add_argument("--seconds", type=float, default=2.0, help="length of each raw loop")
    bn.add_argument("--rounds", type=int, default=5,
                    help="alternating raw/pipeline/peer rounds; ratios are their medians")
    bn.add_argument("--match-seconds", type=float, default=10.0,
                    help="length of the runs with and without the matcher beside detection")
    bn.add_argument("--mqtt", help="broker URL (default: a local mosquitto on a free port)")
    bn.add_argument("--images", help="image folder for the decode-per-frame run")
    bn.add_argument("--matcher", help="also run this matcher at 1 Hz beside detection")
    bn.add_argument("--reference", help="reference image for --matcher")
    bn.add_argument("--stereo", metavar="URI", help="also time stereo depth on this stereo:// "
                                                   "source's pairs (resized to --size)")
    bn.add_argument("--calib", help="calibration of the --stereo pairs (default stereo.calib)")
    bn.add_argument("--depth-seconds", type=float, default=4.0,
                    help="length of each run with and without depth beside detection "
                         "(2 x --rounds pairs of runs)")
    bn.add_argument("--cameras", type=int, metavar="N",
                    help="also run N cameras in one pipeline (each its own frames) against one "
                         "alone, one frame at a time and batched, and the memory of N cameras "
                         "in one edge run against N edge runs")
    bn.add_argument("--live-seconds", type=float, default=5.0,
                    help="with --cameras: length of the runs where each camera is paced at "
                         "one camera's rate")
    bn.add_argument("--json", help="write the figures here")
    bn.add_argument("--plot", help="draw throughput and latency into this PNG")
    bn.add_argument("-c", "--config", help="YAML config file")
    bn.add_argument("--backend", choices=("auto", "trt", "ort"))
    _precision_flag(bn)
    bn.add_argument("--model-dir", help="folder of model files")
    bn.add_argument("--mirror", help="local folder to fetch models from")
    bn.add_argument("--state-dir", help="folder for engines")
    bn.set_defaults(func=_bench)

    tr = sub.add_parser("track", help="run the tracker on MOTChallenge detections (det.txt), "
                                      "write MOTChallenge results")
    tr.add_argument("detections", metavar="DETS",
                    help="det.txt: frame,id,x,y,w,h,score[,...] per line, frames from 1")
    tr.add_argument("--out", required=True, metavar="RESULTS",
                    help="results: frame,id,x,y,w,h,1,-1,-1,-1 per line")
    tr.add_argument("-c", "--config", help="YAML config file (its track: section)")
    tr.add_argument("--high-score", type=float,
                    help="boxes that start and extend tracks (default 0.5, or track.high_score)")
    tr.add_argument("--low-score", type=float, help="weaker boxes that keep tracks alive")
    tr.add_argument("--size", help="frame size WxH (seqinfo.ini's imWidth x imHeight): boxes "
                                   "cut by the frame's edge then match more freely")
    tr.add_argument("--no-fill", action="store_true",
                    help="leave the frames a track was unseen empty (as published live)")
    tr.set_defaults(func=_track)

    dp = sub.add_parser("depth", help="depth map of one stereo pair (mm) into .npy or .png")
    dp.add_argument("left", metavar="LEFT", help="left image")
    dp.add_argument("right", metavar="RIGHT", help="right image")
    dp.add_argument("--calib", help="calibration: Middlebury calib.txt or OpenCV stereo "
                                    "YAML/XML (default: stereo.calib of -c)")
    dp.add_argument("--out", required=True, help="DEPTH.npy (float32 mm, NaN where unknown) or "
                                                 "DEPTH.png (16-bit mm, 0 where unknown)")
    dp.add_argument("-c", "--config", help="YAML config file (its stereo: settings)")
    dp.add_argument("--backend", choices=("auto", "trt", "ort"))
    dp.add_argument("--state-dir", help="folder for engines")
    dp.set_defaults(func=_depth)

    cb = sub.add_parser("calibrate", help="calibrate a card's network for engine.precision "
                                          "int8 on your images (docs/int8.md)")
    cb.add_argument("card", metavar="CARD", help="detection card (e.g. yolox-nano)")
    cb.add_argument("--images", required=True, metavar="DIR",
                    help="folder of images like your camera's (a few hundred frames of it "
                         "are best)")
    cb.add_argument("--count", type=int, default=120, metavar="N",
                    help="calibration frames made from them (default 120)")
    cb.add_argument("-c", "--config", help="YAML config file (default: {} when it exists, "
                                           "with the service's folders)".format(
                                               installed.CONFIG))
    cb.add_argument("--model-dir", help="folder of model files")
    cb.add_argument("--mirror", help="local folder to fetch models from")
    cb.add_argument("--state-dir", help="folder for engines (the graph is written there)")
    cb.set_defaults(func=_calibrate)

    dr = sub.add_parser("doctor", help="check this device: versions, engines, outputs, latency")
    dr.add_argument("cards", nargs="*", metavar="CARD",
                    help="cards (default: the configured ones, else all)")
    dr.add_argument("-c", "--config", help="YAML config file (default: {} when it exists, "
                                           "with the service's folders)".format(
                                               installed.CONFIG))
    dr.add_argument("--backend", choices=("auto", "trt", "ort"))
    dr.add_argument("--model-dir", help="folder of model files")
    dr.add_argument("--mirror", help="local folder to fetch models from")
    dr.add_argument("--state-dir", help="folder for engines")
    dr.add_argument("--memory", action="store_true",
                    help="print only the memory plan of the config on this board, each figure "
                         "with its source (docs/memory.md); exit 1 when it does not fit")
    dr.add_argument("--write-reference", action="store_true",
                    help="store this run's outputs as the reference (maintainers)")
    dr.set_defaults(func=_doctor)

    models = sub.add_parser("models", help="list or fetch model files")
    models_sub = models.add_subparsers(dest="action", metavar="ACTION")
    lst = models_sub.add_parser("list", help="cards and whether their model is present")
    lst.add_argument("--model-dir", help="folder of model files")
    lst.set_defaults(func=_models_list)
    fch = models_sub.add_parser("fetch", help="download model files, checked against sha256")
    fch.add_argument("names", nargs="*", metavar="NAME", help="cards (default: all)")
    fch.add_argument("--mirror", help="local folder to copy from (or EDGE_MODEL_MIRROR)")
    fch.add_argument("--model-dir", help="folder of model files")
    fch.set_defaults(func=_models_fetch)
    for command in _subcommands(top):
        # also after the subcommand (`edge run ... --debug`), as the error messages say, on
        # every subcommand, those added later too; SUPPRESS: absent there, it leaves the
        # top-level flag's value alone
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="debug logs and tracebacks")
    return top


def _subcommands(command):
    """The parsers of every subcommand under `command`, at every level (`models fetch`)."""
    found = []
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any(sub is other for other in found):    # (an alias is the same one)
                    found += [sub] + _subcommands(sub)
    return found


class _QuietStdout:
    """sys.stdout that drops what a closed pipe cannot take (`edge health --json | head`):
    the command ends with its own exit status instead of a BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        # What is still buffered (and everything later) goes nowhere, quietly, also when
        # the interpreter flushes at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv=None):
    """Entry point of the console script; returns the exit status."""
    stdout = sys.stdout
    quiet = sys.stdout = _QuietStdout(stdout)
    try:
        return _main(argv)
    finally:
        quiet.flush()
        sys.stdout = stdout


def _main(argv):
    args = parser().parse_args(argv)
    from edge import logs
    logs.setup(logging.DEBUG if args.debug else logging.INFO)
    if not getattr(args, "func", None):
        parser().print_help()
        return EXIT_OK if args.command is None else 2
    try:
        return _call(args)
    except EdgeError as e:
        if args.debug:
            logger.exception("failed")
        print("edge: error: {}".format(_shown(e, args)), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        print("edge: internal error: {}: {} (run with --debug for the traceback)".format(
            type(e).__name__, _shown(e, args)), file=sys.stderr)
        return EXIT_FAILURE


def _call(args):
    """The command's exit status; InstallError for a daemon command on a client install."""
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        module = (e.name or "").partition(".")[0]
        if module not in DAEMON_MODULES:
            raise
        raise InstallError(
            "edge {} needs the daemon's packages ({} is not installed; this is a robot's client "
            "install): pip install {} adds them ('[cpu]' on a PC, with ONNX Runtime and "
            "OpenCV; on a Jetson: sudo tools/install-jetson)".format(
                args.command, DAEMON_MODULES[module], _with_extra("daemon"))) from e


def _with_extra(extra):
    """What to give pip for this install with `extra`: its source as pip recorded it."""
    import glob
    import json
    import shlex
    from urllib.parse import unquote, urlsplit
    for folder in sys.path:
        for path in glob.glob(os.path.join(folder or ".", "edge-*.dist-info", "direct_url.json")):
            try:
                with open(path, "r", encoding="utf-8") as f:
                    url = json.load(f)["url"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(url, str) and url.startswith("file://"):
                return shlex.quote("{}[{}]".format(unquote(urlsplit(url).path), extra))
            if isinstance(url, str):
                return shlex.quote("edge[{}] @ {}".format(extra, url))
    return shlex.quote("/path/to/edge[{}]".format(extra))


def _shown(error, args):
    """An error's text with the password of every URL it may quote hidden: those of the
    command line (--mqtt, --source) wherever they appear, any other URL's by its form."""
    from edge.urls import redact
    known = [v for v in [getattr(args, "mqtt", None)] + list(getattr(args, "source", None) or [])
             if isinstance(v, str)]
    return redact(str(error), *(known + [v.partition("=")[2] for v in known]))   # NAME=URI
