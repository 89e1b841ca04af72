"""The model against the spec: reductions between families, Sinkhorn, mHC reference, gradients, causality."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hyperloop_lm import LM, ModelConfig, get_preset
from hyperloop_lm.config import FAMILIES
from hyperloop_lm.infer.cache import KVCache
from hyperloop_lm.model.hyper import HyperConnection, sinkhorn

torch.set_default_dtype(torch.float32)
BIG = 30.0  # a bias that saturates a sigmoid: sigmoid(30) = 1 - 1e-13


def micro(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_heads=4, max_seq_len=64, n_begin=1, n_middle=2, n_end=1, loops=3)
    return ModelConfig(**{**base, **kw})


def tokens(cfg, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def copy_layers(dst: LM, src: LM, mapping: dict[str, str], skip: tuple[str, ...] = ()) -> None:
    """Load src's tensors into dst, renaming prefixes (e.g. middle.0 -> begin.1); `skip` prefixes are dropped."""
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith(skip):
            continue
        for a, b in mapping.items():
            if k.startswith(a):
                k = b + k[len(a):]
                break
        sd[k] = v
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected


def test_looped_with_one_loop_is_the_transformer():
    torch.manual_seed(0)
    looped = LM(micro(loops=1, loop_embedding=False))
    plain = LM(micro(n_begin=4, n_middle=0, n_end=0, loops=1))
    copy_layers(plain, looped, {"middle.0.": "begin.1.", "middle.1.": "begin.2.", "end.0.": "begin.3."})
    idx = tokens(plain.cfg)
    assert_close(looped(idx), plain(idx))


def test_looped_runs_middle_weights_loops_times():
    """Looped 1-2x3-1 equals a Transformer whose 8 layers repeat the middle pair three times."""
    torch.manual_seed(0)
    looped = LM(micro(loop_embedding=False))
    plain = LM(micro(n_begin=8, n_middle=0, n_end=0, loops=1))
    mapping = {"end.0.": "begin.7."}
    copy_layers(plain, looped, mapping, skip=("middle.",))
    sd = looped.state_dict()
    for l in range(3):
        for j in range(2):
            for k, v in sd.items():
                if k.startswith(f"middle.{j}."):
                    plain.state_dict()[f"begin.{1 + 2 * l + j}." + k[len(f'middle.{j}.'):]].copy_(v)
    idx = tokens(plain.cfg)
    assert_close(looped(idx), plain(idx))


def _fix_hc(model: LM, pre: float, post_bias: float, res_bias: float | None) -> None:
    with torch.no_grad():
        for site in model.hc:
            n = site.n
            site.weight.zero_()
            site.bias[:n] = pre
            site.bias[n:2 * n] = post_bias
            if res_bias is not None:
                site.bias[2 * n:] = res_bias


@pytest.mark.parametrize("block_output,h_res,res_bias", [("delta", "identity", None), ("full", "diagonal", -BIG)])
def test_hyperloop_n1_reduces_to_looped_with_loop_embeddings(block_output, h_res, res_bias):
    """n=1, pre=post=1: with u = block(x) - x and H_res = identity, or with u = block(x) (spec) and
    H_res = 0, one HC site per loop is exactly the Looped update x <- block(x) + e_l."""
    torch.manual_seed(0)
    hyper = LM(micro(connection="loop_hc", n_streams=1, h_res=h_res, hc_block_output=block_output))
    looped = LM(micro(loop_embedding=True))
    _fix_hc(hyper, pre=BIG, post_bias=0.0, res_bias=res_bias)  # pre = 1, post = 2*sigmoid(0) = 1
    with torch.no_grad():
        hyper.loop_embed.normal_()
    copy_layers(looped, hyper, {}, skip=("hc.",))
    idx = tokens(looped.cfg)
    assert_close(hyper(idx), looped(idx), atol=1e-5, rtol=1e-5)


def test_mhc_with_one_stream_is_the_transformer():
    torch.manual_seed(0)
    mhc = LM(micro(n_begin=3, n_middle=0, n_end=0, loops=1, connection="mhc", n_streams=1))
    plain = LM(micro(n_begin=3, n_middle=0, n_end=0, loops=1))
    with torch.no_grad():
        for blk in mhc.begin:
            for site in (blk.attn_hc, blk.mlp_hc):
                site.weight.zero_()
                site.bias[0] = BIG  # pre = 1; post = 1; 1x1 Sinkhorn = 1
    copy_layers(plain, mhc, {}, skip=tuple(f"begin.{i}.{s}_hc." for i in range(3) for s in ("attn", "mlp")))
    idx = tokens(plain.cfg)
    assert_close(mhc(idx), plain(idx), atol=1e-5, rtol=1e-5)


