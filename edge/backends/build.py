"""Building engines in a child process, under a memory budget, into the engine cache.

The builder (TensorRT's above all) needs far more memory than running the engine does, and
on a Jetson Nano 2GB it can push the system into the OOM killer. So the build runs in a
child process (`python -m edge.backends.buildjob`): its memory goes back to the system when
it ends, and if it crashes or is killed, the daemon only reports it. The budget is enforced
twice: the child limits its own address space (RLIMIT_AS) where the backend allows it (CUDA
reserves huge virtual ranges, so TensorRT builds cannot), and the parent watches the child's
memory and kills it when it goes over. The budget counts the child's own memory and nothing
else: its RSS + swap, plus, on a Jetson, its CUDA and pinned allocations (nvmap, outside its
RSS) where they can be read (debugfs as root, or the jtop service: edge.system); what other
programs allocate meanwhile is never charged to it. The board is protected separately: the
watch stops the build when the whole system has less than `engine.reserve_mb` of memory +
swap left, so the daemon and the rest keep memory to run in, and the child asks the kernel to
pick it first when memory runs out anyway (oom_score_adj 1000, edge.backends.buildjob).
Before starting, the system must have what the build is expected to need (the backend's
estimate, edge.memoryplan) on top of the reserve.

One engine is built at a time: a detector and a matcher each pass the budget check alone
and together would not fit a Nano 2GB. A lock serialises the builds of this process, and a
lock file in the engine folder those of other processes (`edge build` beside the service).

Progress (phase, fraction, elapsed) is kept in `STATES` for health and reported to
listeners (the systemd notifier extends its start timeout while a build runs).
"""

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

from edge.backends.buildjob import death_signal_preexec
from edge.backends.cache import make_key, recipe_key, unwritable
from edge.files import atomic_write
from edge.errors import BuildError, CacheUnwritable

logger = logging.getLogger(__name__)

# label -> BuildState of the builds of this process: one registry, as builds run one at a
# time in a process (_BUILD_LOCK). Observers read states(), a copy, never this dict.
STATES = {}
_STATES_LOCK = threading.Lock()
_listeners = []      # callables(state) told about every progress event
_BUILD_LOCK = threading.Lock()     # one build at a time in this process
LOCK_FILE = ".build.lock"          # ... and across processes, in the engine folder
DEFAULT_RESERVE = 128 * 2 ** 20    # memory + swap a build leaves to the rest of the system


def states():
    """{label: BuildState.as_dict()} of every build so far, copied at one moment."""
    with _STATES_LOCK:
        return {label: state.as_dict() for label, state in STATES.items()}


def add_listener(callback):
    """Call `callback(state)` on every build progress event (from the building thread)."""
    _listeners.append(callback)


class BuildState:
    """What a build is doing, for health and progress display."""

    def __init__(self, label, precision=None):
        self.label = label
        self.precision = precision     # the build options' (edge.precision)
        self.state = "building"        # building | ready | failed
        self.phase = "starting"
        self.progress = None           # 0..1 when the backend can tell
        self.started = time.time()
        self.elapsed = 0.0
        self.error = None
        self.peak_mb = 0.0             # the build process's own memory at its highest
        self.counted = "RSS + swap"    # what that figure holds (GPU where nvmap is readable)

    def as_dict(self):
        made = {"state": self.state, "phase": self.phase, "progress": self.progress,
                "elapsed_s": round(self.elapsed, 1), "error": self.error,
                "peak_mb": round(self.peak_mb, 1)}
        if self.precision:
            made["precision"] = self.precision
        return made

    def update(self, **changes):
        for key, value in changes.items():
            setattr(self, key, value)
        self.elapsed = time.time() - self.started
        for listener in list(_listeners):
            try:
                listener(self)
            except Exception:   # a listener must never break a build
                logger.exception("build progress listener failed")


