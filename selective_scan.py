"""Mamba's selective scan (Gu & Dao 2023, Algorithm 2, S6): scan.py's diagonal scan fused with its operands and its
read-out. For x, dt [B, T, D], A [D, N], B, C [B, T, N] and h0 [B, D, N]:

    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t,    y_t = C_t . h_t

`selective_scan(x, dt, A, B, C, h0=None)` returns y [B, T, D] in x's dtype and h_T [B, D, N] (float32; float64
stays). It is not an option of scan(): what makes it pay is that a = exp(dt A), b = dt x B and h, each [B, T, D, N]
(N times the layer's activations), never reach memory. The kernels build them in registers from dt, x, A and B, read
out y inside the tile, and keep only the state entering each tile of BLOCK_T steps for the backward, which recomputes
the states tile by tile (as the official CUDA kernel, selective_scan_cuda, does). A file of its own because only
mamba.py uses it: a reader of any other model copies scan.py alone. On the CPU, MPS and in float64 the PyTorch engine
runs the plain form through scan.py's doubling.
"""
from typing import Optional

import torch

from scan import INTERPRET, n_chunks, register, scan, shift, torch_scan, triton, use_triton

if triton is not None:
    import triton.language as tl


def selective_scan(x, dt, A, B, C, h0=None):
    """x, dt: [B, T, D]; A: [D, N]; B, C: [B, T, N]; h0: [B, D, N] or None -> y [B, T, D], h_T [B, D, N]."""
    _check(x, dt, A, B, C, h0)
    return _selective(x, dt, A, B, C, h0)[:2]


def _check(x, dt, A, B, C, h0):
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