def test_sinkhorn_is_doubly_stochastic_and_matches_hyper_connections():
    """At the logit scale the model produces (mild-identity bias + small dynamic part) 20 iterations are
    doubly stochastic to 1e-5. For arbitrary std-1 logits 20 iterations can leave ~4e-4 column error
    (rows are exact after the last row step); more iterations converge."""
    torch.manual_seed(0)
    for gate in (0.01, 0.1):  # the init gating factor, and 10x it
        site = HyperConnection.for_mhc(micro(connection="mhc", hc_gate_init=gate))
        _, _, m = site.coefficients(torch.randn(16, 16, 4, 32))  # the H_res the model actually uses
        assert_close(m.sum(-1), torch.ones(16, 16, 4), atol=1e-5, rtol=0)
        assert_close(m.sum(-2), torch.ones(16, 16, 4), atol=1e-5, rtol=0)
        assert (m > 0).all()
    hard = torch.randn(256, 4, 4)
    assert_close(sinkhorn(hard, 200).sum(-2), torch.ones(256, 4), atol=1e-5, rtol=0)
    from hyper_connections.mHCv2 import sinkhorn_knopps  # independent implementation (PyPI)

    assert_close(sinkhorn(hard, 20), sinkhorn_knopps(hard, iters=20), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("code", ["kernel", "torch"])
def test_sinkhorn_backward_is_the_exact_gradient_of_the_iterations(code, monkeypatch):
    """The hand-written backward equals autograd through the plain loop (float64), for any shape of
    leading axes, and passes gradcheck: in the C kernel (where it builds) and in the torch code."""
    from hyperloop_lm.model import hyper

    if code == "torch":
        monkeypatch.setattr(hyper, "_use_kernel", lambda t: False)
    def plain(logits, iters):
        m = (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()
        for _ in range(iters):
            m = m / m.sum(dim=-2, keepdim=True)
            m = m / m.sum(dim=-1, keepdim=True)
        return m

    torch.manual_seed(0)
    for shape, iters in (((3, 5, 4, 4), 20), ((7, 2, 2), 3), ((4, 4), 1)):
        logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(shape, dtype=torch.float64)
        (g_ours,) = torch.autograd.grad((sinkhorn(logits, iters) * w).sum(), logits)
        (g_ref,) = torch.autograd.grad((plain(logits, iters) * w).sum(), logits)
        assert_close(sinkhorn(logits, iters), plain(logits, iters), atol=1e-12, rtol=0)
        assert_close(g_ours, g_ref, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 5), torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="at least one iteration"):  # 0 would be exp alone, not shift-invariant
        sinkhorn(torch.randn(2, 3, 3), 0)


def reference_mhc_site(y, W, b, a, F_, iters=20, eps=1e-5):
    """Spec 2.2 transcribed directly, one token at a time, with explicit loops."""
    *lead, n, C = y.shape
    out = torch.empty_like(y)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in lead]) if len(lead) > 1 else [(i,) for i in range(lead[0])]:
        idx = tuple(int(i) for i in idx)
        yt = y[idx].double()  # (n, C)
        flat = yt.reshape(-1)
        z = flat / torch.sqrt((flat ** 2).mean() + eps)
        proj = W.double() @ z
        pre = torch.sigmoid(a[0] * proj[:n] + b[:n])
        post = 2 * torch.sigmoid(a[1] * proj[n:2 * n] + b[n:2 * n])
        logits = (a[2] * proj[2 * n:] + b[2 * n:]).reshape(n, n)
        M = torch.exp(logits - logits.max())
        for _ in range(iters):
            M = M / M.sum(0, keepdim=True)
            M = M / M.sum(1, keepdim=True)
        x_in = sum(pre[i] * yt[i] for i in range(n))
        f = F_(x_in.float()).double()
        new = torch.stack([sum(M[i, j] * yt[j] for j in range(n)) + post[i] * f for i in range(n)])
        out[idx] = new.float()
    return out


