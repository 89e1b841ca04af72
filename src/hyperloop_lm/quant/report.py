"""Quantize a checkpoint end to end and measure what it cost: the `hyperloop-lm quantize` pipeline.

    report = quantize_checkpoint("runs/tiny-hyperloop", "runs/tiny-hyperloop-int4", method="gptq")
    print(report_markdown([report]))

One report (a flat JSON dict) per quantized model: held-out perplexity before/after, bytes on disk
(model.safetensors of the source vs the quantized checkpoint), bytes of weights in memory (every
parameter and persistent buffer), and the wall time of the quantization itself (calibration
forwards + GPTQ; not loading, evaluation or saving). `report_markdown` turns several reports into the
table used in the README; `python -m hyperloop_lm.quant.report reports/quant/*.json` prints it.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from hyperloop_lm.utils import UserError, atomic_write_text
from hyperloop_lm.utils_format import fmt_bytes, markdown_table


def quantize_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    quantize_embeddings: bool = False,
    calib_seqs: int = 128,
    calib_len: int | None = None,
    calib_seed: int = 0,
    eval_tokens: int = 100_000,
    batch_size: int = 16,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load `checkpoint`, evaluate it, quantize it, save to `out`, reload from disk, evaluate again.

    Calibration: `calib_seqs` windows of `calib_len` tokens (default: the training sequence length)
    at seeded random offsets of the checkpoint's corpus train split. Evaluation: the first
    `eval_tokens` tokens of the held-out split (0 skips it). The "after" numbers come from the model
    re-loaded from `out`, so they measure what a user of the file gets.
    """
    from hyperloop_lm.data import build_shards, load_corpus
    from hyperloop_lm.eval.perplexity import evaluate
    from hyperloop_lm.quant.checkpoint import checkpoint_bytes, is_quantized, load_quantized, save_quantized
    from hyperloop_lm.quant.driver import calibration_tokens, quantize_model, state_bytes
    from hyperloop_lm.train.checkpoint import load_model, read_meta, resolve

    say = log or (lambda s: None)
    src = resolve(checkpoint)
    if is_quantized(read_meta(src)):
        raise UserError(f"{src} is already a quantized checkpoint; quantize the fp32 checkpoint it came from")
    model, tok, meta = load_model(src, device)
    if tok is None:
        raise UserError(f"{src} has no tokenizer.json; cannot build calibration and held-out data")
    corpus = load_corpus(meta["train"]["corpus"])
    seq_len = meta["train"]["seq_len"]
    calib_len = calib_len or seq_len
    if calib_len > model.cfg.max_seq_len:
        raise UserError(f"--calib-len {calib_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    val = build_shards(corpus, tok, splits=("val",))["val"] if eval_tokens else None

    def ppl(m) -> dict[str, float] | None:
        return evaluate(m, val, seq_len, batch_size, eval_tokens) if val is not None else None

    before = ppl(model)
    if before:
        say(f"fp32: ppl {before['ppl']:.3f} on {before['tokens']:,} held-out tokens")
    calib = None
    if method == "gptq":
        train_tokens = build_shards(corpus, tok, splits=("train",))["train"].tokens
        calib = calibration_tokens(train_tokens, calib_seqs, calib_len, calib_seed)
    mem_before = state_bytes(model)
    result = quantize_model(model, method, bits, group_size, calib, sym=sym, act_order=act_order, damp=damp,
                            quantize_embeddings=quantize_embeddings, log=say)
    say(f"quantized {len(result.order)} layers in {result.seconds:.1f}s")
    qmeta = {**result.meta(), "calib_seqs": calib_seqs if calib is not None else 0,
             "calib_len": calib_len if calib is not None else 0, "calib_seed": calib_seed}
    out = save_quantized(out, model, {**meta, "source": str(src), "quantization": qmeta}, tokenizer=tok)
    del model
    qmodel, _, _ = load_quantized(out, device)
    after = ppl(qmodel)
    disk_before, disk_after = checkpoint_bytes(src)["weights"], checkpoint_bytes(out)["weights"]
    report = {
        "model": meta["model"].get("name", "?"), "checkpoint": str(src), "out": str(out), "corpus": corpus.name,
        "method": method, "bits": bits, "group_size": group_size, "sym": sym, "act_order": act_order,
        "damp": damp, "quantize_embeddings": quantize_embeddings, "calib_seqs": qmeta["calib_seqs"],
        "calib_len": qmeta["calib_len"], "calib_seed": calib_seed, "quantized_layers": len(result.order),
        "quant_seconds": round(result.seconds, 3),
        "disk_bytes_before": disk_before, "disk_bytes_after": disk_after,
        "disk_ratio": round(disk_after / disk_before, 4),
        "mem_bytes_before": mem_before, "mem_bytes_after": state_bytes(qmodel),
    }
    if before and after:
        report.update(eval_tokens=before["tokens"], loss_before=before["loss"], loss_after=after["loss"],
                      ppl_before=before["ppl"], ppl_after=after["ppl"], ppl_delta=after["ppl"] - before["ppl"],
                      bpb_before=before["bpb"], bpb_after=after["bpb"])
    return report


def report_name(r: dict[str, Any]) -> str:
    """File stem for a report: MODEL-METHOD-intBITS-gGROUP[-emb]."""
    emb = "-emb" if r["quantize_embeddings"] else ""
    return f"{r['model']}-{r['method']}-int{r['bits']}-g{r['group_size']}{emb}"


def write_report(report: dict[str, Any], directory: str | Path, stem: str | None = None) -> Path:
    """DIR/STEM.json and DIR/STEM.md (a one-row table), atomically; returns the JSON path."""
    directory = Path(directory)
    stem = stem or report_name(report)
    atomic_write_text(directory / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(directory / f"{stem}.md", report_markdown([report]) + "\n")
    return directory / f"{stem}.json"


def _f(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report_markdown(reports: Sequence[dict[str, Any]]) -> str:
    """One row per report: model, method, bits, group, embeddings, ppl before/after/delta, sizes, time."""
    header = ["model", "method", "bits", "group", "emb+head", "ppl fp32", "ppl quant", "Δ ppl", "Δ %",
              "disk fp32", "disk quant", "ratio", "mem quant", "time"]
    rows = []
    for r in reports:
        b, a = r.get("ppl_before"), r.get("ppl_after")
        rows.append([
            r["model"], r["method"].upper() + (" +act-order" if r.get("act_order") else ""), r["bits"],
            r["group_size"], "quantized" if r["quantize_embeddings"] else "fp32", _f(b, ".3f"), _f(a, ".3f"),
            _f(r.get("ppl_delta"), "+.3f"), _f(100 * (a / b - 1) if a and b else None, "+.2f"),
            fmt_bytes(r["disk_bytes_before"]), fmt_bytes(r["disk_bytes_after"]), _f(r["disk_ratio"], ".3f"),
            fmt_bytes(r["mem_bytes_after"]), f"{r['quant_seconds']:.1f}s",
        ])
    return markdown_table(header, rows)


def load_reports(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{p} is not a readable quantization report ({e})") from None
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m hyperloop_lm.quant.report A.json B.json ...`: the multi-model markdown table."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m hyperloop_lm.quant.report REPORT.json [...]", file=sys.stderr)
        return 2
    print(report_markdown(load_reports(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
