"""Engine cache and build child, on the CPU: keys, staleness, atomic writes, memory budget."""

import glob
import json
import os
import signal
import threading
import time

import onnx
import pytest

from edge import cards, graph
from edge.backends import build as building
from edge.backends.build import BuildError, EngineMaker
from edge.backends.cache import EngineCache, make_key
from edge.backends.ort import OrtBackend
from edge.frames import Frame
from tests import build_backends
from tests.conftest import MODELS

GiB = 2 ** 30


@pytest.fixture(scope="module")
def rewritten():
    card = cards.load("yolox-nano")
    model = graph.rewrite(onnx.load(os.path.join(MODELS, "yolox_nano.onnx")), card, 320, 240)
    return card, model


def maker(tmp_path, backend=None, budget=2 * GiB):
    return EngineMaker(backend or OrtBackend(), EngineCache(str(tmp_path / "engines")), budget)


def artefacts(tmp_path):
    """The engine folder's artefacts and side files (not the records of failed builds)."""
    return sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "engines" / "*"))
                  if not p.endswith(building.FAILED_SUFFIX))


def test_key_changes_with_everything_that_invalidates_an_engine(rewritten):
    card, model = rewritten
    data = model.SerializeToString()
    fp = {"backend": "trt", "tensorrt": "8.2.1.8", "device": "NVIDIA Tegra X1",
          "compute_capability": "5.3", "l4t": "R32.7.1"}
    opts = {"precision": "fp16", "workspace_mb": 256}
    key = make_key(data, fp, opts)[0]
    assert key == make_key(data, dict(fp), dict(opts))[0]
    other_shape = graph.rewrite(onnx.load(os.path.join(MODELS, "yolox_nano.onnx")), card, 640,
                                480).SerializeToString()
    changes = [make_key(other_shape, fp, opts), make_key(data + b" ", fp, opts),
               make_key(data, dict(fp, tensorrt="8.2.1.9"), opts),
               make_key(data, dict(fp, device="Orin"), opts),
               make_key(data, dict(fp, compute_capability="8.7"), opts),
               make_key(data, dict(fp, l4t="R32.6.1"), opts),
               make_key(data, fp, dict(opts, precision="fp32")),
               make_key(data, fp, dict(opts, workspace_mb=128))]
    assert len({k for k, _ in changes} | {key}) == len(changes) + 1


def test_build_caches_a_readable_artefact_and_reuses_it(tmp_path, rewritten):
    card, model = rewritten
    m = maker(tmp_path)
    engine = m.make(model, card, "yolox-nano-320x240")
    files = artefacts(tmp_path)
    assert len(files) == 2 and files[0].startswith("yolox-nano-320x240-ort-fp32-")
    assert files[1] == files[0] + ".json"
    meta = json.load(open(str(tmp_path / "engines" / files[1])))
    assert meta["material"]["backend"]["backend"] == "ort" and meta["size"] > 100000
    frame = Frame(0, (240, 320, 3))
    binding = engine.bind(frame)
    engine.infer(binding)
    assert binding.outputs["detections"].shape == (200, 6)
    mtime = os.path.getmtime(str(tmp_path / "engines" / files[0]))
    building.STATES.clear()
    m.make(model, card, "yolox-nano-320x240")
    assert building.STATES == {}, "a cached engine must load without a build"
    assert os.path.getmtime(str(tmp_path / "engines" / files[0])) == mtime


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "no-side-file", "stale-key",
                                    "garbage-side-file"])
