"""Backends for the build tests: they run in the real build child, with real memory and time.

`SlowBackend` writes its artefact in pieces with pauses (so a test can kill it mid-write);
`HungryBackend` keeps allocating memory (so a test sees the budget enforced);
`QuietBackend` works for a long time without a word, as TensorRT 8.2's builder does (it has
no progress monitor), so nothing but the kernel tells it that its parent died;
`ArtefactOnlyBackend` cannot run without its built artefact, as TensorRT cannot.
"""

import time

from edge.backends import register
from edge.backends.ort import OrtBackend


@register
class SlowBackend(OrtBackend):
    name = "test-slow"

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        with open(out_path, "wb") as f:
            for i in range(50):
                progress("build", i / 50.0)
                f.write(b"x" * 1000)
                f.flush()
                time.sleep(0.1)


@register
class HungryBackend(OrtBackend):
    name = "test-hungry"
    limit_address_space = False     # like TensorRT: only the parent's watch applies

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        hog = []
        for _ in range(400):
            hog.append(bytearray(8 * 2 ** 20))   # 8 MiB, touched: counts as resident
            time.sleep(0.005)
        progress("build", 1.0)


@register
class QuietBackend(OrtBackend):
    name = "test-quiet"

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        time.sleep(60)


@register
class ReportingBackend(OrtBackend):
    """Writes what the build child sees of itself into its artefact, and when it ran: its
    oom_score_adj, then `start end` (unix s) after sleeping `EDGE_TEST_BUILD_SECONDS`."""
    name = "test-reporting"

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        import os
        started = time.time()
        time.sleep(float(os.environ.get("EDGE_TEST_BUILD_SECONDS", "0")))
        with open("/proc/self/oom_score_adj") as f:
            score = f.read().strip()
        with open(out_path, "w") as f:
            f.write("{} {} {}\n".format(score, started, time.time()))


@register
class HiddenHungryBackend(OrtBackend):
    """Takes memory that is not in its RSS, as CUDA and nvmap allocations on a Jetson are
    not: pages of a tmpfs file it writes (`EDGE_TEST_SHM_FILE`) and never maps. With
    `EDGE_TEST_NVMAP_ROOT` it also keeps that root's nvmap table (the Jetson driver's
    debugfs file, edge.system.NVMAP_CLIENTS) saying how much it holds, as the driver would."""
    name = "test-hidden-hungry"
    limit_address_space = False

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        import os
        chunk = b"\x01" * (8 * 2 ** 20)
        table = os.environ.get("EDGE_TEST_NVMAP_ROOT")
        if table:
            from edge.system import NVMAP_CLIENTS
            table = os.path.join(table, NVMAP_CLIENTS)
            os.makedirs(os.path.dirname(table), exist_ok=True)
        with open(os.environ["EDGE_TEST_SHM_FILE"], "wb") as f:
            for i in range(160):            # 1.25 GiB at most
                f.write(chunk)
                f.flush()
                if table:
                    with open(table + ".new", "w") as t:
                        t.write("PROCESS PID SIZE\nroot Xorg 812 26112K\n"
                                "edge python3 {} {}K\ntotal {}K\n".format(
                                    os.getpid(), (i + 1) * 8192, (i + 1) * 8192 + 26112))
                    os.rename(table + ".new", table)
                time.sleep(0.01)
        progress("build", 1.0)


@register
class ArtefactOnlyBackend(OrtBackend):
    name = "test-artefact-only"

    def load_uncached(self, model, label, background=False):
        return None


@register
class FailingBackend(OrtBackend):
    """Fails its build with an error (as a parser would) while the file named by
    `EDGE_TEST_FAIL_FILE` exists; else builds as ONNX Runtime does."""
    name = "test-failing"

    @classmethod
    def build(cls, onnx_path, out_path, options, progress):
        import os
        if os.path.exists(os.environ.get("EDGE_TEST_FAIL_FILE", "")):
            raise RuntimeError("the test says this build fails")
        super(FailingBackend, cls).build(onnx_path, out_path, options, progress)
