"""The one linear recurrence every model in the zoo reduces to, solved in parallel over time.

    h_t = a_t * h_{t-1} + b_t        (reverse=True: h_t = a_t * h_{t+1} + b_t)

`scan(a, b, h0=None, reverse=False)`: b [B, T, *]; a broadcastable to b (a per-head decay [B, T, H, 1, 1] against
states [B, T, H, Dv, Dk] is read with stride 0, never expanded); h0 [B, *] or None (zeros). Returns h with b's shape
and dtype, summed in float32 (float64 stays); h[:, -1] is the final state (h[:, 0] when reverse).
`block_scan(a, b, h0=None, reverse=False)`: a 2 x 2 matrix per channel, h_t = a_t @ h_{t-1} + b_t, a [B, T, 2, 2, *],
b [B, T, 2, *], h0 [B, 2, *] (the LSTM's Newton step).

The pairs (a, b) compose associatively (Blelloch 1990), (a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2), so T steps take
log-depth work. The gradient is the same recurrence run the other way (the adjoint):
    g_t = dL/dh_t + a_{t+1}^T g_{t+1},   dL/db_t = g_t,   dL/da_t = g_t h_{t-1}^T,   dL/dh0 = a_0^T g_0.

Engines: a Triton kernel on CUDA (and on the CPU under TRITON_INTERPRET=1); PyTorch log-depth doubling elsewhere (CPU,
MPS, float64). Forward and backward are custom ops (zoo::scan, zoo::scan_backward) with fakes for torch.compile and
CUDA graphs; eager calls reach the same two functions through an autograd.Function (the op's dispatch costs more than
a launch). `register` builds both for any scan-like entry point (selective_scan.py and causal_conv.py use it too).
"""
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, Windows: the PyTorch engine serves
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def scan(a, b, h0=None, reverse=False):
    """h_t = a_t * h_{t-1} + b_t along dim 1. a: broadcastable to b [B, T, *]; h0: [B, *] or None."""
    _check(a, b, h0)
    if a.dim() > b.dim() or any(n not in (1, m) for n, m in zip(reversed(a.shape), reversed(b.shape))):
        raise ValueError(f"scan: a {tuple(a.shape)} does not broadcast to b {tuple(b.shape)}")
    return _scan(a.reshape((1,) * (b.dim() - a.dim()) + a.shape), b, h0, reverse, False)


def block_scan(a, b, h0=None, reverse=False):
    """h_t = a_t @ h_{t-1} + b_t along dim 1, a 2 x 2 block per channel: a [B, T, 2, 2, *], b [B, T, 2, *]."""
    _check(a, b, h0)
    if b.dim() < 3 or b.shape[2] != 2 or a.shape != b.shape[:2] + (2,) + b.shape[2:]:
        raise ValueError(f"block_scan: needs b [B, T, 2, *] and a [B, T, 2, 2, *], got {tuple(b.shape)}, {tuple(a.shape)}")
    return _scan(a, b, h0, reverse, True)


