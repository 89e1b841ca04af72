"""Fit the iso-depth scaling law of looped transformers (spec section 7, arXiv 2604.21106).

    L(N_once, N_rec, r, D) = E + A * (N_once + r**phi * N_rec) ** (-alpha) + B * D ** (-beta)

N_once: parameters run once (prelude + coda); N_rec: parameters of the looped block; r: number of
recurrences; D: training tokens. phi measures what a loop is worth: phi = 1, a loop is worth a
unique block; phi = 0, it is worth nothing.

The fit follows the paper (Chinchilla approach 3): in log space, with theta = (a, b, e, alpha,
beta, phi), a = log A, b = log B, e = log E,

    pred_i = LSE(a - alpha * log N_eff_i, b - beta * log D_i, e)
    objective(theta) = sum_i Huber_delta(pred_i - log L_i),   delta = 1e-3,

minimized with L-BFGS-B (analytic gradient) from many random starts in a box; the best start wins.
Uncertainty comes from a block bootstrap over (budget, architecture) cells: runs that share a
budget and an architecture (e.g. the widths of one loop configuration at one FLOP budget) are
resampled together, because their errors are correlated.

Inputs are run records with keys n_once, n_rec, r, tokens, val_loss, budget and arch (or
family), from summary.json files or a CSV; see observation_from_record. Fitting is CPU-only
numpy/scipy; with threadpoolctl installed, BLAS is held to one thread during fits (much faster).

Typical use::

    obs = load_summaries(Path("runs").glob("*/summary.json"))
    fit = fit_iso_depth(obs)
    boot = bootstrap_phi(obs, fit=fit)
    print(report(obs, fit, "reports/scaling", boot=boot, chinchilla=fit_chinchilla(obs)))
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from hyperloop_lm.utils import UserError, atomic_path, atomic_write_text

__all__ = [
    "PARAM_NAMES",
    "BOX",
    "Observation",
    "FitData",
    "FitResult",
    "BootstrapResult",
    "iso_depth_objective",
    "predict_loss",
    "fit_iso_depth",
    "fit_chinchilla",
    "bootstrap_phi",
    "observation_from_record",
    "load_summaries",
    "load_csv",
    "plot_fitted_vs_observed",
    "plot_loss_vs_neff",
    "looping_penalty",
    "budget_order",
    "report",
]

# Natural-scale parameters, in the order used for bootstrap samples and reports.
PARAM_NAMES: tuple[str, ...] = ("E", "A", "alpha", "B", "beta", "phi")
# Optimizer coordinates, in the order of the vector theta.
THETA_NAMES: tuple[str, ...] = ("a", "b", "e", "alpha", "beta", "phi")
# The paper's box: random starts are drawn from it, and it bounds L-BFGS-B.
BOX: dict[str, tuple[float, float]] = {
    "a": (-5.0, 35.0),
    "b": (-5.0, 35.0),
    "e": (-3.0, 2.0),
    "alpha": (0.0, 2.5),
    "beta": (0.0, 2.5),
    "phi": (-3.0, 3.0),
}
_PHI = THETA_NAMES.index("phi")

# Huber values are ~delta * |residual| (~1e-5 per run); L-BFGS-B's stopping tests are absolute
# at that scale, so we hand it objective / delta and tight tolerances, or it stops too early.
_LBFGSB_OPTIONS = {"ftol": 1e-13, "gtol": 1e-9, "maxiter": 2000}


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread while fitting, when threadpoolctl is installed.

    L-BFGS-B on 6 parameters makes thousands of tiny BLAS calls; OpenBLAS threads only add
    synchronisation: measured 20-50x slower with 2 threads on a busy 2-core machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it the fit is right, only slower on busy machines
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One training run.

    cell: the (budget, architecture) key of the block bootstrap. `architecture` names a loop
    configuration (e.g. "2-4x4-2" or "r=4"); runs of several widths at one budget share a cell.
    """

    n_once: float  # parameters run once (prelude + coda); may be 0
    n_rec: float  # parameters of the looped block; may be 0 (then phi has no effect on this run)
    r: float  # recurrences of the looped block, >= 1
    tokens: float  # training tokens D
    loss: float  # final validation loss (nats/token)
    cell: tuple[Any, str]  # (budget, architecture)
    label: str = ""
    family: str = ""  # model family (hyperloop, looped, ...), informational

    def __post_init__(self) -> None:
        name = f"observation {self.label!r}" if self.label else "observation"
        values = {"n_once": self.n_once, "n_rec": self.n_rec, "r": self.r,
                  "tokens": self.tokens, "loss": self.loss}
        for key, value in values.items():
            if not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise UserError(f"{name}: {key} must be a finite number, got {value!r}")
        if self.loss <= 0:
            raise UserError(f"{name}: loss must be positive, got {self.loss}")
        if self.tokens <= 0:
            raise UserError(f"{name}: tokens must be positive, got {self.tokens}")
        if self.r < 1:
            raise UserError(f"{name}: r (recurrences) must be >= 1, got {self.r}")
        if self.n_once < 0 or self.n_rec < 0 or self.n_once + self.n_rec <= 0:
            raise UserError(f"{name}: n_once and n_rec must be >= 0 and not both 0, "
                            f"got {self.n_once}, {self.n_rec}")
        if not (isinstance(self.cell, tuple) and len(self.cell) == 2):
            raise UserError(f"{name}: cell must be a (budget, architecture) pair, "
                            f"got {self.cell!r}")

    @property
    def budget(self) -> Any:
        return self.cell[0]

    @property
    def arch(self) -> str:
        return self.cell[1]


