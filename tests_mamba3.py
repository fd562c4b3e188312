"""mamba3.py: the complex-valued recurrence of the paper, lambda = 1 as Mamba-2's Euler rule, extreme decays,
ragged chunks, long sequences, state and init as mamba_ssm's Mamba3.

    pytest tests_mamba3.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

import mamba3
from mamba3 import Mamba3
from test_equivalence import assert_torch_default, assert_uniform, rel_err


def mamba3_make(dtype=torch.float64, seed=0, **opts):
    """A small layer whose biases, norm weights and D are nudged off their init, so that a formula that drops one
    of them, or reads the wrong head's, changes the output."""
    torch.manual_seed(seed)
    m = Mamba3(32, **{**dict(headdim=8, d_state=8, chunk_size=8), **opts})
    with torch.no_grad():
        for p in (m.B_bias, m.C_bias, m.B_norm_weight, m.C_norm_weight, m.D):
            p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype)


def mamba3_state0(m, B=2, dtype=torch.float64, seed=1):
    """A state a real prefix left behind, with an arbitrary h on top and angles past 2 pi."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, (theta, h, B_prev, x_prev) = m(torch.randn(B, 6, 32, dtype=dtype, generator=g), form="recurrent")
    theta = theta + 10 * torch.rand(theta.shape, dtype=dtype, generator=g)
    return theta, h + torch.randn(h.shape, dtype=dtype, generator=g), B_prev, x_prev


def to_complex(v, theta, n):
    """A turned pair (v_2i, v_2i+1) of the layer's state -> the complex number it stands for in the unturned
    frame, exp(i theta) (v_2i - i v_2i+1); dimensions from 2 n on stay real."""
    c = torch.exp(1j * theta)[..., None, :] if v.dim() == theta.dim() + 1 else torch.exp(1j * theta)
    return c * torch.complex(v[..., 0:2 * n:2], -v[..., 1:2 * n:2]), v[..., 2 * n:]


def mamba3_complex_reference(m, x, state):
    """The paper's complex SSM with the exponential-trapezoidal rule, written out token by token, head by head, in
    float64 complex numbers, with no rotary and no angle sums: per complex pair, B~ = b_2i - i b_2i+1,
    C~ = c_2i + i c_2i+1 and
        h_t = exp(dt (A + i w)) h_{t-1} + (1 - lambda) dt exp(dt (A + i w)) B~_{t-1} x_{t-1} + lambda dt B~_t x_t,
        y_t = Re(h_t C~_t) + D x,  w = pi tanh(angle),
    the rest of the N dimensions real (w = 0). The layer's state (turned) is read in the unturned frame."""
    H, P, N, G, n = m.n_head, m.headdim, m.d_state, m.ngroups, m.n_angles
    theta, h, B_prev, x_prev = state
    hc, hr = to_complex(h, theta, n)  # [B, H, P, n] complex, [B, H, P, N - 2n]
    bc_prev, br_prev = to_complex(B_prev, theta, n)
    x_prev = x_prev.clone()
    ys = []
    for t in range(x.shape[1]):
        z, xs, Bv, Cv, dtr, Ar, lr, ang = (x[:, t] @ m.in_proj.weight.T).split(m.sizes, -1)
        y = torch.zeros(x.shape[0], H, P, dtype=x.dtype)
        hc, hr, bc_new, br_new = hc.clone(), hr.clone(), torch.zeros_like(bc_prev), torch.zeros_like(br_prev)
        for k in range(H):
            g = k // (H // G)
            dt = F.softplus(dtr[:, k] + m.dt_bias[k])[:, None]
            a = Ar[:, k][:, None]
            A = -torch.where(a >= 0, 1 + a, 1 / (1 - a)).clamp(min=m.A_floor)
            lam = torch.sigmoid(lr[:, k])[:, None]
            b, c = Bv[:, g * N:(g + 1) * N], Cv[:, g * N:(g + 1) * N]
            b = b / torch.sqrt(b.pow(2).mean(-1, keepdim=True) + m.eps) * m.B_norm_weight + m.B_bias[k]
            c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + m.eps) * m.C_norm_weight + m.C_bias[k]
            bc, cc = torch.complex(b[:, 0:2 * n:2], -b[:, 1:2 * n:2]), torch.complex(c[:, 0:2 * n:2], c[:, 1:2 * n:2])
            alpha_c = torch.exp(dt * torch.complex(A.expand(-1, n), math.pi * torch.tanh(ang)))  # [B, n]
            alpha_r = torch.exp(dt * A)
            xk, xp = xs[:, k * P:(k + 1) * P, None], x_prev[:, k, :, None]  # [B, P, 1]
            beta_, gamma = ((1 - lam) * dt)[:, None], (lam * dt)[:, None]  # [B, 1, 1]; beta = beta_ * alpha
            hc[:, k] = alpha_c[:, None] * (hc[:, k] + beta_ * xp * bc_prev[:, k, None]) + gamma * xk * bc[:, None]
            br = b[:, None, 2 * n:]  # the unturned dimensions
            hr[:, k] = alpha_r[:, None] * (hr[:, k] + beta_ * xp * br_prev[:, k, None]) + gamma * xk * br
            y[:, k] = (hc[:, k] * cc[:, None]).sum(-1).real + (hr[:, k] * c[:, None, 2 * n:]).sum(-1)
            y[:, k] += m.D[k] * xk[..., 0]
            bc_new[:, k], br_new[:, k] = bc, b[:, 2 * n:]
        bc_prev, br_prev, x_prev = bc_new, br_new, xs.unflatten(-1, (H, P))
        ys.append((y.flatten(1) * F.silu(z)) @ m.out_proj.weight.T)
    return torch.stack(ys, 1), (hc, hr, bc_prev, br_prev, x_prev)


