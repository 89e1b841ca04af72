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
            ("weights int4 g128", lambda s: fmt_bytes(s["weight_bytes_int4_g128"]))]
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
                     "(or --corpus). --tasks runs zero-shot tasks instead (see docs).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--corpus", help="corpus to evaluate on (default: the one the model was trained on)")
    p.add_argument("--tokens", type=int, default=None, help="cap on held-out tokens (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: the training sequence length")
    p.add_argument("--loops", type=int, default=None, help="run the middle block this many times")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    def run(a):
        import json

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
        print(json.dumps(res, indent=2) if a.json else
              f"{corpus.name} held-out: loss {res['loss']:.4f}  ppl {res['ppl']:.2f}  bpb {res['bpb']:.4f}  "
              f"({res['tokens']:,} tokens)")

    return run


# ---------------------------------------------------------------------------------------------- demo
@verb("demo")
def _demo(p: argparse.ArgumentParser):
    p.description = "The end-to-end demo that `make demo` runs."

    def run(a):
        from hyperloop_lm.demo import main as demo_main

        demo_main()

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