def _check(a, b, h0):
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is not None and not (torch.is_tensor(x) and x.is_floating_point()):
            raise ValueError(f"scan: {name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if b.dim() < 2 or b.shape[1] == 0:
        raise ValueError(f"scan: b must be [B, T, *] with T > 0, got shape {tuple(b.shape)}")
    h0_shape = b.shape[:1] + b.shape[2:]
    if h0 is not None and (h0.shape != h0_shape or h0.device != b.device):
        raise ValueError(f"scan: h0 must be [B, *] = {tuple(h0_shape)} on {b.device}, got {tuple(h0.shape)} on {h0.device}")
    if a.device != b.device:
        raise ValueError(f"scan: a and b must be on one device, got {a.device} and {b.device}")


def register(name, forward, backward, forward_fake, backward_fake, setup, grads):
    """The custom ops zoo::<name> and zoo::<name>_backward (what torch.compile sees) and an eager autograd.Function
    over the same two functions. setup(ctx, inputs, output) saves what the backward needs; grads(ctx, backward,
    *output_grads) returns the inputs' gradients. Returns the function that picks one of the three paths."""
    op = torch.library.custom_op(f"zoo::{name}", forward, mutates_args=())
    backward_op = torch.library.custom_op(f"zoo::{name}_backward", backward, mutates_args=())
    op.register_fake(forward_fake)
    backward_op.register_fake(backward_fake)
    op.register_autograd(lambda ctx, *grad: grads(ctx, backward_op, *grad), setup_context=setup)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grad):
            return grads(ctx, backward, *grad)

    def apply(*inputs):
        tensors = [t for t in inputs if torch.is_tensor(t)]
        # Dynamo's fake tensors and the functional tensors AOTAutograd traces a backward with take the op
        if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors):
            return op(*inputs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return Eager.apply(*inputs)
        return forward(*inputs)
    return apply


# ---------------------------------------------------------------------------------------------------------------
# Forward and backward. a has b's rank (broadcast dims of size 1), or b's shape with the block's 2 inserted.

def _forward(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor], reverse: bool, block: bool) -> torch.Tensor:
    if use_triton(b):
        return _triton_scan(a, b, h0, reverse, block)
    return torch_scan(a, b, h0, reverse, block).to(b.dtype)


