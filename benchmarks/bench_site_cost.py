"""Where the HC families' train-step overhead goes: the sites' coefficients or their stream mixing.

Each HC site does two things: it computes its coefficients from the streams (RMSNorm, the projection W z,
the gates, Sinkhorn for mHC; forward and backward) and it mixes the streams with them (the read pre . y and
the write res (x) y + post (x) F). This benchmark times each HC family twice, as it is and with its
coefficients given for free (constants of the right shapes: no projection, gates or Sinkhorn, forward or
backward; the read and the write run as usual), next to its site-free counterpart (the Transformer for mHC,
Looped for Hyperloop). The free-coefficient step is a floor that no faster coefficient code can beat. What
is left of the target's budget above it, per site, is compared with the projection's three matmuls alone
(W z forward, and the gradients of z and W), timed on hot caches at the site's shape: where the budget is
below them, no implementation built on these BLAS matmuls meets the target at that width on this machine;
where it is above, the gap between the two is what fusing everything else would have to fit in.
Timings are interleaved step by step as in bench_train (medians of 16 repetitions, one thread). The per-site
figures are differences of step medians divided by the number of sites: with Hyperloop's three sites, 1% of
step noise is a few ms per site.
"""
from __future__ import annotations

import statistics
import time
import types

import torch
import torch.nn.functional as F

from benchmarks.bench_train import TARGETS
from hyperloop_lm.config import get_preset
from hyperloop_lm.model.hyper import HyperConnection
from hyperloop_lm.model.lm import LM

CELLS = (("tiny", 8), ("small", 8))
# name -> (family, coefficients free?); each HC family is compared with the same stack without its sites
VARIANTS = {"transformer": ("transformer", False), "mhc": ("mhc", False), "mhc_free_coefficients": ("mhc", True),
            "looped": ("looped", False), "hyperloop": ("hyperloop", False),
            "hyperloop_free_coefficients": ("hyperloop", True)}
BASELINE = {"mhc": "transformer", "hyperloop": "looped"}


def _constant_gates(self: HyperConnection, y: torch.Tensor):
    """What HyperConnection._gates returns (pre, post / 2, res), as constants: the read and the write then do
    their usual work, and nothing is spent on computing (or differentiating) the coefficients."""
    lead, n = y.shape[:-2], self.n
    pre, half_post = y.new_full((*lead, n), 1 / n), y.new_full((*lead, n), 0.5)
    res = {"sinkhorn": lambda: torch.eye(n, dtype=y.dtype).expand(*lead, n, n).contiguous(),
           "diagonal": lambda: y.new_full((*lead, n), 0.5), "identity": lambda: None}[self.res_kind]()
    return pre, half_post, res


def free_coefficients(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, HyperConnection):
            module._gates = types.MethodType(_constant_gates, module)
    return model


def run(quick: bool = False, cells: tuple[tuple[str, int], ...] = CELLS, **kw) -> dict:
    results = {f"{scale}/b{b}": run_cell(quick, scale, batch=b, **kw) for scale, b in cells}
    rows = ["| scale / batch | family | ratio | ratio, coefficients free | target | coefficients per site (ms): "
            "now / left by the target / the projection's matmuls alone | mixing per site (ms) |",
            "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        for family, c in r["families"].items():
            rows.append(f"| {key} | {family} | {c['ratio']:.3f} | {c['ratio_free_coefficients']:.3f} | >= "
                        f"{c['target']:.2f} | {c['coefficients_ms_per_site']:.2f} / {c['coefficient_budget_ms_per_site']:.2f}"
                        f" / {c['projection_matmuls_ms']:.2f} | {c['mixing_ms_per_site']:.2f} |")
    return {"benchmark": "site_cost", "by_scale": results, "markdown": "\n".join(rows)}


def run_cell(quick: bool = False, scale: str = "tiny", batch: int = 8, seq_len: int = 256, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    reps = 3 if quick else 16
    setups = {}
    for name, (family, free) in VARIANTS.items():
        torch.manual_seed(0)
        cfg = get_preset(f"{scale}-{family}")
        model = LM(cfg)
        if free:
            free_coefficients(model)
        setups[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4),
                        torch.randint(0, cfg.vocab_size, (batch, seq_len)))

    def step(name: str) -> float:
        model, opt, x = setups[name]
        t0 = time.perf_counter()
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in setups:  # warm-up
        step(name)
    times = {name: [] for name in setups}
    for rep in range(reps):
        for name in (list(setups) if rep % 2 == 0 else list(setups)[::-1]):
            times[name].append(step(name))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    families = {}
    for family, base in BASELINE.items():
        model = setups[family][0]
        sites = sum(isinstance(m, HyperConnection) for m in model.modules())
        real, free = ms[family], ms[f"{family}_free_coefficients"]
        families[family] = {
            "sites": sites, "target": TARGETS[family],
            "ratio": ms["transformer"] / real, "ratio_free_coefficients": ms["transformer"] / free,
            "coefficients_ms_per_site": (real - free) / sites, "mixing_ms_per_site": (free - ms[base]) / sites,
            # the step time at which the family would meet its target, against the Transformer of this run
            "budget_ms": ms["transformer"] / TARGETS[family], "free_coefficients_ms": free,
            "coefficient_budget_ms_per_site": (ms["transformer"] / TARGETS[family] - free) / sites,
            "projection_matmuls_ms": projection_matmuls_ms(model.hc[0] if family == "hyperloop" else
                                                           model.begin[0].attn_hc, batch * seq_len, reps)}
    return {"scale": scale, "batch": batch, "seq_len": seq_len, "reps": reps, "threads": torch.get_num_threads(),
            "step_ms": ms, "families": families}


def projection_matmuls_ms(site: HyperConnection, tokens: int, reps: int) -> float:
    """The three matmuls of a site's projection at this shape, forward and backward (W z, dh W, dh^T z), on
    hot caches: the median of `reps` timings, in ms."""
    z, weight = torch.randn(tokens, site.weight.shape[1]), site.weight.detach().clone()
    dh = torch.randn(tokens, weight.shape[0])
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        F.linear(z, weight), dh @ weight, dh.T @ z
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


if __name__ == "__main__":
    print(run()["markdown"])
