"""RetNet: Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models" (arXiv:2307.08621).

Linear attention with a fixed forgetting factor per head and no normaliser (sec. 2.1, eq. 1-3):

    S_t = gamma S_{t-1} + v_t k_t^T             (the state forgets geometrically)
    y_t = S_t q_t                               (so y_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s)

Multi-scale (sec. 2.2): head h has gamma_h = 1 - 2^(-5-h), h = 0..H-1. Positions: the paper's
xPos factor (gamma e^{i theta})^(n-m) splits into the decay gamma^(n-m) above and a pure rotation
of q and k, so q and k get plain rotary on interleaved pairs, with angles 1/10000^linspace(0, 1,
Dk/2); the state carries the step counter, so rotations go on where a prefill stopped. k is
scaled by Dk^-0.5. Output (sec. 2.2, eq. 8): GroupNorm per head, swish(x W_G) gate, W_O. Value
width 2 d_model, as in the paper (its parameter budget: 8 d_model^2 per layer).

Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv]; state (S [B, H, Dv, Dk], pos [B] int64: tokens seen).

Four forms of the same function:
    recurrent  the loop above, one token at a time: O(T) steps, O(1) state
    parallel   (Q K^T * Gamma) V with Gamma = decay_mask(log gamma): gamma^(t-s) for t >= s, 0 above
               the diagonal, masked in log space before the exp: O(T^2), no loop
    chunked    sec. 2.3: parallel inside chunks of L tokens, the chunk states through scan.py with
               a = gamma^L per head, broadcast: O(T L) work
    fused      chunked, in fused Triton kernels on CUDA (scalar_decay.py)

Origin: gamma_h as the paper's 1 - 2^(-5-arange(0, H)) and torchscale's RetNetRelPos decay alike;
rotary angles as torchscale's. The GroupNorm is the paper's (torchscale now uses an RMSNorm
without affine). Init as torchscale 0.3.0, its last release: xavier_uniform, gain 2^-2.5 on W_Q,
W_K, W_V, W_G, gain 1 on W_O (torchscale's main branch later moved W_O to gain 2^-1). Left out:
the paper's extra normalisations of the retention scores (sec. 3.3: dividing the decay matrix by
its row sums' sqrt, Q K^T by |row sums|) are per-token, per-head scalars that the GroupNorm
cancels up to its eps; they only guard fp16 ranges, which the decay already bounds here
(|S| <= 2^(5+h) times the largest v k^T).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from scalar_decay import scalar_decay
from scan import scan


def rotate(x, pos, base=10000.0):
    """Rotary positions on interleaved pairs of x [B, T, H, Dk] at positions pos [B, T]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    theta = base ** -torch.linspace(0, 1, x.shape[-1] // 2, dtype=acc, device=x.device)
    angle = pos[:, :, None, None].to(acc) * theta  # [B, T, 1, Dk/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).to(x.dtype)


def decay_mask(g):
    """g: per-step log decays [..., L] -> [..., L, L]: exp(g_{s+1} + ... + g_t) for t >= s, 0 above the
    diagonal. Segment sums of masked copies, not differences of cumsums (no cancellation when the
    sums are large), masked to -inf before the exp."""
    L = g.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=g.device).tril()
    sums = g[..., :, None].expand(*g.shape, L).masked_fill(~causal.tril(-1), 0).cumsum(-2)  # g_{s+1} + .. + g_t
    return sums.masked_fill(~causal, float("-inf")).exp()


def chunk(x, L):
    """[B, T, H, *] -> [B, T/L, H, L, *], T padded with zeros to a multiple of L."""
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, -x.shape[1] % L))
    return x.unflatten(1, (-1, L)).transpose(2, 3)


def retention_recurrent(q, k, v, log_gamma, S):
    """q, k: [B, T, H, Dk], v: [B, T, H, Dv], log_gamma: [H], S: [B, H, Dv, Dk] -> y [B, T, H, Dv], S."""
    gamma = log_gamma.exp().to(S.dtype)[:, None, None]
    ys = []
    for t in range(q.shape[1]):
        S = gamma * S + (v[:, t, :, :, None] * k[:, t, :, None, :]).to(S.dtype)
        ys.append(torch.einsum("bhed,bhd->bhe", S, q[:, t].to(S.dtype)))
    return torch.stack(ys, 1).to(q.dtype), S


def retention_parallel(q, k, v, log_gamma, S):
    """Same signature; the whole sequence as one decay-masked matmul, plus what S0 contributes."""
    T = q.shape[1]
    t = torch.arange(T, device=q.device)
    decay = decay_mask(log_gamma[:, None].expand(-1, T))  # [H, T, T]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay.to(q.dtype)
    y = torch.einsum("bhts,bshe->bthe", scores, v)
    faded = (log_gamma[:, None] * (t + 1)).exp().T[:, :, None].to(q.dtype)  # [T, H, 1]: gamma^(t+1)
    y = y + torch.einsum("bhed,bthd->bthe", S.to(q.dtype), q * faded)
    to_end = (log_gamma[:, None] * (T - 1 - t)).exp().T[:, :, None].to(k.dtype)  # gamma^(T-1-s)
    S_new = S * (log_gamma * T).exp().to(S.dtype)[:, None, None]
    return y, S_new + torch.einsum("bthe,bthd->bhed", v, k * to_end).to(S.dtype)


