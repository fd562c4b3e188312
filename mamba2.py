"""Mamba-2: Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality" (arXiv:2405.21060), the SSD layer.

A selective SSM whose transition is a scalar per head, so it is linear attention with a
data-dependent decay (eq. 16-17 and the Mamba-2 block, Fig. 6):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T      h [H, P, N]: one P x N matrix per head
    y_t = h_t C_t + D x_t                           A < 0 and D per head; B, C shared by groups

dt = softplus(dt_raw + dt_bias) per head and token. Around the SSM: one input projection to
(z, x, B, C, dt), a causal depthwise conv of width d_conv with SiLU over (x, B, C) (causal_conv.py;
x, B and C stay in the projection's dtype, as mamba_ssm's causal_conv1d returns them), a gated
RMSNorm norm(y * silu(z)) and an output projection. Shapes: x [B, T, H, P], dt [B, T, H],
B, C [B, T, G, N]. State: (conv [B, conv_dim, d_conv - 1], the last inputs of the conv;
ssm h [B, H, P, N]), both float32 or better; every form starts the conv from the conv state,
never from zeros.

Four forms of the same function:
    recurrent  the loop above, one token at a time: O(T) steps, O(1) state
    parallel   the dual "attention" form y = (Gamma * C B^T) (dt x), Gamma = decay_mask(dt A):
               exp(sum_{s<k<=t} dt_k A) for t >= s (the paper's 1-semiseparable mask): O(T^2), no loop
    chunked    the SSD algorithm: the parallel form inside chunks of L tokens, the chunk states
               [B, T/L, H, P, N] passed on by scan.py with a = exp(sum of dt A over the chunk) per
               head, [B, T/L, H, 1, 1], broadcast: O(T L) work
    fused      chunked, in fused Triton kernels on CUDA (scalar_decay.py): q = C, k = B (each group's, read by its
               heads), v = dt x, g = dt A; D x is added outside

Origin: the block as the official one (mamba_ssm/modules/mamba2.py), with its init and defaults;
the chunked form follows ssd_minimal.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from causal_conv import causal_conv_silu, last_inputs
from scalar_decay import scalar_decay
from scan import scan


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


def heads(t, G, dim):
    """H at dim -> (G, H / G): the heads that share one group's B and C, without copying them."""
    return t.unflatten(dim, (G, -1))


def ssd_recurrent(x, dtA, dt, B, C, h):
    """x [B, T, H, P], dtA, dt [B, T, H], B, C [B, T, G, N], h [B, H, P, N] -> y [B, T, H, P], h."""
    G, ys = B.shape[2], []
    xdt = heads(x * dt[..., None], G, 2)
    for t in range(x.shape[1]):
        h = torch.exp(dtA[:, t])[..., None, None] * h + torch.einsum(
            "bghp,bgn->bghpn", xdt[:, t], B[:, t]).flatten(1, 2).to(h.dtype)
        ys.append(torch.einsum("bghpn,bgn->bghp", heads(h, G, 1), C[:, t]).flatten(1, 2))
    return torch.stack(ys, 1), h


def ssd_parallel(x, dtA, dt, B, C, h):
    """Same signature; the whole sequence as one masked matmul, plus what h0 contributes."""
    G = B.shape[2]
    decay = heads(decay_mask(dtA.transpose(1, 2)), G, 1)  # [B, G, H/G, T, T]
    xdt = heads(x * dt[..., None], G, 2)
    CB = torch.einsum("btgn,bsgn->bgts", C, B)
    y = torch.einsum("bgts,bghts,bsghp->btghp", CB, decay, xdt)
    decay_in = torch.exp(dtA.cumsum(1))  # [B, T, H]: what is left of h0 at t
    h0 = heads(h, G, 1)
    y = y + torch.einsum("btgn,bghpn,btgh->btghp", C, h0.to(C.dtype), heads(decay_in, G, 2))
    h_new = decay_in[:, -1, :, None, None] * h + torch.einsum(
        "bsgn,bghs,bsghp->bghpn", B, decay[..., -1, :], xdt).flatten(1, 2).to(h.dtype)
    return y.flatten(2, 3), h_new


