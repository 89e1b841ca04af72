"""Low-rank optimizer state: GaLore, its one-sided-LoRA dual, and memory accounting.

Spec section 8 (arXiv 2502.13811; GaLore arXiv 2403.03507). A selected 2-D weight W (m x n) with
gradient G is projected on its *smaller* side with a matrix P with orthonormal columns:

    left  (m <= n): P is (m x r), projected gradient R = P^T G  (r x n), update = P u   (m x n)
    right (m >  n): P is (n x r), projected gradient R = G P    (m x r), update = u P^T (m x n)

where u is the Adam direction computed from R, so Adam's two moments have R's shape, never (m, n).
P is refreshed every ``proj_gap`` steps, either from the SVD of the current gradient (``"svd"``:
the top-r singular vectors) or as a fresh seeded Gaussian sketch orthonormalised by QR
(``"random"``). One projector per *parameter*: a weight shared by a looped block is one Parameter
whose gradient already sums over all loops, so one projector serves every loop.

GaLore == one-sided LoRA (the duality)
--------------------------------------
Inside one projector period, GaLore started from W_k produces exactly the weights of the adapter

    left:  W = W0 + P C,  C (r x n)        right:  W = W0 + C P^T,  C (m x r)

with W0 = W_k frozen, P frozen, C started at 0 and trained by the same Adam. Why: the adapter's
gradient is dL/dC = P^T G (left) or G P (right) -- exactly GaLore's projected gradient R -- so C's
Adam moments equal GaLore's, and W moves by P dC (left) while GaLore moves it by P u scaled.

The ``scale`` correspondence (exact). GaLore applies ``W -= lr * scale * P u``. Adam on C with an
unscaled adapter (W0 + P C) and learning rate ``lr_C`` moves W by ``-lr_C * P u``. Hence

    lr_C = scale * lr,  eps_C = eps            (what this module implements)

More generally, an adapter ``W0 + alpha P C`` sees gradient ``alpha R``; Adam is invariant to a
gradient scale except through eps (Adam_eps(alpha R) = Adam_{eps/alpha}(R)), so it matches GaLore
with ``lr_C = scale * lr / alpha`` and ``eps_C = alpha * eps``. We keep alpha = 1 and apply the
factor inside the step (group["lr"] stays the trainer's base lr, so a trainer that writes
``group["lr"] = lr`` every step, or any LR scheduler, keeps the mapping).

Where the two diverge (each is tested or measurable with :func:`check_duality`):

* Weight decay. GaLore's decoupled decay shrinks the full weight, ``W *= 1 - lr*wd``; LoRA's AdamW
  shrinks the adapter, ``C *= 1 - lr_C*wd``, and never touches W0. Different unless wd = 0.
* Global-norm clipping. The clip factor is ``clip / ||grads||``; GaLore's norm includes the full
  G (m x n) of every projected weight, LoRA's only P^T G (r x n) -- a smaller norm, so a different
  (often no) clip factor, and Adam's moments then weight the steps differently.
* Projector refreshes. GaLore carries its Adam moments (and step counter, so bias correction does
  not restart) across a refresh, simply reinterpreting the old moments in the new basis (the
  reference implementation's behaviour). The LoRA dual merges ``P C`` into W0, re-zeroes C and
  *resets* C's moments and bias correction, as a fresh adapter would. So the trajectories coincide
  only inside one period (or across periods when Adam has no memory, betas = (0, 0)).

Also: at full rank GaLore is *not* plain AdamW. P is then an orthogonal rotation and Adam's
element-wise normalisation does not commute with rotations (first step: ``P sign(P^T G)`` vs
``sign(G)``); full-rank GaLore is AdamW run in the rotated coordinates ``P^T W``.

Trainer usage
-------------
GaLore::

    opt = galore_adamw(model, select, lr=1e-2, rank=128, scale=0.25, proj_gap=200,
                       weight_decay=0.1, no_decay=lambda n, p: p.ndim < 2)
    ... loss.backward(); clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    ckpt = {"model": model.state_dict(), "optim": opt.state_dict()}   # restore: the same two calls

One-sided LoRA (wraps ``model`` in place with parametrizations; build it *after* moving the model
to its device/dtype)::

    opt = onesided_lora_adamw(model, select, lr=1e-2, rank=128, scale=0.25, proj_gap=200)
    ... same loop; on refresh steps the base weights W0 also carry a gradient (the full G the SVD
    needs), so ``clip_grad_norm_(model.parameters(), ...)`` clips it together with everything else.
    ckpt = {"model": model.state_dict(), "optim": opt.state_dict()}  # P, C, W0 are in the model
    merge_onesided_lora(model)   # at the end: plain weights W0 + P C again (for export/eval)

To restore, rebuild the model and the optimizer the same way (for LoRA: wrap first), then call
``model.load_state_dict`` and ``opt.load_state_dict``; training continues bit-for-bit.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Literal, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from hyperloop_lm.utils import UserError, closest

__all__ = [
    "PROJ_KINDS",
    "Selector",
    "projection_side",
    "effective_rank",
    "compute_projector",
    "project",
    "project_back",
    "linear_weights",
    "select_weights",
    "GaLoreAdamW",
    "galore_adamw",
    "OneSidedLoRA",
    "LoRASite",
    "add_onesided_lora",
    "merge_onesided_lora",
    "OneSidedLoRAAdamW",
    "onesided_lora_adamw",
    "DualityReport",
    "check_duality",
    "optimizer_state_bytes",
    "expected_state_bytes",
]

PROJ_KINDS = ("svd", "random")
Side = Literal["left", "right"]
# Which weights are projected: a predicate on (qualified name, parameter) or a collection of names
# as given by model.named_parameters().
Selector = Union[Callable[[str, Tensor], bool], Collection[str]]


# --------------------------------------------------------------------------------------------
# Projector
# --------------------------------------------------------------------------------------------


def projection_side(shape: Sequence[int]) -> Side:
    """``"left"`` (P is m x r, R = P^T G) if m <= n, else ``"right"`` (P is n x r, R = G P)."""
    m, n = shape
    return "left" if m <= n else "right"


def effective_rank(shape: Sequence[int], rank: int) -> int:
    """The rank actually used for a weight: ``rank`` capped at min(m, n).

    A global rank (e.g. 128) may exceed the small side of a small weight; an SVD has only min(m, n)
    directions, so we cap rather than fail.
    """
    return min(int(rank), *shape)


def _mix_seed(base: int, index: int, refresh: int) -> int:
    """A 63-bit seed from (base seed, weight index, refresh count) -- SplitMix64 finaliser.

    Deriving the seed from counters (instead of keeping a live RNG) makes random projectors a pure
    function of optimizer state: resuming from a checkpoint reproduces them exactly, and GaLore and
    its LoRA dual draw the same sketch for the same weight.
    """
    mask = (1 << 64) - 1
    x = (base * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9 + (refresh + 1) * 0x94D049BB133111EB) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def compute_projector(grad: Tensor, rank: int, kind: str, seed: int = 0) -> Tensor:
    """An fp32 projector with orthonormal columns for a gradient ``grad`` (m x n).

    Returns P of shape (m, r) if m <= n else (n, r), r = effective_rank. ``"svd"``: the top-r
    left (resp. right) singular vectors of ``grad``. ``"random"``: a Gaussian (dim x r) sketch drawn
    from ``seed`` on the CPU (so it is identical on every device) and orthonormalised by QR.
    """
    if kind not in PROJ_KINDS:
        raise UserError(f"unknown projection kind '{kind}'{closest(kind, PROJ_KINDS)}; use one of {PROJ_KINDS}")
    if grad.ndim != 2:
        raise UserError(f"can only project 2-D gradients, got shape {tuple(grad.shape)}")
    side = projection_side(grad.shape)
    r = effective_rank(grad.shape, rank)
    dim = grad.shape[0] if side == "left" else grad.shape[1]
    if kind == "svd":
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)  # u (m, k), vh (k, n)
        p = u[:, :r] if side == "left" else vh[:r].T
        return p.contiguous()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(dim, r, generator=gen, dtype=torch.float32)
    q, _ = torch.linalg.qr(sketch, mode="reduced")  # (dim, r), orthonormal columns
    return q.contiguous().to(grad.device)


def project(grad: Tensor, p: Tensor) -> Tensor:
    """Map a full gradient (m x n) into the projected space: P^T G (r x n) or G P (m x r)."""
    return p.T @ grad if projection_side(grad.shape) == "left" else grad @ p


def project_back(low: Tensor, p: Tensor, shape: Sequence[int]) -> Tensor:
    """Map a projected tensor back to the weight's (m x n) shape: P R or R P^T."""
    return p @ low if projection_side(shape) == "left" else low @ p.T


