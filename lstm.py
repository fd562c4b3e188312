"""LSTM with diagonal recurrent weights, trained in parallel over time by Newton's method.

    [i, f, o, g]_t = [sigma, sigma, sigma, tanh](W x_t + r * h_{t-1} + b)
    c_t = f_t * c_{t-1} + i_t * g_t,    h_t = o_t * tanh(c_t),    y_t = W_o h_t

Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000 (its bias starts at 1).
The recurrent weights r are diagonal, one per gate per channel (as ParaRNN, Danieli et al. 2025,
arXiv:2510.21450), r ~ U(-1, 1). State (c, h), D = d_hidden channels each (default d_model).

Parallel form (DEER, Lim et al. 2024, arXiv:2309.12252; ParaRNN): Newton on all T steps at once.
With s_t = (c_t, h_t) and s_t = F(s_{t-1}, x_t), the update delta = s^{k+1} - s^k solves

    delta_t = A_t delta_{t-1} + (F(s^k_{t-1}) - s^k_t),    delta_{-1} = 0,

A_t the per-channel 2x2 Jacobian dF/ds_{t-1} at the guess (a = dc_t/dh_{t-1}, k = o(1 - tanh^2 c_t)):

    [[f,      a                          ],      a = c_{t-1} f(1-f) r_f + g i(1-i) r_i + i(1-g^2) r_g
     [k f,    o(1-o) r_o tanh(c_t) + k a ]]

Exact Newton (jacobian="full", the default) solves this 2x2-block recurrence with scan.py's
block_scan (one Triton kernel on the GPU, log-depth doubling elsewhere). Quasi-Newton
(jacobian="diag", ParaRNN's cheaper option) keeps only the diagonal of A_t and calls scan.py.
Measured (fresh layer, x ~ N(0, 1), T=2048, CPU; three seeds): float32 full 6, 6, 6 iterations,
diag 45, 42, 38 (float64: 7 vs 68-84); in a strongly nonlinear case (r up to 5, T=256, float64)
full 40, diag 256 = the cap (at r up to 10 diag even ends the cap 1e-2 off: its diagonal products
overstate the true ones and amplify rounding). On the CPU a diag iteration cost about a third of a
full one, but diag takes about 7 times as many: a whole forward at T=2048 took 0.43 s with diag,
0.21 s with full, so full wins: it is the default.
Start: s^0 = F(0, x_t). Stop when max |delta| / (1 + |s|) <= tol (float64 1e-12, float32 1e-6,
bf16/fp16 inputs 1e-3), or once it is below sqrt(tol) and has made no new minimum for 3
iterations (stuck at rounding level). Guarantee: after k iterations s_0 .. s_{k-1} are exact
(step t waits only for s_{t-1}), so the cap of T iterations solves it exactly from any guess,
with either Jacobian. Safeguards that keep that exact prefix: iterates are clipped to where the
solution lies (|h| <= 1, |c_t| <= |c_{-1}| + t + 1), and where the linear solve overflowed the
update is the Picard step s^{k+1}_t = F(s^k_{t-1}).

Gradients by implicit differentiation at the solution, not through the iterations: the adjoint
lam_t = dL/ds_t + A_{t+1}^T lam_{t+1} is one 2x2-block recurrence run backwards, then one
vectorised vector-Jacobian product of F over all t gives dL/dx, dL/dr, dL/db and dL/ds_{-1}.

Forms: recurrent (the loop, one token at a time) and parallel (Newton, the default: a custom op,
since its loop stops on the data). Two engines solve it: lstm_newton below, on the whole sequence
(CPU, MPS, float64: each iteration a block scan and a host sync for the test), and on CUDA in
float32 newton.py's kernel, the same Newton per tile of steps, entered from the previous tile's
exact state, with no host sync, so CUDA graphs capture it; its backward is newton.lstm_backward, the adjoint
and the vector-Jacobian product in one kernel. The parallel form sets
self.stats["newton_iters"], a tensor: the iterations (the kernel's: the mean over its tiles).
"""
import torch
import torch.nn as nn

