"""Backends for the build tests: they run in the real build child, with real memory and time.

`SlowBackend` writes its artefact in pieces with pauses (so a test can kill it mid-write);
`HungryBackend` keeps allocating memory (so a test sees the budget enforced).
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
