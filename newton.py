"""Diagonal nonlinear recurrences solved by Newton's method tile by tile, in one Triton kernel per layer.

    rnn:   h_t = tanh(u_t + w * h_{t-1})                                        (rnn.py)
    lstm:  (c_t, h_t) = F((c_{t-1}, h_{t-1}), u_t), gates from u_t + r * h_{t-1}   (lstm.py's cell)

Why: rnn.py's and lstm.py's reference solvers (rnn_newton, lstm_newton) run Newton (DEER, Lim et al.
2024, arXiv:2309.12252; ParaRNN, Danieli et al. 2025, arXiv:2510.21450) on the whole sequence, each
iteration about 30 eager PyTorch launches and a host sync for the convergence test, so the ops ran
outside train.py's CUDA graphs: on an H100 (bench.py --only train) lstm trained at 104k tokens/s
compiled (0.05x compiled attention's 2.07M), rnn at 575k (0.28x). With this kernel: lstm 1.05M (0.52x of
2.03M), rnn 1.95M (0.96x) (H100, commit 5a54d12).

What: `rnn(u, w, h0, tol)` and `lstm(u, r, s0, tol, full)` return the same states as those solvers,
and the mean number of Newton iterations per tile as a tensor, with no host sync: one launch, which
a CUDA graph can capture. A program owns one batch row and BLOCK_C channels and walks T in tiles of
BLOCK_T steps, in order. The state entering a tile is exact (the previous tile's last state, or
h0), so inside the tile Newton solves only BLOCK_T steps, in registers: the residual and the
Jacobians elementwise, the update delta_t = J_t delta_{t-1} + r_t by tl.associative_scan (a
diagonal J for rnn; a 2x2 block per channel for lstm, scan.py's _combine2), the same clipping,
Picard fallback and stopping rule as the reference (max |delta| <= tol, relative to 1 + |s| for
lstm; or below sqrt(tol) with no new minimum for 3 iterations). After k iterations the tile's
first k steps are exact (each waits only for its predecessor), so BLOCK_T iterations solve it
exactly from any guess: the loop stops on the data, inside the kernel.

Each iteration evaluates the cell at the iterate shifted by one step, h_{t-1}. The kernel stores the
iterate into the output, waits at a barrier, and reads it back one row earlier (row 0 reads the
previous tile's final state, or h0), then waits again before the next store overwrites it.

Engines: the kernel on CUDA (and on the CPU under TRITON_INTERPRET=1, for the tests), in float32;
rnn.py's and lstm.py's PyTorch solvers elsewhere (CPU, MPS, float64). The backward is implicit
differentiation at the solution: rnn.py's by scan.py's adjoint scan; lstm's by `lstm_backward`, one
more kernel that walks the tiles backwards (lstm.py's PyTorch backward elsewhere). With it LSTM(512)'s forward
and backward at batch 8, T = 2048 takes 4.50 ms, against 7.71 with the PyTorch backward (H100, commit 95ce11b).
"""
import math

import torch

from scan import INTERPRET, _next_power_of_2, triton, use_triton

if triton is not None:
    import triton.language as tl

    from scan import _combine2, combine, row as _row


def runs(u):
    """Whether the kernel solves for u (float32 on CUDA, or on the CPU under TRITON_INTERPRET=1)."""
    return use_triton(u) and u.dtype == torch.float32


# BLOCK_T, BLOCK_C, warps on a GPU: 8 (rnn) and 4 (lstm) tile elements per thread, where ptxas for sm_90 spills
# nothing (registers: 127 and 182 with Triton 3.6, 122 and 150 with 3.9; on 4 warps lstm needs all 255 and spills,
# and so does rnn under 3.9). Not yet timed against other tilings.
PLAN = {"rnn": (64, 32, 8), "lstm": (32, 32, 8)}


def _plan(kind, C):
    if INTERPRET:  # the interpreter's scan pays per element, and a tile up to BLOCK_T iterations
        return 8, min(8, _next_power_of_2(C)), 1
    block_t, block_c, warps = PLAN[kind]
    return block_t, min(block_c, _next_power_of_2(C)), warps