def test_damaged_or_stale_engine_is_rebuilt_not_loaded(tmp_path, rewritten, damage, caplog):
    card, model = rewritten
    m = maker(tmp_path)
    m.make(model, card, "yolox-nano-320x240")
    path = str(tmp_path / "engines" / artefacts(tmp_path)[0])
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "corrupt":
        with open(path, "r+b") as f:
            f.seek(5000)
            f.write(b"\0garbage\0")
    elif damage == "no-side-file":
        os.unlink(path + ".json")
    elif damage == "stale-key":
        meta = json.load(open(path + ".json"))
        meta["key"] = "0" * 64
        json.dump(meta, open(path + ".json", "w"))
    else:
        open(path + ".json", "w").write("{not json")
    building.STATES.clear()
    engine = m.make(model, card, "yolox-nano-320x240")
    assert building.STATES["yolox-nano-320x240"].state == "ready", "it was rebuilt"
    assert "rebuilding" in caplog.text
    engine.infer(engine.bind(Frame(0, (240, 320, 3))))
    assert len(artefacts(tmp_path)) == 2


def test_engine_that_will_not_load_is_rebuilt_once(tmp_path, rewritten):
    """A file with a valid side file that the backend cannot load (another version's plan)."""
    card, model = rewritten
    m = maker(tmp_path)
    m.make(model, card, "yolox-nano-320x240")
    path = str(tmp_path / "engines" / artefacts(tmp_path)[0])
    with open(path + ".build", "wb") as f:
        f.write(b"not an onnx model at all")
    key = json.load(open(path + ".json"))["key"]
    m.cache.store(path, path + ".build", key, {})
    engine = m.make(model, card, "yolox-nano-320x240")
    engine.infer(engine.bind(Frame(0, (240, 320, 3))))


def test_killed_build_leaves_no_artefact_and_next_build_works(tmp_path, rewritten):
    card, model = rewritten
    slow = maker(tmp_path, build_backends.SlowBackend())
    errors = []

    def run():
        try:
            slow.make(model, card, "slow-320x240")
        except BuildError as e:
            errors.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 20
    while time.time() < deadline:
        state = building.STATES.get("slow-320x240")
        if state is not None and state.phase == "build" and (state.progress or 0) > 0.1:
            break
        time.sleep(0.05)
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    children = [p for p in pids if _cmdline(p).endswith("edge.backends.buildjob")]
    assert children, "the build runs in a child process"
    os.kill(children[0], signal.SIGKILL)
    thread.join(30)
    assert errors and "killed by signal 9" in str(errors[0])
    assert artefacts(tmp_path) == [], "nothing torn or half-written is left"
    engine = maker(tmp_path).make(model, card, "slow-320x240")   # the real backend, same label
    engine.infer(engine.bind(Frame(0, (240, 320, 3))))


def _cmdline(pid):
    try:
        return open("/proc/{}/cmdline".format(pid), "rb").read().replace(b"\0", b" ").decode(
            ).strip()
    except OSError:
        return ""


def test_a_build_the_system_cannot_give_what_it_needs_is_refused_with_advice(tmp_path,
                                                                              rewritten):
    """The pre-check asks for the build's estimate on top of engine.reserve_mb, not for the
    whole budget: a budget above the board's memory is no reason to refuse (the build takes
    what it needs), a reserve the board cannot keep is; the advice is the system's case."""
    card, model = rewritten
    path = maker(tmp_path, budget=1 << 50).make(model, card, "yolox-nano-320x240")
    assert path is not None and len(artefacts(tmp_path)) == 2
    huge_reserve = EngineMaker(OrtBackend(), EngineCache(str(tmp_path / "other")), 2 * GiB,
                               reserve=1 << 50)
    with pytest.raises(BuildError) as info:
        huge_reserve.make(model, card, "yolox-nano-320x240")
    message = str(info.value)
    assert "expected to need about" in message and "memory + swap available" in message
    assert "engine.reserve_mb" in message and "swap file" in message
    assert "smaller input" in message and "raise engine.budget_mb" not in message
    assert info.value.exit_code == 70
    assert not os.path.exists(str(tmp_path / "other")) or \
        glob.glob(str(tmp_path / "other" / "*.onnx")) == []


