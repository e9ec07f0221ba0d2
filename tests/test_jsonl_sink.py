"""The JSONL file when the disk fills: the device says so in health, and writes on once it can.

A file-size limit on the daemon (RLIMIT_FSIZE, raised again from here with prlimit) stands
in for a full disk: writes past it fail with an OSError as they would with ENOSPC, and the
limit can be lifted without root, where freeing a real disk would need a mount.
"""

import json
import os
import resource
import subprocess
import sys

from tools.soak import Mosquitto, PersistentSubscriber, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 30000       # bytes: some dozens of detection lines


def _lines(path):
    with open(path, "rb") as f:
        return f.read().split(b"\n")


def test_a_full_disk_degrades_health_until_the_file_takes_lines_again(tmp_path, model_dir):
    broker = Mosquitto(str(tmp_path), persistence=False).start()
    jsonl = str(tmp_path / "out.jsonl")
    config = tmp_path / "edge.yaml"
    config.write_text("health: {interval: 1}\n")
    log_path = str(tmp_path / "edge.log")

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "run", "-c", str(config), "--source",
             "test://?width=160&height=120&fps=10", "--detector", "yolox-nano",
             "--model-dir", model_dir, "--device-id", "disk", "--mqtt", broker.url,
             "--jsonl", jsonl], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=limited)

    def text():
        with open(log_path, errors="replace") as f:
            return f.read()

    sub = PersistentSubscriber(broker.port, ["edge/disk/health"], persistent=False).start()
    try:
        def latest():
            reports = sub.payloads("health")
            return reports[-1] if reports else {}

        assert sub.wait_for(lambda: (latest().get("jsonl") or {}).get("error"), 90), text()
        report = latest()
        assert not report["verdict"]["healthy"], report
        assert any(r.startswith("jsonl {}: cannot write".format(jsonl))
                   for r in report["verdict"]["reasons"]), report["verdict"]
        assert report["state"] == "degraded"
        assert text().count("ERROR edge.publisher: jsonl") == 1, "said once, not per frame"
        size_when_full = os.path.getsize(jsonl)
        assert size_when_full <= LIMIT

        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert wait_until(lambda: "writable again" in text(), 30), text()
        assert sub.wait_for(lambda: (latest().get("jsonl") or {"error": 1})["error"] is None
                            and latest()["verdict"]["healthy"], 30), latest()
        missed = latest()["jsonl"]["missed"]
        assert missed > 0
        assert wait_until(lambda: os.path.getsize(jsonl) > size_when_full + 2000, 30)
    finally:
        sub.close()
        proc.terminate()
        code = proc.wait(20)
        broker.stop()
    assert code == 0, text()
    # every line whole: the half line the full disk left was cut before writing went on
    lines = _lines(jsonl)
    assert lines[-1] == b""
    seqs = [json.loads(line)["seq"] for line in lines[:-1]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs[-1] - seqs[0] + 1 > len(seqs), "the results of the full-disk time are missing"