def _backward(a: torch.Tensor, h: torch.Tensor, h0: Optional[torch.Tensor], dh: torch.Tensor, reverse: bool,
              block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(g = dL/db in dh's dtype, dL/da in a's shape and dtype)."""
    if use_triton(h):
        return _triton_scan(a, dh, None, not reverse, block, h_for_da=h, h0_for_da=h0)
    g = torch_scan(shift(a, h.shape[1], later=not reverse, fill=0.0, block=block), dh, None, not reverse, block)
    h_prev = shift(h, h.shape[1], later=reverse, fill=h0)
    da = g[:, :, :, None] * h_prev[:, :, None, :] if block else g * h_prev
    return g.to(dh.dtype), da.sum_to_size(a.shape).to(a.dtype)


def _grads(ctx, backward, dh):
    a, h, h0 = ctx.saved_tensors
    g, da = backward(a, h, h0, dh, ctx.reverse, ctx.block)
    dh0 = None
    if h0 is not None:
        a0, g0 = a[:, -1 if ctx.reverse else 0], g[:, -1 if ctx.reverse else 0]  # the step that read h0
        dh0 = ((a0 * g0[:, :, None]).sum(1) if ctx.block else a0 * g0).to(h0.dtype)  # a_0^T g_0
    return da, g, dh0, None, None


def _setup(ctx, inputs, output):
    a, _, h0, ctx.reverse, ctx.block = inputs
    ctx.save_for_backward(a, output, h0)


_scan = register("scan", _forward, _backward, lambda a, b, h0, reverse, block: b.new_empty(b.shape),
                 lambda a, h, h0, dh, reverse, block: (dh.new_empty(dh.shape), a.new_empty(a.shape)), _setup, _grads)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch engine

def shift(x, T, later, fill, block=False):
    """x_{t+1} (later=True) or x_{t-1} along time, the missing end from fill (a number or [B, *]);
    block: a's 2 x 2 blocks transposed (the adjoint reads a_{t+1}^T)."""
    x = x.expand(x.shape[0], T, *x.shape[2:])
    if block:
        x = x.transpose(2, 3)
    edge = torch.full_like(x[:, :1], fill or 0.0) if fill is None or isinstance(fill, float) else fill.unsqueeze(1).to(x.dtype)
    return torch.cat([x[:, 1:], edge], 1) if later else torch.cat([edge, x[:, :-1]], 1)


def torch_scan(a, b, h0, reverse, block=False):
    """Hillis-Steele doubling in float32 (float64 stays): ceil(log2 T) vectorised passes, no loop over time steps."""
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


def use_triton(x):
    return triton is not None and x.dtype != torch.float64 and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Triton engine. b is viewed as [B, T, C] ([B, T, 2, C] for blocks) and cut into tiles of BLOCK_T steps by BLOCK_C
# channels, each scanned in registers from the state its predecessor ended in: a thread scans R consecutive steps of
# its channels, the lanes and warps only those segments' totals. A program owns one channel block of one batch row
# and walks the tiles of one chunk of time in order, the carry in registers. Where the channel blocks fill the GPU
# there is one chunk: one launch, every element read and written once. Otherwise (few channels, a long sequence) each
# program first reduces its chunk to a map h -> P h + X (REDUCE); a second launch composes the maps of the chunks
# before it and rescans its chunk from the state they give (FOLD): a and b read twice, no communication between
# running programs. RESULTS.md (scan.py) times it against a decoupled look-back (Merrill & Garland 2016), Triton's
# pipelining and one-warp tiles.

PROGRAMS_PER_SM = 1  # split the sequence into chunks until this many programs per multiprocessor run (_plan: x4)
TILES_PER_CHUNK = 4  # but no chunk shorter than this
_SMS = {}


def programs(device):
    """Programs that fill the device (PROGRAMS_PER_SM on the CPU, where the interpreter runs them)."""
    if device.type == "cuda" and device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_PER_SM * _SMS.get(device, 1)


def n_chunks(n_tiles, groups, device, per_sm=1):
    """Chunks over time for `groups` programs side by side: enough for per_sm times programs(device), none shorter
    than TILES_PER_CHUNK tiles."""
    return max(1, min(n_tiles // TILES_PER_CHUNK, -(-programs(device) * per_sm // groups)))


def _plan(B, T, C, block, itemsize, device):
    """(BLOCK_T, BLOCK_C, R, warps, n_chunks): tiles of 128 steps by 32 channels in float32, 16 in bf16 (blocks: 64
    by 16), in segments of R = 4 steps (RESULTS.md, scan.py); chunks only where the channel blocks leave multiprocessors
    idle, then enough for 4 programs on each."""
    # the interpreter pays per tile element
    block_t, block_c = (16, 8) if INTERPRET else (64, 16) if block else (128, 32 if itemsize == 4 else 16)
    rows = min(block_t, _next_power_of_2(T))  # a short sequence (e.g. a scan over chunks): wider tiles, no empty rows
    block_c = min(block_c * block_t // rows, _next_power_of_2(C))
    seg = min(2 if block and itemsize < 4 else 4, rows)  # bf16 blocks: R = 4 would leave one warp, which spills
    # a warp's lanes hold 16 bytes of a row each; lanes and warps past the segments would split them and scan in memory
    warps = 1 if INTERPRET else max(1, min(4, rows // seg * block_c * itemsize // 512))
    groups = B * -(-C // block_c)
    return rows, block_c, seg, warps, n_chunks(-(-T // rows), groups, device, 4 if groups < programs(device) else 1)


def _next_power_of_2(n):
    return 1 << (n - 1).bit_length()


def _channel_strides(a, shape):
    """a's strides over [B, T, C]: the trailing dims of the broadcast view merged into at most two (outer, inner)
    groups, so channel c sits at (c // C_in) * s_outer + (c % C_in) * s_inner."""
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


def _triton_scan(a, b, h0, reverse, block, h_for_da=None, h0_for_da=None):
    """The forward, or with h_for_da the adjoint: a read one step later in scan order (transposed for blocks), and
    da_t = g_t h_{t-1}^T from h_for_da (h0_for_da at the edge), summed to a's shape, returned beside g."""
    B, T = b.shape[:2]
    S = 2 if block else 1  # state components per channel
    C = b[0, 0].numel() // S
    adjoint = h_for_da is not None
    b = b.contiguous()
    if block:
        a = a.contiguous()
        a_view, strides = a, (a.stride(0), a.stride(1), C, 0, 1)
    else:
        a = a.contiguous() if adjoint else a  # da is built with a's (contiguous) strides
        a_view, strides = _channel_strides(a, b.shape)
    block_t, block_c, seg, warps, chunks = _plan(B, T, C, block, b.element_size(), b.device)
    broadcast = adjoint and not block and a.numel() < b.numel() // S
    while broadcast and strides[4] == 0 and strides[2] < block_c and block_c > 16:
        block_c //= 2  # da summed inside a tile over channels that share an element of a: a tile meets at most two
    n_cblocks, n_tiles = -(-C // block_c), -(-T // block_t)
    per_chunk = -(-n_tiles // min(chunks, n_tiles))
    chunks = -(-n_tiles // per_chunk)
    da = None
    if adjoint:  # summed over a's broadcast dims by atomics in float32, else written as it comes
        da = torch.zeros(a.shape, device=b.device, dtype=torch.float32) if broadcast else torch.empty_like(a)
    sum_c = broadcast and strides[4] == 0 and strides[2] >= block_c
    meta = dict(REVERSE=reverse, ADJOINT=adjoint, BLOCK2=block, BLOCK_T=block_t, BLOCK_C=block_c, R=seg,
                num_warps=warps, DA_SUM_T=broadcast and strides[1] == 0 and T > 1, DA_SUM_C=sum_c, DA_ATOMIC=broadcast,
                TWO_RUNS=sum_c and strides[2] % block_c != 0, CHUNKS=_next_power_of_2(chunks))
    args = (T, C, n_cblocks, n_tiles, per_chunk, *strides)
    grid = (B * n_cblocks, chunks)
    maps = b  # chunks > 1: each chunk's map h -> P h + X, [B, n_chunks, 1 + 1 (blocks: 4 + 2), C]
    if chunks > 1:
        maps = torch.empty(B, chunks, (4 if block else 1) + S, C, device=b.device, dtype=torch.float32)
        _scan_kernel[grid](a_view, b, b, b, b, b, b, maps, *args, HAS_H0=False, HAS_H_EDGE=False, REDUCE=True,
                           FOLD=False, **meta)
    h0 = None if adjoint else h0  # the adjoint starts from zero; the forward's h0 only enters da
    h = torch.empty_like(b)
    edge = h0_for_da.contiguous() if h0_for_da is not None else b
    _scan_kernel[grid](a_view, b, h, b if h_for_da is None else h_for_da.contiguous(),
                       b if h0 is None else h0.contiguous(), edge, da if adjoint else h, maps, *args,
                       HAS_H0=h0 is not None, HAS_H_EDGE=h0_for_da is not None, REDUCE=False, FOLD=chunks > 1, **meta)
    return (h, da.to(a.dtype)) if adjoint else h


if triton is not None:
    @triton.jit
    def combine(a1, x1, a2, x2):
        return a1 * a2, a2 * x1 + x2

    @triton.jit
    def _combine2(p1, q1, r1, s1, x1, y1, p2, q2, r2, s2, x2, y2):
        """(A1, b1) then (A2, b2) = (A2 A1, A2 b1 + b2) for A = [[p, q], [r, s]], b = [x, y]."""
        return (p2 * p1 + q2 * r1, p2 * q1 + q2 * s1, r2 * p1 + s2 * r1, r2 * q1 + s2 * s1,
                p2 * x1 + q2 * y1 + x2, r2 * x1 + s2 * y1 + y2)

    @triton.jit
    def segments(x, R: tl.constexpr):
        """A [BLOCK_T, C] tile as [R, BLOCK_T / R, C]."""
        return tl.reshape(x, [R, x.shape[0] // R, x.shape[1]])

    @triton.jit
    def row(x, rows, edge):
        """Row `edge` along x's first axis; rows: that axis's index, broadcast to x's rank."""
        return tl.sum(tl.where(rows == edge, x, 0.0), 0)

    @triton.jit
    def _scan_kernel(A, X, H, HS, H0, H_EDGE, DA, MAPS, T, C, n_cblocks, n_tiles, per_chunk, sa_b, sa_t, c_in,
                     sa_o, sa_i, REVERSE: tl.constexpr, ADJOINT: tl.constexpr, REDUCE: tl.constexpr,
                     FOLD: tl.constexpr, HAS_H0: tl.constexpr, HAS_H_EDGE: tl.constexpr, DA_ATOMIC: tl.constexpr,
                     DA_SUM_T: tl.constexpr, DA_SUM_C: tl.constexpr, TWO_RUNS: tl.constexpr, BLOCK2: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, R: tl.constexpr, CHUNKS: tl.constexpr):
        S: tl.constexpr = 2 if BLOCK2 else 1  # state components per channel, C apart in memory
        step: tl.constexpr = -1 if REVERSE else 1
        group, chunk, chunks = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
        pid_b, pid_c = group // n_cblocks, group % n_cblocks
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        a_cols = (cols // c_in) * sa_o + (cols % c_in) * sa_i
        M: tl.constexpr = 6 if BLOCK2 else 2  # a chunk's map h -> P h + X: P's 4 (or 1) numbers, then X's 2 (or 1)
        cx = tl.zeros([BLOCK_C], dtype=tl.float32)  # the state entering the tile (REDUCE: the chunk's from 0)
        cy = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_H0:
            cx = tl.load(H0 + pid_b * S * C + cols, mask=col_ok, other=0.0).to(tl.float32)
            if BLOCK2:
                cy = tl.load(H0 + pid_b * S * C + C + cols, mask=col_ok, other=0.0).to(tl.float32)
        if FOLD:  # the maps of the chunks before this one, composed in scan order (the rest masked to identities)
            j = tl.arange(0, CHUNKS)[:, None]
            ok = (j < chunk) & col_ok[None, :]
            maps = MAPS + (pid_b * chunks + j) * M * C + cols[None, :]
            if BLOCK2:
                mp, mq, mr, ms, mx, my = tl.associative_scan(
                    (tl.load(maps, mask=ok, other=1.0), tl.load(maps + C, mask=ok, other=0.0),
                     tl.load(maps + 2 * C, mask=ok, other=0.0), tl.load(maps + 3 * C, mask=ok, other=1.0),
                     tl.load(maps + 4 * C, mask=ok, other=0.0), tl.load(maps + 5 * C, mask=ok, other=0.0)),
                    0, _combine2)
                cx, cy = (row(mp, j, CHUNKS - 1) * cx + row(mq, j, CHUNKS - 1) * cy + row(mx, j, CHUNKS - 1),
                          row(mr, j, CHUNKS - 1) * cx + row(ms, j, CHUNKS - 1) * cy + row(my, j, CHUNKS - 1))
            else:
                mp, mx = tl.associative_scan(
                    (tl.load(maps, mask=ok, other=1.0), tl.load(maps + C, mask=ok, other=0.0)), 0, combine)
                cx = row(mp, j, CHUNKS - 1) * cx + row(mx, j, CHUNKS - 1)
        tp = tl.full([BLOCK_C], 1.0, tl.float32)  # REDUCE: the chunk's transition so far, [[tp, tq], [tr, ts]]
        tq = tl.zeros([BLOCK_C], dtype=tl.float32)
        tr = tl.zeros([BLOCK_C], dtype=tl.float32)
        ts = tl.full([BLOCK_C], 1.0, tl.float32)
        # a tile is SEGS segments of R consecutive steps in scan order: a thread scans its segment in registers, the
        # lanes and warps only the segments' totals; each segment starts from where the one before it ends. Row
        # r * SEGS + s of the tile holds step s * R + r, so that the reshape to [R, SEGS, C] leaves each thread its R
        # steps (Triton lays out a 2D tile's rows across lanes and warps first, then registers)
        SEGS: tl.constexpr = BLOCK_T // R
        rows = tl.arange(0, BLOCK_T)
        steps = (rows % SEGS) * R + rows // SEGS
        steps = BLOCK_T - 1 - steps if REVERSE else steps
        r, seg = tl.arange(0, R)[:, None, None], tl.arange(0, SEGS)[:, None]  # for row()
        before = tl.maximum(seg - 1, 0) + tl.zeros([SEGS, BLOCK_C], dtype=tl.int32)
        for i in range(per_chunk):
            k = chunk * per_chunk + i  # the tile's place in scan order
            t = (n_tiles - 1 - k if REVERSE else k) * BLOCK_T + steps
            t_ok = (t >= 0) & (t < T)
            mask = t_ok[:, None] & col_ok[None, :]
            t_a = t - step if ADJOINT else t  # the adjoint reads a one step later in the forward's order
            a_ok = mask & ((t_a >= 0) & (t_a < T))[:, None]
            a_offs = pid_b * sa_b + t_a[:, None] * sa_t + a_cols[None, :]
            offs = (pid_b * T + t[:, None]) * S * C + cols[None, :]
            ap = tl.load(A + a_offs, mask=a_ok, other=1.0).to(tl.float32)  # padding and a missing a: the identity
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            if BLOCK2:
                aq = tl.load(A + a_offs + (2 if ADJOINT else 1) * C, mask=a_ok, other=0.0).to(tl.float32)
                ar = tl.load(A + a_offs + (1 if ADJOINT else 2) * C, mask=a_ok, other=0.0).to(tl.float32)
                as_ = tl.where(a_ok, tl.load(A + a_offs + 3 * C, mask=a_ok, other=0.0).to(tl.float32), 1.0)
                y = tl.load(X + offs + C, mask=mask, other=0.0).to(tl.float32)
                p, q, r_, s, x, y = tl.associative_scan(
                    (segments(ap, R), segments(aq, R), segments(ar, R), segments(as_, R), segments(x, R),
                     segments(y, R)), 0, _combine2)
                ep, eq, er, es, ex, ey = tl.associative_scan(  # [SEGS, C]: from the tile's start to each segment's end
                    (row(p, r, R - 1), row(q, r, R - 1), row(r_, r, R - 1), row(s, r, R - 1), row(x, r, R - 1),
                     row(y, r, R - 1)), 0, _combine2)
                end_x, end_y = ep * cx[None, :] + eq * cy[None, :] + ex, er * cx[None, :] + es * cy[None, :] + ey
                fx = tl.where(seg > 0, tl.gather(end_x, before, 0), cx[None, :])[None, :, :]  # entering each segment
                fy = tl.where(seg > 0, tl.gather(end_y, before, 0), cy[None, :])[None, :, :]
                hx = tl.reshape(p * fx + q * fy + x, [BLOCK_T, BLOCK_C])
                hy = tl.reshape(r_ * fx + s * fy + y, [BLOCK_T, BLOCK_C])
                cx, cy = row(end_x, seg, SEGS - 1), row(end_y, seg, SEGS - 1)
                if REDUCE:
                    lp, lq = row(ep, seg, SEGS - 1), row(eq, seg, SEGS - 1)
                    lr, ls = row(er, seg, SEGS - 1), row(es, seg, SEGS - 1)
                    tp, tq, tr, ts = lp * tp + lq * tr, lp * tq + lq * ts, lr * tp + ls * tr, lr * tq + ls * ts
            else:
                p, x = tl.associative_scan((segments(ap, R), segments(x, R)), 0, combine)
                ep, ex = tl.associative_scan((row(p, r, R - 1), row(x, r, R - 1)), 0, combine)
                end_x = ep * cx[None, :] + ex
                hx = p * tl.where(seg > 0, tl.gather(end_x, before, 0), cx[None, :])[None, :, :] + x
                hx = tl.reshape(hx, [BLOCK_T, BLOCK_C])
                cx = row(end_x, seg, SEGS - 1)
                if REDUCE:
                    tp = row(ep, seg, SEGS - 1) * tp
            if not REDUCE:
                tl.store(H + offs, hx.to(H.dtype.element_ty), mask=mask)
                if BLOCK2:
                    tl.store(H + offs + C, hy.to(H.dtype.element_ty), mask=mask)
            if ADJOINT and not REDUCE:  # da_t = g_t h_{t-1}^T, h_{t-1} one step earlier in the forward's order
                t_p = t + step
                p_ok = (t_p >= 0) & (t_p < T)
                prev = (pid_b * T + t_p[:, None]) * S * C + cols[None, :]
                hp = tl.load(HS + prev, mask=mask & p_ok[:, None], other=0.0).to(tl.float32)
                if HAS_H_EDGE:
                    e = tl.load(H_EDGE + pid_b * S * C + cols, mask=col_ok, other=0.0).to(tl.float32)
                    hp = tl.where(p_ok[:, None], hp, e[None, :])
                if BLOCK2:
                    hq = tl.load(HS + prev + C, mask=mask & p_ok[:, None], other=0.0).to(tl.float32)
                    if HAS_H_EDGE:
                        e = tl.load(H_EDGE + pid_b * S * C + C + cols, mask=col_ok, other=0.0).to(tl.float32)
                        hq = tl.where(p_ok[:, None], hq, e[None, :])
                    da = (pid_b * T + t[:, None]) * 4 * C + cols[None, :]
                    tl.store(DA + da, (hx * hp).to(DA.dtype.element_ty), mask=mask)
                    tl.store(DA + da + C, (hx * hq).to(DA.dtype.element_ty), mask=mask)
                    tl.store(DA + da + 2 * C, (hy * hp).to(DA.dtype.element_ty), mask=mask)
                    tl.store(DA + da + 3 * C, (hy * hq).to(DA.dtype.element_ty), mask=mask)
                elif DA_ATOMIC:  # a broadcast: sum what shares an element of a inside the tile first
                    da = tl.where(mask, hx * hp, 0.0)
                    if DA_SUM_C:  # runs of c_in >= BLOCK_C channels share one: a tile meets one run, or two if TWO_RUNS
                        run = (pid_c * BLOCK_C) // c_in
                        at = DA + pid_b * sa_b + run * sa_o
                        if TWO_RUNS:  # channels past the first run go to the next (past the last: padding, 0s)
                            first = ((cols // c_in) == run)[None, :]
                            nxt = at + tl.where(run + 1 < C // c_in, sa_o, 0)
                            rest, da = tl.where(first, 0.0, da), tl.where(first, da, 0.0)
                            if DA_SUM_T:
                                tl.atomic_add(nxt, tl.sum(tl.sum(rest, 1), 0))
                            else:
                                tl.atomic_add(nxt + t * sa_t, tl.sum(rest, 1), mask=t_ok)
                        if DA_SUM_T:
                            tl.atomic_add(at, tl.sum(tl.sum(da, 1), 0))
                        else:
                            tl.atomic_add(at + t * sa_t, tl.sum(da, 1), mask=t_ok)
                    elif DA_SUM_T:
                        tl.atomic_add(DA + pid_b * sa_b + a_cols, tl.sum(da, 0), mask=col_ok)
                    else:
                        tl.atomic_add(DA + pid_b * sa_b + t[:, None] * sa_t + a_cols[None, :], da, mask=mask)
                else:
                    tl.store(DA + pid_b * sa_b + t[:, None] * sa_t + a_cols[None, :], (hx * hp).to(DA.dtype.element_ty),
                             mask=mask)
        if REDUCE:  # the chunk's map, read by the chunks after it
            out = MAPS + (pid_b * chunks + chunk) * M * C + cols
            if BLOCK2:
                tl.store(out, tp, mask=col_ok)
                tl.store(out + C, tq, mask=col_ok)
                tl.store(out + 2 * C, tr, mask=col_ok)
                tl.store(out + 3 * C, ts, mask=col_ok)
                tl.store(out + 4 * C, cx, mask=col_ok)
                tl.store(out + 5 * C, cy, mask=col_ok)
            else:
                tl.store(out, tp, mask=col_ok)
                tl.store(out + C, cx, mask=col_ok)
