"""kda.py: the paper's recurrence by hand, decays at their ends, beta 0 and 1, ragged chunks, the chunk maps'
composition, the layer by hand, T = 16384 with gradients, fla's defaults and init.

    pytest tests_kda.py

(the reference is written from the paper, in its own layout S [Dk, Dv], with every transition an explicit
Dk x Dk matrix (I - beta_t k_t k_t^T) Diag(alpha_t); the layer rebuilt by hand from fla's definitions)
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kda
from kda import KDA
from test_equivalence import D_MODEL, assert_torch_default, assert_uniform, make, needs_cuda, rel_err

LOW = kda.LOWER_BOUND


def kda_paper(q, k, v, beta, alpha, S):
    """Kimi Linear's KDA as written: S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t, with S [B, H, Dk, Dv] (the paper's layout, the transpose of kda.py's), in float64."""
    q, k, v, beta, alpha, S = (x.double() for x in (q, k, v, beta, alpha, S))
    I = torch.eye(k.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(q.shape[1]):
        kt, bt = k[:, t, :, :, None], beta[:, t, :, None, None]
        transition = (I - bt * kt @ kt.mT) @ torch.diag_embed(alpha[:, t])
        S = transition @ S + bt * kt @ v[:, t, :, None, :]
        ys.append((S.mT @ q[:, t, :, :, None])[..., 0])
    return torch.stack(ys, 1), S


# log alpha per channel: ordinary; alpha = 1 exactly; alpha at its lowest, e^-5 (the gate's bound); channels and
# tokens jumping between the two ends
KDA_GATES = {
    "random": lambda shape, g: LOW * torch.rand(shape, generator=g),
    "one": lambda shape, g: torch.zeros(shape),
    "lowest": lambda shape, g: torch.full(shape, LOW),
    "jumpy": lambda shape, g: LOW * torch.randint(0, 2, shape, generator=g),
}


def kda_inputs(gate="random", B=2, T=37, H=3, Dk=8, Dv=5, dtype=torch.float64, seed=0, beta=None, same_key=False):
    """q, k unit norm per head, v, beta [B, T, H], log alpha g [B, T, H, Dk], S0 [B, H, Dv, Dk]."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, 1 if same_key else T, H, Dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    b = torch.rand(B, T, H, generator=gen, dtype=torch.float64) if beta is None else torch.full((B, T, H), beta)
    g = KDA_GATES[gate]((B, T, H, Dk), gen)
    S0 = torch.randn(B, H, Dv, Dk, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k.expand(B, T, H, Dk).contiguous(), v, b, g, S0)]


def kda_core(form, q, k, v, beta, g, S, L=8):
    if form == "recurrent":
        return kda.kda_recurrent(q, k, v, beta, g, S)
    return kda.kda_chunked(q, k, v, beta, g, S, L)


CORE_FORMS = [("recurrent", None), ("chunked", 8), ("chunked", 32)]  # 32: the cap, factors up to e^80


@pytest.mark.parametrize("gate", KDA_GATES)
@pytest.mark.parametrize("form,L", CORE_FORMS, ids=["recurrent", "chunked8", "chunked32"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_kda_core_against_paper(form, L, gate, dtype, tol):
    """Outputs, final state and gradients (q, k, v, beta, log alpha, S0) against the paper's recurrence in
    float64, 70 tokens (ragged chunks of 8 and of 32)."""
    inputs = [t.requires_grad_() for t in kda_inputs(gate, T=70, dtype=dtype)]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y, S = kda_core(form, *inputs, L=L)
    q, k, v, b, g, S0 = ref_inputs
    y_ref, S_ref = kda_paper(q, k, v, b, g.exp(), S0.mT)
    S_ref = S_ref.mT
    assert rel_err(y, y_ref) <= tol and rel_err(S, S_ref) <= tol
    gen = torch.Generator().manual_seed(2)
    gy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    gS = torch.randn(S_ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * gy).sum() + (S.double() * gS).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (S_ref * gS).sum(), ref_inputs)
    for name, a, r in zip(["q", "k", "v", "beta", "log alpha", "S0"], grads, grads_ref):
        assert rel_err(a, r) <= tol, f"grad {name}: {rel_err(a, r):.2e}"


def gated_delta_rule_by_hand(q, k, v, beta, alpha, S):
    """Gated DeltaNet, one scalar alpha per head: S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T."""
    I = torch.eye(k.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(q.shape[1]):
        kt, bt = k[:, t, :, :, None], beta[:, t, :, None, None]
        S = alpha[:, t, :, None, None] * S @ (I - bt * kt @ kt.mT) + bt * v[:, t, :, :, None] @ kt.mT
        ys.append((S @ q[:, t, :, :, None])[..., 0])
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("form", kda.KDA.forms)
def test_kda_one_decay_for_all_channels_is_gated_deltanet(form):
    """The same decay in every channel is Gated DeltaNet (alpha = 1: DeltaNet); and alpha = 0 (the recurrence
    alone: the chunked form needs log alpha >= -5) keeps only the current token's write, decayed before it."""
    q, k, v, b, g, S0 = kda_inputs()
    g = g[..., :1]  # one log alpha per head
    y, S = kda_core(form, q, k, v, b, g.expand_as(k), S0)
    y_ref, S_ref = gated_delta_rule_by_hand(q, k, v, b, g[..., 0].exp(), S0)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12
    if form == "recurrent":
        y, S = kda.kda_recurrent(q, k, v, b, torch.full_like(k, -math.inf), S0)
        assert rel_err(y, b[..., None] * (q * k).sum(-1, keepdim=True) * v) <= 1e-12  # y_t = beta_t (k_t . q_t) v_t
        assert rel_err(S, b[:, -1, :, None, None] * v[:, -1, :, :, None] * k[:, -1, :, None, :]) <= 1e-12


@pytest.mark.parametrize("form", kda.KDA.forms)
def test_kda_beta_zero_skips_and_beta_one_overwrites(form):
    q, k, v, b, g, S0 = kda_inputs(beta=0.0)  # only the decays act, each key channel its own
    y, S = kda_core(form, q, k, v, b, g, S0)
    c = g.cumsum(1)
    assert rel_err(S, S0 * c[:, -1, :, None, :].exp()) <= 1e-12
    assert rel_err(y, torch.einsum("bhed,bthd->bthe", S0, q * c.exp())) <= 1e-12
    q, k, v, b, g, S0 = kda_inputs(beta=1.0)  # every token overwrites its key's slot: S_t k_t = v_t
    y, S = kda_core(form, k, k, v, b, g, S0)  # read with q = k
    assert rel_err(y, v) <= 1e-10
    q, k, v, b, g, S0 = kda_inputs(beta=1.0, same_key=True)  # one key again and again
    y, S = kda_core(form, q, k, v, b, g, S0)
    assert rel_err(torch.einsum("bhed,bhd->bhe", S, k[:, -1]), v[:, -1]) <= 1e-10


@pytest.mark.parametrize("L", [1, 3, 8, 32])
def test_kda_chunked_every_length(L):
    """Ragged last chunks, T shorter than a chunk, one token per chunk: against the recurrence."""
    for T in (1, 2, 7, 8, 9, 23, 31, 32, 33, 70):
        q, k, v, b, g, S0 = kda_inputs("jumpy", T=T, seed=T)
        y, S = kda.kda_chunked(q, k, v, b, g, S0, L)
        y_ref, S_ref = kda.kda_recurrent(q, k, v, b, g, S0)
        assert rel_err(y, y_ref) <= 1e-10 and rel_err(S, S_ref) <= 1e-10, (T, L)


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 33])
def test_kda_chunk_states_composes_maps_in_order(N):
    """chunk_states alone, on maps that are not contractions (so any misplaced factor shows), [B, T/L, H, *]."""
    gen = torch.Generator().manual_seed(N)
    M = torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(2, N, 3, 4, 4, generator=gen, dtype=torch.float64)
    C = torch.randn(2, N, 3, 5, 4, generator=gen, dtype=torch.float64)
    S = S0 = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    entering = []
    for n in range(N):
        entering.append(S)
        S = S @ M[:, n] + C[:, n]
    ins, last = kda.chunk_states(M, C, S0)
    assert rel_err(ins, torch.stack(entering, 1)) <= 1e-12 and rel_err(last, S) <= 1e-12


