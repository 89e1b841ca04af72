"""Render reports/reproduce/**/*.json into docs/reproduction.md (+ PNG plots in docs/img/).

Tables show mean +- std over seeds and, where a suite has a reference cell, the *paired* difference
(same seed, same data order) with a 95% t-interval. Every section prints the command that made it.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from hyperloop_lm.utils import atomic_write_text
from hyperloop_lm.utils_format import fmt_bytes, fmt_count, markdown_table

# Paper Table 1 at 240M (PPL bf16 / PPL GPTQ-INT4), for the side-by-side direction check.
PAPER_240M = {"transformer": (14.65, 14.85), "mhc": (14.55, 14.73), "looped": (14.85, 15.18),
              "hyperloop": (14.40, 14.68)}
FAMILY_ORDER = ("transformer", "mhc", "looped", "hyperloop")
TABLE1_ROWS = (*FAMILY_ORDER, "hyperloop_looped_init")  # + Hyperloop with the Looped-equivalent init (suites.py)


def load_results(root: Path) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(suite, scale) -> cell -> results sorted by seed."""
    out: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(root).glob("*/*/*.json")):
        r = json.loads(path.read_text())
        out[(r["suite"], r["scale"])][r["cell"]].append(r)
    for cellmap in out.values():
        for rs in cellmap.values():
            rs.sort(key=lambda r: r["seed"])
    return out


