"""Gated DeltaNet: Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta
Rule" (ICLR 2025, arXiv:2412.06464). DeltaNet's delta rule with Mamba2's forgetting gate:

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,      y_t = S_t q_t
    alpha_t = exp(-softplus(w_a x_t + dt_bias) exp(A_log))                 (one scalar per head)

Reading: decay the whole state by alpha_t (Mamba2's gate: clear memory fast), then take DeltaNet's
gradient step of size beta_t on 1/2 ||S k_t - v_t||^2 (rewrite one key's slot). alpha = 1 is
DeltaNet; alpha = 0 forgets everything but the current token. Only g_t = log alpha_t <= 0 is ever
computed; the decay between two tokens is the exp of a sum of g's, never above 1, and the matrix
of them is decay_mask(g): segment sums masked to -inf above the diagonal before the exp.

Around it: q, k, v projections, each through a causal depthwise conv (kernel 4, no bias) and SiLU
(causal_conv.py); q and k L2-normalised per head (eps 1e-6), q scaled by Dk^-1/2; beta_t = sigmoid(W_b x_t)
per head; A_log = log U(0, 16), dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1] (Mamba2's); the
output through a per-head RMSNorm (eps 1e-5, weight shared by heads) times silu(W_g x), then the
output projection. Six heads, keys 0.75 d_model wide in all, values twice the keys (1.5 d_model):
about 6 d_model^2 parameters. Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv], beta, g [B, T, H].
State: (S [B, H, Dv, Dk] float32 or better, conv [B, 3, 2 key + value]: the conv's left context).

Three forms of the same function:
    recurrent  the update above, one token at a time
    parallel   the whole sequence at once: the UT transform with the decay folded in (below),
               one unit lower-triangular T x T solve per head; O(T^2) memory
    chunked    the same inside chunks of L tokens (c restarted at each chunk), and across them
               chunk_states, a log-depth scan of the chunks' affine maps, as deltanet.py

UT transform with decay: with c_t = g_1 + ... + g_t, write S_t = alpha_t S_{t-1} + d_t k_t^T, where
d_t = beta_t (v_t - alpha_t S_{t-1} k_t). Unrolled, S_t = e^{c_t} S_0 + sum_{j<=t} e^{c_t - c_j} d_j k_j^T,
so with Gamma = decay_mask(g), e^{c_t - c_j} for t >= j (else 0), and
A = I + diag(beta) (K K^T * tril(Gamma, -1)), W = A^-1 diag(beta) (e^c K), U = A^-1 diag(beta) V:
    D = U - W S_0^T,   Y = (e^c Q) S_0^T + (Q K^T * Gamma) D,
    S_L = e^{c_L} S_0 + D^T (e^{c_L - c} K) = S_0 (e^{c_L} I - W^T K~) + U^T K~,   K~ = e^{c_L - c} K.
The last line is chunk c's affine map S -> S M_c + C_c, and the maps compose associatively:
(M1, C1) then (M2, C2) = (M1 M2, C1 M2 + C2). A Hillis-Steele scan over the T/L chunks passes every
chunk state in log2(T/L) rounds of batched Dk x Dk matmuls, accumulated in float32 or better.

Origin: the layer is fla's GatedDeltaNet (fla/layers/gated_deltanet.py) with its defaults; the RMSNorm
times the gate is fla's FusedRMSNormGated. Projections and conv keep PyTorch's default init, as
fla's layer does (fla's model classes re-draw them from a normal). The official layer
(NVlabs/GatedDeltaNet, lit_gpt/gated_delta_net.py) is the same, but for a bias on its beta
projection and a head count set per config. Departures: fla fixes head_dim (256 at d_model 2048);
here head_dim = 0.75 d_model / n_head, so that small widths work (with 6 heads, any multiple of 8;
the tests build d_model 32 with 2 heads); q, k, v come from one fused projection (the same function
and init as fla's three).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from causal_conv import causal_conv_silu, last_inputs


def l2norm(x, eps=1e-6):
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def decay_mask(g):
    """g: per-step log decays [..., L] -> [..., L, L]: exp(g_{s+1} + ... + g_t) for t >= s, 0 above the
    diagonal. Segment sums of masked copies, not differences of cumsums (no cancellation when the
    sums are large), masked to -inf before the exp."""
    L = g.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=g.device).tril()
    sums = g[..., :, None].expand(*g.shape, L).masked_fill(~causal.tril(-1), 0).cumsum(-2)  # g_{s+1} + .. + g_t
    return sums.masked_fill(~causal, float("-inf")).exp()


def gated_delta_rule_recurrent(q, k, v, beta, g, S):
    """q, k: [B, T, H, Dk] (unit norm), v: [B, T, H, Dv], beta, g (log alpha): [B, T, H],
    S: [B, H, Dv, Dk] -> y [B, T, H, Dv], S. Accumulates in S's dtype."""
    q, k, v, beta, g = (x.to(S.dtype) for x in (q, k, v, beta, g))
    ys = []
    for t in range(q.shape[1]):
        k_t = k[:, t]
        S = g[:, t, :, None, None].exp() * S  # forget
        error = torch.einsum("bhed,bhd->bhe", S, k_t) - v[:, t]
        S = S - beta[:, t, :, None, None] * error[..., None] * k_t[..., None, :]  # delta rule
        ys.append(torch.einsum("bhed,bhd->bhe", S, q[:, t]))
    return torch.stack(ys, 1), S


