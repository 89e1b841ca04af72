"""`make bench`: run every benchmark, write reports/bench/<name>.json and reports/bench/summary.md.

    python -m benchmarks.run [--quick] [--only train_step,decode] [--default-allocator --out DIR]

`site_cost` splits the HC families' overhead into coefficients and stream mixing (benchmarks/bench_site_cost.py).

Like `hyperloop-lm train`, the run keeps freed memory in the process (hyperloop_lm.utils.keep_freed_memory);
`--default-allocator` measures with glibc's defaults instead (write it elsewhere with --out to compare).
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
from pathlib import Path

import torch

from hyperloop_lm.model import hc_kernels
from hyperloop_lm.utils import atomic_write_text, keep_freed_memory

BENCHMARKS = {"train_step": "benchmarks.bench_train", "train_step_compiled": "benchmarks.bench_train_compiled",
              "site_cost": "benchmarks.bench_site_cost", "decode": "benchmarks.bench_decode",
              "hc_kernels": "benchmarks.bench_hc_kernels"}


def summarize(name: str, r: dict) -> list[str]:
    lines = [f"## {name}", ""]
    if "markdown" in r:
        lines += [r["markdown"]]
    elif "ratio_to_transformer" in r:
        lines += ["| family | tok/s | ratio to Transformer | target |", "|---|---|---|---|"]
        for f, v in r["tok_s"].items():
            target = r.get("targets", {}).get(f)
            lines.append(f"| {f} | {v:.0f} | {r['ratio_to_transformer'][f]:.3f} | {'>= %.2f' % target if target else ''} |")
    else:
        lines.append("```json\n" + json.dumps(r, indent=2)[:3000] + "\n```")
    return lines + [""]


def cpu_model() -> str:
    """The CPU's model name and widest vector extension (/proc/cpuinfo on Linux): ratios of memory-bound HC
    sites to matmul-bound layers differ between machines, so a result should say which it came from."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    simd = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
    return f"{name}, {simd}" if simd else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    ap.add_argument("--default-allocator", action="store_true",
                    help="glibc's default malloc settings (freed memory goes back to the OS and is faulted in again)")
    ap.add_argument("--out", type=Path, default=Path("reports/bench"), help="where the JSON results and summary go")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(BENCHMARKS)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    kept = False if a.default_allocator else keep_freed_memory()
    machine = {"platform": platform.platform(), "processor": platform.processor() or cpu_model(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "keep_freed_memory": kept,
               "hc_kernels": hc_kernels.available()}
    flags = " --default-allocator" if a.default_allocator else ""
    md = ["# Benchmarks", "", f"Machine: `{json.dumps(machine)}`", "", f"Command: `make bench`{flags}", ""]
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        result = {"machine": machine, "command": f"python -m benchmarks.run --only {name}{flags}",
                  **module.run(quick=a.quick)}
        atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2))
        print(f"{name}: written to {out / (name + '.json')}")
    for name in BENCHMARKS:  # the summary covers every result on disk, however it was run
        if (out / f"{name}.json").exists():
            md += summarize(name, json.loads((out / f"{name}.json").read_text()))
    atomic_write_text(out / "summary.md", "\n".join(md))


if __name__ == "__main__":
    main()