def mean_std(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def paired_diff(a: list[dict], b: list[dict], key=lambda r: r["val"]["ppl"]) -> tuple[float, float, float, int] | None:
    """Mean of key(a_seed) - key(b_seed) over seeds both have, with a 95% t-interval (nan if 1 seed)."""
    from scipy import stats

    bs = {r["seed"]: key(r) for r in b}
    d = [float(key(r)) - float(bs[r["seed"]]) for r in a if r["seed"] in bs]
    if not d:
        return None
    if any(math.isnan(x) for x in d):  # a measurement missing from some cell (e.g. no INT4 run)
        return math.nan, math.nan, math.nan, len(d)
    m = statistics.mean(d)
    if len(d) < 2:
        return m, math.nan, math.nan, 1
    h = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - h, m + h, len(d)


def pooled_spread(cellmap: dict[str, list[dict]]) -> tuple[float, int] | None:
    """The seed std of one run, pooled over every cell with two or more seeds (one variance for a suite whose
    cells are the same size of model on the same data), and its degrees of freedom; None without such cells."""
    multi = [ppls(rs) for rs in cellmap.values() if len(rs) > 1]
    dof = sum(len(x) - 1 for x in multi)
    if not dof:
        return None
    return math.sqrt(sum(statistics.variance(x) * (len(x) - 1) for x in multi) / dof), dof


def pooled_diff(a: list[dict], b: list[dict], spread: tuple[float, int]) -> tuple[float, float, float, int]:
    """mean(a) - mean(b) with a 95% t-interval from the pooled seed spread: with two seeds a cell's own paired
    interval has 1 degree of freedom (t = 12.7) and says nothing; the suite's pooled spread has one per cell."""
    from scipy import stats

    s, dof = spread
    m = statistics.mean(ppls(a)) - statistics.mean(ppls(b))
    h = stats.t.ppf(0.975, dof) * s * math.sqrt(1 / len(a) + 1 / len(b))
    return m, m - h, m + h, min(len(a), len(b))


def suite_diff(spread: tuple[float, int] | None):
    """The difference a suite's cells are compared by: pooled_diff with a pooled spread, else paired_diff."""
    return (lambda a, b: pooled_diff(a, b, spread)) if spread else paired_diff


def fmt_diff(d) -> str:
    if d is None:
        return "-"
    m, lo, hi, _ = d
    return f"{m:+.2f}" if math.isnan(lo) else f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def ppls(rs: list[dict]) -> list[float]:
    return [r["val"]["ppl"] for r in rs]


def _int4(r: dict) -> float | None:
    q = (r.get("post") or {}).get("int4")
    return q.get("ppl_after") if q else None


def _plot(path: Path, draw) -> str:
    path = path.with_name(path.name.replace("@", "-"))  # plain file names (scale labels carry '@')
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def section_table1(scale: str, cellmap: dict[str, list[dict]], img: Path) -> list[str]:
    fams = [f for f in TABLE1_ROWS if f in cellmap]
    ref = cellmap.get("transformer", [])
    rows = []
    tok_ref = statistics.mean([r["train_tok_s"] for r in ref]) if ref else None
    for f in fams:
        rs = cellmap[f]
        q = [x for x in (_int4(r) for r in rs) if x]
        tok = statistics.mean([r["train_tok_s"] for r in rs])
        rows.append([f, fmt_count(rs[0]["unique_params"]), fmt_count(rs[0]["total_params"]), mean_std(ppls(rs)),
                     mean_std([r["val"]["bpb"] for r in rs]), mean_std(q) if q else "-",
                     f"{tok / tok_ref:.2f}" if tok_ref else "-", fmt_diff(paired_diff(rs, ref)) if f != "transformer" else "0",
                     len(rs), "%.2f / %.2f" % PAPER_240M[rs[0]["family"]]])
    lines = [markdown_table(["cell", "unique params", "total params", "val ppl", "bpb", "GPTQ-INT4 ppl",
                             "train tok/s ratio", "ppl diff vs Transformer [95% CI]", "seeds", "paper 240M ppl / INT4"],
                            rows), ""]

    def curves(ax):
        for f in fams:
            for i, r in enumerate(cellmap[f]):
                h = r["history"]
                ax.plot([p["tokens"] / 1e6 for p in h], [p["loss"] for p in h], color=f"C{TABLE1_ROWS.index(f)}",
                        alpha=0.8, label=f if i == 0 else None)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend()

    def params(ax):
        for f in fams:
            rs = cellmap[f]
            ax.errorbar(rs[0]["unique_params"] / 1e6, statistics.mean(ppls(rs)),
                        yerr=statistics.stdev(ppls(rs)) if len(rs) > 1 else 0, fmt="o", label=f,
                        color=f"C{TABLE1_ROWS.index(f)}")
        ax.set_xlabel("unique parameters (M, paper convention)")
        ax.set_ylabel("held-out perplexity")
        ax.legend()

    def int4(ax):
        xs = [f for f in fams if any(_int4(r) for r in cellmap[f])]
        ax.bar(xs, [statistics.mean([_int4(r) - r["val"]["ppl"] for r in cellmap[f] if _int4(r)]) for f in xs],
               color=[f"C{TABLE1_ROWS.index(f)}" for f in xs])
        ax.set_ylabel("perplexity increase from GPTQ INT4 g128")

    lines += ["The train tok/s ratio is measured inside the suite, where parallel workers and other jobs share "
              "the cores: it is a rough figure; `make bench` (reports/bench/) measures throughput side by side.", ""]
    lines += verdicts(cellmap)

    names = [_plot(img / f"table1-{scale}-loss.png", curves), _plot(img / f"table1-{scale}-params.png", params)]
    if any(_int4(r) for rs in cellmap.values() for r in rs):
        names.append(_plot(img / f"table1-{scale}-int4.png", int4))
    lines += [f"![{n}](img/{n})" for n in names] + [""]
    return lines + section_zeroshot(cellmap, [*fams, "random_init"])


def judge(d: tuple[float, float, float, int], paper: float) -> str:
    """Our difference d = (mean, lo, hi, seeds) against the sign of the paper's difference: the 95% interval
    decides; without one (a single seed and no pooled spread), only the direction is reported."""
    m, lo, hi, _ = d
    same = (m > 0) == (paper > 0)
    if not math.isnan(lo):
        if lo <= 0 <= hi:
            return "inconclusive: the interval includes 0"
        return "**agrees** (the interval excludes 0)" if same else \
            "**disagrees**: the opposite order, the interval excludes 0"
    return ("same direction" if same else "**opposite direction**") + " (one seed, no interval)"


# The paper's Table 1 orderings we check (a, b): a has lower perplexity than b at 240M.
PAPER_CLAIMS = (("hyperloop", "transformer"), ("hyperloop", "mhc"), ("hyperloop", "looped"), ("transformer", "looped"),
                ("mhc", "transformer"), ("hyperloop_looped_init", "transformer"), ("hyperloop_looped_init", "mhc"),
                ("hyperloop_looped_init", "looped"))


def verdicts(cellmap: dict[str, list[dict]]) -> list[str]:
    """One line per paper claim: does our paired difference (95% CI over seeds) agree in direction?"""
    out = []
    def int4_cost(r):
        return _int4(r) - r["val"]["ppl"] if _int4(r) else math.nan

    paper_ppl = {**PAPER_240M, "hyperloop_looped_init": PAPER_240M["hyperloop"]}  # the paper's init is unstated
    claims = [(a, b, "ppl", lambda r: r["val"]["ppl"], paper_ppl[a][0] - paper_ppl[b][0]) for a, b in PAPER_CLAIMS]
    # the paper's quantization claim: looping makes INT4 hurt more, and Hyperloop's HC narrows that gap
    claims += [(a, b, "INT4 ppl increase", int4_cost, (PAPER_240M[a][1] - PAPER_240M[a][0]) - (PAPER_240M[b][1] - PAPER_240M[b][0]))
               for a, b in (("transformer", "looped"), ("hyperloop", "looped"))]
    for a, b, what, key, paper in claims:
        if a not in cellmap or b not in cellmap:
            continue
        d = paired_diff(cellmap[a], cellmap[b], key)
        if d is None or math.isnan(d[0]):
            continue
        out.append(f"- {what}, {a} vs {b}: paper {paper:+.2f} at 240M; ours {fmt_diff(d)} over {d[3]} seed(s): "
                   f"{judge(d, paper)}")
    return (["Against the paper's Table 1 orderings (difference first minus second; lower is better for the first):", "",
             *out, ""] if out else [])


# The paper's ablations (spec 6; 2-4x3-2 at d1024, 136M unique params): our cell -> (paper ppl, the paper's
# configuration it corresponds to, reference cell). Our tiny preset is 1-2x3-1 (6 unrolled middle layers), so
# hc_every 1/3/6 are the paper's 12/2/1 sites (every layer / every 1.5 loops / once), and middle1x6 is 2-2x6-2.
PAPER_ABLATIONS = {
    "hyperloop": (14.40, "diagonal H_res, n = 4, one HC site per loop", None),
    "transformer": (14.65, "Transformer (Table 1)", "hyperloop"),
    "looped": (14.85, "Looped (Table 1)", "hyperloop"),
    "middle1x6": (15.06, "2-2x6-2: smaller middle looped more (Table 3)", "hyperloop"),
    "streams2": (14.43, "n = 2 streams (Table 4)", "hyperloop"),
    "streams8": (14.39, "n = 8 streams (Table 4)", "hyperloop"),
    "hc_every1": (14.45, "an HC site after every middle layer (Table 5)", "hyperloop"),
    "hc_every3": (14.50, "an HC site every 1.5 loops (Table 5)", "hyperloop"),
    "hc_every6": (14.63, "one HC site for all loops (Table 5)", "hyperloop"),
    "hres_sinkhorn": (14.59, "Sinkhorn H_res (Table 6)", "hyperloop"),
    "hres_identity": (14.61, "identity H_res (Table 6)", "hyperloop"),
    "looped_lora4": (14.77, "per-loop LoRA on Looped, best rank of 0..32 (Table 7)", "looped"),
    "looped_lora16": (14.77, "per-loop LoRA on Looped, best rank of 0..32 (Table 7)", "looped"),
}
PAPER_NOISE = 0.1  # ppl: the spec: "differences of ~0.1 ppl are within noise" (one seed per cell)


def ablation_verdicts(cellmap: dict[str, list[dict]]) -> list[str]:
    """One line per ablation the paper also ran: the direction of its difference to the reference vs ours,
    with the interval from the suite's pooled seed spread (see pooled_diff)."""
    out = []
    spread = pooled_spread(cellmap)
    diff = suite_diff(spread)
    for name, (paper_ppl, what, ref) in PAPER_ABLATIONS.items():
        if ref is None or name not in cellmap or ref not in cellmap:
            continue
        d = diff(cellmap[name], cellmap[ref])
        if d is None:
            continue
        paper = paper_ppl - PAPER_ABLATIONS[ref][0]
        verdict = judge(d, paper) if abs(paper) > PAPER_NOISE + 1e-9 else \
            f"the paper's difference is within its one-seed noise (~{PAPER_NOISE}), so no direction to check"
        out.append(f"- {name} ({what}) vs {ref}: paper {paper:+.2f}; ours {fmt_diff(d)}: {verdict}")
    # the referee's missing ablation (no paper number): begin/middle/end vs uniform looping at equal depth and params
    for name, ref in (("uniform_hyperloop", "hyperloop"), ("uniform_looped", "looped")):
        if name in cellmap and ref in cellmap:
            d = diff(cellmap[name], cellmap[ref])
            out.append(f"- {name} (uniform looping of the whole stack, no begin/end) vs {ref} (begin/middle/end): "
                       f"ours {fmt_diff(d)} (the referee's question; the paper has no number)")
    if not out:
        return []
    basis = (f"95% intervals from the seed spread pooled over the suite's cells (std {spread[0]:.2f} ppl per run, "
             f"{spread[1]} degrees of freedom)" if spread else "one seed per cell: directions only")
    return [f"Against the paper's ablations (difference to the reference cell; positive = worse than it; {basis}):",
            "", *out, ""]


def recipe_verdicts(cellmap: dict[str, list[dict]]) -> list[str]:
    """The paper's v3 appendix: GPT-2 init + LR 1.6e-3 improves every model by 1.3-1.9 ppl over PyTorch init +
    LR 4e-4, and Hyperloop's lead over the Transformer (-0.25 at 240M) then shrinks to a match."""
    out = []
    for fam in ("transformer", "hyperloop"):
        a, b = cellmap.get(f"{fam}_gpt2_lr0.0016"), cellmap.get(f"{fam}_pytorch_lr4e-4")
        if a and b:
            d = paired_diff(a, b)
            out.append(f"- {fam}, GPT-2 init + lr 1.6e-3 vs PyTorch init + lr 4e-4: paper -1.3 to -1.9; ours "
                       f"{fmt_diff(d)}: {judge(d, -1.5)}")
    a, b = cellmap.get("hyperloop_pytorch_lr4e-4"), cellmap.get("transformer_pytorch_lr4e-4")
    if a and b:
        d = paired_diff(a, b)
        out.append(f"- hyperloop vs transformer, PyTorch init + lr 4e-4: paper -0.25; ours {fmt_diff(d)}: {judge(d, -0.25)}")
    a, b = cellmap.get("hyperloop_gpt2_lr0.0016"), cellmap.get("transformer_gpt2_lr0.0016")
    if a and b:
        d = paired_diff(a, b)
        verdict = ("one seed, no interval" if d[3] < 2 else "**agrees** (a match: the interval includes 0)"
                   if d[1] <= 0 <= d[2] else "**disagrees**: the interval excludes 0")
        out.append(f"- hyperloop vs transformer, GPT-2 init + lr 1.6e-3: paper about 0 (a match); ours {fmt_diff(d)}: {verdict}")
    return ["Against the paper's recipe findings (v3 appendix; differences in ppl, lower is better for the first):",
            "", *out, ""] if out else []


def cosine_verdict(cellmap: dict[str, list[dict]]) -> list[str]:
    """The paper's Table 8: Hyperloop's loops are less alike than Looped's (mean of its three numbers:
    Looped 0.86, Hyperloop 0.83), i.e. the hyper-connections make the loops do more distinct work."""
    means = {}
    for fam in ("looped", "hyperloop"):
        cos = [statistics.mean(a["cross_loop_cosine"].values()) for r in cellmap.get(fam, [])
               if (a := (r.get("post") or {}).get("analysis")) and a.get("cross_loop_cosine")]
        if cos:
            means[fam] = cos
    if len(means) < 2:
        return []
    h, l = statistics.mean(means["hyperloop"]), statistics.mean(means["looped"])
    verdict = "**agrees**" if h < l else "**disagrees**: Hyperloop's loops are *more* alike than Looped's"
    return [f"Cross-loop similarity against the paper's Table 8 (mean over loop pairs and seeds): Hyperloop {h:.3f} vs "
            f"Looped {l:.3f}; paper 0.83 vs 0.86 (Hyperloop's loops less alike): {verdict}.", ""]


# The offline suite's metrics (eval/offline_tasks.py): task -> (metric, column title)
ZEROSHOT_COLUMNS = (("hyperloop_lastword", "acc", "last word: acc"),
                    ("hyperloop_lastword_gen", "exact_match", "last word: greedy exact match"),
                    ("hyperloop_cloze", "acc_norm", "next-sentence cloze (4 choices): acc_norm"))


def section_zeroshot(cellmap: dict[str, list[dict]], names: list[str]) -> list[str]:
    """The offline zero-shot suite per model (mean +- std over seeds), beside a random-init model's scores."""
    rows = []
    for name in names:
        zs = [z for z in ((r.get("post") or {}).get("zeroshot") for r in cellmap.get(name, [])) if z]
        if not zs:
            continue
        cols = [mean_std([z["tasks"][t][m] for z in zs if t in z["tasks"]]) for t, m, _ in ZEROSHOT_COLUMNS]
        label = "random init (chance reference)" if name == "random_init" else name
        rows.append([label, *cols, mean_std([z["task_acc"] for z in zs]), len(zs)])
    if not rows:
        return []
    n_items = next(z for rs in cellmap.values() for r in rs if (z := (r.get("post") or {}).get("zeroshot")))["limit"]
    return ["Offline zero-shot suite (built from the held-out split; " f"{n_items} items per task; Task Acc = mean of "
            "last-word acc and cloze acc_norm, as the paper averages its tasks):", "",
            markdown_table(["model", *(c for _, _, c in ZEROSHOT_COLUMNS), "Task Acc", "seeds"], rows), ""]


def section_cells(suite: str, scale: str, cellmap: dict[str, list[dict]], ref_cell: str,
                  ref_of=None, ref_label: str = "the family AdamW run", diff=paired_diff) -> list[str]:
    """ref_of(name, results) -> the reference cell's name for that row (default: ref_cell for all);
    diff(results, reference results) -> the difference column (default: paired by seed)."""
    rows = []
    for name, rs in cellmap.items():
        ref_name = ref_of(name, rs) if ref_of else ref_cell
        ref = cellmap.get(ref_name, [])
        m = rs[0]["model"]
        sched = f"{m['n_begin']}-{m['n_middle']}x{m['loops']}-{m['n_end']}" if m["n_middle"] else f"{m['n_begin']}L"
        opt = rs[0].get("optimizer_state_bytes")
        rows.append([name, rs[0]["family"], sched, fmt_count(rs[0]["unique_params"]), mean_std(ppls(rs)),
                     fmt_diff(diff(rs, ref) if ref else None) if name != ref_name else "ref",
                     f"{statistics.mean(r['train_tok_s'] for r in rs):.0f}", fmt_bytes(opt) if opt else "-", len(rs)])
    return [markdown_table(["cell", "family", "schedule", "unique params", "val ppl",
                            f"diff vs {ref_label if ref_of else ref_cell} [95% CI]",
                            "train tok/s", "optimizer state", "seeds"], rows), ""]


def section_loops(scale: str, cellmap: dict[str, list[dict]], img: Path) -> list[str]:
    lines = section_cells("loops", scale, cellmap, "loops3")

    def trained(ax):
        for fam, prefix in (("hyperloop", "loops"), ("looped", "looped_loops")):
            pts = sorted((int(n[len(prefix):]), statistics.mean(ppls(rs))) for n, rs in cellmap.items()
                         if n.startswith(prefix) and n[len(prefix):].isdigit())
            if pts:
                ax.plot(*zip(*pts), "o-", label=fam)
        ax.set_xlabel("loops (trained)")
        ax.set_ylabel("held-out perplexity")
        ax.legend()

    def override(ax):
        for n, rs in sorted(cellmap.items()):
            p = (rs[0].get("post") or {}).get("loops")
            if p:
                ks = sorted(p["by_loops"], key=int)
                ax.plot([int(k) for k in ks], [p["by_loops"][k]["ppl"] for k in ks], "o-", label=f"{n} (trained {p['trained_loops']})")
        ax.set_xlabel("loops at inference")
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=7)

    lines += [f"![](img/{_plot(img / f'loops-{scale}-trained.png', trained)})",
              f"![](img/{_plot(img / f'loops-{scale}-override.png', override)})", ""]
    return lines


