"""The iso-depth sweep at toy size: the grid's architectures, budgets -> tokens, records, resume."""
import json

import pytest

from hyperloop_lm.experiments.scaling import arch_config, split_params, sweep
from hyperloop_lm.utils import UserError


def test_iso_depth_architectures_keep_the_unrolled_depth():
    from hyperloop_lm.config import ModelConfig

    split = {}
    for r in (1, 2, 4, 8):
        cfg = ModelConfig.from_dict(arch_config("hyperloop", 20, r, 64, 512, 128))
        assert (cfg.n_begin, cfg.n_end, cfg.loops, cfg.n_middle * r) == (2, 2, r, 16)
        split[r] = split_params(cfg)
    assert len({once for once, _ in split.values()}) == 1  # prelude + coda never change
    per_layer = (split[1][1] - split[2][1]) / 8  # 16 vs 8 looped layers (the HC overhead differs only by sites)
    assert split[2][1] > split[4][1] > split[8][1] and per_layer > 0
    with pytest.raises(UserError, match="multiple of r"):
        arch_config("looped", 20, 3, 64, 512, 128)


def test_sweep_trains_the_grid_writes_records_and_resumes(train_corpus, cache_env, tmp_path):
    kw = dict(corpus=str(train_corpus), vocab_size=512, seq_len=32, batch_size=4, runs_root=tmp_path / "runs",
              results_root=tmp_path / "results")
    grid = dict(family="hyperloop", depth=8, rs=(1, 2), widths=(32,), budgets=(1.5e9, 3e9))
    paths = sweep(**grid, workers=2, **kw)
    assert len(paths) == 4 and all(p.exists() for p in paths)
    recs = [json.loads(p.read_text()) for p in paths]
    assert {(r["r"], r["budget"]) for r in recs} == {(1, 1.5e9), (2, 1.5e9), (1, 3e9), (2, 3e9)}
    for r in recs:
        assert r["val_loss"] > 0 and r["n_once"] > 0 and r["n_rec"] > 0 and r["git"]
    # the same budget buys the same unrolled compute: about twice the tokens at twice the budget
    by = {(r["r"], r["budget"]): r["tokens"] for r in recs}
    assert 1.7 < by[(1, 3e9)] / by[(1, 1.5e9)] < 2.3
    before = {p: p.stat().st_mtime for p in paths}
    sweep(**grid, **kw)  # everything recorded: nothing retrains
    assert {p: p.stat().st_mtime for p in paths} == before
    with pytest.raises(UserError, match="raise the budgets"):
        sweep(**{**grid, "budgets": (1e6,)}, **kw)
