"""Mamba: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv:2312.00752). The block of Fig. 3 with the selective SSM of Algorithm 2 (S6).

An S4D-real state space model whose step size dt and projections B, C depend on the token
(the selection mechanism, section 3.2), so every channel d of the inner width is its own RNN with
an N-dimensional state, a diagonal gate between 0 and 1 and an input-dependent read-out:

    dt_t = softplus(dt_proj(x_proj_dt(u_t)))               [d_inner]    (s_Delta, tau_Delta)
    h_t  = exp(dt_t A) * h_{t-1} + (dt_t u_t) B_t          [d_inner, N] (ZOH for A, Euler for B)
    y_t  = h_t C_t + D u_t                                 [d_inner]

A = -exp(A_log) < 0 and dt > 0, so the gate exp(dt A) lies in (0, 1]. Around it (section 3.4):
in_proj to u and z (expand 2), a causal depthwise conv1d (width d_conv) then SiLU on u, the SSM,
the gate y * silu(z), out_proj. State: (conv [B, d_inner, d_conv - 1], the last inputs of the
conv; ssm [B, d_inner, N]), both float32 or better.

Two forms of the same function:
    recurrent  one token at a time: conv window, projections and one SSM step per token
    parallel   the conv over the whole sequence (the conv state as its left context instead of
               zero padding) and the selective scan through scan.py (the SSM state as h0)

Memory of the parallel form: the gate a = exp(dt A), the input b = dt u B and the states h are
each [B, T, d_inner, N], N times the activations of the block. scan.py's selective_scan, like the
official CUDA kernel (selective_scan_cuda), never writes them to memory: it reads dt, u
([B, T, d_inner]), A, B and C ([B, T, N]), builds a and b, scans and reads out y = C . h tile by
tile in registers, and keeps only the state entering each tile (16 steps on a GPU) for the
backward, which recomputes the states from it. On the CPU and in float64 it runs the plain form.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from selective_scan import selective_scan


class Mamba(nn.Module):
    """Mamba block; forward(x [B, T, d_model], state) -> (y, state (conv, ssm))."""

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
        self.dt_proj.bias._no_reinit = True

    def _dt_B_C(self, v, dtype):
        """Selection: dt [.., d_inner], B, C [.., N] from the conv output v, in the state's dtype."""
        dt, B, C = self.x_proj(v).split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = F.linear(dt, self.dt_proj.weight).to(dtype) + self.dt_proj.bias.to(dtype)  # bias in float32
        return F.softplus(dt), B.to(dtype), C

    def _recurrent(self, u, conv, h, A):
        w = self.conv1d.weight[:, 0]  # [d_inner, d_conv]
        ys = []
        for t in range(u.shape[1]):
            window = torch.cat([conv, u[:, t, :, None].to(conv.dtype)], -1)  # [B, d_inner, d_conv]
            conv = window[..., 1:]
            v = F.silu((window.to(w.dtype) * w).sum(-1) + self.conv1d.bias)
            dt, B, C = self._dt_B_C(v, h.dtype)
            h = torch.exp(dt[..., None] * A) * h + (dt * v)[..., None] * B[:, None, :]
            ys.append((h * C[:, None, :].to(h.dtype)).sum(-1) + self.D * v)
        return torch.stack(ys, 1), conv, h

    def _parallel(self, u, conv, h0, A):
        window = torch.cat([conv, u.transpose(1, 2).to(conv.dtype)], -1)  # [B, d_inner, d_conv - 1 + T]
        v = F.conv1d(window.to(self.conv1d.weight.dtype), self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        v = F.silu(v).transpose(1, 2)  # [B, T, d_inner]
        dt, B, C = self._dt_B_C(v, h0.dtype)
        y, h = selective_scan(v, dt, A, B, C, h0)  # y in v's dtype, h [B, d_inner, N] in float32
        return y + self.D * v, window[..., window.shape[-1] - (self.d_conv - 1):], h

    def forward(self, x, state=None, form="parallel"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; Mamba has {self.forms}")
        u, z = self.in_proj(x).chunk(2, -1)
        if state is None:
            acc = torch.promote_types(x.dtype, torch.float32)  # states in float32 or better
            state = (x.new_zeros(x.shape[0], self.d_inner, self.d_conv - 1, dtype=acc),
                     x.new_zeros(x.shape[0], self.d_inner, self.d_state, dtype=acc))
        conv, h = state
        A = -torch.exp(self.A_log.to(h.dtype))
        y, conv, h = (self._recurrent if form == "recurrent" else self._parallel)(u, conv, h, A)
        y = y * F.silu(z)
        return self.out_proj(y.to(x.dtype)), (conv, h)

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