def section_analysis(scale: str, cellmap: dict[str, list[dict]], img: Path) -> list[str]:
    rows, lens = [], {}
    for name, rs in cellmap.items():
        analyses = [a for r in rs if (a := (r.get("post") or {}).get("analysis"))]
        if not analyses:
            continue
        lens[name] = analyses[0]["logit_lens"]
        if not analyses[0]["cross_loop_cosine"]:  # no loops: nothing to compare across loops
            continue
        rows.append([name, *(f"{k}: {mean_std([a['cross_loop_cosine'][k] for a in analyses], 3)}"
                             for k in analyses[0]["cross_loop_cosine"])])
    if not lens:
        return []
    lines = []
    if rows:
        width = max(len(r) for r in rows)
        lines = ["Cross-loop cosine similarity of the same middle layer's output (mean over layers and tokens; "
                 "pairs of loops; mean +- std over seeds; the logit lens below is seed 0):", "",
                 markdown_table(["model", *[""] * (width - 1)], [r + [""] * (width - len(r)) for r in rows]), "",
                 *cosine_verdict(cellmap)]

    def draw(ax):
        for name, ls in lens.items():
            pts = [(p["index"], p["loss"]) for p in ls if p["stage"] != "streams"]
            ax.plot(*zip(*pts), "o-", ms=3, label=name)
            sp = [(p["index"], p["loss"]) for p in ls if p["stage"] == "streams"]
            if sp:
                ax.plot(*zip(*sp), "s", ms=6, mfc="none", label=f"{name} (stream mean after each HC site)")
        ax.set_xlabel("virtual layer (unrolled depth) / HC site")
        ax.set_ylabel("logit-lens loss")
        ax.legend(fontsize=7)

    lines += [f"![](img/{_plot(img / f'analysis-{scale}-logit-lens.png', draw)})", ""]
    return lines


