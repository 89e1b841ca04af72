"""Train-step throughput with per-block torch.compile (`train --compile true`), every family alike.

Compilation removes most of the per-operation overhead that the small HC-site operations pay in eager
mode; what is left of mHC's overhead is memory traffic over its n = 4 streams, which grows with d while the
matmuls grow with d^2. So this benchmark adds the gpu-small preset (d512, the paper's 16 layers), the widest
a CPU steps through in seconds, nearest the paper's d1024 where the 0.65x was measured. One batch per
scale keeps the compile time (minutes on CPU) bounded.
"""
from __future__ import annotations

from benchmarks import bench_train


def run(quick: bool = False) -> dict:
    return bench_train.run(quick, cells=(("tiny", 16), ("small", 16), ("gpu-small", 8)), compile=True)