def test_advice_is_true_to_the_case():
    board = building.meminfo_kib("MemTotal", "SwapTotal") * 1024
    over_small = building.advice("budget", 400 * 2 ** 20, {"workspace_mb": 256})
    assert "raise engine.budget_mb (now 400; this board has" in over_small
    assert "lower engine.workspace_mb (now 256)" in over_small
    over_all = building.advice("budget", 2 * board, {"precision": "fp32"})
    assert "raise engine.budget_mb" not in over_all and "swap file" in over_all
    assert "workspace_mb" not in over_all
    low = building.advice("system", 2 * board, {}, reserve=128 * 2 ** 20)
    assert "raise engine.budget_mb" not in low and "lower engine.reserve_mb (now 128)" in low
    assert "multi-user.target" in low and "swap file" in low


def test_build_over_budget_is_killed_and_reported_daemon_survives(tmp_path, rewritten):
    card, model = rewritten
    hungry = maker(tmp_path, build_backends.HungryBackend(), budget=400 * 2 ** 20)
    with pytest.raises(BuildError) as info:
        hungry.make(model, card, "hungry-320x240")
    message = str(info.value)
    # the build itself needed more: the budget is what to raise, where the board has more
    assert "over its budget of 400 MiB" in message and "raise engine.budget_mb (now 400" in message
    assert building.STATES["hungry-320x240"].state == "failed"
    assert building.STATES["hungry-320x240"].peak_mb > 300
    assert artefacts(tmp_path) == []


def test_address_space_limit_stops_a_build_that_needs_more(tmp_path, rewritten):
    """RLIMIT_AS in the child: ONNX Runtime cannot even load in 64 MiB of address space."""
    card, model = rewritten
    with pytest.raises(BuildError) as info:
        maker(tmp_path, budget=64 * 2 ** 20).make(model, card, "tiny-320x240")
    print(info.value)
    assert "out of memory" in str(info.value)
    assert "raise engine.budget_mb (now 64" in str(info.value)    # its limit, not the board's
    assert artefacts(tmp_path) == []


def test_edge_build_shows_progress_then_reuses_the_cache(tmp_path, model_dir):
    from tests.conftest import run_edge
    args = ["build", "yolox-nano", "--size", "320x240", "--state-dir", str(tmp_path),
            "--model-dir", model_dir]
    rc, out, err = run_edge(*args)
    assert rc == 0, err
    assert "yolox-nano: engine for 320x240 frames ready" in out
    assert "building yolox-nano-320x240: optimize" in err and "ready after" in err
    assert len(artefacts(tmp_path)) == 2
    rc, out, err = run_edge(*args)
    assert rc == 0 and "building" not in err, "the second run loads the cached engine"


def test_edge_run_with_a_reserve_the_board_cannot_keep_exits_70(tmp_path, model_dir):
    from tests.conftest import run_edge
    config = tmp_path / "edge.yaml"
    config.write_text("engine: {reserve_mb: 1048576}\n")    # 1 TiB
    rc, out, err = run_edge("run", "-c", str(config), "--detector", "yolox-nano", "--source",
                            "test://?frames=2", "--state-dir", str(tmp_path), "--model-dir",
                            model_dir, "--jsonl", str(tmp_path / "o.jsonl"))
    assert rc == 70, err
    errors = [l for l in err.splitlines() if l.startswith("edge: error:")]
    assert len(errors) == 1 and "swap" in errors[0] and "Traceback" not in err


DAEMON_BUILDING = """
import os, sys
import onnx
from edge import cards, graph
from edge.backends.build import EngineMaker
from edge.backends.cache import EngineCache
from tests import build_backends
card = cards.load("yolox-nano")
model = graph.rewrite(onnx.load(sys.argv[1]), card, 320, 240)
EngineMaker(build_backends.QuietBackend(), EngineCache(sys.argv[2]), 2 ** 31).make(
    model, card, "orphan-320x240")
"""