def ssd_chunked(x, dtA, dt, B, C, h, chunk_size):
    """Same signature; quadratic inside chunks of chunk_size tokens, scan.py across them."""
    T, G, L = x.shape[1], B.shape[2], chunk_size
    # [B, T/L, H or G, L, *]; dt = 0 pads: decay 1, nothing written, the state passes through unchanged
    x, dtA, dt, B, C = (chunk(t, L) for t in (x, dtA, dt, B, C))
    decay = heads(decay_mask(dtA), G, 2)  # [B, T/L, G, H/G, L, L]
    xdt = heads(x * dt[..., None], G, 2)  # [B, T/L, G, H/G, L, P]
    CB = C @ B.mT  # [B, T/L, G, L, L]
    y_diag = torch.einsum("bcgls,bcghls,bcghsp->bcghlp", CB, decay, xdt)
    states = torch.einsum("bcgsn,bcghs,bcghsp->bcghpn", B, decay[..., -1, :], xdt).flatten(2, 3)
    a = torch.exp(dtA.sum(-1))[..., None, None]  # [B, T/L, H, 1, 1], broadcast by scan, never expanded
    h_after = scan(a.to(h.dtype), states.to(h.dtype), h)  # [B, T/L, H, P, N]
    h_before = torch.cat([h[:, None], h_after[:, :-1]], 1)
    decay_in = torch.exp(dtA.cumsum(-1))  # [B, T/L, H, L]: exp(dtA_0 + .. + dtA_l), what is left of h_before
    y_off = torch.einsum("bcgln,bcghpn,bcghl->bcghlp", C, heads(h_before, G, 2).to(C.dtype),
                         heads(decay_in, G, 2))
    return (y_diag + y_off).flatten(2, 3).transpose(2, 3).flatten(1, 2)[:, :T], h_after[:, -1]


class Mamba2(nn.Module):
    """Mamba-2 block; forward(x [B, T, d_model], state) -> (y, (conv [B, conv_dim, d_conv-1], ssm [B, H, P, N]))."""

    forms = ("recurrent", "parallel", "chunked", "fused")

    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, eps=1e-5):
        super().__init__()
        d_inner = expand * d_model
        if min(sizes := (d_state, d_conv, expand, headdim, ngroups, chunk_size)) < 1:
            raise ValueError(f"sizes must be >= 1, got d_state, d_conv, expand, headdim, ngroups, chunk_size = {sizes}")
        if d_inner % headdim or (d_inner // headdim) % ngroups:
            raise ValueError(f"d_inner={d_inner} needs headdim={headdim} | d_inner, ngroups={ngroups} | n_heads")
        self.d_inner, self.d_state, self.d_conv, self.headdim = d_inner, d_state, d_conv, headdim
        self.n_head, self.ngroups, self.chunk_size, self.eps = d_inner // headdim, ngroups, chunk_size, eps
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + self.n_head, bias=False)  # z, xBC, dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim)  # conv_bias=True
        dt = torch.exp(torch.rand(self.n_head) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.empty(self.n_head).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.n_head))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x, state=None, form="fused"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; Mamba2 has {self.forms}")
        Bsz, T, _ = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)  # states and decays in float32 or better
        if state is None:
            state = (x.new_zeros(Bsz, self.conv_dim, self.d_conv - 1, dtype=acc),
                     x.new_zeros(Bsz, self.n_head, self.headdim, self.d_state, dtype=acc))
        conv_state, h = state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_head], -1)
        context = conv_state.mT  # [B, d_conv - 1, conv_dim]: the inputs before x
        conv_state = last_inputs(context, xBC).mT
        xBC = causal_conv_silu(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, context)  # in in_proj's dtype
        xs, Bm, Cm = xBC.split([self.d_inner] + [self.ngroups * self.d_state] * 2, -1)
        xs = xs.unflatten(-1, (self.n_head, self.headdim))
        Bm, Cm = (t.unflatten(-1, (self.ngroups, self.d_state)) for t in (Bm, Cm))
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # [B, T, H]
        dtA = dt * -torch.exp(self.A_log.to(acc))  # <= 0: every decay exp(sum dtA) is in [0, 1]
        if form == "recurrent":
            y, h = ssd_recurrent(xs, dtA, dt, Bm, Cm, h.to(acc))
        elif form == "parallel":
            y, h = ssd_parallel(xs, dtA, dt, Bm, Cm, h.to(acc))
        elif form == "chunked":
            y, h = ssd_chunked(xs, dtA, dt, Bm, Cm, h.to(acc), self.chunk_size)
        else:
            y, h = scalar_decay(Cm, Bm, xs * dt[..., None], dtA, h.to(acc))
        y = (y.to(acc) + self.D.to(acc)[:, None] * xs).flatten(2)
        y = (y * F.silu(z.to(acc))).unflatten(-1, (self.ngroups, -1))  # gate, then norm (norm_before_gate=False)
        y = (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)).flatten(2) * self.norm_weight.to(acc)
        return self.out_proj(y.to(x.dtype)), (conv_state, h)

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
