"""The recurrence of the scalar-decay family, chunked and fused into one kernel per pass. For every head:

    S_t = exp(g_t) S_{t-1} + v_t k_t^T,    y_t = S_t q_t                 (g_t <= 0: one log decay per head and step)

linear attention (g = 0), RetNet (g = log gamma per head), gated retention (g learned) and Mamba-2's SSD (g = dt A,
q = C, k = B, v = dt x) are this recurrence; so is Mamba-3's two-term input, with one weight per token and the
diagonal's excess taken back (mamba3.py). `scalar_decay(q, k, v, g, S)`: q, k [B, T, G, Dk] with G = H, or G
groups of H / G heads sharing them (Mamba-2's B and C; head h reads group h // (H / G)); v [B, T, H, Dv]; g [B, T, H];
S [B, H, Dv, Dk] the initial state. Returns y [B, T, H, Dv] in the dtype of q, k and v (promoted; under autocast,
autocast's), and the final state, float32 (float64 stays). Strides are read as given: an expanded g (RetNet's
constant decay) is never copied.

Chunkwise form (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training", sec. 3,
with GLA's decay a scalar: fla's chunk_simple_gla; the same block decomposition as Mamba-2's SSD, Dao & Gu 2024,
sec. 6). Cut time into chunks of L steps; c_i = g_1 + ... + g_i from the chunk's start, S0 the state entering it:

    y_i = exp(c_i) S0 q_i + sum_{j<=i} exp(c_i - c_j) (q_i . k_j) v_j         (A = (Q K^T) * D, D_ij = exp(c_i - c_j))
    S1  = exp(c_L) S0 + sum_j exp(c_L - c_j) v_j k_j^T                          (the state leaving it)

Backward, dS1 the gradient at the state leaving the chunk (dS_final for the last), dA = (dY V^T) * D:

    dq_i = exp(c_i) S0^T dy_i + (dA K)_i       dk_j = (dA^T Q)_j + exp(c_L - c_j) dS1^T v_j
    dv_j = (A^T dY)_j + exp(c_L - c_j) dS1 k_j     dS0 = exp(c_L) dS1 + sum_i exp(c_i) dy_i q_i^T

and the decays: S_r = exp(g_r) S_{r-1} + ..., so dL/dg_r = exp(g_r) <dS_r, S_{r-1}>, for r in a chunk

    dL/dg_r = sum_{j<r<=i} exp(c_i - c_j) (q_i . k_j)(dy_i . v_j) + sum_{i>=r} exp(c_i) dy_i . S0 q_i
              + sum_{j<r} exp(c_L - c_j) v_j . dS1 k_j + exp(c_L) <dS1, S0>

Every term carries exp(g_r): where a decay underflows, so does its gradient. (The shorter dL/dg_r = sum_{t>=r}
q_t . dq_t - k_t . dk_t, fla's, is a difference of O(1) terms there: rounding noise, 1e-16 against a true 1e-209 at
Mamba-2's dt ~ 30.) The sums over r are taken by masks, never as differences of cumulative sums, for the same reason.

Every exponent above is <= 0 (c decreases along the chunk; D is masked to -inf above the diagonal before the exp):
nothing overflows at any T or decay. In the Triton kernels exp(c_i - c_j) is a difference of cumulative sums, as in
fla's and mamba_ssm's kernels: in float32 its absolute error is ~1e-7 |c_i|, small while a chunk's total decay is
moderate. The PyTorch engine sums segments instead (decay_mask, and c_L - c_j as g_{j+1} + ... + g_L): Mamba-3 with
log decays of -3e5 and -1e-2 in one chunk put its final state 1.6e-2 off in float32 as a difference, 7e-8 as a sum.

A file of its own because five models share one kernel set. Engines: Triton on CUDA (and on the CPU under
TRITON_INTERPRET=1), fla's chunk layout: a walk over the chunks with a [BV, Dk] tile of S in float32 registers keeps the
state entering each chunk (one dot a chunk; kept in the inputs' dtype, which the dots read it in, as fla keeps its
chunk states), then one program per (batch, head, chunk) computes y from it. The backward reads those states, saved by
the forward, and walks back with dS likewise (dS0 = exp(c_L) dS1 + ..., one dot a chunk), keeping the gradient at
the state leaving each chunk; given both, every chunk's dq, dk, dv and dg are independent (one program a chunk, walking
its value tiles). Dots in the inputs' dtype accumulate in float32 (float32 inputs: exact float32 dots, no tf32).
Elsewhere (CPU, MPS, float64, Dk > 128) the same equations in PyTorch on chunk tensors, the chunk states through
scan.py. Forward and backward are custom ops (zoo::scalar_decay, zoo::scalar_decay_backward) with fakes, built by
scan.py's `register`.
"""
import torch
import torch.nn.functional as F