def test_build_child_dies_with_the_daemon(tmp_path):
    """SIGKILL of the daemon (the OOM killer, kill -9) takes its build child with it, so no
    orphaned build keeps the memory the restarted daemon needs."""
    _kill_daemon_mid_build(tmp_path, freeze_child=False)


def test_build_child_dies_with_the_daemon_from_its_first_moment(tmp_path):
    """The parent-death signal is set before the child's interpreter starts: a daemon killed
    while its build child is still starting (here: stopped, so that it cannot set anything
    itself) takes the child with it. Set by the child's own Python it came 1.5-2 s late on
    a loaded board, and a stopped child outlived its daemon for good."""
    _kill_daemon_mid_build(tmp_path, freeze_child=True)


def _kill_daemon_mid_build(tmp_path, freeze_child):
    """Start a daemon building, SIGKILL it as soon as its build child exists (that child
    first frozen by SIGSTOP, wherever its start-up was, with `freeze_child`), and assert the
    child is gone within 5 s."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON_BUILDING,
                               os.path.join(MODELS, "yolox_nano.onnx"),
                               str(tmp_path / "engines")], cwd=root)
    children = []
    try:
        deadline = time.time() + 30
        while not children and time.time() < deadline and daemon.poll() is None:
            children = [p for p in (int(p) for p in os.listdir("/proc") if p.isdigit())
                        if _cmdline(p).endswith("edge.backends.buildjob") and
                        _parent(p) == daemon.pid]
            time.sleep(0.005)
        assert children, "the build child started"
        if freeze_child:
            os.kill(children[0], signal.SIGSTOP)
        daemon.kill()
        daemon.wait(10)
        deadline = time.time() + 5
        while time.time() < deadline and _alive(children[0]):
            time.sleep(0.05)
        assert not _alive(children[0]), "the build child outlived its daemon"
    finally:
        if daemon.poll() is None:
            daemon.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _parent(pid):
    try:
        return int(open("/proc/{}/stat".format(pid)).read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid):
    """Running and not a zombie waiting for its (new) parent to reap it."""
    try:
        state = open("/proc/{}/stat".format(pid)).read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_the_build_child_is_the_oom_killers_first_choice(tmp_path, rewritten):
    """oom_score_adj 1000: when memory runs out anyway, the kernel kills the build, not the
    daemon or the desktop."""
    card, model = rewritten
    path = building.ensure(build_backends.ReportingBackend(), model, card, "oom-320x240",
                           EngineCache(str(tmp_path / "engines")), 2 * GiB)
    with open(path) as f:
        assert f.read().split()[0] == "1000"


CONCURRENT_BUILD = """
import sys
import onnx
from edge import cards, graph
from edge.backends import build
from edge.backends.cache import EngineCache
from tests import build_backends
card = cards.load("yolox-nano")
model = graph.rewrite(onnx.load(sys.argv[1]), card, 320, 240)
build.ensure(build_backends.ReportingBackend(), model, card, "other-process-320x240",
             EngineCache(sys.argv[2]), 2 ** 31)
