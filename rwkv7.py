"""RWKV-7 "Goose": Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution"
(arXiv:2503.14456): the time-mix block and its wkv update, the generalised delta rule.

DeltaNet's transition I - beta k k^T gets a per-channel, data-dependent decay w_t and a removal
key kappa_t (unit norm per head) apart from the key k_t it writes under:

    S_t = S_{t-1} (diag(w_t) - kappa_t (a_t * kappa_t)^T) + v_t k_t^T,      y_t = S_t r_t

a_t in (0, 1) per channel is the in-context learning rate: how much of what S holds under kappa_t
is removed. The key written is the "replacement key" k_t = k'_t * (1 + (a_t - 1) k_a), kappa_t =
normalize(k'_t * k_k), w_t = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w W1) W2)) in (0.545, 1),
a_t = sigmoid(a0 + x_a A1 A2): LoRA-style projections of the token-shifted input
x_* = x_t + (x_{t-1} - x_t) * mu_*, one static mu per channel and input (r, w, k, v, a, g).
Around the recurrence: a per-head GroupNorm of y (eps 64e-5), the bonus (r_t . (k_t * r_k)) v_t
per head, the gate g_t = sigmoid(x_g G1) G2, the output projection. Shapes: r, k, kappa, a, log w
[B, T, H, Dk], v [B, T, H, Dv], Dk = Dv = head_size. State: (S [B, H, Dv, Dk] float32 or better,
the last input x_T [B, d_model] for the token shift).

Two forms of the same function:
    recurrent  the update above, one token at a time
    chunked    the transition diag(w) + alpha beta^T (alpha = -kappa, beta = a * kappa) inside
               chunks of L tokens in WY form: h_t = S_{t-1} alpha_t from one unit lower-triangular
               L x L solve per chunk; each chunk then maps S -> S M_c + C_c (M_c dense Dk x Dk),
               and (M1, C1) then (M2, C2) = (M1 M2, C1 M2 + C2) is associative, so chunk_states,
               a Hillis-Steele doubling over the T / L chunks (log2(T / L) batched matmuls), gives
               every chunk's entering state: no loop over tokens or chunks.
No parallel form: with a decay per channel, the T x T matrices need exp(c_t - c_s) for every
(t, s, channel), O(T^2 Dk) memory; factored as exp(c_t) exp(-c_s) they overflow float32 past 146
tokens (292 around the middle, below). The chunked form with L = T is that form, so L is capped.

Numerics: c_t = the sum of log w over a chunk up to t, with log w >= -e^{-1/2} = -0.61 (the soft
clamp), so over L = 64 tokens the decay reaches e^-39. Every product exp(c_t - c_s), t >= s, is
<= 1; the L x L matrices factor it around the chunk's middle m, exp(c_t - c_m) exp(c_m - c_s),
with factors within e^{+-0.61 L/2} = e^{+-19.4} at L = 64, and entries above the diagonal (up to
e^{39} |r| |k|) masked by where, never multiplied. float32 and bf16 reach e^88: L <= 64 is safe.
Chunk transitions and the doubling run in float32 with autocast off: no bf16 rounding compounds.

Origin: the official time mix (BlinkDL/RWKV-LM, RWKV-v7/rwkv_v7_demo.py and
train_temp/src/model.py, "x070"), with its parameter names, its state convention S [B, H, Dv, Dk]
(the "wkv state", S[i, j] with i the value and j the key channel) and its init: that of its layer 0
(ratio_0_to_1 = 0, ratio_1_to_almost0 = 1); r, k, v, output as generate_init_weight sets them
(orthogonal with gains 1, 0.1, 1, and zero); LoRA ranks max(32, round(1.8 sqrt(d_model) / 32) 32)
for w and a and max(32, round(0.6 d_model^0.8 / 32) 32) for g (fla's layer uses 2.5 sqrt(d_model)
and 5 sqrt(d_model)). w_t above is the official exp(-exp(-softplus(-z) - 0.5)), rewritten; the
static token-shift mix is the released v7 code's (RWKV-6's data-dependent lerp is gone).
Departures: the value residual (layer 0's v mixed into every later layer, with its v LoRA) crosses
layers and has no place in the one-layer contract forward(x, state) -> (y, state), so every layer
is the official layer 0, which has none. The channel mix (relu^2 MLP) is left to train.py's MLP.
ln_x weight starts at 1, the official ((layer_id + 1) / n_layer)^0.7 of a one-layer model. Head
size 64, but at most d_model: d_model 32 (the tests) runs one head of 32. The LoRA matrices and
r_k are marked _no_weight_decay: the official optimiser decays only r, k, v and output.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rwkv7_recurrent(r, log_w, k, v, kappa, a, S):
    """r, log_w, k, kappa, a: [B, T, H, Dk], v: [B, T, H, Dv], S: [B, H, Dv, Dk] -> y [B, T, H, Dv], S.
    Accumulates in S's dtype."""
    r, w, k, v, kappa, a = (x.to(S.dtype) for x in (r, log_w.exp(), k, v, kappa, a))
    ys = []
    for t in range(r.shape[1]):
        held = torch.einsum("bhed,bhd->bhe", S, kappa[:, t])  # what S holds under kappa_t
        S = S * w[:, t, :, None, :] - held[..., None] * (a[:, t] * kappa[:, t])[..., None, :]
        S = S + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(torch.einsum("bhed,bhd->bhe", S, r[:, t]))
    return torch.stack(ys, 1), S


