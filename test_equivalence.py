"""Every form of every model computes the same function, forward and backward; scan.py is exact.

    pytest test_equivalence.py            # CPU: float64 and float32, the Triton kernel interpreted
    pytest test_equivalence.py -k mamba2  # one model

References are plain sequential loops; inputs are fresh random draws. Tolerances are relative
errors ||out - ref|| / ||ref||: float64 1e-8 (the forms differ only in summation order, ~1e-15,
so 1e-8 leaves room for the ill-conditioned Newton solves of rnn/lstm yet catches any real bug),
float32 1e-4 (~1e-7 per rounding, accumulated over a few hundred operations), bf16 on the GPU
5e-2 (8-bit mantissa: 4e-3 per rounding, matmuls in bf16 against a float32 reference).
GPU-only cases skip on a machine without CUDA.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import scan as scan_module
from scan import scan

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# file -> (class, small options for tests: several chunks, a few heads)
MODELS = {
    "linear_attention": ("LinearAttention", dict(n_head=2, chunk_size=8)),
    "retnet": ("RetNet", dict(n_head=2, chunk_size=8)),
    "gated_retention": ("GatedRetention", dict(n_head=2, chunk_size=8)),
    "mamba2": ("Mamba2", dict(headdim=8, d_state=8, chunk_size=8)),
    "mamba": ("Mamba", dict(d_state=4)),
    "deltanet": ("DeltaNet", dict(n_head=2, chunk_size=8)),
    "attention": ("Attention", dict(n_head=2)),
    "rnn": ("RNN", dict()),
    "lstm": ("LSTM", dict()),
}
PRESENT = [m for m in MODELS if os.path.exists(os.path.join(HERE, m + ".py"))]
D_MODEL = 32
TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values"
    scale = ref.norm()
    return ((out - ref).norm() / scale).item() if scale > 0 else (out - ref).norm().item()


def tensors(state):
    """The tensors of a state, whatever its structure (tensor, tuple, list, dict)."""
    if state is None:
        return []
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        state = list(state.values())
    return [t for s in state for t in tensors(s)]


def make(name, dtype=torch.float64, device="cpu", seed=0, **options):
    torch.manual_seed(seed)
    cls_name, small = MODELS[name]
    module = importlib.import_module(name)
    model = getattr(module, cls_name)(D_MODEL, **{**small, **options})
    with torch.no_grad():  # leave the paper's init; nudge zero-initialised parameters so their gradients matter
        for p in model.parameters():
            if p.abs().max() == 0:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device=device, dtype=dtype)


def map_state(fn, state):
    """Apply fn to every tensor of a state, keeping its structure (tensor, tuple, list, dict)."""
    if state is None or torch.is_tensor(state):
        return state if state is None else fn(state)
    if isinstance(state, dict):
        return {k: map_state(fn, v) for k, v in state.items()}
    return type(state)(map_state(fn, s) for s in state)


def run(model, x, state, form, gy, gs):
    """Outputs, final state and the gradients of a random projection of both w.r.t. everything."""
    y, new_state = model(x, state, form=form)
    floats = [t for t in tensors(new_state) if t.is_floating_point()]
    loss = (y.float() * gy).sum() + sum((s.float() * g).sum() for s, g in zip(floats, gs))
    leaves = [x] + [t for t in tensors(state) if t.requires_grad] + list(model.parameters())
    return [y] + tensors(new_state), torch.autograd.grad(loss, leaves, allow_unused=True)


def forms_of(name):
    return [(name, f) for f in getattr(importlib.import_module(name), MODELS[name][0]).forms if f != "recurrent"]


ALL_FORMS = [pair for m in PRESENT for pair in forms_of(m)]


def check_form(name, form, dtype, device, T=21, B=2, tol=None):
    """form against the recurrent form, from a state a real prefix left behind: outputs, final
    state, and gradients w.r.t. the input, the initial state and every parameter."""
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # bf16: autocast, as train.py runs
    model = make(name, param_dtype, device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(B, T, D_MODEL, device=device, dtype=param_dtype, generator=g, requires_grad=True)
    with torch.no_grad():
        _, s0 = model(torch.randn(B, 5, D_MODEL, device=device, dtype=param_dtype, generator=g), form="recurrent")
    s0 = map_state(lambda t: t.clone().requires_grad_(t.is_floating_point()), s0)
    with torch.no_grad():
        y_ref, s_ref = model(x, s0, form="recurrent")
    gy = torch.randn(y_ref.shape, device=device, generator=g)
    gs = [torch.randn(t.shape, device=device, generator=g) for t in tensors(s_ref) if t.is_floating_point()]
    ref, ref_grads = run(model, x, s0, "recurrent", gy, gs)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out, grads = run(model, x, s0, form, gy, gs)
    tol = tol or TOL[dtype]
    for i, (o, r) in enumerate(zip(out, ref)):
        what = f"{name}/{form} " + ("y" if i == 0 else f"state[{i - 1}]")
        assert o.shape == r.shape, f"{what}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if r.is_floating_point():
            assert rel_err(o, r) <= tol, f"{what}: rel err {rel_err(o, r):.2e} > {tol}"
        else:
            assert torch.equal(o, r), f"{what} differs"
    n_state = len(grads) - 1 - len(list(model.parameters()))
    leaf_names = ["x"] + [f"state0[{i}]" for i in range(n_state)] + [n for n, _ in model.named_parameters()]
    for n, o, r in zip(leaf_names, grads, ref_grads):
        assert (o is None) == (r is None), f"{name}/{form} grad {n}: only one form has one"
        if r is not None:
            assert rel_err(o, r) <= tol, f"{name}/{form} grad {n}: rel err {rel_err(o, r):.2e} > {tol}"


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,form", ALL_FORMS)
def test_form_matches_recurrent(name, form, dtype):
    check_form(name, form, dtype, "cpu")


@needs_cuda
@pytest.mark.parametrize("name,form", ALL_FORMS)
def test_form_matches_recurrent_cuda_bf16(name, form):
    check_form(name, form, torch.bfloat16, "cuda", T=300)


@needs_cuda
@pytest.mark.parametrize("name,form", ALL_FORMS)
def test_form_matches_recurrent_cuda_f32(name, form):
    check_form(name, form, torch.float32, "cuda", T=300, tol=1e-3)  # tf32 matmuls: ~3e-4


@pytest.mark.parametrize("name,form", ALL_FORMS)
def test_prefill_then_step(name, form):
    """Prefill part of the sequence in parallel, go on token by token or with a second parallel
    call: the same outputs and final state as one parallel pass."""
    model = make(name)
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    y_full, s_full = model(x, form=form)
    y_pre, state = model(x[:, :7], form=form)
    ys = [y_pre]
    for t in range(7, 19):
        y_t, state = model.step(x[:, t], state)
        ys.append(y_t[:, None])
    assert rel_err(torch.cat(ys, 1), y_full) <= 1e-8
    for a, b in zip(tensors(state), tensors(s_full)):
        assert rel_err(a, b) <= 1e-8
    y_rest, _ = model(x[:, 7:], model(x[:, :7], form=form)[1], form=form)
    assert rel_err(y_rest, y_full[:, 7:]) <= 1e-8


@pytest.mark.parametrize("name", PRESENT)
def test_step_from_empty_state(name):
    model = make(name)
    x = torch.randn(3, D_MODEL, dtype=torch.float64)
    y, _ = model.step(x)
    y_ref, _ = model(x[:, None], form="recurrent")
    assert y.shape == (3, D_MODEL) and rel_err(y, y_ref[:, 0]) <= 1e-12


@pytest.mark.parametrize("name", PRESENT)
def test_unknown_form_is_an_error(name):
    with pytest.raises(ValueError, match="form"):
        make(name)(torch.randn(1, 3, D_MODEL, dtype=torch.float64), form="no-such-form")


@pytest.mark.parametrize("name", PRESENT)
def test_long_sequence_is_finite(name):
    """T = 16384 in float32 through the default (training) form: no NaN, no inf."""
    T = 4096 if name == "attention" else 16384  # attention's T x T scores: as far as CPU memory allows
    model = make(name, torch.float32)
    x = torch.randn(1, T, D_MODEL)
    with torch.no_grad():
        y, state = model(x)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in tensors(state) if t.is_floating_point())


@needs_cuda
@pytest.mark.parametrize("name", PRESENT)
def test_long_sequence_is_finite_cuda_bf16(name):
    model = make(name, torch.float32, "cuda")
    x = torch.randn(2, 16384, D_MODEL, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, state = model(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- scan.py

def scan_reference(a, b, h0=None, reverse=False):
    """The recurrence exactly as written, one step at a time."""
    a = a.expand(b.shape)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = [None] * b.shape[1]
    for t in (reversed(range(b.shape[1])) if reverse else range(b.shape[1])):
        h = a[:, t] * h + b[:, t]
        out[t] = h
    return torch.stack(out, 1)


SCAN_CASES = [  # (b shape, a shape): full, per-head gate, broadcast over batch and time, T=1, odd T
    ((2, 37, 3), (2, 37, 3)),
    ((2, 70, 2, 4), (2, 70, 2, 1)),
    ((2, 45, 3, 4), (1, 45, 1, 4)),
    ((3, 1, 5), (3, 1, 5)),
    ((2, 50, 4), (1, 1, 4)),
    ((2, 33, 2, 3, 2), (2, 33, 2, 1, 1)),
]


def check_scan(device, dtype, tol, cases=SCAN_CASES):
    g = torch.Generator(device=device).manual_seed(0)
    for shape, a_shape in cases:
        for reverse in (False, True):
            for with_h0 in (False, True):
                b = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()
                a = (torch.rand(a_shape, device=device, dtype=dtype, generator=g) * 1.2 - 0.1).requires_grad_()
                h0 = torch.randn(shape[:1] + shape[2:], device=device, dtype=dtype, generator=g).requires_grad_() if with_h0 else None
                leaves = [a, b] + ([h0] if with_h0 else [])
                h = scan(a, b, h0, reverse)
                assert h.shape == b.shape and h.dtype == b.dtype
                gh = torch.randn(h.shape, device=device, dtype=dtype, generator=g)
                grads = torch.autograd.grad((h * gh).sum(), leaves)
                ref64 = [x.detach().double().requires_grad_() for x in leaves]
                h_ref = scan_reference(ref64[0], ref64[1], ref64[2] if with_h0 else None, reverse)
                ref_grads = torch.autograd.grad((h_ref * gh.double()).sum(), ref64)
                what = f"{shape} a{a_shape} reverse={reverse} h0={with_h0}"
                assert rel_err(h, h_ref) <= tol, what
                for n, o, r in zip(("da", "db", "dh0"), grads, ref_grads):
                    assert o.shape == r.shape and rel_err(o, r) <= tol, f"{n} {what}: {rel_err(o, r):.1e}"


def test_scan_torch_float64():
    check_scan("cpu", torch.float64, 1e-12)


def test_scan_torch_float32():
    check_scan("cpu", torch.float32, 1e-5)


def test_scan_triton_kernel_interpreted():
    """The real Triton kernel, run by Triton's interpreter on the CPU: small shapes, several
    time chunks (the interpreter's plan cuts time into 32-step chunks)."""
    pytest.importorskip("triton")
    code = ("import torch, test_equivalence as t, scan; assert scan._use_triton(torch.zeros(1)); "
            "t.check_scan('cpu', torch.float32, 1e-5)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_scan_triton_cuda(dtype, tol):
    check_scan("cuda", dtype, tol)
    long_thin = [((1, 65536, 8), (1, 65536, 8)), ((2, 3000, 300), (2, 3000, 1))]  # chunked over time
    check_scan("cuda", torch.float32, 1e-4, long_thin)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_scan_gates_at_zero_and_one(device):
    b = torch.randn(2, 300, 8, device=device)
    a = torch.randint(0, 2, (2, 300, 8), device=device).float()  # forget everything, or keep everything
    assert rel_err(scan(a, b), scan_reference(a.double(), b.double())) <= 1e-6


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_scan_long_sequence_is_finite(device):
    b = torch.randn(2, 16384, 8, device=device, requires_grad=True)
    a = torch.rand(2, 16384, 8, device=device).requires_grad_()
    h = scan(a, b)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert rel_err(h[:, -100:], scan_reference(a[:, -200:].double(), b[:, -200:].double())[:, -100:]) <= 1e-5


@pytest.mark.parametrize("bad,message", [
    (lambda: scan(torch.rand(2, 5, 3), torch.rand(2, 5, 4)), "broadcast"),
    (lambda: scan(torch.rand(2, 5, 4), torch.rand(2, 0, 4)), "T = 0"),
    (lambda: scan(torch.rand(2, 5, 4), torch.ones(2, 5, 4, dtype=torch.long)), "floating"),
    (lambda: scan(torch.rand(2, 5, 4), torch.rand(2, 5, 4), torch.rand(2, 5)), "h0"),
    (lambda: scan(torch.rand(2, 5, 4), torch.rand(5)), r"\[B, T"),
    (lambda: scan(torch.rand(2, 5, 4, device="meta"), torch.rand(2, 5, 4)), "device"),
])
def test_scan_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