import newton
from scan import block_scan, scan

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def gates(u, r, h):
    """The gates i, f, o, g [..., D] from u = W x + b [..., 4, D] and the previous h [..., D]."""
    z = u + r * h[..., None, :]
    i, f, o = torch.sigmoid(z[..., :3, :]).unbind(-2)
    return i, f, o, torch.tanh(z[..., 3, :])


def cell(u, r, c, h, jacobian=False):
    """One LSTM step, any leading dims: u = W x + b [..., 4, D], r [4, D], c, h [..., D] the
    previous state -> new c, h (and the 2x2 Jacobians [..., 2, 2, D] w.r.t. (c, h))."""
    i, f, o, g = gates(u, r, h)
    c_new = f * c + i * g
    tc = torch.tanh(c_new)
    h_new = o * tc
    if not jacobian:
        return c_new, h_new
    return c_new, h_new, derivatives(r, c, i, f, o, g, tc)[0]


def derivatives(r, c, i, f, o, g, tc):
    """A step's derivatives from its gates: the Jacobian A [..., 2, 2, D] of (c_t, h_t) w.r.t. (c_{t-1}, h_{t-1}),
    dz [..., 4, D] = dc_t/dz for the gates i, f, g and dh_t/dz for o (z the pre-activations), k = dh_t/dc_t."""
    dz = torch.stack([g * i * (1 - i), c * f * (1 - f), tc * o * (1 - o), i * (1 - g * g)], -2)
    a = dz[..., 0, :] * r[0] + dz[..., 1, :] * r[1] + dz[..., 3, :] * r[3]  # dc_t/dh_{t-1}
    k = o * (1 - tc * tc)
    A = torch.stack([f, a, k * f, dz[..., 2, :] * r[2] + k * a], -2).unflatten(-2, (2, 2))
    return A, dz, k


def lstm_recurrent(u, r, c, h):
    """The loop, one token at a time: u [B, T, 4, D], c, h [B, D] -> all h [B, T, D], final (c, h)."""
    hs = []
    for t in range(u.shape[1]):
        c, h = cell(u[:, t], r, c, h)
        hs.append(h)
    return torch.stack(hs, 1), (c, h)


def shift(s, s0):
    """s_{t-1} for every t, s0 in front."""
    return torch.cat([s0[:, None], s[:, :-1]], 1)


def lstm_newton(u, r, s0, tol, full=True, cap=None):
    """Newton (DEER) on all T steps at once, at most cap (default T) steps: u [B, T, 4, D],
    s0 [B, 2, D] = (c, h) -> (states [B, T, 2, D], iterations)."""
    T = u.shape[1]
    s = torch.stack(cell(u, r, 0 * u[:, :, 0], 0 * u[:, :, 0]), 2)
    c_max = s0[:, None, 0].abs() + torch.arange(1, T + 1, dtype=u.dtype, device=u.device)[:, None]
    best, stall = float("inf"), 0
    for k in range(1, (cap or T) + 1):
        prev = shift(s, s0)
        c, h, A = cell(u, r, prev[:, :, 0], prev[:, :, 1], jacobian=True)
        res = torch.stack([c, h], 2) - s
        delta = block_scan(A, res) if full else scan(torch.stack([A[:, :, 0, 0], A[:, :, 1, 1]], 2), res)
        delta = torch.where(torch.isfinite(delta), delta, res)  # overflow: Picard step there
        s = s + delta
        s = torch.stack([torch.maximum(torch.minimum(s[:, :, 0], c_max), -c_max), s[:, :, 1].clamp(-1, 1)], 2)
        size = (delta.abs() / (1 + s.abs())).max().item()
        best, stall = min(best, size), (stall + 1 if size >= best else 0)
        if size <= tol or (size <= tol ** 0.5 and stall >= 3):  # converged, or stuck at rounding level
            break
    return s, k


