"""The recurrence of the scalar-decay family, chunked and fused into one kernel per pass. For every head:

    S_t = exp(g_t) S_{t-1} + v_t k_t^T,    y_t = S_t q_t                 (g_t <= 0: one log decay per head and step)

linear attention (g = 0), RetNet (g = log gamma per head), gated retention (g learned) and Mamba-2's SSD (g = dt A,
q = C, k = B, v = dt x) are this recurrence. `scalar_decay(q, k, v, g, S)`: q, k [B, T, G, Dk] with G = H, or G
groups of H / G heads sharing them (Mamba-2's B and C; head h reads group h // (H / G)); v [B, T, H, Dv]; g [B, T, H];
S [B, H, Dv, Dk] the initial state. Returns y [B, T, H, Dv] in the dtype of q, k and v (promoted), and the final
state, float32 (float64 stays). Strides are read as given: an expanded g (RetNet's constant decay) is never copied.

Chunkwise form (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training", sec. 3,
with GLA's decay a scalar: fla's chunk_simple_gla; the same block decomposition as Mamba-2's SSD, Dao & Gu 2024,
sec. 6). Cut time into chunks of L steps; c_i = g_1 + ... + g_i from the chunk's start, S0 the state entering it:

    y_i = exp(c_i) S0 q_i + sum_{j<=i} exp(c_i - c_j) (q_i . k_j) v_j         (A = (Q K^T) * D, D_ij = exp(c_i - c_j))
    S1  = exp(c_L) S0 + sum_j exp(c_L - c_j) v_j k_j^T                          (the state leaving it)

Backward, dS1 the gradient at the state leaving the chunk (dS_final for the last), dA = (dY V^T) * D:

    dq_i = exp(c_i) S0^T dy_i + (dA K)_i       dk_j = (dA^T Q)_j + exp(c_L - c_j) dS1^T v_j
    dv_j = (A^T dY)_j + exp(c_L - c_j) dS1 k_j     dS0 = exp(c_L) dS1 + sum_i exp(c_i) dy_i q_i^T

and the decays: y and S_final depend on the global cumulative decay C_t = g_1 + .. + g_t only through exp(C_t) q_t,
exp(-C_s) k_s and exp(C_T) on S_final, so dL/dC_t = q_t . dq_t - k_t . dk_t (+ <dS_final, S_final> at t = T), and
dL/dg_t = sum_{s>=t} dL/dC_s, a reverse cumulative sum.

Every exponent above is <= 0 (c decreases along the chunk; D is masked to -inf above the diagonal before the exp):
nothing overflows at any T or decay. Within a chunk exp(c_i - c_j) is a difference of cumulative sums, as in fla's
and mamba_ssm's kernels: in float32 its absolute error is ~1e-7 |c_i|, small while a chunk's total decay is moderate.

A file of its own because the four models share one kernel pair. Engines: Triton on CUDA (and on the CPU under
TRITON_INTERPRET=1): one program per (batch, head, tile of BV value columns) walks the chunks in order with its
[BV, Dk] tile of S in registers (fla's "fused_chunk" layout); dots in the inputs' dtype accumulate in float32
(float32 inputs: exact float32 dots, no tf32). Backward: one pass forward in time for dq (S recomputed), one in
reverse for dk, dv and dS0 (dS in registers); dq and dk are summed over value tiles and heads of a group outside, then
dL/dg from them. Elsewhere (CPU, MPS, float64, Dk > 128) the same chunked equations in PyTorch, chunk states through
scan.py. Forward and backward are custom ops (zoo::scalar_decay, zoo::scalar_decay_backward) with fakes, built by
scan.py's `register`.
"""
import torch
import torch.nn.functional as F

from scan import INTERPRET, register, torch_scan, triton, use_triton

if triton is not None:
    import triton.language as tl

CHUNK = 64  # L: the PyTorch engine's chunk and the kernels' (16 under the interpreter, which pays per element)