def retention_chunked(q, k, v, log_gamma, S, chunk_size):
    """Same signature; quadratic inside chunks of chunk_size tokens, scan.py across them."""
    T, L = q.shape[1], chunk_size
    q, k, v = (chunk(x, L) for x in (q, k, v))  # [B, T/L, H, L, *]; zero keys and values write nothing
    n = q.shape[1]
    y_intra = ((q @ k.mT) * decay_mask(log_gamma[:, None].expand(-1, L)).to(q.dtype)) @ v
    # what each chunk writes, decayed to the chunk's last real token (the last chunk ends at T)
    pos = torch.arange(n * L, device=q.device).view(n, 1, L)
    ends = (torch.arange(1, n + 1, device=q.device) * L).clamp(max=T) - 1
    to_end = ((ends[:, None, None] - pos).clamp(min=0) * log_gamma[:, None]).exp()  # [T/L, H, L]
    chunk_kv = (v.mT @ (k * to_end[..., None].to(k.dtype))).to(S.dtype)  # [B, T/L, H, Dv, Dk]
    a = (log_gamma * L).exp().to(S.dtype)[None, None, :, None, None]  # gamma^L per head, broadcast
    S_after = scan(a, chunk_kv, S)
    S_before = torch.cat([S[:, None], S_after[:, :-1]], 1)
    faded = (log_gamma[:, None] * torch.arange(1, L + 1, device=q.device)).exp()[..., None]  # [H, L, 1]
    y = y_intra + (q * faded.to(q.dtype)) @ S_before.to(q.dtype).mT
    r = T - (n - 1) * L  # real tokens in the last chunk: S_after[:, -1] decayed over the padding too
    S_final = S_before[:, -1] * (log_gamma * r).exp().to(S.dtype)[:, None, None] + chunk_kv[:, -1]
    return y.transpose(2, 3).flatten(1, 2)[:, :T], S_final


class RetNet(nn.Module):
    """Multi-scale retention; forward(x [B, T, d_model], state) -> (y, state (S [B, H, Dv, Dk], pos [B]))."""

    forms = ("recurrent", "parallel", "chunked", "fused")

    def __init__(self, d_model, n_head=4, chunk_size=64, value_factor=2, eps=1e-6):
        super().__init__()
        if d_model % n_head or (d_model // n_head) % 2:
            raise ValueError(f"d_model={d_model} must split into n_head={n_head} heads of even width")
        self.n_head, self.chunk_size = n_head, chunk_size
        d_value = value_factor * d_model
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_value, bias=False)
        self.g = nn.Linear(d_model, d_value, bias=False)
        self.out = nn.Linear(d_value, d_model, bias=False)
        self.norm = nn.GroupNorm(n_head, d_value, eps=eps)
        for lin in (self.q, self.k, self.v, self.g):
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x, state=None, form="fused"):
        B, T, _ = x.shape
        H = self.n_head
        acc = torch.promote_types(x.dtype, torch.float32)  # states and decays in float32 or better
        if state is None:
            S = x.new_zeros(B, H, self.v.out_features // H, self.q.out_features // H, dtype=acc)
            state = (S, torch.zeros(B, dtype=torch.long, device=x.device))
        S, seen = state
        pos = seen[:, None] + torch.arange(T, device=x.device)
        q = rotate(self.q(x).unflatten(-1, (H, -1)), pos)
        k = rotate(self.k(x).unflatten(-1, (H, -1)), pos) * q.shape[-1] ** -0.5
        v = self.v(x).unflatten(-1, (H, -1))
        log_gamma = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, dtype=acc, device=x.device)))
        if form == "recurrent":
            y, S = retention_recurrent(q, k, v, log_gamma, S)
        elif form == "parallel":
            y, S = retention_parallel(q, k, v, log_gamma, S)
        elif form == "chunked":
            y, S = retention_chunked(q, k, v, log_gamma, S, self.chunk_size)
        elif form == "fused":  # log gamma read with stride 0 over batch and time
            y, S = scalar_decay(q, k, v, log_gamma.expand(B, T, H), S)
        else:
            raise ValueError(f"unknown form {form!r}; RetNet has {self.forms}")
        y = self.norm(y.flatten(0, 1).flatten(1)).unflatten(0, (B, T))  # GroupNorm per head, per token
        y = F.silu(self.g(x)) * y
        return self.out(y.to(x.dtype)), (S, seen + T)

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
