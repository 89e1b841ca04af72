"""Zero-shot task evaluation through lm-eval: the paper's suite, any lm-eval task, or our offline suite.

    from hyperloop_lm.eval.zeroshot import evaluate_tasks
    res = evaluate_tasks("runs/demo-hyperloop", "paper", limit=100)   # -> dict, see `summarize`
    res["task_acc"]                                                   # unweighted mean, as in the paper

`hyperloop-lm eval --checkpoint DIR --tasks paper|offline|NAME[,NAME...]` is a thin shell around this.
The paper's "Task Acc" is the unweighted mean of 11 zero-shot tasks, each with its own metric:
acc_norm (log-likelihood / characters of the choice) for HellaSwag, OpenBookQA and PIQA, acc for
the rest (for LAMBADA: the target is the greedy continuation).
"""
from __future__ import annotations

import contextlib
import json
import os
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from hyperloop_lm.eval.offline_tasks import TASK_ACC_METRIC as OFFLINE_METRIC
from hyperloop_lm.eval.offline_tasks import TASKS as OFFLINE_TASKS
from hyperloop_lm.eval.offline_tasks import SuiteParams, build_suite
from hyperloop_lm.utils import UserError, atomic_write_text, closest

log = logging.getLogger(__name__)

PAPER_TASKS = {  # task -> the paper's metric
    "arc_challenge": "acc", "arc_easy": "acc", "copa": "acc", "hellaswag": "acc_norm", "lambada_openai": "acc",
    "lambada_standard": "acc", "openbookqa": "acc_norm", "piqa": "acc_norm", "race": "acc", "sciq": "acc",
    "winogrande": "acc",
}

OFFLINE_HELP = (
    "lm-eval downloads task datasets from the Hugging Face Hub. Offline, either copy the Hub cache "
    "(~/.cache/huggingface) from a machine that has run these tasks and set HF_DATASETS_OFFLINE=1 "
    "HF_HUB_OFFLINE=1, or write task YAMLs with `dataset_path: json` and `dataset_kwargs: {data_files: "
    "{test: /path/to/local.jsonl}}` into a directory and pass it with --include-path (see the YAMLs "
    "`hyperloop-lm eval --tasks offline` writes for a working example)")


def require_lm_eval():
    """lm_eval, or a UserError saying how to install it (0.4.13 has the TaskManager.load API used here)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("zero-shot tasks need lm-evaluation-harness: pip install 'hyperloop-lm[eval]'") from None
    if not hasattr(TaskManager, "load"):
        raise UserError(f"lm-eval {lm_eval.__version__} is too old; pip install 'lm-eval>=0.4.13,<0.5'")
    return lm_eval


def task_names(spec: str | Sequence[str]) -> list[str]:
    """'paper' -> the 11 paper tasks; 'offline' -> our suite; else comma-separated names (may mix)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        names = {"paper": list(PAPER_TASKS), "offline": list(OFFLINE_TASKS)}.get(item, [item] if item else [])
        out += [n for n in names if n not in out]
    if not out:
        raise UserError("no tasks given; use --tasks paper, offline, or lm-eval task names separated by commas")
    return out


