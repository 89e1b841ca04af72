"""The training loop: data -> model -> AdamW/GaLore -> checkpoints, metrics and a run summary.

One command for one process or many (`torchrun --nproc_per_node N -m hyperloop_lm.cli train ...`:
DDP over gloo on CPU, nccl on CUDA). A run directory holds:

    config.yaml  metrics.csv  tb/  checkpoints/step-*/  summary.json

Resuming (`resume: auto`) restores weights, optimizer, loader position and RNG, so an interrupted
run continues bit-for-bit on CPU. SIGINT/SIGTERM save a checkpoint and exit cleanly; a NaN/inf loss
stops the run before anything is saved, leaving the last good checkpoint as the latest.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import signal
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from hyperloop_lm.data import BatchLoader, prepare_data
from hyperloop_lm.eval.perplexity import evaluate
from hyperloop_lm.model.accounting import flops_per_token, param_counts
from hyperloop_lm.model.lm import LM
from hyperloop_lm.train import checkpoint as ckpt
from hyperloop_lm.train.config import TrainConfig
from hyperloop_lm.train.lowrank import optimizer_state_bytes
from hyperloop_lm.train.optim import build_optimizer, lr_at
from hyperloop_lm.utils import UserError, atomic_write_text, keep_freed_memory

METRICS = ["step", "tokens", "loss", "lr", "grad_norm", "tok_s", "mfu", "mem_mb", "val_loss", "val_ppl", "val_bpb"]


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def matmul_peak_flops(device: torch.device) -> float:
    """Measured dense-matmul throughput of this device (the MFU denominator): fp32 on CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(3):  # best of three: a busy machine only ever makes a trial slower
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent.parent  # the hyperloop_lm package
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not rev:
            return "unknown"
        # uncommitted edits to the package's code mean the revision alone does not reproduce this run
        # (edits elsewhere, e.g. a re-rendered report, do not change what a run computes)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _dist_setup(device_name: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(device_name)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return rank, world, device


