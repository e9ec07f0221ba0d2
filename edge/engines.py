"""The engines a configuration needs, ahead of a run: `edge build` builds and checks them
(`build_all`), `edge build --export-onnx` writes their rewritten graphs as a TensorRT version
receives them (`export_onnx`), with the build's progress on the terminal (`ProgressPrinter`).
"""

import os
import sys


def build_all(cfg, names, sizes, out=print):
    """Build every engine of the cards `names` for frames of `sizes` ({(width, height):
    cameras}) and each reference the kind needs, one at a time, then load and run each
    once, as the daemon does; progress on stderr, a line per engine through `out`."""
    from edge import cards, daemon, tasks
    from edge.backends import build as building
    from edge.frames import Frame
    maker = daemon.engine_maker(cfg)
    maker.allow_uncached = False        # filling the cache is this command's job
    maker.backoff = False               # and trying now, after failed builds too
    building.add_listener(ProgressPrinter())
    out("backend: {}".format(", ".join("{}={}".format(k, v) for k, v in
                                         sorted(maker.backend.describe().items()) if v)))
    store = daemon.reference_store(cfg)
    made = []
    for name in names:
        card = cards.load(name)
        kind = tasks.kind(card.task)
        task = tasks.create(card, maker, cfg["model_dir"], mirror=cfg["model_mirror"],
                            **kind.options(cfg, maker, store))
        task.plan(sizes)          # the engines the daemon makes for its cameras
        refs = kind.build_references(store)
        if not refs:
            out("{}: no reference stored: matcher engines are built per reference size; "
                  "give --reference IMAGE".format(card.name))
        made.append((card, task, refs))
    # Every engine built first, one at a time, then each loaded and run once: as the daemon
    # does, no build runs beside a loaded engine.
    for card, task, refs in made:
        for width, height in sorted(sizes):
            for ref in refs:
                task.ensure_engine(width, height, None if ref is None else
                                   (ref.shape[1], ref.shape[0]))
    for card, task, refs in made:
        for width, height in sorted(sizes):
            frame = Frame(0, (height, width, 3), maker.allocate)
            for ref in refs:
                # one run proves the engine loads and executes
                engine = task.engine_for(width, height) if ref is None else None
                if engine is not None and engine.batch:
                    engine.infer_batch(engine.bind_batch(), [frame] * engine.batch)
                else:
                    engine, binding = task.binding_for(
                        frame, None if ref is None else ("build", id(ref)), ref)
                    engine.infer(binding)
                out("{}: engine for {}x{} frames{} ready".format(
                    card.name, width, height, " (batches of up to {})".format(engine.batch)
                    if engine.batch else ""))


def export_onnx(cfg, names, sizes, folder, version, out=print):
    """`edge build --export-onnx DIR`: each card's rewritten graph as TensorRT `version`
    receives it (frame dtype, opset forms, a batch dimension where several cameras of a size
    share the engine), checked against what its ONNX parser imports. Nothing is built: the
    files are for polygraphy/trtexec, and for CI. Returns the problems found (a line each)."""
    import onnx
    from edge import cards, daemon, families, graph, models, precision, tasks
    from edge.backends import trt, trtcheck
    from edge.errors import ConfigError
    version = version or installed_tensorrt() or "8.2"
    reason = trt.check_version(version)
    if reason:
        raise ConfigError("--tensorrt {}: {}".format(version, reason))
    int8 = cfg["engine"]["precision"] == "int8"
    if int8 and precision.tensorrt_int8_problem(version):
        raise ConfigError("--precision int8 --tensorrt {}: {}; export for 8.5 or newer".format(
            version, precision.tensorrt_int8_problem(version)))
    dtype = trt.frame_dtype_for(version)
    release = trt.parse_version(version)[:2]
    os.makedirs(folder, exist_ok=True)
    problems = []
    store = daemon.reference_store(cfg)
    for name in names:
        card = cards.load(name)
        kind = tasks.kind(card.task)
        source = models.ensure(card, cfg["model_dir"], cfg["model_mirror"])
        quantized = int8 and not families.get(card.family).int8_problem
        if int8 and not quantized:
            out("{}: {}; exported as it is".format(card.name,
                                                   families.get(card.family).int8_problem))
        if quantized:       # its calibrated QDQ graph (edge.precision), made where missing
            source = precision.ensure_calibrated(card, cfg["engine"]["dir"], lambda: source)
        model = models.load_onnx(source, card)
        for (width, height), count in sorted(sizes.items()):
            sizes_ref = kind.reference_sizes(store, width, height)
            # batched as the daemon on TensorRT would (pipeline.batch: auto or always)
            batch = count if count > 1 and cfg["pipeline"]["batch"] != "never" and \
                kind.can_batch and not graph.batch_problem(model, card) else None
            for size in sizes_ref:
                label = tasks.engine_label(card.name, width, height, size, batch)
                path = os.path.join(folder, "{}{}-{}.onnx".format(
                    label, "-int8" if quantized else "", dtype))
                rewritten = graph.rewrite(model, card, width, height, size, dtype,
                                          batched=batch is not None)
                onnx.save(rewritten, path)
                found = trtcheck.problems(rewritten, release)
                out("{}: {} for TensorRT {}".format(path, "ok" if not found else "PROBLEMS",
                                                    version))
                for problem in found:
                    out("  " + problem)
                problems.extend(found)
    return problems


def installed_tensorrt():
    """The TensorRT version installed here, or None."""
    try:
        import tensorrt
        return tensorrt.__version__
    except Exception:  # noqa: BLE001 (absent or broken: export for the Nano's 8.2)
        return None


class ProgressPrinter:
    """Build progress: a redrawn bar on a terminal, a log line per phase (or 10 s) otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = (None, None, 0.0)

    def __call__(self, state):
        import time
        now = time.monotonic()
        phase_changed = (state.label, state.phase) != self.last[:2]
        if not self.tty and not phase_changed and now - self.last[2] < 10:
            return
        self.last = (state.label, state.phase, now)
        fraction = state.progress
        bar = ""
        if fraction is not None:
            filled = int(round(20 * fraction))
            bar = "[{}{}] {:3.0f}% ".format("#" * filled, "." * (20 - filled), 100 * fraction)
        line = "building {}: {}{} {:.1f} s".format(state.label, bar, state.phase, state.elapsed)
        if state.state != "building":
            line = "building {}: {} after {:.1f} s, peak {:.0f} MiB ({})".format(
                state.label, state.state, state.elapsed, state.peak_mb, state.counted)
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if state.state != "building" else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
