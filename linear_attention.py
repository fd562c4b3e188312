"""Linear attention: Katharopoulos et al. 2020, "Transformers are RNNs" (arXiv:2006.16236).

Softmax attention with exp(q.k) replaced by a kernel phi(q).phi(k) is an RNN whose state is a
matrix that never forgets (f_A = identity, f_B writes v k^T, f_C reads with q):

    S_t = S_{t-1} + v_t phi(k_t)^T              (eq. 18)
    z_t = z_{t-1} + phi(k_t)                    (eq. 19, the normaliser)
    y_t = S_t phi(q_t) / (z_t . phi(q_t))       (eq. 20)

with the paper's feature map phi(x) = elu(x) + 1 > 0, so the denominator is positive. The
normaliser rides along as one extra row of the state: append a 1 to every v, and the last output
channel is z_t . phi(q_t). Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv + 1] (the row of ones
included), state S [B, H, Dv + 1, Dk].

Four forms of the same function:
    recurrent  the loop above, one token at a time: O(T) steps, O(1) state
    parallel   (phi(Q) phi(K)^T * causal mask) V, eq. 9 without the softmax: O(T^2), no loop
    chunked    the parallel form inside chunks of L tokens, the chunk states S summed across
               chunks by scan.py with a = 1: O(T L) work, T / L chunk states
    fused      chunked, in fused Triton kernels on CUDA (scalar_decay.py)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from scalar_decay import scalar_decay
from scan import scan


def feature_map(x):
    return F.elu(x) + 1


def chunk(x, L):
    """[B, T, H, *] -> [B, T/L, H, L, *], T padded with zeros to a multiple of L."""
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, -x.shape[1] % L))
    return x.unflatten(1, (-1, L)).transpose(2, 3)


def linear_attention_recurrent(q, k, v, S):
    """q, k: [B, T, H, Dk] (after phi), v: [B, T, H, Dv], S: [B, H, Dv, Dk] -> y [B, T, H, Dv], S."""
    ys = []
    for t in range(q.shape[1]):
        S = S + (v[:, t, :, :, None] * k[:, t, :, None, :]).to(S.dtype)
        ys.append(torch.einsum("bhed,bhd->bhe", S, q[:, t].to(S.dtype)))
    return torch.stack(ys, 1).to(q.dtype), S


def linear_attention_parallel(q, k, v, S):
    """Same signature; the whole sequence as one masked matmul, plus what S0 contributes."""
    T = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    y = torch.einsum("bhts,bshe->bthe", scores.masked_fill(~causal, 0), v)
    y = y + torch.einsum("bhed,bthd->bthe", S.to(q.dtype), q)
    return y, S + torch.einsum("bthe,bthd->bhed", v, k).to(S.dtype)


def linear_attention_chunked(q, k, v, S, chunk_size):
    """Same signature; quadratic inside chunks of chunk_size tokens, scan.py across them."""
    T, L = q.shape[1], chunk_size
    q, k, v = (chunk(x, L) for x in (q, k, v))  # [B, T/L, H, L, *]; zero keys and values add nothing
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    y_intra = (q @ k.mT).masked_fill(~causal, 0) @ v
    chunk_kv = (v.mT @ k).to(S.dtype)  # [B, T/L, H, Dv, Dk]: what each chunk writes
    S_after = scan(torch.ones(1, 1, 1, 1, 1, dtype=S.dtype, device=S.device), chunk_kv, S)
    S_before = torch.cat([S[:, None], S_after[:, :-1]], 1)
    y = y_intra + q @ S_before.to(q.dtype).mT
    return y.transpose(2, 3).flatten(1, 2)[:, :T], S_after[:, -1]


class LinearAttention(nn.Module):
    """Multi-head linear attention; forward(x [B, T, d_model], state) -> (y, state [B, H, Dv + 1, Dk])."""

    forms = ("recurrent", "parallel", "chunked", "fused")

    def __init__(self, d_model, n_head=4, chunk_size=64, eps=1e-6):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head, self.chunk_size, self.eps = n_head, chunk_size, eps
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, state=None, form="fused"):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_head, -1)).unbind(2)
        q, k = feature_map(q), feature_map(k)
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # the normaliser's row of ones
        if state is None:
            acc = torch.promote_types(x.dtype, torch.float32)  # states accumulate in float32 or better
            state = x.new_zeros(B, self.n_head, v.shape[-1], q.shape[-1], dtype=acc)
        if form == "recurrent":
            y, state = linear_attention_recurrent(q, k, v, state)
        elif form == "parallel":
            y, state = linear_attention_parallel(q, k, v, state)
        elif form == "chunked":
            y, state = linear_attention_chunked(q, k, v, state, self.chunk_size)
        elif form == "fused":  # g = 0: nothing decays
            y, state = scalar_decay(q, k, v, state.new_zeros(()).expand(B, T, self.n_head), state)
        else:
            raise ValueError(f"unknown form {form!r}; LinearAttention has {self.forms}")
        y = y[..., :-1] / (y[..., -1:] + self.eps)
        return self.out(y.flatten(2).to(x.dtype)), state

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