def meminfo_kib(*names):
    """The sum of /proc/meminfo fields (kB, i.e. KiB) such as MemAvailable; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return sum(int(info[name].split()[0]) for name in names)
    except (OSError, KeyError, ValueError):
        return None


def memory_available():
    """Bytes of memory the system can still give: MemAvailable + SwapFree (None if unknown)."""
    kib = meminfo_kib("MemAvailable", "SwapFree")
    return None if kib is None else kib * 1024


SWAP_FILE = ("add swap (a 4 GB swap file on a Nano 2GB: sudo fallocate -l 4G /var/swapfile && "
             "sudo chmod 600 /var/swapfile && sudo mkswap /var/swapfile && sudo swapon "
             "/var/swapfile; docs/memory.md)")
FREE_MEMORY = ("stop other programs or the desktop (sudo systemctl set-default "
               "multi-user.target, then reboot)")


def advice(case, budget, options=None, reserve=DEFAULT_RESERVE):
    """What to do about a build that does not fit, true to the `case`: "budget" (the build
    itself went over engine.budget_mb) or "system" (the board has too little left for it)."""
    options = options or {}
    board_kib = meminfo_kib("MemTotal", "SwapTotal")
    board = None if board_kib is None else board_kib * 1024
    steps = []
    if case == "budget":
        if board is None or budget < board:
            steps.append("raise engine.budget_mb (now {:.0f}{}) if the memory is there".format(
                budget / 2 ** 20, "" if board is None else
                "; this board has {:.0f} MiB of memory + swap".format(board / 2 ** 20)))
        else:
            steps.append(SWAP_FILE)
    else:
        steps += [FREE_MEMORY, SWAP_FILE]
        if reserve:
            steps.append("lower engine.reserve_mb (now {:.0f}) if the rest of the board needs "
                         "less".format(reserve / 2 ** 20))
    if options.get("workspace_mb"):
        steps.append("lower engine.workspace_mb (now {})".format(options["workspace_mb"]))
    steps.append("use a smaller input size in the card")
    return ", ".join(steps[:-1]) + " or " + steps[-1]


def check_memory(label, need, budget, reserve=DEFAULT_RESERVE, options=None):
    """BuildError when the system cannot give a build what it is expected to need (`need`
    bytes: edge.memoryplan's estimate) and still keep engine.reserve_mb for the rest."""
    available = memory_available()
    if available is not None and available - reserve < need:
        raise BuildError("engine {}: the build is expected to need about {:.0f} MiB, but the "
                         "system has {:.0f} MiB of memory + swap available and keeps {:.0f} MiB "
                         "of it for the rest of the board (engine.reserve_mb); {}".format(
                             label, need / 2 ** 20, available / 2 ** 20, reserve / 2 ** 20,
                             advice("system", budget, options, reserve)))
    if need > budget:
        logger.warning("engine %s: the build is expected to need about %.0f MiB, over "
                       "engine.budget_mb (%.0f); it may be stopped", label, need / 2 ** 20,
                       budget / 2 ** 20)


def process_kib(pid, *names):
    """The sum of kB fields (VmRSS, VmSwap, VmHWM, ...) of /proc/PID/status; 0 when gone."""
    try:
        with open("/proc/{}/status".format(pid)) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[k].split()[0]) for k in names if k in fields)
    except (OSError, ValueError):
        return 0


def own_memory(pid, gpu_memory=None):
    """(bytes, whether GPU memory is in it) a process holds itself: resident + swapped, plus
    its GPU (nvmap) allocations where `gpu_memory(pid)` can read them (a Jetson's builder
    keeps its CUDA allocations there, outside its RSS). 0 when the process is gone."""
    used = process_kib(pid, "VmRSS", "VmSwap") * 1024
    gpu = gpu_memory(pid) if gpu_memory is not None else None
    return used + (gpu or 0), gpu is not None