@dataclass(frozen=True)
class FitData:
    """Log-space arrays the objective works on (log 0 = -inf is allowed for n_once / n_rec)."""

    log_n_once: np.ndarray
    log_n_rec: np.ndarray
    log_r: np.ndarray
    log_d: np.ndarray
    log_loss: np.ndarray

    @classmethod
    def from_observations(cls, obs: Sequence[Observation]) -> "FitData":
        def col(name: str) -> np.ndarray:
            return np.array([getattr(o, name) for o in obs], dtype=float)

        with np.errstate(divide="ignore"):  # log(0) = -inf is intended: that term vanishes
            return cls(np.log(col("n_once")), np.log(col("n_rec")), np.log(col("r")),
                       np.log(col("tokens")), np.log(col("loss")))

    def take(self, idx: np.ndarray) -> "FitData":
        """The rows `idx` (with repeats), for bootstrap resamples."""
        return FitData(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.log_loss)


def _log_n_eff(phi: float, data: FitData) -> tuple[np.ndarray, np.ndarray]:
    """log N_eff = log(N_once + r^phi N_rec), computed stably; also the looped share of N_eff."""
    log_rec = phi * data.log_r + data.log_n_rec
    log_n_eff = np.logaddexp(data.log_n_once, log_rec)
    return log_n_eff, np.exp(log_rec - log_n_eff)


def _predict_log(theta: np.ndarray, data: FitData) -> np.ndarray:
    """pred = LSE(a - alpha log N_eff, b - beta log D, e), the predicted log loss."""
    a, b, e, alpha, beta, phi = theta
    log_n_eff, _ = _log_n_eff(phi, data)
    return np.logaddexp(np.logaddexp(a - alpha * log_n_eff, b - beta * data.log_d), e)


def iso_depth_objective(theta: np.ndarray, data: FitData, delta: float = 1e-3
                        ) -> tuple[float, np.ndarray]:
    """The paper's objective sum_i Huber_delta(pred_i - log L_i) and its gradient in theta.

    theta = (a, b, e, alpha, beta, phi); see the module docstring.
    """
    a, b, e, alpha, beta, phi = theta
    log_n_eff, rec_share = _log_n_eff(phi, data)
    t_param = a - alpha * log_n_eff
    t_data = b - beta * data.log_d
    pred = np.logaddexp(np.logaddexp(t_param, t_data), e)
    res = pred - data.log_loss
    dres = np.clip(res, -delta, delta)  # Huber'(res)
    huber = dres * (res - 0.5 * dres)  # = res^2/2 if |res| <= delta else delta (|res| - delta/2)

    # d pred / d term is that term's softmax weight exp(term - pred).
    g_param = dres * np.exp(t_param - pred)
    g_data = dres * np.exp(t_data - pred)
    grad = np.array([
        g_param.sum(),                                   # a
        g_data.sum(),                                    # b
        dres @ np.exp(e - pred),                         # e
        -(g_param @ log_n_eff),                          # alpha
        -(g_data @ data.log_d),                          # beta
        -alpha * (g_param @ (rec_share * data.log_r)),   # phi: d log N_eff / d phi = share * log r
    ])
    return float(huber.sum()), grad


