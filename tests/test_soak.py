"""A one-minute soak (the long one is `tools/soak.py --duration 1800`): `edge run` on a live
test pattern with QoS 1 while the broker restarts every 20 s; the daemon's memory, threads
and descriptors must stay flat after warm-up and no QoS 1 message may be lost."""

import io

from tools.soak import soak, verdict


def test_one_minute_soak_with_broker_restarts(tmp_path, model_dir, capsys):
    out = io.StringIO()
    result = soak(duration=54.0, restart_every=20.0, down=2.0, sample_every=3.0, warmup=20.0,
                  fps=15, model_dir=model_dir, workdir=str(tmp_path), out=out)
    with capsys.disabled():
        print("\n" + out.getvalue())
    summary = result["summary"]
    assert summary["restarts"] == 2 and summary["results"] > 100, summary
    assert summary["samples"] >= 10, summary
    assert verdict(summary, max_rss_growth_mb=5.0) == [], (summary, out.getvalue())
    assert summary["queue_max"] is not None and summary["queue_max"] <= 1000
