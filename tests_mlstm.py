"""mlstm.py: the paper's unstabilised mLSTM as the independent reference, extreme gates, ragged chunks, long
sequences, gradients across calls, init as xLSTM. The generic tests (forms against the recurrence, prefill then
steps, compiled against eager, ...) run on it from test_equivalence.py's MODELS."""
import math

import pytest
import torch
import torch.nn.functional as F

import mlstm
from mlstm import MLSTM
from test_equivalence import D_MODEL, TOL, assert_torch_default, make, rel_err, tensors

FORMS = MLSTM.forms


def core(form, q, k, v, log_i, g, state, L=8):
    if form == "recurrent":
        return mlstm.mlstm_recurrent(q, k, v, log_i, g, state)
    if form == "parallel":
        return mlstm.mlstm_parallel(q, k, v, log_i, g, state)
    return mlstm.mlstm_chunked(q, k, v, log_i, g, state, L)


def mlstm_unstabilised(q, k, v, log_i, g, C, n):
    """The paper's mLSTM as written (Beck et al. 2024, sec. 2.3), float64, no stabiliser: i_t = exp(i~_t),
    f_t = exp(g_t), C_t = f_t C_{t-1} + i_t v_t k_t^T, n_t = f_t n_{t-1} + i_t k_t, h_t = C_t q_t / max(|n_t q_t|, 1).
    C [B, H, Dv, Dk] and n [B, H, Dk] unstabilised."""
    q, k, v, i, f = (t.double() for t in (q, k, v, log_i.exp(), g.exp()))
    hs = []
    for t in range(q.shape[1]):
        C = f[:, t, :, None, None] * C + i[:, t, :, None, None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        n = f[:, t, :, None] * n + i[:, t, :, None] * k[:, t]
        den = (n * q[:, t]).sum(-1).abs().clamp_min(1.0)
        hs.append((C @ q[:, t, ..., None])[..., 0] / den[..., None])
    return torch.stack(hs, 1), C, n


# gate regimes (log_i, g from N(0, 1) draws a, b): moderate ones, where the unstabilised recurrence is exact in
# float64; and extreme ones: f = 1 exactly, f = exp(-1e4) = 0, i = e^100 (overflows float32), i = e^-100,
# i = e^1e4 (exp(-m) = 0: the padding's 0 / 0), f = 0 with i = e^-1e4 (m = -1e4: exp(-m) = inf), gates jumping
MODERATE = {
    "default": lambda a, b: (0.1 * a, F.logsigmoid(b + 4.5)),  # xLSTM's init: i~ ~ N(0, 0.1), f~ in [3, 6]
    "strong": lambda a, b: (3 * a, F.logsigmoid(2 * b)),
    "i_large": lambda a, b: (20 + a, F.logsigmoid(b + 2)),
    "i_small": lambda a, b: (-20 + a, F.logsigmoid(b - 2)),
}
EXTREME = {
    "f_one": lambda a, b: (a, torch.zeros_like(b)),
    "f_zero": lambda a, b: (a, torch.full_like(b, -1e4)),
    "i_huge": lambda a, b: (100 + a, F.logsigmoid(b + 3)),
    "i_tiny": lambda a, b: (-100 + a, F.logsigmoid(b + 3)),
    "i_overflow": lambda a, b: (1e4 + a, F.logsigmoid(b + 3)),
    "f_zero_i_tiny": lambda a, b: (-1e4 + a, torch.full_like(b, -1e4)),
    "jumpy": lambda a, b: (30 * a, F.logsigmoid(30 * b)),
}


def core_inputs(regime, dtype=torch.float64, B=2, T=21, H=2, Dk=8, Dv=6, seed=0, positive=False):
    """q, k, v, log_i, g and a random state (C~, n~, m) for a gate regime; positive: q and k >= 0."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = rand(B, T, H, Dk), rand(B, T, H, Dk) * Dk ** -0.5, rand(B, T, H, Dv)
    if positive:
        q, k = q.abs(), k.abs()
    log_i, g = {**MODERATE, **EXTREME}[regime](rand(B, T, H), rand(B, T, H))
    state = (rand(B, H, Dv, Dk), rand(B, H, Dk), rand(B, H))
    return [t.to(dtype) for t in (q, k, v, log_i, g)], tuple(t.to(dtype) for t in state)


@pytest.mark.parametrize("regime", MODERATE)
@pytest.mark.parametrize("form", FORMS)
def test_mlstm_core_matches_unstabilised_paper(form, regime):
    """The stabiliser cancels: every form's h equals the unstabilised recurrence's, its (C~, n~, m) the
    unstabilised (C, n) as C~ exp(m), n~ exp(m); and the gradients (q, k, v, i~, log f, C~0, n~0) agree."""
    inputs, state = core_inputs(regime)
    inputs = [t.requires_grad_() for t in inputs]
    state = tuple(t.requires_grad_() for t in state)
    h, (C, n, m) = core(form, *inputs, state)
    C0, n0, m0 = state
    h_ref, C_ref, n_ref = mlstm_unstabilised(*inputs, C0 * m0.exp()[..., None, None], n0 * m0.exp()[..., None])
    assert rel_err(h, h_ref) <= 1e-10
    assert rel_err(C * m.exp()[..., None, None], C_ref) <= 1e-10 and rel_err(n * m.exp()[..., None], n_ref) <= 1e-10
    gen = torch.Generator().manual_seed(1)
    gh, gC, gn = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (h_ref, C_ref, n_ref))
    leaves = inputs + [C0, n0]
    grads = torch.autograd.grad((h * gh).sum() + (C * m.exp()[..., None, None] * gC).sum()
                                + (n * m.exp()[..., None] * gn).sum(), leaves)
    grads_ref = torch.autograd.grad((h_ref * gh).sum() + (C_ref * gC).sum() + (n_ref * gn).sum(), leaves)
    for name, a, r in zip(["q", "k", "v", "log_i", "g", "C0", "n0"], grads, grads_ref):
        assert rel_err(a, r) <= 1e-9, f"grad {name}: {rel_err(a, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("regime", list(EXTREME) + ["default"])
@pytest.mark.parametrize("T", [1, 8, 21])
def test_mlstm_core_forms_match_recurrent_under_extreme_gates(regime, dtype, T):
    """Outputs, states and the gradients, from a random state, gates at 0 and 1 and beyond float32's exp: all
    finite, and equal to the recurrence's. m is compared relative to its size, C~ and n~ in the recurrence's frame,
    C~ exp(m - m_recurrent): at m ~ 1e4 float32 rounds m itself by ~1e-3, a choice of frame, not an error in the
    state. Gradients are measured against the scale of dL/dv: where one token outweighs the rest (h_t -> +-v_t),
    the gradients w.r.t. q, k and the gates are 0 up to rounding, and those w.r.t. the initial state ~e^-100.
    In float32, q and k are drawn nonnegative, so that n_t^T q_t sums positive terms: with signs it can be any
    small number, and float32 resolves h_t and its gradients only to ~1e-7 (sum of |terms|) / |n_t^T q_t| (the
    recurrence itself measured 3e-3 off the float64 one in dL/dq at 21 jumpy tokens: where one token dominates,
    dh_t/dq_t = 0 is two terms of ~1 / |k_t q_t| that cancel)."""
    inputs, state = core_inputs(regime, dtype, T=T, positive=dtype == torch.float32)
    leaves = [t.requires_grad_() for t in inputs + list(state[:2])]
    state = (leaves[5], leaves[6], state[2])
    with torch.no_grad():
        m_ref = core("recurrent", *inputs, state)[1][2]
    B, T, H, Dv = inputs[2].shape
    gen = torch.Generator().manual_seed(1)
    gh, gC, gn = (torch.randn(s, generator=gen, dtype=dtype) for s in ((B, T, H, Dv), state[0].shape, state[1].shape))
    names = ["h", "C", "n", "m", "q", "k", "v", "log_i", "g", "C0", "n0"]
    outs = {}
    for form in FORMS:
        h, (C, n, m) = core(form, *inputs, state)
        frame = (m - m_ref).exp()
        C, n = C * frame[..., None, None], n * frame[..., None]
        grads = torch.autograd.grad((h * gh).sum() + (C * gC).sum() + (n * gn).sum(), leaves)
        outs[form] = [h, C, n, m, *grads]
        for name, t in zip(names, outs[form]):
            assert torch.isfinite(t).all(), f"{form} {name} not finite"
    scale = outs["recurrent"][names.index("v")].norm().item()
    for form in ("parallel", "chunked"):
        for i, (name, o, r) in enumerate(zip(names, outs[form], outs["recurrent"])):
            err = rel_err(o, r) if i < 4 else (o - r).norm().item() / (max(r.norm().item(), scale) or 1.0)
            assert err <= TOL[dtype], f"{form} {name}: {err:.2e}"


def test_mlstm_m_is_the_max_recurrence():
    """i = e^100 overflows float32's exp, and f = 0 with i = e^-1e4 puts m near -1e4 (exp(-m) = inf): every form
    returns a finite h and the m of the paper's max recurrence m_t = max(log f_t + m_{t-1}, i~_t)."""
    for regime in ("i_huge", "f_zero_i_tiny"):
        inputs, state = core_inputs(regime, torch.float32)
        log_i, g, m = inputs[3], inputs[4], state[2]
        assert regime != "i_huge" or torch.isinf(log_i.exp()).any()
        for t in range(log_i.shape[1]):
            m = torch.maximum(g[:, t] + m, log_i[:, t])
        for form in FORMS:
            h, (_, _, m_form) = core(form, *inputs, state)
            assert torch.isfinite(h).all() and rel_err(m_form, m) <= 1e-6, (regime, form)


def layer_reference(model, x):
    """xLSTM's mLSTM layer (xlstm/blocks/mlstm/layer.py) token by token from the paper's unstabilised equations,
    float64 (x and the model), from the empty state; its own conv window, block-diagonal matrices and per-head
    LayerNorm."""
    P = dict(model.named_parameters())
    inner, H = P["skip"].shape[0], model.n_head
    Wq, Wk, Wv = (torch.block_diag(*P[w]) for w in ("wq", "wk", "wv"))
    B, K = x.shape[0], P["conv.weight"].shape[-1]
    window = torch.zeros(B, K, inner, dtype=torch.float64)
    C = torch.zeros(B, H, inner // H, inner // H, dtype=torch.float64)
    n = torch.zeros(B, H, inner // H, dtype=torch.float64)
    ys = []
    for t in range(x.shape[1]):
        x_m, z = (x[:, t] @ P["up.weight"].T).split(inner, -1)
        window = torch.cat([window[:, 1:], x_m[:, None]], 1)
        x_c = F.silu((window * P["conv.weight"][:, 0].T).sum(1) + P["conv.bias"])
        q, k, v = x_c @ Wq.T, x_c @ Wk.T, x_m @ Wv.T
        pre = torch.cat([q, k, v], -1) @ P["gates.weight"].T + P["gates.bias"]
        i, f = pre[:, :H].exp(), torch.sigmoid(pre[:, H:])
        q, k, v = (u.unflatten(-1, (H, -1)) for u in (q, k, v))
        k = k / math.sqrt(k.shape[-1])
        C = f[..., None, None] * C + i[..., None, None] * v[..., :, None] * k[..., None, :]
        n = f[..., None] * n + i[..., None] * k
        h = (C @ q[..., None])[..., 0] / (n * q).sum(-1).abs().clamp_min(1)[..., None]
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + model.eps)
        h = h.flatten(1) * (1 + P["norm"]) + P["skip"] * x_c
        ys.append((h * F.silu(z)) @ P["down.weight"].T)
    return torch.stack(ys, 1), C, n


@pytest.mark.parametrize("i_bias", [None, 15.0, -15.0])
@pytest.mark.parametrize("form", FORMS)
def test_mlstm_layer_matches_unstabilised_reference(form, i_bias):
    """The layer against xLSTM's layer rebuilt from the paper (unstabilised, float64): outputs, the state as
    C~ exp(m), and the gradients w.r.t. the input and every parameter."""
    model = make("mlstm")
    if i_bias is not None:
        with torch.no_grad():
            model.gates.bias[:model.n_head] += i_bias
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64, requires_grad=True)
    y, (C, n, m, _) = model(x, form=form)
    y_ref, C_ref, n_ref = layer_reference(model, x)
    assert rel_err(y, y_ref) <= 1e-10
    assert rel_err(C * m.exp()[..., None, None], C_ref) <= 1e-10 and rel_err(n * m.exp()[..., None], n_ref) <= 1e-10
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [x] + list(model.parameters())
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), leaves)
    for name, a, r in zip(["x"] + [p for p, _ in model.named_parameters()], grads, grads_ref):
        assert rel_err(a, r) <= 1e-9, f"grad {name}: {rel_err(a, r):.2e}"


