"""Mamba's selective scan (S6): the diagonal scan of scan.py fused with its operands and its read-out.

    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t,    y_t = C_t . h_t

Only mamba.py uses it; it imports scan.py's engines and kernels' helpers.
"""
import torch

from scan import _combine, _eager, _look_back, _loop_groups, _next_power_of_2, _shift, _torch_scan, _use_triton, triton
from scan import _INTERPRET
from typing import Optional

if triton is not None:
    import triton.language as tl

# =============================================================================================
# The selective scan: the diagonal scan fused with its operands and its read-out (Mamba's S6).
#
#     h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t,    y_t = C_t . h_t
#
# A separate entry point, not an option of scan(): what makes it pay is that a = exp(dt A),
# b = dt x B and h, each [B, T, D, N], never exist in memory. scan() takes a and b as tensors, so
# they would have to be built first; here the kernel builds them in registers from dt, x [B, T, D],
# A [D, N], B [B, T, N], reads out y and keeps only the state entering each tile of BLOCK_T steps
# (float32 [B, T / BLOCK_T, D, N]) for the backward, which recomputes the states tile by tile.
# Everything [B, T, D, N]-sized stays in registers; memory sees dt, x, B, C, y and their gradients.
# It reuses the diagonal scan's combine and, for few channel groups, its decoupled look-back.

def selective_scan(x, dt, A, B, C, h0=None):
    """Mamba's selective scan. x, dt: [B, T, D]; A: [D, N]; B, C: [B, T, N]; h0: [B, D, N] or None.
    Returns y [B, T, D] in x's dtype and the final state h_T [B, D, N] (float32, float64 stays)."""
    _check_selective(x, dt, A, B, C, h0)
    if not _eager(x, dt, A, B, C, h0):
        return _selective_op(x, dt, A, B, C, h0)[:2]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, h0)):
        return _EagerSelective.apply(x, dt, A, B, C, h0)
    return _selective_forward(x, dt, A, B, C, h0)[:2]


def _check_selective(x, dt, A, B, C, h0):
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("h0", h0)):
        if t is not None and not (torch.is_tensor(t) and t.is_floating_point()):
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t is not None and t.device != x.device:
            raise ValueError(f"selective_scan: all inputs must be on one device, {name} is on {t.device}, x on {x.device}")
    if x.dim() != 3 or x.shape[1] == 0 or A.dim() != 2:
        raise ValueError(f"selective_scan: needs x [B, T, D] with T > 0 and A [D, N], got {tuple(x.shape)}, {tuple(A.shape)}")
    (Bsz, T, D), N = x.shape, A.shape[1]
    for name, t, shape in (("dt", dt, (Bsz, T, D)), ("A", A, (D, N)), ("B", B, (Bsz, T, N)), ("C", C, (Bsz, T, N)),
                           ("h0", h0, (Bsz, D, N))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} must be {list(shape)} for x {list(x.shape)} and A {list(A.shape)}, "
                             f"got {list(t.shape)}")


def _state_dtype(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _selective_triton(x, dt, A, B, C, h0):
    return _use_triton(x) and _state_dtype(x, dt, A, B, C, h0) == torch.float32


def _saved_shape(x, dt, A, B, C, h0):
    """The states entering each tile, kept for the backward (Triton; the PyTorch engine recomputes all)."""
    n_tiles = -(-x.shape[1] // _selective_plan(A.shape[1])[0]) if _selective_triton(x, dt, A, B, C, h0) else 0
    return x.shape[0], n_tiles, x.shape[2], A.shape[1]


# Forward and backward as custom ops (zoo::selective_scan, zoo::selective_scan_backward) and an
# eager autograd.Function over the same two functions, as for scan() above.

def _selective_forward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       h0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h_T, the states entering each tile)."""
    if _selective_triton(x, dt, A, B, C, h0):
        return _triton_selective(x, dt, A, B, C, h0)
    return _torch_selective(x, dt, A, B, C, h0)


def _selective_backward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        h0: Optional[torch.Tensor], saved: torch.Tensor, dy: torch.Tensor, dhT: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, ddt, dA, dB, dC, dh0), each in its input's dtype (dh0: the state's, zeros without h0)."""
    if saved.shape[1] > 0:
        return _triton_selective_backward(x, dt, A, B, C, saved, dy, dhT)
    return _torch_selective_backward(x, dt, A, B, C, h0, dy, dhT)


def _selective_grads(ctx, dy, dhT, backward):
    x, dt, A, B, C, h0, saved = ctx.saved_tensors
    if dhT is None:
        dhT = x.new_zeros(x.shape[0], x.shape[2], A.shape[1], dtype=_state_dtype(x, dt, A, B, C, h0))
    dx, ddt, dA, dB, dC, dh0 = backward(x, dt, A, B, C, h0, saved, dy, dhT)
    return dx, ddt, dA, dB, dC, None if h0 is None else dh0.to(h0.dtype)


def _selective_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[2])
    ctx.mark_non_differentiable(output[2])


