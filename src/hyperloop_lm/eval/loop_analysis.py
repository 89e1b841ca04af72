"""What loops do: cross-loop similarity of the same layer (paper Table 8) and a logit lens over
the unrolled depth (paper Fig. 4), both from one traced forward pass (LM.forward(trace=...))."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from hyperloop_lm.model.lm import LM


@torch.no_grad()
def analyze(model: LM, x: torch.Tensor, y: torch.Tensor) -> dict:
    """x, y: (B, T) inputs and next-token targets.

    cross_loop_cosine["l-l'"]: mean over middle layers and tokens of cos(h_j at loop l, h_j at loop l').
    logit_lens: per virtual layer, the loss of reading that layer's hidden state with the final norm +
    head (for Hyperloop inside a loop that is the middle block's internal state; `streams` rows give
    the stream mean after each HC site).
    """
    model.eval()
    trace: list = []
    model(x, trace=trace)
    cfg = model.cfg
    per_loop: dict[int, list[torch.Tensor]] = {}
    for stage, vlayer, loop, h in trace:
        if stage == "middle":
            per_loop.setdefault(loop, []).append(h)
    cosine = {}
    for a, b in itertools.combinations(sorted(per_loop), 2):
        sims = [F.cosine_similarity(ha.flatten(0, -2).float(), hb.flatten(0, -2).float(), dim=-1).mean().item()
                for ha, hb in zip(per_loop[a], per_loop[b])]
        cosine[f"{a}-{b}"] = sum(sims) / len(sims)

    def lens_loss(h: torch.Tensor) -> float:
        if h.dim() == 4:  # (B, T, n, C) stream state: read the mean, as the model's collapse does
            h = h.mean(-2)
        logits = model.head(model.norm(h))
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()

    lens = [{"stage": s, "index": v, "loop": l, "loss": lens_loss(h)} for s, v, l, h in trace]
    return {"cross_loop_cosine": cosine, "logit_lens": lens, "family": cfg.family, "loops": cfg.loops,
            "final_loss": F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item(), "ln_vocab": math.log(cfg.vocab_size)}