def test_mhc_site_matches_direct_transcription():
    torch.manual_seed(0)
    cfg = micro(connection="mhc", n_streams=3, hc_gate_init=0.5)
    site = HyperConnection.for_mhc(cfg)
    with torch.no_grad():
        site.bias.normal_()
    lin = torch.nn.Linear(cfg.d_model, cfg.d_model)
    y = torch.randn(2, 5, 3, cfg.d_model)
    ours = site(y, lambda x: torch.tanh(lin(x)))
    ref = reference_mhc_site(y, site.weight.detach(), site.bias.detach().double(), site.gate.detach().double(),
                             lambda x: torch.tanh(lin(x)), iters=cfg.sinkhorn_iters, eps=cfg.norm_eps)
    assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_hc_projection_backward_is_autograd_of_the_plain_formula():
    """_project's hand-written backward (eager training) against autograd through W f and
    rsqrt(mean(f^2) + eps), which no-grad and compiled code use; both outputs, both inputs."""
    from hyperloop_lm.model.hyper import _project

    torch.manual_seed(0)
    f = torch.randn(3, 5, 2 * 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 2 * 8, dtype=torch.float64, requires_grad=True)
    gh, gr = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 5, 1, dtype=torch.float64)
    h, r = _project(f, W, 1e-6)
    assert type(h.grad_fn).__name__ == "_ProjectionBackward"
    ref_h, ref_r = F.linear(f, W), torch.rsqrt(f.square().mean(-1, keepdim=True) + 1e-6)
    assert_close((h, r), (ref_h, ref_r))
    got, want = (torch.autograd.grad((h * gh).sum() + (r * gr).sum(), (f, W)),
                 torch.autograd.grad((ref_h * gh).sum() + (ref_r * gr).sum(), (f, W)))
    assert_close(got, want)
    assert torch.autograd.gradcheck(lambda a, b: _project(a, b, 1e-6), (f, W))
    with torch.no_grad():
        assert_close(_project(f, W, 1e-6), (ref_h, ref_r))


def test_loop_hc_site_matches_spec_equations():
    """Spec 2.1 for one token: pre/post/res from RMSNorm(flatten y); y_i <- res_i y_i + post_i u."""
    torch.manual_seed(0)
    cfg = micro(connection="loop_hc", hc_gate_init=0.3)
    site = HyperConnection.from_config(cfg, "diagonal")
    y = torch.randn(1, 1, cfg.n_streams, cfg.d_model)
    F_ = lambda x: 2 * x + 1  # noqa: E731
    n = cfg.n_streams
    z = y.flatten(-2) / y.flatten(-2).pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt()
    h = z @ site.weight.T
    a, b = site.gate, site.bias
    pre = torch.sigmoid(a[0] * h[..., :n] + b[:n])
    post = 2 * torch.sigmoid(a[1] * h[..., n:2 * n] + b[n:2 * n])
    res = torch.sigmoid(a[2] * h[..., 2 * n:] + b[2 * n:])
    u = F_((pre[..., None] * y).sum(-2))
    expected = res[..., None] * y + post[..., None] * u[..., None, :]
    assert_close(site(y, F_), expected)


ALL_VARIANTS = [dict(connection="residual", n_middle=0, n_end=0, n_begin=4, loops=1),
                dict(connection="mhc", n_middle=0, n_end=0, n_begin=4, loops=1),
                dict(connection="residual", loop_embedding=False),
                dict(connection="loop_hc"),
                dict(connection="loop_hc", h_res="sinkhorn"),
                dict(connection="loop_hc", h_res="identity"),
                dict(connection="loop_hc", hc_every=1),
                dict(connection="loop_hc", hc_every=6, hc_pre_bias_init="logit_inv_n"),
                dict(connection="loop_hc", init="gpt2", hc_block_output="delta"),
                dict(connection="loop_hc", hc_block_output="delta", hc_pre_bias_init="logit_inv_n", hc_res_init=0.99)]


def test_hc_res_init_sets_the_stream_decay_and_the_looped_init_keeps_the_stream_scale():
    """res = sigmoid(b_res) at init. With the spec's b = 0 every loop writes the block's whole output (input
    included) onto half of the stream, so the stream grows each loop; the `looped_init` ablation (read the
    mean, write the update, keep the stream) grows it no faster than the plain Looped model does."""
    torch.manual_seed(0)
    kw = dict(hc_block_output="delta", hc_pre_bias_init="logit_inv_n", hc_res_init=0.99)
    pre, _, res = LM(micro(connection="loop_hc", **kw)).hc[0].coefficients(torch.zeros(1, 4, 32))
    assert_close(res, torch.full_like(res, 0.99))
    assert_close(pre, torch.full_like(pre, 0.25))

    def growth(**over):
        model, trace = LM(micro(**over)), []
        with torch.no_grad():
            model(tokens(model.cfg), trace=trace)
        rms = [h.pow(2).mean().sqrt().item() for *_, h in trace]
        return rms[-1] / rms[0]

    looped = growth(connection="residual")
    assert growth(connection="loop_hc") > 2 * looped  # b = 0: grows ~2.5x per loop
    assert growth(connection="loop_hc", **kw) < 1.1 * looped
    with pytest.raises(ValueError, match="hc_res_init"):
        micro(connection="loop_hc", hc_res_init=1.0).validate()