def task_manager(names: list[str], include_paths: Sequence[str | Path] = ()):
    """An lm-eval TaskManager that knows every name. Indexing lm-eval's own ~10k task YAMLs takes ~25 s
    on a small CPU, so when the include paths alone have all the tasks, the built-ins are skipped."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser()) for p in include_paths]
    for path in paths:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path} is not a directory of task YAMLs")
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
    tm = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        hint = closest(unknown[0], tm.all_tasks)
        raise UserError(f"unknown lm-eval task {unknown[0]!r}{hint}; use 'paper', 'offline', a task name from "
                        "`lm_eval ls tasks`, or add YAMLs with --include-path")
    return tm


def load_tasks(tm, names: list[str]) -> list:
    """Task objects (their datasets loaded), or one UserError naming every task whose data is missing
    (once the Hub proves unreachable, the remaining tasks are named as not tried)."""
    tasks, missing, untried = [], [], []
    for k, name in enumerate(names):
        try:
            loaded = tm.load([name])
        except (ConnectionError, OSError) as e:  # OSError covers FileNotFoundError and the Hub's errors
            missing.append(f"{name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            if isinstance(e, ConnectionError):
                # Unreachable Hub: each further task would spend ~25 s in retries to fail the same way.
                untried = names[k + 1:]
                break
            continue
        # A group comes back with its member tasks flattened beside it; hand lm-eval the top level only.
        children = {c for kids in loaded["group_map"].values() for c in kids}
        groups = [g for n, g in loaded["groups"].items() if n not in children]
        in_groups = {t.task_name for g in groups for t in g.get_all_tasks()}
        tasks += groups + [t for n, t in loaded["tasks"].items() if n not in in_groups]
    if missing:
        rest = f" (not tried after that: {', '.join(untried)})" if untried else ""
        raise UserError(f"could not load the data for {'; '.join(missing)}{rest}. {OFFLINE_HELP}")
    return tasks


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration of a block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate_tasks(checkpoint: str | Path | None, tasks: str | Sequence[str], *, limit: int | float | None = None,
                   include_path: str | Path | Sequence[str | Path] | None = None, corpus=None,
                   suite_params: SuiteParams = SuiteParams(), output: str | Path | None = None,
                   task_acc_metric: dict[str, str | None] | None = None, lm=None, bootstrap_iters: int = 1000,
                   **lm_kwargs: Any) -> dict[str, Any]:
    """Run lm-eval tasks zero-shot on a checkpoint (or an existing `lm`); return `summarize`'s dict and
    write it atomically to `output` if given. The offline suite's tasks are built (cached) from the
    held-out split of `corpus` (a spec for `load_corpus`, or a `Corpus`), default the checkpoint's
    training corpus. `lm_kwargs` go to `HyperloopLM`."""
    t0 = time.time()
    lm_eval = require_lm_eval()
    from hyperloop_lm.eval.harness import HyperloopLM

    names = task_names(tasks)
    if lm is None:
        lm = HyperloopLM(checkpoint, **lm_kwargs)
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    suite = None
    if set(names) & set(OFFLINE_TASKS):
        from hyperloop_lm.data import load_corpus

        spec = corpus or lm.meta.get("train", {}).get("corpus")
        if spec is None:
            raise UserError("the offline suite is built from a corpus' held-out split; pass corpus=")
        c = load_corpus(spec) if isinstance(spec, str) else spec  # a spec, or a Corpus
        root = build_suite(c, suite_params)
        paths.insert(0, root)
        suite = {"version": root.name, "corpus": c.name, "corpus_id": c.id, "dir": str(root),
                 "items": json.loads((root / "manifest.json").read_text())["tasks"]}
    tm = task_manager(names, paths)
    loaded = load_tasks(tm, names)
    for obj in loaded:  # zero-shot everywhere; setting it here keeps lm-eval from warning per task
        for task in obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj]:
            task.set_config(key="num_fewshot", value=0)
    # bootstrap_iters only affects stderr of non-mean metrics (perplexity); 1000 is plenty for a stderr.
    # lm-eval bootstraps in a forked multiprocessing.Pool unless DISABLE_MULTIPROC is set; forking a process
    # that holds torch threads, or a worker of `reproduce --workers`, deadlocked and signalled its siblings.
    with _env(DISABLE_MULTIPROC="1"):
        raw = lm_eval.simple_evaluate(model=lm, tasks=loaded, task_manager=tm, num_fewshot=0, limit=limit,
                                      bootstrap_iters=bootstrap_iters, log_samples=False)
    res = summarize(raw, {**PAPER_TASKS, **OFFLINE_METRIC, **(task_acc_metric or {})})
    res.update(checkpoint=lm.checkpoint, model=getattr(lm.model.cfg, "name", None), lm_eval_version=lm_eval.__version__,
               limit=limit, num_fewshot=0, max_length=lm.max_length, loops=lm.loops,
               seconds=round(time.time() - t0, 1))
    if suite is not None:
        res["suite"] = suite
    if output is not None:
        write_results(res, output)
    return res


def summarize(raw: dict[str, Any], acc_metric: dict[str, str | None]) -> dict[str, Any]:
    """lm-eval's results -> {tasks: {task: {metric: value, metric_stderr: value, n: items}},
    task_acc_metric: {task: metric}, task_acc: mean of those}. Metric keys drop lm-eval's ',filter'
    suffix when a task has only one filter."""
    tasks: dict[str, dict[str, Any]] = {}
    for task, metrics in raw["results"].items():
        filters = {k.split(",", 1)[1] for k in metrics if "," in k}
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",", 1)[0] if len(filters) == 1 else key
            row[metric] = None if math.isnan(value) else float(value)  # numpy floats -> plain JSON numbers
        row["n"] = raw.get("n-samples", {}).get(task, {}).get("effective")
        tasks[task] = row
    chosen = {}
    for task, row in tasks.items():
        if task in acc_metric:
            metric = acc_metric[task]
        else:  # any other task: its accuracy if it has one
            metric = next((m for m in ("acc", "exact_match", "acc_norm") if m in row), None)
        if metric is not None and row.get(metric) is not None:
            chosen[task] = metric
    acc = [tasks[t][m] for t, m in chosen.items()]
    return {"tasks": tasks, "task_acc_metric": chosen, "task_acc": sum(acc) / len(acc) if acc else None}


def write_results(res: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(res, indent=2, sort_keys=False) + "\n")
    return path


def format_results(res: dict[str, Any]) -> str:
    """A markdown table: task, metric, value ± stderr, items; then Task Acc."""
    from hyperloop_lm.utils_format import markdown_table

    rows = []
    for task, row in res["tasks"].items():
        for metric, value in row.items():
            if metric == "n" or metric.endswith("_stderr") or value is None:
                continue
            err = row.get(f"{metric}_stderr")
            pct = metric != "perplexity" and 0 <= value <= 1
            shown = f"{100 * value:.1f}" if pct else f"{value:.3f}"
            if err is not None:
                shown += f" ± {100 * err:.1f}" if pct else f" ± {err:.3f}"
            mark = " *" if res["task_acc_metric"].get(task) == metric else ""
            rows.append([task, metric + mark, shown, str(row["n"])])
    text = markdown_table(["task", "metric", "value (%)", "items"], rows)
    if res["task_acc"] is not None:
        text += (f"\nTask Acc (unweighted mean of the * metrics over {len(res['task_acc_metric'])} tasks): "
                 f"{100 * res['task_acc']:.1f}")
    return text

