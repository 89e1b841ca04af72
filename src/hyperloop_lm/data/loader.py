"""Batches from a token memmap: a shuffled, resumable, DDP-shardable train stream and a
sequential val pass.

Train: the tokens are cut into non-overlapping windows of T+1 tokens (x = w[:-1], y = w[1:]).
Each epoch visits every window once, in a permutation seeded by (seed, epoch). Global batch g of
an epoch is windows perm[g*G : (g+1)*G] with G = batch_size * world_size; rank r takes the r-th
slice of batch_size. So the stream is a pure function of (seed, epoch, g): `state_dict()` is just
(epoch, g), and world_size ranks with batch B/world_size see exactly one rank's batch B. The
incomplete last global batch of an epoch is dropped (at most G-1 windows), so all ranks always
take the same number of steps.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from hyperloop_lm.data.shards import TokenShard
from hyperloop_lm.utils import UserError

Batch = tuple[torch.Tensor, torch.Tensor]  # x, y: (B, T) int64


def _windows(tokens: np.ndarray | TokenShard, seq_len: int) -> np.ndarray:
    """(n, T+1) view of the token array (no copy; a memmap stays a memmap)."""
    if isinstance(tokens, TokenShard):
        tokens = tokens.tokens
    n = len(tokens) // (seq_len + 1)
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _to_batch(rows: np.ndarray) -> Batch:
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


class BatchLoader:
    """Infinite iterator of (x, y) train batches; see the module docstring for the order.

    batch_size is per rank. Iterating never ends: epochs follow each other (`epoch` tells which).
    """

    def __init__(self, tokens: np.ndarray | TokenShard, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len}).")
        self.windows = _windows(tokens, seq_len)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        n_tokens = len(tokens)
        need = self.global_batch * (seq_len + 1)
        if len(self.windows) < self.global_batch:
            raise UserError(f"the training split has {n_tokens:,} tokens, but one batch of {self.global_batch} x "
                            f"{seq_len + 1} tokens needs {need:,}; use more text, or a smaller batch size or "
                            "sequence length.")
        self.steps_per_epoch = len(self.windows) // self.global_batch
        self.epoch, self.step = 0, 0  # the next batch to yield
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows))
        return self._perm

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self._perm = self.epoch + 1, 0, None
        start = self.step * self.global_batch + self.rank * self.batch_size
        idx = self._permutation()[start: start + self.batch_size]
        self.step += 1
        return _to_batch(self.windows[idx])

    def state_dict(self) -> dict:
        """The exact position: loading it into a loader over the same data resumes bit-for-bit."""
        return {"version": 1, "epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "n_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch", "n_windows"):
            if state[key] != mine[key]:
                raise UserError(f"cannot resume the data loader: the checkpoint has {key}={state[key]} but this "
                                f"run has {mine[key]}; resume with the same data, seed, sequence length and "
                                "global batch size (batch_size x world_size).")
        self.epoch, self.step, self._perm = state["epoch"], state["step"], None


class SequentialLoader:
    """Every val window once, in order, in batches (the last may be smaller); re-iterable.

    `max_tokens` caps the pass to the first ceil(max_tokens / T) windows. `n_targets` is the
    number of predicted tokens a full pass covers (the denominator of the mean loss).
    """

    def __init__(self, tokens: np.ndarray | TokenShard, batch_size: int, seq_len: int,
                 max_tokens: int | None = None):
        self.windows = _windows(tokens, seq_len)
        if len(self.windows) == 0:
            raise UserError(f"the validation split has {len(tokens):,} tokens, fewer than one window of "
                            f"{seq_len + 1}; use more held-out text or a shorter sequence length.")
        if max_tokens is not None:
            self.windows = self.windows[: max(1, -(-max_tokens // seq_len))]
        self.batch_size, self.seq_len = batch_size, seq_len
        self.n_targets = len(self.windows) * seq_len

    def __len__(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.windows), self.batch_size):
            yield _to_batch(np.asarray(self.windows[start: start + self.batch_size]))
