"""mLSTM: the LSTM with a matrix memory. Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"
(arXiv:2405.04517), sec. 2.3; the stabilised and the parallel form in its appendix.

    C_t = f_t C_{t-1} + i_t v_t k_t^T,    n_t = f_t n_{t-1} + i_t k_t,    h~_t = C_t q_t / max(|n_t^T q_t|, 1)
    i_t = exp(i~_t) (exponential input gate),    f_t = sigmoid(f~_t),    k_t scaled by Dk^-1/2

The state is linear attention's plus a normaliser n_t; the exponential input gate lets a new token
outweigh everything stored (i_t >> 1), and would overflow float32 from i~_t ~ 89 on. So the state
is kept stabilised, C~ = C exp(-m_t), n~ = n exp(-m_t), m_t the log of the largest weight a token
holds in it (the empty state: C~ = n~ = 0, m = 0):

    m_t = max(g_t + m_{t-1}, i~_t)                                 g_t = log f_t <= 0
    C~_t = exp(g_t + m_{t-1} - m_t) C~_{t-1} + exp(i~_t - m_t) v_t k_t^T          (n~_t alike)
    h~_t = C~_t q_t / max(|n~_t^T q_t|, exp(-m_t))

Every weight is exp(<= 0), and m_t cancels from h~_t exactly (the numerator and both arguments of
the max carry exp(-m_t)); exponents add the large terms (i~, m) first, so float32 keeps i ~ e^1e4.
As h~ does not depend on m, no gradient flows through m (mlstm_kernels' chunkwise backward treats it
as a constant too): the gradients through C~ and n~ are exact, for this call and for a later one
that continues from its state, and finite where exp(-m) overflows (f = 0 with i = e^-1e4).
Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv], i~ (log_i) and g [B, T, H]; state (C~ [B, H, Dv, Dk],
n~ [B, H, Dk], m [B, H]) in float32 or better.

Three forms, each returning the recurrence's (C~, n~, m):
    recurrent  the stabilised loop above, one token at a time
    parallel   unrolled: log D_ts = g_{s+1} + ... + g_t + i~_s for s <= t (else -inf), and the state
               it starts from one more column, of log weight g_1 + ... + g_t + m_0; m_t = the row's
               max, exactly the recurrence's m_t; h~ = (Q K^T * exp(log D - m)) V / max(|row sum|,
               exp(-m)), plus what the initial state adds to both: O(T^2)
    chunked    the parallel form inside chunks of L tokens (128: a compiled training step 7% faster than with 64,
               and 256 no faster; RESULTS.md), the state entering a chunk its extra column.
               Across chunks the stabiliser is settled first: the state at the end of chunk c has
               m_c = max(G_c + m_{c-1}, a_c), G_c the chunk's sum of g, a_c the largest log weight its
               own tokens hold at its end; unrolled, m_c is the row max of log_decay_mask(G) + a (and
               m_0 + G_1 + ... + G_c): the parallel form's row max one level up, (T/L)^2 numbers a head.
               With every m_c known, the chunk states are one scan.py scan of C~ (n~ as one more row):
               C~_c = exp(G_c + m_{c-1} - m_c) C~_{c-1} + sum_s exp(log weight_s - m_c) v_s k_s^T.

The layer is the mLSTM layer of xLSTM's pre-up-projection block (xlstm/blocks/mlstm/layer.py, cell.py,
backends.py) with its defaults: x -> (x_m, z) by an up-projection of factor 2; x_m through a causal
depthwise conv (kernel 4, with bias) and SiLU gives q and k, x_m itself v, each by a block-diagonal
projection of 4 x 4 blocks; i~ and f~ per head from (q, k, v) by one linear layer with bias; 4 heads;
the cell's h~ through a per-head LayerNorm (weight 1 + w, no bias, eps 1e-5), plus a learnable skip
times the conv's output, times silu(z) (the block's output gate), then the down-projection. Init as
xLSTM: up and q, k, v N(0, 2 / (5 d_model)) (small init), down N(0, (2 / sqrt(d_model))^2) (wang init
of one block, the layer's default), conv PyTorch's default, gate weights 0, i~ bias N(0, 0.1^2), f~
bias linspace(3, 6) over the heads, skip 1, w 0. Departures: no + 1e-6 in the denominator (xLSTM's
eps, with which h = C q / (max(|n q|, 1) + 1e-6 exp(m_t)) would depend on the stabiliser); the inner
width exactly 2 d_model, where xLSTM rounds it up to a multiple of 64 (equal where d_model is a
multiple of 32); the input and forget gate layers one layer of 2 H outputs (xLSTM's two: the same
function and init). State: (C~, n~, m, conv [B, 3, 2 d_model]: the conv's left context, x's dtype).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scan import scan


def log_decay_mask(g):
    """g: log decays [..., L] -> [..., L, L]: g_{s+1} + ... + g_t for t >= s, -inf above the diagonal: the log of
    decay_mask(g). Cumsums of masked copies, no differences of large cumsums."""
    L = g.shape[-1]
    below = torch.ones(L, L, dtype=torch.bool, device=g.device).tril(-1)
    sums = g[..., :, None].expand(*g.shape, L).masked_fill(~below, 0).cumsum(-2)
    return sums.masked_fill(~torch.ones_like(below).tril(), -math.inf)


def mlstm_recurrent(q, k, v, log_i, g, state):
    """q, k: [B, T, H, Dk], v: [B, T, H, Dv], log_i, g: [B, T, H], state (C [B, H, Dv, Dk], n [B, H, Dk], m [B, H])
    -> y [B, T, H, Dv], state. Accumulates in C's dtype."""
    C, n, m = state
    q, k, v, log_i, g = (x.to(C.dtype) for x in (q, k, v, log_i, g))
    m, ys = m.detach(), []
    for t in range(q.shape[1]):
        m_new = torch.maximum(g[:, t] + m, log_i[:, t]).detach()
        f, i = (g[:, t] + (m - m_new)).exp(), (log_i[:, t] - m_new).exp()
        C = f[..., None, None] * C + i[..., None, None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        n, m = f[..., None] * n + i[..., None] * k[:, t], m_new
        den = torch.maximum((n * q[:, t]).sum(-1).abs(), torch.exp(-m))
        ys.append(torch.einsum("bhvk,bhk->bhv", C, q[:, t]) / den[..., None])
    return torch.stack(ys, 1), (C, n, m)


def attend(q, k, v, log_i, decay, c, state):
    """The parallel form from a state, any leading dims: q, k [.., T, Dk], v [.., T, Dv], log_i [.., T], decay =
    log_decay_mask(g) [.., T, T], c = cumsum(g) [.., T], state (C0 [.., Dv, Dk], n0 [.., Dk], m0 [..]) ->
    (numerator [.., T, Dv], denominator [.., T], the last row's weights of the tokens [.., T] and of the state [..],
    m [.., T])."""
    C0, n0, m0 = state
    m = torch.maximum((decay + log_i[..., None, :]).amax(-1), c + m0[..., None]).detach()
    # the large terms (i~, m) cancel first, the decays are added after: float32 resolves weights at i ~ e^1e4 as at 1
    D, w0 = (decay + (log_i[..., None, :] - m[..., None])).exp(), (c + (m0[..., None] - m)).exp()
    scores = (q @ k.mT) * D
    num = scores @ v + w0[..., None] * (q @ C0.mT)
    den = torch.maximum((scores.sum(-1) + w0 * (q @ n0[..., None])[..., 0]).abs(), torch.exp(-m))
    return num, den, D[..., -1, :], w0[..., -1], m


def mlstm_parallel(q, k, v, log_i, g, state):
    """Same signature; the whole sequence as one stabilised matrix D, plus the initial state's column."""
    C0, n0, m0 = state
    q, k, v, log_i, g = (x.to(C0.dtype).transpose(1, 2) for x in (q, k, v, log_i, g))  # [B, H, T, *]
    num, den, last, w0, m = attend(q, k, v, log_i, log_decay_mask(g), g.cumsum(-1), (C0, n0, m0.detach()))
    C = torch.einsum("bhtv,bhtk->bhvk", v, k * last[..., None]) + w0[..., None, None] * C0
    n = (k * last[..., None]).sum(-2) + w0[..., None] * n0
    return (num / den[..., None]).transpose(1, 2), (C.to(C0.dtype), n, m[..., -1])


def mlstm_chunked(q, k, v, log_i, g, state, chunk_size):
    """Same signature; the parallel form inside chunks of chunk_size tokens, scan.py across them."""
    C0, n0, m0 = state
    T, L, m0 = q.shape[1], chunk_size, m0.detach()
    pad = -T % L  # padded tokens: zero q, k, v, g = 0, and i~ = -inf: they leave C~, n~ and m as they are

    def chunks(x, value=0.0):  # [B, T, H, *] -> [B, T/L, H, L, *]
        x = F.pad(x.to(C0.dtype), (0, 0) * (x.dim() - 2) + (0, pad), value=value)
        return x.unflatten(1, (-1, L)).transpose(2, 3)

    q, k, v, g, log_i = chunks(q), chunks(k), chunks(v), chunks(g), chunks(log_i, -math.inf)
    decay, c = log_decay_mask(g), g.cumsum(-1)  # [B, T/L, H, L, L], [B, T/L, H, L]: from the chunk's start
    G, to_end = c[..., -1], decay[..., -1, :]  # each chunk's log decay [B, T/L, H], each token's to its chunk's end
    m_end = torch.maximum((log_decay_mask(G.mT) + (to_end + log_i).amax(-1).mT[..., None, :]).amax(-1),
                          G.mT.cumsum(-1) + m0[..., None]).mT.detach()  # [B, T/L, H]: row maxima over chunks
    m_in = torch.cat([m0[:, None], m_end[:, :-1]], 1)
    k_end = k * (to_end + (log_i - m_end[..., None])).exp()[..., None]
    writes = torch.cat([torch.einsum("bchlv,bchlk->bchvk", v, k_end), k_end.sum(-2)[..., None, :]], -2)
    S0 = torch.cat([C0, n0[..., None, :]], -2)  # [B, H, Dv + 1, Dk]: n~ as one more row of C~
    S = scan((G + (m_in - m_end)).exp()[..., None, None], writes.to(C0.dtype), S0)
    S_in = torch.cat([S0[:, None], S[:, :-1]], 1)
    num, den, _, _, _ = attend(q, k, v, log_i, decay, c, (S_in[..., :-1, :], S_in[..., -1, :], m_in))
    num, den = (x.transpose(2, 3).flatten(1, 2)[:, :T] for x in (num, den))  # sliced first: no 0 / 0 in the padding
    return num / den[..., None], (S[:, -1, :, :-1], S[:, -1, :, -1], m_end[:, -1])


def blockwise(x, w):
    """x [.., n b] through the block-diagonal matrix of w's n blocks [n, b, b]."""
    return torch.einsum("...nj,nij->...ni", x.unflatten(-1, (w.shape[0], -1)), w).flatten(-2)


class MLSTM(nn.Module):
    """xLSTM's mLSTM layer; forward(x [B, T, d_model], state) -> (y, (C~, n~, m, conv))."""

    forms = ("recurrent", "parallel", "chunked")

    def __init__(self, d_model, n_head=4, chunk_size=128, proj_factor=2, conv_size=4, qkv_blocksize=4, eps=1e-5):
        super().__init__()
        inner = round(proj_factor * d_model)
        if inner % n_head or inner % qkv_blocksize:
            raise ValueError(f"d_model={d_model}: {proj_factor} d_model must split into n_head={n_head} heads "
                             f"and blocks of {qkv_blocksize}")
        self.n_head, self.chunk_size, self.eps = n_head, chunk_size, eps
        self.up = nn.Linear(d_model, 2 * inner, bias=False)  # (x_m, z)
        self.conv = nn.Conv1d(inner, inner, conv_size, groups=inner)
        b = qkv_blocksize
        self.wq, self.wk, self.wv = (nn.Parameter(torch.empty(inner // b, b, b)) for _ in range(3))
        self.gates = nn.Linear(3 * inner, 2 * n_head)  # (i~, f~) per head from (q, k, v)
        self.norm = nn.Parameter(torch.zeros(inner))  # the LayerNorm's weight is 1 + norm
        self.skip = nn.Parameter(torch.ones(inner))
        self.down = nn.Linear(inner, d_model, bias=False)
        for w in (self.up.weight, self.wq, self.wk, self.wv):
            nn.init.normal_(w, std=math.sqrt(2 / (5 * d_model)))
        nn.init.normal_(self.down.weight, std=2 / math.sqrt(d_model))
        with torch.no_grad():
            self.gates.weight.zero_()
            self.gates.bias[:n_head].normal_(0.0, 0.1)
            self.gates.bias[n_head:] = torch.linspace(3.0, 6.0, n_head)

    def forward(self, x, state=None, form="chunked"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; MLSTM has {self.forms}")
        B, H, inner = x.shape[0], self.n_head, self.skip.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)  # states and gates in float32 or better
        if state is None:
            D = inner // H
            state = (x.new_zeros(B, H, D, D, dtype=acc), x.new_zeros(B, H, D, dtype=acc),
                     x.new_zeros(B, H, dtype=acc), x.new_zeros(B, self.conv.kernel_size[0] - 1, inner))
        *cell, conv = state
        x_m, z = self.up(x).chunk(2, -1)
        ctx = torch.cat([conv, x_m.to(conv.dtype)], 1)  # the conv state is the left context
        x_c = F.silu(self.conv(ctx.mT).mT)
        q, k, v = blockwise(x_c, self.wq), blockwise(x_c, self.wk), blockwise(x_m, self.wv)
        log_i, f = self.gates(torch.cat([q, k, v], -1)).to(acc).chunk(2, -1)
        q, k, v = (t.unflatten(-1, (H, -1)) for t in (q, k, v))
        k = k * k.shape[-1] ** -0.5
        g = F.logsigmoid(f)  # log f_t <= 0
        if form == "chunked":
            h, cell = mlstm_chunked(q, k, v, log_i, g, cell, self.chunk_size)
        else:
            h, cell = (mlstm_recurrent if form == "recurrent" else mlstm_parallel)(q, k, v, log_i, g, cell)
        h = F.layer_norm(h.to(acc), h.shape[-1:], eps=self.eps).flatten(2) * (1 + self.norm)
        y = (h + self.skip * x_c) * F.silu(z)
        return self.down(y.to(x.dtype)), (*cell, ctx[:, ctx.shape[1] - conv.shape[1]:].clone())

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