def section_optimizers(scale: str, cellmap: dict[str, list[dict]], img: Path) -> list[str]:
    """AdamW vs GaLore vs one-sided LoRA: held-out ppl beside optimizer-state memory, per cell."""
    lines = section_cells("optimizers", scale, cellmap, "", ref_of=lambda n, rs: f"{rs[0]['family']}_adamw")
    names = list(cellmap)

    def draw(ax):
        ppl = [statistics.mean(ppls(cellmap[n])) for n in names]
        mem = [(cellmap[n][0].get("optimizer_state_bytes") or 0) / 2**20 for n in names]
        colors = ["C0" if n.startswith("transformer") else "C3" for n in names]
        ax.scatter(mem, ppl, c=colors)
        for n, x, y in zip(names, mem, ppl):
            ax.annotate(n.split("_", 1)[1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("optimizer state (MiB, measured)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("blue: Transformer, red: Hyperloop", fontsize=8)

    return lines + [f"![](img/{_plot(img / f'optimizers-{scale}.png', draw)})", ""]


def render_report(results_root: Path = Path("reports/reproduce"), docs: Path = Path("docs/reproduction.md")) -> Path:
    results = load_results(results_root)
    img = docs.parent / "img"
    out = ["# Reproduction at our scale", "",
           "Generated by `hyperloop-lm reproduce` from the result files under `reports/reproduce/` "
           "(re-render with `hyperloop-lm reproduce --render-only`). Perplexities are on the held-out split of the "
           "bundled english-mix corpus; mean +- std over seeds; differences are paired by seed with a 95% "
           "t-interval (none with one seed), except in the ablation suite, whose many small cells share one "
           "seed spread pooled over the suite (its section says how large). The paper ran one seed per cell.", ""]
    for (suite, scale), cellmap in sorted(results.items()):
        cmds = sorted({r["command"] for rs in cellmap.values() for r in rs if r.get("command") and not r.get("reused_from")})
        cmds = cmds or [f"hyperloop-lm reproduce --suite {suite} --scale {scale}"]
        reused = sorted({r["reused_from"].split("/")[0] for rs in cellmap.values() for r in rs if r.get("reused_from")})
        n_seeds = max(len(rs) for rs in cellmap.values())
        out += [f"## {suite} @ {scale}", "", f"Command{'s' if len(cmds) > 1 else ''}: " + ", ".join(f"`{c}`" for c in cmds)
                + f" ({n_seeds} seed(s) present)" + (f"; cells identical to the {', '.join(reused)} suite's runs "
                                                     "are reused from it" if reused else ""), ""]
        if suite == "table1":
            out += section_table1(scale, cellmap, img)
        elif suite == "loops":
            out += section_loops(scale, cellmap, img)
        elif suite == "analysis":
            out += section_analysis(scale, cellmap, img)
        elif suite == "optimizers":
            out += section_optimizers(scale, cellmap, img)
        elif suite == "recipes":
            out += section_cells(suite, scale, cellmap, "", ref_of=lambda n, rs: f"{rs[0]['family']}_pytorch_lr4e-4",
                                 ref_label="the family's PyTorch-init run") + recipe_verdicts(cellmap)
        elif suite == "ablations":
            out += section_cells(suite, scale, cellmap, "hyperloop", diff=suite_diff(pooled_spread(cellmap)))
            out += ablation_verdicts(cellmap)
        else:
            out += section_cells(suite, scale, cellmap, next(iter(cellmap)))
        if suite in ("table1", "analysis"):
            out += section_analysis(scale, cellmap, img) if suite == "table1" else []
    head = 4  # title and introduction
    atomic_write_text(docs, "\n".join(out[:head] + summary(out[head:]) + out[head:]) + "\n")
    return docs


def summary(body: list[str]) -> list[str]:
    """The verdict lines of every section, gathered by outcome, so the report states up front where our
    results agree with the paper and where they do not."""
    groups = {"Agrees": [], "Disagrees": [], "Same direction, one seed (no interval yet)": [], "Not settled": []}
    section, seen = "", set()
    for line in body:
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith(("- ", "Cross-loop similarity against")) and line not in seen:  # table1 repeats analysis
            seen.add(line)
            text = f"- [{section}] {line.removeprefix('- ')}"
            if "**agrees**" in line:
                groups["Agrees"].append(text)
            elif "**disagrees**" in line or "**opposite direction**" in line:
                groups["Disagrees"].append(text)
            elif "same direction" in line:
                groups["Same direction, one seed (no interval yet)"].append(text)
            elif "inconclusive" in line:
                groups["Not settled"].append(text)
    if not any(groups.values()):
        return []
    out = ["## Summary: where we agree with the paper and where we do not", "",
           "Every comparison with a paper number below, gathered from the sections that follow (a verdict needs "
           "a 95% interval over seeds that excludes 0; one-seed cells give a direction only).", ""]
    for title, lines in groups.items():
        if lines:
            out += [f"**{title}** ({len(lines)}):", "", *lines, ""]
    return out
