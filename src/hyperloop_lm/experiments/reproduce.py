"""`hyperloop-lm reproduce`: run a suite's cells x seeds, resumably, and collect small result files.

    runs/reproduce/<suite>/<scale>/<cell>/seed<k>/     training run (checkpoints; not committed)
    reports/reproduce/<suite>/<scale>/<cell>__seed<k>.json   the cell's result (committed)

A cell whose result file exists is skipped; an interrupted cell resumes from its last checkpoint.
So a long suite can be spread over several sittings: rerun the same command.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hyperloop_lm.experiments.suites import SCALES, Cell, cells
from hyperloop_lm.train.trainer import git_revision
from hyperloop_lm.utils import UserError, atomic_write_text

RUNS = Path("runs/reproduce")
RESULTS = Path("reports/reproduce")


def scale_label(scale: str, tokens: int | None) -> str:
    """A token override gets its own label (e.g. cpu-tiny@300k), so short runs never mix with full ones."""
    return scale if not tokens else f"{scale}@{tokens // 1000}k"


def base_scale(label: str) -> tuple[str, int | None]:
    scale, _, tok = label.partition("@")
    return scale, int(tok[:-1]) * 1000 if tok else None


def cell_config(suite: str, scale: str, cell: Cell, seed: int, runs_root: Path = RUNS, corpus: str | None = None):
    from hyperloop_lm.train.config import TrainConfig

    name, tokens = base_scale(scale)
    sc = SCALES[name]
    data = {"corpus": corpus} if corpus else {}
    if tokens:
        data["tokens"] = tokens
    return TrainConfig(model=f"{sc.preset}-{cell.family}", model_overrides=dict(cell.model),
                       **{**sc.train, **cell.train, **data}, seed=seed, progress=False,
                       out_dir=str(runs_root / suite / scale / cell.name / f"seed{seed}"))


def result_path(suite: str, scale: str, cell: Cell, seed: int, results_root: Path = RESULTS) -> Path:
    return results_root / suite / scale / f"{cell.name}__seed{seed}.json"


def run_cell(suite: str, scale: str, cell: Cell, seed: int, *, runs_root: Path = RUNS, results_root: Path = RESULTS,
             command: str = "", corpus: str | None = None) -> dict[str, Any]:
    """Train (or resume) one cell, run its post-training measurements, write its result file."""
    from hyperloop_lm.train.trainer import train

    cfg = cell_config(suite, scale, cell, seed, runs_root, corpus)
    summary = train(cfg)
    if summary["status"] != "finished":
        return summary
    post = {name: POST[name](cfg, scale) for name in cell.post if name in POST}
    keep = ("status", "step", "tokens", "wall_s", "family", "model", "train", "unique_params", "total_params",
            "hc_overhead", "train_tok_s", "mfu", "peak_mem_mb", "optimizer", "optimizer_state_bytes", "final_train_loss", "val", "best_val_loss", "git",
            "machine", "corpus", "tokenizer")
    result = {"suite": suite, "scale": scale, "cell": cell.name, "seed": seed, "command": command,
              **{k: summary[k] for k in keep},
              "history": [{k: h[k] for k in ("step", "tokens", "loss", "ppl", "bpb")} for h in summary["history"]],
              "post": post}
    atomic_write_text(result_path(suite, scale, cell, seed, results_root), json.dumps(result, indent=2))
    return result


# Fields that do not change what a run computes (where it is written, how often it checkpoints: resume
# is bit-exact; how the process allocates memory), so two cells differing only in these are the same experiment.
_NOT_THE_EXPERIMENT = ("out_dir", "resume", "progress", "tensorboard", "keep_last", "ckpt_every", "log_every",
                       "keep_freed_memory")


def _experiment(train: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train.items() if k not in _NOT_THE_EXPERIMENT}


def reuse_result(suite: str, scale: str, cell: Cell, seed: int, results_root: Path = RESULTS,
                 corpus: str | None = None) -> Path | None:
    """Reuse the finished result of an identical run from another suite (e.g. the ablations' baseline cells
    are table1's cells): same training config and seed, and every post-measurement this cell needs. The
    copy records where it came from. Returns the new result path, or None."""
    want = _experiment(cell_config(suite, scale, cell, seed, corpus=corpus).to_dict())
    for other in sorted(results_root.glob(f"*/{scale}/*__seed{seed}.json")):
        if other.parent.parent.name == suite:
            continue
        r = json.loads(other.read_text())
        if _experiment(r.get("train", {})) == want and set(cell.post) <= set(r.get("post") or {}):
            out = result_path(suite, scale, cell, seed, results_root)
            r.update(suite=suite, cell=cell.name, reused_from=str(other.relative_to(results_root)))
            atomic_write_text(out, json.dumps(r, indent=2))
            return out
    return None


# ------------------------------------------------------------------ post-training measurements
def _load(cfg):
    from hyperloop_lm.train.checkpoint import load_model

    return load_model(cfg.out_dir)


def _val_shard(cfg, tokenizer):
    from hyperloop_lm.data import build_shards, load_corpus

    return build_shards(load_corpus(cfg.corpus), tokenizer, splits=("val",))["val"]


def post_int4(cfg, scale: str) -> dict[str, Any] | None:
    """INT4 g128 GPTQ (embeddings kept): the paper's Table 1 quantized column."""
    try:
        from hyperloop_lm.quant.report import quantize_checkpoint
    except ImportError:
        return None
    out = Path(cfg.out_dir) / "int4-gptq"
    calib = 16 if scale.startswith("micro") else 128
    return quantize_checkpoint(cfg.out_dir, out, method="gptq", bits=4, group_size=128, calib_seqs=calib,
                               eval_tokens=cfg.eval_tokens)


def post_loops(cfg, scale: str) -> dict[str, Any]:
    """Held-out loss when the middle block runs K times at inference (K != trained loops: extrapolation)."""
    from hyperloop_lm.eval.perplexity import evaluate

    model, tok, meta = _load(cfg)
    val = _val_shard(cfg, tok)
    trained = model.cfg.loops
    out = {}
    for k in sorted({1, 2, trained, trained + 1, trained + 2, 2 * trained}):
        out[str(k)] = evaluate(model, val, cfg.seq_len, batch_size=8, max_tokens=cfg.eval_tokens // 2, loops=k)
    return {"trained_loops": trained, "by_loops": out}


def post_analysis(cfg, scale: str) -> dict[str, Any]:
    from hyperloop_lm.data.loader import SequentialLoader
    from hyperloop_lm.eval.loop_analysis import analyze

    model, tok, meta = _load(cfg)
    x, y = next(iter(SequentialLoader(_val_shard(cfg, tok), 8, cfg.seq_len)))
    return analyze(model, x, y)


def post_zeroshot(cfg, scale: str) -> dict[str, Any] | None:
    try:
        from hyperloop_lm.eval.offline_tasks import run_offline_suite
    except ImportError:
        return None
    return run_offline_suite(cfg.out_dir, limit=50 if scale.startswith("micro") else 300, progress=False)


def chance_reference(scale: str, results_root: Path = RESULTS, corpus: str | None = None) -> Path | None:
    """The offline zero-shot suite scored by a random-init Transformer of the scale (seed 0, the runs'
    tokenizer): the measured chance row of table1's zero-shot table, so a trained model's accuracy can be
    read against it. Written once as table1/<scale>/random_init__seed0.json."""
    out = results_root / "table1" / scale / "random_init__seed0.json"
    if out.exists():
        return out
    try:
        from hyperloop_lm.eval.harness import HyperloopLM
        from hyperloop_lm.eval.offline_tasks import TASKS
        from hyperloop_lm.eval.zeroshot import evaluate_tasks
    except ImportError:
        return None
    from hyperloop_lm.data import prepare_data
    from hyperloop_lm.model.lm import LM

    cfg = cell_config("table1", scale, Cell("transformer", "transformer"), 0, corpus=corpus)
    data = prepare_data(cfg.corpus, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = LM(cfg.model_config(data.tokenizer.vocab_size))
    lm = HyperloopLM(model=model, tokenizer=data.tokenizer, max_length=cfg.seq_len, progress=False)
    zs = evaluate_tasks(None, list(TASKS), lm=lm, corpus=cfg.corpus, limit=50 if scale.startswith("micro") else 300)
    record = {"suite": "table1", "scale": scale, "cell": "random_init", "seed": 0, "family": "random_init",
              "model": model.cfg.to_dict(), "train": cfg.to_dict(), "post": {"zeroshot": zs}}
    atomic_write_text(out, json.dumps(record, indent=2, default=str))
    return out


POST = {"int4": post_int4, "loops": post_loops, "analysis": post_analysis, "zeroshot": post_zeroshot}


def redo_post(suite: str, scale: str, names: list[str], only: list[str] | None = None, *, runs_root: Path = RUNS,
              results_root: Path = RESULTS, corpus: str | None = None, tokens: int | None = None) -> list[Path]:
    """Re-run post-training measurements on finished cells (their checkpoints must be on this machine) and
    rewrite those entries of their result files; the rest of each result is kept."""
    unknown = sorted(set(names) - set(POST))
    if unknown:
        raise UserError(f"unknown post-training measurement(s) {unknown}; choose from {', '.join(POST)}")
    label = scale_label(scale, tokens)
    done = []
    for cell in cells(suite, SCALES[scale].preset):
        if only and cell.name not in only:
            continue
        for path in sorted((results_root / suite / label).glob(f"{cell.name}__seed*.json")):
            r = json.loads(path.read_text())
            if r.get("reused_from"):
                continue  # redo it in the suite that trained it
            cfg = cell_config(suite, label, cell, r["seed"], runs_root, corpus)
            if not (Path(cfg.out_dir) / "checkpoints").is_dir():
                print(f"{path.name}: no checkpoint at {cfg.out_dir} (trained on another machine?); skipped")
                continue
            for name in names:
                t0 = time.perf_counter()
                r.setdefault("post", {})[name] = POST[name](cfg, label)
                print(f"{path.name}: {name} redone ({time.perf_counter() - t0:.0f}s)", flush=True)
            r["post_git"] = git_revision()
            atomic_write_text(path, json.dumps(r, indent=2))
            done.append(path)
    return done


# ------------------------------------------------------------------ the suite
def _worker(args: tuple) -> tuple[str, str]:
    suite, scale, cell, seed, threads, runs_root, results_root, command, corpus = args
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    r = run_cell(suite, scale, cell, seed, runs_root=runs_root, results_root=results_root, command=command,
                 corpus=corpus)
    if r.get("status") == "interrupted":
        return f"{cell.name} seed {seed}: interrupted at step {r['step']} (checkpoint saved)", "interrupted"
    val = r.get("val") or {}
    return f"{cell.name} seed {seed}: val ppl {val.get('ppl', float('nan')):.2f} ({time.perf_counter() - t0:.0f}s)", "ok"


def reproduce(suite: str, scale: str, seeds: int = 1, workers: int = 1, only: list[str] | None = None,
              runs_root: Path = RUNS, results_root: Path = RESULTS, render: bool = True,
              corpus: str | None = None, docs: Path = Path("docs/reproduction.md"),
              tokens: int | None = None) -> list[Path]:
    if scale not in SCALES:
        raise UserError(f"unknown scale '{scale}'; choose from {', '.join(SCALES)}")
    preset_scale = SCALES[scale].preset
    scale = scale_label(scale, tokens)
    if preset_scale in ("gpu-small", "240m") and not torch.cuda.is_available():
        raise UserError(f"scale {scale} needs a GPU (torch.cuda.is_available() is False); use cpu-tiny or cpu-small")
    suite_cells = cells(suite, preset_scale)
    if only:
        suite_cells = [c for c in suite_cells if c.name in only]
    name, tok = base_scale(scale)
    command = "hyperloop-lm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("hyperloop-lm") \
        else f"hyperloop-lm reproduce --suite {suite} --scale {name} --seeds {seeds}" + (f" --tokens {tok}" if tok else "")
    todo = [(c, s) for s in range(seeds) for c in suite_cells
            if not result_path(suite, scale, c, s, results_root).exists()]  # seed-major: balanced partial results
    reused = [(c, s) for c, s in todo if reuse_result(suite, scale, c, s, results_root, corpus)]
    for c, s in reused:
        source = json.loads(result_path(suite, scale, c, s, results_root).read_text())["reused_from"]
        print(f"{c.name} seed {s}: reused the identical run {source}")
    todo = [job for job in todo if job not in reused]
    done = len(suite_cells) * seeds - len(todo)
    print(f"reproduce {suite} @ {scale}: {len(suite_cells)} cells x {seeds} seeds, {done} done, {len(todo)} to run")
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else torch.get_num_threads()
    jobs = [(suite, scale, c, s, threads, runs_root, results_root, command, corpus) for c, s in todo]
    if workers > 1:
        from hyperloop_lm.experiments.pool import run_parallel

        for msg, status in run_parallel(_worker, jobs, workers, lambda out: out[1] == "interrupted"):
            print(msg, flush=True)
    else:
        for job in jobs:
            msg, status = _worker(job)
            print(msg, flush=True)
            if status == "interrupted":
                break
    if suite == "table1" and any((results_root / suite / scale).glob("*.json")):
        chance_reference(scale, results_root, corpus)
    paths = sorted(p for p in (results_root / suite / scale).glob("*.json") if not p.name.startswith("random_init"))
    if render:
        from hyperloop_lm.experiments.report import render_report

        render_report(results_root, docs)
    return paths