def predict_loss(params: Mapping[str, float], obs: Sequence[Observation]) -> np.ndarray:
    """Loss the law with natural-scale `params` (E, A, alpha, B, beta, phi) predicts for `obs`."""
    return np.exp(_predict_log(_theta_from_params(params), FitData.from_observations(obs)))


def _theta_from_params(params: Mapping[str, float]) -> np.ndarray:
    phi = params.get("phi")
    return np.array([math.log(params["A"]), math.log(params["B"]), math.log(params["E"]),
                     params["alpha"], params["beta"], 0.0 if phi is None else phi])


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """Best fit of the law. phi is None for a per-architecture Chinchilla fit (N = N_once + N_rec).

    residuals: log L_observed - log L_fitted, one per observation, in input order.
    r2 / r2_log: coefficient of determination on L / on log L.
    """

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    phi: float | None
    loss: float  # the objective (sum of Huber) at the optimum
    r2: float
    r2_log: float
    residuals: np.ndarray
    n_obs: int
    n_starts: int
    converged: bool  # L-BFGS-B reported success for the winning start
    theta: np.ndarray = field(repr=False)  # (a, b, e, alpha, beta, phi) for warm starts

    @property
    def params(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in PARAM_NAMES}

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("residuals", "theta")}
        out["residuals"] = [float(x) for x in self.residuals]
        return out


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - yhat) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def _minimize_multistart(data: FitData, n_starts: int, rng: np.random.Generator, delta: float,
                         fixed_phi: float | None = None,
                         warm_starts: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, bool]:
    """Best of L-BFGS-B runs from `warm_starts` plus `n_starts` uniform starts in BOX.

    With fixed_phi, phi is held at that value and only the other five coordinates move.
    Returns (theta, converged).
    """
    free = [i for i in range(len(THETA_NAMES)) if not (i == _PHI and fixed_phi is not None)]
    bounds = np.array([BOX[THETA_NAMES[i]] for i in free])
    base = np.zeros(len(THETA_NAMES))
    if fixed_phi is not None:
        base[_PHI] = fixed_phi

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = base.copy()
        theta[free] = x
        value, grad = iso_depth_objective(theta, data, delta)
        return value / delta, grad[free] / delta  # rescaled, see _LBFGSB_OPTIONS

    starts = [np.clip(np.asarray(w, float)[free], bounds[:, 0], bounds[:, 1]) for w in warm_starts]
    starts += list(rng.uniform(bounds[:, 0], bounds[:, 1], size=(n_starts, len(free))))
    best = None
    with _single_threaded_blas():
        for x0 in starts:
            res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                           options=_LBFGSB_OPTIONS)
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise RuntimeError("every start of the scaling-law fit produced a non-finite objective")
    theta = base.copy()
    theta[free] = best.x
    return theta, bool(best.success)


def _result(theta: np.ndarray, data: FitData, delta: float, n_starts: int, converged: bool,
            report_phi: bool = True) -> FitResult:
    log_pred = _predict_log(theta, data)
    a, b, e, alpha, beta, phi = (float(x) for x in theta)
    return FitResult(
        E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta,
        phi=phi if report_phi else None,
        loss=iso_depth_objective(theta, data, delta)[0],
        r2=_r2(np.exp(data.log_loss), np.exp(log_pred)),
        r2_log=_r2(data.log_loss, log_pred),
        residuals=data.log_loss - log_pred,
        n_obs=len(data), n_starts=n_starts, converged=converged, theta=theta,
    )


def _check_fit_args(obs: Sequence[Observation], n_params: int, n_starts: int, delta: float) -> None:
    if len(obs) < n_params:
        raise UserError(f"the scaling-law fit has {n_params} parameters and needs at least that "
                        f"many observations, got {len(obs)}")
    if n_starts < 1:
        raise UserError(f"n_starts must be >= 1, got {n_starts}")
    if not delta > 0:
        raise UserError(f"the Huber delta must be positive, got {delta}")