from scan import INTERPRET, programs, register, torch_scan, triton, use_triton

if triton is not None:
    import triton.language as tl

CHUNK = 64  # L: the PyTorch engine's chunk and the kernels' in 16-bit (see _plan for theirs in float32)


def scalar_decay(q, k, v, g, S):
    """q, k [B, T, G, Dk], v [B, T, H, Dv], g [B, T, H] (<= 0), S [B, H, Dv, Dk] -> y [B, T, H, Dv], S_final."""
    (Bsz, T, G, Dk), (H, Dv) = q.shape, v.shape[2:]
    if k.shape != q.shape or v.shape[:2] != (Bsz, T) or H % G or g.shape != (Bsz, T, H) or S.shape != (Bsz, H, Dv, Dk):
        raise ValueError("scalar_decay: needs q, k [B, T, G, Dk], v [B, T, H, Dv] (G | H), g [B, T, H], "
                         f"S [B, H, Dv, Dk]; got {[tuple(t.shape) for t in (q, k, v, g, S)]}")
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if torch.is_autocast_enabled(v.device.type):  # matmuls inside: autocast's dtype, as an einsum would take
        dtype = torch.get_autocast_dtype(v.device.type)
    return _op(q.to(dtype), k.to(dtype), v.to(dtype), g, S)[:2]


def decay_mask(g):
    """g: per-step log decays [..., L] -> [..., L, L]: exp(g_{s+1} + ... + g_t) for t >= s, 0 above the
    diagonal. Segment sums of masked copies, not differences of cumsums, masked to -inf before the exp."""
    L = g.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=g.device).tril()
    sums = g[..., :, None].expand(*g.shape, L).masked_fill(~causal.tril(-1), 0).cumsum(-2)  # g_{s+1} + .. + g_t
    return sums.masked_fill(~causal, float("-inf")).exp()


def _acc(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _kernel(q, k, v, g, S):
    return use_triton(v) and _acc(q, k, v, g, S) == torch.float32 and q.shape[-1] <= 128


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, S: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, S_final, the kernels' states entering each chunk, kept for their backward; empty for the PyTorch engine)."""
    if _kernel(q, k, v, g, S):
        return _triton_forward(q, k, v, g, S)
    y, S_final, _ = _torch_forward(q, k, v, g, S)
    return y, S_final, v.new_empty(0)


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, S: torch.Tensor,
              states: torch.Tensor, dy: torch.Tensor, dS_final: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq and dk per head [B, T, H, Dk] in float32 or float64, dv, dg, dS in their inputs' dtypes). The sums over a
    group's heads and the casts are left to the caller (_grads), where torch.compile fuses them with what follows."""
    acc = _acc(q, k, v, g, S)
    if _kernel(q, k, v, g, S):
        dq, dk, dv, dg, dS = _triton_backward(q, k, v, g, states, dy, dS_final)
    else:
        dq, dk, dv, dg, dS = _torch_backward(q, k, v, g, S, dy.to(acc), dS_final.to(acc))
    return dq, dk, dv.to(v.dtype), dg.to(g.dtype), dS.to(S.dtype)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[2])
    ctx.mark_non_differentiable(output[2])


def _grads(ctx, backward, dy, dS_final, _):
    q, k, v, g, S, states = ctx.saved_tensors
    dy = torch.zeros(v.shape, dtype=v.dtype, device=v.device) if dy is None else dy
    dS_final = torch.zeros(S.shape, dtype=_acc(q, k, v, g, S), device=S.device) if dS_final is None else dS_final
    dq, dk, dv, dg, dS = backward(q, k, v, g, S, states, dy, dS_final)
    G = q.shape[2]
    dq, dk = (x if G == x.shape[2] else x.unflatten(2, (G, -1)).sum(3) for x in (dq, dk))  # per head -> per group
    return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dS


