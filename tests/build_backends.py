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
class ArtefactOnlyBackend(OrtBackend):
    name = "test-artefact-only"

    def load_uncached(self, model, label, background=False):
        return None
