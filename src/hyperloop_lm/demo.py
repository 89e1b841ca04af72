"""`make demo`: the main job end to end on the bundled corpus, in minutes on a laptop CPU.

1. fetch english-mix (State of the Union, Brown, Shakespeare, Moby Dick) and train a BPE tokenizer;
2. train a tiny Hyperloop and its depth-matched Transformer (same unrolled depth, width, tokens, seed);
3. evaluate both on the held-out split (perplexity, bits/byte) against the unigram baseline;
4. quantize both to INT4 (GPTQ, group 128) and measure the perplexity cost;
5. generate a short greedy sample from each;
6. print one comparison table (also written to OUT/demo.json and OUT/demo.md).

Everything is cached or resumable: a second run skips finished training.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hyperloop_lm.utils import atomic_write_text
from hyperloop_lm.utils_format import markdown_table

FAMILIES = ("hyperloop", "transformer")
PROMPT = "The President of the United States"


def demo_config(family: str, out: Path, tokens: int, **kw: Any):
    from hyperloop_lm.train.config import TrainConfig

    return TrainConfig(model=f"tiny-{family}", corpus="english-mix", vocab_size=4096, seq_len=256, batch_size=16,
                       tokens=tokens, lr=2e-3, warmup_steps=20, eval_every=0, eval_tokens=100_000, ckpt_every=50,
                       log_every=10, out_dir=str(out / f"demo-{family}"), **kw)


def main(out: str = "runs", tokens: int = 600_000, quantize: bool = True, generate: bool = True) -> dict[str, Any]:
    from hyperloop_lm.data import prepare_data
    from hyperloop_lm.eval.perplexity import unigram_loss
    from hyperloop_lm.train.trainer import train

    t0, out_dir = time.perf_counter(), Path(out)
    print("== data: english-mix corpus + 4096-token BPE (cached after the first run)")
    data = prepare_data("english-mix", tokenizer="bpe", vocab_size=4096)
    print(f"   train {data.train.n_tokens:,} tokens, held-out {data.val.n_tokens:,} tokens "
          f"({data.val.bytes_per_token:.2f} bytes/token)")
    unigram = unigram_loss(data.train, data.val, data.tokenizer.vocab_size, max_tokens=100_000)

    rows: dict[str, dict[str, Any]] = {}
    for family in FAMILIES:
        print(f"== train tiny-{family}: {tokens:,} tokens")
        summary = train(demo_config(family, out_dir, tokens))
        rows[family] = {"summary": summary, "run": out_dir / f"demo-{family}"}

    for family, row in rows.items():
        if quantize:
            row["int4"] = _quantize(row["run"], out_dir / f"demo-{family}-int4")
        if generate:
            row["sample"] = _sample(row["run"])

    result = _table(rows, unigram, data)
    result["wall_s"] = time.perf_counter() - t0
    atomic_write_text(out_dir / "demo.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out_dir / "demo.md", result["table"] + "\n")
    print()
    print(result["table"])
    for family, row in rows.items():
        if "sample" in row:
            print(f"\n[{family}] {row['sample']}")
    print(f"\ndemo finished in {result['wall_s'] / 60:.1f} min; results in {out_dir}/demo.md")
    return result


def _quantize(run: Path, out: Path) -> dict[str, Any] | None:
    """INT4 GPTQ (group 128) of the trained model; returns the quantization report."""
    try:
        from hyperloop_lm.quant.report import quantize_checkpoint
    except ImportError:
        return None
    print(f"== quantize {run.name}: INT4 GPTQ g128")
    return quantize_checkpoint(run, out, method="gptq", bits=4, group_size=128, calib_seqs=64, eval_tokens=100_000)


def _sample(run: Path) -> str | None:
    try:
        from hyperloop_lm.infer.api import load
    except ImportError:
        return None
    lm = load(run)
    return PROMPT + lm.generate(PROMPT, max_new_tokens=40, temperature=0.0)[0]


def _table(rows: dict[str, dict[str, Any]], unigram: float, data) -> dict[str, Any]:
    import math

    header = ["model", "schedule", "unique params", "weights fp32", "val loss", "val ppl", "bpb", "train tok/s",
              "int4 ppl"]
    body, records = [], {}
    for family, row in rows.items():
        s = row["summary"]
        from hyperloop_lm.config import ModelConfig
        from hyperloop_lm.model.accounting import schedule_string, weight_bytes

        cfg = ModelConfig.from_dict(s["model"])
        int4 = row.get("int4") or {}
        rec = {"unique_params": s["unique_params"], "weight_mb_fp32": weight_bytes(cfg, 32) / 2**20,
               "val_loss": s["val"]["loss"], "val_ppl": s["val"]["ppl"], "val_bpb": s["val"]["bpb"],
               "train_tok_s": s["train_tok_s"], "int4_ppl": int4.get("ppl_after"), "schedule": schedule_string(cfg)}
        records[family] = rec
        body.append([f"tiny-{family}", rec["schedule"], f"{rec['unique_params'] / 1e6:.2f}M",
                     f"{rec['weight_mb_fp32']:.1f} MB", f"{rec['val_loss']:.3f}", f"{rec['val_ppl']:.1f}",
                     f"{rec['val_bpb']:.3f}", f"{rec['train_tok_s']:.0f}" if rec["train_tok_s"] else "-",
                     f"{rec['int4_ppl']:.1f}" if rec["int4_ppl"] else "-"])
    body.append(["unigram baseline", "-", "-", "-", f"{unigram:.3f}", f"{math.exp(unigram):.1f}",
                 f"{unigram / math.log(2) / data.val.bytes_per_token:.3f}", "-", "-"])
    return {"table": markdown_table(header, body), "models": records, "unigram_loss": unigram}
