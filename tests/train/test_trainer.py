"""The training loop: bit-exact resume, crash-safe checkpoints, NaN stop, DDP equivalence, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperloop_lm.train import checkpoint as ckpt
from hyperloop_lm.train.config import TrainConfig
from hyperloop_lm.train.trainer import train
from hyperloop_lm.utils import UserError


def micro_cfg(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="micro-hyperloop", corpus=str(corpus), vocab_size=300, seq_len=32, batch_size=8,
                tokens=8 * 32 * 8, eval_every=4, eval_tokens=2048, log_every=1, ckpt_every=0, out_dir=str(out),
                progress=False, tensorboard=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def losses(run: Path) -> list[str]:
    return [line.split(",")[2] for line in (run / "metrics.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("model", ["micro-hyperloop", "micro-mhc"])
def test_resume_is_bit_identical(model, train_corpus, cache_env, tmp_path):
    full = train(micro_cfg(train_corpus, tmp_path / "full", model=model))
    assert full["status"] == "finished" and full["step"] == 8
    part = train(micro_cfg(train_corpus, tmp_path / "part", model=model), stop_after_steps=3)
    assert part["status"] == "interrupted" and part["step"] == 3
    resumed = train(micro_cfg(train_corpus, tmp_path / "part", model=model))
    assert resumed["step"] == 8
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")  # data order and losses included
    assert full["val"]["loss"] == resumed["val"]["loss"]


@pytest.mark.parametrize("optimizer", ["galore", "onesided-lora"])
def test_low_rank_optimizers_resume_exactly_and_load_as_plain_models(optimizer, train_corpus, cache_env, tmp_path):
    kw = dict(optimizer=optimizer, rank=8, proj_gap=3)
    train(micro_cfg(train_corpus, tmp_path / "full", **kw))
    train(micro_cfg(train_corpus, tmp_path / "part", **kw), stop_after_steps=4)
    s = train(micro_cfg(train_corpus, tmp_path / "part", **kw))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert s["optimizer_state_bytes"] > 0
    model, _, _ = ckpt.load_model(tmp_path / "full")  # effective weights, plain LM keys
    assert not any("parametrizations" in k for k in model.state_dict())


def test_training_learns(train_corpus, cache_env, tmp_path):
    s = train(micro_cfg(train_corpus, tmp_path / "run", tokens=8 * 32 * 40, eval_every=0))
    first = float(losses(tmp_path / "run")[0])
    assert s["val"]["loss"] < first - 1.0  # from ~ln(300) = 5.7 to well below
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["unique_params"] > 0 and summary["machine"]["torch"] == torch.__version__


def test_crash_during_checkpoint_write_keeps_previous(train_corpus, cache_env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(micro_cfg(train_corpus, out), stop_after_steps=2)
    good = ckpt.latest_checkpoint(out / "checkpoints")
    real = ckpt.save_file

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # what a crash mid-write leaves behind
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        train(micro_cfg(train_corpus, out), stop_after_steps=2)
    monkeypatch.setattr(ckpt, "save_file", real)
    assert ckpt.latest_checkpoint(out / "checkpoints") == good
    assert not list((out / "checkpoints").glob(".*tmp*"))
    model, tok, meta = ckpt.load_model(out)
    assert meta["step"] == 2 and tok is not None


def test_nan_loss_stops_with_clear_message(train_corpus, cache_env, tmp_path, monkeypatch):
    import hyperloop_lm.train.trainer as trainer_mod

    out = tmp_path / "run"
    train(micro_cfg(train_corpus, out), stop_after_steps=2)
    real_ce, calls = torch.nn.functional.cross_entropy, {"n": 0}

    class FakeF:
        @staticmethod
        def cross_entropy(*a, **k):
            calls["n"] += 1
            loss = real_ce(*a, **k)
            return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(trainer_mod, "F", FakeF)
    with pytest.raises(UserError, match=r"loss became nan at step 3.*step-0000002"):
        train(micro_cfg(train_corpus, out))
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step-0000002"


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(train_corpus, cache_env, tmp_path):
    out = tmp_path / "run"
    train(micro_cfg(train_corpus, out), stop_after_steps=2)
    with pytest.raises(UserError, match="different model config.*n_streams"):
        train(micro_cfg(train_corpus, out, model_overrides={"n_streams": 2}))
    path = ckpt.latest_checkpoint(out / "checkpoints")
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_model(path)


@pytest.mark.parametrize("kw,message", [
    (dict(corpus="/nonexistent/text"), "is not a file, directory, glob or built-in corpus"),
    (dict(batch_size=4096, seq_len=512), "needs"),
])
def test_bad_data_input(kw, message, train_corpus, cache_env, tmp_path):
    with pytest.raises(UserError, match=message):
        train(micro_cfg(kw.pop("corpus", train_corpus), tmp_path / "run", **kw))


def test_unknown_config_key_suggests_the_closest(tmp_path):
    (tmp_path / "c.yaml").write_text("model: micro-hyperloop\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown train config key 'learning_rate'"):
        TrainConfig.load(tmp_path / "c.yaml")
    with pytest.raises(UserError, match="did you mean 'n_streams'"):
        TrainConfig.load(None, {"model.n_stream": 2})
    with pytest.raises(UserError, match="did you mean 'seq_len'"):
        TrainConfig.load(None, {"seqlen": 2})


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(parallel, train_corpus, cache_env, tmp_path):
    """2 gloo processes x batch 4 == 1 process x batch 8 (same global batch, same data order), for DDP
    and for FSDP2 (weights sharded per block); also resumes across a checkpoint written from shards."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from hyperloop_lm.train.config import TrainConfig\n"
        "from hyperloop_lm.train.trainer import train\n"
        f"cfg = TrainConfig(model='micro-hyperloop', corpus={str(train_corpus)!r}, vocab_size=300, seq_len=32,\n"
        "    batch_size=8, tokens=8*32*4, eval_every=0, eval_tokens=2048, ckpt_every=0, progress=False,\n"
        "    tensorboard=False, lr=3e-3, out_dir=sys.argv[1], parallel=sys.argv[2], grad_accum=2)\n"
        "train(cfg, stop_after_steps=int(sys.argv[3]) if len(sys.argv) > 3 else None)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), parallel], check=True, env=env, timeout=300)
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           "29533" if parallel == "ddp" else "29534", str(script), str(tmp_path / "two"), parallel]
    subprocess.run(two + ["2"], check=True, env=env, timeout=300, capture_output=True)  # interrupted at step 2
    subprocess.run(two, check=True, env=env, timeout=300, capture_output=True)  # resumed
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [round(float(x), 4) for x in la] == [round(float(x), 4) for x in lb]
