"""`hyperloop-lm scaling sweep|fit`: iso-depth grids and the phi fit (spec 7, arXiv 2604.21106).

Grid (the paper's): total depth D_u = 2 prelude + (D_u-4)/r layers x r loops + 2 coda, r in {1,2,4,8}
(r = 1 is the non-looped model of the same family), widths d, and FLOP budgets C; each run gets
tokens = C / (training FLOPs per token over the unrolled depth), so every r at a budget costs the same.

Parameter split for the law: N_once = prelude + coda layers (+ final norm), N_rec = the looped block
(+ its per-loop HC sites and loop embeddings for Hyperloop). Embeddings and head are excluded, as in
the paper's non-embedding counts.

Runs: runs/scaling/<family>/<arch>/C<budget>/ ; results: reports/scaling/<family>/<arch>__C<budget>.json
(one record per run with n_once, n_rec, r, tokens, val_loss, budget, arch); resumable like reproduce.

`compare` sets the families side by side without a fit: the looping penalty (loss minus the r = 1 run of the
same family, width and budget), which needs no law and so says something even where the fit cannot.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from hyperloop_lm.utils import UserError, atomic_write_text

RUNS, RESULTS = Path("runs/scaling"), Path("reports/scaling")
CONNECTION = {"looped": "residual", "hyperloop": "loop_hc"}


def arch_config(family: str, depth: int, r: int, width: int, vocab_size: int, seq_len: int) -> dict[str, Any]:
    if (depth - 4) % r or depth <= 4:
        raise UserError(f"depth-4 = {depth - 4} must be a positive multiple of r={r}")
    heads = max(1, width // 64)
    return dict(name=f"{family}-d{width}-r{r}", vocab_size=vocab_size, d_model=width, n_heads=heads,
                max_seq_len=seq_len, n_begin=2, n_middle=(depth - 4) // r, loops=r, n_end=2, depth=depth,
                connection=CONNECTION[family], loop_embedding=family == "hyperloop")


def split_params(cfg) -> tuple[int, int]:
    """(N_once, N_rec) in non-embedding parameters."""
    from hyperloop_lm.model.accounting import param_counts

    c = param_counts(cfg)
    once = (cfg.n_begin + cfg.n_end) * c["per_layer"] + cfg.d_model
    rec = cfg.n_middle * c["per_layer"] + c["hc_overhead"]
    return once, rec


def sweep(family: str, depth: int = 20, rs: Sequence[int] = (1, 2, 4, 8), widths: Sequence[int] = (64, 128),
          budgets: Sequence[float] = (3e12, 1e13, 3e13), corpus: str = "english-mix", vocab_size: int = 4096,
          seq_len: int = 128, batch_size: int = 16, lr: float = 3e-3, truncate_backprop: int = 0,
          runs_root: Path = RUNS, results_root: Path = RESULTS, seed: int = 0, workers: int = 1) -> list[Path]:
    """Train every (budget, width, r) run not yet recorded; `workers` runs train in parallel processes
    (one thread each when the cores are shared out). Returns the record paths of the whole grid."""
    from hyperloop_lm.config import ModelConfig
    from hyperloop_lm.model.accounting import flops_per_token

    if family not in CONNECTION:
        raise UserError(f"family must be looped or hyperloop, got '{family}'")
    tag = family + (f"-tbptt{truncate_backprop}" if truncate_backprop else "")
    paths, jobs = [], []
    for budget in budgets:  # validate the whole grid before training anything
        for width in widths:
            for r in rs:
                mc = arch_config(family, depth, r, width, vocab_size, seq_len)
                arch = f"d{width}-r{r}"
                out = results_root / tag / f"{arch}__C{budget:.0e}.json"
                paths.append(out)
                tokens = int(budget / flops_per_token(ModelConfig.from_dict(mc), seq_len)["train"])
                if tokens < batch_size * seq_len * 10:
                    raise UserError(f"budget {budget:.0e} gives only {tokens} tokens for {arch} (fewer than 10 "
                                    f"steps of {batch_size}x{seq_len}); raise the budgets or lower the widths")
                if not out.exists():
                    run = dict(family=family, tag=tag, mc=mc, arch=arch, budget=budget, r=r, width=width, depth=depth,
                               tokens=tokens, corpus=corpus, vocab_size=vocab_size, seq_len=seq_len,
                               batch_size=batch_size, lr=lr, seed=seed, truncate_backprop=truncate_backprop,
                               out_dir=str(runs_root / tag / arch / f"C{budget:.0e}"), record=str(out))
                    jobs.append(run)
    print(f"scaling sweep {tag}: {len(paths)} runs, {len(paths) - len(jobs)} done, {len(jobs)} to run", flush=True)
    if workers > 1 and len(jobs) > 1:
        from hyperloop_lm.experiments.pool import run_parallel

        for msg in run_parallel(_run_one, [(job, 0) for job in jobs], workers, lambda m: m.endswith("interrupted")):
            print(msg, flush=True)
    else:
        for job in jobs:
            msg = _run_one((job, 0))
            print(msg, flush=True)
            if msg.endswith("interrupted"):
                break
    return paths


def _run_one(args: tuple[dict[str, Any], int]) -> str:
    """Train one grid point and write its record (a worker process in parallel sweeps)."""
    import torch

    from hyperloop_lm.config import ModelConfig
    from hyperloop_lm.train.config import TrainConfig
    from hyperloop_lm.train.trainer import train

    job, threads = args
    if threads:
        torch.set_num_threads(threads)
    mc, steps = job["mc"], job["tokens"] // (job["batch_size"] * job["seq_len"])
    tc = TrainConfig(model="micro-" + job["family"], model_overrides={k: v for k, v in mc.items() if k != "vocab_size"},
                     corpus=job["corpus"], vocab_size=job["vocab_size"], seq_len=job["seq_len"],
                     batch_size=job["batch_size"], tokens=job["tokens"], lr=job["lr"], warmup_steps=max(1, steps // 20),
                     eval_every=0, eval_tokens=100_000, ckpt_every=100, progress=False, seed=job["seed"],
                     truncate_backprop=job["truncate_backprop"], out_dir=job["out_dir"])
    s = train(tc)
    label = f"{job['tag']} {job['arch']} C={job['budget']:.0e}"
    if s["status"] != "finished":
        return f"{label}: interrupted"
    n_once, n_rec = split_params(ModelConfig.from_dict(mc))
    # arch = the loop configuration: the widths at one budget form one bootstrap block
    record = {"family": job["tag"], "arch": f"r{job['r']}", "run": job["arch"], "budget": job["budget"], "r": job["r"],
              "width": job["width"], "depth": job["depth"], "n_once": n_once, "n_rec": n_rec, "tokens": s["tokens"],
              "val_loss": s["val"]["loss"], "val_ppl": s["val"]["ppl"], "train_tok_s": s["train_tok_s"], "git": s["git"],
              "truncate_backprop": job["truncate_backprop"], "corpus": job["corpus"], "seq_len": job["seq_len"],
              "lr": job["lr"], "seed": job["seed"]}
    atomic_write_text(Path(job["record"]), json.dumps(record, indent=2))
    return f"{label}: {s['tokens']:,} tokens, val loss {s['val']['loss']:.4f} ({s['wall_s']:.0f}s)"


def _record_files(paths: Sequence[str]) -> list[Path]:
    files = [f for p in map(Path, paths) for f in (sorted(p.rglob("*.json")) if p.is_dir() else [p])]
    if not files:
        raise UserError("no run records found; pass reports/scaling/<family> or JSON files")
    return files


def compare(paths: Sequence[str], out_dir: str) -> str:
    """Looping penalty per family (records' `family`), paired by (budget, width, r); writes compare.md + a PNG.

    With two families, a second table gives their difference averaged over widths, per budget and r: the
    comparison's direction can change as the runs get more tokens, and a single mean would hide it."""
    from hyperloop_lm.experiments import scaling_fit as sf

    by_family: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for f in _record_files(paths):
        rec = json.loads(f.read_text())
        by_family.setdefault(rec.get("family", "?"), []).append((rec, sf.observation_from_record(rec, str(f))))
    penalty: dict[str, dict[tuple[Any, int, float], float]] = {}  # family -> (budget, width, r) -> penalty
    for family, pairs in by_family.items():
        width = {(o.budget, o.n_once): rec["width"] for rec, o in pairs}
        penalty[family] = {(row["budget"], width[row["budget"], row["n_once"]], r): v
                           for row in sf.looping_penalty([o for _, o in pairs]) for r, v in row["penalty"].items()}
    families = sorted(penalty, key=lambda fam: (fam != "looped", fam))
    keys = sorted({k for pen in penalty.values() for k in pen}, key=lambda k: (sf.budget_order(k[0]), k[1:]))
    if not keys:
        raise UserError("no width/budget group has an r = 1 run to compare against")
    pair = families if len(families) == 2 else None
    dname = f"{pair[1]} - {pair[0]}" if pair else ""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:+.4f}"

    def delta(k) -> float | None:
        return penalty[pair[1]][k] - penalty[pair[0]][k] if pair and all(k in penalty[f] for f in pair) else None

    lines = ["| budget | width | r | " + " | ".join(families) + (f" | {dname} |" if pair else " |"),
             "|---" * (3 + len(families) + bool(pair)) + "|"]
    for k in keys:
        lines.append(f"| {k[0]:.0e} | {k[1]} | {k[2]:g} | " + " | ".join(fmt(penalty[f].get(k)) for f in families)
                     + (f" | {fmt(delta(k))} |" if pair else " |"))
    rs = sorted({k[2] for k in keys})
    for r in rs:  # mean over the groups every family has
        ks = [k for k in keys if k[2] == r and all(k in penalty[f] for f in families)]
        if ks:
            means = [sum(penalty[f][k] for k in ks) / len(ks) for f in families]
            lines.append(f"| mean of {len(ks)} | | {r:g} | " + " | ".join(map(fmt, means))
                         + (f" | {fmt(means[1] - means[0])} |" if pair else " |"))
    tables = ["\n".join(lines)]
    if pair:  # the difference per budget, averaged over widths
        budgets = sorted({k[0] for k in keys}, key=sf.budget_order)
        rows = [f"| budget | " + " | ".join(f"r={r:g}" for r in rs) + " | all r |", "|---" * (len(rs) + 2) + "|"]
        for b in budgets:
            cells = [[d for k in keys if k[0] == b and k[2] == r and (d := delta(k)) is not None] for r in rs]
            flat = [d for c in cells for d in c]
            rows.append(f"| {b:.0e} | " + " | ".join(fmt(sum(c) / len(c) if c else None) for c in cells)
                        + f" | {fmt(sum(flat) / len(flat) if flat else None)} |")
        tables.append(f"{dname}, mean over widths (negative = {pair[1]} loses less to looping):\n\n" + "\n".join(rows))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot_penalty(penalty, families, out / "looping_penalty.png")
    table = "\n\n".join(tables)
    command = f"hyperloop-lm scaling compare {' '.join(map(str, paths))} --out {out_dir}"
    atomic_write_text(out / "compare.md", f"Command: `{command}`\n\nLooping penalty: validation loss minus the "
                      "r = 1 run of the same family, width and budget (same FLOPs and tokens; positive = looping "
                      f"costs loss).\n\n{table}\n\n![looping penalty](looping_penalty.png)\n")
    return table