def chunk(x, L):
    """[B, T, H, *] -> [B, T/L, H, L, *], T padded with zeros to a multiple of L."""
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, -x.shape[1] % L))
    return x.unflatten(1, (-1, L)).transpose(2, 3)


def chunk_states(M, C, S):
    """Chunk maps S -> S M_c + C_c, M [B, T/L, H, Dk, Dk], C [B, T/L, H, Dv, Dk], from S [B, H, Dv, Dk]
    -> the state entering each chunk [B, T/L, H, Dv, Dk] and the final state, by Hillis-Steele doubling,
    out of place (autograd records log2(T/L) batched matmuls, not T/L small steps)."""
    C = torch.cat([S[:, None] @ M[:, :1] + C[:, :1], C[:, 1:]], 1)  # C_0 := the state after chunk 0
    n, d = M.shape[1], 1
    while d < n:  # now C_c = the state after chunk c if c < d, else the map of chunks c-d+1 .. c applied to 0
        C = torch.cat([C[:, :d], C[:, :-d] @ M[:, d:] + C[:, d:]], 1)  # (M1, C1) then (M2, C2) = (M1 M2, C1 M2 + C2)
        M = torch.cat([M[:, :d], M[:, :-d] @ M[:, d:]], 1) if 2 * d < n else M  # the last round needs no M
        d *= 2
    return torch.cat([S[:, None], C[:, :-1]], 1), C[:, -1]


def rwkv7_chunked(r, log_w, k, v, kappa, a, S, chunk_size):
    """Same signature; WY form inside chunks of chunk_size (<= 64) tokens, chunk_states across them.
    Needs log_w >= -e^{-1/2} (RWKV-7's clamp), the bound on the factors (module docstring)."""
    T, L, Dk = r.shape[1], chunk_size, r.shape[-1]
    # [B, T/L, H, L, *]; padded tokens: log w = 0 and zero vectors, the state passes through unchanged
    r, log_w, k, v, kappa, a = (chunk(x.to(S.dtype), L) for x in (r, log_w, k, v, kappa, a))
    alpha, beta = -kappa, kappa * a  # S_t = S_{t-1} (diag(w_t) + alpha_t beta_t^T) + v_t k_t^T
    c = log_w.cumsum(-2)  # log of w_1 ... w_t from the chunk's start, <= 0
    c_prev, mid = c - log_w, c[..., L // 2:L // 2 + 1, :]
    into_mid = (mid - c).exp()
    keys = torch.cat([beta * into_mid, k * into_mid], -2)  # [beta; k]_s * exp(c_m - c_s)
    causal = torch.ones(L, L, dtype=torch.bool, device=r.device)
    # [A_ab | A_ak]_ts = alpha_t . ([beta | k]_s * w_{s+1} ... w_{t-1}), s < t: what h_t = S_{t-1} alpha_t reads
    A = torch.where(causal.tril(-1).repeat(1, 2), (alpha * (c_prev - mid).exp()) @ keys.mT, 0).to(S.dtype)
    # [P_rb | P_rk]_ts = r_t . ([beta | k]_s * w_{s+1} ... w_t), s <= t: what y_t = S_t r_t reads
    P = torch.where(causal.tril().repeat(1, 2), (r * (c - mid).exp()) @ keys.mT, 0)
    A_ab, A_ak = A.split(L, -1)
    P_rb, P_rk = P.split(L, -1)
    # h = S_0 w + u: (I - A_ab) [W | U] = [alpha * (w_1 ... w_{t-1}) | A_ak V]
    rhs = torch.cat([alpha * c_prev.exp(), (A_ak @ v).to(S.dtype)], -1)
    eye = torch.eye(L, dtype=S.dtype, device=S.device)
    W, U = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True).split(Dk, -1)
    Q = r * c.exp() + P_rb @ W  # y = Q S_0^T + P_rb U + P_rk V
    y_intra = P_rb @ U + P_rk @ v
    with torch.autocast(S.device.type, enabled=False):  # states in float32: no bf16 rounding compounds
        to_end = (c[..., -1:, :] - c).exp()  # w_{s+1} ... w_L
        M = torch.diag_embed(c[..., -1, :].exp()) + W.mT @ (beta * to_end)  # S_L = S_0 M + C
        C = U.mT @ (beta * to_end) + v.mT @ (k * to_end)
        S_in, S = chunk_states(M, C, S)
    y = Q @ S_in.mT + y_intra
    return y.transpose(2, 3).flatten(1, 2)[:, :T], S


