"""Mamba: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv:2312.00752). The block of Fig. 3 with the selective SSM of Algorithm 2 (S6).

An S4D-real state space model whose step size dt and projections B, C depend on the token
(the selection mechanism, section 3.2), so every channel d of the inner width D = d_inner is its
own RNN with an N-dimensional state, a diagonal gate between 0 and 1 and an input-dependent
read-out. With u_t the SSM's input (below):

    dt_t = softplus(dt_proj(x_proj_dt(u_t)))               [D]     (s_Delta, tau_Delta)
    B_t, C_t = x_proj_B(u_t), x_proj_C(u_t)                [N]     (s_B, s_C)
    h_t  = exp(dt_t A) * h_{t-1} + (dt_t u_t) B_t          [D, N]  (ZOH for A, Euler for B)
    y_t  = h_t C_t + D * u_t                               [D]     (D: a learned skip per channel)

A = -exp(A_log) < 0 and dt > 0, so the gate exp(dt A) lies in (0, 1]. Around it (section 3.4):
in_proj of x to w and z (expand 2), u = SiLU(causal depthwise conv1d of w, width d_conv; causal_conv.py),
the SSM, the gate y * silu(z), out_proj. State: (conv [B, D, d_conv - 1], the last inputs w of the
conv; ssm h [B, D, N]), both float32 or better. Shapes: u, dt [B, T, D], A [D, N], B, C [B, T, N].

Two forms of the selective SSM, the same function of (u, dt, A, B, C, h0):
    recurrent  the loop above, one token at a time
    parallel   selective_scan.py's fused scan (the SSM state as h0)
The block runs the conv over the whole sequence in both forms, with the conv state as its left
context instead of zero padding, so a call continues where the last one stopped.

Memory of the parallel form: the gate a = exp(dt A), the input b = dt u B and the states h are
each [B, T, D, N], N times the activations of the block. selective_scan.py, like the official CUDA
kernel (selective_scan_cuda), never writes them to memory: it reads dt, u ([B, T, D]), A, B and
C ([B, T, N]), builds a and b, scans and reads out y = C . h tile by tile in registers, and keeps
only the state entering each tile (16 steps on a GPU) for the backward, which recomputes the
states from it. On the CPU and in float64 it runs the plain form.

Origin: parameter names, defaults and init as mamba_ssm's Mamba (mamba_ssm/modules/mamba_simple.py):
A = -(1..N) in every channel (S4D-real), D = 1, dt at init log-uniform in [dt_min, dt_max] through
dt_proj's bias (its inverse softplus), dt_proj's weight U(-dt_rank^-0.5, dt_rank^-0.5).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from causal_conv import causal_conv_silu, last_inputs
from selective_scan import selective_scan


def selective_ssm_recurrent(u, dt, A, B, C, h):
    """u, dt: [B, T, D], A: [D, N], B, C: [B, T, N], h: [B, D, N] -> y [B, T, D] (without the D skip), h."""
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :].to(h.dtype)).sum(-1))
    return torch.stack(ys, 1), h


def selective_ssm_parallel(u, dt, A, B, C, h):
    """Same signature; the whole sequence through selective_scan.py (y in u's dtype, h in float32 or better)."""
    return selective_scan(u, dt, A, B, C, h)


class Mamba(nn.Module):
    """Mamba block; forward(x [B, T, d_model], state) -> (y, state (conv [B, D, d_conv - 1], ssm [B, D, N]))."""

    forms = ("recurrent", "parallel")

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank=None,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = expand * d_model, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        d_inner = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True)  # padding: the state
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        with torch.no_grad():  # dt at init log-uniform in [dt_min, dt_max]; the bias is its inverse softplus
            std = self.dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x, state=None, form="parallel"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; Mamba has {self.forms}")
        w, z = self.in_proj(x).chunk(2, -1)
        if state is None:
            acc = torch.promote_types(x.dtype, torch.float32)  # states in float32 or better
            state = (x.new_zeros(x.shape[0], self.d_inner, self.d_conv - 1, dtype=acc),
                     x.new_zeros(x.shape[0], self.d_inner, self.d_state, dtype=acc))
        conv, h = state
        context = conv.mT  # [B, d_conv - 1, D]: the inputs before x
        conv, u = last_inputs(context, w).mT, causal_conv_silu(w, self.conv1d.weight[:, 0], self.conv1d.bias, context)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], -1)  # selection
        dt = F.linear(dt, self.dt_proj.weight).to(h.dtype) + self.dt_proj.bias.to(h.dtype)  # the bias in float32
        dt = F.softplus(dt)
        A = -torch.exp(self.A_log.to(h.dtype))
        ssm = selective_ssm_recurrent if form == "recurrent" else selective_ssm_parallel
        y, h = ssm(u, dt, A, B.to(h.dtype), C, h)
        y = (y + self.D * u) * F.silu(z)
        return self.out_proj(y.to(x.dtype)), (conv, h)

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