def gpu_memory_reader(jtop_client=None):
    """A `gpu_memory(pid)` for the build watch: edge.system's nvmap reading (debugfs, or the
    jtop service's table through `jtop_client`)."""
    from edge import system
    return lambda pid: system.process_gpu_memory(pid, jtop_client)


@contextlib.contextmanager
def one_build_at_a_time(folder, state):
    """Hold the process's build lock and the engine folder's lock file for one build.

    While another build holds them, the state's phase says so and heartbeats go on (systemd
    keeps extending the start while we wait). A folder where the lock file cannot be made
    (read-only, full) leaves only the in-process lock: the build reports that folder itself.
    """
    import fcntl
    while not _BUILD_LOCK.acquire(timeout=1.0):
        state.update(phase="waiting for another build")
    handle = None
    try:
        try:
            os.makedirs(folder, exist_ok=True)
            handle = open(os.path.join(folder, LOCK_FILE), "a")
        except OSError as e:
            logger.debug("no build lock file in %s (%s): builds of other processes may overlap",
                         folder, e)
        while handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                state.update(phase="waiting for another build")
                time.sleep(0.5)
        yield
    finally:
        if handle is not None:
            handle.close()        # closing the file releases the flock
        _BUILD_LOCK.release()


# A build that failed is not tried again at once: a daemon whose only engine cannot be built
# exits, systemd restarts it 5 s later, and a minutes-long build that failed for memory would
# run again and again. The failure is kept beside the artefact it was for (`<artefact>.failed`,
# so a changed configuration, a new key, starts afresh) and the next attempt, in this process
# or the next, waits 30 s, then 1, 2, 4 ... minutes, at most 30; `edge build` tries at once.
FAILED_SUFFIX = ".failed"
BACKOFF_FIRST = 30.0     # s before the first retry
BACKOFF_MAX = 1800.0     # s at most between attempts


def backoff_s(attempts):
    """Seconds to wait after `attempts` failed builds of one artefact."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempts - 1))


def last_failure(path):
    """{"attempts", "last" (unix s), "error"} of the failed builds of this artefact, or None."""
    try:
        with open(path + FAILED_SUFFIX, "r", encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record.get("attempts"), int) and \
            isinstance(record.get("last"), (int, float)) else None
    except (OSError, ValueError, AttributeError):
        return None


def _note_failure(path, error):
    record = last_failure(path) or {"attempts": 0}
    record.update(attempts=record["attempts"] + 1, last=time.time(), error=str(error))
    try:
        atomic_write(path + FAILED_SUFFIX, json.dumps(record).encode())
    except OSError:          # a full or read-only folder: this process still waits
        pass
    return record


def _wait_after_failure(path, state):
    """Wait out the backoff of this artefact's failed builds, saying so in its state."""
    record = last_failure(path)
    if record is None:
        return
    until = record["last"] + backoff_s(record["attempts"])
    if until <= time.time():
        return
    logger.warning("engine %s: its last build failed (attempt %d: %s); the next waits %.0f s "
                   "(engine build backoff: docs/memory.md; `edge build` tries now)",
                   state.label, record["attempts"], record.get("error"), until - time.time())
    while time.time() < until:
        state.update(phase="waiting {:.0f} s to retry after {} failed attempt{}".format(
            until - time.time(), record["attempts"], "" if record["attempts"] == 1 else "s"),
            error=record.get("error"))
        time.sleep(min(1.0, max(0.0, until - time.time())))
    state.update(phase="starting", error=None)