"""


def test_engines_are_built_one_at_a_time(tmp_path, rewritten, monkeypatch):
    """A detector's and a matcher's builds each fit the budget alone, not together: two task
    threads and another process (`edge build` beside the service) build one after another."""
    import subprocess
    import sys
    card, model = rewritten
    folder = str(tmp_path / "engines")
    monkeypatch.setenv("EDGE_TEST_BUILD_SECONDS", "1.5")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD,
                              os.path.join(MODELS, "yolox_nano.onnx"), folder], cwd=root)
    paths, errors = [], []

    def build(label):
        try:
            paths.append(building.ensure(build_backends.ReportingBackend(), model, card, label,
                                         EngineCache(folder), 2 * GiB))
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=build, args=("thread{}-320x240".format(i),))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert other.wait(60) == 0 and errors == []
    paths += [p for p in glob.glob(os.path.join(folder, "other-process-*"))
              if not p.endswith(".json")]
    intervals = []
    for path in paths:
        with open(path) as f:
            intervals.append(tuple(float(v) for v in f.read().split()[1:]))
    intervals.sort()
    assert len(intervals) == 3
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert start >= end, "two builds ran at once: {}".format(intervals)


def test_gpu_memory_the_build_holds_outside_its_rss_counts(tmp_path, rewritten, monkeypatch):
    """On a Jetson the builder's CUDA and nvmap memory is not in its RSS; the watch reads the
    child's row of nvmap's table (edge.system.process_gpu_memory, here on a recorded root
    whose table the child keeps as the driver would, beside tmpfs pages it really holds)."""
    from edge import system
    card, model = rewritten
    shm = "/dev/shm/edge-test-{}".format(os.getpid())
    root = str(tmp_path / "root")
    monkeypatch.setenv("EDGE_TEST_SHM_FILE", shm)
    monkeypatch.setenv("EDGE_TEST_NVMAP_ROOT", root)
    hidden = maker(tmp_path, build_backends.HiddenHungryBackend(), budget=300 * 2 ** 20)
    hidden.gpu_memory = lambda pid: system.process_gpu_memory(pid, root=root)
    try:
        with pytest.raises(BuildError) as info:
            hidden.make(model, card, "hidden-320x240")
    finally:
        if os.path.exists(shm):
            os.unlink(shm)
    assert "over its budget of 300 MiB" in str(info.value)
    assert building.STATES["hidden-320x240"].peak_mb > 250
    assert building.STATES["hidden-320x240"].counted == "RSS + swap + GPU"
    assert artefacts(tmp_path) == []


def test_a_build_that_leaves_the_system_too_little_memory_is_stopped(tmp_path, rewritten,
                                                                      monkeypatch):
    card, model = rewritten
    shm = "/dev/shm/edge-test-{}".format(os.getpid())
    monkeypatch.setenv("EDGE_TEST_SHM_FILE", shm)
    reserve = building.memory_available() - 200 * 2 ** 20     # 200 MiB from now on
    hungry = EngineMaker(build_backends.HiddenHungryBackend(),
                         EngineCache(str(tmp_path / "engines")), 2 * GiB, reserve=reserve)
    try:
        with pytest.raises(BuildError) as info:
            hungry.make(model, card, "reserve-320x240")
    finally:
        if os.path.exists(shm):
            os.unlink(shm)
    message = str(info.value)
    assert "stopped to protect the rest of the board" in message
    assert "under the {:.0f} MiB kept for it (engine.reserve_mb)".format(
        reserve / 2 ** 20) in message and "add swap" in message
    assert "raise engine.budget_mb" not in message


def test_every_engine_is_built_before_frames_flow(tmp_path, model_dir):
    """The detector's and the matcher's engines are built one after the other at the start,
    not lazily by two task threads at once on their first frames; the frame read to learn
    the source's size is still delivered (a finite source loses nothing)."""
    from tests.conftest import SHARED, run_edge
    jsonl = tmp_path / "out.jsonl"
    reference = os.path.join(SHARED, "data", "middlebury-motorcycle", "motorcycle_left.png")
    rc, out, err = run_edge("run", "--detector", "yolox-nano", "--matcher", "coarse-loftr",
                            "--reference", reference, "--source",
                            "test://?width=320&height=240&frames=4", "--state-dir",
                            str(tmp_path), "--model-dir", model_dir, "--jsonl", str(jsonl))
    assert rc == 0, err
    lines = err.splitlines()

    def first(text):
        return next(i for i, line in enumerate(lines) if text in line)
    running = first("running yolox-nano, coarse-loftr on")
    assert first("engine yolox-nano-320x240 built in") < running
    assert first("engine coarse-loftr-320x240-ref741x500 built in") < running
    # every build before any load: no build runs beside a loaded engine
    assert first("engine coarse-loftr-320x240-ref741x500 built in") < \
        first("engine yolox-nano for 320x240 frames ready")
    with open(str(jsonl)) as f:
        messages = [json.loads(line) for line in f]
    detections = [m["frame"]["index"] for m in messages if "detections" in m]
    assert detections == [0, 1, 2, 3]
    assert [m["frame"]["index"] for m in messages if "matches" in m][:1] == [0]


