"""`make demo`: build the four families at the tiny preset, print their accounting, run a step each."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from hyperloop_lm.config import FAMILIES, get_preset
from hyperloop_lm.model.accounting import summary
from hyperloop_lm.model.lm import LM


def main() -> None:
    from hyperloop_lm.cli import format_info

    names = [f"tiny-{f}" for f in FAMILIES]
    print(format_info({n: summary(get_preset(n)) for n in names}))
    torch.manual_seed(0)
    for name in names:
        model = LM(get_preset(name))
        idx = torch.randint(0, model.cfg.vocab_size, (4, 128))
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        print(f"{name:18s} forward+backward on random tokens: loss {loss.item():.3f} "
              f"(ln V = {torch.tensor(float(model.cfg.vocab_size)).log().item():.3f}) in {time.perf_counter() - t0:.2f}s")
