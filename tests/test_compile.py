"""`LM.compile_blocks` (train --compile true) computes what eager mode computes, for every family.

Slow: inductor compiles C++ kernels on CPU (tens of seconds per family)."""
import pytest
import torch
import torch.nn.functional as F

from hyperloop_lm.config import FAMILIES, get_preset
from hyperloop_lm.model.lm import LM


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_blocks_match_eager_loss_and_gradients(family):
    torch.manual_seed(0)
    eager = LM(get_preset(f"micro-{family}"))
    with torch.no_grad():  # non-trivial HC coefficients, so the gates and mixing matter
        for name, p in eager.named_parameters():
            if "hc" in name or "loop_embed" in name:
                p.add_(torch.randn_like(p) * 0.3)
    compiled = LM(eager.cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    x = torch.randint(0, eager.cfg.vocab_size, (2, 32))
    losses = []
    for model in (eager, compiled):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