@torch.library.custom_op("zoo::lstm_parallel", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def lstm_parallel(u: torch.Tensor, r: torch.Tensor, s0: torch.Tensor, tol: float,
                  full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All states [B, T, 2, D] by lstm_newton, and the iteration count as a tensor. A custom op: its
    loop stops on the data, so torch.compile sees one opaque op; its host syncs keep it out of CUDA graphs."""
    s, k = lstm_newton(u, r, s0, tol, full)
    return s, torch.full((), k, dtype=torch.float32, device=u.device)


@torch.library.custom_op("zoo::lstm_parallel_tiles", mutates_args=())
def lstm_parallel_tiles(u: torch.Tensor, r: torch.Tensor, s0: torch.Tensor, tol: float,
                        full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same by newton.py's kernel (float32): it stops on the data with no host sync, so CUDA graphs capture it."""
    return newton.lstm(u, r, s0, tol, full)


def _lstm_parallel_backward(ctx, gs, _):
    s, u, r, s0 = ctx.saved_tensors
    if newton.runs(u):
        return *newton.lstm_backward(u, r, s, s0, gs), None, None
    c, h = shift(s, s0).unbind(2)
    i, f, o, g = gates(u, r, h)
    A, dz, k = derivatives(r, c, i, f, o, g, torch.tanh(f * c + i * g))
    A_next = torch.cat([A[:, 1:], torch.zeros_like(A[:, :1])], 1).transpose(2, 3)
    lam = block_scan(A_next, gs.to(s.dtype), reverse=True)
    # the vector-Jacobian product of F at every t at once, by hand: dL/dc_t in full, then through each gate
    dc = lam[:, :, 0] + lam[:, :, 1] * k
    du = dz * torch.stack([dc, dc, lam[:, :, 1], dc], -2)
    ds0 = torch.stack([dc[:, 0] * f[:, 0], (du[:, 0] * r).sum(-2)], 1)
    return du, (du * h[..., None, :]).sum((0, 1)), ds0, None, None


def _lstm_parallel_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0], *inputs[:3])
    ctx.mark_non_differentiable(output[1])  # the iteration count


for op in (lstm_parallel, lstm_parallel_tiles):
    op.register_fake(lambda u, r, s0, tol, full: (u.new_empty(u.shape[:2] + s0.shape[1:]),
                                                  u.new_empty((), dtype=torch.float32)))
    op.register_autograd(_lstm_parallel_backward, setup_context=_lstm_parallel_setup)


class LSTM(nn.Module):
    """Diagonal LSTM; forward(x [B, T, d_model], state (c, h) [B, D] each) -> (y, state)."""

    forms = ("recurrent", "parallel")

    def __init__(self, d_model, d_hidden=None, jacobian="full"):
        super().__init__()
        if jacobian not in ("full", "diag"):
            raise ValueError(f"jacobian must be 'full' or 'diag', got {jacobian!r}")
        H = self.d_hidden = d_hidden or d_model
        self.full = jacobian == "full"
        self.inp = nn.Linear(d_model, 4 * H)  # W, b for the gates i, f, o, g
        with torch.no_grad():
            self.inp.bias[H:2 * H] = 1.0  # forget-gate bias 1 (Gers et al. 2000)
        self.r = nn.Parameter(torch.rand(4, H) * 2 - 1)  # diagonal recurrent weights
        self.out = nn.Linear(H, d_model, bias=False)  # W_o
        self.stats = {}

    def forward(self, x, state=None, form="parallel"):
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r}; LSTM has {self.forms}")
        u = self.inp(x).unflatten(-1, (4, self.d_hidden))
        tol = TOL.get(u.dtype, 1e-6)
        acc = torch.promote_types(u.dtype, torch.float32)  # the state lives in float32 or better
        u, r = u.to(acc), self.r.to(acc)
        if state is None:
            c = h = u.new_zeros(u.shape[0], self.d_hidden)
        else:
            c, h = (t.to(acc) for t in state)
        if form == "recurrent":
            hs, (c, h) = lstm_recurrent(u, r, c, h)
        else:
            solve = lstm_parallel_tiles if newton.runs(u) else lstm_parallel
            s, self.stats["newton_iters"] = solve(u, r, torch.stack([c, h], 1), tol, self.full)
            hs, c, h = s[:, :, 1], s[:, -1, 0], s[:, -1, 1]
        return self.out(hs.to(x.dtype)), (c, h)

    def step(self, x, state=None):
        """One token: x [B, d_model] -> y [B, d_model], state."""
        y, state = self.forward(x[:, None], state, form="recurrent")
        return y[:, 0], state