def _fake(q, k, v, g, S):
    (Bsz, T, _, Dk), (H, Dv) = q.shape, v.shape[2:]
    states = v.new_empty((Bsz, H, triton.cdiv(T, _plan(Dk, v.dtype)[0]), Dv, Dk) if _kernel(q, k, v, g, S) else 0)
    return v.new_empty(v.shape), S.new_empty(S.shape, dtype=_acc(q, k, v, g, S)), states


def _backward_fake(q, k, v, g, S, states, dy, dS_final):
    per_head = q.new_empty(q.shape[:2] + v.shape[2:3] + q.shape[3:], dtype=_acc(q, k, v, g, S))
    return per_head, per_head.new_empty(per_head.shape), *(x.new_empty(x.shape) for x in (v, g, S))


_op = register("scalar_decay", _forward, _backward, _fake, _backward_fake, _setup, _grads)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch engine: the equations above on chunk tensors [B, T/L, H, L, *], the chunk states through scan.py.

def _chunks(x, L, H):
    """[B, T, G or H, *] -> [B, T/L, H, L, *] in float32 or float64, T padded with zeros (g = 0: the state passes)."""
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, -x.shape[1] % L))
    x = x.unflatten(1, (-1, L)).transpose(2, 3)
    return x.repeat_interleave(H // x.shape[2], 2) if x.shape[2] < H else x


def _torch_chunks(q, k, v, g, S):
    acc, H = _acc(q, k, v, g, S), v.shape[2]
    q, k, v, g = (_chunks(x.to(acc), CHUNK, H) for x in (q, k, v, g))
    c = g.cumsum(-1)  # [B, T/L, H, L]
    to_end = F.pad(g[..., 1:], (0, 1)).flip(-1).cumsum(-1).flip(-1)  # c_L - c_j as g_{j+1} + ... + g_L: no cancelling
    return q, k, v, c, decay_mask(g), c[..., -1:].exp(), to_end.exp()[..., None], acc


def _torch_forward(q, k, v, g, S):
    """(y, S_final, the states entering each chunk)."""
    T, dtype = q.shape[1], v.dtype
    q, k, v, c, D, a, to_end, acc = _torch_chunks(q, k, v, g, S)
    S_after = torch_scan(a[..., None], v.mT @ (k * to_end), S.to(acc), False)  # [B, T/L, H, Dv, Dk]
    S_before = torch.cat([S.to(acc)[:, None], S_after[:, :-1]], 1)
    y = ((q @ k.mT) * D) @ v + (q * c.exp()[..., None]) @ S_before.mT
    # outputs contiguous, as the fakes promise
    return y.transpose(2, 3).flatten(1, 2)[:, :T].to(dtype).contiguous(), S_after[:, -1].contiguous(), S_before


def _torch_backward(q, k, v, g, S, dy, dS_final):
    """(dq and dk per head [B, T, H, Dk], dv, dg, dS0), float32 or float64."""
    T = q.shape[1]
    _, _, S_before = _torch_forward(q, k, v, g, S)
    q, k, v, c, D, a, to_end, acc = _torch_chunks(q, k, v, g, S)
    dy = _chunks(dy, CHUNK, v.shape[2])
    dy_in = dy * c.exp()[..., None]
    dS_before = torch_scan(a[..., None], dy_in.mT @ q, dS_final, True)  # [B, T/L, H, Dv, Dk]: dS0 of each chunk
    dS_after = torch.cat([dS_before[:, 1:], dS_final[:, None]], 1)
    A, dyv = (q @ k.mT) * D, dy @ v.mT
    dq = (dyv * D) @ k + dy_in @ S_before
    dk = (dyv * D).mT @ q + to_end * (v @ dS_after)
    dv = A.mT @ dy + to_end * (k @ dS_after.mT)
    M = A * dyv  # M_ij: the pair (i, j)'s term, its decay included; dg_r gets the pairs with j < r <= i
    before = torch.ones(M.shape[-2:], dtype=torch.bool, device=M.device).triu(1).to(acc)  # [j, r]: j < r
    into = (dy_in * (q @ S_before.mT)).sum(-1)  # exp(c_i) dy_i . S0 q_i: to every r <= i
    out = (to_end * v * (k @ dS_after.mT)).sum(-1, keepdim=True)  # exp(c_L - c_j) v_j . dS1 k_j: to every r > j
    # sums by masks, not differences of cumsums (no term that lacks exp(g_r) is ever added, so none cancels)
    dg = ((M @ before) * (1 - before)).sum(-2) + (into[..., None] * (1 - before)).sum(-2) + (out * before).sum(-2)
    dg = dg + a * (dS_after * S_before).sum((-2, -1))[..., None]  # exp(c_L) <dS1, S0>: to every r of the chunk
    unchunk = lambda x: x.transpose(2, 3).flatten(1, 2)[:, :T].contiguous()  # noqa: E731
    return unchunk(dq), unchunk(dk), unchunk(dv), unchunk(dg[..., None])[..., 0], dS_before[:, 0].contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Triton engine. Every program holds one [BV, BK] tile of S (or dS) in float32; a chunk's q, k [L, BK], v, dy [L, BV]
# and g [L] are loaded with their strides, padding (t >= T, columns past Dk or Dv) as zeros. The walks, grid (B * H,
# value tiles), store their tile at every chunk boundary ([B, H, T/L, Dv, Dk] float32); the output and gradient
# kernels, grid (B * H * T/L), read them back, walking a chunk's value tiles: q k^T (and in the backward the [L, L] by
# [L, Dk] products, whose sums over value columns are taken first) once a chunk.

def _plan(Dk, dtype):
    """(L, BK, stages): all of Dk in one tile; chunks of 64 and Triton's 3 pipeline stages (for the kernels' loops) for
    16-bit inputs; float32's exact dots run without tensor cores and hold far more per thread: chunks of 32, one stage
    (compiled for sm_90 with Triton 3.9, the gradient kernel at Dk = 128 asks 120 KB of shared memory, 192 KB in
    chunks of 64, near H100's 227 KB)."""
    BK = max(16, triton.next_power_of_2(Dk))
    if INTERPRET:
        return 16, BK, 1
    return (32, BK, 1) if dtype == torch.float32 else (CHUNK, BK, 3)


def _launch(kernel, grid, q, k, v, g, *tensors, BV, **meta):
    """kernel over grid = (per chunk, per value tile): axis 0 runs over B * H (B * H * T/L per chunk; no 65535
    limit there), axis 1 over the value tiles of BV columns or once."""
    Bsz, T, G, Dk = q.shape
    H, Dv = v.shape[2:]
    L, BK, stages = _plan(Dk, v.dtype)
    per_chunk, value_tiles = grid
    kernel[(Bsz * H * (triton.cdiv(T, L) if per_chunk else 1), triton.cdiv(Dv, BV) if value_tiles else 1)](
        q, k, v, g, *tensors, T, H, H // G, Dk, Dv, *q.stride(), *k.stride(), *v.stride(), *g.stride(), L=L, BK=BK,
        BV=BV, PREC="ieee" if v.dtype == torch.float32 else "tf32", num_warps=4, num_stages=stages, **meta)


# Value tiles, timed on an H100 (bf16 and float32; RetNet's Dk, Dv = 84, 168, gated retention's 92, 184, linear
# attention's 96, 97, Mamba-2's 128, 64 at B, T = 64, 256, and 64 x 64 heads at B, T, H = 8, 2048, 8 and 2, 8192, 8;
# RESULTS.md, scalar_decay.py): the output and gradient kernels walk 16 columns at a time on 4 warps, the fastest of
# 16 to 128 on 4 or 8 warps at every shape or within 8%. The walks, one program per value tile for the whole
# sequence, take 64 columns (half RetNet's time with 32 on 8 warps), or 16 where tiles of 64 would leave
# multiprocessors idle (B * H * Dv / 64 < SMs: 163 against 197 us at 2, 8192, 8).

def _walk(q, k, v, g, S, reverse=False):
    """(S at every chunk boundary [B, H, T/L, Dv, Dk] in v's dtype, the dtype every dot reads it in (16-bit: half the
    bytes of float32), the last S in float32): see _walk_kernel."""
    Bsz, T, H, Dv = v.shape
    L = _plan(q.shape[3], v.dtype)[0]
    wide = not INTERPRET and Bsz * H * triton.cdiv(Dv, 64) >= programs(v.device)
    states = torch.empty(S.shape[:2] + (triton.cdiv(T, L),) + S.shape[2:], dtype=v.dtype, device=v.device)
    last = torch.empty(S.shape, dtype=torch.float32, device=v.device)
    _launch(_walk_kernel, (False, True), q, k, v, g, S.float().contiguous(), states, last, REVERSE=reverse,
            BV=min(64, max(16, triton.next_power_of_2(Dv))) if wide else 16)
    return states, last


def _triton_forward(q, k, v, g, S):
    """(y, S_final, the states entering each chunk)."""
    states, S_final = _walk(q, k, v, g, S)
    y = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch(_output_kernel, (True, False), q, k, v, g, states, y, BV=16)
    return y, S_final, states


def _triton_backward(q, k, v, g, states, dy, dS_final):
    """(dq and dk per head [B, T, H, Dk] float32, dv, dg, dS0), from the forward's states."""
    dy = dy.to(v.dtype).contiguous()
    dstates, dS = _walk(q, q, dy, g, dS_final, reverse=True)  # dS <- exp(c_L) dS + sum_i exp(c_i) dy_i q_i^T
    dq, dk = (torch.empty(q.shape[:2] + v.shape[2:3] + q.shape[3:], dtype=torch.float32, device=v.device)
              for _ in range(2))
    dg = torch.empty(g.shape, dtype=torch.float32, device=v.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch(_gradient_kernel, (True, False), q, k, v, g, states, dstates, dy, dq, dk, dv, dg, BV=16)
    return dq, dk, dv, dg, dS


if triton is not None:
    @triton.jit
    def _program(H, hpg, per_head, BV: tl.constexpr, BK: tl.constexpr):
        """(b, h, the q/k head of h's group, value columns, key columns) of this program, as int64; axis 0 runs over
        B * H * per_head, per_head 1 or the chunks (the chunk: program_id(0) % per_head)."""
        bh = tl.program_id(0).to(tl.int64) // per_head
        return bh // H, bh % H, bh % H // hpg, tl.program_id(1) * BV + tl.arange(0, BV), tl.arange(0, BK)

    @triton.jit
    def _chunk(Q, K, V, G, start, b, h, hk, T, Dk, Dv, sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
               sgb, sgt, sgh, cols_k, cols_v, L: tl.constexpr):
        """Chunk [start, start + L) of head h: q, k [L, BK], v [L, BV] (input dtype), c [L] (the cumulative log decay
        from the chunk's start), its last value c_L, the causal mask [i, j]: i >= j, D = exp(c_i - c_j) there and 0
        above (masked before the exp), times t and the mask of v's elements."""
        t = start + tl.arange(0, L).to(tl.int64)  # int64: t * stride passes 2^31 in long sequences
        t_ok = t < T
        mk = t_ok[:, None] & (cols_k < Dk)[None, :]
        q = tl.load(Q + b * sqb + hk * sqh + t[:, None] * sqt + cols_k[None, :] * sqd, mask=mk, other=0.0)
        k = tl.load(K + b * skb + hk * skh + t[:, None] * skt + cols_k[None, :] * skd, mask=mk, other=0.0)
        mv = t_ok[:, None] & (cols_v < Dv)[None, :]
        v = tl.load(V + b * svb + h * svh + t[:, None] * svt + cols_v[None, :] * svd, mask=mv, other=0.0)
        c = tl.cumsum(tl.load(G + b * sgb + h * sgh + t * sgt, mask=t_ok, other=0.0).to(tl.float32), 0)
        c_last = tl.sum(tl.where(tl.arange(0, L) == L - 1, c, 0.0), 0)
        causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
        D = tl.exp(tl.where(causal, c[:, None] - c[None, :], float("-inf")))
        return q, k, v, c, c_last, causal, D, t, mv

    @triton.jit
    def _walk_kernel(Q, K, V, G, S0, STATES, S_LAST, T, H, hpg, Dk, Dv, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                     svb, svt, svh, svd, sgb, sgt, sgh, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     PREC: tl.constexpr, REVERSE: tl.constexpr):
        """S <- exp(c_L) S + sum_j w_j v_j k_j^T chunk by chunk from S0, S before each chunk into STATES and the last
        into S_LAST. Forward, w_j = exp(c_L - c_j): the state entering each chunk, S_final. REVERSE, called with q
        for k and dy for v, w_i = exp(c_i), last chunk first: the gradient at the state leaving each chunk, dS0."""
        b, h, hk, cols_v, cols_k = _program(H, hpg, 1, BV, BK)
        ms = (cols_v < Dv)[:, None] & (cols_k < Dk)[None, :]
        tile = cols_v[:, None] * Dk + cols_k[None, :]
        S = tl.load(S0 + (b * H + h) * Dv * Dk + tile, mask=ms, other=0.0)  # [BV, BK] float32
        n_chunks = tl.cdiv(T, L)
        for i in range(n_chunks):
            n = n_chunks - 1 - i if REVERSE else i
            _, k, v, c, c_last, _, _, _, _ = _chunk(Q, K, V, G, n * L, b, h, hk, T, Dk, Dv, sqb, sqt, sqh, sqd,
                                                    skb, skt, skh, skd, svb, svt, svh, svd, sgb, sgt, sgh,
                                                    cols_k, cols_v, L)
            tl.store(STATES + ((b * H + h) * n_chunks + n) * Dv * Dk + tile, S.to(STATES.dtype.element_ty), mask=ms)
            w = tl.exp(c) if REVERSE else tl.exp(c_last - c)
            S = tl.exp(c_last) * S + tl.dot(tl.trans((v * w[:, None]).to(v.dtype)), k, input_precision=PREC)
        tl.store(S_LAST + (b * H + h) * Dv * Dk + tile, S, mask=ms)

    @triton.jit
    def _output_kernel(Q, K, V, G, STATES, Y, T, H, hpg, Dk, Dv, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                       svb, svt, svh, svd, sgb, sgt, sgh, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       PREC: tl.constexpr):
        """y of one chunk from the state entering it, its value columns BV at a time after q k^T once."""
        n_chunks = tl.cdiv(T, L)
        b, h, hk, cols_v, cols_k = _program(H, hpg, n_chunks, BV, BK)
        n = tl.program_id(0).to(tl.int64) % n_chunks
        q, k, _, c, _, _, D, t, _ = _chunk(Q, K, V, G, n * L, b, h, hk, T, Dk, Dv, sqb, sqt, sqh, sqd, skb, skt,
                                           skh, skd, svb, svt, svh, svd, sgb, sgt, sgh, cols_k, cols_v, L)
        A = (tl.dot(q, tl.trans(k), input_precision=PREC) * D).to(q.dtype)
        into = tl.exp(c)[:, None]
        t_ok = t < T
        for i in range(tl.cdiv(Dv, BV)):
            cols_v = i * BV + tl.arange(0, BV)
            ms = (cols_v < Dv)[:, None] & (cols_k < Dk)[None, :]
            mv = t_ok[:, None] & (cols_v < Dv)[None, :]
            S0 = tl.load(STATES + ((b * H + h) * n_chunks + n) * Dv * Dk + cols_v[:, None] * Dk + cols_k[None, :],
                         mask=ms, other=0.0)
            v = tl.load(V + b * svb + h * svh + t[:, None] * svt + cols_v[None, :] * svd, mask=mv, other=0.0)
            y = tl.dot(A, v, input_precision=PREC) + into * tl.dot(q, tl.trans(S0).to(q.dtype), input_precision=PREC)
            tl.store(Y + ((b * T + t[:, None]) * H + h) * Dv + cols_v[None, :], y.to(Y.dtype.element_ty), mask=mv)

    @triton.jit
    def _gradient_kernel(Q, K, V, G, STATES, DSTATES, DY, DQ, DK, DV, DG, T, H, hpg, Dk, Dv, sqb, sqt, sqh, sqd,
                         skb, skt, skh, skd, svb, svt, svh, svd, sgb, sgt, sgh, L: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, PREC: tl.constexpr):
        """One chunk, from the state entering it (S0) and the gradient at the state leaving it (dS1): dq and dk per
        head, dv, dg. The value columns go BV at a time; what dq, dk and dg sum over them (dY V^T, S0^T dy, dS1^T v,
        the dg terms) is summed first, so q k^T and the [L, L] by [L, Dk] products run once a chunk."""
        n_chunks = tl.cdiv(T, L)
        b, h, hk, cols_v, cols_k = _program(H, hpg, n_chunks, BV, BK)
        n = tl.program_id(0).to(tl.int64) % n_chunks
        q, k, _, c, c_last, causal, D, t, _ = _chunk(Q, K, V, G, n * L, b, h, hk, T, Dk, Dv, sqb, sqt, sqh, sqd,
                                                     skb, skt, skh, skd, svb, svt, svh, svd, sgb, sgt, sgh,
                                                     cols_k, cols_v, L)
        into, to_end = tl.exp(c), tl.exp(c_last - c)
        A = tl.dot(q, tl.trans(k), input_precision=PREC) * D
        t_ok = t < T
        dyv = tl.zeros([L, L], dtype=tl.float32)  # dY V^T
        dy_S0 = tl.zeros([L, BK], dtype=tl.float32)  # rows S0^T dy_i
        v_dS = tl.zeros([L, BK], dtype=tl.float32)  # rows dS1^T v_j
        w_in = tl.zeros([L], dtype=tl.float32)  # dy_i . S0 q_i
        w_out = tl.zeros([L], dtype=tl.float32)  # v_j . dS1 k_j
        dS_S0 = tl.zeros([BK], dtype=tl.float32)  # <dS1, S0> by key column
        for i in range(tl.cdiv(Dv, BV)):
            cols_v = i * BV + tl.arange(0, BV)
            ms = (cols_v < Dv)[:, None] & (cols_k < Dk)[None, :]
            mv = t_ok[:, None] & (cols_v < Dv)[None, :]
            at = ((b * H + h) * n_chunks + n) * Dv * Dk + cols_v[:, None] * Dk + cols_k[None, :]
            S0 = tl.load(STATES + at, mask=ms, other=0.0)
            dS = tl.load(DSTATES + at, mask=ms, other=0.0)
            v = tl.load(V + b * svb + h * svh + t[:, None] * svt + cols_v[None, :] * svd, mask=mv, other=0.0)
            dy = tl.load(DY + ((b * T + t[:, None]) * H + h) * Dv + cols_v[None, :], mask=mv, other=0.0)
            dyv = tl.dot(dy, tl.trans(v), dyv, input_precision=PREC)
            dy_S0 = tl.dot(dy, S0.to(dy.dtype), dy_S0, input_precision=PREC)
            v_dS = tl.dot(v, dS.to(v.dtype), v_dS, input_precision=PREC)
            k_dS = tl.dot(k, tl.trans(dS).to(k.dtype), input_precision=PREC)  # [L, BV]: dS1 k_j
            dv = tl.dot(tl.trans(A).to(dy.dtype), dy, input_precision=PREC) + to_end[:, None] * k_dS
            tl.store(DV + ((b * T + t[:, None]) * H + h) * Dv + cols_v[None, :], dv.to(DV.dtype.element_ty), mask=mv)
            q_S0 = tl.dot(q, tl.trans(S0).to(q.dtype), input_precision=PREC)  # [L, BV]: S0 q_i
            w_in += tl.sum(dy.to(tl.float32) * q_S0, 1)
            w_out += tl.sum(v.to(tl.float32) * k_dS, 1)
            dS_S0 += tl.sum(dS.to(tl.float32) * S0.to(tl.float32), 0)
        dA = (dyv * D).to(q.dtype)
        dq = tl.dot(dA, k, input_precision=PREC) + into[:, None] * dy_S0
        dk = tl.dot(tl.trans(dA), q, input_precision=PREC) + to_end[:, None] * v_dS
        # dg_r: the pairs j < r <= i of M = A * (dY V^T), exp(c_i) dy_i . S0 q_i for i >= r, exp(c_L - c_j)
        # v_j . dS1 k_j for j < r, exp(c_L) <dS1, S0>: sums by masks, no difference of cumulative sums
        before = tl.where(causal, 0.0, 1.0)  # [j, r]: j < r
        pairs = tl.dot(A * dyv, before, input_precision=PREC)  # [i, r]: sum over j < r
        dg = tl.sum(tl.where(causal, pairs + (into * w_in)[:, None], 0.0), 0)
        dg += tl.sum((to_end * w_out)[:, None] * before, 0) + tl.exp(c_last) * tl.sum(dS_S0, 0)
        mk = t_ok[:, None] & (cols_k < Dk)[None, :]
        offs = ((b * T + t[:, None]) * H + h) * Dk + cols_k[None, :]
        tl.store(DQ + offs, dq, mask=mk)
        tl.store(DK + offs, dk, mask=mk)
        tl.store(DG + (b * T + t) * H + h, dg, mask=t_ok)
