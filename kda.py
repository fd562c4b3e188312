"""Kimi Delta Attention (KDA): Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture"
(arXiv:2510.26692). Gated DeltaNet whose forgetting gate is a vector, one decay per key channel:

    S_t = S_{t-1} Diag(alpha_t) (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,      y_t = S_t q_t
    log alpha_t = g_t = -5 sigmoid(exp(A_log) (W_f2 W_f1 x_t + dt_bias))       (Dk values per head)

(the paper's S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T, transposed to the state
S [B, H, Dv, Dk] of every file here). Reading: first decay each key channel of the memory by its own alpha,
then take DeltaNet's gradient step of size beta_t on 1/2 ||S k_t - v_t||^2. With one alpha for all channels
this is Gated DeltaNet (gated_deltanet.py); with alpha = 1 it is DeltaNet.

Two forms of the same function:
    recurrent  the update above, one token at a time
    chunked    inside chunks of L tokens the UT transform of gated_deltanet.py with a decay per channel:
               with c_t = g_1 + ... + g_t from the chunk's start (a vector), write S_t = S_{t-1} Diag(alpha_t)
               + d_t k_t^T, d_t = beta_t (v_t - S_{t-1} Diag(alpha_t) k_t). Unrolled, S_{t-1} Diag(alpha_t) =
               S_0 Diag(e^{c_t}) + sum_{j<t} d_j (k_j * e^{c_t - c_j})^T, so with A_tj = sum_i k_ti k_ji
               e^{c_ti - c_ji} (j < t), P_tj the same with q_t (j <= t), T = (I + diag(beta) A)^-1 diag(beta),
               W = T (e^c * K), U = T V:  D = U - W S_0^T,  Y = (e^c * Q) S_0^T + P D,
               S_L = S_0 (Diag(e^{c_L}) - W^T K~) + U^T K~,   K~ = e^{c_L - c} * K.
               The last line is chunk n's map S -> S M_n + C_n (M_n dense Dk x Dk); maps compose as (M1, C1)
               then (M2, C2) = (M1 M2, C1 M2 + C2), and chunk_states gives every chunk's entering state by
               Hillis-Steele doubling in log2(T / L) rounds of batched matmuls: no loop over tokens or chunks.
No parallel form: A and P need e^{c_t - c_j} for every (t, j, channel), O(T^2 Dk) memory; factored as
e^{c_t} e^{-c_j} they overflow float32 after 17 tokens of the lowest decay. The chunked form with L = T is
that form, so L is capped.

Numerics: the gate is bounded, -5 <= g <= 0 (fla's lower_bound gate). c is summed inside one chunk only
(|c| <= 5 L), and A and P factor e^{c_t - c_j} around the chunk's middle m: (k_t e^{c_t - c_m}) . (k_j e^{c_m
- c_j}), each factor within e^{+-5 L/2} = e^{+-80} at L = 32, where float32 and bf16 reach e^{+-87} as normal
numbers. Every product kept (j <= t) is e^{c_t - c_j} <= 1; those above the diagonal (up to e^160, inf in
float32) are masked by where, never multiplied. So L <= 32. The chunk maps and the doubling run in the
state's dtype (float32 or better) with autocast off: no bf16 rounding compounds across chunks.

The layer is fla's KimiDeltaAttention (fla/layers/kda.py, fla 0.6.0) with safe_gate=True, lower_bound=-5:
q, k, v projections, each through a causal depthwise conv (kernel 4, no bias) and SiLU; q and k
L2-normalised per head (eps 1e-6), q scaled by Dk^-1/2; beta_t = sigmoid(W_b x_t) per head; the gate
through a low-rank f_proj (d_model -> Dv -> H Dk, no biases), A_log = 0 (fla's init with safe_gate), dt_bias
per channel = softplus^-1(dt), dt log-uniform in [1e-3, 0.1] (clamped at 1e-4); the output through a
per-head RMSNorm (eps 1e-5, weight shared by heads) times sigmoid(g_proj(x)) (fla's FusedRMSNormGated with
activation "sigmoid"; g_proj low-rank d_model -> Dv -> H Dv, the second with a bias), then o_proj. Values as
wide as keys (expand_v 1). Projections and conv keep PyTorch's default init, as fla's layer does (fla's model
classes re-draw them from a normal). Departures: fla's layer defaults to the unbounded gate -exp(A_log)
softplus(W_f x + dt_bias) with A_log = log U(1, 16), which no chunk size keeps within float32 when factored
(fla's kernels refer each pair of 16-token sub-chunks to the later one's start, where both factors are <= 1);
here the bounded gate that fla offers for its fast path, with its recommended bound. fla fixes 16 heads of
128 (keys d_model wide at its default width 2048); here heads of head_dim = min(128, d_model) channels,
d_model / head_dim of them, so small widths work (the tests build d_model 32 with heads of 8). Chunks of 32
tokens, not fla's 64 (the bound above). q, k, v come from one fused projection and one conv (the same
function and init as fla's three). State: (S [B, H, Dv, Dk] float32 or better, conv [B, 3, 3 d_model]: the
conv's left context).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOWER_BOUND = -5.0  # log alpha >= -5 (fla's recommended lower_bound): bounds the chunk's factors, see above


def l2norm(x, eps=1e-6):
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def kda_recurrent(q, k, v, beta, g, S):
    """q, k (unit norm), g (log alpha): [B, T, H, Dk], v: [B, T, H, Dv], beta: [B, T, H],
    S: [B, H, Dv, Dk] -> y [B, T, H, Dv], S. Accumulates in S's dtype."""
    q, k, v, beta, g = (x.to(S.dtype) for x in (q, k, v, beta, g))
    ys = []
    for t in range(q.shape[1]):
        k_t = k[:, t]
        S = S * g[:, t, :, None, :].exp()  # forget, channel by channel
        error = torch.einsum("bhed,bhd->bhe", S, k_t) - v[:, t]
        S = S - beta[:, t, :, None, None] * error[..., None] * k_t[..., None, :]  # delta rule
        ys.append(torch.einsum("bhed,bhd->bhe", S, q[:, t]))
    return torch.stack(ys, 1), S