def shard_blocks(model: LM) -> None:
    """FSDP2, applied outside the model: one shard group per block, then the root. The looped middle
    blocks keep their gathered weights through the forward (they are used `loops` times in a row)."""
    from torch.distributed.fsdp import fully_shard

    for blk in [*model.begin, *model.end]:
        fully_shard(blk)
    for blk in model.middle:
        fully_shard(blk, reshard_after_forward=False)
    fully_shard(model)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def train(cfg: TrainConfig, *, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary dict (also written to summary.json).

    stop_after_steps: end this session after that many optimizer steps, with a checkpoint, as if
    interrupted (suites spread over several sittings; the resume test).
    """
    rank, world, device = _dist_setup(cfg.device)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()  # the step re-allocates its activations; the OS would hand them back zeroed
    main = rank == 0
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)

    # --- data (rank 0 builds the caches first, the others then read them)
    if main:
        data = prepare_data(cfg.corpus, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size)
    if world > 1:
        dist.barrier()
    if not main:
        data = prepare_data(cfg.corpus, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size)
    micro = cfg.batch_size // cfg.grad_accum
    if micro % world:
        raise UserError(f"batch_size/grad_accum = {micro} must be divisible by the number of processes ({world})")
    loader = BatchLoader(data.train, micro // world, cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world)

    # --- model and optimizer
    mcfg = cfg.model_config(data.tokenizer.vocab_size)
    model = LM(mcfg).to(device)
    if cfg.compile:
        model.compile_blocks()
    fsdp = world > 1 and cfg.parallel == "fsdp"
    FULL = _full_options() if fsdp else None
    if fsdp:
        shard_blocks(model)
    optimizer = build_optimizer(model, cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not fsdp else model
    step, best, history = 0, math.inf, []

    # --- resume
    root = out / "checkpoints"
    resume_from = None
    if cfg.resume == "auto":
        resume_from = ckpt.latest_checkpoint(root)
    elif cfg.resume != "never":
        resume_from = ckpt.resolve(cfg.resume)
    if resume_from is not None:
        meta = ckpt.read_meta(resume_from)
        ckpt.check_model_config(mcfg, meta["model"], resume_from)
        if meta.get("tokenizer_hash") not in (None, data.tokenizer.hash):
            raise UserError(f"checkpoint {resume_from} used a different tokenizer; resume with the same corpus "
                            "and tokenizer or start a fresh out_dir")
        state = ckpt.load_state(resume_from)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(model, optimizer, model_state_dict=ckpt.load_weights(resume_from),
                           optim_state_dict=state["optimizer"], options=FULL)
        else:
            if "model_raw" in state:  # a wrapped model (one-sided LoRA): W0, P, C exactly as they were
                model.load_state_dict(state["model_raw"])
            else:
                ckpt.load_into(model, resume_from)
            optimizer.load_state_dict(state["optimizer"])
        # every rank's position is the same (epoch, global batch), so any saved rank's state fits any world size
        loader.load_state_dict(state["loader"][0] if isinstance(state["loader"], list) else state["loader"])
        torch.set_rng_state(state["rng"])
        step, best, history = state["step"], state.get("best", math.inf), state.get("history", [])
        if main:
            print(f"resumed from {resume_from} at step {step}")

    # --- logging
    csv_path = out / "metrics.csv"
    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump({**cfg.to_dict(), "resolved_model": mcfg.to_dict()},
                                                              sort_keys=False))
        _trim_csv(csv_path, step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"), purge_step=step or None)
    counts = param_counts(mcfg)
    flops_tok = flops_per_token(mcfg, cfg.seq_len)["train"]
    peak = matmul_peak_flops(device) * (world if device.type != "cpu" else 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if main:
        print(f"{mcfg.name} ({mcfg.family}, {counts['unique'] / 1e6:.2f}M unique params): {cfg.steps} steps x "
              f"{cfg.tokens_per_step} tokens on {device} x{world}, lr {cfg.peak_lr:g} ({cfg.recipe} recipe)")

    def save(step: int, metrics: dict[str, Any]) -> Path:
        loaders = [None] * world
        if world > 1:
            dist.all_gather_object(loaders, loader.state_dict())
        else:
            loaders = [loader.state_dict()]
        weights, optim_state = None, None
        if fsdp:  # gather full tensors (collective: every rank takes part)
            from torch.distributed.checkpoint.state_dict import get_state_dict

            weights, optim_state = get_state_dict(model, optimizer, options=FULL)
        if not main:
            return root
        state = {"optimizer": optim_state or optimizer.state_dict(), "loader": loaders, "rng": torch.get_rng_state(), "step": step,
                 "best": best, "history": history}
        if any(".parametrizations." in k for k in model.state_dict()):
            state["model_raw"] = model.state_dict()
        meta = {"model": mcfg.to_dict(), "train": cfg.to_dict(), "metrics": metrics,
                "tokenizer_hash": data.tokenizer.hash}
        path = ckpt.save_checkpoint(root, step, model, meta=meta, state=state, tokenizer=data.tokenizer,
                                    weights=weights)
        best_path = ckpt.step_dir(root, int(history_best_step(history))) if history else None
        ckpt.prune(root, cfg.keep_last, keep={best_path} if best_path else set())
        return path

    # --- loop
    model.train()
    t_start, tokens_seen = time.perf_counter(), step * cfg.tokens_per_step
    window_t, window_tokens, last = time.perf_counter(), 0, {}
    step_seconds, session_tokens = 0.0, 0  # time in optimizer steps only (no eval/checkpoint): the tok/s we report
    session_steps, status = 0, "finished"
    bar = tqdm(total=cfg.steps, initial=step, disable=not (main and cfg.progress), desc="train", dynamic_ncols=True)
    with _StopFlag() as stop:
        while step < cfg.steps:
            t_step = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(cfg.grad_accum):
                x, y = next(loader)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                last_micro = micro_step == cfg.grad_accum - 1
                if fsdp:
                    model.set_requires_gradient_sync(last_micro)
                sync = nullcontext() if (world == 1 or fsdp or last_micro) else ddp.no_sync()
                with sync, autocast:
                    logits = ddp(x, grad_last_loops=cfg.truncate_backprop or None)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                latest = ckpt.latest_checkpoint(root)
                raise UserError(f"loss became {loss_value} at step {step}; stopped without saving. Last good "
                                f"checkpoint: {latest or 'none'}. Try a lower lr (now {lr:g}) or more warmup.")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            session_steps += 1
            step_seconds += time.perf_counter() - t_step
            session_tokens += cfg.tokens_per_step
            tokens_seen += cfg.tokens_per_step
            window_tokens += cfg.tokens_per_step
            bar.update(1)

            row: dict[str, Any] = {}
            new_best = False
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.perf_counter() - window_t
                tok_s = window_tokens / dt
                row = {"step": step, "tokens": tokens_seen, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                       "tok_s": tok_s, "mfu": tok_s * flops_tok / peak, "mem_mb": memory_mb(device)}
                window_t, window_tokens = time.perf_counter(), 0
                last = row
                if main:
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:.0f}")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                ev = evaluate(model, data.val, cfg.seq_len, batch_size=micro, max_tokens=cfg.eval_tokens)
                row = {**(row or {"step": step, "tokens": tokens_seen, "loss": loss_value, "lr": lr,
                                  "grad_norm": grad_norm}),
                       "val_loss": ev["loss"], "val_ppl": ev["ppl"], "val_bpb": ev["bpb"]}
                history.append({"step": step, "tokens": tokens_seen, **ev})
                new_best = ev["loss"] < best
                best = min(best, ev["loss"])
            if row and main:
                _log(row, csv_path, writer, bar)
            interrupted = stop.signal is not None or (stop_after_steps is not None and session_steps >= stop_after_steps)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or interrupted or new_best:
                save(step, row or last)
            if interrupted and step < cfg.steps:
                status = "interrupted"
                if main:
                    bar.write(f"stopped at step {step}: checkpoint saved, resume with the same command")
                break
    bar.close()
    if writer is not None:
        writer.close()
    wall = time.perf_counter() - t_start
    summary = {
        "status": status, "step": step, "steps": cfg.steps, "tokens": tokens_seen, "wall_s": wall,
        "family": mcfg.family, "model": mcfg.to_dict(), "train": cfg.to_dict(),
        "unique_params": counts["unique"], "total_params": counts["total"], "hc_overhead": counts["hc_overhead"],
        "train_tok_s": session_tokens / step_seconds if step_seconds else None,
        "mfu": session_tokens / step_seconds * flops_tok / peak if step_seconds else None, "peak_mem_mb": memory_mb(device),
        "optimizer": cfg.optimizer, "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "final_train_loss": last.get("loss"),
        "val": history[-1] if history else None, "best_val_loss": best if history else None, "history": history,
        "git": git_revision(), "machine": machine(), "world_size": world, "corpus": data.corpus.name,
        "tokenizer": {"name": data.tokenizer.name, "vocab_size": data.tokenizer.vocab_size,
                      "hash": data.tokenizer.hash},
        "checkpoint": str(ckpt.latest_checkpoint(root)),
    }
    if not step_seconds and (out / "summary.json").exists():  # nothing trained now: keep the measured speed
        old = json.loads((out / "summary.json").read_text())
        summary.update(train_tok_s=old.get("train_tok_s"), mfu=old.get("mfu"))
    if main and status == "finished":
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def history_best_step(history: list[dict[str, Any]]) -> int:
    return min(history, key=lambda h: h["loss"])["step"]


def _trim_csv(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, METRICS)
        w.writeheader()
        w.writerows(rows)


def _log(row: dict[str, Any], csv_path: Path, writer, bar) -> None:
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, METRICS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in METRICS})
    if writer is not None:
        for k, v in row.items():
            if k not in ("step",) and v is not None:
                writer.add_scalar(("val/" if k.startswith("val_") else "train/") + k, v, row["step"])
    parts = [f"step {row['step']}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"grad_norm {row['grad_norm']:.3f}"]
    if "tok_s" in row:
        parts += [f"tok/s {row['tok_s']:.0f}", f"mfu {100 * row['mfu']:.1f}%", f"mem {row['mem_mb']:.0f}MB"]
    if "val_loss" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_ppl {row['val_ppl']:.2f}", f"val_bpb {row['val_bpb']:.3f}"]
    bar.write(" | ".join(parts))
