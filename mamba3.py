"""Mamba-3: Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu 2026, "Mamba-3: Improved Sequence Modeling using
State Space Principles" (arXiv:2603.15569, ICLR 2026), the single-input single-output (SISO) layer.

Mamba-2's SSM (mamba2.py: a scalar decay per head, h = one P x N matrix per head) with an exponential-trapezoidal
discretisation: the input enters through two terms, the previous token's and this token's,

    h_t = alpha_t h_{t-1} + beta_t x_{t-1} B_{t-1}^T + gamma_t x_t B_t^T        h [H, P, N]
    y_t = h_t C_t + D x_t
    alpha_t = exp(dt_t A_t),  beta_t = (1 - lambda_t) dt_t alpha_t,  gamma_t = lambda_t dt_t

per head and token: dt = softplus(. + dt_bias), lambda = sigmoid(.), and A is data-dependent too,
A = -max(f(a), A_floor) with f(a) = 1 + a for a >= 0, 1 / (1 - a) below. lambda = 1 is Mamba-2's exponential-Euler
rule. A complex state: pairs of state dimensions are complex numbers that also turn, alpha_t -> exp(dt_t (A_t + i w_t)),
w_t = pi tanh(.) per pair and token, shared by the heads. Rotations commute, so they move onto B and C (the paper's
"RoPE trick"): B_t, C_t -> R(theta_t) B_t, R(theta_t) C_t with theta_t = sum_{k <= t} dt_k w_k (per head, through dt)
on dimensions (2i, 2i+1) of the first rope_fraction of N, and the real recurrence above runs unchanged. B and C
are RMS-normed per group, get a bias per head, then turn. The block: in_proj to (z, x, B, C, dt, A, lambda, angles),
no convolution, (y + D x) * silu(z), out_proj. State: (theta [B, H, N_angles], h [B, H, P, N],
B_prev [B, H, N] (turned), x_prev [B, H, P]), float32 or better; every form reads and writes all four.

Token s's input x_s B_s^T reaches h_t with the weight decay_mask(g)[t, s] * W[t, s], g = dt A, where
W[t, t] = gamma_t and W[t, s] = gamma_s + beta'_{s+1} below the diagonal (beta' = (1 - lambda) dt: beta without its
alpha; the last token's beta'_{s+1} is the next call's), and the previous call's last token enters as
h_0 + beta'_0 x_prev B_prev^T. Four forms of one function:
    recurrent  the loop above, one token at a time: O(T) steps, O(1) state
    parallel   y = (decay_mask(g) * W * C B^T) x, Mamba-2's masked "attention" form with the two-band W: O(T^2)
    chunked    SSD (ssd_minimal.py) with W inside chunks of L tokens; a chunk's state carries its last token's
               beta' term into the next chunk; chunk states passed on by scan.py: O(T L)
    fused      chunked, in fused Triton kernels on CUDA (scalar_decay.py): W's two bands are one weight per token,
               inputs w_s x_s B_s^T with q = C, k = B, and the diagonal's excess beta'_{t+1} (C_t . B_t) x_t taken back

As mamba_ssm 2.3.2.post1's Mamba3 (modules/mamba3.py, is_mimo=False, is_outproj_norm=False) and its SISO kernels
(ops/triton/mamba3/: mamba3_siso_step's update, mamba3_siso_fwd's shifted gamma, angle_dt's angles), with its
defaults: d_state 128, expand 2, headdim 64, ngroups 1, rope_fraction 0.5, chunk_size 64, dt in [1e-3, 1e-1]
(floor 1e-4), A_floor 1e-4, B and C biases 1, RMSNorm eps 1e-5, D = 1, no biases in the projections. Differences:
no MIMO, no is_outproj_norm option, no varlen; all SSM math in float32 (the kernels run B, C, x, lambda and the angles
in bf16) with exact tanh, sigmoid, cos and sin where the kernels use fast approximations; angles summed in float64
(float32 on MPS) where the kernels sum in float32 chunk by chunk, mod 2 pi; the state keeps theta mod 2 pi as theirs.
Parameters as theirs, renamed: B_norm.weight -> B_norm_weight, B_bias [H, 1, N] -> [H, N] (C alike).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalar_decay import scalar_decay
from scan import scan


def decay_mask(g):
    """g [..., L] log decays -> [..., L, L]: exp(g_{s+1} + ... + g_t) for t >= s, 0 above the diagonal.
    Sums of masked copies, not differences of cumsums, masked to -inf before the exp."""
    L = g.shape[-1]
    below = torch.ones(L, L, dtype=torch.bool, device=g.device).tril(-1)
    seg = g[..., :, None].expand(*g.shape, L).masked_fill(~below, 0).cumsum(-2)
    return seg.masked_fill(~torch.ones_like(below).tril(), -math.inf).exp()


def rotate(v, cos, sin):
    """v [..., N], cos, sin [..., N_angles] -> v with dims (2i, 2i+1) turned by angle i, the rest unchanged."""
    n = 2 * cos.shape[-1]
    v1, v2 = v[..., :n].unflatten(-1, (-1, 2)).unbind(-1)
    return torch.cat([torch.stack([v1 * cos - v2 * sin, v1 * sin + v2 * cos], -1).flatten(-2), v[..., n:]], -1)


def trapezoid_recurrent(x, g, dt, lam, B, C, h, B_prev, x_prev):
    """The exponential-trapezoidal recurrence, token by token. x [B, T, H, P], g, dt, lam [B, T, H],
    B, C [B, T, H, N], h [B, H, P, N], B_prev [B, H, N], x_prev [B, H, P] -> y [B, T, H, P], h."""
    ys = []
    for t in range(x.shape[1]):
        alpha = torch.exp(g[:, t])
        beta, gamma = (1 - lam[:, t]) * dt[:, t] * alpha, lam[:, t] * dt[:, t]
        h = (alpha[..., None, None] * h + beta[..., None, None] * x_prev[..., None] * B_prev[..., None, :]
             + gamma[..., None, None] * x[:, t, ..., None] * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
        B_prev, x_prev = B[:, t], x[:, t]
    return torch.stack(ys, 1), h


def input_weights(dt, lam, h, B_prev, x_prev):
    """-> gamma, gamma_s + beta'_{s+1} (both [B, T, H]), and h with the first token's beta' term folded in."""
    gamma, beta_ = lam * dt, (1 - lam) * dt
    h = h + beta_[:, 0, :, None, None] * x_prev[..., None] * B_prev[..., None, :]
    return gamma, gamma + F.pad(beta_[:, 1:], (0, 0, 0, 1)), h  # the last token's beta' is the next call's


