"""Hugging Face wrapper: same logits as the native LM, generate() through transformers equals native
greedy decoding (padded batches too), the library cache has one layer per virtual layer, and
save_pretrained -> from_pretrained (and the checkpoint converter) round-trip."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from hyperloop_lm.config import FAMILIES  # noqa: E402
from hyperloop_lm.infer.generate import generate  # noqa: E402
from hyperloop_lm.infer.hf import HyperloopConfig, HyperloopForCausalLM, to_hf  # noqa: E402
from hyperloop_lm.train.checkpoint import load_model  # noqa: E402

PROMPTS = [[5, 17, 9, 33, 2, 41, 8], [12, 3], [7, 7, 100, 250]]


def padded(prompts, pad_id):
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    return ids, mask


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.fixture(scope="module")
def native(trained_runs):
    return {f: load_model(trained_runs[f])[:2] for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_logits_and_generate_equal_native(native, family):
    model, tok = native[family]
    hf = HyperloopForCausalLM.from_native(model, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    assert hf.lm is model and hf.config.num_hidden_layers == model.depth()
    ids, mask = padded(PROMPTS, tok.eos_id)
    assert_close(hf(ids, attention_mask=mask, use_cache=False).logits, model(ids, attention_mask=mask), atol=0, rtol=0)

    ref = generate(model, PROMPTS, 10, eos_id=tok.eos_id).tokens
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                      return_dict_in_generate=True)
    assert [until_eos(r, tok.eos_id) for r in out.sequences[:, ids.shape[1]:].tolist()] == ref
    # the library's own cache, one layer per virtual (unrolled) layer
    assert isinstance(out.past_key_values, DynamicCache) and len(out.past_key_values.layers) == model.depth()


def test_static_cache_and_loop_override_through_generate(native):
    model, tok = native["hyperloop"]
    ids, mask = padded(PROMPTS, tok.eos_id)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_id)
    hf = HyperloopForCausalLM.from_native(model)
    ref = generate(model, PROMPTS, 6).tokens
    assert hf.generate(**kw, cache_implementation="static")[:, ids.shape[1]:].tolist() == ref

    deep = HyperloopForCausalLM.from_native(model, inference_loops=4)
    assert deep.config.num_hidden_layers == model.depth(4) > model.depth()
    out = deep.generate(**kw, return_dict_in_generate=True)
    assert out.sequences[:, ids.shape[1]:].tolist() == generate(model, PROMPTS, 6, loops=4).tokens
    assert len(out.past_key_values.layers) == model.depth(4)


def test_save_pretrained_round_trips(native, tmp_path):
    model, _ = native["mhc"]
    hf = HyperloopForCausalLM.from_native(model)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(back, HyperloopForCausalLM) and isinstance(back.config, HyperloopConfig)
    assert back.config.to_model_config() == model.cfg
    ids, mask = padded(PROMPTS, 0)
    assert_close(back(ids, attention_mask=mask).logits, model(ids, attention_mask=mask), atol=0, rtol=0)


def test_converted_checkpoint_works_with_auto_classes(trained_runs, native, tmp_path):
    model, tok = native["hyperloop"]
    out = to_hf(trained_runs["hyperloop"], tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    texts = ["The king said", "A"]
    assert hf_tok(texts[0])["input_ids"] == tok.encode(texts[0])
    batch = hf_tok(texts, return_tensors="pt", padding=True)  # left padding, pad = EOS
    gen = hf.generate(**batch, max_new_tokens=8, do_sample=False)  # eos/pad come from generation_config.json
    ref = generate(model, [tok.encode(t) for t in texts], 8, eos_id=tok.eos_id).tokens
    assert [until_eos(r, tok.eos_id) for r in gen[:, batch["input_ids"].shape[1]:].tolist()] == ref
