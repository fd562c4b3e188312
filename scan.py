"""The one linear recurrence every model in the zoo reduces to, solved in parallel over time.

    h_t = a_t * h_{t-1} + b_t        (reverse=True: h_t = a_t * h_{t+1} + b_t)

`scan(a, b, h0=None, reverse=False)` takes b: [B, T, *], a broadcastable to b (a per-head gate
[B, T, H, 1] against a state [B, T, H, N] is read with stride 0, never expanded in memory),
h0: [B, *] or None (zeros). It returns h with b's shape and dtype; h[:, -1] is the final state
(h[:, 0] when reverse). Sums are accumulated in float32 (float64 stays float64).
`block_scan(a, b, h0=None, reverse=False)` is the same recurrence with a 2 x 2 matrix per channel,
h_t = a_t @ h_{t-1} + b_t: a [B, T, 2, 2, *], b [B, T, 2, *], h0 [B, 2, *] (the LSTM's Newton step).
The scan is associative (Blelloch 1990): the pairs (a, b) compose as
    (a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2),
so T steps take log-depth work. Its gradient is the same recurrence run the other way
(the adjoint of h_t = a_t h_{t-1} + b_t, with a^T for blocks):
    g_t = dL/dh_t + a_{t+1}^T g_{t+1},   dL/db_t = g_t,   dL/da_t = g_t h_{t-1}^T,   dL/dh0 = a_0^T g_0.

Forward and backward are custom ops (torch.library: zoo::scan, zoo::scan_backward) with fake
implementations, so torch.compile and CUDA graphs see one opaque op with known output shapes, and
the kernel always runs on the tensors it is given, with strides read at run time (a raw Triton
launch that Dynamo traced once got a broadcast `a` re-laid-out by Inductor, and read the wrong
elements). Two engines
behind them: a Triton kernel on CUDA (or on the CPU under TRITON_INTERPRET=1), and PyTorch
log-depth doubling for everything else (CPU, MPS, float64, machines without Triton).
"""
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, Windows: the PyTorch engine serves
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def scan(a, b, h0=None, reverse=False):
    """h_t = a_t * h_{t-1} + b_t along dim 1. a: broadcastable to b [B, T, *]; h0: [B, *] or None."""
    _check(a, b, h0, b.shape[:1] + b.shape[2:])
    if a.dim() > b.dim() or any(n not in (1, m) for n, m in zip(reversed(a.shape), reversed(b.shape))):
        raise ValueError(f"scan: a {tuple(a.shape)} does not broadcast to b {tuple(b.shape)}")
    return _apply(a.reshape((1,) * (b.dim() - a.dim()) + a.shape), b, h0, reverse, False)


def block_scan(a, b, h0=None, reverse=False):
    """h_t = a_t @ h_{t-1} + b_t along dim 1, a 2 x 2 block per channel: a [B, T, 2, 2, *], b [B, T, 2, *]."""
    _check(a, b, h0, b.shape[:1] + b.shape[2:])
    if b.dim() < 3 or b.shape[2] != 2 or a.shape != b.shape[:2] + (2,) + b.shape[2:]:
        raise ValueError(f"block_scan: needs b [B, T, 2, *] and a [B, T, 2, 2, *], got {tuple(b.shape)}, {tuple(a.shape)}")
    return _apply(a, b, h0, reverse, True)


def _check(a, b, h0, h0_shape):
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is not None and not (torch.is_tensor(x) and x.is_floating_point()):
            raise ValueError(f"scan: {name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if b.dim() < 2 or b.shape[1] == 0:
        raise ValueError(f"scan: b must be [B, T, *] with T > 0, got shape {tuple(b.shape)}")
    if h0 is not None and (h0.shape != h0_shape or h0.device != b.device):
        raise ValueError(f"scan: h0 must be [B, *] = {tuple(h0_shape)} on {b.device}, got {tuple(h0.shape)} on {h0.device}")
    if a.device != b.device:
        raise ValueError(f"scan: a and b must be on one device, got {a.device} and {b.device}")


# ---------------------------------------------------------------------------------------------
# Forward and backward are plain functions, registered as the custom ops zoo::scan and
# zoo::scan_backward, which torch.compile sees. In eager mode an autograd.Function calls the same
# two functions directly: the custom op's Python dispatch costs more than a kernel launch
# (measured ~35 us a call without grad, ~85 with). a has b's rank (broadcast dims of size 1), or
# b's shape with the block's 2 inserted for block=True. The outputs are new contiguous tensors.

def _eager(*tensors):
    """Plain tensors outside torch.compile: not Dynamo's fake tensors, nor the functional ones
    AOTAutograd traces a backward formula with (there torch.compiler.is_compiling() is False)."""
    return not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors if t is not None)