# --------------------------------------------------------------------------------------------
# Selecting the projected weights
# --------------------------------------------------------------------------------------------


def linear_weights(model: nn.Module, exclude: Collection[str] = ()) -> list[str]:
    """Names of every ``nn.Linear`` weight whose qualified name contains none of ``exclude``.

    A convenience selector, e.g. ``linear_weights(model, exclude=("head",))``.
    """
    modules = {id(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = []
    for name, p in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        if attr == "weight" and id(model.get_submodule(owner)) in modules and not any(e in name for e in exclude):
            out.append(name)
    return out


def select_weights(model: nn.Module, select: Selector) -> list[tuple[str, nn.Parameter]]:
    """The (deduplicated, in ``named_parameters`` order) 2-D parameters that ``select`` picks."""
    named = list(model.named_parameters())
    if callable(select):
        picked = [(n, p) for n, p in named if select(n, p)]
    else:
        wanted = set(select)
        known = {n for n, _ in named}
        for name in sorted(wanted - known):
            raise UserError(f"no parameter named '{name}' in the model{closest(name, known)}")
        picked = [(n, p) for n, p in named if n in wanted]
    for name, p in picked:
        if p.ndim != 2:
            raise UserError(f"'{name}' has shape {tuple(p.shape)}; only 2-D weights can be projected")
    return picked


def _check_group(group: dict[str, Any]) -> None:
    if group["rank"] is None:
        return
    if int(group["rank"]) < 1:
        raise UserError(f"rank must be >= 1, got {group['rank']}")
    if int(group["proj_gap"]) < 1:
        raise UserError(f"proj_gap must be >= 1, got {group['proj_gap']}")
    if group["proj"] not in PROJ_KINDS:
        raise UserError(f"unknown projection kind '{group['proj']}'{closest(group['proj'], PROJ_KINDS)}")
    if not group["scale"] > 0:
        raise UserError(f"scale must be > 0, got {group['scale']}")


# --------------------------------------------------------------------------------------------
# Shared AdamW machinery
# --------------------------------------------------------------------------------------------


class _AdamWBase(torch.optim.Optimizer):
    """AdamW bookkeeping shared by GaLore and the LoRA dual.

    All optimizer state is fp32 regardless of the parameter dtype, and ``load_state_dict`` keeps it
    that way: torch's default loader casts floating state to the parameter dtype (which would turn
    an fp32 projector into bf16 and break bit-exact resumption).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        scale: float = 0.25,
        proj_gap: int = 200,
        proj: str = "svd",
        proj_seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            rank=rank, scale=scale, proj_gap=proj_gap, proj=proj, proj_seed=proj_seed,
        )
        if not 0.0 <= defaults["lr"]:
            raise UserError(f"lr must be >= 0, got {defaults['lr']}")
        b1, b2 = defaults["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise UserError(f"betas must be in [0, 1), got {defaults['betas']}")
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)

    @staticmethod
    def _adam_direction(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        """Advance the moments with ``grad`` (fp32) and return the bias-corrected Adam direction.

        u = (m / bc1) / (sqrt(v / bc2) + eps), the same formula (eps outside the bias-corrected
        root) as torch.optim.AdamW. Increments ``state["step"]``.
        """
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
        state["step"] = state.get("step", 0) + 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t
        denom = (v.sqrt() / math.sqrt(bc2)).add_(group["eps"])
        return (m / bc1).div_(denom)

    def _plain_step(self, p: Tensor, group: dict[str, Any]) -> None:
        """Ordinary AdamW on a non-projected parameter."""
        u = self._adam_direction(self.state[p], p.grad.float(), group)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(u, alpha=-group["lr"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state exactly: tensors are copied to the parameter's device, never re-typed."""
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # validates and restores the groups
        id_to_param = {
            pid: p
            for saved, group in zip(state_dict["param_groups"], self.param_groups)
            for pid, p in zip(saved["params"], group["params"])
        }
        for pid, st in saved_state.items():
            p = id_to_param[pid]
            self.state[p] = {
                k: v.to(device=p.device, copy=True) if isinstance(v, Tensor) else copy.deepcopy(v)
                for k, v in st.items()
            }


# --------------------------------------------------------------------------------------------
# GaLore
# --------------------------------------------------------------------------------------------


class GaLoreAdamW(_AdamWBase):
    """AdamW whose param groups with ``rank`` set keep their Adam state in a projected space.

    Group options (torch-style param groups; unspecified keys take the constructor defaults):
      lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0 -- AdamW, decay decoupled, applied to the
        full weight before the update (torch.optim.AdamW's order);
      rank: None for plain AdamW, else the projection rank (capped at min(m, n) per weight);
      scale: GaLore's update scale (the paper uses 0.25); proj_gap: steps between projector
        refreshes; proj: "svd" | "random"; proj_seed: base seed of the random sketches.

    State of a projected (m x n) weight: ``step`` (int), ``projector`` (fp32, (m, r) or (n, r)),
    ``exp_avg``/``exp_avg_sq`` (fp32, (r, n) or (m, r)). At a refresh the moments are *carried* over
    unchanged into the new basis (GaLore's behaviour, see the module docstring), and ``step`` keeps
    counting, so bias correction does not restart. The random sketch of refresh k of the i-th
    weight of a group is seeded from (proj_seed, i, k): no RNG state to save.
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Same arguments as _AdamWBase (lr, betas, eps, weight_decay, rank, scale, proj_gap, proj, proj_seed)."""
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            if group["rank"] is not None:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise UserError(f"GaLore groups need 2-D weights, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if group["rank"] is None:
                    self._plain_step(p, group)
                else:
                    self._projected_step(p, index, group)
        return loss

    def _projected_step(self, p: Tensor, index: int, group: dict[str, Any]) -> None:
        state = self.state[p]
        grad = p.grad.float()  # (m, n)
        t = state.get("step", 0)
        if t % group["proj_gap"] == 0:
            seed = _mix_seed(group["proj_seed"], index, t // group["proj_gap"])
            state["projector"] = compute_projector(grad, group["rank"], group["proj"], seed)
        proj = state["projector"]  # (m, r) or (n, r)
        u = self._adam_direction(state, project(grad, proj), group)  # (r, n) or (m, r)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(project_back(u, proj, p.shape), alpha=-group["lr"] * group["scale"])


def _param_groups(
    named: list[tuple[str, nn.Parameter]],
    picked: list[nn.Parameter],
    no_decay: Selector | None,
    weight_decay: float,
    low_rank: dict[str, Any],
) -> list[dict[str, Any]]:
    """[low-rank group, plain decayed group, plain no-decay group] (empty groups dropped)."""
    picked_ids = {id(p) for p in picked}
    if no_decay is None:
        skip: Callable[[str, Tensor], bool] = lambda n, p: False
    elif callable(no_decay):
        skip = no_decay
    else:
        skip = lambda n, p: n in no_decay  # noqa: E731 -- a collection of names
    decay = [p for n, p in named if id(p) not in picked_ids and not skip(n, p)]
    nodecay = [p for n, p in named if id(p) not in picked_ids and skip(n, p)]
    groups = [
        {"params": picked, **low_rank},
        {"params": decay, "rank": None},
        {"params": nodecay, "rank": None, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def galore_adamw(
    model: nn.Module,
    select: Selector,
    *,
    lr: float,
    rank: int,
    scale: float = 0.25,
    proj_gap: int = 200,
    proj: str = "svd",
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    no_decay: Selector | None = None,
    seed: int = 0,
) -> GaLoreAdamW:
    """GaLore on the weights ``select`` picks, plain AdamW on every other trainable parameter.

    ``no_decay`` picks non-projected parameters that get weight_decay 0 (norms, biases, gains...).
    Frozen parameters (requires_grad False) are left out.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    picked = [p for _, p in select_weights(model, select) if p.requires_grad]
    low_rank = dict(rank=rank, scale=scale, proj_gap=proj_gap, proj=proj, proj_seed=seed)
    groups = _param_groups(named, picked, no_decay, weight_decay, low_rank)
    return GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------
# One-sided LoRA dual
# --------------------------------------------------------------------------------------------


class OneSidedLoRA(nn.Module):
    """Parametrization ``W = W0 + P C`` (left, m <= n) or ``W = W0 + C P^T`` (right, m > n).

    P (buffer, fp32, (m, r) or (n, r)) is frozen between refreshes; C (fp32, (r, n) or (m, r)) is
    the trained adapter. Both start at zero, so wrapping does not change the model; the optimizer
    sets P on its first step.
    """

    def __init__(self, shape: Sequence[int], rank: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        m, n = shape
        self.shape = (m, n)
        self.side: Side = projection_side(shape)
        r = effective_rank(shape, rank)
        p_shape, c_shape = ((m, r), (r, n)) if self.side == "left" else ((n, r), (m, r))
        self.register_buffer("P", torch.zeros(p_shape, dtype=torch.float32, device=device))
        self.C = nn.Parameter(torch.zeros(c_shape, dtype=torch.float32, device=device))

    def delta(self) -> Tensor:
        """P C (m x n) or C P^T (m x n)."""
        return project_back(self.C, self.P, self.shape)

    def forward(self, base: Tensor) -> Tensor:
        return base + self.delta().to(base.dtype)


@dataclass
class LoRASite:
    """One wrapped weight: ``module.<attr>`` is now ``W0 + adapter``'s delta."""

    name: str
    module: nn.Module
    attr: str
    adapter: OneSidedLoRA

    @property
    def base(self) -> nn.Parameter:
        """W0, the frozen base weight (the original Parameter object)."""
        return getattr(self.module.parametrizations, self.attr).original


def add_onesided_lora(model: nn.Module, select: Selector, rank: int) -> list[LoRASite]:
    """Wrap every weight ``select`` picks as W0 + P C, in place; returns the sites in model order.

    W0 keeps ``requires_grad=True`` for now: the optimizer's first step is a projector refresh and
    needs the full gradient G of W (see :class:`OneSidedLoRAAdamW`).
    """
    picked = select_weights(model, select)
    owners: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    sites = []
    for name, p in picked:
        if len(owners[id(p)]) > 1:
            # A parameter tied across *different* modules cannot be wrapped at one module attribute.
            # (One module called several times, e.g. a looped block, is fine.)
            raise UserError(f"'{name}' is tied across several modules; one-sided LoRA cannot wrap it")
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        adapter = OneSidedLoRA(p.shape, rank, device=p.device)
        parametrize.register_parametrization(module, attr, adapter)
        sites.append(LoRASite(name, module, attr, adapter))
    return sites


def merge_onesided_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (W0 + P C) and remove the parametrizations, in place."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attr in list(module.parametrizations.keys()):
            if any(isinstance(f, OneSidedLoRA) for f in module.parametrizations[attr]):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


class OneSidedLoRAAdamW(_AdamWBase):
    """AdamW on one-sided LoRA adapters C (plus plain AdamW on the other parameters).

    Every ``proj_gap`` steps (including the first), per site: merge P C into W0, re-zero C, reset
    C's Adam moments and bias correction, refresh P from W's full gradient (``"svd"``) or a new seed
    (``"random"``), and use C's gradient under the *new* P, i.e. project(G, P_new) -- exactly the
    gradient a freshly created adapter would receive, and what GaLore projects at that step.

    The full G is W0's gradient (dL/dW0 = dL/dW since W = W0 + delta). To save memory it is only
    computed when needed: W0.requires_grad is switched on after the step preceding a refresh, and
    off again once the refresh has consumed it.

    The adapter group steps with learning rate ``scale * lr`` (GaLore's ``scale``; the exact
    mapping is derived in the module docstring); its weight decay acts on C. Group options are those
    of :class:`GaLoreAdamW`; a group holding adapters must have ``rank`` set. State per adapter C:
    ``step`` (since the last refresh), ``total_step`` (schedules refreshes), ``exp_avg``,
    ``exp_avg_sq``. P, C and W0 are saved with the model's state_dict.
    """

    def __init__(self, params: Any, sites: Sequence[LoRASite], *args: Any, **kwargs: Any) -> None:
        """`sites`: the wrapped weights; the rest as _AdamWBase (lr, betas, eps, weight_decay, rank, ...)."""
        super().__init__(params, *args, **kwargs)
        self.sites = list(sites)
        self._site_of = {id(s.adapter.C): s for s in self.sites}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._site_of and group["rank"] is None:
                    raise UserError("a param group holding LoRA adapters needs 'rank' (and projector options) set")
        for site in self.sites:
            if not any(site.adapter.C is p for g in self.param_groups for p in g["params"]):
                raise UserError(f"the adapter of '{site.name}' is in no param group")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                site = self._site_of.get(id(p))
                if site is not None:
                    self._adapter_step(site, index, group)
                elif p.grad is not None:
                    self._plain_step(p, group)
        return loss

    def _adapter_step(self, site: LoRASite, index: int, group: dict[str, Any]) -> None:
        adapter, base = site.adapter, site.base
        c = adapter.C
        state = self.state[c]
        t = state.setdefault("total_step", 0)
        gap = group["proj_gap"]
        if t % gap == 0:
            if base.grad is None:  # weight unused this step: skip it, as GaLore skips grad=None
                return
            grad = base.grad.float()  # the full G of W, (m, n)
            base.add_(adapter.delta().to(base.dtype))  # merge: W0 <- W0 + P C ...
            c.zero_()  # ... and C <- 0, so W is unchanged
            seed = _mix_seed(group["proj_seed"], index, t // gap)
            adapter.P.copy_(compute_projector(grad, group["rank"], group["proj"], seed))
            c.grad = project(grad, adapter.P).to(c.dtype)  # C's gradient under the new P
            base.grad = None
            base.requires_grad_(False)
            for key in ("step", "exp_avg", "exp_avg_sq"):  # a fresh adapter has fresh moments
                state.pop(key, None)
        elif c.grad is None:
            return
        lr = group["lr"] * group["scale"]
        u = self._adam_direction(state, c.grad.float(), group)
        if group["weight_decay"]:
            c.mul_(1 - lr * group["weight_decay"])
        c.add_(u, alpha=-lr)
        state["total_step"] = t + 1
        base.requires_grad_((t + 1) % gap == 0)  # the next step refreshes: it needs W's full G

    def _sync_base_requires_grad(self) -> None:
        """W0 needs a gradient exactly when the next step of its adapter is a refresh."""
        for site in self.sites:
            gap = next(g["proj_gap"] for g in self.param_groups for p in g["params"] if p is site.adapter.C)
            t = self.state[site.adapter.C].get("total_step", 0)
            site.base.requires_grad_(t % gap == 0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also clears W0's gradient (it is not in any group, but carries G on refresh steps)."""
        super().zero_grad(set_to_none=set_to_none)
        for site in self.sites:
            site.base.grad = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._sync_base_requires_grad()


def onesided_lora_adamw(
    model: nn.Module,
    select: Selector,
    *,
    lr: float,
    rank: int,
    scale: float = 0.25,
    proj_gap: int = 200,
    proj: str = "svd",
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    no_decay: Selector | None = None,
    seed: int = 0,
) -> OneSidedLoRAAdamW:
    """Wrap the weights ``select`` picks as one-sided LoRA (in place) and return its optimizer.

    Same arguments and meaning as :func:`galore_adamw`: with the same arguments the two follow the
    same trajectory inside one projector period when weight_decay = 0 and there is no clipping.
    ``no_decay`` names/predicates refer to the *unwrapped* model's parameter names.
    """
    names_before = {id(p): n for n, p in model.named_parameters()}
    sites = add_onesided_lora(model, select, rank)
    bases = {id(s.base) for s in sites}
    adapters = [s.adapter.C for s in sites]
    adapter_ids = {id(c) for c in adapters}
    # Plain params keep their original names so `no_decay` sees what the user sees.
    named = [
        (names_before.get(id(p), n), p)
        for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in bases and id(p) not in adapter_ids
    ]
    low_rank = dict(rank=rank, scale=scale, proj_gap=proj_gap, proj=proj, proj_seed=seed)
    groups = _param_groups(named, adapters, no_decay, weight_decay, low_rank)
    return OneSidedLoRAAdamW(groups, sites, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------
# Equivalence check
# --------------------------------------------------------------------------------------------


@dataclass
class DualityReport:
    """Per-step comparison of GaLore and its one-sided-LoRA dual (index k = after step k+1)."""

    max_abs_diff: list[float] = field(default_factory=list)  # max |W_galore - W_lora| over all weights
    galore_losses: list[float] = field(default_factory=list)
    lora_losses: list[float] = field(default_factory=list)
    max_abs_change: list[float] = field(default_factory=list)  # max |W_galore - W_init|, for scale

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff, default=0.0)


def _effective(model: nn.Module, name: str) -> Tensor:
    """The tensor ``name`` as the forward sees it (W0 + delta for a wrapped weight)."""
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def check_duality(
    model_factory: Callable[[], nn.Module],
    data: Sequence[Any],
    steps: int,
    rank: int,
    proj: str = "svd",
    weight_decay: float = 0.0,
    clip: float | None = None,
    *,
    select: Selector | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] = _default_loss,
    lr: float = 1e-2,
    scale: float = 0.25,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    proj_gap: int | None = None,
    seed: int = 0,
) -> DualityReport:
    """Train GaLore and the one-sided-LoRA dual side by side from the same initial weights.

    ``model_factory()`` is called once and deep-copied, so both start bit-identical. Step k uses
    ``data[k % len(data)]`` and ``loss_fn(model, batch)`` (default: ``model(*batch)``). ``select``
    defaults to every nn.Linear weight. ``proj_gap`` defaults to ``steps``: the whole run is one
    projector period, where the two must agree to float error when weight_decay = 0 and clip is
    None. With ``clip`` the global grad norm of each model's trainable gradients is clipped.
    Returns the max abs difference of every (effective) weight after each step, and the losses.
    """
    base = model_factory()
    names = [n for n, _ in base.named_parameters()]
    chosen = [n for n, _ in select_weights(base, linear_weights(base) if select is None else select)]
    init = {n: _effective(base, n).detach().clone() for n in names}
    kwargs = dict(
        lr=lr, rank=rank, scale=scale, proj_gap=proj_gap or steps, proj=proj, betas=betas, eps=eps,
        weight_decay=weight_decay, seed=seed,
    )
    galore_model, lora_model = copy.deepcopy(base), copy.deepcopy(base)
    runs = [
        (galore_model, galore_adamw(galore_model, chosen, **kwargs)),
        (lora_model, onesided_lora_adamw(lora_model, chosen, **kwargs)),
    ]
    report = DualityReport()
    for k in range(steps):
        batch = data[k % len(data)]
        for (model, opt), losses in zip(runs, (report.galore_losses, report.lora_losses)):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            report.max_abs_diff.append(
                max((_effective(galore_model, n) - _effective(lora_model, n)).abs().max().item() for n in names)
            )
            report.max_abs_change.append(max((_effective(galore_model, n) - init[n]).abs().max().item() for n in names))
    return report


# --------------------------------------------------------------------------------------------
# Memory accounting
# --------------------------------------------------------------------------------------------


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> int:
    """Bytes of optimizer state, measured from the actual state tensors.

    Scalar (0-dim) step counters are not counted. ``params`` restricts the count to the state
    attributable to those parameters (all if None).
    For :class:`OneSidedLoRAAdamW` a wrapped weight W0 (or its adapter C) is charged the adapter's
    moments *and* the adapter tensors C and P themselves: they exist only because of the method
    (the frozen W0 is the model's own weight, not counted).
    """
    sites = {}
    if isinstance(optimizer, OneSidedLoRAAdamW):
        for s in optimizer.sites:
            sites[id(s.adapter.C)] = s
            sites[id(s.base)] = s
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    total, seen = 0, set()
    for p in params:
        site = sites.get(id(p))
        key = p if site is None else site.adapter.C
        if id(key) in seen:
            continue
        seen.add(id(key))
        # 0-dim tensors are step counters (torch.optim.AdamW keeps `step` as one), not state memory.
        state = optimizer.state.get(key, {}).values()
        total += sum(_nbytes(v) for v in state if isinstance(v, Tensor) and v.ndim > 0)
        if site is not None:
            total += _nbytes(site.adapter.C) + _nbytes(site.adapter.P)
    return total


def expected_state_bytes(
    shapes: Iterable[Sequence[int]], rank: int | None, kind: str, bytes_per_element: int = 4
) -> int:
    """Optimizer-state bytes computed from weight shapes (fp32 state by default).

    ``"adamw"``: 2 moments x m n. ``"galore"``: 2 moments of the projected shape (r n or m r) plus
    the projector (m r or n r). ``"onesided-lora"``: C plus its 2 moments (r n or m r) plus P.
    r = effective_rank(shape, rank) (capped at min(m, n)).
    """
    kinds = ("adamw", "galore", "onesided-lora")
    if kind not in kinds:
        raise UserError(f"unknown optimizer kind '{kind}'{closest(kind, kinds)}; use one of {kinds}")
    total = 0
    for shape in shapes:
        m, n = shape
        if kind == "adamw":
            total += 2 * m * n
            continue
        r = effective_rank(shape, rank)
        small, large = (m, n) if projection_side(shape) == "left" else (n, m)
        low = r * large  # projected gradient / moment / adapter numel
        total += (2 * low if kind == "galore" else 3 * low) + small * r
    return total * bytes_per_element
