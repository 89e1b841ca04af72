"""Reproduction suites: the paper's comparisons as matrices of training runs ("cells").

Every cell of a suite shares the scale's data, token budget, recipe and seeds; only the model
differs. A cell is (name, preset, model overrides, train overrides); `reproduce` trains each cell
for each seed (resumable), then runs its post-training measurements.

Scales (train settings; the model presets carry the widths):
    micro       seconds: the end-to-end test of the pipeline
    cpu-tiny    d128, 8 unrolled layers, ~2M tokens/run: table1 x 3 seeds ~ 3 h on 2 CPU cores
    cpu-quick   the cpu-tiny models on 400k tokens in batches of 4 x 256 (390 steps, ~5 min per run on
                one core): for the many-cell suites (ablations, loops, recipes) on a CPU
    cpu-small   d256, 16 unrolled layers (the paper's 2-4x3-2 structure), ~5M tokens/run
    gpu-small   d512, 16 unrolled layers, 500M tokens/run, seq 1024 (needs a GPU)
    paper-240m  the paper's 240M configuration and recipe (12.5B tokens; needs real GPUs)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hyperloop_lm.utils import UserError, closest


@dataclass(frozen=True)
class Scale:
    preset: str  # preset scale prefix: micro | tiny | small | 240m
    train: dict[str, Any]  # TrainConfig fields shared by every cell


SCALES: dict[str, Scale] = {
    "micro": Scale("micro", dict(corpus="english-mix", vocab_size=512, seq_len=64, batch_size=8, tokens=8 * 64 * 12,
                                 lr=3e-3, warmup_steps=2, eval_tokens=4096, eval_every=0, ckpt_every=0)),
    "cpu-tiny": Scale("tiny", dict(corpus="english-mix", vocab_size=4096, seq_len=256, batch_size=16,
                                   tokens=2_000_000, lr=2e-3, warmup_steps=25, eval_tokens=100_000, eval_every=100,
                                   ckpt_every=50)),
    # 5x fewer tokens than cpu-tiny but a 4x smaller batch, so nearly as many optimizer steps (390 vs 488):
    # a cheap budget still gets past the first rapid drop of the loss, where only the learning speed shows.
    "cpu-quick": Scale("tiny", dict(corpus="english-mix", vocab_size=4096, seq_len=256, batch_size=4,
                                    tokens=400_000, lr=2e-3, warmup_steps=25, eval_tokens=50_000, eval_every=100,
                                    ckpt_every=50)),
    "cpu-small": Scale("small", dict(corpus="english-mix", vocab_size=8192, seq_len=256, batch_size=16,
                                     tokens=5_000_000, lr=1e-3, warmup_steps=50, eval_tokens=200_000, eval_every=200,
                                     ckpt_every=100)),
    "gpu-small": Scale("gpu-small", dict(corpus="english-large", vocab_size=8192, seq_len=1024, batch_size=64,
                                         tokens=500_000_000, lr=1e-3, warmup_steps=500, eval_tokens=2_000_000,
                                         eval_every=1000, ckpt_every=1000, compile=True)),
    "paper-240m": Scale("240m", dict(corpus="english-large", tokenizer="llama2", seq_len=2048, batch_size=256,
                                     tokens=12_500_000_000, lr=4e-4, warmup_steps=1000, eval_tokens=50_000_000,
                                     eval_every=2000, ckpt_every=1000, compile=True)),
}


@dataclass(frozen=True)
class Cell:
    name: str
    family: str  # preset family: transformer | mhc | looped | hyperloop
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    post: tuple[str, ...] = ()  # post-training measurements: int4, loops, analysis, zeroshot


# Hyperloop started as the Looped model: read the stream mean, write only the block's update, keep the
# stream (res ~ 1). With the spec's b = 0 each loop instead writes the block's whole output (its input
# included) onto half of the stream, so the stream grows ~2.5x per loop at init. The paper is silent on
# these inits, so both are readings of it.
LOOPED_INIT = dict(hc_pre_bias_init="logit_inv_n", hc_block_output="delta", hc_res_init=0.99)


def _schedule(begin: int, middle: int, loops: int, end: int) -> dict[str, Any]:
    return dict(n_begin=begin, n_middle=middle, loops=loops, n_end=end, depth=begin + middle * loops + end)


def cells(suite: str, preset_scale: str) -> list[Cell]:
    """The cells of a suite. Ablations are defined relative to the scale's hyperloop preset."""
    from hyperloop_lm.config import get_preset

    if suite == "table1":
        post = ("int4", "zeroshot", "analysis")
        return [Cell(f, f, post=post) for f in ("transformer", "mhc", "looped", "hyperloop")] + \
               [Cell("hyperloop_looped_init", "hyperloop", LOOPED_INIT, post=post)]
    base = get_preset(f"{preset_scale}-hyperloop")
    b, m, e, L = base.n_begin, base.n_middle, base.n_end, base.loops
    unrolled_mid = m * L
    if suite == "ablations":
        out = [Cell("hyperloop", "hyperloop"), Cell("transformer", "transformer"), Cell("looped", "looped")]
        # Table 3: fixed unrolled depth, a smaller middle block looped more
        for mm in sorted((d for d in range(1, m) if unrolled_mid % d == 0), reverse=True):
            out.append(Cell(f"middle{mm}x{unrolled_mid // mm}", "hyperloop", _schedule(b, mm, unrolled_mid // mm, e)))
        # Table 4: streams
        out += [Cell(f"streams{n}", "hyperloop", dict(n_streams=n)) for n in (1, 2, 8) if n != base.n_streams]
        # Table 5: HC placement inside the loop (every k unrolled middle layers) vs once per loop
        out += [Cell(f"hc_every{k}", "hyperloop", dict(hc_every=k)) for k in range(1, unrolled_mid + 1)
                if unrolled_mid % k == 0 and k != m]
        # Table 6: H_res
        out += [Cell(f"hres_{k}", "hyperloop", dict(h_res=k)) for k in ("sinkhorn", "identity")]
        # the spec's open init choice: b_pre = 0 reads 2x the stream at n=4; logit(1/n) reads their mean
        out.append(Cell("pre_bias_inv_n", "hyperloop", dict(hc_pre_bias_init="logit_inv_n")))
        out.append(Cell("looped_init", "hyperloop", LOOPED_INIT))
        # Table 7: per-loop LoRA on the Looped model
        out += [Cell(f"looped_lora{r}", "looped", dict(lora_rank=r)) for r in (4, 16)]
        # the referee's: begin/middle/end vs uniform looping of the whole stack at equal depth and params
        uniform = dict(**_schedule(0, b + m + e, base.unrolled_depth // (b + m + e), 0))
        if uniform["depth"] == base.unrolled_depth:
            out += [Cell("uniform_hyperloop", "hyperloop", uniform), Cell("uniform_looped", "looped", uniform)]
        return out
    if suite == "loops":
        return [Cell(f"loops{l}", "hyperloop", _schedule(b, m, l, e), post=("loops",)) for l in (2, 3, 4, 5, 6)] + \
               [Cell(f"looped_loops{l}", "looped", _schedule(b, m, l, e), post=("loops",)) for l in (2, 3, 4, 5, 6)]
    if suite == "recipes":
        out = []
        for fam in ("transformer", "hyperloop"):
            out.append(Cell(f"{fam}_pytorch_lr4e-4", fam, train=dict(recipe="pytorch", lr=4e-4)))
            out += [Cell(f"{fam}_gpt2_lr{lr:g}", fam, train=dict(recipe="gpt2", lr=lr)) for lr in (8e-4, 1.6e-3, 3.2e-3)]
        return out
    if suite == "optimizers":  # spec 8: AdamW vs GaLore vs its one-sided-LoRA dual, rank d/4
        out = []
        for fam in ("transformer", "hyperloop"):
            out.append(Cell(f"{fam}_adamw", fam, train=dict(optimizer="adamw")))
            for opt in ("galore", "onesided-lora"):
                out += [Cell(f"{fam}_{opt}_{proj}", fam, train=dict(optimizer=opt, proj=proj)) for proj in ("svd", "random")]
        return out
    if suite == "analysis":
        return [Cell(f, f, post=("analysis",)) for f in ("looped", "hyperloop")]
    raise UserError(f"unknown suite '{suite}'{closest(suite, SUITES)}; choose from {', '.join(SUITES)}")


SUITES = ("table1", "ablations", "loops", "recipes", "analysis", "optimizers")