def _selective_fake(x, dt, A, B, C, h0):
    acc = _state_dtype(x, dt, A, B, C, h0)
    return (x.new_empty(x.shape), x.new_empty(x.shape[0], x.shape[2], A.shape[1], dtype=acc),
            x.new_empty(_saved_shape(x, dt, A, B, C, h0), dtype=acc))


def _selective_backward_fake(x, dt, A, B, C, h0, saved, dy, dhT):
    return (x.new_empty(x.shape), dt.new_empty(dt.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), dhT.new_empty(dhT.shape, dtype=_state_dtype(x, dt, A, B, C, h0)))


_selective_op = torch.library.custom_op("zoo::selective_scan", _selective_forward, mutates_args=())
_selective_backward_op = torch.library.custom_op("zoo::selective_scan_backward", _selective_backward, mutates_args=())
_selective_op.register_fake(_selective_fake)
_selective_backward_op.register_fake(_selective_backward_fake)
_selective_op.register_autograd(lambda ctx, dy, dhT, _: _selective_grads(ctx, dy, dhT, _selective_backward_op),
                                setup_context=_selective_setup)


class _EagerSelective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0):
        y, hT, saved = _selective_forward(x, dt, A, B, C, h0)
        ctx.save_for_backward(x, dt, A, B, C, h0, saved)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        return _selective_grads(ctx, dy, dhT, _selective_backward)


# ---- PyTorch engine: the plain semantics, h materialised (CPU, float64, no Triton)

def _torch_selective(x, dt, A, B, C, h0):
    acc = _state_dtype(x, dt, A, B, C, h0)
    dt = dt.to(acc)
    h = _torch_scan(torch.exp(dt[..., None] * A.to(acc)), (dt * x.to(acc))[..., None] * B.to(acc)[:, :, None], h0, False)
    y = (h * C.to(acc)[:, :, None]).sum(-1)
    return y.to(x.dtype), h[:, -1].clone(), x.new_empty(_saved_shape(x, dt, A, B, C, h0), dtype=acc)


def _torch_selective_backward(x, dt, A, B, C, h0, dy, dhT):
    """The adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} (g_T = dL/dh_T), then the chain rule through
    a = exp(dt A) and b = dt x B: da_t = g_t h_{t-1}, db_t = g_t."""
    acc = _state_dtype(x, dt, A, B, C, h0)
    xs, dts, As, Bs, Cs, dy = (t.to(acc) for t in (x, dt, A, B, C, dy))
    T = x.shape[1]
    a = torch.exp(dts[..., None] * As)  # [B, T, D, N]
    h = _torch_scan(a, (dts * xs)[..., None] * Bs[:, :, None], h0, False)
    w = dy[..., None] * Cs[:, :, None]
    w[:, -1] += dhT.to(acc)
    g = _torch_scan(_shift(a, T, later=True, fill=0.0), w, None, True)
    q = g * a * _shift(h, T, later=False, fill=h0)  # da * a: the gradient at dt A
    gB = (g * Bs[:, :, None]).sum(-1)
    return ((dts * gB).to(x.dtype), ((q * As).sum(-1) + xs * gB).to(dt.dtype), (q * dts[..., None]).sum((0, 1)).to(A.dtype),
            (g * (dts * xs)[..., None]).sum(2).to(B.dtype), (h * dy[..., None]).sum(2).to(C.dtype), a[:, 0] * g[:, 0])


