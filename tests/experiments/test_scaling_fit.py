"""Tests of the iso-depth scaling-law fit on synthetic data from a known law."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from hyperloop_lm.experiments.scaling_fit import (
    FitData,
    Observation,
    bootstrap_phi,
    fit_chinchilla,
    fit_iso_depth,
    iso_depth_objective,
    load_csv,
    load_summaries,
    looping_penalty,
    predict_loss,
    report,
)
from hyperloop_lm.utils import UserError

TRUE = {"E": 1.6, "A": 400.0, "alpha": 0.3, "B": 600.0, "beta": 0.35, "phi": 0.5}
TRUE_THETA = np.array([math.log(400.0), math.log(600.0), math.log(1.6), 0.3, 0.35, 0.5])


def synthetic(noise: float = 0.005, seed: int = 0, widths=(4, 6, 8, 12), n_budgets: int = 6,
              params=TRUE) -> list[Observation]:
    """The paper's grid: depth 20 = 2 prelude + (16/r) x r + 2 coda, width 64*s, iso-FLOP budgets.

    A layer has 12 d^2 parameters; FLOPs count the unrolled depth, so D = C / (6 * 20 * 12 d^2).
    Budgets span 50x. Loss gets multiplicative log-normal noise.
    """
    obs = []
    for budget in np.geomspace(1e17, 5e18, n_budgets):
        for r in (1, 2, 4, 8):
            for s in widths:
                layer = 12 * (64 * s) ** 2
                obs.append(Observation(
                    n_once=4 * layer, n_rec=(16 // r) * layer, r=r,
                    tokens=budget / (6 * 20 * layer), loss=1.0,
                    cell=(float(budget), f"2-{16 // r}x{r}-2"), label=f"C{budget:.2g}-r{r}-s{s}"))
    eps = np.random.default_rng(seed).standard_normal(len(obs))
    losses = predict_loss(params, obs) * np.exp(noise * eps)
    return [dataclasses.replace(o, loss=float(loss)) for o, loss in zip(obs, losses)]


@pytest.fixture(scope="module")
def noisy():
    obs = synthetic()
    fit = fit_iso_depth(obs, n_starts=60, seed=0)
    boot = bootstrap_phi(obs, n_resamples=60, n_starts=3, seed=1, fit=fit)
    return obs, fit, boot


def test_noisy_fit_recovers_phi_and_bootstrap_covers_truth(noisy):
    obs, fit, boot = noisy
    assert fit.n_obs == len(obs) == 96
    assert abs(fit.phi - TRUE["phi"]) < 0.05
    lo, hi = boot.phi_interval
    assert lo < TRUE["phi"] < hi
    assert hi - lo < 0.2  # informative, not the whole box
    for name in ("alpha", "beta", "E"):
        lo, hi = boot.intervals[name]
        assert lo < TRUE[name] < hi, name
    assert boot.samples.shape == (60, 6) and np.isfinite(boot.samples).all()
    # 0.5% noise on losses of 3-5.5: the law explains nearly everything, residuals ~ the noise.
    assert fit.r2 > 0.99 and fit.r2_log > 0.99
    assert 0.003 < np.std(fit.residuals) < 0.007


def test_noiseless_fit_recovers_all_parameters():
    fit = fit_iso_depth(synthetic(noise=0.0), n_starts=40, seed=3)
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-4), name
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    assert np.abs(fit.residuals).max() < 1e-6


def test_fixed_phi_fits_worse_than_free_phi():
    obs = synthetic(noise=0.0, widths=(4, 8), n_budgets=4)
    free = fit_iso_depth(obs, n_starts=10)
    pinned = fit_iso_depth(obs, n_starts=10, fixed_phi=1.0)
    assert pinned.phi == 1.0
    assert pinned.loss > 100 * free.loss


def test_chinchilla_per_architecture_matches_the_law():
    # At a fixed r, N_eff / N = (4 + 16 r^(phi-1)) / (4 + 16 / r) with N = N_once + N_rec, so the
    # per-arch Chinchilla law is exact with the same E, alpha, B, beta and A scaled by ratio^-alpha.
    fits = fit_chinchilla(synthetic(noise=0.0), n_starts=20)
    assert sorted(fits) == ["2-16x1-2", "2-2x8-2", "2-4x4-2", "2-8x2-2"]
    for arch, fit in fits.items():
        r = int(arch.split("x")[1].split("-")[0])
        c = (4 + 16 * r ** (TRUE["phi"] - 1)) / (4 + 16 / r)
        assert fit.phi is None and fit.n_obs == 24
        assert fit.alpha == pytest.approx(TRUE["alpha"], rel=1e-3), arch
        assert fit.beta == pytest.approx(TRUE["beta"], rel=1e-3), arch
        assert fit.E == pytest.approx(TRUE["E"], rel=1e-3), arch
        assert fit.A == pytest.approx(TRUE["A"] * c ** -TRUE["alpha"], rel=1e-2), arch


@pytest.mark.parametrize("delta", [1e-3, 10.0])
def test_objective_gradient_matches_finite_differences(delta):
    obs = synthetic(widths=(4, 8), n_budgets=3)
    # Runs with nothing looped / nothing run once exercise the log(0) = -inf paths.
    obs += [dataclasses.replace(obs[5], n_once=0.0), dataclasses.replace(obs[7], n_rec=0.0)]
    data = FitData.from_observations(obs)
    theta = TRUE_THETA + np.random.default_rng(0).normal(0, 2e-3, 6)
    value, grad = iso_depth_objective(theta, data, delta)
    if delta == 1e-3:  # both Huber regimes present, so both branches are checked
        res = np.abs(np.log(predict_loss(TRUE, obs)) - data.log_loss)
        assert (res < delta).any() and (res > delta).any()
    h = 1e-6
    fd = np.array([(iso_depth_objective(theta + h * e, data, delta)[0]
                    - iso_depth_objective(theta - h * e, data, delta)[0]) / (2 * h)
                   for e in np.eye(6)])
    assert np.isfinite(value) and np.all(grad != 0)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8 * np.abs(fd).max())


def test_bad_input_raises_user_error():
    obs = synthetic(widths=(4,), n_budgets=1)
    with pytest.raises(UserError, match="at least"):
        fit_iso_depth(obs[:3], n_starts=1)
    with pytest.raises(UserError, match="loss must be positive"):
        dataclasses.replace(obs[0], loss=0.0)
    with pytest.raises(UserError, match="loss must be a finite"):
        dataclasses.replace(obs[0], loss=float("nan"))
    with pytest.raises(UserError, match="r .* >= 1"):
        dataclasses.replace(obs[0], r=0.5)
    with pytest.raises(UserError, match="not both 0"):
        dataclasses.replace(obs[0], n_once=0.0, n_rec=0.0)
    with pytest.raises(UserError, match="2 .budget, architecture. cells"):
        bootstrap_phi([dataclasses.replace(o, cell=(1.0, "a")) for o in synthetic()], n_resamples=1)


def test_loaders(tmp_path):
    base = {"n_once": 1e6, "n_rec": 4e6, "r": 4, "tokens": 2e9, "val_loss": 3.5, "budget": 1e18}
    (tmp_path / "a.json").write_text(json.dumps({**base, "arch": "2-4x4-2", "family": "hyperloop"}))
    records = [{**base, "family": "looped"}, {**base, "arch": "x"}]
    (tmp_path / "b.json").write_text(json.dumps(records))
    obs = load_summaries([tmp_path / "a.json", tmp_path / "b.json"])
    assert [o.cell for o in obs] == [(1e18, "2-4x4-2"), (1e18, "looped"), (1e18, "x")]
    assert obs[0].family == "hyperloop" and obs[0].label.endswith("a.json") and obs[0].loss == 3.5

    (tmp_path / "runs.csv").write_text("n_once,n_rec,r,tokens,val_loss,budget,arch,label\n"
                                       "1e6,4e6,4,2e9,3.5,1e18,2-4x4-2,run1\n")
    (row,) = load_csv(tmp_path / "runs.csv")
    assert row == dataclasses.replace(obs[0], label="run1", family="")  # "1e18" == 1e18

    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in base.items() if k != "tokens"}))
    with pytest.raises(UserError, match=r"bad.json: missing tokens, arch \(or family\)"):
        load_summaries([tmp_path / "bad.json"])
    (tmp_path / "neg.csv").write_text("n_once,n_rec,r,tokens,val_loss,budget,arch\n"
                                      "1,1,1,1,-2,1,a\n")
    with pytest.raises(UserError, match="neg.csv:2.*loss must be positive"):
        load_csv(tmp_path / "neg.csv")
    (tmp_path / "nan.json").write_text(json.dumps({**base, "arch": "a", "label": "run7",
                                                   "val_loss": "nan"}))
    with pytest.raises(UserError, match="nan.json: observation 'run7': loss must be a finite"):
        load_summaries([tmp_path / "nan.json"])


def test_report_writes_json_pngs_and_table(noisy, tmp_path):
    obs, fit, boot = noisy
    chin = fit_chinchilla(obs, n_starts=3)
    table = report(obs, fit, tmp_path / "out", boot=boot, chinchilla=chin)
    payload = json.loads((tmp_path / "out" / "scaling_fit.json").read_text())
    assert payload["fit"]["phi"] == pytest.approx(fit.phi)
    assert payload["bootstrap"]["intervals"]["phi"] == pytest.approx(list(boot.phi_interval))
    assert len(payload["bootstrap"]["samples"]["phi"]) == 60 and len(payload["observations"]) == 96
    for png in ("fitted_vs_observed.png", "loss_vs_neff.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = table.split("\n\n")[0].splitlines()
    assert len(lines) == 3 + 4
    lo, hi = boot.phi_interval
    assert f"{fit.phi:.3f} [{lo:.3f}, {hi:.3f}]" in lines[2] and lines[2].endswith("| 96 |")
    assert "Bootstrap phi: median" in table and "Looping penalty" in table
    assert "do not identify phi" not in table  # a well-posed grid: the interval stays inside the box
    assert len(payload["looping_penalty"]) == 6 * 4  # budgets x widths, each with its r = 1 run
    # the same fit with a bootstrap that ran into the box edge says so
    edge = dataclasses.replace(boot, intervals={**boot.intervals, "phi": (-3.0, hi)})
    assert "do not identify phi" in report(obs, fit, tmp_path / "edge", boot=edge)


def test_looping_penalty_is_the_loss_difference_to_r1_at_equal_width_and_budget():
    obs = synthetic(noise=0.0, widths=(4, 8), n_budgets=2)
    rows = looping_penalty(obs)
    assert len(rows) == 2 * 2 and all(sorted(row["penalty"]) == [2.0, 4.0, 8.0] for row in rows)
    # budgets in numeric order (as text, "1e+18" would come before "3e+17")
    relabeled = [dataclasses.replace(o, cell=(3e17 if o.budget < 1e18 else 1e18, o.arch)) for o in obs]
    assert [row["budget"] for row in looping_penalty(relabeled)] == [3e17, 3e17, 1e18, 1e18]
    for row in rows:
        group = {o.r: o.loss for o in obs if (o.budget, o.n_once) == (row["budget"], row["n_once"])}
        assert row["base_loss"] == group[1.0]
        assert row["penalty"] == {r: pytest.approx(group[r] - group[1.0]) for r in (2.0, 4.0, 8.0)}
        # phi = 0.5 < 1: a loop is worth less than a unique block, more so the more it is shared
        assert 0 < row["penalty"][2.0] < row["penalty"][4.0] < row["penalty"][8.0]
    # a higher phi prices the loops higher: smaller penalties on the same grid
    richer = looping_penalty(synthetic(noise=0.0, widths=(4, 8), n_budgets=2, params={**TRUE, "phi": 0.9}))
    assert all(a["penalty"][8.0] < b["penalty"][8.0] for a, b in zip(richer, rows))
    # Hyperloop's more-looped runs get slightly fewer tokens at a budget: still one group per width and budget
    fewer = [dataclasses.replace(o, tokens=o.tokens * (1 - 0.003 * o.r)) for o in obs]
    assert [row["penalty"].keys() for row in looping_penalty(fewer)] == [row["penalty"].keys() for row in rows]
    # groups without a non-looped run are left out
    assert looping_penalty([o for o in obs if o.r != 1]) == []


def test_bootstrap_is_reproducible():
    obs = synthetic(noise=0.005, widths=(4, 8), n_budgets=4)
    fit = fit_iso_depth(obs, n_starts=5)
    a = bootstrap_phi(obs, n_resamples=3, n_starts=1, seed=7, fit=fit)
    b = bootstrap_phi(obs, n_resamples=3, n_starts=1, seed=7, fit=fit)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.n_cells == 16


@pytest.mark.slow
def test_paper_defaults_on_forty_runs():
    """The paper's settings (500 starts, 200 resamples) on a 40-run grid."""
    obs = synthetic(widths=(4, 8), n_budgets=5)
    fit = fit_iso_depth(obs)
    boot = bootstrap_phi(obs, fit=fit)
    assert abs(fit.phi - TRUE["phi"]) < 0.05
    lo, hi = boot.phi_interval
    assert lo < TRUE["phi"] < hi


