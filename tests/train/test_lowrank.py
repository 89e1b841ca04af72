"""GaLore, its one-sided-LoRA dual, projectors and optimizer-state accounting (spec section 8)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from hyperloop_lm.train.lowrank import (
    GaLoreAdamW,
    OneSidedLoRAAdamW,
    check_duality,
    compute_projector,
    expected_state_bytes,
    galore_adamw,
    merge_onesided_lora,
    onesided_lora_adamw,
    optimizer_state_bytes,
    project,
    select_weights,
)
from hyperloop_lm.utils import UserError

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: extra intra-op threads only add contention on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Projected weights of TinyLoopNet: up (4d x d) is tall, down (d x 4d) is wide -- and both are used
# twice per forward (the shared looped block) -- mix (d x d) is square and used once.
PROJECTED = ["up.weight", "down.weight", "mix.weight"]


class TinyLoopNet(nn.Module):
    """Attention-free residual net: embed -> shared MLP block applied `loops` times -> mix -> head."""

    def __init__(self, d: int = 16, d_in: int = 8, d_out: int = 4, loops: int = 2) -> None:
        super().__init__()
        self.loops = loops
        self.embed = nn.Linear(d_in, d)  # not projected (stands in for an embedding)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)  # weight (4d, d): tall
        self.down = nn.Linear(4 * d, d)  # weight (d, 4d): wide
        self.mix = nn.Linear(d, d, bias=False)  # weight (d, d)
        self.head = nn.Linear(d, d_out)  # not projected

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, d)
        for _ in range(self.loops):  # one Parameter per weight, used once per loop
            h = h + self.down(F.gelu(self.up(self.norm(h))))
        h = h + self.mix(torch.tanh(h))
        return F.mse_loss(self.head(h), y)


def make_model(d: int = 16) -> TinyLoopNet:
    torch.manual_seed(0)
    return TinyLoopNet(d=d)


def make_data(n: int = 4, d_in: int = 8, d_out: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, d_in, generator=g), torch.randn(32, d_out, generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list, steps: range) -> None:
    for k in steps:
        opt.zero_grad(set_to_none=True)
        model(*data[k % len(data)]).backward()
        opt.step()


# ------------------------------------------------------------------------------------ projector


@pytest.mark.parametrize("kind", ["svd", "random"])
@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (8, 8)])
def test_projector_is_orthonormal_on_the_small_side(kind: str, shape: tuple[int, int]) -> None:
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    p = compute_projector(grad, rank=3, kind=kind, seed=7)
    m, n = shape
    assert p.shape == ((m, 3) if m <= n else (n, 3)) and p.dtype == torch.float32
    torch.testing.assert_close(p.T @ p, torch.eye(3), atol=1e-5, rtol=0)
    assert project(grad, p).shape == ((3, n) if m <= n else (m, 3))
    if kind == "svd":  # P P^T G (or G P P^T) is the best rank-3 approximation of G
        u, s, vh = torch.linalg.svd(grad)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        approx = p @ p.T @ grad if m <= n else grad @ p @ p.T
        torch.testing.assert_close(approx, best, atol=1e-4, rtol=0)
    else:  # same seed -> same sketch; another seed -> another one
        assert torch.equal(p, compute_projector(grad, 3, kind, seed=7))
        assert not torch.allclose(p, compute_projector(grad, 3, kind, seed=8))


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="did you mean 'svd'"):
        galore_adamw(make_model(), PROJECTED, lr=1e-2, rank=4, proj="svdd")
    with pytest.raises(UserError, match="only 2-D"):
        select_weights(make_model(), ["up.bias"])
    with pytest.raises(UserError, match="no parameter named"):
        select_weights(make_model(), ["up.wieght"])


# ------------------------------------------------------------------------------------ duality


@pytest.mark.parametrize("proj", ["svd", "random"])
def test_galore_equals_onesided_lora_inside_one_period(proj: str) -> None:
    report = check_duality(make_model, make_data(), steps=12, rank=4, proj=proj, select=PROJECTED)
    print(f"{proj}: max |W_galore - W_lora| per step {['%.1e' % d for d in report.max_abs_diff]}")
    assert len(report.max_abs_diff) == 12
    assert report.worst < 1e-5
    assert report.max_abs_change[-1] > 1e-2  # the weights really moved: the agreement is not vacuous
    assert report.galore_losses[-1] < report.galore_losses[0]


@pytest.mark.parametrize("proj", ["svd", "random"])
def test_weight_decay_breaks_the_duality(proj: str) -> None:
    # GaLore decays the full W, the LoRA dual decays only its adapter C.
    report = check_duality(make_model, make_data(), steps=12, rank=4, proj=proj, weight_decay=0.1, select=PROJECTED)
    print(f"{proj} wd=0.1: worst diff {report.worst:.2e}")
    assert report.worst > 1e-4


@pytest.mark.parametrize("proj", ["svd", "random"])
def test_refreshes_match_only_without_adam_memory(proj: str) -> None:
    # 12 steps, proj_gap 3: four projector periods. With betas (0, 0) Adam has no moments to carry
    # (GaLore) or reset (LoRA), so the merge + refresh machinery must keep the two equal; with
    # the default betas they part at the first refresh (step index 3).
    data = make_data()
    memoryless = check_duality(make_model, data, 12, 4, proj, select=PROJECTED, betas=(0.0, 0.0), proj_gap=3)
    default = check_duality(make_model, data, 12, 4, proj, select=PROJECTED, proj_gap=3)
    assert memoryless.worst < 1e-5
    assert max(default.max_abs_diff[:3]) < 1e-5 < 1e-4 < default.max_abs_diff[3]


# ------------------------------------------------------------------------------------ state


def test_galore_moments_have_the_projected_shape() -> None:
    model, rank = make_model(), 4
    opt = galore_adamw(model, PROJECTED, lr=1e-2, rank=rank)
    train(model, opt, make_data(), range(2))
    for name, p in select_weights(model, PROJECTED):
        m, n = p.shape
        state = opt.state[p]
        low, proj = ((rank, n), (m, rank)) if m <= n else ((m, rank), (n, rank))
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == low, name
        assert state["projector"].shape == proj, name
        assert all(v.shape != (m, n) for v in state.values() if isinstance(v, torch.Tensor)), name
    assert opt.state[model.head.weight]["exp_avg"].shape == model.head.weight.shape  # plain AdamW


def test_state_bytes_measured_match_expected_and_galore_saves_memory() -> None:
    d = 32
    rank = d // 4
    data = make_data()
    shapes = [p.shape for _, p in select_weights(make_model(d), PROJECTED)]

    adamw_model = make_model(d)
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=1e-3)
    train(adamw_model, adamw, data, range(1))
    galore_model = make_model(d)
    galore = galore_adamw(galore_model, PROJECTED, lr=1e-3, rank=rank)
    train(galore_model, galore, data, range(1))
    lora_model = make_model(d)
    lora = onesided_lora_adamw(lora_model, PROJECTED, lr=1e-3, rank=rank)
    train(lora_model, lora, data, range(1))

    def measured(model: nn.Module, opt: torch.optim.Optimizer) -> int:
        # For the LoRA model these are the wrapped W0s; they are charged their adapter's C, P, moments.
        modules = [model.get_submodule(n.rpartition(".")[0]) for n in PROJECTED]
        params = [m.parametrizations.weight.original if parametrize.is_parametrized(m) else m.weight for m in modules]
        return optimizer_state_bytes(opt, params)

    bytes_adamw = measured(adamw_model, adamw)
    bytes_galore = measured(galore_model, galore)
    assert bytes_adamw == expected_state_bytes(shapes, None, "adamw")
    assert bytes_galore == expected_state_bytes(shapes, rank, "galore")
    assert measured(lora_model, lora) == expected_state_bytes(shapes, rank, "onesided-lora")
    ratio = bytes_galore / bytes_adamw
    print(f"GaLore/AdamW state bytes for the projected weights at rank d/4: {ratio:.4f}")
    assert ratio <= 0.3
    # Whole-optimizer counts include the plain-AdamW parameters too.
    assert optimizer_state_bytes(galore) > bytes_galore


@pytest.mark.parametrize("method", ["galore", "lora"])
@pytest.mark.parametrize("proj", ["svd", "random"])
def test_state_dict_round_trip_is_bit_exact_across_refreshes(method: str, proj: str) -> None:
    # proj_gap 3: refreshes at steps 0, 3, 6, 9. Interrupt at 4 (mid-period) and at 6 (right
    # before a refresh, where the LoRA base weights must come back with requires_grad on).
    data, total = make_data(), 11
    build = galore_adamw if method == "galore" else onesided_lora_adamw

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = make_model()
        return model, build(model, PROJECTED, lr=1e-2, rank=4, proj=proj, proj_gap=3, weight_decay=0.1)

    ref_model, ref_opt = fresh()
    train(ref_model, ref_opt, data, range(total))

    for stop in (4, 6):
        model, opt = fresh()
        train(model, opt, data, range(stop))
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
        buffer.seek(0)
        ckpt = torch.load(buffer)
        model, opt = fresh()
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        if isinstance(opt, OneSidedLoRAAdamW):  # W0 computes a gradient only for a coming refresh
            assert all(site.base.requires_grad == (stop % 3 == 0) for site in opt.sites)
        train(model, opt, data, range(stop, total))
        for (name, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), f"{name} differs after resuming at step {stop}"
        for g_ref, g in zip(ref_opt.param_groups, opt.param_groups):
            for p_ref, p in zip(g_ref["params"], g["params"]):
                s_ref, s = ref_opt.state[p_ref], opt.state[p]
                assert s_ref.keys() == s.keys()
                for key, value in s_ref.items():
                    same = torch.equal(value, s[key]) if isinstance(value, torch.Tensor) else value == s[key]
                    assert same, f"optimizer state '{key}' differs after resuming at step {stop}"


@pytest.mark.parametrize("build", [galore_adamw, onesided_lora_adamw])
def test_state_stays_fp32_for_bf16_weights(build) -> None:
    # torch's default loader would cast state to the parameter dtype (bf16): not bit-exact.
    model = make_model().to(torch.bfloat16)
    data = [(x.bfloat16(), y.bfloat16()) for x, y in make_data()]
    opt = build(model, PROJECTED, lr=1e-2, rank=4)
    train(model, opt, data, range(2))
    fresh_model = make_model().to(torch.bfloat16)
    fresh = build(fresh_model, PROJECTED, lr=1e-2, rank=4)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(opt.state, fresh.state):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == fresh.state[q][key].dtype == torch.float32, key
                assert torch.equal(value, fresh.state[q][key]), key


def test_lora_merge_gives_a_plain_model_with_the_effective_weights() -> None:
    model = make_model()
    opt = onesided_lora_adamw(model, PROJECTED, lr=1e-2, rank=4, proj_gap=2)
    train(model, opt, make_data(), range(3))  # one refresh with a nonzero C to merge
    assert isinstance(opt, OneSidedLoRAAdamW)
    effective = {n: model.get_submodule(n.rpartition(".")[0]).weight.detach().clone() for n in PROJECTED}
    assert any(site.adapter.C.abs().max() > 0 for site in opt.sites)
    merge_onesided_lora(model)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in make_model().named_parameters())
    for name, w in effective.items():
        assert torch.equal(model.get_parameter(name), w)


# ------------------------------------------------------------------------------------ sanity


def test_galore_without_projected_weights_is_torch_adamw() -> None:
    data = make_data()
    ours_model, ref_model = make_model(), make_model()
    ours = galore_adamw(ours_model, [], lr=1e-2, rank=4, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    train(ours_model, ours, data, range(10))
    train(ref_model, ref, data, range(10))
    for (name, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


class _RotatedAdapter(nn.Module):
    """Test-local W = W0 + U C with a fixed square orthogonal U: AdamW on C is AdamW in U's basis."""

    def __init__(self, u: torch.Tensor, n: int) -> None:
        super().__init__()
        self.register_buffer("u", u)
        self.c = nn.Parameter(torch.zeros(u.shape[1], n))

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.u @ self.c


