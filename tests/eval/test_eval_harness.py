"""The lm-eval adapter: its numbers equal a direct computation from the model's logits, and lm-eval
runs end to end on a local jsonl task without the network."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from hyperloop_lm.eval.harness import HyperloopLM, encode_pair  # noqa: E402
from hyperloop_lm.train.checkpoint import load_model  # noqa: E402
from hyperloop_lm.utils import UserError  # noqa: E402

MAX_LEN = 32


@pytest.fixture
def offline(monkeypatch):
    """The Hugging Face libraries refuse the network (they read the env at import, so patch the flags)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def adapter(run_dir, **kw) -> HyperloopLM:
    model, tok, _ = load_model(run_dir)
    return HyperloopLM(model=model, tokenizer=tok, max_length=MAX_LEN, progress=False, **kw)


def direct_ids(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of log p(cont) from one unbatched forward of the left-truncated sequence (cont must fit)."""
    assert len(cont) <= MAX_LEN
    seq = (ctx + cont)[-(MAX_LEN + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]])).float()[0], dim=-1)  # (T, V)
    target = torch.tensor(cont)
    rows = logp[-len(cont):]
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def direct_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool, int]:
    ctx = tok.encode(context) if context else [tok.eos_id]
    whole = tok.encode(context + continuation) if context else ctx + tok.encode(continuation)
    assert whole[:len(ctx)] == ctx  # a word boundary: splitting the whole encoding is unambiguous
    return (*direct_ids(model, ctx, whole[len(ctx):]), len(whole) - len(ctx))


@pytest.mark.parametrize("family", ["hyperloop", "mhc"])
def test_loglikelihood_matches_direct_computation(trained_runs, family):
    lm = adapter(trained_runs[family], batch_size=3)  # 3: several batches, padding inside each
    model, tok = lm.model, lm.tokenizer
    long_context = " ".join(["the state of the union is strong and the people are free"] * 8)
    pairs = [("The captain said", " the whale was near"),
             ("", "Money and work"),  # empty context -> EOS, like lm-eval's HFLM
             (long_context, " and the sea was calm"),  # longer than MAX_LEN: left-truncated
             ("The king", " went to the river"),
             ("Night and day", " the ship"),
             ("A long time ago the old house by the river", " became a small city")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        want_ll, want_greedy, n = direct_loglikelihood(model, tok, context, continuation)
        assert n >= 2  # multi-token continuations (a 300-token vocabulary splits words)
        assert ll == pytest.approx(want_ll, abs=1e-5)
        assert greedy == want_greedy
        # length-normalized, as lm-eval's acc_norm: divided by the continuation's characters
        assert ll / len(continuation) == pytest.approx(want_ll / len(continuation), abs=1e-5)
    assert len(tok.encode(long_context)) > MAX_LEN


def test_continuation_longer_than_context_is_scored_in_windows(trained_runs):
    """A continuation of MAX_LEN + 10 tokens: the last MAX_LEN tokens in one window (full context), the
    first 10 in another; the sum equals the two direct computations."""
    lm = adapter(trained_runs["transformer"])
    ids = lm.tokenizer.encode(" ".join(["the old ship went down the river to the sea"] * 10))
    ctx, cont = ids[:5], ids[5:5 + MAX_LEN + 10]
    head, tail = direct_ids(lm.model, ctx, cont[:10]), direct_ids(lm.model, ctx + cont[:10], cont[10:])
    ((ll, greedy),) = lm.score_tokens([(ctx, cont)])
    assert ll == pytest.approx(head[0] + tail[0], abs=1e-5) and greedy == (head[1] and tail[1])


def test_context_trailing_space_moves_to_continuation(trained_runs):
    _, tok, _ = load_model(trained_runs["transformer"])
    assert encode_pair(tok, "The king ", "went") == encode_pair(tok, "The king", " went")
    ctx, cont = encode_pair(tok, "The king", " went home")
    assert ctx + cont == tok.encode("The king went home") and tok.decode(cont) == " went home"


def test_loglikelihood_rolling_is_the_documents_loglikelihood(trained_runs):
    lm = adapter(trained_runs["looped"])
    text = "The people said the war was long."
    ids = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text)]
    assert len(ids) <= MAX_LEN
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([ids[:-1]]))[0], dim=-1)
    want = logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got == pytest.approx(want, abs=1e-5)


def test_generate_until_is_greedy_argmax(trained_runs):
    """Batched, left-padded, KV-cached generation equals recomputing the argmax one token at a time."""
    lm = adapter(trained_runs["hyperloop"], batch_size=4)
    model, tok = lm.model, lm.tokenizer
    contexts = ["The captain", "Money and work and the long night of the", "Peace", "The old king said"]
    kwargs = {"until": ["."], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)])
    for context, text in zip(contexts, got):
        ids = tok.encode(context)
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                new.append(nxt)
                if "." in tok.decode(new):
                    break
        assert text == tok.decode(new).split(".")[0]
    with pytest.raises(UserError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, ("The", {"do_sample": True, "temperature": 1.0}), 0)])


def test_lm_eval_runs_offline_on_local_jsonl(trained_runs, tmp_path, offline):
    """A multiple-choice task from a local jsonl through lm-eval's own pipeline: the per-choice scores it
    logs equal the direct computation, and its acc / acc_norm are the argmax of raw / per-character scores."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    docs = [{"context": "The captain said", "choices": ["the whale was near", "money", "a long night of war"], "gold": 0},
            {"context": "The king went", "choices": ["to the river", "to the sea and the city", "home"], "gold": 2},
            {"context": "Peace and", "choices": ["justice", "freedom for the people", "law"], "gold": 1},
            {"context": "Work", "choices": ["was good", "made the day long", "is old"], "gold": 1}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n  cache_dir: {tmp_path / 'hf'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    lm = adapter(trained_runs["transformer"], batch_size=5)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["local_mc"], task_manager=tm, num_fewshot=0,
                                  bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"]["local_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    accs, acc_norms = [], []
    for doc, sample in zip(docs, samples):
        direct = [direct_loglikelihood(lm.model, lm.tokenizer, doc["context"], " " + c)[0] for c in doc["choices"]]
        logged = [float(r[0][0]) for r in sample["resps"]]
        assert logged == pytest.approx(direct, abs=1e-5)
        raw = max(range(3), key=lambda i: direct[i])
        norm = max(range(3), key=lambda i: direct[i] / len(doc["choices"][i]))
        assert sample["acc"] == float(raw == doc["gold"]) and sample["acc_norm"] == float(norm == doc["gold"])
        accs.append(sample["acc"])
        acc_norms.append(sample["acc_norm"])
    result = out["results"]["local_mc"]
    assert result["acc,none"] == pytest.approx(sum(accs) / len(docs))
    assert result["acc_norm,none"] == pytest.approx(sum(acc_norms) / len(docs))


def test_missing_datasets_give_one_clear_error(trained_runs, tmp_path, offline):
    """A Hub dataset that cannot be fetched and a local file that is not there: one UserError naming
    both tasks and saying how to point lm-eval at local copies."""
    from hyperloop_lm.eval.zeroshot import evaluate_tasks

    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: hyperloop-lm-tests/no-such-dataset\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: a\ndoc_to_target: b\n")
    (tmp_path / "file_task.yaml").write_text(
        f"task: file_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gone.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: a\ndoc_to_target: b\n")
    lm = adapter(trained_runs["transformer"])
    with pytest.raises(UserError) as err:
        evaluate_tasks(None, "file_task,hub_task", include_path=tmp_path, lm=lm)
    msg = str(err.value)
    assert "file_task (" in msg and "gone.jsonl" in msg and "hub_task (" in msg and "no-such-dataset" in msg
    assert "HF_DATASETS_OFFLINE" in msg and "--include-path" in msg and "data_files" in msg