def fit_iso_depth(obs: Sequence[Observation], n_starts: int = 500, seed: int = 0,
                  delta: float = 1e-3, fixed_phi: float | None = None) -> FitResult:
    """Joint fit of the iso-depth law to all observations (the paper's procedure).

    fixed_phi: hold phi at a value (e.g. 1.0 or 0.0) to test a hypothesis against the free fit.
    """
    n_params = 5 if fixed_phi is not None else 6
    _check_fit_args(obs, n_params, n_starts, delta)
    data = FitData.from_observations(obs)
    theta, ok = _minimize_multistart(data, n_starts, np.random.default_rng(seed), delta, fixed_phi)
    return _result(theta, data, delta, n_starts, ok)


def fit_chinchilla(obs: Sequence[Observation], n_starts: int = 500, seed: int = 0,
                   delta: float = 1e-3) -> dict[str, FitResult]:
    """Per-architecture Chinchilla fit L = E + A N^-alpha + B D^-beta with N = N_once + N_rec.

    Same objective and optimizer as the joint fit: phi = 0 makes N_eff = N_once + N_rec.
    Returns {architecture: FitResult (phi None)}, architectures in first-seen order.
    """
    by_arch: dict[str, list[Observation]] = {}
    for o in obs:
        by_arch.setdefault(o.arch, []).append(o)
    out = {}
    for arch, group in by_arch.items():
        try:
            _check_fit_args(group, 5, n_starts, delta)
        except UserError as err:
            raise UserError(f"architecture {arch!r}: {err}") from None
        data = FitData.from_observations(group)
        theta, ok = _minimize_multistart(data, n_starts, np.random.default_rng(seed), delta,
                                         fixed_phi=0.0)
        out[arch] = _result(theta, data, delta, n_starts, ok, report_phi=False)
    return out


# --------------------------------------------------------------------------------------------
# Block bootstrap
# --------------------------------------------------------------------------------------------


@dataclass
class BootstrapResult:
    """Block-bootstrap distribution of the natural-scale parameters.

    samples: (n_resamples, 6), columns PARAM_NAMES. intervals: percentile interval per parameter.
    """

    samples: np.ndarray
    intervals: dict[str, tuple[float, float]]
    level: float
    n_resamples: int
    n_cells: int

    @property
    def phi_interval(self) -> tuple[float, float]:
        return self.intervals["phi"]

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "n_resamples": self.n_resamples, "n_cells": self.n_cells,
                "intervals": {k: list(v) for k, v in self.intervals.items()},
                "samples": {name: self.samples[:, i].tolist()
                            for i, name in enumerate(PARAM_NAMES)}}


def bootstrap_phi(obs: Sequence[Observation], n_resamples: int = 200, seed: int = 0,
                  n_starts: int = 10, delta: float = 1e-3, fit: FitResult | None = None,
                  level: float = 0.95) -> BootstrapResult:
    """Block bootstrap over (budget, architecture) cells: percentile intervals for all parameters.

    Each resample draws as many cells as there are, with replacement, and refits warm-started
    from the full fit plus `n_starts` random starts (on synthetic data the random starts beat the
    warm start in 1 of 40 resamples, with the same phi). `fit` is the full-data fit; it is
    computed (500 starts) when not given.
    """
    if n_resamples < 1:
        raise UserError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < level < 1:
        raise UserError(f"level must be in (0, 1), got {level}")
    if n_starts < 0:
        raise UserError(f"n_starts must be >= 0 (0: warm start only), got {n_starts}")
    _check_fit_args(obs, 6, 1, delta)
    cells: dict[tuple[Any, str], list[int]] = {}
    for i, o in enumerate(obs):
        cells.setdefault(o.cell, []).append(i)
    if len(cells) < 2:
        raise UserError("the block bootstrap needs at least 2 (budget, architecture) cells, "
                        f"got {len(cells)}")
    if fit is None:
        fit = fit_iso_depth(obs, seed=seed, delta=delta)
    data = FitData.from_observations(obs)
    blocks = [np.array(v) for v in cells.values()]
    # Separate streams: the resamples drawn do not depend on n_starts.
    cell_rng, start_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    samples = np.empty((n_resamples, len(PARAM_NAMES)))
    for k in range(n_resamples):
        idx: np.ndarray = np.array([], dtype=int)
        while len(idx) < len(THETA_NAMES):  # tiny data: redraw until the fit is determined
            draw = cell_rng.integers(len(blocks), size=len(blocks))
            idx = np.concatenate([blocks[j] for j in draw])
        theta, _ = _minimize_multistart(data.take(idx), n_starts, start_rng, delta,
                                        warm_starts=[fit.theta])
        a, b, e, alpha, beta, phi = theta
        samples[k] = [math.exp(e), math.exp(a), alpha, math.exp(b), beta, phi]
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail], axis=0)
    intervals = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(PARAM_NAMES)}
    return BootstrapResult(samples, intervals, level, n_resamples, len(cells))