def _apply(a, b, h0, reverse, block):
    if not _eager(a, b, h0):
        return _scan_op(a, b, h0, reverse, block)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or h0 is not None and h0.requires_grad):
        return _EagerScan.apply(a, b, h0, reverse, block)
    return _forward(a, b, h0, reverse, block)


def _forward(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor], reverse: bool, block: bool) -> torch.Tensor:
    if _use_triton(b):
        return _triton_scan(a, b, h0, reverse, block)
    return _torch_scan(a, b, h0, reverse, block).to(b.dtype)


def _da_dtype(a, b):
    return a.dtype if a.numel() >= b.numel() else torch.promote_types(a.dtype, torch.float32)  # summed over broadcast


def _backward(a: torch.Tensor, h: torch.Tensor, h0: Optional[torch.Tensor], dh: torch.Tensor, reverse: bool,
              block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(g = dL/db, dL/da unreduced: b's shape, [B, T, 2, 2, *] for blocks)."""
    if _use_triton(h):
        return _triton_scan(a, dh, None, not reverse, block, h_for_da=h, h0_for_da=h0)
    g = _torch_scan(_shift(a, h.shape[1], later=not reverse, fill=0.0, block=block), dh, None, not reverse, block)
    h_prev = _shift(h, h.shape[1], later=reverse, fill=h0)
    da = g[:, :, :, None] * h_prev[:, :, None, :] if block else g * h_prev
    return g.to(dh.dtype), da.to(_da_dtype(a, h))


def _grads(ctx, dh, backward):
    a, h, h0 = ctx.saved_tensors
    g, da = backward(a, h, h0, dh, ctx.reverse, ctx.block)
    dh0 = None
    if h0 is not None:
        a0, g0 = a[:, -1 if ctx.reverse else 0], g[:, -1 if ctx.reverse else 0]  # the step that read h0
        dh0 = ((a0 * g0[:, :, None]).sum(1) if ctx.block else a0 * g0).to(h0.dtype)  # a_0^T g_0
    return da.sum_to_size(a.shape).to(a.dtype), g, dh0, None, None


def _setup(ctx, inputs, output):
    a, _, h0, ctx.reverse, ctx.block = inputs
    ctx.save_for_backward(a, output, h0)


_scan_op = torch.library.custom_op("zoo::scan", _forward, mutates_args=())
_scan_backward_op = torch.library.custom_op("zoo::scan_backward", _backward, mutates_args=())
_scan_op.register_fake(lambda a, b, h0, reverse, block: b.new_empty(b.shape))
_scan_backward_op.register_fake(lambda a, h, h0, dh, reverse, block: (
    dh.new_empty(dh.shape), h.new_empty(a.shape if block else h.shape, dtype=_da_dtype(a, h))))
_scan_op.register_autograd(lambda ctx, dh: _grads(ctx, dh, _scan_backward_op), setup_context=_setup)


class _EagerScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse, block):
        h = _forward(a, b, h0, reverse, block)
        _setup(ctx, (a, b, h0, reverse, block), h)
        return h

    @staticmethod
    def backward(ctx, dh):
        return _grads(ctx, dh, _backward)


# ---------------------------------------------------------------------------------------------
# PyTorch engine

def _shift(x, T, later, fill, block=False):
    """x_{t+1} (later=True) or x_{t-1} along time, the missing end from fill (a number or [B, *]);
    block: a's 2 x 2 blocks transposed (the adjoint reads a_{t+1}^T)."""
    x = x.expand(x.shape[0], T, *x.shape[2:])
    if block:
        x = x.transpose(2, 3)
    if isinstance(fill, (int, float)) or fill is None:
        edge = torch.full_like(x[:, :1], fill or 0.0)
    else:
        edge = fill.unsqueeze(1).to(x.dtype)
    return torch.cat([x[:, 1:], edge], 1) if later else torch.cat([edge, x[:, :-1]], 1)


def _torch_scan(a, b, h0, reverse, block=False):
    """Hillis-Steele doubling: ceil(log2 T) vectorised passes, no loop over time steps."""
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    if reverse:
        a, b = a.flip(1), b.flip(1)
    T = b.shape[1]
    A = a.to(acc).expand(a.shape[0], T, *a.shape[2:]).clone()  # broadcast dims stay broadcast
    h = b.to(acc).clone(memory_format=torch.contiguous_format)  # the fake op promises contiguous
    if h0 is not None:
        h[:, 0] += (A[:, 0] * h0.to(acc)[:, None]).sum(2) if block else A[:, 0] * h0.to(acc)
    d = 1
    while d < T:  # later (A2, h2) after earlier (A1, h1): (A2 A1, A2 h1 + h2)
        if block:  # by columns: no [.., 2, 2, 2, *] temporaries
            P, Q = A[:, d:], A[:, :-d]
            h[:, d:] = P[:, :, :, 0] * h[:, :-d, :1] + P[:, :, :, 1] * h[:, :-d, 1:] + h[:, d:]
            A[:, d:] = P[:, :, :, :1] * Q[:, :, None, 0] + P[:, :, :, 1:] * Q[:, :, None, 1]
        else:
            h[:, d:] = A[:, d:] * h[:, :-d] + h[:, d:]
            A[:, d:] = A[:, d:] * A[:, :-d]
        d *= 2
    return h.flip(1) if reverse else h


def _use_triton(x):
    return triton is not None and x.dtype != torch.float64 and (x.is_cuda or (_INTERPRET and x.device.type == "cpu"))


# ---------------------------------------------------------------------------------------------
# Triton engine: one pass, one launch. b is viewed as [B, T, C] ([B, T, 2, C] for blocks) and cut
# into tiles of BLOCK_T time steps by BLOCK_C channels. A tile is scanned in registers, then needs
# the state its predecessor ended in. Two ways to get it (the kernel's LOOP switch):
# - loop: with many channel groups (B * C / BLOCK_C at least LOOP_GROUPS_PER_SM per multiprocessor),
#   one program per group walks its tiles in order, the carry in registers.
# - look-back: otherwise (a long sequence with few channels), one program per tile, so it still
#   fills the GPU, chained by the decoupled look-back of Merrill & Garland (2016, "Single-pass
#   parallel prefix scan with decoupled look-back"). Each tile publishes its own (prod a, local h)
#   as soon as it has them and its inclusive h once it knows its carry; a tile walks back over
#   predecessors' local pairs until it meets an inclusive one (_look_back). A tile's values are
#   written before its flag (a barrier, then a release store of the flag by one thread); a reader
#   acquires the flag first, so the decisions are uniform over the program and the values it then
#   reads are complete. Tiles take a ticket from an atomic counter, so every tile they wait on has
#   started.
# Either way every element of a, b and h crosses memory once. The 2 x 2 blocks (BLOCK2) carry four
# transition and two state components where the diagonal scan carries one of each.

def _triton_scan(a, b, h0, reverse, block, h_for_da=None, h0_for_da=None):
    """The forward, or with h_for_da the adjoint: a read one step later in scan order (transposed for
    blocks), and da_t = g_t h_{t-1}^T from h_for_da (h0_for_da at the edge) returned beside g."""
    B, T = b.shape[:2]
    da_dtype = _da_dtype(a, b)
    S = 2 if block else 1  # state components per channel
    C = b[0, 0].numel() // S
    b3 = b.contiguous()
    if block:
        a = a.contiguous()
        a_strides = (a.stride(0), a.stride(1), C, 0, 1)
    else:
        a, a_strides = _channel_strides(a, b.shape)
    block_t, block_c, warps = _plan(C, b.element_size(), block)
    n_cblocks, n_tiles = -(-C // block_c), -(-T // block_t)
    # measured: the forward of many channel groups runs faster as loops, the backward (three loads
    # per element) faster with every tile its own program
    loop = h_for_da is None and B * n_cblocks >= _loop_groups(b.device, LOOP_GROUPS_PER_SM)
    h = torch.empty_like(b3)
    da = h if h_for_da is None else torch.empty(B, T, S * S * C, device=b.device, dtype=da_dtype)
    hs = b3 if h_for_da is None else h_for_da.contiguous()
    h0 = h0_for_da if h_for_da is not None else h0  # the backward's h0 only enters da
    if loop:  # no bookkeeping: any tensor stands in for the flags and carries
        flags = carries = h
    else:  # per tile: carries (prod a, local h, inclusive h), then flags 0/1/2, and the ticket
        tiles = B * n_cblocks * n_tiles
        n_carry = tiles * (S * S + 2 * S) * block_c
        work = torch.zeros(n_carry + tiles + 1, device=b.device, dtype=torch.int32)
        carries, flags = work[:n_carry].view(torch.float32), work[n_carry:]
    grid = (B * n_cblocks if loop else B * n_cblocks * n_tiles,)
    _scan_kernel[grid](a, b3, h, hs, b3 if h0 is None else h0.contiguous(), da, flags, carries,
                       T, C, n_cblocks, n_tiles, *a_strides, REVERSE=reverse, SHIFT_A=h_for_da is not None,
                       WRITE_DA=h_for_da is not None, HAS_H0=h0 is not None, LOOP=loop, BLOCK2=block,
                       BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    h = h.view(b.shape)
    return h if h_for_da is None else (h, da.view(a.shape if block else b.shape))


def _channel_strides(a, shape):
    """a's strides over [B, T, C]: the trailing dims of the broadcast view merged into at most two
    (outer, inner) groups, so channel c sits at (c // C_in) * s_outer + (c % C_in) * s_inner."""
    view = a.expand(shape)
    dims = [(n, s) for n, s in zip(shape[2:], view.stride()[2:]) if n > 1]
    merged = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 2:  # an unusual interleaving of broadcast dims: pay for one copy of a
        view = view.contiguous()
        merged = [(view[0, 0].numel(), 1)]
    (_, s_outer), (c_in, s_inner) = ([(1, 0)] * (2 - len(merged)) + merged)[-2:]
    return view, (view.stride(0), view.stride(1), c_in, s_outer, s_inner)


def _plan(C, itemsize, block):
    """Tile rows, channels and warps, measured on an H100: 64 channels (rows of 256 bytes in
    float32, 128 in bf16), 64 x 64 tiles on 4 warps in float32, 32 x 64 on 2 in 16 bits; blocks,
    with three times the registers per element, 32 x 64 on 4."""
    if _INTERPRET:  # the interpreter pays per tile element
        return 16, min(8, _next_power_of_2(C)), 1
    wide = itemsize >= 4
    return (32 if block or not wide else 64), min(64, _next_power_of_2(C)), (4 if wide or block else 2)


def _next_power_of_2(n):
    return 1 << (n - 1).bit_length()


LOOP_GROUPS_PER_SM = 4  # measured on an H100


def _loop_groups(device, per_sm):
    """From this many channel groups (B * C / BLOCK_C) on, one program per group, walking its
    tiles in order with the carry in registers, fills the GPU, and no look-back is needed."""
    if device.type != "cuda":
        return per_sm
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return per_sm * _SMS[device]


_SMS = {}


if triton is not None:
    @triton.jit
    def _combine(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _combine2(p1, q1, r1, s1, x1, y1, p2, q2, r2, s2, x2, y2):
        """(A1, b1) then (A2, b2) = (A2 A1, A2 b1 + b2) for A = [[p, q], [r, s]], b = [x, y]."""
        return (p2 * p1 + q2 * r1, p2 * q1 + q2 * s1, r2 * p1 + s2 * r1, r2 * q1 + s2 * s1,
                p2 * x1 + q2 * y1 + x2, r2 * x1 + s2 * y1 + y2)

    @triton.jit
    def _last(x, rows, edge):
        """The row of a [BLOCK_T, BLOCK_C] tile that holds the tile's last state in scan order."""
        return tl.sum(tl.where(rows[:, None] == edge, x, 0.0), 0)

    @triton.jit
    def _look_back(CARRIES, FLAGS, first, j, lanes, BLOCK2: tl.constexpr, BLOCK_C: tl.constexpr):
        """The state entering tile j + 1 of a group whose tile 0 has index first: walk back from
        tile j over published local pairs (flag 1), composing them, to the first inclusive state
        (flag 2), waiting where a predecessor has published nothing yet (flag 0)."""
        n_carry: tl.constexpr = 8 if BLOCK2 else 3  # (p, q, r, s, x, y, inclusive x, y) or (a, h, inclusive h)
        one = tl.full([BLOCK_C], 1.0, tl.float32)
        zero = tl.zeros([BLOCK_C], dtype=tl.float32)
        # the tiles after j (up to the reader) composed: h -> [[p, q], [r, s]] h + [x, y] (blocks), a h + x
        p, q, r, s, x, y = one, zero, zero, one, zero, zero
        cx, cy = zero, zero
        while j >= 0:
            prev = CARRIES + (first + j) * n_carry * BLOCK_C + lanes
            status = tl.atomic_add(FLAGS + first + j, 0, sem="acquire")
            if status == 2:  # its inclusive state: done
                ix = tl.load(prev + (n_carry - 2 if BLOCK2 else 2) * BLOCK_C, volatile=True)
                if BLOCK2:
                    iy = tl.load(prev + 7 * BLOCK_C, volatile=True)
                    cx, cy = p * ix + q * iy + x, r * ix + s * iy + y
                else:
                    cx = p * ix + x
                j = -1
            elif status == 1:  # its local pair: compose, go on
                if BLOCK2:
                    p2, q2, r2, s2, x2, y2 = _combine2(
                        tl.load(prev, volatile=True), tl.load(prev + BLOCK_C, volatile=True),
                        tl.load(prev + 2 * BLOCK_C, volatile=True), tl.load(prev + 3 * BLOCK_C, volatile=True),
                        tl.load(prev + 4 * BLOCK_C, volatile=True), tl.load(prev + 5 * BLOCK_C, volatile=True),
                        p, q, r, s, x, y)
                    p, q, r, s, x, y = p2, q2, r2, s2, x2, y2
                else:
                    x = p * tl.load(prev + BLOCK_C, volatile=True) + x
                    p = p * tl.load(prev, volatile=True)
                j -= 1
        return cx, cy

    @triton.jit
    def _scan_kernel(A, Bx, H, HS, H0, DA, FLAGS, CARRIES, T, C, n_cblocks, n_tiles, sa_b, sa_t, C_in, sa_o, sa_i,
                     REVERSE: tl.constexpr, SHIFT_A: tl.constexpr, WRITE_DA: tl.constexpr, HAS_H0: tl.constexpr,
                     LOOP: tl.constexpr, BLOCK2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        S: tl.constexpr = 2 if BLOCK2 else 1  # state components per channel, C apart in memory
        n_carry: tl.constexpr = 8 if BLOCK2 else 3
        step: tl.constexpr = -1 if REVERSE else 1
        edge: tl.constexpr = 0 if REVERSE else BLOCK_T - 1
        lanes = tl.arange(0, BLOCK_C)
        rows = tl.arange(0, BLOCK_T)
        if LOOP:  # enough channel groups to fill the GPU: one program walks its group's tiles in order
            group = tl.program_id(0).to(tl.int64)
            n_orders = n_tiles
        else:
            ticket = tl.atomic_add(FLAGS + tl.num_programs(0), 1)  # dispatch order, not launch order
            n_groups = tl.num_programs(0) // n_tiles
            order = ticket // n_groups  # position of the tile in scan order; all groups' tiles at
            group = (ticket % n_groups).to(tl.int64)  # one position first, so predecessors are done
            n_orders = 1
        pid_b, pid_c = group // n_cblocks, group % n_cblocks
        cols = pid_c * BLOCK_C + lanes
        col_ok = cols < C
        a_cols = (cols // C_in) * sa_o + (cols % C_in) * sa_i
        cx = tl.zeros([BLOCK_C], dtype=tl.float32)  # the carry: the state entering the tile
        cy = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_H0 and not WRITE_DA:  # the backward's h0 only enters da
            cx = tl.load(H0 + pid_b * S * C + cols, mask=col_ok, other=0.0).to(tl.float32)
            if BLOCK2:
                cy = tl.load(H0 + pid_b * S * C + C + cols, mask=col_ok, other=0.0).to(tl.float32)
        for i in range(n_orders):
            if LOOP:
                order = i
            tile = n_tiles - 1 - order if REVERSE else order
            # ---- load the tile: transitions of the adjoint read one step later, blocks transposed
            t = tile * BLOCK_T + rows
            mask = (t < T)[:, None] & col_ok[None, :]
            t_a = t - step * SHIFT_A
            a_ok = mask & ((t_a >= 0) & (t_a < T))[:, None]
            a_offs = pid_b * sa_b + t_a[:, None] * sa_t + a_cols[None, :]
            offs = (pid_b * T + t[:, None]) * S * C + cols[None, :]
            # padding and the adjoint's missing a_T are the identity (a = 1, b = 0)
            ap = tl.where(a_ok, tl.load(A + a_offs, mask=a_ok, other=0.0).to(tl.float32), 1.0)
            bx = tl.load(Bx + offs, mask=mask, other=0.0).to(tl.float32)
            if BLOCK2:
                aq = tl.load(A + a_offs + (2 if SHIFT_A else 1) * C, mask=a_ok, other=0.0).to(tl.float32)
                ar = tl.load(A + a_offs + (1 if SHIFT_A else 2) * C, mask=a_ok, other=0.0).to(tl.float32)
                as_ = tl.where(a_ok, tl.load(A + a_offs + 3 * C, mask=a_ok, other=0.0).to(tl.float32), 1.0)
                by = tl.load(Bx + offs + C, mask=mask, other=0.0).to(tl.float32)
                p, q, r, s, x, y = tl.associative_scan((ap, aq, ar, as_, bx, by), 0, _combine2, reverse=REVERSE)
            else:
                p, x = tl.associative_scan((ap, bx), 0, _combine, reverse=REVERSE)
            # ---- the carry: h0 or the loop's for the first tile, else look back over the predecessors
            if not LOOP:
                me = group * n_tiles + order
                if order > 0:
                    mine = CARRIES + me * n_carry * BLOCK_C + lanes
                    tl.store(mine, _last(p, rows, edge))
                    if BLOCK2:
                        tl.store(mine + BLOCK_C, _last(q, rows, edge))
                        tl.store(mine + 2 * BLOCK_C, _last(r, rows, edge))
                        tl.store(mine + 3 * BLOCK_C, _last(s, rows, edge))
                        tl.store(mine + 4 * BLOCK_C, _last(x, rows, edge))
                        tl.store(mine + 5 * BLOCK_C, _last(y, rows, edge))
                    else:
                        tl.store(mine + BLOCK_C, _last(x, rows, edge))
                    tl.debug_barrier()
                    tl.atomic_xchg(FLAGS + me, 1, sem="release")
                    cx, cy = _look_back(CARRIES, FLAGS, group * n_tiles, order - 1, lanes, BLOCK2, BLOCK_C)
            # ---- the states: the tile's own prefix applied to the carry
            if BLOCK2:
                hx = p * cx[None, :] + q * cy[None, :] + x
                hy = r * cx[None, :] + s * cy[None, :] + y
                cx, cy = _last(hx, rows, edge), _last(hy, rows, edge)
            else:
                hx = p * cx[None, :] + x
                cx = _last(hx, rows, edge)
            if not LOOP:
                tl.store(CARRIES + me * n_carry * BLOCK_C + (n_carry - S) * BLOCK_C + lanes, cx)
                if BLOCK2:
                    tl.store(CARRIES + me * n_carry * BLOCK_C + 7 * BLOCK_C + lanes, cy)
                tl.debug_barrier()
                tl.atomic_xchg(FLAGS + me, 2, sem="release")
            tl.store(H + offs, hx.to(H.dtype.element_ty), mask=mask)
            if BLOCK2:
                tl.store(H + offs + C, hy.to(H.dtype.element_ty), mask=mask)
            if WRITE_DA:  # da_t = g_t h_{t-1}^T, h_{t-1} read one step earlier in the forward order
                t_p = t + step
                p_ok = (t_p >= 0) & (t_p < T)
                prev = (pid_b * T + t_p[:, None]) * S * C + cols[None, :]
                hp = tl.load(HS + prev, mask=mask & p_ok[:, None], other=0.0).to(tl.float32)
                if HAS_H0:
                    hp = tl.where(p_ok[:, None], hp, tl.load(H0 + pid_b * S * C + cols, mask=col_ok, other=0.0)
                                  .to(tl.float32)[None, :])
                if BLOCK2:
                    hq = tl.load(HS + prev + C, mask=mask & p_ok[:, None], other=0.0).to(tl.float32)
                    if HAS_H0:
                        hq = tl.where(p_ok[:, None], hq, tl.load(H0 + pid_b * S * C + C + cols, mask=col_ok,
                                                                 other=0.0).to(tl.float32)[None, :])
                    da = (pid_b * T + t[:, None]) * 4 * C + cols[None, :]
                    tl.store(DA + da, (hx * hp).to(DA.dtype.element_ty), mask=mask)
                    tl.store(DA + da + C, (hx * hq).to(DA.dtype.element_ty), mask=mask)
                    tl.store(DA + da + 2 * C, (hy * hp).to(DA.dtype.element_ty), mask=mask)
                    tl.store(DA + da + 3 * C, (hy * hq).to(DA.dtype.element_ty), mask=mask)
                else:
                    tl.store(DA + offs, (hx * hp).to(DA.dtype.element_ty), mask=mask)
