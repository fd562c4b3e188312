"""Gated retention: RetNet's fixed decay made data-dependent, one scalar per head and token.
Sun et al. 2024, "You Only Cache Once: Decoder-Decoder Architectures for Language Models"
(arXiv:2405.05254), sec. 2.1.2; the same family as GLA and fla's "simple GLA".

    gamma_t = sigmoid(w^T x_t + b)^(1/tau)      (tau = 16)
    S_t = gamma_t S_{t-1} + v_t k_t^T
    y_t = S_t q_t                               (y_t = sum_{s<=t} (prod_{s<r<=t} gamma_r) (q_t . k_s) v_s)

g_t = log gamma_t = logsigmoid(w^T x_t + b) / tau <= 0 is all that is ever computed: a product of
gates is the exp of a sum of g's, never above 1; the matrix of them is decay_mask(g), segment sums
masked to -inf above the diagonal before the exp, so nothing overflows.

Around it: q, k, v, g projections d_model -> d_model without bias (value width d_model, not
RetNet's 2x); rotary on q and k, interleaved pairs, angles 1/10000^linspace(0, 1, Dk/2), offset by
the step counter the state carries; k scaled by Dk^-0.5; per-head RMSNorm without affine;
swish(g) output gate; out projection.

Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv], log gates g [B, T, H]; state (S [B, H, Dv, Dk], pos [B]).

Four forms of the same function:
    recurrent  the loop above, one token at a time: O(T) steps, O(1) state
    parallel   (Q K^T * Gamma) V with Gamma = decay_mask(g): prod_{s<r<=t} gamma_r for t >= s: O(T^2)
    chunked    the parallel form inside chunks of L tokens, the chunk states through scan.py with
               a = exp(sum of g over the chunk) per head
    fused      chunked, in fused Triton kernels on CUDA (scalar_decay.py)

Origin: YOCO's GateRetention (microsoft/unilm YOCO/yoco/models/decoder/gate_retention.py): tau
is its gate_logit_normalizer, the rotary angles its build_rel_pos, the RMSNorm its subln. Init as
YOCO: xavier_uniform with gain 2^-2.5 on q, k, v, g and the gate, 2^-1 on out. One departure: the
gate projection has a bias b (as fla's simple_gla gk_proj has, and the formula above), where
YOCO's gt_proj has none.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from scalar_decay import scalar_decay
from scan import scan


def rotate(x, pos, base=10000.0):
    """Rotary positions on interleaved pairs of x [B, T, H, Dk] at positions pos [B, T]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    theta = base ** -torch.linspace(0, 1, x.shape[-1] // 2, dtype=acc, device=x.device)
    angle = pos[:, :, None, None].to(acc) * theta  # [B, T, 1, Dk/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).to(x.dtype)


def decay_mask(g):
    """g: per-step log decays [..., L] -> [..., L, L]: exp(g_{s+1} + ... + g_t) for t >= s, 0 above the
    diagonal. Segment sums of masked copies, not differences of cumsums (no cancellation when the
    sums are large), masked to -inf before the exp."""
    L = g.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=g.device).tril()
    sums = g[..., :, None].expand(*g.shape, L).masked_fill(~causal.tril(-1), 0).cumsum(-2)  # g_{s+1} + .. + g_t
    return sums.masked_fill(~causal, float("-inf")).exp()


def chunk(x, L):
    """[B, T, H, *] -> [B, T/L, H, L, *], T padded with zeros to a multiple of L."""
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, -x.shape[1] % L))
    return x.unflatten(1, (-1, L)).transpose(2, 3)


def gated_retention_recurrent(q, k, v, g, S):
    """q, k: [B, T, H, Dk], v: [B, T, H, Dv], g (log gates): [B, T, H], S: [B, H, Dv, Dk] -> y, S."""
    ys = []
    for t in range(q.shape[1]):
        S = g[:, t, :, None, None].exp().to(S.dtype) * S + (v[:, t, :, :, None] * k[:, t, :, None, :]).to(S.dtype)
        ys.append(torch.einsum("bhed,bhd->bhe", S, q[:, t].to(S.dtype)))
    return torch.stack(ys, 1).to(q.dtype), S


