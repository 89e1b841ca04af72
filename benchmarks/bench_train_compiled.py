"""Train-step throughput with per-block torch.compile (`train --compile true`), every family alike.

Compilation removes most of the per-operation overhead that the small HC-site operations pay in eager
mode, which dominates at CPU widths; one batch per scale keeps the compile time (minutes on CPU) bounded.
"""
from __future__ import annotations

from benchmarks import bench_train


def run(quick: bool = False) -> dict:
    return bench_train.run(quick, batches=(16,), compile=True)