# --------------------------------------------------------------------------------------------
# Loading observations
# --------------------------------------------------------------------------------------------

_REQUIRED = ("n_once", "n_rec", "r", "tokens", "val_loss", "budget")


def _number(value: Any, key: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key} must be a number, got {value!r}") from None


def _budget(value: Any) -> Any:
    """Budgets compare as numbers when they are numbers ("4.6e17" == 4.6e17), else as text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def observation_from_record(record: Mapping[str, Any], where: str = "record") -> Observation:
    """One observation from a run record (a summary.json dict or a CSV row).

    Keys: n_once, n_rec (parameter counts), r (recurrences), tokens (training tokens D),
    val_loss (final validation loss, nats/token), budget (FLOP budget or any label: the first
    half of the bootstrap cell), and arch (architecture / loop configuration, the second half;
    `family` is used when arch is absent). Optional: label (defaults to `where`), family.
    Other keys are ignored. `where` names the source in error messages.
    """
    missing = [k for k in _REQUIRED if k not in record or record[k] in (None, "")]
    arch = record.get("arch") or record.get("family")
    if not arch:
        missing.append("arch (or family)")
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    nums = {k: _number(record[k], k, where) for k in ("n_once", "n_rec", "r", "tokens", "val_loss")}
    label = str(record.get("label") or where)
    try:
        return Observation(
            n_once=nums["n_once"], n_rec=nums["n_rec"], r=nums["r"], tokens=nums["tokens"],
            loss=nums["val_loss"], cell=(_budget(record["budget"]), str(arch)),
            label=label, family=str(record.get("family") or ""),
        )
    except UserError as err:
        if label == where:  # the message already names the source
            raise
        raise UserError(f"{where}: {err}") from None


def load_summaries(paths: Iterable[str | os.PathLike]) -> list[Observation]:
    """Observations from run summary.json files (each one record, or a list of records).

    See observation_from_record for the keys.
    """
    out = []
    for path in paths:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        records = payload if isinstance(payload, list) else [payload]
        for j, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise UserError(f"{path}: expected a JSON object (or a list of them)")
            where = str(path) if len(records) == 1 else f"{path}[{j}]"
            out.append(observation_from_record(rec, where))
    return out


def load_csv(path: str | os.PathLike) -> list[Observation]:
    """Observations from a CSV with a header row naming the observation_from_record keys."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    return [observation_from_record(row, f"{path}:{i + 2}") for i, row in enumerate(rows)]


# --------------------------------------------------------------------------------------------
# Model-free view
# --------------------------------------------------------------------------------------------


