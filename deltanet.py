"""DeltaNet: Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight Programmers"
(arXiv:2102.11174); parallel training form from Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length" (arXiv:2406.06484).

Linear attention only ever adds v k^T to its state. The delta rule first reads what the state
already stores under the key, S k, and writes back a beta-weighted correction towards v:

    S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,      y_t = S_t q_t

Reading: the update is one gradient step on 1/2 ||S k_t - v_t||^2 with step size beta_t.
With ||k_t|| = 1 and beta_t in (0, 1) the transition I - beta_t k_t k_t^T has eigenvalues in
[0, 1], so the state never grows (beta = 1 overwrites the slot of k_t, beta = 0 skips the token).

Around it: q, k, v projections, each through a causal depthwise conv (kernel 4, no bias) and
SiLU (causal_conv.py); q and k L2-normalised per head, q then scaled by Dk^-1/2, so y_t = S_t q_t / sqrt(Dk);
beta_t = sigmoid(W_beta x_t) per head; a per-head RMSNorm on the output (weight shared across
heads; use_gate=True multiplies by silu(W_g x), off by default) and an output projection.
Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv], beta [B, T, H]. State: (S [B, H, Dv, Dk] float32 or
better, conv [B, 3, 3 d_model]: the last 3 projected q|k|v inputs, the left context of the next
call's conv).

Three forms of the same function:
    recurrent  the update above, one token at a time
    parallel   the whole sequence at once through the UT transform (below): one unit
               lower-triangular T x T solve per head, no loop over tokens; O(T^2) memory
    chunked    the same inside chunks of L tokens, and across them chunk_states, a log-depth scan
               of the chunks' affine maps (below), not scan.py: a chunk's transition is a dense matrix.

UT transform: write S_t = S_{t-1} + d_t k_t^T with d_t = beta_t (v_t - S_{t-1} k_t). Unrolling
S_{t-1} = S_0 + sum_{j<t} d_j k_j^T gives the lower-triangular system
    A D = diag(beta) (V - K S_0^T),   A = I + tril(diag(beta) K K^T, -1),
so with W = A^-1 diag(beta) K, U = A^-1 diag(beta) V:
    D = U - W S_0^T,   Y = Q S_0^T + tril(Q K^T) D,   S_T = S_0 + D^T K.

Across chunks: by the last line, chunk c maps the state entering it by S -> S M_c + C_c, with
M_c = I - W_c^T K_c [Dk, Dk] (the product of its tokens' I - beta_t k_t k_t^T) and C_c = U_c^T K_c
[Dv, Dk]. Affine maps compose associatively, (M1, C1) then (M2, C2) = (M1 M2, C1 M2 + C2), so a
Hillis-Steele scan gives every chunk's entering state in log2(T/L) rounds of batched matmuls,
O((T/L) log(T/L) Dk^3) flops in a few dozen large kernels, where a loop over the chunks is T/L
dependent rounds of small ones (on an H100 the loop was 19x slower than fla's fused kernels).
For beta in [0, 1] and unit keys each M_c is a contraction, so their products stay bounded; the
scan accumulates in the state's dtype (float32 or better) even under autocast, while the
intra-chunk matmuls follow autocast.

Origin: the layer is fla's DeltaNet layer (fla/layers/delta_net.py) with its defaults; the scale
on q is fla's (its kernels multiply q by `scale`); the optional gate is fla's FusedRMSNormGated,
off by default as in fla.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from causal_conv import causal_conv_silu, last_inputs


def l2norm(x, eps=1e-6):
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def delta_rule_recurrent(q, k, v, beta, S):
    """q, k: [B, T, H, Dk] (unit norm), v: [B, T, H, Dv], beta: [B, T, H], S: [B, H, Dv, Dk]
    -> y [B, T, H, Dv], S. Accumulates in S's dtype."""
    q, k, v, beta = (x.to(S.dtype) for x in (q, k, v, beta))
    ys = []
    for t in range(q.shape[1]):
        k_t = k[:, t]
        error = torch.einsum("bhed,bhd->bhe", S, k_t) - v[:, t]  # S k - v: the gradient's factor
        S = S - beta[:, t, :, None, None] * error[..., None] * k_t[..., None, :]
        ys.append(torch.einsum("bhed,bhd->bhe", S, q[:, t]))
    return torch.stack(ys, 1), S