def test_full_rank_svd_galore_is_adamw_in_the_rotated_basis_not_plain_adamw() -> None:
    # A full-rank svd projector is an orthogonal rotation U of the wide (16 x 64) weight. GaLore
    # (scale 1) is then exactly torch's AdamW on C in W = W0 + U C -- but NOT AdamW on W itself:
    # Adam's element-wise normalisation does not commute with rotations.
    data, steps, d = make_data(), 10, 16
    model = make_model()
    model(*data[0]).backward()
    u = torch.linalg.svd(model.down.weight.grad)[0]  # (16, 16), the projector GaLore will compute

    galore_model = make_model()
    galore = galore_adamw(galore_model, ["down.weight"], lr=1e-2, rank=d, scale=1.0, proj_gap=100)
    train(galore_model, galore, data, range(steps))
    assert isinstance(galore, GaLoreAdamW)
    torch.testing.assert_close(galore.state[galore_model.down.weight]["projector"], u, atol=1e-6, rtol=0)

    rotated_model = make_model()
    parametrize.register_parametrization(rotated_model.down, "weight", _RotatedAdapter(u, 4 * d))
    rotated_model.down.parametrizations.weight.original.requires_grad_(False)
    rotated = torch.optim.AdamW(
        [p for p in rotated_model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0
    )
    train(rotated_model, rotated, data, range(steps))

    plain_model = make_model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    train(plain_model, plain, data, range(steps))

    for name, w in galore_model.named_parameters():
        owner, _, attr = name.rpartition(".")
        torch.testing.assert_close(w, getattr(rotated_model.get_submodule(owner), attr), atol=1e-5, rtol=0, msg=name)
    assert (galore_model.down.weight - plain_model.down.weight).abs().max() > 1e-3