def _plot_penalty(penalty: dict[str, dict[tuple[Any, int, float], float]], families: list[str], path: Path) -> None:
    """One panel per budget: each family's penalty vs r, a thin line per width and the mean over widths."""
    from matplotlib.figure import Figure

    from hyperloop_lm.experiments.scaling_fit import budget_order
    from hyperloop_lm.utils import atomic_path

    budgets = sorted({k[0] for pen in penalty.values() for k in pen}, key=budget_order)
    fig = Figure(figsize=(3.6 * len(budgets), 3.6))
    axes = fig.subplots(1, len(budgets), sharey=True, squeeze=False)[0]
    for ax, b in zip(axes, budgets):
        for i, fam in enumerate(families):
            pen = {k[1:]: v for k, v in penalty[fam].items() if k[0] == b}  # (width, r) -> penalty
            widths = sorted({w for w, _ in pen})
            for w in widths:
                rs = sorted(r for ww, r in pen if ww == w)
                ax.plot([1, *rs], [0, *(pen[w, r] for r in rs)], color=f"C{i}", alpha=0.35, lw=0.8)
            rs = sorted({r for _, r in pen})
            means = [sum(v for (_, r2), v in pen.items() if r2 == r) / sum(r2 == r for _, r2 in pen) for r in rs]
            ax.plot([1, *rs], [0, *means], color=f"C{i}", lw=2.2, marker="o",
                    label=f"{fam} (mean of {len(widths)} widths)")
        ax.set_title(f"budget {b:.0e} FLOPs" if isinstance(b, float) else f"budget {b}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("recurrences r (same FLOPs)")
        ax.axhline(0, color="k", lw=0.6)
    axes[0].set_ylabel("loss - loss(r = 1)")
    axes[0].legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def fit(paths: Sequence[str], out_dir: str, n_starts: int = 500, n_resamples: int = 200) -> str:
    """The paper's fit + block bootstrap + per-architecture Chinchilla fits; writes JSON + PNGs, returns markdown."""
    from hyperloop_lm.experiments import scaling_fit as sf

    obs = sf.load_summaries(_record_files(paths))
    result = sf.fit_iso_depth(obs, n_starts=n_starts)
    boot = sf.bootstrap_phi(obs, n_resamples=n_resamples, fit=result)
    # a per-architecture Chinchilla fit has 5 parameters: architectures with fewer runs (a sweep still under
    # way) are left out of it rather than failing the joint fit
    runs = Counter(o.arch for o in obs)
    enough = [o for o in obs if runs[o.arch] >= 5]
    table = sf.report(obs, result, out_dir, boot=boot, chinchilla=sf.fit_chinchilla(enough) if enough else {})
    skipped = sorted(a for a, n in runs.items() if n < 5)
    if skipped:
        table += f"\n\nPer-architecture fits skipped for {', '.join(skipped)} (fewer than 5 runs each)."
    command = f"hyperloop-lm scaling fit {' '.join(map(str, paths))} --out {out_dir} --starts {n_starts} --resamples {n_resamples}"
    atomic_write_text(Path(out_dir) / "fit.md", f"Command: `{command}`\n\n{table}\n\n"
                      "![fitted vs observed](fitted_vs_observed.png)\n![loss vs effective parameters](loss_vs_neff.png)\n")
    return table