def gated_ut_transform(k, v, beta, c, decay):
    """k: [..., L, Dk], v: [..., L, Dv], beta, c (cumulative log alpha from the block's start): [..., L],
    decay = decay_mask(g) [..., L, L] -> W = A^-1 diag(beta) (e^c K), U = A^-1 diag(beta) V, by one unit
    lower-triangular solve (float32 or better)."""
    A = torch.eye(k.shape[-2], dtype=c.dtype, device=c.device) + beta[..., None] * (k @ k.mT) * decay.tril(-1)
    rhs = beta[..., None] * torch.cat([k * c.exp()[..., None], v], -1)
    WU = torch.linalg.solve_triangular(A, rhs.to(c.dtype), upper=False, unitriangular=True)
    return WU.split([k.shape[-1], v.shape[-1]], -1)


def gated_delta_rule_parallel(q, k, v, beta, g, S):
    """Same signature; the whole sequence as one decayed UT transform and one masked matmul."""
    q, k, v, beta, g = (x.to(S.dtype).transpose(1, 2) for x in (q, k, v, beta, g))  # [B, H, T, *]
    c, decay = g.cumsum(-1), decay_mask(g)
    W, U = gated_ut_transform(k, v, beta, c, decay)
    D = U - W @ S.mT
    y = (q * c.exp()[..., None]) @ S.mT + ((q @ k.mT) * decay) @ D
    k_end = k * (c[..., -1:] - c).exp()[..., None]  # each key decayed to the end
    return y.transpose(1, 2), c[..., -1, None, None].exp() * S + D.mT @ k_end


def chunk(x, L):
    """[B, T, H, *] -> [B, T/L, H, L, *], T padded with zeros to a multiple of L."""
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, -x.shape[1] % L))
    return x.unflatten(1, (-1, L)).transpose(2, 3)


def chunk_states(M, C, S):
    """Chunk maps S -> S M_c + C_c, M [B, T/L, H, Dk, Dk], C [B, T/L, H, Dv, Dk], from S [B, H, Dv, Dk]
    -> the state entering each chunk [B, T/L, H, Dv, Dk] and the final state, by Hillis-Steele doubling,
    out of place (autograd records log2(T/L) batched matmuls, not T/L small steps)."""
    C = torch.cat([S[:, None] @ M[:, :1] + C[:, :1], C[:, 1:]], 1)  # C_0 := the state after chunk 0
    n, d = M.shape[1], 1
    while d < n:  # now C_c = the state after chunk c if c < d, else the map of chunks c-d+1 .. c applied to 0
        C = torch.cat([C[:, :d], C[:, :-d] @ M[:, d:] + C[:, d:]], 1)  # (M1, C1) then (M2, C2) = (M1 M2, C1 M2 + C2)
        M = torch.cat([M[:, :d], M[:, :-d] @ M[:, d:]], 1) if 2 * d < n else M  # the last round needs no M
        d *= 2
    return torch.cat([S[:, None], C[:, :-1]], 1), C[:, -1]


