"""ONNX export: onnxruntime reproduces PyTorch's logits (prefill, then a decode step fed with the
graph's own present K/V) for every family, with left padding, and the CLI verb writes + checks it."""
from __future__ import annotations

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import onnx  # noqa: E402

from hyperloop_lm import LM, get_preset  # noqa: E402
from hyperloop_lm.cli import main  # noqa: E402
from hyperloop_lm.config import FAMILIES  # noqa: E402
from hyperloop_lm.infer.onnx_export import export_onnx, io_names, verify_onnx  # noqa: E402
from hyperloop_lm.utils import UserError  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_logits_match_pytorch_with_past_kv(family, tmp_path):
    torch.manual_seed(0)
    model = LM(get_preset(f"micro-{family}")).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    depth = model.depth()
    assert ([i.name for i in graph.input], [o.name for o in graph.output]) == io_names(depth)
    assert verify_onnx(path, model) < 1e-4  # rows of different padding, batch 3 (export example: 2)


def test_onnx_loop_override_without_attention_mask(tmp_path):
    torch.manual_seed(0)
    model = LM(get_preset("micro-hyperloop")).eval()
    path = export_onnx(model, tmp_path / "m.onnx", loops=4, with_attention_mask=False)
    names = [i.name for i in onnx.load(str(path)).graph.input]
    assert "attention_mask" not in names and f"past_k_{model.depth(4) - 1}" in names
    assert verify_onnx(path, model, loops=4, with_attention_mask=False) < 1e-4


def test_export_rejects_quantized_models(tmp_path):
    from hyperloop_lm.quant import QuantizedLinear, quantize_rtn

    model = LM(get_preset("micro-transformer"))
    model.head = QuantizedLinear.from_codes(quantize_rtn(model.head.weight, 4, 32))
    with pytest.raises(UserError, match="quantized"):
        export_onnx(model, tmp_path / "m.onnx")


def test_cli_export_onnx_and_hf(trained_runs, tmp_path, capsys):
    run = str(trained_runs["hyperloop"])
    assert main(["export", "--checkpoint", run, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and (tmp_path / "m.onnx").is_file()
    pytest.importorskip("transformers")
    assert main(["export", "--checkpoint", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