def gated_retention_parallel(q, k, v, g, S):
    """Same signature; the whole sequence as one decay-masked matmul, plus what S0 contributes."""
    c = g.cumsum(1)  # [B, T, H]: log of gamma_1 ... gamma_t
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay_mask(g.transpose(1, 2)).to(q.dtype)
    y = torch.einsum("bhts,bshe->bthe", scores, v)
    y = y + torch.einsum("bhed,bthd->bthe", S.to(q.dtype), q * c.exp()[..., None].to(q.dtype))
    to_end = (c[:, -1:] - c).exp()[..., None].to(k.dtype)  # prod_{s<r<=T} gamma_r <= 1
    S_new = S * c[:, -1].exp()[..., None, None].to(S.dtype)
    return y, S_new + torch.einsum("bthe,bthd->bhed", v, k * to_end).to(S.dtype)


def gated_retention_chunked(q, k, v, g, S, chunk_size):
    """Same signature; quadratic inside chunks of chunk_size tokens, scan.py across them."""
    T, L = q.shape[1], chunk_size
    # [B, T/L, H, L, *]; padding: zero keys and values, gates of exactly 1 (log 0): the state passes intact
    q, k, v, g = (chunk(x, L) for x in (q, k, v, g))
    c = g.cumsum(-1)  # [B, T/L, H, L], from each chunk's start
    y_intra = ((q @ k.mT) * decay_mask(g).to(q.dtype)) @ v
    last = c[..., -1:]  # [B, T/L, H, 1]: log of the chunk's whole decay
    k_end = k * (last - c).exp()[..., None].to(k.dtype)  # each key decayed to its chunk's end
    chunk_kv = (v.mT @ k_end).to(S.dtype)  # [B, T/L, H, Dv, Dk]
    a = last[..., None].exp().to(S.dtype)  # [B, T/L, H, 1, 1], broadcast over Dv, Dk
    S_after = scan(a, chunk_kv, S)
    S_before = torch.cat([S[:, None], S_after[:, :-1]], 1)
    y = y_intra + (q * c.exp()[..., None].to(q.dtype)) @ S_before.to(q.dtype).mT
    return y.transpose(2, 3).flatten(1, 2)[:, :T], S_after[:, -1]


class GatedRetention(nn.Module):
    """Gated retention; forward(x [B, T, d_model], state) -> (y, state (S [B, H, Dv, Dk], pos [B]))."""

    forms = ("recurrent", "parallel", "chunked", "fused")

    def __init__(self, d_model, n_head=4, chunk_size=64, tau=16.0, eps=1e-5):
        super().__init__()
        if d_model % n_head or (d_model // n_head) % 2:
            raise ValueError(f"d_model={d_model} must split into n_head={n_head} heads of even width")
        self.n_head, self.chunk_size, self.tau, self.eps = n_head, chunk_size, tau, eps
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.g = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, n_head)  # w, b of gamma_t = sigmoid(w^T x_t + b)^(1/tau)
        self.out = nn.Linear(d_model, d_model, bias=False)
        for lin in (self.q, self.k, self.v, self.g, self.gate):
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.out.weight, gain=2 ** -1)

    def forward(self, x, state=None, form="fused"):
        B, T, d_model = x.shape
        H = self.n_head
        acc = torch.promote_types(x.dtype, torch.float32)  # states and log gates in float32 or better
        if state is None:
            S = x.new_zeros(B, H, d_model // H, d_model // H, dtype=acc)
            state = (S, torch.zeros(B, dtype=torch.long, device=x.device))
        S, seen = state
        pos = seen[:, None] + torch.arange(T, device=x.device)
        q = rotate(self.q(x).unflatten(-1, (H, -1)), pos)
        k = rotate(self.k(x).unflatten(-1, (H, -1)), pos) * q.shape[-1] ** -0.5
        v = self.v(x).unflatten(-1, (H, -1))
        g = F.logsigmoid(self.gate(x).to(acc)) / self.tau  # [B, T, H], log gamma_t <= 0
        if form == "recurrent":
            y, S = gated_retention_recurrent(q, k, v, g, S)
        elif form == "parallel":
            y, S = gated_retention_parallel(q, k, v, g, S)
        elif form == "chunked":
            y, S = gated_retention_chunked(q, k, v, g, S, self.chunk_size)
        elif form == "fused":
            y, S = scalar_decay(q, k, v, g, S)
        else:
            raise ValueError(f"unknown form {form!r}; GatedRetention has {self.forms}")
        y = y.to(acc)
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)  # RMSNorm per head, no affine
        y = F.silu(self.g(x)) * y.flatten(2)
        return self.out(y.to(x.dtype)), (S, seen + T)

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