@pytest.mark.parametrize("form", Mamba3.forms)
@pytest.mark.parametrize("opts", [{}, dict(ngroups=2), dict(rope_fraction=1.0, d_state=6)], ids=["g1", "g2", "rope1"])
def test_mamba3_matches_complex_reference(form, opts):
    """Every form against the complex recurrence, outputs and final state (read in the unturned frame), from a
    nonzero state: the rotary realisation is the complex SSM."""
    m = mamba3_make(**opts)
    s0 = mamba3_state0(m)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    with torch.no_grad():
        y, (theta, h, B_prev, x_prev) = m(x, s0, form=form)
        y_ref, (hc, hr, bc, br, x_ref) = mamba3_complex_reference(m, x, s0)
    assert rel_err(y, y_ref) <= 1e-12, f"y: rel err {rel_err(y, y_ref):.2e}"
    (hc_, hr_), (bc_, br_) = to_complex(h, theta, m.n_angles), to_complex(B_prev, theta, m.n_angles)
    for what, a, b in (("h", hc_, hc), ("h (real dims)", hr_, hr), ("B_prev", bc_, bc), ("B_prev (real dims)", br_, br),
                       ("x_prev", x_prev, x_ref)):
        if b.numel():
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"{what} differs"
    assert (theta >= 0).all() and (theta < 2 * math.pi).all()  # the angle state is kept mod 2 pi


