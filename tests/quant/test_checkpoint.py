"""Quantized checkpoints: round trip, size, all families, clear errors; the quantize CLI and reports."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperloop_lm.config import FAMILIES
from hyperloop_lm.quant import QuantizedEmbedding, QuantizedLinear
from hyperloop_lm.quant.checkpoint import checkpoint_bytes, load_any, load_quantized, save_quantized
from hyperloop_lm.quant.driver import calibration_tokens, quantize_model, state_bytes
from hyperloop_lm.quant.report import main as report_main
from hyperloop_lm.quant.report import report_markdown
from hyperloop_lm.train.checkpoint import load_model, resolve
from hyperloop_lm.utils import UserError


def data_for(meta, tok):
    from hyperloop_lm.data import build_shards, load_corpus

    return build_shards(load_corpus(meta["train"]["corpus"]), tok, splits=("train", "val"))


def quantize_run(run, tmp_path, method="gptq", bits=4, group_size=128, **kw):
    """Load a trained run, quantize it in memory, save it: (in-memory model, out dir, fp32 meta, shards)."""
    model, tok, meta = load_model(run)
    shards = data_for(meta, tok)
    calib = calibration_tokens(shards["train"].tokens, 16, 32, seed=0)
    res = quantize_model(model, method, bits, group_size, calib, **kw)
    out = save_quantized(tmp_path / f"q-{method}", model, {**meta, "quantization": res.meta()}, tokenizer=tok)
    return model, out, meta, shards


def test_round_trip_same_perplexity_and_logits(trained_runs, cache_env, tmp_path):
    from hyperloop_lm.eval.perplexity import evaluate

    q, out, meta, shards = quantize_run(trained_runs["hyperloop"], tmp_path, act_order=True,
                                        quantize_embeddings=True)
    loaded, tok, qmeta = load_quantized(out)
    assert tok is not None and qmeta["quantization"]["method"] == "gptq"
    assert isinstance(loaded.embed, QuantizedEmbedding) and isinstance(loaded.middle[0].attn.wqkv, QuantizedLinear)
    assert loaded.middle[0].attn.wqkv.perm is not None  # act-order permutation survived
    ppl_mem = evaluate(q, shards["val"], 32, 16, 4096)
    ppl_disk = evaluate(loaded, shards["val"], 32, 16, 4096)
    assert ppl_disk["loss"] == ppl_mem["loss"]  # same buffers, same ops: bit-identical
    x = torch.randint(0, q.cfg.vocab_size, (2, 20))
    assert torch.equal(loaded(x), q(x))


def test_quantized_model_generates_with_kv_cache(trained_runs, cache_env, tmp_path):
    """Generation on the loaded quantized model: cached decoding (ragged prompts, left padding) gives the
    same greedy tokens as recomputing the whole sequence each step."""
    from hyperloop_lm.infer.generate import generate

    _, out, _, _ = quantize_run(trained_runs["hyperloop"], tmp_path, quantize_embeddings=True)
    model, tok, _ = load_quantized(out)
    prompts = [tok.encode("The state of the"), tok.encode("Peace")]
    cached = generate(model, prompts, 8, use_cache=True, output_logits=True)
    full = generate(model, prompts, 8, use_cache=False, output_logits=True)
    assert cached.tokens == full.tokens and all(len(t) == 8 for t in cached.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-4, atol=1e-4)


def test_int4_checkpoint_is_under_0_3x_fp32(trained_runs, cache_env, tmp_path):
    """Measured on the micro transformer (d=64, vocab 300, 4 layers, all 4-bit with one group per row):
    138 KB vs 961 KB on disk (0.143x), 0.138x in memory; 270 KB (0.28x) with embedding/head kept fp32."""
    run = trained_runs["transformer"]
    fp32, _, _ = load_model(run)
    q, out, _, _ = quantize_run(run, tmp_path, method="rtn", quantize_embeddings=True)
    ratio = checkpoint_bytes(out)["weights"] / checkpoint_bytes(resolve(run))["weights"]
    assert ratio <= 0.3, ratio
    assert state_bytes(q) <= 0.3 * state_bytes(fp32)
    # keeping embeddings/head in fp32 costs a lot at this size: the matrices no longer dominate
    _, out_kept, _, _ = quantize_run(run, tmp_path / "kept", method="rtn")
    assert checkpoint_bytes(out_kept)["weights"] > checkpoint_bytes(out)["weights"] * 1.5


@pytest.mark.parametrize("family", FAMILIES)
def test_all_families_quantize_save_load(family, trained_runs, cache_env, tmp_path):
    q, out, meta, _ = quantize_run(trained_runs[family], tmp_path, quantize_embeddings=family == "mhc")
    loaded, _, _ = load_any(out)
    fp32, _, _ = load_any(trained_runs[family])  # the same entry point still loads fp32 checkpoints
    x = torch.randint(0, loaded.cfg.vocab_size, (2, 16))
    logits = loaded(x)
    assert logits.shape == (2, 16, loaded.cfg.vocab_size) and torch.isfinite(logits).all()
    assert torch.equal(logits, q(x))
    n_linear = sum(isinstance(m, QuantizedLinear) and not isinstance(m, QuantizedEmbedding) for m in loaded.modules())
    c = loaded.cfg
    assert n_linear == 4 * (c.n_begin + c.n_middle + c.n_end) + (family == "mhc")
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.modules()) or family != "mhc"
    # the quantized model is close to, but not equal to, the fp32 one
    ref = fp32(x)
    assert 0 < (logits - ref).abs().max() < 0.5 * ref.abs().max()


# ------------------------------------------------------------------------------------- clear errors
@pytest.fixture
def saved(trained_runs, cache_env, tmp_path):
    _, out, _, _ = quantize_run(trained_runs["looped"], tmp_path, method="rtn", quantize_embeddings=True)
    return out


def edit_meta(path, fn):
    meta = json.loads((path / "meta.json").read_text())
    fn(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_bits_in_meta_that_do_not_match_the_buffers(saved):
    edit_meta(saved, lambda m: m["quantization"]["layers"]["begin.0.attn.wo"].update(bits=8))
    with pytest.raises(UserError, match=r"begin.0.attn.wo.qweight has shape .*bits=8.*disagree"):
        load_quantized(saved)


def test_missing_tensor_and_truncated_file(saved):
    weights = load_file(str(saved / "model.safetensors"))
    del weights["middle.0.mlp.down.scales"]
    save_file(weights, str(saved / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing \['middle.0.mlp.down.scales'\]"):
        load_quantized(saved)
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or unreadable"):
        load_quantized(saved)


def test_wrong_dtype_bad_zeros_unknown_layer_and_versions(saved, trained_runs):
    weights = load_file(str(saved / "model.safetensors"))
    good = dict(weights)
    weights["end.0.attn.wqkv.scales"] = weights["end.0.attn.wqkv.scales"].float()
    save_file(weights, str(saved / "model.safetensors"))
    with pytest.raises(UserError, match="torch.float32, expected torch.float16"):
        load_quantized(saved)
    weights = dict(good)
    weights["end.0.attn.wqkv.zeros"] = torch.full_like(good["end.0.attn.wqkv.zeros"], 200)
    save_file(weights, str(saved / "model.safetensors"))
    with pytest.raises(UserError, match="zeros exceeds 15"):
        load_quantized(saved)
    save_file(good, str(saved / "model.safetensors"))
    load_quantized(saved)  # intact again

    layers = json.loads((saved / "meta.json").read_text())["quantization"]["layers"]
    edit_meta(saved, lambda m: m["quantization"]["layers"].update({"begin.7.attn.wo": layers["begin.0.attn.wo"]}))
    with pytest.raises(UserError, match="begin.7.attn.wo does not exist"):
        load_quantized(saved)
    edit_meta(saved, lambda m: m["quantization"].update(format_version=99, layers=layers))
    with pytest.raises(UserError, match="quantized format 99"):
        load_quantized(saved)
    with pytest.raises(UserError, match="not a quantized checkpoint"):
        load_quantized(trained_runs["looped"])


def test_save_refuses_to_replace_an_unrelated_directory(tmp_path):
    from hyperloop_lm.config import get_preset
    from hyperloop_lm.model.lm import LM

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    model = LM(get_preset("micro-transformer"))
    res = quantize_model(model, "rtn", 4, 128)
    with pytest.raises(UserError, match="not a quantized checkpoint"):
        save_quantized(other, model, {"model": model.cfg.to_dict(), "quantization": res.meta()})
    assert (other / "notes.txt").read_text() == "keep me"
    out = save_quantized(tmp_path / "q", model, {"model": model.cfg.to_dict(), "quantization": res.meta()})
    save_quantized(out, model, {"model": model.cfg.to_dict(), "quantization": res.meta()})  # re-quantize: ok


# ------------------------------------------------------------------------------------- CLI and report
def test_quantize_cli_end_to_end(trained_runs, cache_env, tmp_path, capsys):
    from hyperloop_lm.cli import main

    run, out, reports = trained_runs["hyperloop"], tmp_path / "q", tmp_path / "reports"
    argv = ["quantize", "--checkpoint", str(run), "--out", str(out), "--method", "gptq", "--bits", "4",
            "--calib-seqs", "8", "--calib-len", "32", "--eval-tokens", "2048", "--quantize-embeddings",
            "--report", str(reports), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((reports / "micro-hyperloop-gptq-int4-g128-emb.json").read_text())
    assert printed == saved == json.loads((out / "quant_report.json").read_text())
    assert saved["ppl_before"] < saved["ppl_after"] < 1.2 * saved["ppl_before"]
    assert math.isclose(saved["ppl_delta"], saved["ppl_after"] - saved["ppl_before"])
    assert saved["disk_ratio"] < 0.3 and saved["mem_bytes_after"] < 0.3 * saved["mem_bytes_before"]
    assert saved["quantized_layers"] == 4 * 3 + 2 and saved["calib_seqs"] == 8 and saved["quant_seconds"] > 0
    # the output loads through the one entry point, and is not quantized twice
    assert isinstance(load_any(out)[0].head, QuantizedLinear)
    assert main(["quantize", "--checkpoint", str(out), "--out", str(tmp_path / "q2")]) == 2
    assert "already a quantized checkpoint" in capsys.readouterr().err

    rtn = {**saved, "method": "rtn", "ppl_after": saved["ppl_after"] + 1, "ppl_delta": saved["ppl_delta"] + 1}
    (reports / "rtn.json").write_text(json.dumps(rtn))
    table = report_markdown([saved, rtn])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()]
    assert len(rows) == 4 and [r[1] for r in rows[2:]] == ["GPTQ", "RTN"]
    assert rows[3][7] == f"{rtn['ppl_delta']:+.3f}"
    assert report_main([str(reports / "rtn.json"), str(reports / "micro-hyperloop-gptq-int4-g128-emb.json")]) == 0
    assert "micro-hyperloop" in capsys.readouterr().out