def looping_penalty(obs: Sequence[Observation]) -> list[dict[str, Any]]:
    """Loss of each looped run minus the non-looped (r = 1) run of the same width and budget.

    At iso-depth every r of one width costs the same FLOPs and sees (nearly) the same tokens, so the data
    term of the law cancels and the difference is the price of sharing the middle's weights, with no
    fitted parameter involved (a smaller penalty at the same r means a larger phi). Runs are grouped by
    (budget, N_once), i.e. by width at a budget (not by tokens: Hyperloop's per-loop sites add a little
    compute per loop, so its more-looped runs get ~1% fewer tokens at a budget); groups without an r = 1
    run are left out. One row per group: budget, n_once, tokens (of the r = 1 run), base_loss, and
    {r: penalty} in `penalty`.
    """
    groups: dict[tuple[Any, float], dict[float, Observation]] = {}
    for o in obs:
        groups.setdefault((o.budget, o.n_once), {})[o.r] = o
    rows = []
    for (budget, n_once), by_r in sorted(groups.items(), key=lambda kv: (budget_order(kv[0][0]), kv[0][1])):
        if 1.0 in by_r:
            base = by_r[1.0]
            rows.append({"budget": budget, "n_once": n_once, "tokens": base.tokens, "base_loss": base.loss,
                         "penalty": {r: o.loss - base.loss for r, o in sorted(by_r.items()) if r != 1.0}})
    return rows


def budget_order(budget: Any) -> tuple[bool, Any]:
    """Numbers first, in numeric order, then text labels."""
    return (isinstance(budget, str), budget)


def _penalty_table(rows: Sequence[Mapping[str, Any]]) -> str:
    rs = sorted({r for row in rows for r in row["penalty"]})
    head = ["| budget | N_once | tokens | loss r=1 |"] + [f" r={r:g} |" for r in rs]
    lines = ["".join(head), "|---" * (4 + len(rs)) + "|"]
    for row in rows:
        b = row["budget"]
        cells = [f"| {b:.0e} |" if isinstance(b, float) else f"| {b} |",
                 f" {row['n_once']:,.0f} | {row['tokens']:,.0f} | {row['base_loss']:.4f} |"]
        cells += [f" {row['penalty'][r]:+.4f} |" if r in row["penalty"] else " - |" for r in rs]
        lines.append("".join(cells))
    if rows:
        means = [np.mean([row["penalty"][r] for row in rows if r in row["penalty"]]) for r in rs]
        lines.append("| mean | | | |" + "".join(f" {m:+.4f} |" for m in means))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots and report
# --------------------------------------------------------------------------------------------

_MARKERS = "osD^vP*Xph<>"


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _r_colors(obs: Sequence[Observation]) -> dict[float, Any]:
    from matplotlib import colormaps

    rs = sorted({o.r for o in obs})
    cmap = colormaps["viridis"]
    return {r: cmap(i / max(len(rs) - 1, 1)) for i, r in enumerate(rs)}


def plot_fitted_vs_observed(obs: Sequence[Observation], fit: FitResult,
                            path: str | os.PathLike) -> None:
    """Scatter of fitted vs observed loss with the y = x line, colored by r."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    observed = np.array([o.loss for o in obs])
    fitted = observed / np.exp(fit.residuals)
    colors = _r_colors(obs)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for r, color in colors.items():
        mask = np.array([o.r == r for o in obs])
        ax.scatter(observed[mask], fitted[mask], color=color, label=f"r={r:g}", s=18)
    lims = [min(observed.min(), fitted.min()), max(observed.max(), fitted.max())]
    ax.plot(lims, lims, "k--", lw=1, label="y = x")
    ax.set_xlabel("observed loss")
    ax.set_ylabel("fitted loss")
    ax.set_title(f"iso-depth fit, R² = {fit.r2:.4f}")
    ax.legend()
    _save(fig, Path(path))


def plot_loss_vs_neff(obs: Sequence[Observation], fit: FitResult,
                      path: str | os.PathLike) -> None:
    """Observed (filled) and fitted (x) loss vs N_eff at the fitted phi; color r, marker budget."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    phi = fit.phi if fit.phi is not None else 0.0
    n_eff = np.array([o.n_once + o.r**phi * o.n_rec for o in obs])
    observed = np.array([o.loss for o in obs])
    fitted = observed / np.exp(fit.residuals)
    colors = _r_colors(obs)
    budgets = sorted({o.budget for o in obs}, key=budget_order)
    markers = {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(budgets)}
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for i, o in enumerate(obs):
        ax.scatter(n_eff[i], observed[i], color=colors[o.r], marker=markers[o.budget], s=22)
        ax.scatter(n_eff[i], fitted[i], color=colors[o.r], marker="x", s=14, lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"N_eff = N_once + r^φ N_rec  (φ = {phi:.3f})")
    ax.set_ylabel("validation loss")
    handles = [Line2D([], [], color=c, marker="o", ls="", label=f"r={r:g}")
               for r, c in colors.items()]
    handles += [Line2D([], [], color="gray", marker=m, ls="",
                       label=f"budget {b:.3g}" if isinstance(b, float) else f"budget {b}")
                for b, m in markers.items()]
    handles.append(Line2D([], [], color="gray", marker="x", ls="", label="fitted"))
    ax.legend(handles=handles, fontsize=7, ncol=2)
    _save(fig, Path(path))


