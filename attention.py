"""Causal multi-head softmax attention: Vaswani et al. 2017, "Attention Is All You Need" (arXiv:1706.03762).

    y_t = sum_{s <= t} softmax_s(q_t . k_s / sqrt(Dk)) v_s         (eq. 1, with the causal mask)

Positions come from rotary embeddings (Su et al. 2021, RoFormer, arXiv:2104.09864), applied here
because the shared backbone adds none: q and k at absolute position m are rotated pairwise,
dims (2i, 2i+1) by the angle m * base^(-2i/Dk) (eq. 34), so q_m . k_n depends on m - n alone.

Shapes, heads before time as PyTorch's attention kernels take them: q, k [B, H, T, Dk],
v [B, H, T, Dv] (Dk = Dv = d_model / H). As an RNN, the state is the KV cache (k_cache [B, H, t, Dk],
v_cache [B, H, t, Dv]): the keys (already rotated) and values of every token seen so far, t of
them; t is also the position of the next token. Each step appends one k and one v and reads the
whole cache: the state is the whole past, O(t) memory and O(t) work per step, where the other
models of the zoo carry a state of fixed size at fixed work per step.

Three forms of the same function:
    recurrent  the loop: append k_t, v_t to the cache, attend q_t to all of it
    parallel   softmax(Q K^T / sqrt(Dk) + causal mask) V written out, the T x (t + T) scores in memory
    sdpa       torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels)
A forward with a cache puts its queries at positions t..t+T-1: query i sees the cache and new keys
0..i (a boolean mask, tril offset by t; is_causal only when there is no cache).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotary(x, start, base=10000.0):
    """x [B, H, T, Dk] at positions start..start+T-1 -> x with dims (2i, 2i+1) rotated by pos * base^(-2i/Dk)."""
    T, Dk = x.shape[-2:]
    acc = torch.float32 if x.device.type == "mps" else torch.float64  # angles up to T rad: float64 where we can
    inv_freq = base ** (-torch.arange(0, Dk, 2, device=x.device, dtype=acc) / Dk)
    angle = (start + torch.arange(T, device=x.device, dtype=acc))[:, None] * inv_freq  # [T, Dk/2]; start: int or []
    # the rotation in float32 or better, rounded once at the end; done in bf16, Inductor fused it into
    # SDPA wrongly on an H100 (torch 2.11: compiled attention 35% off under autocast, eager 0.4%)
    work = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angle.cos().to(work), angle.sin().to(work)
    x1, x2 = x.to(work).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).to(x.dtype)


def causal_mask(T, t, device):
    """[T, t + T] boolean, True where query i (at position t + i, after t cached keys) may read key j: j <= t + i."""
    return torch.ones(T, t + T, dtype=torch.bool, device=device).tril(t)


def attention_recurrent(q, k, v, k_cache, v_cache, dropout=0.0):
    """q, k: [B, H, T, Dk], v: [B, H, T, Dv]; caches [B, H, t, Dk or Dv] -> y [B, H, T, Dv], caches
    [B, H, t + T, Dk or Dv].
    dropout: the probability of dropping each attention weight (training only)."""
    ys = []
    for t in range(q.shape[2]):
        k_cache = torch.cat([k_cache, k[:, :, t:t + 1]], 2)
        v_cache = torch.cat([v_cache, v[:, :, t:t + 1]], 2)
        w = (q[:, :, t:t + 1] @ k_cache.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        ys.append(F.dropout(w, dropout) @ v_cache)
    return torch.cat(ys, 2), (k_cache, v_cache)


def attention_step(q, k, v, k_cache, v_cache, t, dropout=0.0):
    """One token into a cache with room (Attention.reserve): q, k [B, H, 1, Dk], v [B, H, 1, Dv], caches
    [B, H, L, Dk or Dv] holding t tokens (t [] int64, t < L) -> y [B, H, 1, Dv], the same caches with k, v written
    in place at position t (a graphed step copies no whole cache per token). attention_recurrent's math, the
    L - t - 1 empty slots masked out: the shapes stay, so a CUDA graph replays it."""
    k_cache.index_copy_(2, t.view(1), k), v_cache.index_copy_(2, t.view(1), v)
    empty = torch.arange(k_cache.shape[2], device=q.device) > t
    w = (q @ k_cache.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(empty, float("-inf")).softmax(-1)
    return F.dropout(w, dropout) @ v_cache, (k_cache, v_cache)


def attention_parallel(q, k, v, dropout=0.0):
    """q [B, H, T, Dk], k [B, H, t + T, Dk], v [B, H, t + T, Dv] (t cached, T new) -> y [B, H, T, Dv]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    mask = causal_mask(T, k.shape[2] - T, q.device)  # every row keeps its own key: no all -inf row
    return F.dropout(scores.masked_fill(~mask, float("-inf")).softmax(-1), dropout) @ v