def lora(d_model, rank):
    """x @ down @ up: down zero, up orthogonal with gain 0.1 (official ortho_init(x, 0.1))."""
    up = nn.Parameter(torch.empty(rank, d_model))
    nn.init.orthogonal_(up, gain=0.1 * max(1.0, (rank / d_model) ** 0.5))
    return nn.Parameter(torch.zeros(d_model, rank)), up


class RWKV7(nn.Module):
    """RWKV-7 time mix; forward(x [B, T, d_model], state) -> (y, (S [B, H, Dv, Dk], x_last [B, d_model]))."""

    forms = ("recurrent", "chunked")

    def __init__(self, d_model, head_size=64, chunk_size=64, decay_lora=None, a_lora=None, gate_lora=None):
        super().__init__()
        Dk = min(head_size, d_model)  # = Dv
        if d_model % Dk or Dk < 2:
            raise ValueError(f"d_model={d_model} does not split into heads of head_size={Dk} (>= 2)")
        if not 1 <= chunk_size <= 64:
            raise ValueError(f"chunk_size={chunk_size} must be in 1..64: e^(0.61 L/2) factors (see the docstring)")
        self.n_head, self.head_size, self.chunk_size = d_model // Dk, Dk, chunk_size
        rank = lambda given, size: given or max(32, int(round(size / 32) * 32))  # official "suggestion"
        n = torch.arange(d_model, dtype=torch.float32)
        linear = n / (d_model - 1) - 0.5
        zigzag = ((n % Dk) - (Dk - 1) / 2) / ((Dk - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        for name, power in zip("rwkvag", (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):  # token-shift mix, layer 0
            setattr(self, "x_" + name, nn.Parameter(1 - (n / d_model) ** power))
        self.w0 = nn.Parameter(-6 + 6 * n / (d_model - 1) + 0.5 + 2.5 * zigzag)
        self.w1, self.w2 = lora(d_model, rank(decay_lora, 1.8 * d_model ** 0.5))
        self.a0 = nn.Parameter(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.a1, self.a2 = lora(d_model, rank(a_lora, 1.8 * d_model ** 0.5))
        self.g1, self.g2 = lora(d_model, rank(gate_lora, 0.6 * d_model ** 0.8))
        self.k_k = nn.Parameter(0.71 - 0.1 * linear)
        self.k_a = nn.Parameter(torch.full((d_model,), 1.02))
        self.r_k = nn.Parameter(torch.full((d_model // Dk, Dk), -0.04))
        self.receptance, self.key, self.value, self.output = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        for lin, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0)):
            nn.init.orthogonal_(lin.weight, gain=gain)
        nn.init.zeros_(self.output.weight)
        self.ln_x = nn.GroupNorm(d_model // Dk, d_model, eps=64e-5)  # official eps: 1e-5 * head_size_divisor 8 ** 2
        for p in (self.w1, self.w2, self.a1, self.a2, self.g1, self.g2, self.r_k):
            p._no_weight_decay = True

    def forward(self, x, state=None, form="chunked"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; RWKV7 has {self.forms}")
        B, T, d_model = x.shape
        H, Dk = self.n_head, self.head_size
        acc = torch.promote_types(x.dtype, torch.float32)  # the state accumulates in float32 or better
        if state is None:
            state = (x.new_zeros(B, H, Dk, Dk, dtype=acc), x.new_zeros(B, d_model))
        S, last = state
        xx = torch.cat([last[:, None].to(x.dtype), x[:, :-1]], 1) - x  # token shift: x_{t-1} - x_t
        xr, xw, xk, xv, xa, xg = (x + xx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        heads = lambda t: t.to(acc).unflatten(-1, (H, Dk))
        r, k, v = heads(self.receptance(xr)), heads(self.key(xk)), heads(self.value(xv))
        log_w = heads(-math.exp(-0.5) * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2))
        a = heads(torch.sigmoid(self.a0 + xa @ self.a1 @ self.a2))  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kappa = F.normalize(k * self.k_k.view(H, Dk), dim=-1)  # removal key, unit norm per head
        k = k * (1 + (a - 1) * self.k_a.view(H, Dk))  # replacement key
        if form == "recurrent":
            y, S = rwkv7_recurrent(r, log_w, k, v, kappa, a, S)
        else:
            y, S = rwkv7_chunked(r, log_w, k, v, kappa, a, S, self.chunk_size)
        y = self.ln_x(y.to(acc).reshape(B * T, d_model)).view(B, T, H, Dk)
        y = y + (r * k * self.r_k).sum(-1, keepdim=True) * v  # the bonus: the current token, read directly
        return self.output((y.flatten(2) * g).to(x.dtype)), (S, x[:, -1].clone())

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