def test_cache_past_its_budget_drops_the_least_recently_used_never_one_in_use(tmp_path):
    """One engine per frame size adds up: with room for about two, building four keeps the
    newest and the one still running (the oldest here), and the folder under the budget."""
    import gc
    card = cards.load("yolox-nano")
    original = onnx.load(os.path.join(MODELS, "yolox_nano.onnx"))
    m = EngineMaker(OrtBackend(), EngineCache(str(tmp_path / "engines"), budget_mb=9), 2 * GiB)
    sizes = [(320, 240), (256, 192), (192, 144), (160, 120)]
    running = None
    for width, height in sizes:
        engine = m.make(graph.rewrite(original, card, width, height), card,
                        "yolox-nano-{}x{}".format(width, height))
        if running is None:
            running = engine      # the camera's engine: in use all along
        del engine
        gc.collect()
        time.sleep(0.05)          # distinct mtimes: the order of use
    kept = [f for f in artefacts(tmp_path) if not f.endswith(".json")]
    assert [f.split("-ort-")[0] for f in kept] == ["yolox-nano-160x120", "yolox-nano-320x240"]
    total = sum(os.path.getsize(str(tmp_path / "engines" / f)) for f in artefacts(tmp_path))
    assert total <= 9 * 2 ** 20
    running.infer(running.bind(Frame(0, (240, 320, 3))))


def test_a_failed_build_is_retried_only_after_a_growing_wait(tmp_path, rewritten, monkeypatch):
    """A build that failed is not run again at once (a daemon restarted by systemd every 5 s
    would rebuild a minutes-long engine in a loop): the next attempt, in this process or the
    next, waits, the wait doubling per failure and said in the build's state; `edge build`
    (backoff off) tries at once, and a success forgets the failures."""
    card, model = rewritten
    monkeypatch.setattr(building, "BACKOFF_FIRST", 1.0)
    fail = tmp_path / "fail"
    fail.write_text("")
    monkeypatch.setenv("EDGE_TEST_FAIL_FILE", str(fail))
    with pytest.raises(BuildError):
        maker(tmp_path, build_backends.FailingBackend()).make(model, card, "retry-320x240")
    (record,) = glob.glob(str(tmp_path / "engines" / "*.failed"))
    artefact = record[:-len(building.FAILED_SUFFIX)]
    assert building.last_failure(artefact)["attempts"] == 1
    phases = []
    building.add_listener(lambda state: phases.append(state.phase)
                          if state.label == "retry-320x240" else None)
    try:
        started = time.monotonic()
        with pytest.raises(BuildError):     # a new process's maker: the same record
            maker(tmp_path, build_backends.FailingBackend()).make(model, card, "retry-320x240")
        waited = time.monotonic() - started
    finally:
        building._listeners.pop()
    assert waited >= 1.0 and any(p.startswith("waiting 1 s to retry after 1 failed attempt")
                                 for p in phases), phases
    assert building.last_failure(artefact)["attempts"] == 2
    assert building.backoff_s(2) == 2.0 and building.backoff_s(20) == building.BACKOFF_MAX
    fail.unlink()                           # the cause fixed: `edge build` tries at once
    phases = []
    building.add_listener(lambda state: phases.append(state.phase)
                          if state.label == "retry-320x240" else None)
    try:
        now = maker(tmp_path, build_backends.FailingBackend())
        now.backoff = False
        assert now.make(model, card, "retry-320x240") is not None
    finally:
        building._listeners.pop()
    assert phases and not any(p.startswith("waiting") for p in phases), phases
    assert glob.glob(str(tmp_path / "engines" / "*.failed")) == []