def chunk_states(M, C, S):
    """Chunk maps S -> S M_c + C_c, M [B, T/L, H, Dk, Dk], C [B, T/L, H, Dv, Dk], from S [B, H, Dv, Dk]:
    -> the state entering each chunk [B, T/L, H, Dv, Dk] and the final state, by Hillis-Steele doubling
    (after the step with offset d, element c composes chunks c - 2d + 1 .. c)."""
    C = torch.cat([(S @ M[:, 0] + C[:, 0])[:, None], C[:, 1:]], 1)  # S folded into chunk 0
    d, N = 1, M.shape[1]
    while d < N:
        C = torch.cat([C[:, :d], C[:, :-d] @ M[:, d:] + C[:, d:]], 1)
        if 2 * d < N:  # the last step needs no M
            M = torch.cat([M[:, :d], M[:, :-d] @ M[:, d:]], 1)
        d *= 2
    return torch.cat([S[:, None], C[:, :-1]], 1), C[:, -1]


def kda_chunked(q, k, v, beta, g, S, chunk_size):
    """Same signature; the UT transform inside chunks of chunk_size (<= 32) tokens, chunk_states across.
    Needs LOWER_BOUND <= g <= 0, the bound on the factors (module docstring)."""
    T, L, Dk = q.shape[1], chunk_size, q.shape[-1]
    pad = -T % L  # padded tokens: g = 0 (alpha = 1), beta = 0 and zero vectors leave the state alone

    def chunks(x):  # [B, T, H, *] -> [B, T/L, H, L, *]
        x = F.pad(x.to(S.dtype), (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (-1, L)).transpose(2, 3)

    q, k, v, beta, g = map(chunks, (q, k, v, beta, g))
    c = g.cumsum(-2)  # log of alpha_1 ... alpha_t from the chunk's start, per channel
    mid = c[..., L // 2:L // 2 + 1, :]
    k_from_mid = k * (mid - c).exp()  # k_j e^{c_m - c_j}
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device)
    A = torch.where(causal.tril(-1), (k * (c - mid).exp()) @ k_from_mid.mT, 0).to(S.dtype)
    P = torch.where(causal.tril(), (q * (c - mid).exp()) @ k_from_mid.mT, 0)
    eye = torch.eye(L, dtype=S.dtype, device=S.device)
    rhs = beta[..., None] * torch.cat([k * c.exp(), v], -1)
    W, U = torch.linalg.solve_triangular(eye + beta[..., None] * A, rhs.to(S.dtype), upper=False,
                                         unitriangular=True).split([Dk, v.shape[-1]], -1)
    with torch.autocast(S.device.type, enabled=False):  # the maps and their products in the state's dtype
        k_to_end = k * (c[..., -1:, :] - c).exp()  # K~ = e^{c_L - c} * K
        M = torch.diag_embed(c[..., -1, :].exp()) - W.mT @ k_to_end
        S_in, S = chunk_states(M, U.mT @ k_to_end, S)
    D = U - W @ S_in.mT  # d_t from each chunk's entering state
    y = (q * c.exp()) @ S_in.mT + P @ D
    return y.transpose(2, 3).flatten(1, 2)[:, :T], S


class KDA(nn.Module):
    """Multi-head Kimi Delta Attention; forward(x [B, T, d_model], state) -> (y, (S, conv))."""

    forms = ("recurrent", "chunked")

    def __init__(self, d_model, head_dim=128, chunk_size=32, conv_size=4, eps=1e-5):
        super().__init__()
        D = min(head_dim, d_model)
        if d_model % D:
            raise ValueError(f"d_model={d_model} does not split into heads of head_dim={D}")
        if not 1 <= chunk_size <= 32:
            raise ValueError(f"chunk_size={chunk_size} must be in 1..32: e^(5 L/2) factors (see the docstring)")
        self.n_head, self.head_dim, self.chunk_size, self.eps = d_model // D, D, chunk_size, eps
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = nn.Conv1d(3 * d_model, 3 * d_model, conv_size, groups=3 * d_model, bias=False)
        self.f_proj = nn.Sequential(nn.Linear(d_model, D, bias=False), nn.Linear(D, d_model, bias=False))
        self.b_proj = nn.Linear(d_model, self.n_head, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.n_head))
        dt = torch.exp(torch.empty(d_model).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.g_proj = nn.Sequential(nn.Linear(d_model, D, bias=False), nn.Linear(D, d_model, bias=True))
        self.norm = nn.Parameter(torch.ones(D))  # RMSNorm weight, shared by heads
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, state=None, form="chunked"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; KDA has {self.forms}")
        B, T, d_model = x.shape
        H, D = self.n_head, self.head_dim
        acc = torch.promote_types(x.dtype, torch.float32)  # states and log gates in float32 or better
        if state is None:
            state = (x.new_zeros(B, H, D, D, dtype=acc), x.new_zeros(B, self.conv.kernel_size[0] - 1, 3 * d_model))
        S, conv = state
        ctx = torch.cat([conv, self.qkv(x).to(conv.dtype)], 1)  # the conv state is the left context
        q, k, v = (z.unflatten(-1, (H, D)) for z in F.silu(self.conv(ctx.mT).mT).chunk(3, -1))
        q, k = l2norm(q) * D ** -0.5, l2norm(k)
        beta = torch.sigmoid(self.b_proj(x))
        f = self.f_proj(x).to(acc).unflatten(-1, (H, D)) + self.dt_bias.view(H, D)
        g = LOWER_BOUND * torch.sigmoid(self.A_log.to(acc).exp()[:, None] * f)  # log alpha_t in [-5, 0]
        if form == "recurrent":
            y, S = kda_recurrent(q, k, v, beta, g, S)
        else:
            y, S = kda_chunked(q, k, v, beta, g, S, self.chunk_size)
        y = y.to(S.dtype)
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps) * self.norm
        y = y * torch.sigmoid(self.g_proj(x)).unflatten(-1, (H, D))
        return self.o_proj(y.flatten(2).to(x.dtype)), (S, ctx[:, ctx.shape[1] - conv.shape[1]:].clone())

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