def rnn(u, w, h0, tol):
    """u [B, T, D], w [D], h0 [B, D] (float32) -> (states [B, T, D], mean Newton iterations per tile)."""
    (B, T, C), (block_t, block_c, warps) = u.shape, _plan("rnn", u.shape[2])
    n_cblocks, n_tiles = -(-C // block_c), -(-T // block_t)
    h = torch.empty_like(u, memory_format=torch.contiguous_format)
    iters = torch.empty(B * n_cblocks * n_tiles, dtype=torch.int32, device=u.device)
    _rnn_kernel[(B * n_cblocks,)](u.contiguous(), w.contiguous(), h0.contiguous(), h, iters, T, C, n_cblocks,
                                  n_tiles, tol, math.sqrt(tol), BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    return h, iters.float().mean()


def lstm(u, r, s0, tol, full):
    """u [B, T, 4, D], r [4, D], s0 [B, 2, D] = (c, h) (float32); full: the exact 2x2 Jacobian, else its
    diagonal -> (states [B, T, 2, D], mean Newton iterations per tile)."""
    (B, T, _, C), (block_t, block_c, warps) = u.shape, _plan("lstm", u.shape[3])
    n_cblocks, n_tiles = -(-C // block_c), -(-T // block_t)
    s = u.new_empty(B, T, 2, C)
    iters = torch.empty(B * n_cblocks * n_tiles, dtype=torch.int32, device=u.device)
    _lstm_kernel[(B * n_cblocks,)](u.contiguous(), r.contiguous(), s0.contiguous(), s, iters, T, C, n_cblocks,
                                   n_tiles, tol, math.sqrt(tol), FULL=full, BLOCK_T=block_t, BLOCK_C=block_c,
                                   num_warps=warps)
    return s, iters.float().mean()


@torch.library.custom_op("zoo::lstm_backward", mutates_args=())
def lstm_backward(u: torch.Tensor, r: torch.Tensor, s: torch.Tensor, s0: torch.Tensor,
                  ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lstm.py's adjoint at the solution in one launch: u [B, T, 4, D], r [4, D], s [B, T, 2, D] the states, s0
    [B, 2, D], ds = dL/ds [B, T, 2, D] (float32) -> (dL/du, dL/dr, dL/ds0). A program walks its tiles backwards:
    the adjoint lam_t = ds_t + A_{t+1}^T lam_{t+1} by tl.associative_scan, entered from the later tile's lam,
    then the gates' derivatives at every t (lstm.derivatives), all in registers."""
    (B, T, _, C), (block_t, block_c, warps) = u.shape, _plan("lstm", u.shape[3])
    n_cblocks, n_tiles = -(-C // block_c), -(-T // block_t)
    du, dr = torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(B, 4, C)
    ds0 = s0.new_empty(s0.shape)
    _lstm_backward_kernel[(B * n_cblocks,)](u.contiguous(), r.contiguous(), s.contiguous(), s0.contiguous(),
                                            ds.contiguous(), du, dr, ds0, T, C, n_cblocks, n_tiles,
                                            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)
    return du, dr.sum(0), ds0


@lstm_backward.register_fake
def _(u, r, s, s0, ds):  # a custom op, so that torch.compile traces lstm.py's backward around one opaque launch
    return torch.empty_like(u, memory_format=torch.contiguous_format), r.new_empty(r.shape), s0.new_empty(s0.shape)


if triton is not None:
    @triton.jit
    def _tanh(x):
        """tanh from exp(-2|x|) <= 1: no overflow (the interpreter has no libdevice)."""
        e = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -y, y)

    @triton.jit
    def _shifted(S, x, offs, mask, t, first, stride_t):
        """x_{t-1} for every row of a tile: x is stored into S (the output), then read back one step
        (stride_t) earlier; the row before t = 0 is first [BLOCK_C]. The barriers: every row is
        written before any is read, and read before the next iteration overwrites it."""
        tl.store(S + offs, x, mask=mask)
        tl.debug_barrier()
        later = (t >= 1)[:, None]
        prev = tl.load(S + offs - stride_t, mask=mask & later, other=0.0, volatile=True)
        tl.debug_barrier()
        return tl.where(later, prev, first[None, :])

    @triton.jit
    def _stopped(size, best, stall, k, tol, tol_stuck, BLOCK_T: tl.constexpr):
        """The reference's stopping rule (converged, or stuck at rounding level), and the cap of
        BLOCK_T iterations: (stop, best, stall)."""
        stall = tl.where(size >= best, stall + 1, 0)
        best = tl.minimum(best, size)
        return (size <= tol) | ((size <= tol_stuck) & (stall >= 3)) | (k >= BLOCK_T), best, stall

    @triton.jit
    def _rnn_kernel(U, W, H0, H, ITERS, T, C, n_cblocks, n_tiles, tol, tol_stuck,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        group = tl.program_id(0)
        pid_b, pid_c = group // n_cblocks, group % n_cblocks
        rows = tl.arange(0, BLOCK_T)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        w = tl.load(W + cols, mask=col_ok, other=0.0)[None, :]
        h0 = tl.load(H0 + pid_b * C + cols, mask=col_ok, other=0.0)
        for tile in range(n_tiles):
            t = tile * BLOCK_T + rows
            mask = (t < T)[:, None] & col_ok[None, :]
            offs = (pid_b.to(tl.int64) * T + t[:, None]) * C + cols[None, :]
            u = tl.load(U + offs, mask=mask, other=0.0)
            h = _tanh(u)  # the reference's guess: h_{t-1} = 0
            prev = _shifted(H, h, offs, mask, t, h0, C)
            k, best, stall, stop = 0, float("inf"), 0, False
            while not stop:
                f = _tanh(u + w * prev)
                res = f - h
                _, delta = tl.associative_scan(((1.0 - f * f) * w, res), 0, combine)
                delta = tl.where(tl.abs(delta) < float("inf"), delta, res)  # overflow: the Picard step there
                h = tl.minimum(tl.maximum(h + delta, -1.0), 1.0)
                k += 1
                size = tl.max(tl.max(tl.where(mask, tl.abs(delta), 0.0), 1), 0)
                stop, best, stall = _stopped(size, best, stall, k, tol, tol_stuck, BLOCK_T)
                prev = _shifted(H, h, offs, mask, t, h0, C)
            tl.store(ITERS + group * n_tiles + tile, k)

    @triton.jit
    def _cell(u_i, u_f, u_o, u_g, c_prev, h_prev, r_i, r_f, r_o, r_g):
        """lstm.py's cell and derivatives: c_t, h_t, f, A_t = [[f, a], [k f, a_hh]] as (f, a, k, a_hh), and dz
        (dc_t/dz for the gates i, f, g, dh_t/dz for o)."""
        i = tl.sigmoid(u_i + r_i * h_prev)
        f = tl.sigmoid(u_f + r_f * h_prev)
        o = tl.sigmoid(u_o + r_o * h_prev)
        g = _tanh(u_g + r_g * h_prev)
        c_new = f * c_prev + i * g
        tc = _tanh(c_new)
        dz_i, dz_f, dz_o, dz_g = g * i * (1.0 - i), c_prev * f * (1.0 - f), tc * o * (1.0 - o), i * (1.0 - g * g)
        a = dz_i * r_i + dz_f * r_f + dz_g * r_g
        k = o * (1.0 - tc * tc)
        return c_new, o * tc, f, a, k, dz_o * r_o + k * a, dz_i, dz_f, dz_o, dz_g

    @triton.jit
    def _lstm_program(R, S0, C, n_cblocks, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """What an lstm program owns: its batch row and channel block, the recurrent weights and the initial state."""
        group = tl.program_id(0)
        pid_b, pid_c = group // n_cblocks, group % n_cblocks
        rows = tl.arange(0, BLOCK_T)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        r_i = tl.load(R + cols, mask=col_ok, other=0.0)[None, :]
        r_f = tl.load(R + C + cols, mask=col_ok, other=0.0)[None, :]
        r_o = tl.load(R + 2 * C + cols, mask=col_ok, other=0.0)[None, :]
        r_g = tl.load(R + 3 * C + cols, mask=col_ok, other=0.0)[None, :]
        c0 = tl.load(S0 + pid_b * 2 * C + cols, mask=col_ok, other=0.0)
        h0 = tl.load(S0 + pid_b * 2 * C + C + cols, mask=col_ok, other=0.0)
        return group, pid_b, rows, cols, col_ok, r_i, r_f, r_o, r_g, c0, h0

    @triton.jit
    def _lstm_kernel(U, R, S0, S, ITERS, T, C, n_cblocks, n_tiles, tol, tol_stuck,
                     FULL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        program = _lstm_program(R, S0, C, n_cblocks, BLOCK_T, BLOCK_C)
        group, pid_b, rows, cols, col_ok, r_i, r_f, r_o, r_g, c0, h0 = program
        for tile in range(n_tiles):
            t = tile * BLOCK_T + rows
            mask = (t < T)[:, None] & col_ok[None, :]
            row = pid_b.to(tl.int64) * T + t[:, None]
            u_offs, s_offs = row * 4 * C + cols[None, :], row * 2 * C + cols[None, :]
            u_i = tl.load(U + u_offs, mask=mask, other=0.0)
            u_f = tl.load(U + u_offs + C, mask=mask, other=0.0)
            u_o = tl.load(U + u_offs + 2 * C, mask=mask, other=0.0)
            u_g = tl.load(U + u_offs + 3 * C, mask=mask, other=0.0)
            c_max = tl.abs(c0)[None, :] + (t + 1).to(tl.float32)[:, None]  # |c_t| <= |c_{-1}| + t + 1
            c = tl.sigmoid(u_i) * _tanh(u_g)  # the reference's guess: the cell from (0, 0)
            h = tl.sigmoid(u_o) * _tanh(c)
            c_prev = _shifted(S, c, s_offs, mask, t, c0, 2 * C)
            h_prev = _shifted(S + C, h, s_offs, mask, t, h0, 2 * C)
            k, best, stall, stop = 0, float("inf"), 0, False
            while not stop:
                c_new, h_new, f, a, kk, a_hh, _, _, _, _ = _cell(u_i, u_f, u_o, u_g, c_prev, h_prev, r_i, r_f, r_o, r_g)
                res_c, res_h = c_new - c, h_new - h
                if FULL:
                    a_ch, a_hc = a, kk * f
                else:  # the diagonal quasi-Newton
                    a_ch, a_hc = tl.zeros_like(a), tl.zeros_like(a)
                _, _, _, _, d_c, d_h = tl.associative_scan((f, a_ch, a_hc, a_hh, res_c, res_h), 0, _combine2)
                d_c = tl.where(tl.abs(d_c) < float("inf"), d_c, res_c)  # overflow: the Picard step there
                d_h = tl.where(tl.abs(d_h) < float("inf"), d_h, res_h)
                c = tl.minimum(tl.maximum(c + d_c, -c_max), c_max)
                h = tl.minimum(tl.maximum(h + d_h, -1.0), 1.0)
                k += 1
                rel = tl.maximum(tl.abs(d_c) / (1.0 + tl.abs(c)), tl.abs(d_h) / (1.0 + tl.abs(h)))
                size = tl.max(tl.max(tl.where(mask, rel, 0.0), 1), 0)
                stop, best, stall = _stopped(size, best, stall, k, tol, tol_stuck, BLOCK_T)
                c_prev = _shifted(S, c, s_offs, mask, t, c0, 2 * C)
                h_prev = _shifted(S + C, h, s_offs, mask, t, h0, 2 * C)
            tl.store(ITERS + group * n_tiles + tile, k)

    @triton.jit
    def _lstm_backward_kernel(U, R, S, S0, DS, DU, DR, DS0, T, C, n_cblocks, n_tiles,
                              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        program = _lstm_program(R, S0, C, n_cblocks, BLOCK_T, BLOCK_C)
        group, pid_b, rows, cols, col_ok, r_i, r_f, r_o, r_g, c0, h0 = program
        lam_c0 = tl.zeros([BLOCK_C], dtype=tl.float32)  # lam at the later tile's first step
        lam_h0 = tl.zeros([BLOCK_C], dtype=tl.float32)
        dr_i, dr_f, dr_o, dr_g = lam_c0, lam_c0, lam_c0, lam_c0
        ds_c, ds_h = lam_c0, lam_c0
        for k in range(n_tiles):
            t = (n_tiles - 1 - k) * BLOCK_T + rows
            mask = (t < T)[:, None] & col_ok[None, :]
            row = pid_b.to(tl.int64) * T + t[:, None]
            u_offs, s_offs = row * 4 * C + cols[None, :], row * 2 * C + cols[None, :]
            c = tl.load(S + s_offs, mask=mask, other=0.0)
            h = tl.load(S + s_offs + C, mask=mask, other=0.0)
            # A_{t+1}, from u_{t+1} at s_t (none after the last step), transposed: lam_t = ds_t + A_{t+1}^T lam_{t+1}
            nxt = mask & (t + 1 < T)[:, None]
            _, _, f1, a1, k1, a_hh1, _, _, _, _ = _cell(
                tl.load(U + u_offs + 4 * C, mask=nxt, other=0.0), tl.load(U + u_offs + 5 * C, mask=nxt, other=0.0),
                tl.load(U + u_offs + 6 * C, mask=nxt, other=0.0), tl.load(U + u_offs + 7 * C, mask=nxt, other=0.0),
                c, h, r_i, r_f, r_o, r_g)
            p, q, r, s, x, y = tl.associative_scan(
                (tl.where(nxt, f1, 0.0), tl.where(nxt, k1 * f1, 0.0), tl.where(nxt, a1, 0.0),
                 tl.where(nxt, a_hh1, 0.0), tl.load(DS + s_offs, mask=mask, other=0.0),
                 tl.load(DS + s_offs + C, mask=mask, other=0.0)), 0, _combine2, reverse=True)
            lam_c = p * lam_c0[None, :] + q * lam_h0[None, :] + x
            lam_h = r * lam_c0[None, :] + s * lam_h0[None, :] + y
            lam_c0, lam_h0 = _row(lam_c, rows[:, None], 0), _row(lam_h, rows[:, None], 0)
            # step t's gates, at s_{t-1}: dL/du_t = dz_t * (dL/dc_t in full, or dL/dh_t for o)
            later = (t >= 1)[:, None]
            c_prev = tl.where(later, tl.load(S + s_offs - 2 * C, mask=mask & later, other=0.0), c0[None, :])
            h_prev = tl.where(later, tl.load(S + s_offs - C, mask=mask & later, other=0.0), h0[None, :])
            _, _, f, _, kk, _, dz_i, dz_f, dz_o, dz_g = _cell(
                tl.load(U + u_offs, mask=mask, other=0.0), tl.load(U + u_offs + C, mask=mask, other=0.0),
                tl.load(U + u_offs + 2 * C, mask=mask, other=0.0), tl.load(U + u_offs + 3 * C, mask=mask, other=0.0),
                c_prev, h_prev, r_i, r_f, r_o, r_g)
            dc = lam_c + lam_h * kk
            du_i, du_f, du_o, du_g = dz_i * dc, dz_f * dc, dz_o * lam_h, dz_g * dc
            tl.store(DU + u_offs, du_i, mask=mask)
            tl.store(DU + u_offs + C, du_f, mask=mask)
            tl.store(DU + u_offs + 2 * C, du_o, mask=mask)
            tl.store(DU + u_offs + 3 * C, du_g, mask=mask)
            dr_i += tl.sum(tl.where(mask, du_i * h_prev, 0.0), 0)
            dr_f += tl.sum(tl.where(mask, du_f * h_prev, 0.0), 0)
            dr_o += tl.sum(tl.where(mask, du_o * h_prev, 0.0), 0)
            dr_g += tl.sum(tl.where(mask, du_g * h_prev, 0.0), 0)
            ds_c = _row(f * dc, rows[:, None], 0)  # dL/ds_{-1} = A_0^T lam_0, kept from the first tile (walked last)
            ds_h = _row(du_i * r_i + du_f * r_f + du_o * r_o + du_g * r_g, rows[:, None], 0)
        out = pid_b * 4 * C + cols
        tl.store(DR + out, dr_i, mask=col_ok)
        tl.store(DR + out + C, dr_f, mask=col_ok)
        tl.store(DR + out + 2 * C, dr_o, mask=col_ok)
        tl.store(DR + out + 3 * C, dr_g, mask=col_ok)
        tl.store(DS0 + pid_b * 2 * C + cols, ds_c, mask=col_ok)
        tl.store(DS0 + pid_b * 2 * C + C + cols, ds_h, mask=col_ok)
