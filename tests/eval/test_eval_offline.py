"""The offline suite: deterministic, versioned, not solvable by a trivial rule, at chance for an
untrained model, and runnable from the CLI."""
from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
import torch

from hyperloop_lm.eval.offline_tasks import (CLOZE, LASTWORD, LASTWORD_GEN, SuiteParams, build_items, build_suite,
                                             load_items, split_sentences, trivial_baselines)

WORDS = ("the a of and to in that it was he for on are with as his they at be this from have or by one had not "
         "but what all were when we there can an your which their said if do will each about how up out them "
         "ship whale captain sea night river king nation people congress law money freedom justice").split()


def heavy_tailed_text(rng: random.Random, n_sentences: int) -> str:
    """Sentences of 3 to ~60 words (log-uniform lengths: many short, a long tail), in paragraphs."""
    paras, sents = [], []
    for _ in range(n_sentences):
        n = int(math.exp(rng.uniform(math.log(3), math.log(60))))
        sents.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice("..?!"))
        if rng.random() < 0.2:
            paras.append(" ".join(sents))
            sents = []
    return "\n\n".join(paras + [" ".join(sents)]) + "\n"


@pytest.fixture(scope="module")
def documents() -> list[str]:
    rng = random.Random(1)
    return [heavy_tailed_text(rng, 900) for _ in range(4)]


class SyntheticCorpus:
    """What the suite builder reads from a `Corpus`; every document counts as held out."""

    name = "synthetic"

    def __init__(self, documents: list[str]):
        self.docs = documents
        self.id = "synthetic-" + hashlib.sha256("".join(documents).encode()).hexdigest()[:12]

    def documents(self, split: str):
        return iter(self.docs)


def test_sentence_splitter_keeps_abbreviations_and_paragraphs():
    text = "Mr. Smith went to Washington, D.C. He said: \"We will win.\" Then he left!\n\nA new day. J. Doe came"
    assert split_sentences(text) == ["Mr. Smith went to Washington, D.C. He said: \"We will win.\"",
                                     "Then he left!", "A new day.", "J. Doe came"]


def test_items_are_deterministic_and_well_formed(documents):
    p = SuiteParams(max_items=300)
    a, b = build_items(documents, p), build_items(documents, p)
    assert a == b and len(a[CLOZE]) == 300 and len(a[LASTWORD]) == 300
    assert a[LASTWORD_GEN] == a[LASTWORD]
    for it in a[LASTWORD]:
        assert it["continuation"] == " " + it["target"] and it["target"].isalpha()
        assert len(it["context"].split()) + 1 >= p.passage_min_words
    for it in a[CLOZE]:
        lengths = [len(c) for c in it["choices"]]
        assert len(set(it["choices"])) == 4 and max(lengths) <= p.max_length_ratio * min(lengths)
        assert not any(c in it["context"] for c in it["choices"])  # no distractor is in the context
    # another seed draws other items
    assert build_items(documents, SuiteParams(max_items=300, seed=1))[CLOZE] != a[CLOZE]


def test_trivial_rules_are_at_chance(documents, tmp_path):
    """Choice-only rules get 1/4 in expectation (the answer is drawn after the group is formed), even
    on text whose sentence lengths are heavy-tailed. 300 items: a rule at chance has standard error
    sqrt(0.25 * 0.75 / 300) = 0.025; 0.09 (3.6 sigma) is exceeded with probability ~3e-4 by a rule at
    chance, while a length leak (distractors picked around the true sentence's length) puts the
    shortest/longest rule near 0 or 0.5."""
    p = SuiteParams(max_items=300)

    root = build_suite(SyntheticCorpus(documents), p, root=tmp_path / "suite")
    base = trivial_baselines(root)
    for rule in ("first", "last", "longest", "shortest"):
        assert abs(base[CLOZE][rule] - 0.25) < 0.09, (rule, base[CLOZE])
    golds = [it["gold"] for it in load_items(root, CLOZE)]
    assert min(golds.count(k) for k in range(4)) > 300 / 4 - 0.09 * 300
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["suite_version"] == "v1" and manifest["tasks"][CLOZE] == 300
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert build_suite(SyntheticCorpus(documents), p, root=root) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # cached: not rebuilt


def test_random_init_model_scores_at_chance(trained_runs, documents, tmp_path, cache_env):
    """An untrained model through the whole path (suite files -> lm-eval -> adapter). Cloze: 300 items,
    acc and acc_norm within 0.09 of 1/4 (3.6 standard errors, see above). Last word: the target is one of
    ~300 tokens' worth of words, often several tokens long: an untrained model essentially never gets it."""
    pytest.importorskip("lm_eval")
    from hyperloop_lm.eval.harness import HyperloopLM
    from hyperloop_lm.eval.zeroshot import evaluate_tasks
    from hyperloop_lm.model.lm import LM
    from hyperloop_lm.train.checkpoint import load_model

    trained, tok, _ = load_model(trained_runs["hyperloop"])
    torch.manual_seed(0)
    model = LM(trained.cfg).eval()
    lm = HyperloopLM(model=model, tokenizer=tok, batch_size=32, max_length=64, progress=False)
    res = evaluate_tasks(None, "offline", lm=lm, corpus=SyntheticCorpus(documents),
                         suite_params=SuiteParams(max_items=300))
    cloze = res["tasks"][CLOZE]
    assert cloze["n"] >= 200, cloze
    tol = 3.6 * math.sqrt(0.25 * 0.75 / cloze["n"])
    assert abs(cloze["acc"] - 0.25) < tol and abs(cloze["acc_norm"] - 0.25) < tol, cloze
    assert res["tasks"][LASTWORD]["acc"] < 0.02 and res["tasks"][LASTWORD_GEN]["exact_match"] < 0.02
    assert res["task_acc_metric"] == {LASTWORD: "acc", CLOZE: "acc_norm"}
    assert res["task_acc"] == pytest.approx((res["tasks"][LASTWORD]["acc"] + cloze["acc_norm"]) / 2)


def test_cli_offline_suite_writes_results(trained_runs, cache_env, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from hyperloop_lm.cli import main

    out = tmp_path / "res.json"
    assert main(["eval", "--checkpoint", str(trained_runs["looped"]), "--tasks", "offline", "--limit", "8",
                 "--batch-size", "8", "--output", str(out)]) == 0
    assert "Task Acc" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {LASTWORD, LASTWORD_GEN, CLOZE} and res["limit"] == 8
    assert res["suite"]["version"] == "v1" and res["lm_eval_version"]
    assert 0 <= res["task_acc"] <= 1 and all(r["n"] <= 8 for r in res["tasks"].values())
    assert main(["eval", "--checkpoint", str(trained_runs["looped"]), "--tasks", "offline",
                 "--include-path", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
