"""The short causal depthwise convolution, with its SiLU, that Mamba, Mamba-2, DeltaNet and Gated DeltaNet put on their
projected inputs (mamba_ssm's causal_conv1d_fn with activation="silu"; fla's ShortConvolution). Per channel c:

    y_t = silu(bias + sum_{k<K} w_k x_{t-K+1+k})         x_{-K+1}, ..., x_{-1}: the state, the last K - 1 inputs before

`causal_conv_silu(x, weight, bias, state)`: x [B, T, C] (read with its strides: a slice of a projection is not copied),
weight [C, K], bias [C] or None, state [B, K - 1, C]. Returns y [B, T, C] in x's dtype, summed in float32 (float64
stays). `last_inputs(state, x)` is the state after x: what the next call continues from.

Backward, with p_t the sum inside the silu and dp_t = dy_t silu'(p_t):

    dx_u = sum_k w_k dp_{u+K-1-k} (u from -K+1: the state's rows too)   dw_k = sum_t dp_t x_{t-K+1+k}   db = sum_t dp_t

A file of its own because four models share it, and because PyTorch's depthwise conv1d (its native depthwise kernels,
with the transposes and the concatenated state around it) was Mamba-2's largest cost after its SSM (RESULTS.md,
Training). Engines: Triton on CUDA (and on the CPU under TRITON_INTERPRET=1), one program per (batch row, BT
steps, BC channels), each reading the K shifted tiles of x it needs (the state's rows where t < 0): the forward writes
y; the backward recomputes p and writes dp (float32), then dx from K shifted tiles of dp, each program its partial sums
of dw and db, summed after. Elsewhere (CPU, MPS, float64) PyTorch's conv1d. Forward and backward are custom ops
(zoo::causal_conv_silu, zoo::causal_conv_silu_backward) with fakes, built by scan.py's `register`.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from scan import INTERPRET, register, triton, use_triton

if triton is not None:
    import triton.language as tl


def causal_conv_silu(x, weight, bias, state):
    """x [B, T, C], weight [C, K], bias [C] or None, state [B, K - 1, C] -> silu(causal conv) [B, T, C]."""
    (Bsz, _, C), K = x.shape, weight.shape[-1]
    if weight.shape != (C, K) or (bias is not None and bias.shape != (C,)) or state.shape != (Bsz, K - 1, C):
        raise ValueError("causal_conv_silu: needs x [B, T, C], weight [C, K], bias [C] or None, state [B, K - 1, C]; "
                         f"got {[None if t is None else tuple(t.shape) for t in (x, weight, bias, state)]}")
    if any(t is not None and t.device != x.device for t in (weight, bias, state)):
        raise ValueError(f"causal_conv_silu: x, weight, bias and state must be on one device, x is on {x.device}")
    return _op(x, weight, bias, state)


def last_inputs(state, x):
    """The state after x: the last K - 1 rows of [state; x], [B, K - 1, C]."""
    K1 = state.shape[1]
    return torch.cat([state, x[:, max(0, x.shape[1] - K1):].to(state.dtype)], 1)[:, -K1:] if K1 else state


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], state: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return _triton(x, weight, bias, state)
    return F.silu(_torch_conv(x, weight, bias, state)).mT.to(x.dtype).contiguous()  # contiguous, as the fake says


def _backward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], state: torch.Tensor,
              dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dstate), each in its input's dtype (dbias in weight's where there is no bias)."""
    if use_triton(x):
        dx, dw, db, dstate = _triton(x, weight, bias, state, dy)
    else:
        dx, dw, db, dstate = _torch_backward(x, weight, bias, state, dy)
    return dx.to(x.dtype), dw.to(weight.dtype), db.to((weight if bias is None else bias).dtype), dstate.to(state.dtype)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grads(ctx, backward, dy):
    x, weight, bias, state = ctx.saved_tensors
    dx, dw, db, dstate = backward(x, weight, bias, state, dy)
    return dx, dw, None if bias is None else db, dstate