def attention_sdpa(q, k, v, dropout=0.0):
    """Same signature, through PyTorch's fused kernels."""
    T, t = q.shape[2], k.shape[2] - q.shape[2]
    if t == 0:  # no cache: is_causal (top-left aligned) is right and lets the flash kernel run
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, t, q.device), dropout_p=dropout)


class Attention(nn.Module):
    """Multi-head causal softmax attention with rotary positions;
    forward(x [B, T, d_model], state) -> (y, state = (k_cache [B, H, t, Dk], v_cache [B, H, t, Dv])).

    n_head=8 is the paper's (d_model 512 = 8 heads of 64). d_model // 64 would keep heads at 64
    dims but gives 0 heads below d_model = 64 (the tests use 32); a fixed count, like the other
    models' n_head, works at every size that divides it into even head dims (rotary pairs dims).
    dropout drops attention weights in training (as nanoGPT does; train.py passes its --dropout
    to a mixer that takes one); in eval() every form is deterministic.
    """

    forms = ("recurrent", "parallel", "sdpa")

    def __init__(self, d_model, n_head=8, rope_base=10000.0, dropout=0.0):
        super().__init__()
        if d_model % n_head or (d_model // n_head) % 2:
            raise ValueError(f"d_model={d_model} must split into n_head={n_head} heads of an even size (rotary)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.n_head, self.rope_base, self.dropout = n_head, rope_base, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, state=None, form="sdpa"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; Attention has {self.forms}")
        if state is not None and len(state) == 3:
            raise ValueError("a cache from reserve() is for step(); forward takes (k_cache, v_cache)")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_head, -1)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dk]
        if state is None:  # the empty cache
            state = (k[:, :, :0], v[:, :, :0])
        k_cache, v_cache = (s.to(k.dtype) for s in state)
        start = k_cache.shape[2]  # tokens seen so far: the position of x[:, 0]
        q, k = rotary(q, start, self.rope_base), rotary(k, start, self.rope_base)
        p = self.dropout if self.training else 0.0
        if form == "recurrent":
            y, (k, v) = attention_recurrent(q, k, v, k_cache, v_cache, p)
        else:
            k, v = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
            y = (attention_sdpa if form == "sdpa" else attention_parallel)(q, k, v, p)
        dtype = self.qkv.weight.dtype  # the cache is kept in the model's dtype
        return self.out(y.transpose(1, 2).flatten(2)), (k.to(dtype), v.to(dtype))

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state with the cache one longer. On a cache from reserve()
        the token goes into the next free slot, and the new state has the old one's shapes.
        A cache from reserve() is written in place: the state passed in is updated and returned, not left as it was."""
        if state is None or len(state) == 2:
            y, state = self.forward(x[:, None], state, form="recurrent")
            return y[:, 0], state
        k_cache, v_cache, t = state
        q, k, v = self.qkv(x[:, None]).unflatten(-1, (3, self.n_head, -1)).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, t, self.rope_base), rotary(k, t, self.rope_base)
        y, (k_cache, v_cache) = attention_step(q, k.to(k_cache.dtype), v.to(v_cache.dtype), k_cache, v_cache, t,
                                               self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))[:, 0], (k_cache, v_cache, t + 1)

    @staticmethod
    def reserve(state, n):
        """(k_cache, v_cache) [B, H, t, D] -> (k_cache, v_cache) [B, H, t + n, D], the n new slots empty, and t as a
        [] int64 tensor: room for n steps of fixed shapes, as a CUDA graph needs (train.generate).
        The cache it returns is written in place by step(): the state passed to step() is updated and returned.
        Under autocast a float32 cache is kept in autocast's dtype, which step()'s matmuls read it in: no step casts
        the whole cache, and the numbers stay (its keys and values come out of autocast's matmuls in that dtype); step
        it under the same autocast."""
        k_cache, v_cache = state
        device = k_cache.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        t = torch.tensor(k_cache.shape[2], device=k_cache.device)
        return *(F.pad(c.to(low) if low and c.dtype == torch.float32 else c, (0, 0, 0, n)) for c in state), t