def scalar_decay(q, k, v, g, S):
    """q, k [B, T, G, Dk], v [B, T, H, Dv], g [B, T, H] (<= 0), S [B, H, Dv, Dk] -> y [B, T, H, Dv], S_final."""
    (Bsz, T, G, Dk), (H, Dv) = q.shape, v.shape[2:]
    if k.shape != q.shape or v.shape[:2] != (Bsz, T) or H % G or g.shape != (Bsz, T, H) or S.shape != (Bsz, H, Dv, Dk):
        raise ValueError(f"scalar_decay: needs q, k [B, T, G, Dk], v [B, T, H, Dv] (G | H), g [B, T, H], S [B, H, Dv, Dk]; "
                         f"got {[tuple(t.shape) for t in (q, k, v, g, S)]}")
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return _op(q.to(dtype), k.to(dtype), v.to(dtype), g, S)


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
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel(q, k, v, g, S):
        return _triton_forward(q, k, v, g, S)
    y, S_final, _ = _torch_forward(q, k, v, g, S)
    return y, S_final


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, S: torch.Tensor,
              S_final: torch.Tensor, dy: torch.Tensor, dS_final: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, dS), each in its input's dtype."""
    acc = _acc(q, k, v, g, S)
    if _kernel(q, k, v, g, S):
        dq, dk, dv, dS = _triton_backward(q, k, v, g, S, dy, dS_final)  # dq, dk per head [B, T, H, Dk], float32
    else:
        dq, dk, dv, dS = _torch_backward(q, k, v, g, S, dy.to(acc), dS_final.to(acc))
    H, G = v.shape[2], q.shape[2]
    per_head = lambda x: x.to(acc).repeat_interleave(H // G, 2) if G < H else x.to(acc)  # noqa: E731
    dc = (per_head(q) * dq).sum(-1) - (per_head(k) * dk).sum(-1)  # dL/dC_t
    dc[:, -1] += (dS_final.to(acc) * S_final.to(acc)).sum((-2, -1))
    dg = dc.flip(1).cumsum(1).flip(1)
    dq, dk = (x.unflatten(2, (G, H // G)).sum(3) for x in (dq, dk))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dS.to(S.dtype)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _grads(ctx, backward, dy, dS_final):
    q, k, v, g, S, S_final = ctx.saved_tensors
    dy = torch.zeros(v.shape, dtype=v.dtype, device=v.device) if dy is None else dy
    dS_final = torch.zeros_like(S_final) if dS_final is None else dS_final
    return backward(q, k, v, g, S, S_final, dy, dS_final)


def _fake(q, k, v, g, S):
    return v.new_empty(v.shape), S.new_empty(S.shape, dtype=_acc(q, k, v, g, S))


def _backward_fake(q, k, v, g, S, S_final, dy, dS_final):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g, S))


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
    return q, k, v, c, decay_mask(g), c[..., -1:].exp(), (c[..., -1:] - c).exp()[..., None], acc


def _torch_forward(q, k, v, g, S):
    """(y, S_final, the states entering each chunk)."""
    T = q.shape[1]
    q, k, v, c, D, a, to_end, acc = _torch_chunks(q, k, v, g, S)
    S_after = torch_scan(a[..., None], v.mT @ (k * to_end), S.to(acc), False)  # [B, T/L, H, Dv, Dk]
    S_before = torch.cat([S.to(acc)[:, None], S_after[:, :-1]], 1)
    y = ((q @ k.mT) * D) @ v + (q * c.exp()[..., None]) @ S_before.mT
    return y.transpose(2, 3).flatten(1, 2)[:, :T].to(v.dtype), S_after[:, -1], S_before


def _torch_backward(q, k, v, g, S, dy, dS_final):
    """(dq and dk per head [B, T, H, Dk], dv, dS0), float32 or float64."""
    T = q.shape[1]
    _, _, S_before = _torch_forward(q, k, v, g, S)
    q, k, v, c, D, a, to_end, acc = _torch_chunks(q, k, v, g, S)
    dy = _chunks(dy, CHUNK, v.shape[2])
    dy_in = dy * c.exp()[..., None]
    dS_before = torch_scan(a[..., None], dy_in.mT @ q, dS_final, True)  # [B, T/L, H, Dv, Dk]: dS0 of each chunk
    dS_after = torch.cat([dS_before[:, 1:], dS_final[:, None]], 1)
    A, dA = (q @ k.mT) * D, (dy @ v.mT) * D
    dq = dA @ k + dy_in @ S_before
    dk = dA.mT @ q + to_end * (v @ dS_after)
    dv = A.mT @ dy + to_end * (k @ dS_after.mT)
    unchunk = lambda x: x.transpose(2, 3).flatten(1, 2)[:, :T]  # noqa: E731
    return unchunk(dq), unchunk(dk), unchunk(dv), dS_before[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Triton engine. Grid: (value tiles, B * H). A program keeps its [BV, BK] tile of S (or dS) in float32 registers
# and walks the chunks; the chunk's q, k [L, BK], v, dy [L, BV] and g [L] are loaded with their strides, padding
# (t >= T, columns past Dk or Dv) loaded as zeros. Partial dq and dk, one per value tile, are summed outside.

def _plan(Dk, Dv):
    """(L, BK, BV, warps): chunks of 64, all of Dk in one tile, value tiles of up to 64 columns, 4 warps."""
    if INTERPRET:
        return 16, max(16, triton.next_power_of_2(Dk)), 16, 1
    return CHUNK, max(16, triton.next_power_of_2(Dk)), min(64, max(16, triton.next_power_of_2(Dv))), 4


def _launch(kernel, q, k, v, g, Dv, *tensors, **meta):
    Bsz, T, G, Dk = q.shape
    H = v.shape[2]
    L, BK, BV, warps = _plan(Dk, Dv)
    grid = (triton.cdiv(Dv, BV), Bsz * H)
    kernel[grid](q, k, v, g, *tensors, T, H, H // G, Dk, Dv, *q.stride(), *k.stride(), *v.stride(), *g.stride(),
                 L=L, BK=BK, BV=BV, PREC="ieee" if v.dtype == torch.float32 else "tf32", num_warps=warps, **meta)


def _triton_forward(q, k, v, g, S):
    y = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    S_final = torch.empty(S.shape, dtype=torch.float32, device=v.device)
    _launch(_forward_kernel, q, k, v, g, v.shape[3], S.float().contiguous(), y, S_final)
    return y, S_final


def _triton_backward(q, k, v, g, S, dy, dS_final):
    Bsz, T, _, Dk = q.shape
    H, Dv = v.shape[2:]
    n_v = -(-Dv // _plan(Dk, Dv)[2])
    dq, dk = (torch.empty(n_v, Bsz, T, H, Dk, dtype=torch.float32, device=v.device) for _ in range(2))
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dS = torch.empty(S.shape, dtype=torch.float32, device=v.device)
    dy = dy.to(v.dtype).contiguous()
    _launch(_dq_kernel, q, k, v, g, Dv, S.float().contiguous(), dy, dq)
    _launch(_dkv_kernel, q, k, v, g, Dv, dS_final.float().contiguous(), dy, dk, dv, dS)
    return dq.sum(0), dk.sum(0), dv, dS


if triton is not None:
    @triton.jit
    def _chunk(Q, K, V, G, start, b, h, hk, T, Dk, Dv, sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
               sgb, sgt, sgh, cols_k, cols_v, L: tl.constexpr):
        """Chunk [start, start + L) of head h: q, k [L, BK], v [L, BV] (input dtype), c [L] (the cumulative log decay
        from the chunk's start), its last value, and D = exp(c_i - c_j) below the diagonal, 0 above (masked first)."""
        t = start + tl.arange(0, L)
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
        return q, k, v, c, c_last, D, t, mv

    @triton.jit
    def _program(H, hpg, BV: tl.constexpr, BK: tl.constexpr):
        """(b, h, the q/k head of h's group, value columns, key columns) of this program, as int64."""
        pid_v, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        return b, h, h // hpg, pid_v * BV + tl.arange(0, BV), tl.arange(0, BK)

    @triton.jit
    def _forward_kernel(Q, K, V, G, S0, Y, S_FINAL, T, H, hpg, Dk, Dv, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                        svb, svt, svh, svd, sgb, sgt, sgh, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        PREC: tl.constexpr):
        b, h, hk, cols_v, cols_k = _program(H, hpg, BV, BK)
        ms = (cols_v < Dv)[:, None] & (cols_k < Dk)[None, :]
        s_offs = (b * H + h) * Dv * Dk + cols_v[:, None] * Dk + cols_k[None, :]
        S = tl.load(S0 + s_offs, mask=ms, other=0.0)  # [BV, BK] float32
        for start in range(0, T, L):
            q, k, v, c, c_last, D, t, mv = _chunk(Q, K, V, G, start, b, h, hk, T, Dk, Dv, sqb, sqt, sqh, sqd, skb,
                                                  skt, skh, skd, svb, svt, svh, svd, sgb, sgt, sgh, cols_k, cols_v, L)
            A = tl.dot(q, tl.trans(k), input_precision=PREC) * D
            y = tl.dot(A.to(v.dtype), v, input_precision=PREC)
            y += tl.exp(c)[:, None] * tl.dot(q, tl.trans(S).to(q.dtype), input_precision=PREC)
            tl.store(Y + ((b * T + t[:, None]) * H + h) * Dv + cols_v[None, :], y.to(Y.dtype.element_ty), mask=mv)
            v_end = (v * tl.exp(c_last - c)[:, None]).to(v.dtype)
            S = tl.exp(c_last) * S + tl.dot(tl.trans(v_end), k, input_precision=PREC)
        tl.store(S_FINAL + s_offs, S, mask=ms)

    @triton.jit
    def _dq_kernel(Q, K, V, G, S0, DY, DQ, T, H, hpg, Dk, Dv, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                   svb, svt, svh, svd, sgb, sgt, sgh, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   PREC: tl.constexpr):
        """Forward in time: dq = dA K + exp(c) dY S0, this value tile's share, into DQ [n_v, B, T, H, Dk]."""
        b, h, hk, cols_v, cols_k = _program(H, hpg, BV, BK)
        ms = (cols_v < Dv)[:, None] & (cols_k < Dk)[None, :]
        S = tl.load(S0 + (b * H + h) * Dv * Dk + cols_v[:, None] * Dk + cols_k[None, :], mask=ms, other=0.0)
        for start in range(0, T, L):
            q, k, v, c, c_last, D, t, mv = _chunk(Q, K, V, G, start, b, h, hk, T, Dk, Dv, sqb, sqt, sqh, sqd, skb,
                                                  skt, skh, skd, svb, svt, svh, svd, sgb, sgt, sgh, cols_k, cols_v, L)
            dy = tl.load(DY + ((b * T + t[:, None]) * H + h) * Dv + cols_v[None, :], mask=mv, other=0.0)
            dA = tl.dot(dy, tl.trans(v), input_precision=PREC) * D
            dq = tl.dot(dA.to(k.dtype), k, input_precision=PREC)
            dq += tl.exp(c)[:, None] * tl.dot(dy, S.to(dy.dtype), input_precision=PREC)
            dq_offs = (((tl.program_id(0) * (tl.num_programs(1) // H) + b) * T + t[:, None]) * H + h) * Dk + cols_k[None, :]
            tl.store(DQ + dq_offs, dq, mask=(t < T)[:, None] & (cols_k < Dk)[None, :])
            v_end = (v * tl.exp(c_last - c)[:, None]).to(v.dtype)
            S = tl.exp(c_last) * S + tl.dot(tl.trans(v_end), k, input_precision=PREC)

    @triton.jit
    def _dkv_kernel(Q, K, V, G, DS_FINAL, DY, DK, DV, DS0, T, H, hpg, Dk, Dv, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                    svb, svt, svh, svd, sgb, sgt, sgh, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    PREC: tl.constexpr):
        """Reverse in time, dS in registers: dk (this value tile's share), dv, and dS0."""
        b, h, hk, cols_v, cols_k = _program(H, hpg, BV, BK)
        ms = (cols_v < Dv)[:, None] & (cols_k < Dk)[None, :]
        s_offs = (b * H + h) * Dv * Dk + cols_v[:, None] * Dk + cols_k[None, :]
        dS = tl.load(DS_FINAL + s_offs, mask=ms, other=0.0)
        n_chunks = tl.cdiv(T, L)
        for i in range(n_chunks):
            start = (n_chunks - 1 - i) * L
            q, k, v, c, c_last, D, t, mv = _chunk(Q, K, V, G, start, b, h, hk, T, Dk, Dv, sqb, sqt, sqh, sqd, skb,
                                                  skt, skh, skd, svb, svt, svh, svd, sgb, sgt, sgh, cols_k, cols_v, L)
            dy = tl.load(DY + ((b * T + t[:, None]) * H + h) * Dv + cols_v[None, :], mask=mv, other=0.0)
            A = tl.dot(q, tl.trans(k), input_precision=PREC) * D
            dA = tl.dot(dy, tl.trans(v), input_precision=PREC) * D
            to_end = tl.exp(c_last - c)[:, None]
            dv = tl.dot(tl.trans(A).to(dy.dtype), dy, input_precision=PREC)
            dv += to_end * tl.dot(k, tl.trans(dS).to(k.dtype), input_precision=PREC)
            dk = tl.dot(tl.trans(dA).to(q.dtype), q, input_precision=PREC)
            dk += to_end * tl.dot(v, dS.to(v.dtype), input_precision=PREC)
            tl.store(DV + ((b * T + t[:, None]) * H + h) * Dv + cols_v[None, :], dv.to(DV.dtype.element_ty), mask=mv)
            dk_offs = (((tl.program_id(0) * (tl.num_programs(1) // H) + b) * T + t[:, None]) * H + h) * Dk + cols_k[None, :]
            tl.store(DK + dk_offs, dk, mask=(t < T)[:, None] & (cols_k < Dk)[None, :])
            dy_in = (dy * tl.exp(c)[:, None]).to(dy.dtype)
            dS = tl.exp(c_last) * dS + tl.dot(tl.trans(dy_in), q, input_precision=PREC)
        tl.store(DS0 + s_offs, dS, mask=ms)
