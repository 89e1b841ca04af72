"""The reproduction pipeline end to end at micro scale: train, post-measure, resume-skip, render."""
import json

from hyperloop_lm.experiments.report import paired_diff
from hyperloop_lm.experiments.reproduce import redo_post, reproduce
from hyperloop_lm.experiments.suites import SCALES, cells


def test_reproduce_micro_end_to_end(train_corpus, cache_env, tmp_path):
    kw = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "results", corpus=str(train_corpus),
              docs=tmp_path / "docs" / "reproduction.md")
    # two worker processes: the pool path, where a fork inside lm-eval once deadlocked a worker
    paths = reproduce("table1", "micro", seeds=2, only=["transformer", "hyperloop"], workers=2, **kw)
    assert len(paths) == 4
    r = json.loads(paths[0].read_text())
    assert r["val"]["ppl"] > 1 and r["history"] and r["git"] and r["machine"]
    assert "analysis" in r["post"]
    assert (tmp_path / "results" / "table1" / "micro" / "random_init__seed0.json").exists()  # the chance row
    before = {p: p.stat().st_mtime for p in paths}
    reproduce("table1", "micro", seeds=2, only=["transformer", "hyperloop"], **kw)  # all finished: skipped
    assert {p: p.stat().st_mtime for p in paths} == before
    # post-training measurements can be redone on the finished cells' checkpoints
    redone = redo_post("table1", "micro", ["analysis"], ["hyperloop"], runs_root=kw["runs_root"],
                       results_root=kw["results_root"], corpus=kw["corpus"])
    assert len(redone) == 2 and all(json.loads(p.read_text())["post_git"] for p in redone)
    # the analysis suite's cells are table1's (same config, seed and posts): reused, not retrained
    (analysis,) = reproduce("analysis", "micro", seeds=1, only=["hyperloop"], **kw)
    reused = json.loads(analysis.read_text())
    assert reused["reused_from"] == "table1/micro/hyperloop__seed0.json" and reused["suite"] == "analysis"
    assert not (tmp_path / "runs" / "analysis").exists()
    doc = (tmp_path / "docs" / "reproduction.md").read_text()
    assert "## table1 @ micro" in doc and "hyperloop" in doc and "[" in doc  # a paired CI with 2 seeds
    assert "random init (chance reference)" in doc and "Task Acc" in doc
    assert list((tmp_path / "docs" / "img").glob("*.png"))


def test_paired_diff_interval():
    a = [{"seed": s, "val": {"ppl": 10 + s}} for s in range(3)]
    b = [{"seed": s, "val": {"ppl": 11 + s}} for s in range(3)]
    m, lo, hi, n = paired_diff(a, b)
    assert (m, lo, hi, n) == (-1, -1, -1, 3)


def test_every_suite_builds_cells_at_every_cpu_scale():
    for scale in ("micro", "cpu-tiny", "cpu-quick", "cpu-small"):
        for suite in ("table1", "ablations", "loops", "recipes", "analysis"):
            cs = cells(suite, SCALES[scale].preset)
            assert cs and len({c.name for c in cs}) == len(cs)
    names = {c.name for c in cells("ablations", "small")}
    assert {"middle3x4", "middle2x6", "hc_every1", "hres_sinkhorn", "hres_identity", "looped_lora4",
            "uniform_hyperloop"} <= names
