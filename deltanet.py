"""DeltaNet: Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight Programmers"
(arXiv:2102.11174); parallel training form from Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length" (arXiv:2406.06484).

Linear attention only ever adds v k^T to its state. The delta rule first reads what the state
already stores under the key, S k, and writes back a beta-weighted correction towards v:

    S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,      y_t = S_t q_t

Reading: the update is one gradient step on 1/2 ||S k_t - v_t||^2 with step size beta_t.
With ||k_t|| = 1 and beta_t in (0, 1) the transition I - beta_t k_t k_t^T has eigenvalues in
[0, 1], so the state never grows (beta = 1 overwrites the slot of k_t, beta = 0 skips the token).

The layer is fla's DeltaNet layer (fla/layers/delta_net.py) with its defaults: q, k, v
projections, each through a causal depthwise conv (kernel 4, no bias) and SiLU; q and k
L2-normalised per head; beta_t = sigmoid(W_beta x_t) per head; a per-head RMSNorm on the
output (weight shared across heads; use_gate=True multiplies by silu(W_g x) as fla's
FusedRMSNormGated, off by default as in fla) and an output projection. As in fla, q is scaled
by d_k^-1/2 after its L2 norm (fla's kernels multiply q by `scale`), so y_t = S_t q_t / sqrt(d_k).
State: (S [B, H, Dv, Dk] float32 or better, conv [B, 3, 3 d_model]: the last 3 projected
q|k|v inputs, the left context of the next call's conv).

Three forms of the same function:
    recurrent  the update above, one token at a time
    parallel   the whole sequence at once through the UT transform (below): one unit
               lower-triangular T x T solve per head, no loop over tokens; O(T^2) memory
    chunked    the same inside chunks of L tokens, and across them a log-depth scan of the
               chunks' affine maps (below), not scan.py: a chunk's transition is a dense matrix.

UT transform: write S_t = S_{t-1} + d_t k_t^T with d_t = beta_t (v_t - S_{t-1} k_t). Unrolling
S_{t-1} = S_0 + sum_{j<t} d_j k_j^T gives the lower-triangular system
    (I + tril(diag(beta) K K^T, -1)) D = diag(beta) (V - K S_0^T),
so with T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta), W = T K, U = T V:
    D = U - W S_0^T,   Y = Q S_0^T + tril(Q K^T) D,   S_T = S_0 + D^T K.

Across chunks: by the last line, chunk n maps the state entering it by S -> S M_n + C_n, with
M_n = I - W_n^T K_n [Dk, Dk] (the product of its tokens' I - beta_t k_t k_t^T) and C_n = U_n^T K_n
[Dv, Dk]. Affine maps compose associatively, (M1, C1) then (M2, C2) = (M1 M2, C1 M2 + C2), so a
Hillis-Steele scan gives every chunk's entering state in log2(T/L) rounds of batched matmuls,
O((T/L) log(T/L) Dk^3) flops in a few dozen large kernels, where a loop over the chunks is T/L
dependent rounds of small ones (on an H100 the loop was 19x slower than fla's fused kernels).
For beta in [0, 1] and unit keys each M_n is a contraction, so their products stay bounded; the
scan accumulates in the state's dtype (float32 or better) even under autocast, while the
intra-chunk matmuls follow autocast.

"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
    """k: [..., L, Dk], v: [..., L, Dv], beta: [..., L] -> W = T K, U = T V, by one unit
    lower-triangular solve (float32 or better: the solve has no bf16 kernel)."""
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


def chunk_scan(M, C, S):
    """Compose the chunks' maps S -> S M_n + C_n: M [N, B, H, Dk, Dk], C [N, B, H, Dv, Dk], S entering
    chunk 0 [B, H, Dv, Dk] -> the state entering each chunk [N, B, H, Dv, Dk] and the final state.
    Hillis-Steele, out of place (autograd records log2(N) batched matmuls, not N small steps)."""
    C = torch.cat([S @ M[:1] + C[:1], C[1:]])  # C_0 := the state after chunk 0; M_0 is then never read
    N, d = M.shape[0], 1
    while d < N:  # now C_n = state after chunk n if n < d, else the map of chunks n-d+1 .. n applied to 0
        C = torch.cat([C[:d], C[:-d] @ M[d:] + C[d:]])  # (M1, C1) then (M2, C2) = (M1 M2, C1 M2 + C2)
        M = torch.cat([M[:d], M[:-d] @ M[d:]]) if 2 * d < N else M  # the last step needs no M
        d *= 2
    return torch.cat([S[None], C[:-1]]), C[-1]


def delta_rule_chunked(q, k, v, beta, S, chunk_size):
    """Same signature; the UT transform inside chunks of chunk_size tokens, chunk_scan across them."""
    T, L = q.shape[1], chunk_size
    pad = -T % L  # padded tokens: k = 0 and beta = 0 leave the state alone

    def chunks(x):  # [B, T, H, *] -> [N, B, H, L, *]
        x = F.pad(x.to(S.dtype), (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (-1, L)).permute(1, 0, 3, 2, *range(4, x.dim() + 1))

    q, k, v, beta = chunks(q), chunks(k), chunks(v), chunks(beta)
    W, U = ut_transform(k, v, beta)
    with torch.autocast(S.device.type, enabled=False):  # the maps and their products in the state's dtype
        M = torch.eye(k.shape[-1], dtype=S.dtype, device=S.device) - W.transpose(-1, -2) @ k
        S_in, S = chunk_scan(M, U.transpose(-1, -2) @ k, S)
    D = U - W @ S_in.transpose(-1, -2)  # d_t from each chunk's entering state
    y = q @ S_in.transpose(-1, -2) + (q @ k.transpose(-1, -2)).tril() @ D
    return y.permute(1, 0, 3, 2, 4).flatten(1, 2)[:, :T], S


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
        H, C = self.n_head, self.conv.in_channels
        if state is None:
            acc = torch.promote_types(x.dtype, torch.float32)  # the state accumulates in float32 or better
            Dh = d_model // H
            state = (x.new_zeros(B, H, Dh, Dh, dtype=acc), x.new_zeros(B, self.conv.kernel_size[0] - 1, C))
        S, conv = state
        ctx = torch.cat([conv, self.qkv(x).to(conv.dtype)], 1)  # the conv state is the left context
        qkv = F.silu(self.conv(ctx.transpose(1, 2)).transpose(1, 2))
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
        return self.out(y.flatten(2).to(x.dtype)), (S, ctx[:, ctx.shape[1] - conv.shape[1]:].clone())

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
