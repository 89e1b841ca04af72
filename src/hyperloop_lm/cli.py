"""hyperloop-lm: one command, several verbs.

    hyperloop-lm info --preset 240m-hyperloop     accounting table (params, FLOPs, KV cache, weight bytes)
    hyperloop-lm train --config configs/tiny-hyperloop.yaml [--key value ...]
    hyperloop-lm eval --checkpoint runs/NAME      held-out perplexity and bits-per-byte
    hyperloop-lm demo                             the end-to-end demo (what `make demo` runs)

Run `hyperloop-lm VERB --help` for each verb's options. Expected mistakes (bad config, missing files)
are reported as one line; add `--debug` before the verb to see a traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from hyperloop_lm.utils import UserError

VERBS: dict[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], Any]]] = {}


def verb(name: str):
    """Register `setup(parser) -> run(args)` as a CLI verb."""

    def deco(setup):
        VERBS[name] = setup
        return setup

    return deco


def parse_value(text: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, 'none' -> None, else the string (YAML scalar rules)."""
    import yaml

    for cast in (int, float):  # YAML 1.1 reads '1e-3' as a string
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['--model.d_model', '256', '--lr=1e-3'] -> {'model.d_model': 256, 'lr': 0.001}."""
    out, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise UserError(f"unexpected argument '{item}'; overrides look like --key value or --key=value")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise UserError(f"override --{key} needs a value")
            value, i = items[i + 1], i + 1
        out[key.replace("-", "_")] = parse_value(value)
        i += 1
    return out


# ---------------------------------------------------------------------------------------------- info
@verb("info")
def _info(p: argparse.ArgumentParser):
    p.description = ("Accounting for a model, counted from its config (nothing is instantiated): unique params "
                     "(paper convention: no input embedding), total params, HC overhead, unrolled depth, "
                     "FLOPs/token over the unrolled depth, KV-cache bytes/token and weight bytes per precision.")
    p.add_argument("--preset", default="240m-hyperloop", help="preset name, or a scale (240m, 1b, 2b, tiny, small, "
                   "micro) to compare its four families side by side (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="context length for attention FLOPs (default: the preset's)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.epilog = "Any other --key value pair overrides a model config field, e.g. --n_streams 8 --loops 4."
    p.set_defaults(accepts_overrides=True)

    def run(a):
        from hyperloop_lm.config import FAMILIES, PRESETS, _SCALES, get_preset
        from hyperloop_lm.model.accounting import summary

        if a.list:
            print("\n".join(PRESETS))
            return
        names = [f"{a.preset}-{f}" for f in FAMILIES] if a.preset in _SCALES else [a.preset]
        overrides = parse_overrides(a.overrides)
        rows = {n: summary(get_preset(n, **overrides), a.seq_len) for n in names}
        if a.json:
            import json

            print(json.dumps(rows, indent=2))
            return
        print(format_info(rows))

    return run


def format_info(rows: dict[str, dict[str, Any]]) -> str:
    from hyperloop_lm.utils_format import fmt_bytes, fmt_count, markdown_table

    spec = [("family", lambda s: s["family"]), ("schedule", lambda s: s["schedule"]), ("unrolled depth", lambda s: str(s["unrolled_depth"])),
            ("unique params", lambda s: fmt_count(s["unique_params"])),
            ("total params", lambda s: fmt_count(s["total_params"])),
            ("HC overhead", lambda s: fmt_count(s["hc_overhead"])),
            ("GFLOPs/token fwd", lambda s: f"{s['flops_per_token_fwd'] / 1e9:.3f}"),
            ("KV cache/token (bf16)", lambda s: fmt_bytes(s["kv_bytes_per_token_bf16"])),
            ("weights fp32", lambda s: fmt_bytes(s["weight_bytes_fp32"])),
            ("weights bf16", lambda s: fmt_bytes(s["weight_bytes_bf16"])),
            ("weights int8", lambda s: fmt_bytes(s["weight_bytes_int8"])),
            ("weights int4 g128", lambda s: fmt_bytes(s["weight_bytes_int4_g128"])),
            ("AdamW state (fp32)", lambda s: fmt_bytes(s["optimizer_bytes_adamw"])),
            ("GaLore state, r=d/4", lambda s: fmt_bytes(s["optimizer_bytes_galore"])),
            ("1-sided LoRA state, r=d/4", lambda s: fmt_bytes(s["optimizer_bytes_onesided_lora"]))]
    body = []
    for label, fn in spec:
        body.append([label, *(fn(s) for s in rows.values())])
    return markdown_table(["", *rows], body)


# ---------------------------------------------------------------------------------------------- train
@verb("train")
def _train(p: argparse.ArgumentParser):
    from hyperloop_lm.train.config import TrainConfig

    p.description = ("Train a model on a corpus. Settings come from --config FILE.yaml (see configs/), then "
                     "--key value overrides of any train-config field, and --model.FIELD value overrides of the "
                     "model preset. Resumes automatically from out_dir's latest checkpoint (--resume never to "
                     "start over). Multi-process: torchrun --nproc_per_node N -m hyperloop_lm.cli train ...")
    p.add_argument("--config", help="YAML file of train-config fields")
    p.epilog = "train-config fields (see hyperloop_lm/train/config.py for their meaning): " + ", ".join(
        f.name for f in __import__("dataclasses").fields(TrainConfig))
    p.set_defaults(accepts_overrides=True)

    def run(a):
        from hyperloop_lm.train.trainer import train

        cfg = TrainConfig.load(a.config, parse_overrides(a.overrides))
        summary = train(cfg)
        if summary["val"]:
            v = summary["val"]
            print(f"done: val loss {v['loss']:.4f}, ppl {v['ppl']:.2f}, bpb {v['bpb']:.4f} -> {cfg.out_dir}")

    return run


@verb("eval")
def _eval(p: argparse.ArgumentParser):
    p.description = ("Held-out perplexity and bits-per-byte of a checkpoint on its corpus' validation split "
                     "(or --corpus). With --tasks, zero-shot tasks through lm-eval instead (pip install "
                     "'hyperloop-lm[eval]'): 'paper' (the paper's 11 tasks and their Task Acc), 'offline' (a "
                     "suite built from the corpus' held-out split, no download), or lm-eval task names.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--corpus", help="corpus to evaluate on (default: the one the model was trained on)")
    p.add_argument("--tokens", type=int, default=None, help="cap on held-out tokens (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: the training sequence length (with "
                   "--tasks: the context length; longer contexts are left-truncated)")
    p.add_argument("--loops", type=int, default=None, help="run the middle block this many times")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tasks", default=None, help="zero-shot tasks: paper | offline | NAME[,NAME...] (may mix)")
    p.add_argument("--limit", type=float, default=None, help="with --tasks: items per task (N, or a fraction < 1)")
    p.add_argument("--include-path", default=None, help="with --tasks: a directory of extra lm-eval task YAMLs")
    p.add_argument("--output", default=None, help="write the results JSON here (atomically)")

    def run(a):
        import json

        if a.tasks:
            return run_tasks(a)
        from hyperloop_lm.data import build_shards, load_corpus
        from hyperloop_lm.eval.perplexity import evaluate
        from hyperloop_lm.train.checkpoint import load_model
        from hyperloop_lm.train.trainer import pick_device

        model, tok, meta = load_model(a.checkpoint, pick_device(a.device))
        if tok is None:
            raise UserError(f"{a.checkpoint} has no tokenizer.json; cannot encode the held-out text")
        corpus = load_corpus(a.corpus or meta["train"]["corpus"])
        val = build_shards(corpus, tok, splits=("val",))["val"]
        seq = a.seq_len or meta["train"]["seq_len"]
        res = evaluate(model, val, seq, a.batch_size, a.tokens, progress=True, loops=a.loops)
        res.update(checkpoint=str(a.checkpoint), corpus=corpus.name)
        if a.output:
            from hyperloop_lm.eval.zeroshot import write_results

            write_results(res, a.output)
        print(json.dumps(res, indent=2) if a.json else
              f"{corpus.name} held-out: loss {res['loss']:.4f}  ppl {res['ppl']:.2f}  bpb {res['bpb']:.4f}  "
              f"({res['tokens']:,} tokens)")

    def run_tasks(a):
        import json
        import logging

        from hyperloop_lm.eval.zeroshot import evaluate_tasks, format_results, require_lm_eval

        require_lm_eval()
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines drown the table
        limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
        res = evaluate_tasks(a.checkpoint, a.tasks, limit=limit, include_path=a.include_path, corpus=a.corpus,
                             output=a.output, batch_size=a.batch_size, device=a.device, max_length=a.seq_len,
                             loops=a.loops)
        print(json.dumps(res, indent=2) if a.json else format_results(res))

    return run


# ---------------------------------------------------------------------------------------------- generate
@verb("generate")
def _generate(p: argparse.ArgumentParser):
    p.description = ("Continue a prompt with a checkpoint (KV-cached decoding; greedy unless --temperature > 0). "
                     "Repeat --prompt to decode several prompts as one left-padded batch.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--loops", type=int, default=None, help="run the middle block K times (past the trained "
                   "count, the last loop's per-loop parameters are reused)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (single prompt)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")

    def run(a):
        from hyperloop_lm.infer.api import load

        gen = load(a.checkpoint, a.device, loops=a.loops)
        kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  seed=a.seed)
        if a.stream:
            if len(a.prompt) != 1:
                raise UserError("--stream prints one continuation; give a single --prompt")
            print(a.prompt[0], end="", flush=True)
            gen.generate(a.prompt[0], stream=lambda piece: print(piece, end="", flush=True), **kw)
            print()
            return
        for prompt, text in zip(a.prompt, gen.generate(a.prompt, **kw)):
            print(prompt + text)

    return run


@verb("export")
def _export(p: argparse.ArgumentParser):
    p.description = ("Export a checkpoint: --format onnx writes a decoder graph with past/present K/V per virtual "
                     "layer (checked against PyTorch with onnxruntime); --format hf (or safetensors) writes a "
                     "transformers directory (config.json, model.safetensors, tokenizer).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--format", choices=("onnx", "hf", "safetensors"), default="onnx")
    p.add_argument("--out", required=True, help="output .onnx file (onnx) or directory (hf, safetensors)")
    p.add_argument("--loops", type=int, default=None, help="export with the middle block run K times")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (14-17)")
    p.add_argument("--no-attention-mask", action="store_true", help="ONNX graph without the attention_mask input "
                   "(no padding support)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")

    def run(a):
        if a.format in ("hf", "safetensors"):
            try:
                from hyperloop_lm.infer.hf import to_hf
            except ImportError as e:
                raise UserError(f"--format {a.format} needs transformers ({e.name} is missing): "
                                "pip install 'hyperloop-lm[hf]'") from None
            print(f"wrote {to_hf(a.checkpoint, a.out, inference_loops=a.loops)}")
            return
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError("--format onnx needs onnx and onnxruntime: pip install 'hyperloop-lm[export]'") from None
        from hyperloop_lm.infer.api import load_checkpoint
        from hyperloop_lm.infer.onnx_export import export_onnx, verify_onnx

        model, _, _ = load_checkpoint(a.checkpoint)
        path = export_onnx(model, a.out, loops=a.loops, with_attention_mask=not a.no_attention_mask, opset=a.opset)
        print(f"wrote {path} ({model.depth(a.loops)} virtual layers of past/present K/V)")
        if not a.no_verify:
            err = verify_onnx(path, model, loops=a.loops, with_attention_mask=not a.no_attention_mask)
            print(f"onnxruntime vs PyTorch (prefill + 1 cached step): max |logit diff| = {err:.2e}")
            if err > 1e-3:
                raise UserError(f"the exported graph disagrees with PyTorch (max |diff| {err:.2e}); please report this")

    return run


# ---------------------------------------------------------------------------------------------- quantize
@verb("quantize")
def _quantize(p: argparse.ArgumentParser):
    p.description = ("Post-training weight quantization (RTN or loop-aware GPTQ) of a checkpoint into a packed "
                     "low-bit checkpoint (--out), with held-out perplexity before/after, sizes and wall time. "
                     "The result loads with `hyperloop-lm eval --checkpoint OUT` and for generation. Multi-model "
                     "table from saved reports: python -m hyperloop_lm.quant.report DIR/*.json")
    p.add_argument("--checkpoint", required=True, help="fp32 checkpoint directory, or a run directory (its latest)")
    p.add_argument("--out", required=True, help="directory for the quantized checkpoint (replaced if it is one)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="gptq")
    p.add_argument("--bits", type=int, choices=(8, 4, 3, 2), default=4)
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale/zero; -1 = per row")
    p.add_argument("--calib-seqs", type=int, default=128, help="GPTQ calibration sequences (train split)")
    p.add_argument("--calib-len", type=int, default=None, help="tokens per calibration sequence (default: train seq_len)")
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--asym", dest="sym", action="store_false", default=False,
                     help="asymmetric grid with an integer zero point per group (default; the GPTQ reference's)")
    sym.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid, zero fixed at 2^(bits-1)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of the mean Hessian diagonal")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize the input embedding (RTN per row) and the head (same method)")
    p.add_argument("--eval-tokens", type=int, default=100_000, help="held-out tokens for ppl before/after (0: skip)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--report", nargs="?", const="reports/quant", default=None, metavar="DIR",
                   help="also write the report as DIR/MODEL-METHOD-intBITS-gGROUP[-emb].{json,md} "
                        "(default DIR: %(const)s); it is always written to OUT/quant_report.{json,md}")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")

    def run(a):
        import json

        from hyperloop_lm.quant.report import quantize_checkpoint, report_markdown, write_report
        from hyperloop_lm.train.trainer import pick_device

        report = quantize_checkpoint(
            a.checkpoint, a.out, method=a.method, bits=a.bits, group_size=a.group_size, sym=a.sym,
            act_order=a.act_order, damp=a.damp, quantize_embeddings=a.quantize_embeddings,
            calib_seqs=a.calib_seqs, calib_len=a.calib_len, calib_seed=a.calib_seed, eval_tokens=a.eval_tokens,
            batch_size=a.batch_size, device=pick_device(a.device), log=lambda s: print(s, file=sys.stderr))
        write_report(report, report["out"], "quant_report")
        if a.report:
            print(f"report: {write_report(report, a.report)}", file=sys.stderr)
        print(json.dumps(report, indent=2) if a.json else report_markdown([report]))

    return run


@verb("scaling")
def _scaling(p: argparse.ArgumentParser):
    p.description = ("Iso-depth scaling laws (arXiv 2604.21106): `sweep` trains a grid of depth-D models with the "
                     "middle looped r times at FLOP budgets (resumable); `fit` fits L = E + A (N_once + r^phi "
                     "N_rec)^-alpha + B D^-beta with a block-bootstrap interval on phi; `compare` sets families "
                     "side by side without a fit (loss minus the r = 1 run of the same width and budget). "
                     "Typical: sweep --family looped; sweep --family hyperloop; fit reports/scaling/looped --out "
                     "docs/scaling/looped; compare reports/scaling/looped reports/scaling/hyperloop.")
    p.add_argument("action", choices=("sweep", "fit", "compare"))
    p.add_argument("paths", nargs="*", help="fit/compare: result directories or JSON files (e.g. reports/scaling/looped)")
    p.add_argument("--family", choices=("looped", "hyperloop"), default="looped")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--r", default="1,2,4,8", help="recurrences, comma-separated")
    p.add_argument("--widths", default="64,128", help="d_model values, comma-separated")
    p.add_argument("--budgets", default="3e12,1e13,3e13", help="training FLOP budgets per run, comma-separated")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--corpus", default="english-mix")
    p.add_argument("--truncate-backprop", type=int, default=0, help="gradients only through the last k loops")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every run")
    p.add_argument("--workers", type=int, default=1, help="runs trained in parallel (threads split between them)")
    p.add_argument("--out", default="docs/scaling", help="fit/compare: directory for the markdown, JSON and plots")
    p.add_argument("--starts", type=int, default=500, help="fit: random L-BFGS-B starts")
    p.add_argument("--resamples", type=int, default=200, help="fit: bootstrap resamples")

    def run(a):
        from hyperloop_lm.experiments import scaling

        if a.action == "sweep":
            scaling.sweep(a.family, a.depth, [int(x) for x in a.r.split(",")], [int(x) for x in a.widths.split(",")],
                          [float(x) for x in a.budgets.split(",")], corpus=a.corpus, seq_len=a.seq_len,
                          lr=a.lr, truncate_backprop=a.truncate_backprop, workers=a.workers)
        elif a.action == "fit":
            print(scaling.fit(a.paths or ["reports/scaling"], a.out, a.starts, a.resamples))
        else:
            print(scaling.compare(a.paths or ["reports/scaling"], a.out))

    return run


@verb("reproduce")
def _reproduce(p: argparse.ArgumentParser):
    from hyperloop_lm.experiments.suites import SCALES, SUITES

    p.description = ("Reproduce the paper's comparisons at a chosen scale: a suite's cells x seeds are trained "
                     "with identical data, tokens, recipe and seeds; finished cells are skipped and interrupted "
                     "ones resume, so rerun the same command to continue. Results go to reports/reproduce/ and "
                     "are rendered into docs/reproduction.md.")
    p.add_argument("--suite", choices=SUITES, default="table1")
    p.add_argument("--scale", choices=list(SCALES), default="cpu-tiny")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="cells trained in parallel (threads split between them)")
    p.add_argument("--only", help="comma-separated cell names to run (default: all)")
    p.add_argument("--corpus", help="override the scale's corpus (e.g. a local text directory)")
    p.add_argument("--tokens", type=int, help="override the scale's tokens per run (results are labelled SCALE@Nk)")
    p.add_argument("--render-only", action="store_true", help="only re-render docs/reproduction.md")
    p.add_argument("--redo-post", metavar="NAMES",
                   help="re-run these post-training measurements (int4,zeroshot,analysis,loops) on the finished "
                        "cells' checkpoints and update their results, e.g. after changing the quantization settings")

    def run(a):
        from hyperloop_lm.experiments.report import render_report
        from hyperloop_lm.experiments.reproduce import redo_post, reproduce

        if a.render_only:
            print(f"wrote {render_report()}")
            return
        if a.redo_post:
            redo_post(a.suite, a.scale, a.redo_post.split(","), a.only.split(",") if a.only else None,
                      corpus=a.corpus, tokens=a.tokens)
            print(f"wrote {render_report()}")
            return
        reproduce(a.suite, a.scale, a.seeds, a.workers, a.only.split(",") if a.only else None, corpus=a.corpus,
                  tokens=a.tokens)

    return run


# ---------------------------------------------------------------------------------------------- demo
@verb("demo")
def _demo(p: argparse.ArgumentParser):
    p.description = ("The end-to-end demo (`make demo`): fetch the bundled english-mix corpus, train a tiny "
                     "Hyperloop and its depth-matched Transformer, evaluate, quantize to INT4, generate, and "
                     "print a comparison table. Finished runs are reused on a second call.")
    p.add_argument("--out", default="runs", help="directory for the two runs and demo.md/demo.json")
    p.add_argument("--tokens", type=int, default=600_000, help="training tokens per model")
    p.add_argument("--no-quantize", action="store_true")
    p.add_argument("--no-generate", action="store_true")

    def run(a):
        from hyperloop_lm.demo import main as demo_main

        demo_main(a.out, a.tokens, quantize=not a.no_quantize, generate=not a.no_generate)

    return run


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperloop-lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, setup in VERBS.items():
        p = sub.add_parser(name, help=(setup.__doc__ or "").strip().splitlines()[0] if setup.__doc__ else None,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(run=setup(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        args.run(args)
        return 0
    except (UserError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
