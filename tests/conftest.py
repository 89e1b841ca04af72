"""Shared fixtures: an isolated data cache and a small English-like training corpus."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from textgen import make_text

@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory) -> Path:
    """~250 KB in 40 documents: enough for a micro model to take a few batches and a val split."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("train_corpus")
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(make_text(rng, 60))
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session", autouse=True)
def _session_data_dir(session_cache):
    """Whatever a test caches without asking for a cache (e.g. the compiled Sinkhorn kernel) goes to the
    session's cache too, never to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYPERLOOP_LM_DATA", str(session_cache))
        yield


@pytest.fixture
def cache_env(session_cache, monkeypatch) -> Path:
    """Tokenizers and shards are cached per session (tests reuse them), never under ~/.cache."""
    monkeypatch.setenv("HYPERLOOP_LM_DATA", str(session_cache))
    return session_cache


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Bit-exact comparisons need the same intra-op thread count everywhere."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def trained_runs(train_corpus, session_cache, tmp_path_factory) -> dict[str, Path]:
    """Micro models of all four families trained briefly on the fixture corpus: family -> run dir.
    Each run dir holds checkpoints/step-*/ (weights, tokenizer, meta) and summary.json."""
    import os

    from hyperloop_lm.config import FAMILIES
    from hyperloop_lm.train.config import TrainConfig
    from hyperloop_lm.train.trainer import train

    old = os.environ.get("HYPERLOOP_LM_DATA")
    os.environ["HYPERLOOP_LM_DATA"] = str(session_cache)
    root, runs, threads = tmp_path_factory.mktemp("runs"), {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for family in FAMILIES:
            out = root / family
            train(TrainConfig(model=f"micro-{family}", corpus=str(train_corpus), vocab_size=300, seq_len=32,
                              batch_size=8, tokens=8 * 32 * 30, eval_every=0, eval_tokens=4096, ckpt_every=0,
                              out_dir=str(out), progress=False, tensorboard=False, lr=3e-3))
            runs[family] = out
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("HYPERLOOP_LM_DATA", None)
        else:
            os.environ["HYPERLOOP_LM_DATA"] = old
    return runs