def _fmt_interval(boot: BootstrapResult | None, name: str) -> str:
    if boot is None:
        return ""
    lo, hi = boot.intervals[name]
    return f" [{lo:.3f}, {hi:.3f}]"


def report(obs: Sequence[Observation], fit: FitResult, out_dir: str | os.PathLike,
           boot: BootstrapResult | None = None,
           chinchilla: Mapping[str, FitResult] | None = None) -> str:
    """Write scaling_fit.json, fitted_vs_observed.png and loss_vs_neff.png into `out_dir`.

    Returns a markdown table: phi [95% interval], alpha, beta, E, R^2, runs (plus one row per
    architecture when per-architecture Chinchilla fits are given).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    penalty = looping_penalty(obs)
    payload = {
        "law": "L = E + A * (N_once + r^phi * N_rec)^(-alpha) + B * D^(-beta)",
        "fit": fit.to_dict(),
        "bootstrap": boot.to_dict() if boot is not None else None,
        "chinchilla": {k: v.to_dict() for k, v in (chinchilla or {}).items()},
        "looping_penalty": [{**row, "penalty": {f"{r:g}": v for r, v in row["penalty"].items()}}
                            for row in penalty],
        "observations": [{**asdict(o), "cell": list(o.cell)} for o in obs],
    }
    atomic_write_text(out_dir / "scaling_fit.json", json.dumps(payload, indent=1) + "\n")
    plot_fitted_vs_observed(obs, fit, out_dir / "fitted_vs_observed.png")
    plot_loss_vs_neff(obs, fit, out_dir / "loss_vs_neff.png")

    level = f"{100 * boot.level:g}% " if boot is not None else ""
    phi = "-" if fit.phi is None else f"{fit.phi:.3f}{_fmt_interval(boot, 'phi')}"
    rows = [f"| fit | phi {level}| alpha | beta | E | R^2 | runs |",
            "|---|---|---|---|---|---|---|",
            f"| iso-depth (joint) | {phi} | {fit.alpha:.3f} | {fit.beta:.3f} | {fit.E:.3f} | "
            f"{fit.r2:.4f} | {fit.n_obs} |"]
    for arch, f in (chinchilla or {}).items():
        rows.append(f"| Chinchilla {arch} | - | {f.alpha:.3f} | {f.beta:.3f} | {f.E:.3f} | "
                    f"{f.r2:.4f} | {f.n_obs} |")
    notes = []
    if boot is not None:
        phis = boot.samples[:, PARAM_NAMES.index("phi")]
        q1, med, q3 = np.percentile(phis, [25, 50, 75])
        notes.append(f"Bootstrap phi: median {med:.3f}, quartiles [{q1:.3f}, {q3:.3f}] "
                     f"({boot.n_resamples} resamples of {boot.n_cells} cells).")
        lo, hi = boot.phi_interval
        if lo <= BOX["phi"][0] + 1e-6 or hi >= BOX["phi"][1] - 1e-6:
            notes.append("**The phi interval reaches the edge of the search box: these runs do not "
                         "identify phi.**")
    at_bound = [shown for name, shown in (("alpha", "alpha"), ("beta", "beta"), ("e", "E"))
                if min(abs(fit.theta[THETA_NAMES.index(name)] - edge) for edge in BOX[name]) < 1e-6]
    if at_bound:
        notes.append(f"The joint fit has {', '.join(at_bound)} on the box edge.")
    if penalty:
        notes.append("Looping penalty (model-free): validation loss minus the r = 1 run of the same "
                     "width and budget (same FLOPs, same tokens; positive = the looped model is worse):\n\n"
                     + _penalty_table(penalty))
    return "\n\n".join(["\n".join(rows), *notes])