def ensure(backend, model, card, label, cache, budget, timeout=None, progress=None,
           reserve=DEFAULT_RESERVE, recipe=None, batch=None, gpu_memory=None, backoff=True):
    """The cached artefact for a rewritten model, building it in a child when needed.

    `model`: the rewritten onnx.ModelProto, or a callable that makes it. With a `recipe`
    (what the model is made from, edge.tasks.recipe) an artefact recorded under it is found
    without calling `model` (see edge.backends.cache, Recipes). `batch`: the most frames of a
    run, for a graph with a batch dimension. `gpu_memory(pid)`: the build process's GPU memory
    (bytes, None where unreadable), counted in its budget. `backoff`: wait after failed
    builds of this artefact (see BACKOFF_FIRST); False tries at once (`edge build`).
    """
    fingerprint = backend.fingerprint()
    options = backend.build_options(card, batch) if batch else backend.build_options(card)
    noted = {}
    if recipe is not None:
        noted = {"recipe_key": recipe_key(recipe, fingerprint, options),
                 "card_key": recipe["card_key"]}
        found = cache.find("recipe_key", noted["recipe_key"])
        # the side file must also say it was built by this backend, as this one builds
        if found is not None and found[2].get("backend") == _as_json(fingerprint) and \
                found[2].get("options") == _as_json(options) and \
                cache.lookup(found[0], found[1]):
            return found[0]
    if callable(model):
        model = model()
    model_bytes = model.SerializeToString()
    key, material = make_key(model_bytes, fingerprint, options)
    material.update(noted)
    path, _ = cache.paths(label, fingerprint, options, key, backend.suffix)
    if cache.lookup(path, key):
        if noted:
            cache.note(path, **noted)       # built before recipes were recorded, or elsewhere
        return path
    state = BuildState(label, options.get("precision"))
    with _STATES_LOCK:
        STATES[label] = state
    if backoff:
        _wait_after_failure(path, state)     # outside the lock: other builds go on
    try:
        with one_build_at_a_time(cache.folder, state):
            if cache.lookup(path, key):        # built by whoever held the lock before us
                if noted:
                    cache.note(path, **noted)
                state.update(state="ready", phase="done", progress=1.0)
                return path
            state.update(phase="starting")
            built = _build(backend, model_bytes, path, key, material, options, cache, budget,
                           state, timeout, progress, reserve, gpu_memory)
    except CacheUnwritable as e:       # the folder, not the build: nothing to wait for
        state.update(state="failed", error=str(e))
        raise
    except BuildError as e:
        record = _note_failure(path, e)
        state.update(state="failed", error=str(e))
        logger.info("engine %s: build attempt %d failed; the next waits %.0f s", label,
                    record["attempts"], backoff_s(record["attempts"]))
        raise
    if os.path.exists(path + FAILED_SUFFIX):
        os.unlink(path + FAILED_SUFFIX)
    return built


def _as_json(value):
    """`value` as it reads back from a side file (tuples become lists)."""
    return json.loads(json.dumps(value))