_op = register("causal_conv_silu", _forward, _backward, lambda x, weight, bias, state: x.new_empty(x.shape),
               lambda x, weight, bias, state, dy: (x.new_empty(x.shape), weight.new_empty(weight.shape),
                                                   (weight if bias is None else bias).new_empty(weight.shape[:1]),
                                                   state.new_empty(state.shape)),
               _setup, _grads)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch engine

def _torch_conv(x, weight, bias, state):
    """p [B, C, T] in float32 (float64 stays): conv1d over [state; x] with autocast off, so the sums stay float32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        window = torch.cat([state.to(acc), x.to(acc)], 1).mT  # [B, C, K - 1 + T]
        return F.conv1d(window, weight.to(acc)[:, None], None if bias is None else bias.to(acc), groups=x.shape[2])


def _torch_backward(x, weight, bias, state, dy):
    K = weight.shape[1]
    p = _torch_conv(x, weight, bias, state)
    s = torch.sigmoid(p)
    dp = dy.mT.to(p.dtype) * s * (1 + p * (1 - s))  # [B, C, T]
    with torch.autocast(x.device.type, enabled=False):
        dwindow = F.conv1d(F.pad(dp, (K - 1, K - 1)), weight.to(p.dtype).flip(-1)[:, None], groups=x.shape[2]).mT
    window = torch.cat([state.to(p.dtype), x.to(p.dtype)], 1).mT.unfold(-1, K, 1)  # [B, C, T, K]: p_t's inputs
    dw = (window * dp[..., None]).sum((0, 2))
    dstate = dwindow[:, :K - 1].clone(memory_format=torch.contiguous_format)  # no alias of dx
    return dwindow[:, K - 1:].contiguous(), dw, dp.sum((0, 2)), dstate


# ---------------------------------------------------------------------------------------------------------------
# Triton engine

def _triton(x, weight, bias, state, dy=None):
    """The forward (dy None): y; or the backward: (dx, dw, dbias, dstate)."""
    (Bsz, T, C), K = x.shape, weight.shape[1]
    # 32 steps by 128 channels: of eight tiles timed on an H100, the fastest forward at Mamba-2's shape, within 5% of
    # the fastest at DeltaNet's and Mamba's
    BT, BC = (16, 16) if INTERPRET else (32, 128)
    weight, state = weight.contiguous(), state.contiguous()
    args = (x, weight, weight if bias is None else bias, state)
    meta = dict(K=K, HAS_BIAS=bias is not None, BT=BT, BC=BC, num_warps=4)
    grid = (Bsz * triton.cdiv(T, BT), triton.cdiv(C, BC))
    if dy is None:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _pointwise_kernel[grid](*args, y, y, T, C, *x.stride(), GRAD=False, **meta)
        return y
    dp = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _pointwise_kernel[grid](*args, dy.contiguous(), dp, T, C, *x.stride(), GRAD=True, **meta)
    n_tiles = triton.cdiv(T + K - 1, BT)  # over u = -K+1 .. T-1: the state's rows and x's
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dstate = torch.empty(state.shape, dtype=torch.float32, device=x.device)
    partial = torch.empty(Bsz * n_tiles, K + 1, C, dtype=torch.float32, device=x.device)  # dw's K rows, dbias
    _backward_kernel[(Bsz * n_tiles, grid[1])](*args, dp, dx, dstate, partial, T, C, *x.stride(), n_tiles,
                                               KP=triton.next_power_of_2(K + 1), **meta)
    sums = partial.sum(0)
    return dx, sums[:K].T.contiguous(), sums[K].clone(), dstate  # no aliases


if triton is not None:
    @triton.jit
    def _tap(X, STATE, b, t, cols, first, T, C, sxb, sxt, sxc, K: tl.constexpr):
        """x at steps t [BT] of channels cols, float32 [BT, BC], 0 past T; where t < 0 (in a tile that starts before
        step K - 1: first) the state's row K - 1 + t."""
        ok = cols[None, :] < C
        x = tl.load(X + b * sxb + t[:, None] * sxt + cols[None, :] * sxc, mask=ok & ((t >= 0) & (t < T))[:, None],
                    other=0.0).to(tl.float32)
        if first:
            x += tl.load(STATE + (b * (K - 1) + K - 1 + t[:, None]) * C + cols[None, :],
                         mask=ok & ((t < 0) & (t >= 1 - K))[:, None], other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _pointwise_kernel(X, W, BIAS, STATE, DY, OUT, T, C, sxb, sxt, sxc, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          GRAD: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """p_t = bias + sum_k w_k x_{t-K+1+k}, then OUT = silu(p), or with GRAD dp = dy silu'(p)."""
        n_tiles = tl.cdiv(T, BT)
        b, tile = tl.program_id(0).to(tl.int64) // n_tiles, tl.program_id(0) % n_tiles
        t = tile * BT + tl.arange(0, BT).to(tl.int64)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        ok = cols < C
        p = tl.zeros([BT, BC], dtype=tl.float32)
        if HAS_BIAS:
            p += tl.load(BIAS + cols, mask=ok, other=0.0).to(tl.float32)[None, :]
        for k in tl.static_range(K):
            w = tl.load(W + cols * K + k, mask=ok, other=0.0).to(tl.float32)
            p += w[None, :] * _tap(X, STATE, b, t - (K - 1) + k, cols, tile * BT < K - 1, T, C, sxb, sxt, sxc, K)
        s = tl.sigmoid(p)
        at = (b * T + t[:, None]) * C + cols[None, :]
        mask = (t < T)[:, None] & ok[None, :]
        if GRAD:
            out = tl.load(DY + at, mask=mask, other=0.0).to(tl.float32) * s * (1 + p * (1 - s))
        else:
            out = p * s
        tl.store(OUT + at, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(X, W, BIAS, STATE, DP, DX, DSTATE, PARTIAL, T, C, sxb, sxt, sxc, n_tiles, K: tl.constexpr,
                         KP: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """dx_u = sum_m w_{K-1-m} dp_{u+m} for u in this tile (the state's rows for u < 0), and this tile's sums of
        dw_{K-1-m} = sum_u dp_{u+m} x_u (rows K-1-m) and dbias = sum_u dp_u (row K) into PARTIAL."""
        b, tile = tl.program_id(0).to(tl.int64) // n_tiles, tl.program_id(0) % n_tiles
        u = tile * BT - (K - 1) + tl.arange(0, BT).to(tl.int64)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        ok = cols < C
        x = _tap(X, STATE, b, u, cols, tile * BT < K - 1, T, C, sxb, sxt, sxc, K)
        dx = tl.zeros([BT, BC], dtype=tl.float32)
        rows = tl.arange(0, KP)
        sums = tl.zeros([KP, BC], dtype=tl.float32)
        for m in tl.static_range(K):
            t = u + m
            dp = tl.load(DP + (b * T + t[:, None]) * C + cols[None, :],
                         mask=((t >= 0) & (t < T))[:, None] & ok[None, :], other=0.0)
            dx += tl.load(W + cols * K + K - 1 - m, mask=ok, other=0.0).to(tl.float32)[None, :] * dp
            sums += tl.where(rows[:, None] == K - 1 - m, tl.sum(dp * x, 0)[None, :], 0.0)
            if m == 0:
                sums += tl.where(rows[:, None] == K, tl.sum(dp, 0)[None, :], 0.0)
        tl.store(PARTIAL + (tl.program_id(0) * (K + 1) + rows[:, None]) * C + cols[None, :], sums,
                 mask=(rows < K + 1)[:, None] & ok[None, :])
        mask = ok[None, :] & (u < T)[:, None]
        tl.store(DX + (b * T + u[:, None]) * C + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask & (u >= 0)[:, None])
        tl.store(DSTATE + (b * (K - 1) + K - 1 + u[:, None]) * C + cols[None, :], dx, mask=mask & (u < 0)[:, None])