def _acc(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _triton(x, *ts):
    return use_triton(x) and _acc(x, *ts) == torch.float32


def _plan(Bsz, T, D, N, device, backward=False):
    """(BLOCK_T, BLOCK_D, BLOCK_N, warps, n_chunks, tiles per chunk): forward tiles of 16 steps x 128 / N channels x N
    states on 2 warps, backward tiles of half the steps on 1 warp, the fastest of the tiles timed on an H100 (8 to 32
    steps, 2 to 16 channels, 1 to 4 warps) at Mamba(512)'s [8, 2048, 1024] x 16: the backward took 1958 us against
    3169 at the forward's tile (RESULTS.md). Chunks over time where B * D / BLOCK_D programs leave multiprocessors
    idle."""
    block_n = triton.next_power_of_2(N)
    block_t, block_d, warps = (8, 4, 1) if INTERPRET else (16, max(1, 128 // block_n), 2)
    if backward:
        block_t, warps = block_t // 2, 1
    n_tiles = -(-T // block_t)
    per_chunk = -(-n_tiles // n_chunks(n_tiles, Bsz * -(-D // block_d), device))
    return block_t, block_d, block_n, warps, -(-n_tiles // per_chunk), per_chunk


def _saved_shape(x, dt, A, B, C, h0):
    """The states entering each forward tile, kept for the backward (the PyTorch engine keeps none)."""
    n_tiles = -(-x.shape[1] // _plan(*x.shape, A.shape[1], x.device)[0]) if _triton(x, dt, A, B, C, h0) else 0
    return x.shape[0], n_tiles, x.shape[2], A.shape[1]


def _forward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             h0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h_T, the states entering each tile)."""
    if _triton(x, dt, A, B, C, h0):
        return _triton_forward(x, dt, A, B, C, h0)
    acc = _acc(x, dt, A, B, C, h0)
    dt = dt.to(acc)
    h = torch_scan(torch.exp(dt[..., None] * A.to(acc)), (dt * x.to(acc))[..., None] * B.to(acc)[:, :, None], h0, False)
    y = (h * C.to(acc)[:, :, None]).sum(-1)
    return y.to(x.dtype), h[:, -1].clone(), x.new_empty(_saved_shape(x, dt, A, B, C, h0), dtype=acc)


def _backward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              h0: Optional[torch.Tensor], saved: torch.Tensor, dy: torch.Tensor, dhT: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, ddt, dA, dB, dC, dh0), each in its input's dtype (dh0: the state's). The adjoint
    g_t = C_t dy_t + a_{t+1} g_{t+1} (g_T = dL/dh_T), then the chain rule through a = exp(dt A) and b = dt x B."""
    if saved.shape[1] > 0:
        return _triton_backward(x, dt, A, B, C, h0, saved, dy, dhT)
    acc = _acc(x, dt, A, B, C, h0)
    xs, dts, As, Bs, Cs, dy = (t.to(acc) for t in (x, dt, A, B, C, dy))
    T = x.shape[1]
    a = torch.exp(dts[..., None] * As)  # [B, T, D, N]
    h = torch_scan(a, (dts * xs)[..., None] * Bs[:, :, None], h0, False)
    w = dy[..., None] * Cs[:, :, None]
    w[:, -1] += dhT.to(acc)
    g = torch_scan(shift(a, T, later=True, fill=0.0), w, None, True)
    q = g * a * shift(h, T, later=False, fill=h0)  # the gradient at dt A
    gB = (g * Bs[:, :, None]).sum(-1)
    return ((dts * gB).to(x.dtype), ((q * As).sum(-1) + xs * gB).to(dt.dtype), (q * dts[..., None]).sum((0, 1)).to(A.dtype),
            (g * (dts * xs)[..., None]).sum(2).to(B.dtype), (h * dy[..., None]).sum(2).to(C.dtype), a[:, 0] * g[:, 0])


def _grads(ctx, backward, dy, dhT, _):
    x, dt, A, B, C, h0, saved = ctx.saved_tensors
    if dhT is None:
        dhT = x.new_zeros(x.shape[0], x.shape[2], A.shape[1], dtype=_acc(x, dt, A, B, C, h0))
    dx, ddt, dA, dB, dC, dh0 = backward(x, dt, A, B, C, h0, saved, dy, dhT)
    return dx, ddt, dA, dB, dC, None if h0 is None else dh0.to(h0.dtype)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[2])
    ctx.mark_non_differentiable(output[2])


def _fake(x, dt, A, B, C, h0):
    acc = _acc(x, dt, A, B, C, h0)
    return (x.new_empty(x.shape), x.new_empty(x.shape[0], x.shape[2], A.shape[1], dtype=acc),
            x.new_empty(_saved_shape(x, dt, A, B, C, h0), dtype=acc))


def _backward_fake(x, dt, A, B, C, h0, saved, dy, dhT):
    return (x.new_empty(x.shape), dt.new_empty(dt.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), dhT.new_empty(dhT.shape, dtype=_acc(x, dt, A, B, C, h0)))


_selective = register("selective_scan", _forward, _backward, _fake, _backward_fake, _setup, _grads)


# ---------------------------------------------------------------------------------------------------------------
# Triton engine. A tile is BLOCK_T steps x BLOCK_D channels x BLOCK_N states (N padded to a power of 2), scanned in
# registers along its first axis. A program owns a batch row and BLOCK_D channels and walks the tiles of one chunk of
# the sequence in order, as scan.py's kernel; with chunks, each chunk's map h -> exp(A sum dt) h + X is reduced first,
# the maps are scanned by scan.py, and each program starts from its chunk's entering state. The backward walks the
# sequence in reverse, in tiles of half the forward's steps: it rebuilds u_t = a_t h_{t-1} from the state entering the
# tile (saved, or for an odd tile the saved one carried through the tile before) by a scan with the step's own a_t and
# input a_t b_{t-1} (a product, not h_t - b_t, which cancels to noise where a_t underflows), scans the adjoint g_t =
# a_{t+1} g_{t+1} + C_t dy_t and reads the gradients off g, u and h = u + b. Sums over channels (dB, dC: [B, T, N])
# leave the kernel as one partial per channel block, over time (dA) one per program; PyTorch adds them (deterministic,
# no atomics).

def _strides(*ts):
    return [s for t in ts for s in t.stride()]


def _chunk_carries(P, X, first):
    """The state entering each chunk in scan order from the chunks' maps h -> P h + X, [B, n_chunks, D, N]."""
    ends = scan(P, X, first)
    return torch.cat([first[:, None], ends[:, :-1]], 1)


def _triton_forward(x, dt, A, B, C, h0):
    (Bsz, T, D), N = x.shape, A.shape[1]
    block_t, block_d, block_n, warps, n_chunks, per_chunk = _plan(Bsz, T, D, N, x.device)
    n_dblocks, n_tiles = -(-D // block_d), -(-T // block_t)
    y = torch.empty(Bsz, T, D, device=x.device, dtype=x.dtype)
    saved = torch.empty(Bsz, n_tiles, D, N, device=x.device, dtype=torch.float32)
    A = A.contiguous()
    args = (T, D, N, n_dblocks, n_tiles, per_chunk, *_strides(x, dt, B, C))
    meta = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
    grid = (Bsz * n_dblocks, n_chunks)
    first = torch.zeros(Bsz, D, N, device=x.device) if h0 is None else h0.float()
    if n_chunks > 1:
        X = torch.empty(Bsz, n_chunks, D, N, device=x.device, dtype=torch.float32)
        P = torch.empty_like(X)
        _selective_fwd_kernel[grid](x, dt, A, B, C, X, y, X, P, *args, REDUCE=True, **meta)
        first = _chunk_carries(P, X, first)
    hT = torch.empty(Bsz, D, N, device=x.device, dtype=torch.float32)
    _selective_fwd_kernel[grid](x, dt, A, B, C, first.contiguous(), y, saved, hT, *args, REDUCE=False, **meta)
    return y, hT, saved


def _triton_backward(x, dt, A, B, C, h0, saved, dy, dhT):
    (Bsz, T, D), N = x.shape, A.shape[1]
    block_t, block_d, block_n, warps, n_chunks, per_chunk = _plan(Bsz, T, D, N, x.device, backward=True)
    n_dblocks, n_tiles = -(-D // block_d), -(-T // block_t)
    A, dy, dhT = A.contiguous(), dy.contiguous(), dhT.float().contiguous()
    args = (T, D, N, n_dblocks, n_tiles, per_chunk, *_strides(x, dt, B, C))
    meta = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
    grid = (Bsz * n_dblocks, n_chunks)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    ddt = torch.empty_like(dt, memory_format=torch.contiguous_format)
    dA = torch.empty(Bsz, n_chunks, D, N, device=x.device, dtype=torch.float32)
    dB, dC = (torch.empty(Bsz, n_dblocks, T, N, device=x.device, dtype=torch.float32) for _ in range(2))
    dh0 = torch.empty(Bsz, D, N, device=x.device, dtype=torch.float32)
    carry = dhT  # g after the last step, or with chunks the g entering each chunk in scan order
    if n_chunks > 1:
        X = torch.empty(Bsz, n_chunks, D, N, device=x.device, dtype=torch.float32)
        P = torch.empty_like(X)
        _selective_bwd_kernel[grid](x, dt, A, B, C, saved, dy, dhT, dx, ddt, X, P, dC, dh0, *args, REDUCE=True,
                                    **meta)
        carry = _chunk_carries(P, X, dhT).contiguous()
    _selective_bwd_kernel[grid](x, dt, A, B, C, saved, dy, carry, dx, ddt, dA, dB, dC, dh0, *args, REDUCE=False,
                                **meta)
    return dx, ddt, dA.sum((0, 1)).to(A.dtype), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype), dh0


if triton is not None:
    @triton.jit
    def _combine(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _tile(P, pid_b, t, d, s_b, s_t, s_d, mask):
        """A [BLOCK_T, BLOCK_D] (or [BLOCK_T, BLOCK_N]) tile of a [B, T, *] tensor, as float32, 0 outside."""
        return tl.load(P + pid_b * s_b + t[:, None] * s_t + d[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _last(x, rows, edge):
        """Row `edge` of a [BLOCK_T, BLOCK_D, BLOCK_N] tile."""
        return tl.sum(tl.where(rows[:, None, None] == edge, x, 0.0), 0)

    @triton.jit
    def _selective_fwd_kernel(X, DT, A, Bm, Cm, H0, Y, SAVED, OUT, T, D, N, n_dblocks, n_tiles, per_chunk,
                              sx_b, sx_t, sx_d, sdt_b, sdt_t, sdt_d, sb_b, sb_t, sb_n, sc_b, sc_t, sc_n,
                              REDUCE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_N: tl.constexpr):
        """REDUCE: the chunk's map, X -> SAVED (its end state from 0), OUT (P = exp(A sum dt)); else y, the states
        entering each tile (SAVED) and h_T (OUT), from the state entering the chunk (H0 [B, n_chunks, D, N])."""
        group, chunk, chunks = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
        pid_b, pid_d = group // n_dblocks, group % n_dblocks
        rows, ns = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_N)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok, n_ok = d < D, ns < N
        dn_ok = d_ok[:, None] & n_ok[None, :]
        dn = d[:, None] * N + ns[None, :]
        At = tl.load(A + dn, mask=dn_ok, other=0.0).to(tl.float32)
        here = (pid_b * chunks + chunk) * D * N + dn  # [B, n_chunks, D, N]
        if REDUCE:
            carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        else:
            carry = tl.load(H0 + here, mask=dn_ok, other=0.0)
        dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(per_chunk):
            tile = chunk * per_chunk + i
            t = tile * BLOCK_T + rows
            td_ok = (t < T)[:, None] & d_ok[None, :]
            dt = _tile(DT, pid_b, t, d, sdt_b, sdt_t, sdt_d, td_ok)
            x = _tile(X, pid_b, t, d, sx_b, sx_t, sx_d, td_ok)
            Bt = _tile(Bm, pid_b, t, ns, sb_b, sb_t, sb_n, (t < T)[:, None] & n_ok[None, :])
            # a = 1, b = 0 outside: padding passes the state through
            p, s = tl.associative_scan((tl.exp(dt[:, :, None] * At[None, :, :]), (dt * x)[:, :, None] * Bt[:, None, :]),
                                       0, _combine)
            if REDUCE:
                dt_sum += tl.sum(dt, 0)
            else:
                tl.store(SAVED + ((pid_b * n_tiles + tile) * D + d[:, None]) * N + ns[None, :], carry,
                         mask=dn_ok & (tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.int32) + tile < n_tiles))
            h = p * carry[None, :, :] + s
            carry = _last(h, rows, BLOCK_T - 1)
            if not REDUCE:
                Ct = _tile(Cm, pid_b, t, ns, sc_b, sc_t, sc_n, (t < T)[:, None] & n_ok[None, :])
                tl.store(Y + (pid_b * T + t[:, None]) * D + d[None, :], tl.sum(h * Ct[:, None, :], 2)
                         .to(Y.dtype.element_ty), mask=td_ok)
        if REDUCE:
            tl.store(SAVED + here, carry, mask=dn_ok)
            tl.store(OUT + here, tl.exp(dt_sum[:, None] * At), mask=dn_ok)
        elif chunk == chunks - 1:
            tl.store(OUT + pid_b * D * N + dn, carry, mask=dn_ok)

    @triton.jit
    def _selective_bwd_kernel(X, DT, A, Bm, Cm, SAVED, DY, G0, DX, DDT, DA, DB, DC, DH0, T, D, N, n_dblocks, n_tiles,
                              per_chunk, sx_b, sx_t, sx_d, sdt_b, sdt_t, sdt_d, sb_b, sb_t, sb_n, sc_b, sc_t, sc_n,
                              REDUCE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_N: tl.constexpr):
        """Chunks in scan order (the last first). REDUCE: the chunk's adjoint map, X -> DA (its g from 0), P -> DB
        (exp(A sum dt_{t+1})); else the gradients, from G0: dL/dh_T, or the g entering each chunk [B, n_chunks, D, N]."""
        group, chunk, chunks = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
        pid_b, pid_d = group // n_dblocks, group % n_dblocks
        n_saved = (n_tiles + 1) // 2  # the forward's tiles, twice as long
        rows, ns = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_N)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok, n_ok = d < D, ns < N
        dn_ok = d_ok[:, None] & n_ok[None, :]
        dn = d[:, None] * N + ns[None, :]
        At = tl.load(A + dn, mask=dn_ok, other=0.0).to(tl.float32)
        here = (pid_b * chunks + chunk) * D * N + dn
        if REDUCE:
            gc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        elif chunks > 1:
            gc = tl.load(G0 + here, mask=dn_ok, other=0.0)
        else:
            gc = tl.load(G0 + pid_b * D * N + dn, mask=dn_ok, other=0.0)  # g of the step after the tile
        dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(per_chunk):
            tile = n_tiles - 1 - (chunk * per_chunk + i)
            t = tile * BLOCK_T + rows
            t_ok = (t >= 0) & (t < T)
            td_ok = t_ok[:, None] & d_ok[None, :]
            tn_ok = t_ok[:, None] & n_ok[None, :]
            dy = _tile(DY, pid_b, t, d, T * D, D, 1, td_ok)
            Ct = _tile(Cm, pid_b, t, ns, sc_b, sc_t, sc_n, tn_ok)
            dt_next = _tile(DT, pid_b, t + 1, d, sdt_b, sdt_t, sdt_d, (t >= 0)[:, None] & (t + 1 < T)[:, None] & d_ok[None, :])
            pg, sg = tl.associative_scan((tl.exp(dt_next[:, :, None] * At[None, :, :]), dy[:, :, None] * Ct[:, None, :]),
                                         0, _combine, reverse=True)
            g = pg * gc[None, :, :] + sg
            gc = _last(g, rows, 0)
            if REDUCE:
                dt_sum += tl.sum(dt_next, 0)
            else:
                dt = _tile(DT, pid_b, t, d, sdt_b, sdt_t, sdt_d, td_ok)
                x = _tile(X, pid_b, t, d, sx_b, sx_t, sx_d, td_ok)
                Bt = _tile(Bm, pid_b, t, ns, sb_b, sb_t, sb_n, tn_ok)
                # u_t = a_t h_{t-1} = a_t (u_{t-1} + b_{t-1}), from the state entering the tile
                prev_ok = (rows > 0) & t_ok
                dt_p = _tile(DT, pid_b, t - 1, d, sdt_b, sdt_t, sdt_d, prev_ok[:, None] & d_ok[None, :])
                x_p = _tile(X, pid_b, t - 1, d, sx_b, sx_t, sx_d, prev_ok[:, None] & d_ok[None, :])
                B_p = _tile(Bm, pid_b, t - 1, ns, sb_b, sb_t, sb_n, prev_ok[:, None] & n_ok[None, :])
                a = tl.exp(dt[:, :, None] * At[None, :, :])
                p, s = tl.associative_scan((a, a * ((dt_p * x_p)[:, :, None] * B_p[:, None, :])), 0, _combine)
                h0 = tl.load(SAVED + ((pid_b * n_saved + tile // 2) * D + d[:, None]) * N + ns[None, :],
                             mask=dn_ok & (tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.int32) + tile >= 0), other=0.0)
                if tile % 2 == 1:  # saved: the state entering the tile before, carried here through it
                    t_b = t - BLOCK_T
                    dt_b = _tile(DT, pid_b, t_b, d, sdt_b, sdt_t, sdt_d, d_ok[None, :])
                    x_b = _tile(X, pid_b, t_b, d, sx_b, sx_t, sx_d, d_ok[None, :])
                    B_b = _tile(Bm, pid_b, t_b, ns, sb_b, sb_t, sb_n, n_ok[None, :])
                    p_b, s_b = tl.associative_scan((tl.exp(dt_b[:, :, None] * At[None, :, :]),
                                                    (dt_b * x_b)[:, :, None] * B_b[:, None, :]), 0, _combine)
                    h0 = _last(p_b * h0[None, :, :] + s_b, rows, BLOCK_T - 1)
                u = p * h0[None, :, :] + s
                h = u + (dt * x)[:, :, None] * Bt[:, None, :]
                q = g * u  # the gradient at dt A
                gB = tl.sum(g * Bt[:, None, :], 2)
                offs = (pid_b * T + t[:, None]) * D + d[None, :]
                tl.store(DX + offs, (dt * gB).to(DX.dtype.element_ty), mask=td_ok)
                tl.store(DDT + offs, (tl.sum(q * At[None, :, :], 2) + x * gB).to(DDT.dtype.element_ty), mask=td_ok)
                part = (group * T + t[:, None]) * N + ns[None, :]  # [B, n_dblocks, T, N]
                tl.store(DB + part, tl.sum(g * (dt * x)[:, :, None], 1), mask=tn_ok)
                tl.store(DC + part, tl.sum(h * dy[:, :, None], 1), mask=tn_ok)
                dA += tl.sum(q * dt[:, :, None], 0)
                if tile == 0:
                    tl.store(DH0 + pid_b * D * N + dn, _last(a * g, rows, 0), mask=dn_ok)
        if REDUCE:
            tl.store(DA + here, gc, mask=dn_ok)
            tl.store(DB + here, tl.exp(dt_sum[:, None] * At), mask=dn_ok)
        else:
            tl.store(DA + here, dA, mask=dn_ok)