@pytest.mark.parametrize("kw", ALL_VARIANTS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_every_parameter_gets_a_gradient(kw):
    torch.manual_seed(0)
    model = LM(micro(**kw))
    idx = tokens(model.cfg)
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_per_loop_lora_trains_every_adapter():
    """LoRA B starts at zero (so A's first gradient is zero): after one SGD step every adapter moves."""
    torch.manual_seed(0)
    model = LM(micro(lora_rank=2, loop_embedding=False))
    idx = tokens(model.cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    assert before, "no LoRA parameters were created"
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
    for n, p in model.named_parameters():
        if "lora" in n:
            for loop in range(model.cfg.loops):
                assert not torch.equal(p[loop], before[n][loop]), (n, loop)


def test_lora_at_zero_is_the_looped_model():
    torch.manual_seed(0)
    lora = LM(micro(lora_rank=4, loop_embedding=False))
    looped = LM(micro(loop_embedding=False))
    copy_layers(looped, lora, {}, skip=tuple(f"middle.{j}.{m}.lora." for j in range(2) for m in ("attn", "mlp")))
    idx = tokens(looped.cfg)
    assert_close(lora(idx), looped(idx))


@pytest.mark.parametrize("kw", ALL_VARIANTS[:4], ids=["transformer", "mhc", "looped", "hyperloop"])
def test_causal_masking(kw):
    torch.manual_seed(0)
    model = LM(micro(**kw))
    idx = tokens(model.cfg, B=1, T=16)
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % model.cfg.vocab_size
    a, b = model(idx), model(changed)
    assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_forward(family):
    torch.manual_seed(0)
    model = LM(get_preset(f"micro-{family}"))
    idx = tokens(model.cfg, B=2, T=10)
    full = model(idx)
    cache = KVCache.for_model(model, batch=2, max_len=16)
    parts = [model(idx[:, :4], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_unpadded(family):
    torch.manual_seed(0)
    model = LM(get_preset(f"micro-{family}"))
    idx = tokens(model.cfg, B=1, T=6)
    pad = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    assert_close(model(pad, attention_mask=mask)[:, 3:], model(idx), atol=1e-5, rtol=1e-5)


def test_loop_override_runs_more_loops_and_reuses_last_loop_params():
    torch.manual_seed(0)
    model = LM(get_preset("micro-hyperloop"))
    idx = tokens(model.cfg)
    trace = []
    out = model(idx, loops=4, trace=trace)
    assert out.shape == (*idx.shape, model.cfg.vocab_size)
    assert model.depth(4) == model.cfg.n_begin + 4 * model.cfg.n_middle + model.cfg.n_end
    assert [t[1] for t in trace if t[0] == "streams"] == [0, 1, 2, 3]
    assert not torch.allclose(out, model(idx))


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, n_heads=4, vocab_size=1000, n_begin=2, n_middle=2, n_end=2, loops=3, init="gpt2")
    model = LM(cfg)
    expected = 0.02 / math.sqrt(2 * cfg.unrolled_depth)
    assert abs(model.begin[0].attn.wo.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.middle[1].mlp.down.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.begin[0].attn.wqkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.embed.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("kw,field", [
    (dict(depth=9), "depth"), (dict(n_streams=0), "n_streams"), (dict(n_heads=5), "n_heads"),
    (dict(n_begin=-1), "n_begin"), (dict(connection="loop_hc", hc_every=5), "hc_every"),
    (dict(h_res="diag"), "h_res"), (dict(connection="loop_hc", n_middle=0), "n_middle"),
    (dict(n_begin=0, n_middle=0, n_end=0), "n_begin"),
])
def test_invalid_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        micro(**kw)


def test_out_of_vocab_tokens_are_a_clear_error():
    from hyperloop_lm.utils import UserError

    model = LM(get_preset("micro-transformer"))
    with pytest.raises(UserError, match="token ids must lie in"):
        model.check_tokens(torch.tensor([[1, model.cfg.vocab_size]]))