def kda_layer_reference(model, x, state=None):
    """The layer rebuilt from its parameters as fla's KimiDeltaAttention defines it (safe_gate, lower_bound -5):
    the convs as explicit window sums, fla's l2norm and q scale, fla's lower-bound gate, FusedRMSNormGated with
    a sigmoid, the paper's recurrence."""
    B, T, d = x.shape
    H, D, W = model.n_head, model.head_dim, model.conv.weight[:, 0]  # [3 d, K]
    K = W.shape[1]
    S0, conv0 = state if state is not None else (x.new_zeros(B, H, D, D), x.new_zeros(B, K - 1, 3 * d))
    p = torch.cat([conv0, x @ model.qkv.weight.T], 1)
    c = torch.stack([sum(p[:, t + i] * W[:, i] for i in range(K)) for t in range(T)], 1)
    q, k, v = (z.unflatten(-1, (H, D)) for z in F.silu(c).split(d, -1))
    q, k = (z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6) for z in (q, k))
    q = q / math.sqrt(D)
    f = (x @ model.f_proj[0].weight.T @ model.f_proj[1].weight.T).unflatten(-1, (H, D))
    alpha = torch.exp(-5 * torch.sigmoid(model.A_log.exp()[:, None] * (f + model.dt_bias.view(H, D))))
    beta = torch.sigmoid(x @ model.b_proj.weight.T)
    y, S = kda_paper(q, k, v, beta, alpha, S0.mT)
    y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + 1e-5) * model.norm
    gate = x @ model.g_proj[0].weight.T @ model.g_proj[1].weight.T + model.g_proj[1].bias
    y = y * torch.sigmoid(gate).unflatten(-1, (H, D))
    return y.flatten(2) @ model.o_proj.weight.T, (S.mT, p[:, -(K - 1):])


