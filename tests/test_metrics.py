"""Prometheus metrics: a real `edge run` with --metrics-port, scraped over HTTP and parsed with
prometheus-client's own parser; every name the docs list is served, and its figures agree
with the daemon's health report."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, free_port, run_edge


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:{}/metrics".format(port), timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def samples(family, name=None, **labels):
    return [s for s in family.samples if (name is None or s.name == name) and
            all(s.labels.get(k) == v for k, v in labels.items())]


def readme_metric_names():
    """The metric names the docs list (docs/fleet.md, Prometheus metrics)."""
    text = open(os.path.join(ROOT, "docs", "fleet.md"), encoding="utf-8").read()
    section = text.split("\n## Prometheus metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(edge_[a-z_]+)`", section, re.M))


JETSON_ONLY = {"edge_gpu_load_ratio", "edge_fan_speed_ratio"}


def test_a_jetson_serves_every_documented_metric():
    """The system figures of a recorded Jetson Nano (JetPack 4.6): every documented name is
    served, with the board's figures."""
    from prometheus_client import CollectorRegistry, generate_latest
    import onnxruntime
    from edge import system
    from edge.backends import select
    from edge.commands import Commands
    from edge.health import Health
    from edge.metrics import DaemonCollector
    from tests.test_schemas import LIMITS, NANO, App
    app = App()
    app.commands = Commands(app)
    app.health = Health(app, 10.0, LIMITS, system_status=lambda: system.from_sysfs(NANO),
                        versions=system.versions(select("ort").describe(), root=NANO))
    app.health.report()             # the health interval samples the system figures
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(app))
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    documented = readme_metric_names()
    assert set(families) == documented, set(families) ^ documented
    # shares are 0..1 ratios: the Nano's 42.3 % GPU load, 42.2 % memory, 30.2 % fan
    assert [s.value for s in samples(families["edge_gpu_load_ratio"])] == [0.423]
    assert [s.value for s in samples(families["edge_memory_used_ratio"])] == [0.422]
    assert [s.value for s in samples(families["edge_fan_speed_ratio"])] == [0.302]
    # one label per fact, none of them a dict's text
    info = samples(families["edge_info"])[0].labels
    assert {k: info[k] for k in ("backend", "backend_version", "backend_device", "jetpack",
                                 "l4t", "board")} == {
        "backend": "ort", "backend_version": onnxruntime.__version__, "backend_device": "cpu",
        "jetpack": "4.6.1", "l4t": "32.7.1", "board": "NVIDIA Jetson Nano Developer Kit"}
    assert not any("{" in value for value in info.values()), info
    temperatures = samples(families["edge_temperature_celsius"])
    assert temperatures and all(0 < s.value < 120 for s in temperatures)
    assert any(s.labels["rail"] == "total" for s in samples(families["edge_power_watts"]))


def test_edge_info_labels_read_the_same_on_tensorrt():
    """The backend's description differs by backend (the API document's BackendVersions);
    edge_info's labels do not."""
    from edge.metrics import INFO_LABELS, info_values
    trt = {"backend": "trt", "tensorrt": "8.2.1.8", "device": "NVIDIA Tegra X1",
           "compute_capability": "5.3", "l4t": "32.7.1", "workspace_mb": 256,
           "zero_copy": True, "frame_dtype": "uint8", "tactic_sources": "default"}
    values = dict(zip(INFO_LABELS, info_values(
        {"edge": "0.9", "python": "3.6.9", "backend": trt, "cuda": "10.2.300",
         "jetpack": "4.6.1", "l4t": "32.7.1", "board": None, "os": None})))
    assert values == {"version": "0.9", "python": "3.6.9", "backend": "trt",
                      "backend_version": "8.2.1.8", "backend_device": "NVIDIA Tegra X1",
                      "cuda": "10.2.300", "jetpack": "4.6.1", "l4t": "32.7.1", "board": "",
                      "os": ""}
    # health without edge.system (no backend) still gives every label
    assert info_values({"edge": "0.9", "python": "3.6.9"}) == ["0.9", "3.6.9"] + [""] * 8


