"""Text in, text out: hyperloop_lm.load(...).generate(...) and the `generate` CLI verb."""
from __future__ import annotations

import pytest

import hyperloop_lm
from hyperloop_lm.cli import main
from hyperloop_lm.infer.generate import generate
from hyperloop_lm.utils import UserError


@pytest.fixture(scope="module")
def gen(trained_runs):
    return hyperloop_lm.load(trained_runs["hyperloop"])


def test_load_generate_matches_token_level_generate(gen):
    texts = ["The king said", "A"]
    out = gen.generate(texts, max_new_tokens=10)
    ids = generate(gen.model, [gen.tokenizer.encode(t) for t in texts], 10, eos_id=gen.tokenizer.eos_id).tokens
    assert out == [gen.tokenizer.decode([t for t in row if t != gen.tokenizer.eos_id]) for row in ids]
    assert gen.generate("The king said", max_new_tokens=10) == out[:1]  # batching does not change a row


def test_streamed_pieces_add_up_to_the_result(gen):
    pieces: list[str] = []
    out = gen.generate("The state of the", max_new_tokens=12, stream=pieces.append)
    assert "".join(pieces) == out[0] and len(pieces) > 1


def test_load_with_loop_override(gen, trained_runs):
    deeper = hyperloop_lm.load(trained_runs["hyperloop"], loops=4)
    assert deeper.loops == 4
    assert isinstance(deeper.generate("The king", max_new_tokens=4)[0], str)


def test_empty_text_is_a_clear_error(gen):
    with pytest.raises(UserError, match="empty"):
        gen.generate(["fine", ""], max_new_tokens=2)


def test_cli_generate_and_stream_agree(trained_runs, capsys):
    argv = ["generate", "--checkpoint", str(trained_runs["looped"]), "--prompt", "The king said",
            "--max-new-tokens", "8"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--stream"]) == 0
    assert capsys.readouterr().out == plain and plain.startswith("The king said")


def test_cli_generate_errors_are_one_line(trained_runs, capsys):
    assert main(["generate", "--checkpoint", str(trained_runs["looped"]), "--prompt", "x",
                 "--max-new-tokens", "5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exceeds the model's context" in err and len(err.splitlines()) == 1


def test_quantized_checkpoint_loads_and_generates(trained_runs, tmp_path, capsys):
    checkpoint = pytest.importorskip("hyperloop_lm.quant.checkpoint")
    from hyperloop_lm.quant.driver import quantize_model
    from hyperloop_lm.train.checkpoint import load_model

    model, tok, meta = load_model(trained_runs["hyperloop"])
    result = quantize_model(model, "rtn", bits=4, group_size=32)
    out = checkpoint.save_quantized(tmp_path / "int4", model, {**meta, "quantization": result.meta()}, tok)
    gen = hyperloop_lm.load(out)
    assert any(type(m).__name__ == "QuantizedLinear" for m in gen.model.modules())
    ids = [tok.encode("The king said"), tok.encode("A")]
    cached = generate(gen.model, ids, 8, output_logits=True)
    full = generate(gen.model, ids, 8, use_cache=False, output_logits=True)
    assert cached.tokens == full.tokens
    assert (cached.logits - full.logits).abs().max() < 1e-5
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The king", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The king")