@pytest.mark.parametrize("form", KDA.forms)
def test_kda_layer_against_reference(form):
    model = make("kda")
    with torch.no_grad():
        for p in (model.norm, model.A_log):
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
        _, state = model(torch.randn(2, 6, D_MODEL, dtype=torch.float64), form="recurrent")
        for st in (None, state):
            y, s = model(x, st, form=form)
            y_ref, s_ref = kda_layer_reference(model, x, st)
            assert rel_err(y, y_ref) <= 1e-10
            assert rel_err(s[1], s_ref[1]) == 0 and rel_err(s[0], s_ref[0]) <= 1e-10


# layer regimes: alpha = 1 in every channel (the gate's sigmoid at 0); alpha = e^-5, the lowest (sigmoid at 1);
# channels and tokens jumping between the two (f_proj x 100: most gates within 0.01 of an end, a quarter exactly)
KDA_LAYER_GATES = {"plain": {}, "one": dict(dt_bias=-1e4), "lowest": dict(dt_bias=1e4), "jumpy": dict(f_scale=100)}


def kda_layer(dtype=torch.float32, dt_bias=None, f_scale=None, **options):
    model = make("kda", dtype, **options)
    with torch.no_grad():
        if dt_bias is not None:
            model.dt_bias.fill_(dt_bias)
        if f_scale is not None:
            model.f_proj[1].weight.mul_(f_scale)
    return model