def euler(x, g, dt, B, C, h):
    """Mamba-2's exponential-Euler recurrence, h_t = exp(g_t) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t."""
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(g[:, t])[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


def trapezoid(form, *args):
    return mamba3.trapezoid_chunked(*args, 5) if form == "chunked" else getattr(mamba3, f"trapezoid_{form}")(*args)


@pytest.mark.parametrize("form", Mamba3.forms)
def test_mamba3_lambda_one_is_mamba2_euler(form):
    """lambda = 1: beta = 0, the previous token drops out (whatever B_prev, x_prev hold), and every form is
    Mamba-2's exponential-Euler recurrence; lambda = 1/2 is not."""
    g = torch.Generator().manual_seed(0)
    Bsz, T, H, P, N = 2, 13, 3, 4, 6
    x, B, C = (torch.randn(Bsz, T, H, d, dtype=torch.float64, generator=g) for d in (P, N, N))
    dt = torch.rand(Bsz, T, H, dtype=torch.float64, generator=g)
    gl = -dt * torch.rand(Bsz, T, H, dtype=torch.float64, generator=g) * 3
    h, B_prev, x_prev = (torch.randn(*s, dtype=torch.float64, generator=g)
                         for s in ((Bsz, H, P, N), (Bsz, H, N), (Bsz, H, P)))
    y_ref, h_ref = euler(x, gl, dt, B, C, h)
    y, h1 = trapezoid(form, x, gl, dt, torch.ones_like(dt), B, C, h, B_prev, x_prev)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(h1, h_ref) <= 1e-12
    y, _ = trapezoid(form, x, gl, dt, torch.full_like(dt, 0.5), B, C, h, B_prev, x_prev)
    assert rel_err(y, y_ref) > 1e-2


def mamba3_check_forms(m, x, s0, tol):
    """Outputs, states and gradients (x, state, parameters) of each form against the recurrent form."""
    def run_form(form):
        xx = x.detach().clone().requires_grad_()
        ss = tuple(t.detach().clone().requires_grad_() for t in s0)
        y, s = m(xx, ss, form=form)
        torch.manual_seed(5)
        loss = (y * torch.randn_like(y)).sum() + sum((t * torch.randn_like(t)).sum() for t in s)
        return [y, *s], torch.autograd.grad(loss, [xx, *ss, *m.parameters()])
    ref, ref_g = run_form("recurrent")
    names = ["y", "theta", "h", "B_prev", "x_prev", "grad x"] + [f"grad state0[{i}]" for i in range(4)] + [
        "grad " + n for n, _ in m.named_parameters()]
    for form in ("parallel", "chunked"):
        out, grads = run_form(form)
        for what, o, r in zip(names, out + list(grads), ref + list(ref_g)):
            assert torch.isfinite(o).all(), f"{form} {what}: not finite"
            assert rel_err(o, r) <= tol, f"{form} {what}: rel err {rel_err(o, r):.2e} > {tol}"


def rows(m, i):
    """in_proj's rows of output i of (z, x, B, C, dt, A, lambda, angles)."""
    start = sum(m.sizes[:i])
    return m.in_proj.weight[start:start + m.sizes[i]]


MAMBA3_EXTREMES = {
    "decay_1": lambda m: m.dt_bias.fill_(-40.0),  # dt ~ 4e-18: decay exactly 1, nothing written
    "decay_0": lambda m: (m.dt_bias.fill_(30.0), rows(m, 5).mul_(1e4)),  # dt A down to -1e5: exp underflows to 0
    "decay_0_and_1": lambda m: (rows(m, 5).mul_(1e4), m.dt_bias.fill_(2.0)),  # A = -A_floor or huge, by token
    "lambda_0_and_1": lambda m: rows(m, 6).mul_(1e3),  # sigmoid saturates: lambda exactly 0 or 1, by token
    "fast_turns": lambda m: (rows(m, 7).mul_(1e3), m.dt_bias.fill_(3.0)),  # |w| = pi, dt ~ 3: turns of ~pi per token
    "mixed": lambda m: (m.dt_bias.copy_(torch.linspace(-20, 20, m.n_head)), rows(m, 5).mul_(1e4), rows(m, 6).mul_(1e3)),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(MAMBA3_EXTREMES))
def test_mamba3_extreme_decays(case, dtype, tol):
    m = mamba3_make(dtype, ngroups=2)
    with torch.no_grad():
        MAMBA3_EXTREMES[case](m)
    mamba3_check_forms(m, torch.randn(2, 27, 32, dtype=dtype), mamba3_state0(m, dtype=dtype), tol)


@pytest.mark.parametrize("chunk", [8, 5])
def test_mamba3_chunked_every_length(chunk):
    """Every length from 1 to past two chunks: the pads and the beta' term carried across chunk boundaries."""
    m = mamba3_make(chunk_size=chunk)
    s0 = mamba3_state0(m)
    x = torch.randn(2, 2 * chunk + 3, 32, dtype=torch.float64)
    with torch.no_grad():
        for T in range(1, x.shape[1] + 1):
            y_ref, s_ref = m(x[:, :T], s0, form="recurrent")
            y, s = m(x[:, :T], s0, form="chunked")
            assert rel_err(y, y_ref) <= 1e-12, f"T={T}: y rel err {rel_err(y, y_ref):.2e}"
            for i, (a, b) in enumerate(zip(s, s_ref)):
                assert rel_err(a, b) <= 1e-12, f"T={T}: state[{i}] rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("case", [None] + list(MAMBA3_EXTREMES))
def test_mamba3_long_forward_backward_finite(case):
    """T = 16384, float32, the default (chunked) form at the default chunk size, forward and backward."""
    m = mamba3_make(torch.float32, chunk_size=64)
    with torch.no_grad():
        if case:
            MAMBA3_EXTREMES[case](m)
    x = torch.randn(1, 16384, 32, requires_grad=True)
    y, s = m(x)
    (y.square().mean() + sum(t.square().mean() for t in s)).backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in s)
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_mamba3_state_shapes_and_dtypes():
    m = mamba3_make(torch.float32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, (theta, h, B_prev, x_prev) = m(torch.randn(3, 5, 32))
        assert theta.shape == (3, m.n_head, m.n_angles) and h.shape == (3, m.n_head, m.headdim, m.d_state)
        assert B_prev.shape == (3, m.n_head, m.d_state) and x_prev.shape == (3, m.n_head, m.headdim)
        assert theta.dtype == h.dtype == B_prev.dtype == x_prev.dtype == torch.float32


def test_mamba3_defaults_and_init_as_mamba_ssm():
    """As mamba_ssm's Mamba3 (SISO): d_state 128, headdim 64, expand 2, one group, rope_fraction 1/2 (d_state / 4
    angles), chunk 64; in_proj to 2 d_inner + 2 G N + 3 H + angles without bias; dt = softplus(dt_bias)
    log-uniform in [1e-3, 1e-1]; B and C biases 1 [H, N]; the B and C norms' weights 1; D = 1; in_proj and
    out_proj nn.Linear's own init."""
    m = Mamba3(64)
    assert (m.d_state, m.headdim, m.d_inner, m.ngroups, m.n_head, m.n_angles) == (128, 64, 128, 1, 2, 32)
    assert m.chunk_size == 64
    assert (m.A_floor, m.eps) == (1e-4, 1e-5)
    assert m.in_proj.weight.shape == (2 * 128 + 2 * 128 + 3 * 2 + 32, 64)
    assert m.in_proj.bias is None and m.out_proj.bias is None
    assert m.B_bias.shape == m.C_bias.shape == (2, 128) and (m.B_bias == 1).all() and (m.C_bias == 1).all()
    assert (m.B_norm_weight == 1).all() and (m.C_norm_weight == 1).all() and (m.D == 1).all()
    assert_torch_default(m.in_proj, "in_proj")
    assert_torch_default(m.out_proj, "out_proj")
    torch.manual_seed(0)
    m = Mamba3(256, expand=8, headdim=1, d_state=8)  # 2048 heads
    dt = F.softplus(m.dt_bias.double())
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert_uniform(dt.log(), math.log(1e-3), math.log(0.1), "log dt")


def test_mamba3_rejects_bad_sizes():
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3(32, d_state=2)  # no angle to turn
    with pytest.raises(ValueError, match="headdim"):
        Mamba3(32, headdim=24)
