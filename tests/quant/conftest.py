"""Fixtures for the quantization tests: seeded random layers and correlated calibration inputs."""
from __future__ import annotations

from typing import Callable

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _correlated(
    n: int, d_in: int, seed: int = 0, dtype: torch.dtype = torch.float32, mix_seed: int = 1234
) -> torch.Tensor:
    """(n, d_in) inputs X = (Z @ L) * s: a random mixing L correlates the features and a log-normal
    per-feature scale s makes some inputs much more active than others (as in real LM activations).
    `seed` draws the samples Z; `mix_seed` the distribution (L, s), so that calibration and held-out
    sets with different `seed` come from the same distribution."""
    g = torch.Generator().manual_seed(mix_seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    s = torch.exp(torch.randn(d_in, generator=g, dtype=torch.float64))
    z = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((z @ mix) * s).to(dtype)


@pytest.fixture
def correlated_inputs() -> Callable[..., torch.Tensor]:
    """Factory: correlated_inputs(n, d_in, seed=0, dtype=torch.float32, mix_seed=1234) -> (n, d_in)."""
    return _correlated


@pytest.fixture
def hessian_of() -> Callable[[torch.Tensor], torch.Tensor]:
    """The GPTQ Hessian of a whole input matrix at once: H = 2/N X^T X, (N, in) -> (in, in)."""

    def h(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).double()
        return 2.0 / x.shape[0] * x.T @ x

    return h