def gated_delta_rule_chunked(q, k, v, beta, g, S, chunk_size):
    """Same signature; the decayed UT transform inside chunks of chunk_size tokens, chunk_states across."""
    T = q.shape[1]
    # [B, T/L, H, L, *]; padded tokens: k = 0, beta = 0 and g = 0 (alpha = 1) leave the state alone
    q, k, v, beta, g = (chunk(x.to(S.dtype), chunk_size) for x in (q, k, v, beta, g))
    c, decay = g.cumsum(-1), decay_mask(g)  # c from each chunk's start
    W, U = gated_ut_transform(k, v, beta, c, decay)
    k_end = k * (c[..., -1:] - c).exp()[..., None]
    with torch.autocast(S.device.type, enabled=False):  # the maps and their products in the state's dtype
        eye = torch.eye(k.shape[-1], dtype=S.dtype, device=S.device)
        M = c[..., -1, None, None].exp() * eye - W.mT @ k_end
        S_in, S = chunk_states(M, U.mT @ k_end, S)
    D = U - W @ S_in.mT  # d_t from each chunk's entering state
    y = (q * c.exp()[..., None]) @ S_in.mT + ((q @ k.mT) * decay) @ D
    return y.transpose(2, 3).flatten(1, 2)[:, :T], S


class GatedDeltaNet(nn.Module):
    """Multi-head Gated DeltaNet layer; forward(x [B, T, d_model], state) -> (y, (S, conv))."""

    forms = ("recurrent", "parallel", "chunked")

    def __init__(self, d_model, n_head=6, expand_v=2, chunk_size=64, conv_size=4, eps=1e-5):
        super().__init__()
        d_k = 3 * d_model / (4 * n_head)  # keys 0.75 d_model wide in all, as fla's num_heads * head_dim
        if d_k < 1 or d_k % 1 or expand_v * d_k % 1:
            raise ValueError(f"d_model={d_model}: 0.75 d_model must split into n_head={n_head} heads, "
                             f"and expand_v={expand_v} times a head must be a whole number")
        self.n_head, self.chunk_size, self.eps = n_head, chunk_size, eps
        self.key, self.value = n_head * int(d_k), n_head * int(expand_v * d_k)
        self.qkv = nn.Linear(d_model, 2 * self.key + self.value, bias=False)
        C = self.qkv.out_features
        self.conv = nn.Conv1d(C, C, conv_size, groups=C, bias=False)
        self.a = nn.Linear(d_model, n_head, bias=False)  # w_a of alpha_t
        self.beta = nn.Linear(d_model, n_head, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_head).uniform_(0, 16).log())
        dt = torch.exp(torch.empty(n_head).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.norm = nn.Parameter(torch.ones(self.value // n_head))  # RMSNorm weight, shared by heads
        self.gate = nn.Linear(d_model, self.value, bias=False)
        self.out = nn.Linear(self.value, d_model, bias=False)

    def forward(self, x, state=None, form="chunked"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; GatedDeltaNet has {self.forms}")
        B, T, _ = x.shape
        H = self.n_head
        acc = torch.promote_types(x.dtype, torch.float32)  # states and log gates in float32 or better
        if state is None:
            S = x.new_zeros(B, H, self.value // H, self.key // H, dtype=acc)
            state = (S, x.new_zeros(B, self.conv.kernel_size[0] - 1, self.conv.in_channels))
        S, conv = state
        qkv = self.qkv(x)
        conv, qkv = last_inputs(conv, qkv), causal_conv_silu(qkv, self.conv.weight[:, 0], None, conv)
        q, k, v = (z.unflatten(-1, (H, -1)) for z in qkv.split([self.key, self.key, self.value], -1))
        q, k = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)
        beta = torch.sigmoid(self.beta(x))
        g = -self.A_log.to(acc).exp() * F.softplus(self.a(x).to(acc) + self.dt_bias)  # log alpha_t <= 0
        if form == "recurrent":
            y, S = gated_delta_rule_recurrent(q, k, v, beta, g, S)
        elif form == "parallel":
            y, S = gated_delta_rule_parallel(q, k, v, beta, g, S)
        else:
            y, S = gated_delta_rule_chunked(q, k, v, beta, g, S, self.chunk_size)
        y = y.to(S.dtype)
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps) * self.norm
        y = y * F.silu(self.gate(x)).unflatten(-1, (H, -1))
        return self.out(y.flatten(2).to(x.dtype)), (S, conv)

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
