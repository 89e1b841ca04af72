"""Decode throughput and KV-cache bytes: Hyperloop vs its depth-matched Transformer.

Both models have the same width and the same *unrolled* depth (tiny: Transformer 8 layers, Hyperloop
1-2x3-1 = 8 virtual layers), so they do the same matmul FLOPs per token and keep the same KV cache
(one K/V slot per virtual layer); Hyperloop adds its loop-level hyper-connections (n = 4 streams,
one mixing site per loop). Random weights: throughput does not depend on what the weights are.

Measured per (weights: fp32 | int4, batch: 1 | 8): prefill a prompt (untimed), then time
`new_tokens` single-token decode steps through the preallocated KVCache (greedy argmax, exactly the
work `hyperloop_lm.infer.generate` does per step). The two models are interleaved step by step, in
alternating order, so that machine noise (other jobs on shared cores, frequency changes) hits both
alike; each repetition times a whole decode, and we report the median over repetitions. int4 = RTN, group 128, on every block linear (QuantizedLinear
dequantizes its packed weight per call, the head and embedding stay fp32).

    python -m benchmarks.bench_decode [--quick] [--scale tiny] [--threads N]   (one scale; make bench runs
                                                                                 tiny and gpu-small)

Threads default to 1: a tiny model's decode step is a few hundred small ops, latency-bound, and on
shared cores an intra-op thread pool mostly measures the other jobs (2 threads under load were 15x
slower than 1 here). `--threads 0` keeps torch's default.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from hyperloop_lm.config import get_preset
from hyperloop_lm.infer.cache import KVCache
from hyperloop_lm.model.lm import LM

TARGET = 0.95  # issue 6: Hyperloop / Transformer decode throughput
BLOCK_LINEARS = ("attn.wqkv", "attn.wo", "mlp.gate_up", "mlp.down")


def quantize_int4(model: LM, group_size: int = 128) -> LM:
    """RTN int4 on the block linears, in place. Uses the quantization driver when it is there (the
    same layers), else swaps nn.Linear -> QuantizedLinear directly."""
    try:
        from hyperloop_lm.quant.driver import quantize_model
    except ImportError:
        quantize_model = None
    if quantize_model is not None:
        quantize_model(model, "rtn", bits=4, group_size=group_size)
        return model
    from hyperloop_lm.quant import QuantizedLinear, quantize_rtn

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(BLOCK_LINEARS):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantizedLinear.from_codes(quantize_rtn(module.weight, 4, group_size)))
    return model


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if t is not getattr(model, "rope_cos", None) and t is not getattr(model, "rope_sin", None))


@torch.inference_mode()
def interleaved_decode(models: dict[str, LM], prompt: torch.Tensor, new_tokens: int
                       ) -> tuple[dict[str, float], dict[str, float], dict[str, KVCache]]:
    """Prefill `prompt` (B, P) in every model, then run `new_tokens` cached single-token steps,
    alternating the models step by step (so load from other jobs hits them alike, at millisecond
    granularity). Returns total decode (wall s, CPU s) per model, and the caches.

    CPU time (this process, all its threads) is reported beside wall time because on shared cores a
    descheduled process loses wall time it did not spend computing; on a quiet machine they agree."""
    caches = {n: KVCache.for_model(m, batch=prompt.shape[0], max_len=prompt.shape[1] + new_tokens)
              for n, m in models.items()}
    nxt = {n: m(prompt, cache=caches[n])[:, -1].argmax(-1, keepdim=True) for n, m in models.items()}  # (B, 1)
    wall = dict.fromkeys(models, 0.0)
    cpu = dict.fromkeys(models, 0.0)
    names = list(models)
    for step in range(new_tokens):
        for n in (names if step % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            nxt[n] = models[n](nxt[n], cache=caches[n])[:, -1].argmax(-1, keepdim=True)
            nxt[n].sum().item()  # wait for the device (a no-op on CPU)
            wall[n] += time.perf_counter() - t0
            cpu[n] += time.process_time() - c0
    return wall, cpu, caches


def run(quick: bool = False, scales: tuple[str, ...] = ("tiny", "gpu-small"), **kw) -> dict:
    """Every scale: the CPU presets, where per-op overhead dominates a decode step, and the smallest GPU
    preset (d512, 16 virtual layers), where the arithmetic does."""
    results = {scale: run_scale(quick, scale, **kw) for scale in scales}
    md = "\n\n".join(f"{scale} (d{r['d_model']}, unrolled depth {r['unrolled_depth']}):\n\n{r['markdown']}"
                     for scale, r in results.items())
    return {"benchmark": "decode", "target_ratio": TARGET, "by_scale": results, "markdown": md}


def run_scale(quick: bool = False, scale: str = "tiny", prompt_len: int = 64, threads: int = 1,
              device: str = "cpu") -> dict:
    if threads:
        torch.set_num_threads(threads)
    reps, new_tokens = (3, 32) if quick else (7, 64)
    torch.manual_seed(0)
    fp32 = {"hyperloop": LM(get_preset(f"{scale}-hyperloop")).eval(),
            "transformer": LM(get_preset(f"{scale}-transformer")).eval()}
    assert fp32["hyperloop"].depth() == fp32["transformer"].depth()
    int4 = {}
    for name, model in fp32.items():
        q = LM(model.cfg).eval()
        q.load_state_dict(model.state_dict())
        int4[name] = quantize_int4(q).to(device)
        fp32[name] = model.to(device)
    cfg = fp32["transformer"].cfg
    rows = []
    for weights, models in (("fp32", fp32), ("int4", int4)):
        for batch in (1, 8):
            prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
            interleaved_decode(models, prompt, 4)  # warm-up (allocator, first-call costs)
            times: dict[str, list[float]] = {n: [] for n in models}
            cpu: dict[str, list[float]] = {n: [] for n in models}
            for _ in range(reps):
                wall_s, cpu_s, caches = interleaved_decode(models, prompt, new_tokens)
                for n in models:
                    times[n].append(wall_s[n])
                    cpu[n].append(cpu_s[n])
            tok_s = {n: batch * new_tokens / statistics.median(t) for n, t in times.items()}
            cpu_tok_s = {n: batch * new_tokens / statistics.median(t) for n, t in cpu.items()}
            row = {"weights": weights, "batch": batch, "new_tokens": new_tokens, "prompt_len": prompt_len,
                   "tok_s": tok_s, "ratio": tok_s["hyperloop"] / tok_s["transformer"],
                   "cpu_time_tok_s": cpu_tok_s, "ratio_cpu_time": cpu_tok_s["hyperloop"] / cpu_tok_s["transformer"],
                   "kv_cache_bytes": {n: c.nbytes() for n, c in caches.items()},
                   "kv_bytes_per_token": {n: c.nbytes() // (batch * c.max_len) for n, c in caches.items()},
                   "weight_bytes": {n: weight_bytes(m) for n, m in models.items()},
                   "spread": {n: (min(t), max(t)) for n, t in times.items()}}
            rows.append(row)
            print(f"{weights} batch {batch}: hyperloop {tok_s['hyperloop']:.0f} tok/s, transformer "
                  f"{tok_s['transformer']:.0f} tok/s, ratio {row['ratio']:.3f} (CPU time: {row['ratio_cpu_time']:.3f})",
                  file=sys.stderr, flush=True)
    return {"scale": scale, "unrolled_depth": cfg.unrolled_depth, "d_model": cfg.d_model,
            "schedule": {n: f"{m.cfg.n_begin}-{m.cfg.n_middle}x{m.cfg.loops}-{m.cfg.n_end}" for n, m in fp32.items()},
            "device": device, "threads": torch.get_num_threads(), "reps": reps, "target_ratio": TARGET,
            "min_ratio": min(r["ratio"] for r in rows), "min_ratio_cpu_time": min(r["ratio_cpu_time"] for r in rows), "rows": rows, "markdown": markdown(rows)}


def markdown(rows: list[dict]) -> str:
    lines = ["| weights | batch | Hyperloop tok/s | Transformer tok/s | ratio (wall) | ratio (CPU time) | "
             "KV cache (both) | weights H / T |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kv = r["kv_cache_bytes"]
        same = "" if kv["hyperloop"] == kv["transformer"] else " (differ!)"
        lines.append(f"| {r['weights']} | {r['batch']} | {r['tok_s']['hyperloop']:.0f} | {r['tok_s']['transformer']:.0f} | "
                     f"{r['ratio']:.3f} | {r['ratio_cpu_time']:.3f} | {kv['hyperloop'] / 2**20:.2f} MiB{same} | "
                     f"{r['weight_bytes']['hyperloop'] / 2**20:.2f} / {r['weight_bytes']['transformer'] / 2**20:.2f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scale", default="tiny")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = run_scale(quick=a.quick, scale=a.scale, threads=a.threads, device=a.device)
    print(json.dumps(res, indent=2) if a.json else res["markdown"])