def trapezoid_parallel(x, g, dt, lam, B, C, h, B_prev, x_prev):
    """Same signature; y = (decay_mask(g) * W * C B^T) x over the whole sequence, plus what h0 contributes."""
    gamma, w, h = input_weights(dt, lam, h, B_prev, x_prev)
    T = x.shape[1]
    Lm = decay_mask(g.transpose(1, 2))  # [B, H, T, S]
    W = torch.where(torch.eye(T, dtype=torch.bool, device=x.device), gamma.transpose(1, 2)[..., None],
                    w.transpose(1, 2)[..., None, :])  # [B, H, T, S]
    y = torch.einsum("bhts,bshp->bthp", Lm * W * torch.einsum("bthn,bshn->bhts", C, B), x)
    decay_in = torch.exp(g.cumsum(1))  # [B, T, H]: what is left of h0 at t
    y = y + torch.einsum("bthn,bhpn,bth->bthp", C, h, decay_in)
    last = (Lm[..., -1, :] * w.transpose(1, 2)).transpose(1, 2)  # [B, S, H]: what reaches h_T of each input
    h = decay_in[:, -1, :, None, None] * h + torch.einsum("bshn,bshp->bhpn", B * last[..., None], x)
    return y, h


def trapezoid_chunked(x, g, dt, lam, B, C, h, B_prev, x_prev, chunk_size):
    """Same signature; quadratic inside chunks of chunk_size tokens, scan.py across them."""
    gamma, w, h = input_weights(dt, lam, h, B_prev, x_prev)
    T, L = x.shape[1], chunk_size
    pad = -T % L  # zero pads: decay 1, weight 0, the state passes through unchanged
    x, g, gamma, w, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).unflatten(1, (-1, L)).transpose(2, 3)
                            for t in (x, g, gamma, w, B, C))  # [B, T/L, H, L, *]
    Lm = decay_mask(g)  # [B, T/L, H, L, S]
    W = torch.where(torch.eye(L, dtype=torch.bool, device=x.device), gamma[..., None], w[..., None, :])
    y_diag = torch.einsum("bchls,bchsp->bchlp", Lm * W * torch.einsum("bchln,bchsn->bchls", C, B), x)
    last = (Lm[..., -1, :] * w)[..., None]  # w: a chunk's last token sends its beta' term on too
    states = torch.einsum("bchsn,bchsp->bchpn", B * last, x)
    a = torch.exp(g.sum(-1))[..., None, None]  # [B, T/L, H, 1, 1], broadcast by scan, never expanded
    h_after = scan(a.to(h.dtype), states.to(h.dtype), h)  # [B, T/L, H, P, N]
    h_before = torch.cat([h[:, None], h_after[:, :-1]], 1)
    y_off = torch.einsum("bchln,bchpn,bchl->bchlp", C, h_before.to(C.dtype), torch.exp(g.cumsum(-1)))
    return (y_diag + y_off).transpose(2, 3).flatten(1, 2)[:, :T], h_after[:, -1]


def trapezoid_fused(x, g, dt, lam, B, C, h, B_prev, x_prev):
    """Same signature; every input weighted by w_s (decay_mask * W = decay_mask * w below and on the diagonal, but
    W[t, t] = gamma_t = w_t - beta'_{t+1}), through scalar_decay."""
    gamma, w, h = input_weights(dt, lam, h, B_prev, x_prev)
    y, h = scalar_decay(C, B, w[..., None] * x, g, h)
    return y.to(x.dtype) - ((w - gamma) * (C * B).sum(-1))[..., None] * x, h