def test_fit_command_reads_run_records_and_writes_a_linkable_report(tmp_path):
    """`hyperloop-lm scaling fit` on a directory of sweep records: JSON, plots and fit.md with its command."""
    from hyperloop_lm.experiments.scaling import fit

    runs = tmp_path / "records"
    runs.mkdir()
    for i, o in enumerate(synthetic(widths=(4, 8), n_budgets=3)):
        rec = {"n_once": o.n_once, "n_rec": o.n_rec, "r": o.r, "tokens": o.tokens, "val_loss": o.loss,
               "budget": o.cell[0], "arch": o.cell[1]}
        (runs / f"run{i}.json").write_text(json.dumps(rec))
    table = fit([str(runs)], str(tmp_path / "out"), n_starts=20, n_resamples=10)
    md = (tmp_path / "out" / "fit.md").read_text()
    assert "iso-depth (joint)" in table and table in md
    assert md.startswith(f"Command: `hyperloop-lm scaling fit {runs} --out {tmp_path / 'out'}")
    assert {"scaling_fit.json", "fitted_vs_observed.png", "loss_vs_neff.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    # a sweep under way: an architecture with fewer runs than a per-architecture fit needs is skipped, not fatal
    for p in sorted(runs.glob("*.json")):
        if json.loads(p.read_text())["arch"] == "2-2x8-2":
            p.unlink()
            if sum(json.loads(q.read_text())["arch"] == "2-2x8-2" for q in runs.glob("*.json")) < 5:
                break
    table = fit([str(runs)], str(tmp_path / "out2"), n_starts=20, n_resamples=10)
    assert "skipped for 2-2x8-2" in table and "Chinchilla 2-16x1-2" in table


def test_compare_pairs_the_families_penalties_by_budget_width_and_r(tmp_path):
    """`hyperloop-lm scaling compare`: each family against its own r = 1 run, then paired across families."""
    from hyperloop_lm.experiments.scaling import compare

    for family, phi in (("looped", 0.4), ("hyperloop", 0.8)):
        (tmp_path / family).mkdir()
        for i, o in enumerate(synthetic(noise=0.0, widths=(4, 8), n_budgets=2, params={**TRUE, "phi": phi})):
            rec = {"family": family, "width": 64 * int(o.label.rsplit("-s", 1)[1]), "n_once": o.n_once,
                   "n_rec": o.n_rec, "r": o.r, "tokens": o.tokens, "val_loss": o.loss, "budget": o.budget,
                   "arch": o.arch}
            (tmp_path / family / f"run{i}.json").write_text(json.dumps(rec))
    table = compare([str(tmp_path / "looped"), str(tmp_path / "hyperloop")], str(tmp_path / "out"))
    first, by_budget = table.split("\n\n", 1)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in first.splitlines()[2:]]
    per_group = [r for r in rows if not r[0].startswith("mean")]
    assert len(per_group) == 2 * 2 * 3  # budgets x widths x (r = 2, 4, 8)
    for r in per_group:  # the family with the higher phi loses less to looping, everywhere
        assert float(r[3]) > float(r[4]) > 0 and float(r[5]) == pytest.approx(float(r[4]) - float(r[3]), abs=2e-4)
    means = [r for r in rows if r[0] == "mean of 4"]
    assert [r[2] for r in means] == ["2", "4", "8"]
    for m in means:
        group = [float(r[5]) for r in per_group if r[2] == m[2]]
        assert float(m[5]) == pytest.approx(sum(group) / 4, abs=2e-4)
    # per budget, averaged over widths: the two budgets' rows average to the overall mean
    budget_rows = [[c.strip() for c in line.strip("|").split("|")] for line in by_budget.splitlines()[4:]]
    assert [float(r[0]) for r in budget_rows] == sorted({o.budget for o in synthetic(n_budgets=2)})
    assert all(float(r[-1]) < 0 for r in budget_rows)  # hyperloop (phi 0.8) loses less than looped (0.4)
    for j, m in enumerate(means):
        assert float(m[5]) == pytest.approx(sum(float(r[1 + j]) for r in budget_rows) / 2, abs=2e-4)
    md = (tmp_path / "out" / "compare.md").read_text()
    assert md.startswith("Command: `hyperloop-lm scaling compare") and table in md
    assert (tmp_path / "out" / "looping_penalty.png").read_bytes()[:4] == b"\x89PNG"
