"""The one linear recurrence every model in the zoo reduces to, solved in parallel over time.

    h_t = a_t * h_{t-1} + b_t        (reverse=True: h_t = a_t * h_{t+1} + b_t)

`scan(a, b, h0=None, reverse=False)` takes b: [B, T, *], a broadcastable to b (a per-head gate
[B, T, H, 1] against a state [B, T, H, N] is read with stride 0, never expanded in memory),
h0: [B, *] or None (zeros). It returns h with b's shape and dtype; h[:, -1] is the final state
(h[:, 0] when reverse). Sums are accumulated in float32 (float64 stays float64).

The scan is associative (Blelloch 1990): the pairs (a, b) compose as
    (a1, b1) then (a2, b2) = (a1 * a2, a2 * b1 + b2),
so T steps take log-depth work. Its gradient is the same recurrence run the other way
(the adjoint of h_t = a_t h_{t-1} + b_t):
    g_t = dL/dh_t + a_{t+1} g_{t+1},   dL/db_t = g_t,   dL/da_t = g_t h_{t-1},   dL/dh0 = a_0 g_0.

Two engines behind one autograd.Function: a Triton kernel on CUDA (or on the CPU under
TRITON_INTERPRET=1), and PyTorch log-depth doubling for everything else (CPU, MPS, float64,
machines without Triton).
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, Windows: the PyTorch engine serves
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def scan(a, b, h0=None, reverse=False):
    """h_t = a_t * h_{t-1} + b_t along dim 1. a: broadcastable to b [B, T, *]; h0: [B, *] or None."""
    _check(a, b, h0)
    return _Scan.apply(a, b, h0, reverse)


def _check(a, b, h0):
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is not None and not (torch.is_tensor(x) and x.is_floating_point()):
            raise ValueError(f"scan: {name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if b.dim() < 2:
        raise ValueError(f"scan: b must be [B, T, *], got shape {tuple(b.shape)}")
    if b.shape[1] == 0:
        raise ValueError("scan: T = 0, nothing to scan (b has shape %s)" % (tuple(b.shape),))
    if a.dim() > b.dim() or any(n not in (1, m) for n, m in zip(reversed(a.shape), reversed(b.shape))):
        raise ValueError(f"scan: a {tuple(a.shape)} does not broadcast to b {tuple(b.shape)}")
    if h0 is not None and h0.shape != b.shape[:1] + b.shape[2:]:
        raise ValueError(f"scan: h0 must be [B, *] = {tuple(b.shape[:1] + b.shape[2:])}, got {tuple(h0.shape)}")
    devices = {x.device for x in (a, b, h0) if x is not None}
    if len(devices) > 1:
        raise ValueError(f"scan: a, b and h0 must be on one device, got {sorted(map(str, devices))}")


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse):
        a_full = a.reshape((1,) * (b.dim() - a.dim()) + a.shape)  # same rank as b, still broadcast
        if _use_triton(b):
            h = _triton_scan(a_full, b, h0, reverse)
        else:
            h = _torch_scan(a_full, b, h0, reverse).to(b.dtype)
        ctx.save_for_backward(a_full, h, h0)
        ctx.reverse, ctx.a_shape = reverse, a.shape
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        reverse = ctx.reverse
        if _use_triton(h):
            g, da = _triton_scan(a, dh, None, not reverse, shift_a=True, h_for_da=h, h0_for_da=h0)
        else:
            g = _torch_scan(_shift(a, h.shape[1], later=not reverse, fill=0.0), dh, None, not reverse)
            h_prev = _shift(h, h.shape[1], later=reverse, fill=h0)
            da = g * h_prev
        da = da.sum_to_size(a.shape).reshape(ctx.a_shape).to(a.dtype)
        dh0 = None
        if h0 is not None:
            first = -1 if reverse else 0  # the step that read h0
            dh0 = (a[:, first] * g[:, first]).to(h0.dtype)
        return da, g.to(dh.dtype), dh0, None


def _shift(x, T, later, fill):
    """x_{t+1} (later=True) or x_{t-1} along time, the missing end taken from fill (a number or [B, *])."""
    x = x.expand(x.shape[0], T, *x.shape[2:])
    if isinstance(fill, (int, float)) or fill is None:
        edge = torch.full_like(x[:, :1], fill or 0.0)
    else:
        edge = fill.unsqueeze(1).to(x.dtype)
    return torch.cat([x[:, 1:], edge], 1) if later else torch.cat([edge, x[:, :-1]], 1)


def _torch_scan(a, b, h0, reverse):
    """Hillis-Steele doubling: ceil(log2 T) vectorised passes, no loop over time steps."""
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    if reverse:
        a, b = a.flip(1), b.flip(1)
    T = b.shape[1]
    A = a.to(acc).expand(a.shape[0], T, *a.shape[2:]).clone()  # broadcast dims stay broadcast
    h = b.to(acc).clone()
    if h0 is not None:
        h[:, 0] += A[:, 0] * h0.to(acc)
    d = 1
    while d < T:
        h[:, d:] = A[:, d:] * h[:, :-d] + h[:, d:]
        A[:, d:] = A[:, d:] * A[:, :-d]
        d *= 2
    return h.flip(1) if reverse else h


def _use_triton(x):
    return triton is not None and x.dtype != torch.float64 and (x.is_cuda or (_INTERPRET and x.device.type == "cpu"))


# ---------------------------------------------------------------------------------------------
# Triton engine: one pass, one launch. b is viewed as [B, T, C] and cut into tiles of BLOCK_T time
# steps by BLOCK_C channels. A tile is scanned in registers, then needs the state its predecessor
# ended in. Two ways to get it (the kernel's LOOP switch):
# - loop: with many channel groups (B * C / BLOCK_C at least LOOP_GROUPS_PER_SM per multiprocessor),
#   one program per group walks its tiles in order, the carry in registers.
# - look-back: otherwise (a long sequence with few channels), one program per tile, so it still
#   fills the GPU, chained by the decoupled look-back of Merrill & Garland (2016, "Single-pass
#   parallel prefix scan with decoupled look-back"). Each tile publishes its own (prod a, local h)
#   as soon as it has them and its inclusive h once it knows its carry; a tile walks back over
#   predecessors' local pairs until it meets an inclusive one. A tile's values are written before
#   its flag (a barrier, then a release store of the flag by one thread); a reader acquires the
#   flag first, so the decisions are uniform over the program and the values it then reads are
#   complete. Tiles take a ticket from an atomic counter, so every tile they wait on has started.
# Either way every element of a, b and h crosses memory once.

def _triton_scan(a, b, h0, reverse, shift_a=False, h_for_da=None, h0_for_da=None):
    """a: b's rank, broadcast. shift_a: read a one step later in scan order (the adjoint's
    a_{t+1}). h_for_da: also return da_t = h_t * h_for_da_{t-1}, h0_for_da at the edge (float32)."""
    B, T = b.shape[:2]
    C = b[0, 0].numel()
    b3 = b.contiguous().view(B, T, C)
    a, a_strides = _channel_strides(a, b.shape)
    block_t, block_c, warps = _plan(C, b.element_size())
    n_cblocks, n_tiles = -(-C // block_c), -(-T // block_t)
    # measured: the forward of many channel groups runs faster as loops, the backward (three loads
    # per element) faster with every tile its own program
    loop = h_for_da is None and B * n_cblocks >= _loop_groups(b.device)
    tiles = 0 if loop else B * n_cblocks * n_tiles  # the look-back's bookkeeping; loop mode needs none
    flags = torch.zeros(tiles + 1, device=b.device, dtype=torch.int32)  # per tile 0/1/2; last: the ticket
    carries = torch.empty(tiles, 3, block_c, device=b.device, dtype=torch.float32)  # prod a, local h, inclusive h
    h = torch.empty_like(b3)
    da_dtype = a.dtype if a.stride() == b3.view(b.shape).stride() else torch.float32  # float32 to sum over broadcast
    da = torch.empty(B, T, C, device=b.device, dtype=da_dtype) if h_for_da is not None else h
    hs = b3 if h_for_da is None else h_for_da.contiguous().view(B, T, C)
    h0 = h0_for_da if h_for_da is not None else h0  # the backward's h0 only enters da
    grid = (B * n_cblocks if loop else tiles,)
    _scan_kernel[grid](a, b3, h, hs, b3 if h0 is None else h0.contiguous().view(B, C), da, flags, carries,
                       T, C, n_cblocks, n_tiles, *a_strides, REVERSE=reverse, SHIFT_A=shift_a,
                       WRITE_DA=h_for_da is not None, HAS_H0=h0 is not None, LOOP=loop,
                       BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    h = h.view(b.shape)
    return h if h_for_da is None else (h, da.view(b.shape))


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


def _plan(C, itemsize):
    """Tile rows, channels and warps, measured on an H100: 64 channels (rows of 256 bytes in
    float32, 128 in bf16), 64 x 64 tiles on 4 warps in float32, 32 x 64 on 2 in 16 bits."""
    if _INTERPRET:  # the interpreter pays per tile element
        return 16, min(8, _next_power_of_2(C)), 1
    wide = itemsize >= 4
    return (64 if wide else 32), min(64, _next_power_of_2(C)), (4 if wide else 2)


def _next_power_of_2(n):
    return 1 << (n - 1).bit_length()


LOOP_GROUPS_PER_SM = 4  # measured on an H100


def _loop_groups(device):
    """From this many channel groups (B * C / BLOCK_C) on, one program per group, walking its
    tiles in order with the carry in registers, fills the GPU, and no look-back is needed."""
    if device.type != "cuda":
        return LOOP_GROUPS_PER_SM
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return LOOP_GROUPS_PER_SM * _SMS[device]


_SMS = {}


if triton is not None:
    @triton.jit
    def _combine(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _tile_scan(A, Bx, pid_b, cols, col_ok, tile, T, C, sa_b, sa_t, a_cols,
                   REVERSE: tl.constexpr, SHIFT_A: tl.constexpr, BLOCK_T: tl.constexpr):
        """One tile in registers: its cumulative (prod a, h from 0), its end pair, offsets, mask."""
        step: tl.constexpr = -1 if REVERSE else 1
        edge: tl.constexpr = 0 if REVERSE else BLOCK_T - 1  # the row that holds the tile's last state
        rows = tl.arange(0, BLOCK_T)
        t = tile * BLOCK_T + rows
        mask = (t < T)[:, None] & col_ok[None, :]
        t_a = t - step * SHIFT_A
        a_ok = mask & ((t_a >= 0) & (t_a < T))[:, None]
        a = tl.load(A + pid_b * sa_b + t_a[:, None] * sa_t + a_cols[None, :], mask=a_ok, other=0.0)
        a = tl.where(mask, a.to(tl.float32), 1.0)  # padding is the identity (a=1, b=0)
        offs = (pid_b * T + t[:, None]) * C + cols[None, :]
        b = tl.load(Bx + offs, mask=mask, other=0.0).to(tl.float32)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine, reverse=REVERSE)
        tile_a = tl.sum(tl.where(rows[:, None] == edge, a_cum, 0.0), 0)
        tile_h = tl.sum(tl.where(rows[:, None] == edge, b_cum, 0.0), 0)
        return a_cum, b_cum, tile_a, tile_h, t, offs, mask

    @triton.jit
    def _tile_store(H, HS, H0, DA, h, pid_b, cols, col_ok, t, offs, mask, T, C,
                    REVERSE: tl.constexpr, WRITE_DA: tl.constexpr, HAS_H0: tl.constexpr):
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        if WRITE_DA:  # da_t = g_t * h_{t-1}, h_{t-1} read one step earlier in the forward order
            t_p = t + (-1 if REVERSE else 1)
            p_ok = (t_p >= 0) & (t_p < T)
            h_prev = tl.load(HS + (pid_b * T + t_p[:, None]) * C + cols[None, :],
                             mask=mask & p_ok[:, None], other=0.0).to(tl.float32)
            if HAS_H0:
                h0 = tl.load(H0 + pid_b * C + cols, mask=col_ok, other=0.0).to(tl.float32)
                h_prev = tl.where(p_ok[:, None], h_prev, h0[None, :])
            tl.store(DA + offs, (h * h_prev).to(DA.dtype.element_ty), mask=mask)

    @triton.jit
    def _scan_kernel(A, Bx, H, HS, H0, DA, FLAGS, CARRIES, T, C, n_cblocks, n_tiles, sa_b, sa_t, C_in, sa_o, sa_i,
                     REVERSE: tl.constexpr, SHIFT_A: tl.constexpr, WRITE_DA: tl.constexpr, HAS_H0: tl.constexpr,
                     LOOP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        lanes = tl.arange(0, BLOCK_C)
        if LOOP:  # enough channel groups to fill the GPU: one program walks its group's tiles in order
            group = tl.program_id(0).to(tl.int64)
        else:
            ticket = tl.atomic_add(FLAGS + tl.num_programs(0), 1)  # dispatch order, not launch order
            n_groups = tl.num_programs(0) // n_tiles
            order = ticket // n_groups  # position of the tile in scan order; all groups' tiles at
            group = (ticket % n_groups).to(tl.int64)  # one position first, so predecessors are done
        pid_b, pid_c = group // n_cblocks, group % n_cblocks
        cols = pid_c * BLOCK_C + lanes
        col_ok = cols < C
        a_cols = (cols // C_in) * sa_o + (cols % C_in) * sa_i
        carry = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_H0 and not WRITE_DA:  # the backward's h0 only enters da
            h0 = tl.load(H0 + pid_b * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        if LOOP:
            if HAS_H0 and not WRITE_DA:
                carry = h0
            for order in range(n_tiles):
                tile = n_tiles - 1 - order if REVERSE else order
                a_cum, b_cum, tile_a, tile_h, t, offs, mask = _tile_scan(
                    A, Bx, pid_b, cols, col_ok, tile, T, C, sa_b, sa_t, a_cols, REVERSE, SHIFT_A, BLOCK_T)
                _tile_store(H, HS, H0, DA, a_cum * carry[None, :] + b_cum, pid_b, cols, col_ok, t, offs, mask,
                            T, C, REVERSE, WRITE_DA, HAS_H0)
                carry = tile_a * carry + tile_h
        else:
            tile = n_tiles - 1 - order if REVERSE else order
            a_cum, b_cum, tile_a, tile_h, t, offs, mask = _tile_scan(
                A, Bx, pid_b, cols, col_ok, tile, T, C, sa_b, sa_t, a_cols, REVERSE, SHIFT_A, BLOCK_T)
            # the carry: h0 for the first tile, else look back over the predecessors in scan order
            me = group * n_tiles + order
            if order == 0:
                if HAS_H0 and not WRITE_DA:
                    carry = h0
            else:
                tl.store(CARRIES + me * 3 * BLOCK_C + lanes, tile_a)
                tl.store(CARRIES + me * 3 * BLOCK_C + BLOCK_C + lanes, tile_h)
                tl.debug_barrier()
                tl.atomic_xchg(FLAGS + me, 1, sem="release")
                acc_a = tl.full([BLOCK_C], 1.0, tl.float32)  # the tiles between j and me, composed
                acc_h = tl.zeros([BLOCK_C], dtype=tl.float32)
                j = order - 1
                while j >= 0:
                    prev = CARRIES + (group * n_tiles + j) * 3 * BLOCK_C + lanes
                    status = tl.atomic_add(FLAGS + group * n_tiles + j, 0, sem="acquire")
                    if status == 2:  # its inclusive state: done
                        carry = acc_a * tl.load(prev + 2 * BLOCK_C, volatile=True) + acc_h
                        j = -1
                    elif status == 1:  # its local pair: compose, go on
                        acc_h = acc_a * tl.load(prev + BLOCK_C, volatile=True) + acc_h
                        acc_a = acc_a * tl.load(prev, volatile=True)
                        j -= 1
            tl.store(CARRIES + me * 3 * BLOCK_C + 2 * BLOCK_C + lanes, tile_a * carry + tile_h)
            tl.debug_barrier()
            tl.atomic_xchg(FLAGS + me, 2, sem="release")
            _tile_store(H, HS, H0, DA, a_cum * carry[None, :] + b_cum, pid_b, cols, col_ok, t, offs, mask,
                        T, C, REVERSE, WRITE_DA, HAS_H0)