def _build(backend, model_bytes, path, key, material, options, cache, budget, state, timeout,
           progress, reserve, gpu_memory):
    try:
        run_child(backend, model_bytes, path, options, budget, state, timeout, progress,
                  reserve, gpu_memory)
        state.update(phase="storing")
        cache.store(path, path + ".build", key, material)
        state.update(state="ready", phase="done", progress=1.0)
        logger.info("engine %s built in %.1f s (peak %.0f MiB, %s)", state.label, state.elapsed,
                    state.peak_mb, state.counted)
        return path
    finally:
        for leftover in (path + ".build", path + ".onnx"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def run_child(backend, model_bytes, path, options, budget, state, timeout=None, progress=None,
              reserve=DEFAULT_RESERVE, gpu_memory=None):
    """Run one build in `python -m edge.backends.buildjob`; BuildError on any failure.

    The budget counts the child's own memory (`own_memory`) and nothing else: what other
    programs allocate meanwhile is theirs. The board is protected by engine.reserve_mb
    instead: when the system as a whole runs that low, the build is stopped.
    """
    label = state.label
    check_memory(label, backend.build_estimate(len(model_bytes), options), budget, reserve,
                 options)
    onnx_path = path + ".onnx"
    log_path = path + ".log"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(onnx_path, "wb") as f:
            f.write(model_bytes)
        log = open(log_path, "wb")
    except OSError as e:     # a full or read-only engine folder: one line that names it
        raise unwritable(label, os.path.dirname(path), e)
    events_r, events_w = os.pipe()
    spec = {"backend": backend.name, "module": type(backend).__module__, "onnx": onnx_path,
            "out": path + ".build", "options": options, "events_fd": events_w,
            "rlimit_as": budget if backend.limit_address_space else None,
            "parent": os.getpid()}
    with log:
        child = subprocess.Popen([sys.executable, "-m", "edge.backends.buildjob"],
                                 stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                 pass_fds=(events_w,), close_fds=True,
                                 preexec_fn=death_signal_preexec())
    os.close(events_w)
    child.stdin.write(json.dumps(spec).encode())
    child.stdin.close()
    killed = []       # (case, what happened) of a build the watch stopped
    events = []
    gpu_seen = []

    def watch():
        # Kill the child when it goes over the budget or the timeout, or when the system has
        # less than the reserve left: the daemon and the rest of the board stay alive.
        beat = 0
        while child.poll() is None:
            used, with_gpu = own_memory(child.pid, gpu_memory)
            if with_gpu and not gpu_seen:
                gpu_seen.append(True)
            state.peak_mb = max(state.peak_mb, used / 2 ** 20)
            available = memory_available()
            if used > budget:
                killed.append(("budget", "used {:.0f} MiB, over its budget of {:.0f} MiB".format(
                    used / 2 ** 20, budget / 2 ** 20)))
                child.send_signal(signal.SIGKILL)
            elif available is not None and available < reserve:
                killed.append(("system", "was stopped to protect the rest of the board: the "
                               "system had {:.0f} MiB of memory + swap left, under the {:.0f} "
                               "MiB kept for it (engine.reserve_mb), while the build itself "
                               "used {:.0f} MiB".format(available / 2 ** 20, reserve / 2 ** 20,
                                                        used / 2 ** 20)))
                child.send_signal(signal.SIGKILL)
            elif timeout and time.time() - state.started > timeout:
                killed.append(("time", "ran longer than {:.0f} s".format(timeout)))
                child.send_signal(signal.SIGKILL)
            beat += 1
            if beat % 10 == 0:
                state.update()      # a heartbeat each second: elapsed time, systemd watchdog
            time.sleep(0.1)
    watcher = threading.Thread(target=watch, name="build-watch", daemon=True)
    watcher.start()
    with os.fdopen(events_r, "r") as stream:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events.append(event)
            if event.get("event") == "progress":
                state.update(phase=event.get("phase"), progress=event.get("fraction"))
                if progress is not None:
                    progress(state)
    rc = child.wait()
    watcher.join()
    state.counted = "RSS + swap + GPU" if gpu_seen else "RSS + swap"
    errors = [e for e in events if e.get("event") == "error"]
    if rc == 0 and not errors and os.path.exists(path + ".build"):
        os.unlink(log_path)
        return
    tail = _tail(log_path)
    # Under RLIMIT_AS a library may die before Python can report it (OpenBLAS at import).
    out_of_memory = bool(spec["rlimit_as"] and re.search(r"memory|bad_alloc", tail, re.I))
    case = "budget"
    if killed:
        case, what = killed[0]
        reason = "the build process {}".format(what)
    elif errors and errors[-1].get("kind") == "memory":
        reason = "the build ran out of memory ({})".format(errors[-1].get("message"))
    elif errors:
        reason = errors[-1].get("message")
    elif out_of_memory:
        reason = "the build ran out of memory under its limit of {:.0f} MiB ({})".format(
            budget / 2 ** 20, tail[:120])
    elif rc < 0:
        # The OOM killer: the whole board ran out, not the build's own budget.
        case = "system"
        reason = "the build process was killed by signal {} (the OOM killer?)".format(-rc)
    else:
        reason = "the build process failed with exit status {}{}".format(
            rc, ": " + tail if tail else "")
    memoryish = ((killed and case != "time") or rc < 0 or out_of_memory or
                 (errors and errors[-1].get("kind") == "memory"))
    if memoryish:
        os.unlink(log_path)     # the reason is the memory, not what the library printed
        raise BuildError("engine {}: {}; {}".format(label, reason,
                                                    advice(case, budget, options, reserve)))
    if killed:
        os.unlink(log_path)
        raise BuildError("engine {}: {}; raise engine.build_timeout".format(label, reason))
    raise BuildError("engine {}: {}; the build's output is in {}".format(label, reason,
                                                                          log_path))


class EngineMaker:
    """Engines for tasks: cached artefact, else a build in the child, then the backend loads it."""

    def __init__(self, backend, cache, budget, timeout=None, reserve=DEFAULT_RESERVE,
                 precision="auto"):
        self.backend = backend
        self.cache = cache
        self.precision = precision      # engine.precision asked for (edge.precision)
        self.budget = budget
        self.timeout = timeout
        self.reserve = reserve
        # The build process's GPU (nvmap) memory on a Jetson, where it can be read: the daemon
        # gives it its jtop client (gpu_memory_reader).
        self.gpu_memory = gpu_memory_reader()
        # A backend that can load the rewritten graph itself (ONNX Runtime) runs uncached
        # when the cache cannot be written; `edge build`, whose job is the cache, says no.
        self.allow_uncached = True
        # Wait after failed builds of an artefact (BACKOFF_FIRST); `edge build` tries at once.
        self.backoff = True

    @property
    def frame_dtype(self):
        return self.backend.frame_dtype

    def allocate(self, shape, dtype):
        return self.backend.allocate(shape, dtype)

    def make(self, model, card, label, background=False, recipe=None, batch=None):
        """A loaded Engine for a rewritten model (or a callable making it, with the `recipe`
        it is made from: see `ensure`); rebuilds once when the artefact won't load.
        `batch`: the most frames one run takes (a graph with a batch dimension), else None.
        """
        from edge.errors import ModelError
        batched = {"batch": batch} if batch else {}
        try:
            path = self._ensure(model, card, label, recipe, batch)
        except CacheUnwritable as e:
            if callable(model):
                model = model()
            engine = self.backend.load_uncached(model, label, background, **batched) \
                if self.allow_uncached else None
            if engine is None:
                raise
            logger.warning("%s; until then %s runs uncached (built again at every start)", e,
                           label)
            if label in STATES:
                STATES[label].update(state="ready", phase="uncached", progress=1.0, error=None)
            return engine
        try:
            engine = self.backend.load(path, label, background, **batched)
        except ModelError as e:
            logger.warning("%s; rebuilding it", e)
            self.cache.remove(path)
            path = self._ensure(model, card, label, recipe, batch)
            engine = self.backend.load(path, label, background, **batched)
        self.cache.hold(path, engine)      # never evicted while it runs
        return engine

    def ensure(self, model, card, label, recipe=None, batch=None):
        """Build the artefact `make` would load into the cache, loading nothing: its path,
        or None where the cache cannot be written and `make` will run the model uncached."""
        try:
            return self._ensure(model, card, label, recipe, batch)
        except CacheUnwritable:
            if self.allow_uncached:
                return None      # `make` loads the graph itself where the backend can
            raise

    def knows(self, card_key):
        """Whether an artefact made from this card and model is cached (so the model was
        read and checked against its card before)."""
        return self.cache.find("card_key", card_key) is not None

    def _ensure(self, model, card, label, recipe=None, batch=None):
        return ensure(self.backend, model, card, label, self.cache, self.budget, self.timeout,
                      reserve=self.reserve, recipe=recipe, batch=batch,
                      gpu_memory=self.gpu_memory, backoff=self.backoff)


def _tail(path, limit=300):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
            return lines[-1] if lines else ""
    except OSError:
        return ""
