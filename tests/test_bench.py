"""edge bench runs end to end (short) and reports every figure the performance issue names.

Only that the figures exist and are sane: speed targets are read from the printed figures,
never asserted as timings here.
"""

import json

from tests.conftest import COCO8_VAL, SHARED, run_edge


def test_bench_reports_all_figures(tmp_path, model_dir):
    out_json = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    rc, out, err = run_edge("bench", "--source", COCO8_VAL, "--frames", "30", "--seconds",
                            "0.5", "--rounds", "2", "--match-seconds", "1", "--model-dir",
                            model_dir, "--state-dir", str(tmp_path),
                            "--json", str(out_json), "--plot", str(plot), "--matcher",
                            "coarse-loftr", "--reference",
                            SHARED + "/data/middlebury-motorcycle/motorcycle_left.png",
                            "--cameras", "2", "--live-seconds", "0.5", timeout=300)
    assert rc == 0, err[-3000:]
    r = json.loads(out_json.read_text())
    for key in ("raw_fps", "raw_model_fps", "pipeline_fps", "pipeline_images_fps", "peer_fps",
                "alloc_per_frame_bytes", "added_latency_p50_ms", "peak_rss_mb", "host_cast_ms"):
        assert r[key] > 0, key
    assert r["received"] > 0 and r["capture_to_received_ms"]["p50"] > 0
    assert set(r["latency_run"]["stages_ms"]) == {"total", "queue", "infer", "post"}
    assert r["with_matcher"]["match_runs"] >= 1 and r["with_matcher"]["detect_fps"] > 0
    assert r["with_matcher"]["match_infer_ms"]["p50"] > 0 and r["daemon_peak_rss_mb"] > 50
    assert len(r["rounds"]) == 2 and all(x["raw_fps"] > 0 and x["pipeline_fps"] > 0 and
                                         x["peer_fps"] > 0 for x in r["rounds"])
    tracking = r["tracking"]
    assert tracking["objects"] == 50 and tracking["tracks"] > 0 and tracking["ms"]["p50"] > 0
    assert "growth_bytes_per_frame" in tracking and "tracking" in out
    # tracking as configured (camera motion compensation on) against without, same rounds
    assert r["tracked_fps"] > 0 and r["tracked_over_untracked"] > 0 and "tracked_fps" in out
    motion = r["camera_motion"]
    assert motion["size"] == [640, 480] and motion["ms"]["p50"] > 0 and "camera motion" in out
    assert motion["fits"] >= motion["frames"] - 2, motion     # a real picture, panning
    assert "pipeline/raw" in out and plot.stat().st_size > 1000
    cameras = r["cameras"]         # issue 16's figures: several cameras in one daemon
    assert cameras["cameras"] == 2 and cameras["alone_fps"] > 0
    for key in ("together", "batched"):
        assert cameras[key + "_fps"] > 0 and 0 < cameras[key + "_fairness"] <= 1
        assert cameras[key + "_over_alone"] > 0
        run = cameras["per_round"][-1][key]["cameras"]
        assert sorted(run) == ["cam0", "cam1"] and all(c["frames"] > 0 for c in run.values())
        live = cameras["live"][key]["cameras"]
        assert all(c["frames"] > 0 for c in live.values())
    assert cameras["batch_engine"] == ["yolox-nano-640x480-b2"]
    raw = cameras["raw"]           # the engines alone: N frames one at a time against one batch
    assert raw["one_at_a_time_ms"] > 0 and raw["batch_ms"] > 0 and raw["runs"] >= 3
    assert raw["batch_speedup"] > 0 and "engines alone on 2 frames" in out
    memory = cameras["memory"]
    assert memory["one_daemon_mb"] > 50 and memory["separate_daemons_mb"] > 100
    assert "2 cameras" in out and "slowest/fastest" in out