class Mamba3(nn.Module):
    """Mamba-3 SISO block; forward(x [B, T, d_model], state) -> (y, (theta, h, B_prev, x_prev))."""

    forms = ("recurrent", "parallel", "chunked", "fused")

    def __init__(self, d_model, d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5, chunk_size=64,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, A_floor=1e-4, eps=1e-5):
        super().__init__()
        d_inner, n_angles = expand * d_model, int(d_state * rope_fraction) // 2
        if min(sizes := (d_state, expand, headdim, ngroups, chunk_size, n_angles)) < 1:
            raise ValueError(f"sizes must be >= 1, got d_state, expand, headdim, ngroups, chunk_size, "
                             f"d_state * rope_fraction // 2 = {sizes}")
        if d_inner % headdim or (d_inner // headdim) % ngroups:
            raise ValueError(f"d_inner={d_inner} needs headdim={headdim} | d_inner, ngroups={ngroups} | n_heads")
        self.d_inner, self.d_state, self.headdim, self.ngroups = d_inner, d_state, headdim, ngroups
        self.n_head, self.n_angles, self.chunk_size = d_inner // headdim, n_angles, chunk_size
        self.A_floor, self.eps = A_floor, eps
        self.sizes = [d_inner, d_inner, ngroups * d_state, ngroups * d_state] + [self.n_head] * 3 + [n_angles]
        self.in_proj = nn.Linear(d_model, sum(self.sizes), bias=False)  # z, x, B, C, dt, A, lambda, angles
        dt = torch.exp(torch.rand(self.n_head) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.B_bias = nn.Parameter(torch.ones(self.n_head, d_state))  # per head, after the norm
        self.C_bias = nn.Parameter(torch.ones(self.n_head, d_state))
        self.B_norm_weight, self.C_norm_weight = nn.Parameter(torch.ones(d_state)), nn.Parameter(torch.ones(d_state))
        self.D = nn.Parameter(torch.ones(self.n_head))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def bc(self, v, weight, bias):
        """[B, T, G * N] -> RMSNorm per group, each group's heads, + bias per head: [B, T, H, N]."""
        v = v.unflatten(-1, (self.ngroups, self.d_state))
        v = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + self.eps) * weight.to(v.dtype)
        return v.repeat_interleave(self.n_head // self.ngroups, 2) + bias.to(v.dtype)

    def forward(self, x, state=None, form="fused"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; Mamba3 has {self.forms}")
        Bsz, T, _ = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)  # states and decays in float32 or better
        if state is None:
            state = tuple(x.new_zeros(Bsz, self.n_head, *s, dtype=acc) for s in
                          ((self.n_angles,), (self.headdim, self.d_state), (self.d_state,), (self.headdim,)))
        theta, h, B_prev, x_prev = (s.to(acc) for s in state)
        z, xs, Bm, Cm, dt, A, lam, angles = self.in_proj(x).to(acc).split(self.sizes, -1)
        xs = xs.unflatten(-1, (self.n_head, self.headdim))
        dt = F.softplus(dt + self.dt_bias.to(acc))  # [B, T, H]
        A = -torch.clamp(A.clamp(min=0) + 1 / (1 - A.clamp(max=0)), min=self.A_floor)  # the heavy-tailed -f(.)
        lam = torch.sigmoid(lam)
        # angles summed in float64 where we can: theta grows like T * pi * dt; a float32 cumsum drifted by up to
        # 2e-3 rad at T = 16384 with w near pi and dt = 1 (measured against float64)
        ang = torch.float32 if x.device.type == "mps" else torch.float64
        dtheta = math.pi * torch.tanh(angles)[:, :, None] * dt[..., None]  # [B, T, H, N_angles]
        theta = theta.to(ang)[:, None] + dtheta.to(ang).cumsum(1)
        cos, sin = theta.cos().to(acc), theta.sin().to(acc)
        Bm = rotate(self.bc(Bm, self.B_norm_weight, self.B_bias), cos, sin)  # [B, T, H, N]
        Cm = rotate(self.bc(Cm, self.C_norm_weight, self.C_bias), cos, sin)
        args = (xs, dt * A, dt, lam, Bm, Cm, h, B_prev, x_prev)
        if form == "recurrent":
            y, h = trapezoid_recurrent(*args)
        elif form == "parallel":
            y, h = trapezoid_parallel(*args)
        elif form == "fused":
            y, h = trapezoid_fused(*args)
        else:
            y, h = trapezoid_chunked(*args, self.chunk_size)
        y = ((y + self.D.to(acc)[:, None] * xs).flatten(2) * F.silu(z)).to(x.dtype)
        state = (torch.remainder(theta[:, -1], 2 * math.pi).to(acc), h, Bm[:, -1], xs[:, -1])
        return self.out_proj(y), state

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