# ---- Triton engine. A program's tile: BLOCK_T steps x BLOCK_D channels x BLOCK_N states (N padded
# to a power of 2), [BLOCK_T, BLOCK_D, BLOCK_N] in registers, scanned along its first axis. Channel
# groups (a batch row and BLOCK_D channels) walk their tiles in a loop, or with few groups one
# program per tile, chained by _look_back over the flattened [BLOCK_D * BLOCK_N] carries, as in
# _scan_kernel (same switch, own threshold: these programs are heavier).
# The backward walks the tiles in reverse: it recomputes the tile's states from the saved state
# entering it (h_{t-1}, from the operands one step earlier), scans the adjoint
# g_t = a_{t+1} g_{t+1} + C_t dy_t (a_{t+1} from dt one step later) and reads the gradients off g,
# h and a_t h_{t-1}. Sums over channels (dB, dC: [B, T, N]) leave the kernel as one partial per channel
# block, over time and batch (dA) one per program; PyTorch adds them (deterministic, no atomics).

SELECTIVE_LOOP_GROUPS_PER_SM = 2  # a guess, not measured: below _scan_kernel's 4, as these programs are heavier


def _selective_plan(N):
    """(BLOCK_T, BLOCK_D, BLOCK_N, forward warps, backward warps): 4096-element tiles (16 x 16 x 16
    at N = 16), 32 elements a thread in the forward, 16 in the backward, which keeps ~10 tiles live."""
    block_n = _next_power_of_2(N)
    if _INTERPRET:  # the interpreter pays per tile element
        return 8, 4, block_n, 1, 1
    return 16, max(1, 256 // block_n), block_n, 4, 8


def _selective_launch(x, A, backward):
    """Grid, loop switch and look-back workspace (flags, carries) of one launch."""
    (Bsz, T, D), N = x.shape, A.shape[1]
    block_t, block_d, block_n, warps_f, warps_b = _selective_plan(N)
    n_dblocks, n_tiles = -(-D // block_d), -(-T // block_t)
    groups = Bsz * n_dblocks
    loop = groups >= _loop_groups(x.device, SELECTIVE_LOOP_GROUPS_PER_SM)
    if loop:
        flags = carries = x.new_empty(1, dtype=torch.float32)
    else:
        tiles = groups * n_tiles
        n_carry = tiles * 3 * block_d * block_n
        work = torch.zeros(n_carry + tiles + 1, device=x.device, dtype=torch.int32)
        carries, flags = work[:n_carry].view(torch.float32), work[n_carry:]
    meta = dict(LOOP=loop, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps_b if backward else warps_f)
    return (groups if loop else groups * n_tiles,), n_dblocks, n_tiles, flags, carries, meta


def _strides(*ts):
    return [s for t in ts for s in t.stride()]


def _triton_selective(x, dt, A, B, C, h0):
    (Bsz, T, D), N = x.shape, A.shape[1]
    grid, n_dblocks, n_tiles, flags, carries, meta = _selective_launch(x, A, False)
    y = torch.empty(Bsz, T, D, device=x.device, dtype=x.dtype)
    hT = torch.empty(Bsz, D, N, device=x.device, dtype=torch.float32)
    saved = torch.empty(Bsz, n_tiles, D, N, device=x.device, dtype=torch.float32)
    A = A.contiguous()
    _selective_fwd_kernel[grid](x, dt, A, B, C, A if h0 is None else h0.contiguous(), y, hT, saved, flags, carries,
                                T, D, N, n_dblocks, n_tiles, *_strides(x, dt, B, C), HAS_H0=h0 is not None, **meta)
    return y, hT, saved


def _triton_selective_backward(x, dt, A, B, C, saved, dy, dhT):
    (Bsz, T, D), N = x.shape, A.shape[1]
    grid, n_dblocks, n_tiles, flags, carries, meta = _selective_launch(x, A, True)
    dx, ddt = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(dt, memory_format=torch.contiguous_format)
    dA = torch.empty(Bsz, 1 if meta["LOOP"] else n_tiles, D, N, device=x.device, dtype=torch.float32)
    dB, dC = (torch.empty(Bsz, n_dblocks, T, N, device=x.device, dtype=torch.float32) for _ in range(2))
    dh0 = torch.empty(Bsz, D, N, device=x.device, dtype=torch.float32)
    _selective_bwd_kernel[grid](x, dt, A.contiguous(), B, C, saved, dy.contiguous(), dhT.float().contiguous(), dx, ddt,
                                dA, dB, dC, dh0, flags, carries, T, D, N, n_dblocks, n_tiles, *_strides(x, dt, B, C),
                                **meta)
    return dx, ddt, dA.sum((0, 1)).to(A.dtype), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype), dh0


if triton is not None:
    @triton.jit
    def _row(x, rows, edge):
        """Row `edge` of a [BLOCK_T, BLOCK_D, BLOCK_N] tile."""
        return tl.sum(tl.where(rows[:, None, None] == edge, x, 0.0), 0)

    @triton.jit
    def _tile_td(P, pid_b, t, d, s_b, s_t, s_d, mask):
        """A [BLOCK_T, BLOCK_D] (or [BLOCK_T, BLOCK_N]) tile of a [B, T, *] tensor, as float32, 0 outside."""
        return tl.load(P + pid_b * s_b + t[:, None] * s_t + d[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _selective_group(FLAGS, n_dblocks, n_tiles, LOOP: tl.constexpr):
        """(group, its batch row, its channel block, the tile's position in scan order, tiles to walk)."""
        if LOOP:
            group = tl.program_id(0).to(tl.int64)
            order = 0
            n_orders = n_tiles
        else:  # tickets in dispatch order, all groups' tiles at one position first (as _scan_kernel)
            ticket = tl.atomic_add(FLAGS + tl.num_programs(0), 1)
            n_groups = tl.num_programs(0) // n_tiles
            order = ticket // n_groups
            group = (ticket % n_groups).to(tl.int64)
            n_orders = 1
        return group, group // n_dblocks, group % n_dblocks, order, n_orders

    @triton.jit
    def _selective_carry(CARRIES, FLAGS, group, n_tiles, order, p, s, rows, edge, state_lanes,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """Look-back: publish the tile's local pair (row edge of p, s), then the state entering it."""
        BLOCK_C: tl.constexpr = BLOCK_D * BLOCK_N
        me = group * n_tiles + order
        mine = CARRIES + me * 3 * BLOCK_C + state_lanes
        tl.store(mine, _row(p, rows, edge))
        tl.store(mine + BLOCK_C, _row(s, rows, edge))
        tl.debug_barrier()
        tl.atomic_xchg(FLAGS + me, 1, sem="release")
        cx, _ = _look_back(CARRIES, FLAGS, group * n_tiles, order - 1, tl.arange(0, BLOCK_C), False, BLOCK_C)
        return tl.reshape(cx, [BLOCK_D, BLOCK_N])

    @triton.jit
    def _selective_publish(CARRIES, FLAGS, group, n_tiles, order, carry, state_lanes, BLOCK_C: tl.constexpr):
        """Look-back: publish the inclusive state the tile hands on (flag 2)."""
        me = group * n_tiles + order
        tl.store(CARRIES + me * 3 * BLOCK_C + 2 * BLOCK_C + state_lanes, carry)
        tl.debug_barrier()
        tl.atomic_xchg(FLAGS + me, 2, sem="release")

    @triton.jit
    def _selective_fwd_kernel(X, DT, A, Bm, Cm, H0, Y, HT, SAVED, FLAGS, CARRIES, T, D, N, n_dblocks, n_tiles,
                              sx_b, sx_t, sx_d, sdt_b, sdt_t, sdt_d, sb_b, sb_t, sb_n, sc_b, sc_t, sc_n,
                              HAS_H0: tl.constexpr, LOOP: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        BLOCK_C: tl.constexpr = BLOCK_D * BLOCK_N
        rows = tl.arange(0, BLOCK_T)
        ns = tl.arange(0, BLOCK_N)
        state_lanes = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + ns[None, :]
        group, pid_b, pid_d, order, n_orders = _selective_group(FLAGS, n_dblocks, n_tiles, LOOP)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok, n_ok = d < D, ns < N
        dn_ok = d_ok[:, None] & n_ok[None, :]
        state = (pid_b * D + d[:, None]) * N + ns[None, :]  # [B, D, N] offsets
        At = tl.load(A + d[:, None] * N + ns[None, :], mask=dn_ok, other=0.0).to(tl.float32)
        carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # the state entering the tile
        if HAS_H0:
            carry = tl.load(H0 + state, mask=dn_ok, other=0.0).to(tl.float32)
        for i in range(n_orders):
            if LOOP:
                order = i
            t = order * BLOCK_T + rows
            td_ok = (t < T)[:, None] & d_ok[None, :]
            tn_ok = (t < T)[:, None] & n_ok[None, :]
            dt = _tile_td(DT, pid_b, t, d, sdt_b, sdt_t, sdt_d, td_ok)
            x = _tile_td(X, pid_b, t, d, sx_b, sx_t, sx_d, td_ok)
            Bt = _tile_td(Bm, pid_b, t, ns, sb_b, sb_t, sb_n, tn_ok)
            Ct = _tile_td(Cm, pid_b, t, ns, sc_b, sc_t, sc_n, tn_ok)
            # a = 1, b = 0 outside: padding passes the state through
            a = tl.exp(dt[:, :, None] * At[None, :, :])
            b = (dt * x)[:, :, None] * Bt[:, None, :]
            p, s = tl.associative_scan((a, b), 0, _combine)
            if not LOOP:
                if order > 0:
                    carry = _selective_carry(CARRIES, FLAGS, group, n_tiles, order, p, s, rows, BLOCK_T - 1,
                                             state_lanes, BLOCK_D, BLOCK_N)
            tl.store(SAVED + ((pid_b * n_tiles + order) * D + d[:, None]) * N + ns[None, :], carry, mask=dn_ok)
            h = p * carry[None, :, :] + s
            y = tl.sum(h * Ct[:, None, :], 2)
            tl.store(Y + (pid_b * T + t[:, None]) * D + d[None, :], y.to(Y.dtype.element_ty), mask=td_ok)
            carry = _row(h, rows, BLOCK_T - 1)
            if not LOOP:
                _selective_publish(CARRIES, FLAGS, group, n_tiles, order, carry, state_lanes, BLOCK_C)
        if LOOP or order == n_tiles - 1:
            tl.store(HT + state, carry, mask=dn_ok)

    @triton.jit
    def _selective_bwd_kernel(X, DT, A, Bm, Cm, SAVED, DY, DHT, DX, DDT, DA, DB, DC, DH0, FLAGS, CARRIES,
                              T, D, N, n_dblocks, n_tiles, sx_b, sx_t, sx_d, sdt_b, sdt_t, sdt_d,
                              sb_b, sb_t, sb_n, sc_b, sc_t, sc_n, LOOP: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        BLOCK_C: tl.constexpr = BLOCK_D * BLOCK_N
        rows = tl.arange(0, BLOCK_T)
        ns = tl.arange(0, BLOCK_N)
        state_lanes = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + ns[None, :]
        group, pid_b, pid_d, order, n_orders = _selective_group(FLAGS, n_dblocks, n_tiles, LOOP)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok, n_ok = d < D, ns < N
        dn_ok = d_ok[:, None] & n_ok[None, :]
        state = (pid_b * D + d[:, None]) * N + ns[None, :]
        At = tl.load(A + d[:, None] * N + ns[None, :], mask=dn_ok, other=0.0).to(tl.float32)
        gc = tl.load(DHT + state, mask=dn_ok, other=0.0)  # g of the step after the tile; after T: dL/dh_T
        dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        for i in range(n_orders):
            if LOOP:
                order = i
            tile = n_tiles - 1 - order
            t = tile * BLOCK_T + rows
            td_ok = (t < T)[:, None] & d_ok[None, :]
            tn_ok = (t < T)[:, None] & n_ok[None, :]
            dt = _tile_td(DT, pid_b, t, d, sdt_b, sdt_t, sdt_d, td_ok)
            x = _tile_td(X, pid_b, t, d, sx_b, sx_t, sx_d, td_ok)
            dy = _tile_td(DY, pid_b, t, d, T * D, D, 1, td_ok)
            Bt = _tile_td(Bm, pid_b, t, ns, sb_b, sb_t, sb_n, tn_ok)
            Ct = _tile_td(Cm, pid_b, t, ns, sc_b, sc_t, sc_n, tn_ok)
            dt_next = _tile_td(DT, pid_b, t + 1, d, sdt_b, sdt_t, sdt_d, (t + 1 < T)[:, None] & d_ok[None, :])
            # the forward's states h_{t-1} from the one saved entering the tile, by a scan of the
            # operands one step earlier (row 0: the identity), so that a_t h_{t-1} is a product, not
            # h_t - b_t: that difference cancels to noise where a_t underflows (dt A below ~-20)
            prev_ok = (rows > 0) & (t < T)
            dt_p = _tile_td(DT, pid_b, t - 1, d, sdt_b, sdt_t, sdt_d, prev_ok[:, None] & d_ok[None, :])
            x_p = _tile_td(X, pid_b, t - 1, d, sx_b, sx_t, sx_d, prev_ok[:, None] & d_ok[None, :])
            B_p = _tile_td(Bm, pid_b, t - 1, ns, sb_b, sb_t, sb_n, prev_ok[:, None] & n_ok[None, :])
            p, s = tl.associative_scan((tl.exp(dt_p[:, :, None] * At[None, :, :]),
                                        (dt_p * x_p)[:, :, None] * B_p[:, None, :]), 0, _combine)
            h0 = tl.load(SAVED + ((pid_b * n_tiles + tile) * D + d[:, None]) * N + ns[None, :], mask=dn_ok, other=0.0)
            a = tl.exp(dt[:, :, None] * At[None, :, :])
            ah = a * (p * h0[None, :, :] + s)  # a_t h_{t-1}
            h = ah + (dt * x)[:, :, None] * Bt[:, None, :]
            # the adjoint, right to left
            a_next = tl.exp(dt_next[:, :, None] * At[None, :, :])
            pg, sg = tl.associative_scan((a_next, dy[:, :, None] * Ct[:, None, :]), 0, _combine, reverse=True)
            if not LOOP:
                if order > 0:
                    gc = _selective_carry(CARRIES, FLAGS, group, n_tiles, order, pg, sg, rows, 0, state_lanes,
                                          BLOCK_D, BLOCK_N)
            g = pg * gc[None, :, :] + sg
            gc = _row(g, rows, 0)
            if not LOOP:
                _selective_publish(CARRIES, FLAGS, group, n_tiles, order, gc, state_lanes, BLOCK_C)
            q = g * ah  # the gradient at dt A
            gB = tl.sum(g * Bt[:, None, :], 2)
            offs = (pid_b * T + t[:, None]) * D + d[None, :]
            tl.store(DX + offs, (dt * gB).to(DX.dtype.element_ty), mask=td_ok)
            tl.store(DDT + offs, (tl.sum(q * At[None, :, :], 2) + x * gB).to(DDT.dtype.element_ty), mask=td_ok)
            part = (group * T + t[:, None]) * N + ns[None, :]  # [B, n_dblocks, T, N]
            tl.store(DB + part, tl.sum(g * (dt * x)[:, :, None], 1), mask=tn_ok)
            tl.store(DC + part, tl.sum(h * dy[:, :, None], 1), mask=tn_ok)
            dA += tl.sum(q * dt[:, :, None], 0)
            if tile == 0:
                tl.store(DH0 + state, _row(a * g, rows, 0), mask=dn_ok)
            if not LOOP:
                tl.store(DA + ((pid_b * n_tiles + tile) * D + d[:, None]) * N + ns[None, :], dA, mask=dn_ok)
        if LOOP:
            tl.store(DA + state, dA, mask=dn_ok)

