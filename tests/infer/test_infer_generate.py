"""Native generation: the KV cache (keyed by virtual layer) is exact, batches are left-padded
correctly, the loop override sizes the cache to the unrolled depth, bad requests are clear errors."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hyperloop_lm import LM, get_preset
from hyperloop_lm.config import FAMILIES
from hyperloop_lm.infer.generate import generate, sample
from hyperloop_lm.train.checkpoint import load_model
from hyperloop_lm.utils import UserError

PROMPTS = [[5, 17, 9, 33, 2, 41, 8], [12, 3], [7, 7, 100, 250]]  # different lengths: rows 1 and 2 are padded


@pytest.fixture(scope="module")
def models(trained_runs):
    return {f: load_model(trained_runs[f])[0] for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_full_recompute_with_padded_batch(models, family):
    model = models[family]
    cached = generate(model, PROMPTS, 12, output_logits=True)
    full = generate(model, PROMPTS, 12, use_cache=False, output_logits=True)
    assert cached.tokens == full.tokens
    assert all(len(t) == 12 for t in cached.tokens)
    assert_close(cached.logits, full.logits, atol=1e-5, rtol=1e-5)
    # each padded row gets exactly the logits of its own unpadded sequence through one full forward
    for i, prompt in enumerate(PROMPTS):
        seq = torch.tensor([prompt + cached.tokens[i][:-1]])
        ref = model(seq)[0, len(prompt) - 1:]  # (12, V): the positions that predicted each new token
        assert_close(cached.logits[i], ref, atol=1e-5, rtol=1e-5)


def test_cache_is_preallocated_over_the_unrolled_depth(models):
    model = models["hyperloop"]
    out = generate(model, PROMPTS, 4)
    cfg = model.cfg
    assert out.cache.k.shape == (cfg.unrolled_depth, len(PROMPTS), cfg.n_heads, 7 + 4, cfg.head_dim)
    assert out.cache.pos == 7 + 3  # prefill + 3 single-token steps (the 4th token is sampled, not fed)


def test_loop_override_generates_with_a_deeper_cache(models):
    model = models["hyperloop"]
    cfg = model.cfg
    out = generate(model, PROMPTS, 6, loops=4, output_logits=True)
    assert out.cache.k.shape[0] == model.depth(4) == cfg.n_begin + 4 * cfg.n_middle + cfg.n_end
    full = generate(model, PROMPTS, 6, loops=4, use_cache=False, output_logits=True)
    assert out.tokens == full.tokens
    assert_close(out.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits, generate(model, PROMPTS, 6, output_logits=True).logits)


def test_eos_stops_each_row_independently(models):
    model = models["looped"]
    free = generate(model, PROMPTS, 8).tokens
    eos = free[0][2]  # row 0 produces this id at step 3
    out = generate(model, PROMPTS, 8, eos_id=eos).tokens
    for row, ref in zip(out, free):
        stop = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row == ref[:stop]
    assert len(out[0]) <= 3


def test_stream_reports_every_kept_token(models):
    seen: list[tuple[int, int]] = []
    out = generate(models["transformer"], PROMPTS, 5, stream=lambda row, tok: seen.append((row, tok)))
    for row in range(len(PROMPTS)):
        assert [t for r, t in seen if r == row] == out.tokens[row]


def test_sampling_is_seeded_and_limits_reduce_to_greedy(models):
    model = models["hyperloop"]
    kw = dict(temperature=1.0, top_k=50, top_p=0.9)
    a, b = (generate(model, PROMPTS, 8, seed=3, **kw).tokens for _ in range(2))
    assert a == b
    greedy = generate(model, PROMPTS, 8).tokens
    assert generate(model, PROMPTS, 8, temperature=0.7, top_k=1, seed=0).tokens == greedy
    assert generate(model, PROMPTS, 8, temperature=0.7, top_p=1e-6, seed=0).tokens == greedy


def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps ids 0 and 1
    assert p[:1].sum() < 0.8 <= p[:2].sum()
    assert set(sample(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert len(set(sample(logits, 1.0, generator=g).tolist())) == 5


def test_quantized_linears_generate_through_the_same_cache(models):
    from hyperloop_lm.quant import QuantizedLinear, quantize_rtn

    model = LM(models["hyperloop"].cfg).eval()
    model.load_state_dict(models["hyperloop"].state_dict())
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(mod, child_name, QuantizedLinear.from_codes(quantize_rtn(child.weight, 4, 32)))
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    cached = generate(model, PROMPTS, 6, output_logits=True)
    full = generate(model, PROMPTS, 6, use_cache=False, output_logits=True)
    assert cached.tokens == full.tokens
    assert_close(cached.logits, full.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompts,kw,message", [
    ([[1, 2], [3, 512]], {}, "token ids must lie in"),
    ([[1, 2], [-1]], {}, "token ids must lie in"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([], {}, "non-empty list"),
    ([[1] * 60], {"max_new_tokens": 5}, "exceeds the model's context of 64"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ([[1, 2]], {"temperature": -1.0}, "temperature must be >= 0"),
    ([[1, 2]], {"top_p": 0.0, "temperature": 1.0}, "top_p must lie in"),
    ([[1, 2]], {"loops": 0}, "loops must be a positive integer"),
])
def test_bad_requests_are_clear_errors(prompts, kw, message):
    model = LM(get_preset("micro-hyperloop"))  # vocab 512, context 64
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(UserError, match=message):
        generate(model, prompts, **kw)


def test_loops_on_an_unlooped_model_is_an_error():
    with pytest.raises(UserError, match="needs a looped middle block"):
        generate(LM(get_preset("micro-transformer")), [[1, 2]], 2, loops=3)
