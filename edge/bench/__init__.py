"""`edge bench`: what serving costs, measured in one run (main: the pipeline against raw
inference and a hand-written loop; cameras: N cameras in one daemon; depth: stereo depth;
replay: running the real pipeline on frames in memory, shared by all three)."""