def test_a_running_daemon_serves_its_metrics(broker, subscriber, tmp_path, model_dir):
    port = free_port()
    sub = subscriber("edge/cam1/#")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("health: {interval: 1}\npipeline: {threads: 1}\n")
    log = open(str(tmp_path / "edge.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "-c", str(cfg), "--source",
         "test://?width=320&height=240&fps=10", "--detector", "yolox-nano",
         "--model-dir", model_dir, "--mqtt", broker.url, "--device-id", "cam1",
         "--state-dir", str(tmp_path / "state"), "--metrics-port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert sub.wait_for(lambda s: any(h["tasks"].get("detect", {}).get("frames", 0) >= 5
                                          for h in s.json("health")), 60), \
            open(str(tmp_path / "edge.log")).read()
        families = scrape(port)
        # nothing undocumented is served; what a PC lacks (GPU, fan, throttling) is left out
        served = {name for name in families if name.startswith("edge_")}
        documented = readme_metric_names()
        assert served <= documented, served - documented
        assert documented - served == JETSON_ONLY, documented - served
        labels = {"device": "cam1", "task": "detect", "model": "yolox-nano",
                  "camera": "default"}
        frames = samples(families["edge_task_frames"], "edge_task_frames_total", **labels)
        assert frames and frames[0].value >= 5
        # histograms: cumulative buckets ending in +Inf == count, a positive sum
        for name in ("edge_inference_seconds", "edge_frame_latency_seconds"):
            buckets = samples(families[name], name + "_bucket", **labels)
            counts = [s.value for s in buckets]
            assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
            count = samples(families[name], name + "_count", **labels)[0].value
            assert counts[-1] == count >= frames[0].value - 2
            assert samples(families[name], name + "_sum", **labels)[0].value > 0
        assert samples(families["edge_mqtt_connected"])[0].value == 1
        assert samples(families["edge_healthy"])[0].value == 1
        ready = samples(families["edge_engine_state"], state="ready")
        assert ready and all(s.value == 1 for s in ready)
        assert samples(families["edge_memory_total_bytes"])[0].value > 2 ** 28
        assert samples(families["edge_publish_sent_messages"])[0].value > 0
        info = samples(families["edge_info"])[0].labels
        assert info["backend"] == "ort" and info["backend_device"] == "cpu"
        assert info["backend_version"] and info["version"] and info["python"]
        busy = samples(families["edge_cpu_busy_ratio"])
        assert busy and all(0 <= s.value <= 1 for s in busy)
        assert 0 < samples(families["edge_memory_used_ratio"])[0].value < 1
        # the daemon's own process, from prometheus-client's process collector
        assert samples(families["process_resident_memory_bytes"])[0].value > 2 ** 24
        assert samples(families["process_cpu_seconds"], "process_cpu_seconds_total")[0].value > 0
        assert samples(families["process_open_fds"])[0].value > 3
        assert samples(families["edge_source_frames"], camera="default")[0].value >= 5
        # counters only grow between scrapes
        time.sleep(1.5)
        later = scrape(port)
        assert samples(later["edge_task_frames"], "edge_task_frames_total", **labels)[0].value \
            > frames[0].value
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen("http://127.0.0.1:{}/".format(port), timeout=5)
        assert e.value.code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    assert proc.returncode == 0, open(str(tmp_path / "edge.log")).read()


def test_named_cameras_have_their_own_series(broker, subscriber, tmp_path, model_dir):
    """Two named cameras: source and task figures per camera, adding up to the health
    report's totals taken after the scrape (counters only grow)."""
    port = free_port()
    sub = subscriber("edge/duo/health")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        "health: {interval: 1}\npipeline: {threads: 1}\nsources:\n"
        "  - {name: front, uri: 'test://?width=320&height=240&fps=8'}\n"
        "  - {name: rear, uri: 'test://?width=160&height=120&fps=8'}\n")
    log = open(str(tmp_path / "edge.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "-c", str(cfg), "--detector", "yolox-nano",
         "--model-dir", model_dir, "--mqtt", broker.url, "--device-id", "duo",
         "--state-dir", str(tmp_path / "state"), "--metrics-port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert sub.wait_for(lambda s: any(
            all(c["frames"] >= 3 for c in h.get("cameras", {"-": {"frames": 0}}).values())
            for h in s.json("health")), 60), open(str(tmp_path / "edge.log")).read()
        families = scrape(port)
        seen = len(sub.json("health"))
        assert sub.wait_for(lambda s: len(s.json("health")) > seen, 10)
        after = sub.json("health")[-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    labels = {"device": "duo", "task": "detect", "model": "yolox-nano"}
    frames = {s.labels["camera"]: s.value for s in samples(
        families["edge_task_frames"], "edge_task_frames_total", **labels)}
    assert set(frames) == {"front", "rear"} and all(v >= 1 for v in frames.values()), frames
    assert sum(frames.values()) <= after["tasks"]["detect"]["frames"]
    for name in ("edge_inference_seconds", "edge_frame_latency_seconds"):
        for camera, count in frames.items():
            counted = samples(families[name], name + "_count", camera=camera, **labels)
            assert count <= counted[0].value <= count + 2     # read a moment later
    captured = {s.labels["camera"]: s.value for s in samples(
        families["edge_source_frames"], "edge_source_frames_total")}
    assert set(captured) == {"front", "rear"}
    for camera, value in captured.items():
        assert 3 <= value <= after["cameras"][camera]["frames"]


def test_a_taken_metrics_port_is_a_config_error(tmp_path, model_dir):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc, out, err = run_edge("run", "--source", "test://?frames=2&width=64&height=48",
                                "--detector", "yolox-nano", "--model-dir", model_dir,
                                "--jsonl", str(tmp_path / "o.jsonl"),
                                "--state-dir", str(tmp_path / "state"),
                                "--metrics-port", str(port))
    assert rc == 78, err
    lines = [l for l in err.splitlines() if l.startswith("edge: error")]
    assert len(lines) == 1 and "metrics" in lines[0] and str(port) in lines[0], err
    assert "Traceback" not in err