@pytest.mark.parametrize("regime", KDA_LAYER_GATES)
def test_kda_layer_extreme_gates_float32_chunked_matches_float64(regime):
    """The float32 chunked form at its largest chunk (32: factors up to e^80) against the float64 recurrence
    (of the same float32 weights and input), gates at 0 and 1: outputs, state and the gradients w.r.t. x and
    every parameter."""
    model = kda_layer(torch.float32, **KDA_LAYER_GATES[regime], chunk_size=32)
    x = torch.randn(2, 100, D_MODEL, generator=torch.Generator().manual_seed(4))
    results = []
    for dtype, form in ((torch.float64, "recurrent"), (torch.float32, "chunked")):
        m, xx = model.to(dtype), x.to(dtype).requires_grad_()
        y, (S, _) = m(xx, form=form)
        (y.double().sin().sum() + S.double().cos().sum()).backward()
        results.append([y, S, xx.grad] + [p.grad.clone() for p in m.parameters()])
        m.zero_grad()
    names = ["y", "S", "grad x"] + ["grad " + n for n, _ in model.named_parameters()]
    for name, ref, out in zip(names, *results):
        assert rel_err(out, ref) <= 1e-4, f"{regime} {name}: {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("regime", KDA_LAYER_GATES)
def test_kda_long_sequence_forward_backward_finite(regime):
    """T = 16384, float32, the default (chunked) form at its largest chunk, gates at 0 and 1 too."""
    model = kda_layer(**KDA_LAYER_GATES[regime], chunk_size=32)
    x = torch.randn(1, 16384, D_MODEL, requires_grad=True)
    y, (S, _) = model(x)
    (y.square().mean() + S.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@needs_cuda
@pytest.mark.parametrize("regime", KDA_LAYER_GATES)
def test_kda_long_sequence_finite_cuda_bf16(regime):
    model = kda_layer(**KDA_LAYER_GATES[regime], chunk_size=32).cuda()
    x = torch.randn(2, 16384, D_MODEL, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, (S, _) = model(x)
    (y.float().square().mean() + S.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_kda_defaults_and_init_as_fla():
    """fla's KimiDeltaAttention at its default width 2048: 16 heads of 128, values as wide as keys, convs of 4
    without bias, f_proj and g_proj of rank head_dim (only g_proj's second with a bias), norm eps 1e-5 and weight
    1; A_log = 0 (fla's with safe_gate), dt = softplus(dt_bias) log-uniform in [1e-3, 0.1] per channel;
    projections and convs as PyTorch's defaults (drawn at width 512). Chunks of 32 at most."""
    with torch.device("meta"):
        m = KDA(2048)
    assert (m.n_head, m.head_dim, m.chunk_size, m.eps) == (16, 128, 32, 1e-5)
    assert m.conv.kernel_size == (4,) and m.conv.bias is None and m.conv.in_channels == 3 * 2048
    assert [lin.weight.shape for lin in (*m.f_proj, *m.g_proj)] == [(128, 2048), (2048, 128)] * 2
    assert [n for n, p in m.named_parameters() if n.endswith("bias")] == ["dt_bias", "g_proj.1.bias"]
    assert m.A_log.shape == (16,) and m.norm.shape == (128,)
    d, r = 2048, 128
    # q, k, v, o; f_proj and g_proj; b_proj; convs; A_log; dt_bias; norm; g_proj's bias
    assert sum(p.numel() for p in m.parameters()) == 4 * d * d + 4 * d * r + d * 16 + 3 * d * 4 + 16 + d + r + d
    torch.manual_seed(0)
    m = KDA(512)
    assert m.n_head == 4 and m.A_log.abs().max() == 0 and (m.norm == 1).all()
    assert_uniform(F.softplus(m.dt_bias.detach().double()).log(), math.log(1e-3), math.log(0.1), "log dt")
    for name in ("qkv", "conv", "f_proj.0", "f_proj.1", "b_proj", "g_proj.0", "g_proj.1", "o_proj"):
        assert_torch_default(m.get_submodule(name), name)
    assert KDA(32).head_dim == 32 and KDA(384).n_head == 3
    for bad in (dict(d_model=48, head_dim=32), dict(d_model=64, chunk_size=33), dict(d_model=64, chunk_size=0)):
        with pytest.raises(ValueError):
            KDA(**bad)