@pytest.mark.parametrize("L,T", [(L, T) for L in (1, 3, 8) for T in range(1, 2 * L + 2)]
                         + [(64, T) for T in (1, 63, 64, 65)])
def test_mlstm_chunked_every_length(L, T):
    """Ragged last chunks: every length up to two chunks and one token, from a prefix's state; the output and
    every state tensor as the recurrence's."""
    model = make("mlstm", chunk_size=L)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, s0 = model(torch.randn(2, 5, D_MODEL, dtype=torch.float64))
        ref, s_ref = model(x, s0, form="recurrent")
        y, s = model(x, s0, form="chunked")
    assert rel_err(y, ref) <= 1e-12
    for i, (a, b) in enumerate(zip(s, s_ref, strict=True)):
        assert rel_err(a, b) <= 1e-12, f"state[{i}]"


def extreme(model, i_bias=None, f_bias=None):
    H = model.n_head
    with torch.no_grad():
        if i_bias is not None:
            model.gates.bias[:H] = i_bias
        if f_bias is not None:
            model.gates.bias[H:] = f_bias
    return model


# the layer's gate biases: f = 1 exactly or exp(-1e4) = 0, i = e^1e4 or e^-1e4
LAYER_EXTREMES = {"plain": {}, "f_one_i_huge": dict(f_bias=1e4, i_bias=1e4),
                  "f_zero_i_tiny": dict(f_bias=-1e4, i_bias=-1e4), "f_zero_i_huge": dict(f_bias=-1e4, i_bias=1e4),
                  "f_one_i_tiny": dict(f_bias=1e4, i_bias=-1e4)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("regime", LAYER_EXTREMES)
def test_mlstm_prefill_then_steps_under_extreme_gates(form, regime):
    """A prefill in each form, then step() token by token: every output and the final (C~, n~, m, conv) as one
    recurrent pass; the state continues exactly."""
    model = extreme(make("mlstm"), **LAYER_EXTREMES[regime])
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y_ref, s_ref = model(x, form="recurrent")
        y, state = model(x[:, :13], form=form)
        ys = [y]
        for t in range(13, 23):
            y_t, state = model.step(x[:, t], state)
            ys.append(y_t[:, None])
    assert rel_err(torch.cat(ys, 1), y_ref) <= 1e-10
    for i, (a, b) in enumerate(zip(state, s_ref, strict=True)):
        assert rel_err(a, b) <= 1e-10, f"state[{i}]: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("form", FORMS)
def test_mlstm_gradients_across_calls_equal_one_pass(form):
    """No gradient flows through m, in the call that makes a state and in the one that continues from it: the
    gradients of two calls joined by the state equal those of one call over the whole sequence."""
    model = make("mlstm", chunk_size=4)
    x = torch.randn(2, 17, D_MODEL, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 17, D_MODEL, dtype=torch.float64)
    leaves = [x] + list(model.parameters())
    one = torch.autograd.grad((model(x, form=form)[0] * gy).sum(), leaves)
    y1, state = model(x[:, :9], form=form)
    y2, _ = model(x[:, 9:], state, form=form)
    two = torch.autograd.grad((torch.cat([y1, y2], 1) * gy).sum(), leaves)
    for name, a, b in zip(["x"] + [p for p, _ in model.named_parameters()], two, one):
        assert rel_err(a, b) <= 1e-10, f"grad {name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("regime", LAYER_EXTREMES)
def test_mlstm_16384_forward_and_backward_finite(regime):
    """T = 16384 in float32 through the default (chunked) form, gates at 0 and 1, i = e^+-1e4: the output, the
    state and every gradient finite."""
    torch.manual_seed(0)
    model = extreme(MLSTM(D_MODEL), **LAYER_EXTREMES[regime])
    x = torch.randn(1, 16384, D_MODEL, requires_grad=True)
    y, state = model(x)
    (y.square().mean() + state[0].square().mean() + state[1].square().mean()).backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in tensors(state))
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())