def ut_transform(k, v, beta):
    """k: [..., L, Dk], v: [..., L, Dv], beta: [..., L] -> W = A^-1 diag(beta) K, U = A^-1 diag(beta) V,
    by one unit lower-triangular solve (float32 or better: the solve has no bf16 kernel)."""
    L = k.shape[-2]
    beta = beta[..., None]
    eye = torch.eye(L, dtype=k.dtype, device=k.device)
    A = eye + (beta * (k @ k.transpose(-1, -2))).tril(-1).to(k.dtype)
    rhs = beta * torch.cat([k, v], -1)
    WU = torch.linalg.solve_triangular(A, rhs.to(k.dtype), upper=False, unitriangular=True)
    return WU.split([k.shape[-1], v.shape[-1]], -1)


def delta_rule_parallel(q, k, v, beta, S):
    """Same signature; the whole sequence as one UT transform and one masked matmul."""
    q, k, v, beta = (x.to(S.dtype).transpose(1, 2) for x in (q, k, v, beta))  # [B, H, T, *]
    W, U = ut_transform(k, v, beta)
    D = U - W @ S.transpose(-1, -2)  # d_t = u_t - S_0 w_t
    y = q @ S.transpose(-1, -2) + (q @ k.transpose(-1, -2)).tril() @ D
    return y.transpose(1, 2), S + D.transpose(-1, -2) @ k


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


def delta_rule_chunked(q, k, v, beta, S, chunk_size):
    """Same signature; the UT transform inside chunks of chunk_size tokens, chunk_states across them."""
    T = q.shape[1]
    # [B, T/L, H, L, *]; padded tokens: k = 0 and beta = 0 leave the state alone
    q, k, v, beta = (chunk(x.to(S.dtype), chunk_size) for x in (q, k, v, beta))
    W, U = ut_transform(k, v, beta)
    with torch.autocast(S.device.type, enabled=False):  # the maps and their products in the state's dtype
        M = torch.eye(k.shape[-1], dtype=S.dtype, device=S.device) - W.mT @ k
        S_in, S = chunk_states(M, U.mT @ k, S)
    D = U - W @ S_in.mT  # d_t from each chunk's entering state
    y = q @ S_in.mT + (q @ k.mT).tril() @ D
    return y.transpose(2, 3).flatten(1, 2)[:, :T], S


class DeltaNet(nn.Module):
    """Multi-head DeltaNet layer; forward(x [B, T, d_model], state) -> (y, (S, conv))."""

    forms = ("recurrent", "parallel", "chunked")

    def __init__(self, d_model, n_head=4, chunk_size=64, conv_size=4, use_gate=False, eps=1e-5):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head, self.chunk_size, self.eps = n_head, chunk_size, eps
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = nn.Conv1d(3 * d_model, 3 * d_model, conv_size, groups=3 * d_model, bias=False)
        self.beta = nn.Linear(d_model, n_head, bias=False)
        self.norm = nn.Parameter(torch.ones(d_model // n_head))  # RMSNorm weight, shared by heads
        self.gate = nn.Linear(d_model, d_model, bias=False) if use_gate else None
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, state=None, form="chunked"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; DeltaNet has {self.forms}")
        B, T, d_model = x.shape
        H = self.n_head
        if state is None:
            acc = torch.promote_types(x.dtype, torch.float32)  # the state accumulates in float32 or better
            Dk = Dv = d_model // H
            conv = x.new_zeros(B, self.conv.kernel_size[0] - 1, self.conv.in_channels)
            state = (x.new_zeros(B, H, Dv, Dk, dtype=acc), conv)
        S, conv = state
        qkv = self.qkv(x)
        conv, qkv = last_inputs(conv, qkv), causal_conv_silu(qkv, self.conv.weight[:, 0], None, conv)
        q, k, v = qkv.unflatten(-1, (3, H, -1)).unbind(2)
        q, k = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)  # fla's scale on q
        beta = torch.sigmoid(self.beta(x))
        if form == "recurrent":
            y, S = delta_rule_recurrent(q, k, v, beta, S)
        elif form == "parallel":
            y, S = delta_rule_parallel(q, k, v, beta, S)
        else:
            y, S = delta_rule_chunked(q, k, v, beta, S, self.chunk_size)
        y = y.to(S.dtype)
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps) * self.norm
        if self.gate is not None:
            y = y * F.silu(self.gate(x)).unflatten(-1, (H, -1))
        return self.out(y.flatten(2).to(x.dtype)), (S, conv)

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