def assert_normal(w, std, what):
    """The entries of w are draws from N(0, std^2): the Kolmogorov-Smirnov distance of their empirical CDF from
    the normal CDF below 1.95 / sqrt(n), its 0.1% critical value."""
    x = w.detach().double().flatten().sort().values
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf(x / (std * math.sqrt(2))))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks <= 1.95 / math.sqrt(n), f"{what}: KS distance {ks:.3f} from N(0, {std:.4g}^2), n = {n}"


def test_mlstm_init_as_xlstm():
    """xLSTM's mLSTMLayer.reset_parameters and mLSTMCell.reset_parameters: small init N(0, 2 / (5 d_model)) on the
    up-projection and q, k, v; wang init N(0, (2 / sqrt(d_model))^2) (one block) on the down-projection; the conv
    PyTorch's default; gate weights 0, input-gate biases N(0, 0.1^2), forget-gate biases linspace(3, 6); skip 1,
    the norm's weight 1 + 0; the inner width 2 d_model and 4 heads. The gate biases' draws from a layer of 256
    heads."""
    torch.manual_seed(0)
    d = 256
    model = MLSTM(d)
    small = math.sqrt(2 / (5 * d))
    for name in ("up.weight", "wq", "wk", "wv"):
        assert_normal(model.get_parameter(name), small, name)
    assert_normal(model.down.weight, 2 / math.sqrt(d), "down.weight")
    assert_torch_default(model.conv, "conv")
    H = model.n_head
    assert H == 4 and model.skip.shape == (2 * d,) and model.wq.shape == (2 * d // 4, 4, 4)
    assert model.gates.weight.abs().max() == 0
    assert torch.equal(model.gates.bias[H:], torch.linspace(3.0, 6.0, H))
    many = MLSTM(d, n_head=256).gates.bias
    assert_normal(many[:256], 0.1, "input-gate bias")
    assert torch.equal(many[256:], torch.linspace(3.0, 6.0, 256))
    assert torch.equal(model.skip, torch.ones(2 * d)) and model.norm.abs().max() == 0
    assert model.up.bias is None and model.down.bias is None and model.conv.bias is not None


@pytest.mark.parametrize("d_model,n_head", [(31, 4), (32, 3)])
def test_mlstm_bad_widths_are_errors(d_model, n_head):
    with pytest.raises(ValueError, match="d_model"):
        MLSTM(d_model, n_head=n_head)


def test_mlstm_conv_free_variant_forms_agree():
    """--mixer-args conv_size=1 (no mixing in time before q and k): every form and a loop of step() agree."""
    model = make("mlstm", conv_size=1)
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    state, ys = None, []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            ys.append(y)
        for form in FORMS:
            assert rel_err(model(x, form=form)[0], torch.stack(ys, 1)) <= 1e-10, form
