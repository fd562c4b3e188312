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
import inspect
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import scan as scan_module
import selective_scan as selective_scan_module
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
    "mamba3": ("Mamba3", dict(headdim=8, d_state=8, chunk_size=8)),
    "mamba": ("Mamba", dict(d_state=4)),
    "deltanet": ("DeltaNet", dict(n_head=2, chunk_size=8)),
    "gated_deltanet": ("GatedDeltaNet", dict(n_head=2, chunk_size=8)),
    "rwkv7": ("RWKV7", dict(head_size=16, chunk_size=8, decay_lora=4, a_lora=4, gate_lora=8)),
    "kda": ("KDA", dict(head_dim=8, chunk_size=8)),
    "attention": ("Attention", dict(n_head=2)),
    "rnn": ("RNN", dict()),
    "lstm": ("LSTM", dict()),
    "mlstm": ("MLSTM", dict(chunk_size=8)),
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


# long decoding: a 37-token prefill, then 300 steps, against one pass of the default form. 37 and
# 337 cross chunk boundaries (chunk 16) and the conv windows (4), and 337 passes 256, where a cache
# or a counter of a power-of-two size would wrap.
LONG_PREFILL, LONG_TOTAL = 37, 337


@pytest.mark.parametrize("name", PRESENT)
def test_long_decoding_matches_one_parallel_pass(name):
    """Every step's output, and the final state, equal one default-form pass over all 337 tokens;
    so does a second default-form call that continues from the prefill's state (the chunked forms
    carry an initial state across 19 chunks)."""
    cls = getattr(importlib.import_module(name), MODELS[name][0])
    chunk = {"chunk_size": 16} if "chunk_size" in inspect.signature(cls).parameters else {}
    model = make(name, **chunk)
    x = torch.randn(2, LONG_TOTAL, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    P, tol = LONG_PREFILL, TOL[torch.float64]
    with torch.no_grad():
        y_full, s_full = model(x)
        y_pre, s_pre = model(x[:, :P])
        y_rest, s_rest = model(x[:, P:], s_pre)
        state = s_pre
        for t in range(P, LONG_TOTAL):
            y_t, state = model.step(x[:, t], state)
            err = rel_err(y_t, y_full[:, t])
            assert err <= tol, f"{name}: step() at token {t}: rel err {err:.2e}"
    assert rel_err(y_pre, y_full[:, :P]) <= tol, f"{name}: the prefill: rel err {rel_err(y_pre, y_full[:, :P]):.2e}"
    err = rel_err(y_rest, y_full[:, P:])
    assert err <= tol, f"{name}: a forward continuing from the prefill's state: rel err {err:.2e}"
    for how, s in (("step()", state), ("a continuing forward", s_rest)):
        for i, (a, b) in enumerate(zip(tensors(s), tensors(s_full), strict=True)):
            assert a.shape == b.shape, f"{name}: state[{i}] after {how}: shape {tuple(a.shape)} != {tuple(b.shape)}"
            if b.is_floating_point():
                assert rel_err(a, b) <= tol, f"{name}: state[{i}] after {how}: rel err {rel_err(a, b):.2e}"
            else:
                assert torch.equal(a, b), f"{name}: state[{i}] after {how} differs"


# initialisation: each model's section checks its parameters against the paper, the reference code
# its docstring names, or PyTorch's defaults where the docstring claims none, with these helpers.

def assert_uniform(w, low, high, what):
    """The entries of w are draws from U(low, high): all inside, and the Kolmogorov-Smirnov distance
    of their empirical CDF from the uniform CDF below 1.95 / sqrt(n), its 0.1% critical value."""
    x = w.detach().double().flatten().sort().values
    n, slack = x.numel(), 1e-6 * (high - low)  # float32 draws: rounding at the ends
    assert x[0] >= low - slack and x[-1] <= high + slack, \
        f"{what}: range [{x[0]:.4g}, {x[-1]:.4g}] is not inside [{low:.4g}, {high:.4g}]"
    cdf = (x - low) / (high - low)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks <= 1.95 / math.sqrt(n), f"{what}: KS distance {ks:.3f} from U({low:.4g}, {high:.4g}), n = {n}"


def assert_torch_default(layer, what):
    """nn.Linear's and nn.Conv1d's own init (kaiming_uniform with a = sqrt(5)): weight and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_features (conv: in_channels / groups * kernel)."""
    bound = 1 / math.sqrt(layer.weight[0].numel())
    assert_uniform(layer.weight, -bound, bound, f"{what}.weight")
    if layer.bias is not None:
        assert layer.bias.abs().max() <= bound, f"{what}.bias outside U(-{bound:.4g}, {bound:.4g})"


def assert_xavier(layer, gain, what):
    """nn.init.xavier_uniform_(weight, gain): U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_out, fan_in = layer.weight.shape
    bound = gain * math.sqrt(6 / (fan_in + fan_out))
    assert_uniform(layer.weight, -bound, bound, f"{what}.weight (xavier, gain {gain:.4g})")


def interpreted(code):
    """Run code in a fresh Python with TRITON_INTERPRET=1 (read when scan.py is imported): Triton's
    kernels then run on the CPU through its interpreter. Fails the test with the child's output."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", "import torch, scan, test_equivalence as t\n" + code], cwd=HERE, env=env,
                          capture_output=True, text=True)
    if done.returncode and "only 0-dimensional arrays can be converted to Python scalars" in done.stderr:
        import numpy, triton  # the interpreter's int() of its 1-element scalars; Triton 3.9's squeezes them first
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run under NumPy {numpy.__version__} "
                    "(pip install 'numpy<2.4', or a newer Triton)")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# ----------------------------------------------------------------------------- torch.compile: every default form, whole-graph, against eager

def check_compiled(name, device, dtype, backend, tol, T=45, B=2):
    """torch.compile(fullgraph=True) of the default (training) form against eager, from a state a
    prefix left behind: output, final state and the gradients w.r.t. the input, the initial state
    and every parameter. bf16 (autocast, as train.py runs): compiled must be no further from the
    float32 result than eager is, plus tol."""
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    model = make(name, param_dtype, device)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(B, T, D_MODEL, device=device, dtype=param_dtype, generator=g, requires_grad=True)
    with torch.no_grad():
        _, s0 = model(torch.randn(B, 5, D_MODEL, device=device, dtype=param_dtype, generator=g))
    s0 = map_state(lambda t: t.clone().requires_grad_(t.is_floating_point()), s0)

    def outputs(fn, low):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=low):
            y, state = fn(x, s0)
        floats = [t for t in tensors(state) if t.is_floating_point()]
        loss = (y.float() * gy).sum() + sum((t.float() * w).sum() for t, w in zip(floats, gs))
        leaves = [x] + [t for t in tensors(s0) if t.requires_grad] + list(model.parameters())
        return [y] + floats + list(torch.autograd.grad(loss, leaves, allow_unused=True))

    with torch.no_grad():
        y, state = model(x, s0)
    gy = torch.randn(y.shape, device=device, generator=g)
    gs = [torch.randn(t.shape, device=device, generator=g) for t in tensors(state) if t.is_floating_point()]
    ref = outputs(model, False)
    torch._dynamo.reset()
    compiled = outputs(torch.compile(model, fullgraph=True, backend=backend), dtype == torch.bfloat16)
    eager = outputs(model, True) if dtype == torch.bfloat16 else ref
    n_state0 = len([t for t in tensors(s0) if t.requires_grad])
    names = (["y"] + [f"state[{i}]" for i in range(len(gs))] + ["grad x"] + [f"grad state0[{i}]" for i in range(n_state0)]
             + ["grad " + n for n, _ in model.named_parameters()])
    for what, c, e, r in zip(names, compiled, eager, ref):
        assert (c is None) == (r is None), f"{name} {what}: only one has a gradient"
        if r is not None:
            bound = tol + (rel_err(e, r) if dtype == torch.bfloat16 else 0.0)
            assert rel_err(c, r) <= bound, f"{name} compiled {what}: rel err {rel_err(c, r):.2e} > {bound:.2e}"


@pytest.mark.parametrize("name", PRESENT)
def test_compiled_matches_eager(name):
    """On the CPU: Dynamo's whole graph and AOTAutograd's functionalised forward and backward
    (backend aot_eager: Inductor's C++ codegen takes ~40 s a model on two cores; the GPU test
    below runs Inductor)."""
    check_compiled(name, "cpu", torch.float32, "aot_eager", 1e-5)


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_compiled_matches_eager_inductor_interpreted(name):
    """Inductor's own code on the CPU, for the models whose graphs compile fastest, with scan.py's
    Triton kernel run by the interpreter: AOTAutograd traces the Newton ops' backward formulas,
    which call scan, with functional tensors that no kernel may be launched on."""
    interpreted(f"t.check_compiled({name!r}, 'cpu', torch.float32, 'inductor', 1e-5)")


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", PRESENT)
def test_compiled_matches_eager_cuda(name, dtype, tol):
    check_compiled(name, "cuda", dtype, "inductor", tol)


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
    ((2, 40, 2, 16), (2, 40, 2, 1)),  # a gate per head over 16 channels: da summed over a tile's channels
    ((2, 40, 3, 16), (1, 1, 3, 1)),  # one per head, constant over batch and time: summed over both
    ((2, 40, 16), (2, 1, 16)),  # constant over time: summed over a tile's steps
    ((2, 70, 2, 4), (2, 70, 2, 1)),
    ((2, 45, 3, 4), (1, 45, 1, 4)),
    ((3, 1, 5), (3, 1, 5)),
    ((2, 50, 4), (1, 1, 4)),
    ((2, 33, 2, 3, 2), (2, 33, 2, 1, 1)),
]


def check_scan(device, dtype, tol, cases=SCAN_CASES, reference=scan_reference):
    """scan against `reference` in float64: h and the gradients w.r.t. a, b and h0, both directions."""
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
                h_ref = reference(ref64[0], ref64[1], ref64[2] if with_h0 else None, reverse)
                ref_grads = torch.autograd.grad((h_ref * gh.double()).sum(), ref64)
                what = f"{shape} a{a_shape} reverse={reverse} h0={with_h0}"
                assert rel_err(h, h_ref) <= tol, what
                for n, o, r in zip(("da", "db", "dh0"), grads, ref_grads):
                    assert o.shape == r.shape and rel_err(o, r) <= tol, f"{n} {what}: {rel_err(o, r):.1e}"


def test_scan_torch_float64():
    check_scan("cpu", torch.float64, 1e-12)
    check_block_scan("cpu", torch.float64, 1e-12)


def test_scan_torch_float32():
    check_scan("cpu", torch.float32, 1e-5)
    check_block_scan("cpu", torch.float32, 1e-5)


def block_scan_reference(a, b, h0=None, reverse=False):
    """h_t = a_t @ h_{t-1} + b_t one step at a time, a [B, T, 2, 2, *], b [B, T, 2, *]."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = [None] * b.shape[1]
    for t in (reversed(range(b.shape[1])) if reverse else range(b.shape[1])):
        h = torch.stack([a[:, t, 0, 0] * h[:, 0] + a[:, t, 0, 1] * h[:, 1],
                         a[:, t, 1, 0] * h[:, 0] + a[:, t, 1, 1] * h[:, 1]], 1) + b[:, t]
        out[t] = h
    return torch.stack(out, 1)


BLOCK_SCAN_CASES = [(2, 37, 2, 3), (1, 70, 2, 5), (3, 1, 2, 4), (2, 45, 2, 3, 2)]  # [B, T, 2, *]


def check_block_scan(device, dtype, tol, cases=BLOCK_SCAN_CASES):
    """block_scan against the loop: h and the gradients w.r.t. a, b and h0, both directions."""
    g = torch.Generator(device=device).manual_seed(0)
    for shape in cases:
        for reverse in (False, True):
            b = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()
            a_shape = shape[:2] + (2,) + shape[2:]
            a = (torch.rand(a_shape, device=device, dtype=dtype, generator=g) - 0.5).requires_grad_()  # |a| <= 1
            h0 = torch.randn(shape[:1] + shape[2:], device=device, dtype=dtype, generator=g).requires_grad_()
            h = scan_module.block_scan(a, b, h0, reverse)
            gh = torch.randn(h.shape, device=device, dtype=dtype, generator=g)
            grads = torch.autograd.grad((h * gh).sum(), (a, b, h0))
            ref64 = [x.detach().double().requires_grad_() for x in (a, b, h0)]
            h_ref = block_scan_reference(*ref64, reverse)
            ref_grads = torch.autograd.grad((h_ref * gh.double()).sum(), ref64)
            what = f"block {shape} reverse={reverse}"
            assert h.shape == b.shape and h.dtype == b.dtype and rel_err(h, h_ref) <= tol, what
            for n, o, r in zip(("da", "db", "dh0"), grads, ref_grads):
                assert o.shape == r.shape and rel_err(o, r) <= tol, f"{n} {what}: {rel_err(o, r):.1e}"


# the kernels' two modes: every channel block walks the whole sequence in one pass, or the sequence is cut into
# chunks side by side (each reduced to its map, the maps scanned, each chunk rescanned from its entering state)
SCAN_MODES = {"chunks": (10 ** 6, 1), "one pass": (0, 10 ** 6)}  # scan.PROGRAMS_PER_SM, scan.TILES_PER_CHUNK


def spy_reduce(*kernels, module=scan_module):
    """Wrap the named Triton kernels of module; the set returned fills with the REDUCE of every launch, so a test
    can see that the mode it forces is the mode that ran (chunks: True among them; one pass: {False})."""
    seen = set()

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **meta: seen.add(meta["REDUCE"]) or self.kernel[grid](*args, **meta)
    for name in kernels:
        setattr(module, name, Spy(getattr(module, name)))
    return seen


def force_mode(mode):
    """Code that sets scan.py's chunking to `mode`, for an interpreted child."""
    return f"scan.PROGRAMS_PER_SM, scan.TILES_PER_CHUNK = {SCAN_MODES[mode]}; "


def mode_ran(mode):
    return f"assert (True in seen) if {mode == 'chunks'} else seen == {{False}}, seen"


@pytest.mark.parametrize("mode", SCAN_MODES)
def test_scan_triton_kernel_interpreted(mode):
    """The real Triton kernel, run by Triton's interpreter on the CPU: small shapes, several 16-step tiles, the
    gradient of a broadcast a summed inside the kernel (over time, over a tile's channels, both, or by atomics)."""
    interpreted("assert scan.use_triton(torch.zeros(1)); " + force_mode(mode) + "seen = t.spy_reduce('_scan_kernel'); "
                "t.check_scan('cpu', torch.float32, 1e-5); t.check_block_scan('cpu', torch.float32, 1e-5); "
                + mode_ran(mode))


@needs_cuda
@pytest.mark.parametrize("mode", SCAN_MODES)
# bf16 inputs and h are rounded to 8 bits (4e-3 each); the sums stay float32, so errors do not compound
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_scan_triton_cuda(dtype, tol, mode, monkeypatch):
    monkeypatch.setattr(scan_module, "PROGRAMS_PER_SM", SCAN_MODES[mode][0])
    monkeypatch.setattr(scan_module, "TILES_PER_CHUNK", SCAN_MODES[mode][1])
    check_scan("cuda", dtype, tol)
    check_block_scan("cuda", dtype, tol)
    long_thin = [((1, 65536, 8), (1, 65536, 8)), ((2, 3000, 300), (2, 3000, 1))]  # chunked over time
    # against the PyTorch engine in float64, itself checked against the loop: the loop takes 8 to 15 s a call here
    check_scan("cuda", torch.float32, 1e-4, long_thin, reference=scan)


def check_scan_compiled(device, quick=False):
    """scan and block_scan inside torch.compile(fullgraph=True), against eager: a broadcast a read
    with stride 0 ([1, 1, H, 1, 1] as retnet passes it, [B, N, H, 1, 1] as gated retention does),
    h0, reverse, and the gradients."""
    g = torch.Generator(device=device).manual_seed(3)
    cases = [((2, 9, 3, 4, 5), (1, 1, 3, 1, 1)), ((2, 9, 3, 4, 5), (2, 9, 3, 1, 1)), ((2, 37, 6), (2, 37, 6))]
    fn = lambda a, b, h0, rev: scan(a * 1.0, b * 1.0, h0, rev) * 2  # noqa: E731  ops around it, as in a model
    block = lambda a, b, h0, rev: scan_module.block_scan(a * 1.0, b, h0, rev) * 2  # noqa: E731
    for shape, a_shape in cases + [((2, 21, 2, 3), (2, 21, 2, 2, 3))]:
        for rev in ([len(shape) == 4] if quick else (False, True)):  # quick: one direction each
            a = torch.rand(a_shape, device=device, generator=g).requires_grad_()
            b = torch.randn(shape, device=device, generator=g).requires_grad_()
            h0 = torch.randn(shape[:1] + shape[2:], device=device, generator=g).requires_grad_()
            f = block if len(a_shape) > len(shape) else fn
            torch._dynamo.reset()
            outs = [(h, *torch.autograd.grad(h.square().sum(), (a, b, h0))) for h in
                    (f(a, b, h0, rev), torch.compile(f, fullgraph=True)(a, b, h0, rev))]
            for what, e, c in zip(("h", "da", "db", "dh0"), *outs):
                assert rel_err(c, e) <= 1e-5, f"{shape} a{a_shape} reverse={rev} {what}: {rel_err(c, e):.1e}"


def test_scan_compiled_interpreted():
    """The custom ops under Inductor with the Triton kernel run by the interpreter: the kernel gets
    the tensors compiled code hands it, and reads their strides at run time."""
    interpreted("t.check_scan_compiled('cpu', True)")


@needs_cuda
def test_scan_compiled_cuda():
    check_scan_compiled("cuda")


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
    (lambda: scan(torch.rand(2, 5, 4), torch.rand(2, 0, 4)), "T > 0"),
    (lambda: scan(torch.rand(2, 5, 4), torch.ones(2, 5, 4, dtype=torch.long)), "floating"),
    (lambda: scan(torch.rand(2, 5, 4), torch.rand(2, 5, 4), torch.rand(2, 5)), "h0"),
    (lambda: scan(torch.rand(2, 5, 4), torch.rand(5)), r"\[B, T"),
    (lambda: scan(torch.rand(2, 5, 4, device="meta"), torch.rand(2, 5, 4)), "device"),
])
def test_scan_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


# ----------------------------------------------------------------------------- linear_attention.py: an independent reference from the paper, init

from linear_attention import LinearAttention  # noqa: E402


def linear_attention_reference(model, x):
    """Katharopoulos et al. 2020 (eq. 4-9) from the paper, independent of linear_attention.py, in
    float64: phi = elu + 1, y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps) with S_i = sum_{j<=i}
    phi(k_j) v_j^T and z_i = sum_{j<=i} phi(k_j), rebuilt for every i by a loop over j (eps: the
    module's guard, in the denominator). Returns y and the last S [B, H, D, E] and z [B, H, D]."""
    B, T, d = x.shape
    H = model.n_head
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    Wq, Wk, Wv = model.qkv.weight.double().chunk(3, 0)  # output rows [q | k | v], head after head
    q, k, v = ((x.double() @ W.T).view(B, T, H, d // H) for W in (Wq, Wk, Wv))
    y = torch.zeros(B, T, H, d // H, dtype=torch.float64)
    for i in range(T):
        S = torch.zeros(B, H, d // H, d // H, dtype=torch.float64)
        z = torch.zeros(B, H, d // H, dtype=torch.float64)
        for j in range(i + 1):
            S = S + phi(k[:, j])[..., :, None] * v[:, j][..., None, :]
            z = z + phi(k[:, j])
        numerator = (phi(q[:, i])[..., :, None] * S).sum(-2)  # phi(q_i)^T S_i: [B, H, E]
        denominator = (phi(q[:, i]) * z).sum(-1, keepdim=True)  # phi(q_i)^T z_i: [B, H, 1]
        y[:, i] = numerator / (denominator + model.eps)
    return y.flatten(2) @ model.out.weight.double().T, S, z


@pytest.mark.parametrize("form", LinearAttention.forms)
def test_linear_attention_matches_paper_reference(form):
    """Every form against the paper, from an empty state and from the state a 5-token prefix left
    (the reference sums over the prefix's tokens too); the state is [S^T; z^T] as documented."""
    model = make("linear_attention")  # float64, 2 heads, chunk 8: 21 tokens cross two chunk ends
    x = torch.randn(2, 21, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref, S, z = linear_attention_reference(model, x)
    with torch.no_grad():
        y, state = model(x, form=form)
        _, prefix_state = model(x[:, :5], form=form)
        y_cont, _ = model(x[:, 5:], prefix_state, form=form)
    assert rel_err(y, ref) <= 1e-12, f"{form}: rel err {rel_err(y, ref):.2e}"
    err = rel_err(y_cont, ref[:, 5:])
    assert err <= 1e-12, f"{form} from a prefix's state: rel err {err:.2e}"
    assert rel_err(state[:, :, :-1], S.transpose(-1, -2)) <= 1e-12 and rel_err(state[:, :, -1], z) <= 1e-12


def test_linear_attention_init_is_torch_default():
    """The docstring claims no init: q, k, v and out projections keep nn.Linear's default."""
    torch.manual_seed(0)
    model = LinearAttention(256)
    assert_torch_default(model.qkv, "qkv")
    assert_torch_default(model.out, "out")


# ----------------------------------------------------------------------------- retnet.py: an independent reference, ragged chunks, relative rotary, per-row positions, long sequences, init and decays

from retnet import RetNet  # noqa: E402

RETNET_DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def retnet_reference(model, x):
    """RetNet from the paper's formulas, written independently of retnet.py: complex rotary,
    gamma_h = 1 - 2^(-5-h), y_t = sum_{s<=t} gamma^(t-s) Re(q_t conj k_s) v_s, a double loop."""
    B, T, d = x.shape
    H = model.n_head
    q = (x @ model.q.weight.T).view(B, T, H, -1)
    k = (x @ model.k.weight.T).view(B, T, H, -1)
    v = (x @ model.v.weight.T).view(B, T, H, -1)
    D = q.shape[-1]
    theta = torch.tensor([10000.0 ** (-j / (D // 2 - 1)) for j in range(D // 2)], dtype=torch.float64)
    t = torch.arange(T, dtype=torch.float64)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), t[:, None] * theta)[None, :, None]
    qc = torch.view_as_complex(q.reshape(B, T, H, D // 2, 2).contiguous()) * rot
    kc = torch.view_as_complex(k.reshape(B, T, H, D // 2, 2).contiguous()) * rot / math.sqrt(D)
    y = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        gamma = 1 - 2.0 ** (-5 - h)
        for ti in range(T):
            for si in range(ti + 1):
                score = (qc[:, ti, h] * kc[:, si, h].conj()).sum(-1).real  # [B]
                y[:, ti, h] += gamma ** (ti - si) * score[:, None] * v[:, si, h]
    mu = y.mean(-1, keepdim=True)
    var = y.var(-1, unbiased=False, keepdim=True)
    y = ((y - mu) / torch.sqrt(var + model.norm.eps)).flatten(2) * model.norm.weight + model.norm.bias
    y = F.silu(x @ model.g.weight.T) * y
    return y @ model.out.weight.T


def test_retnet_recurrent_matches_independent_reference():
    model = make("retnet")  # float64
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    ref = retnet_reference(model, x)
    with torch.no_grad():
        y1, s = model(x[:, :5], form="recurrent")  # and across a state handed over mid-sequence
        y2, s = model(x[:, 5:], s, form="recurrent")
        assert rel_err(torch.cat([y1, y2], 1), ref) <= 1e-12
        for form in ("parallel", "chunked"):
            assert rel_err(model(x, form=form)[0], ref) <= 1e-12, form
    assert s[1].tolist() == [13, 13]


@pytest.mark.parametrize("T", [1, 7, 8, 9, 16, 23])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_retnet_chunked_every_length(T, chunk_size):
    """Padding of the last chunk (T not a multiple of L, T < L, L = 1): output and final state."""
    model = make("retnet", chunk_size=chunk_size)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        _, s0 = model(torch.randn(2, 4, 32, dtype=torch.float64))
        ref, s_ref = model(x, s0, form="recurrent")
        for form in ("parallel", "chunked"):
            y, s = model(x, s0, form=form)
            assert rel_err(y, ref) <= 1e-12 and rel_err(s[0], s_ref[0]) <= 1e-12, form
            assert torch.equal(s[1], s_ref[1])


def test_retnet_rotary_is_relative():
    """From an empty memory, where the sequence starts in absolute position does not matter."""
    model = make("retnet")
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    S = torch.zeros(2, 2, 32, 16, dtype=torch.float64)
    with torch.no_grad():
        y0, _ = model(x)
        y1, _ = model(x, (S, torch.tensor([1000, 123457])))
    assert rel_err(y1, y0) <= 1e-10


def test_retnet_positions_per_sequence():
    """Each row of the batch keeps its own step counter."""
    model = make("retnet")
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        _, s_a = model(torch.randn(1, 3, 32, dtype=torch.float64))
        _, s_b = model(torch.randn(1, 6, 32, dtype=torch.float64))
        s = (torch.cat([s_a[0], s_b[0]]), torch.cat([s_a[1], s_b[1]]))
        y, _ = model(x, s)
        ya, _ = model(x[:1], s_a, form="recurrent")
        yb, _ = model(x[1:], s_b, form="recurrent")
    assert rel_err(y, torch.cat([ya, yb])) <= 1e-12


@pytest.mark.parametrize("device", RETNET_DEVICES)
def test_retnet_long_all_forms_finite_and_agree(device):
    """T = 16384 in float32: every form finite; chunked and recurrent agree to float32 precision.
    (parallel at T = 4096 on the CPU: its [H, T, T] matrices need too much memory at 16384.)"""
    model = make("retnet", torch.float32, device)
    T = 16384
    x = torch.randn(1, T, 32, device=device)
    with torch.no_grad():
        y_c, s_c = model(x, form="chunked")
        y_r, s_r = model(x, form="recurrent")
        Tp = T if device == "cuda" else 4096
        y_p, s_p = model(x[:, :Tp], form="parallel")
    for t in (y_c, s_c[0], y_r, s_r[0], y_p, s_p[0]):
        assert torch.isfinite(t).all()
    tol = 1e-3 if device == "cuda" else 1e-4  # tf32
    assert rel_err(y_c, y_r) <= tol and rel_err(s_c[0], s_r[0]) <= tol
    assert rel_err(y_p, y_r[:, :Tp]) <= tol


@needs_cuda
@pytest.mark.parametrize("form", ["chunked", "parallel"])
def test_retnet_long_bf16_backward_finite(form):
    model = make("retnet", torch.float32, "cuda")
    x = torch.randn(1 if form == "parallel" else 2, 16384, 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, (S, _) = model(x, form=form)
    (y.float().square().mean() + S.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_retnet_init_as_torchscale_and_decays_as_the_paper():
    """gamma_h = 1 - 2^(-5-h), h = 0..H-1 (sec. 2.2), read off what the layer does: zero input
    writes nothing, and step() and every form decay the state by gamma_h per token. Projections as
    torchscale 0.3.0: xavier_uniform, gain 2^-2.5 on W_Q, W_K, W_V, W_G, gain 1 on W_O; GroupNorm 1, 0."""
    torch.manual_seed(0)
    H = 8
    model = RetNet(256, n_head=H).double()
    for name, gain in (("q", 2 ** -2.5), ("k", 2 ** -2.5), ("v", 2 ** -2.5), ("g", 2 ** -2.5), ("out", 1.0)):
        assert_xavier(getattr(model, name), gain, name)
    assert (model.norm.weight == 1).all() and (model.norm.bias == 0).all()
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64)[:, None, None]
    state = (torch.randn(2, H, 64, 32, dtype=torch.float64), torch.tensor([0, 100]))
    with torch.no_grad():
        _, (S, _) = model.step(torch.zeros(2, 256, dtype=torch.float64), state)
        assert rel_err(S, gamma * state[0]) <= 1e-14
        for form in RetNet.forms:
            _, (S, _) = model(torch.zeros(2, 5, 256, dtype=torch.float64), state, form=form)
            assert rel_err(S, gamma ** 5 * state[0]) <= 1e-13, form


# ----------------------------------------------------------------------------- gated_retention.py: an independent reference, gates exactly 0 and 1, ragged chunks, relative rotary, long sequences, init

from gated_retention import GatedRetention  # noqa: E402

GATED_RETENTION_DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def gated_retention_reference(model, x):
    """Gated retention from the formulas, independent of gated_retention.py: gamma_t =
    sigmoid(w.x_t + b)^(1/16) taken literally (no log space), complex rotary, a double loop over
    y_t = sum_{s<=t} (prod_{s<r<=t} gamma_r) Re(q_t conj k_s) v_s, RMSNorm, swish gate."""
    B, T, d = x.shape
    H = model.n_head
    q, k, v = ((x @ lin.weight.T).view(B, T, H, -1) for lin in (model.q, model.k, model.v))
    D = q.shape[-1]
    theta = torch.tensor([10000.0 ** (-j / (D // 2 - 1)) for j in range(D // 2)], dtype=torch.float64)
    t = torch.arange(T, dtype=torch.float64)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), t[:, None] * theta)[None, :, None]
    qc = torch.view_as_complex(q.reshape(B, T, H, D // 2, 2).contiguous()) * rot
    kc = torch.view_as_complex(k.reshape(B, T, H, D // 2, 2).contiguous()) * rot / math.sqrt(D)
    gamma = torch.sigmoid(x @ model.gate.weight.T + model.gate.bias) ** (1 / 16)  # [B, T, H]
    y = torch.zeros_like(v)
    for ti in range(T):
        for si in range(ti + 1):
            decay = torch.ones(B, H, dtype=torch.float64)
            for r in range(si + 1, ti + 1):
                decay = decay * gamma[:, r]
            score = (qc[:, ti] * kc[:, si].conj()).sum(-1).real  # [B, H]
            y[:, ti] += (decay * score)[..., None] * v[:, si]
    y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + model.eps)
    return (F.silu(x @ model.g.weight.T) * y.flatten(2)) @ model.out.weight.T


def gated(dtype=torch.float64, device="cpu", bias=None, w_scale=None, **options):
    model = make("gated_retention", dtype, device, **options)
    with torch.no_grad():
        if w_scale is not None:
            model.gate.weight.mul_(w_scale)
        if bias is not None:
            model.gate.bias.copy_(torch.as_tensor(bias, dtype=dtype))
    return model


# gate regimes: ordinary; gamma exactly 1 (log gamma = -0); gamma ~ 0 (log gamma = -625);
# one head each; gates that jump between ~0 and ~1 from token to token
GATED_RETENTION_REGIMES = {"plain": {}, "one": dict(bias=1e4), "zero": dict(bias=-1e4), "mixed": dict(bias=[1e4, -1e4]),
                           "jumpy": dict(w_scale=1e4)}


@pytest.mark.parametrize("regime", GATED_RETENTION_REGIMES)
def test_gated_retention_recurrent_matches_independent_reference(regime):
    model = gated(**GATED_RETENTION_REGIMES[regime])
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    ref = gated_retention_reference(model, x)
    with torch.no_grad():
        y1, s = model(x[:, :4], form="recurrent")
        y2, s = model(x[:, 4:], s, form="recurrent")
        assert rel_err(torch.cat([y1, y2], 1), ref) <= 1e-10
        for form in ("parallel", "chunked"):
            assert rel_err(model(x, form=form)[0], ref) <= 1e-10, form


def test_gated_retention_gate_exactly_one_is_retention_without_decay():
    model = gated(bias=1e4)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    g = F.logsigmoid(model.gate(x)) / model.tau
    assert (g == 0).all()  # log gamma = 0 exactly: gamma = 1, no decay at all


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("regime", GATED_RETENTION_REGIMES)
@pytest.mark.parametrize("T", [1, 8, 21])
def test_gated_retention_forms_match_recurrent_under_extreme_gates(regime, dtype, T):
    """Outputs, final states and all gradients, from a prefix's state, gates at 0 and 1."""
    model = gated(dtype, **GATED_RETENTION_REGIMES[regime])
    tol = TOL[dtype]
    x = torch.randn(2, T, 32, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        _, s0 = model(torch.randn(2, 5, 32, dtype=dtype), form="recurrent")
    s0 = (s0[0].clone().requires_grad_(), s0[1])
    outs = {}
    for form in ("recurrent", "parallel", "chunked"):
        y, s = model(x, s0, form=form)
        loss = y.square().sum() + s[0].square().sum()
        grads = torch.autograd.grad(loss, [x, s0[0]] + list(model.parameters()))
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads), form
        outs[form] = [y, s[0]] + list(grads)
    # Gradients w.r.t. the gate's own parameters: dL/dlog(gamma) = gamma dL/dgamma is ~1e-42 where
    # gamma underflows, while the log-space forms get it as a sum of O(1) terms that cancel
    # (exp(c_t - c_s) on the diagonal, etc.): there they agree only to rounding of those terms, so
    # their error is measured against the gradient scale of the other weights (v.weight's norm).
    names = ["y", "S", "x", "S0"] + [n for n, _ in model.named_parameters()]
    scale = outs["recurrent"][names.index("v.weight")].norm().item()
    for form in ("parallel", "chunked"):
        for n, o, r in zip(names, outs[form], outs["recurrent"]):
            if n.startswith("gate."):
                err = (o - r).norm().item() / max(r.norm().item(), scale)
            else:
                err = rel_err(o, r)
            assert err <= tol, f"{form} {n}: {err:.2e}"


@pytest.mark.parametrize("T", [1, 7, 9, 23])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_gated_retention_chunked_every_length(T, chunk_size):
    model = gated(chunk_size=chunk_size)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        _, s0 = model(torch.randn(2, 4, 32, dtype=torch.float64))
        ref, s_ref = model(x, s0, form="recurrent")
        y, s = model(x, s0, form="chunked")
    assert rel_err(y, ref) <= 1e-12 and rel_err(s[0], s_ref[0]) <= 1e-12 and torch.equal(s[1], s_ref[1])


def test_gated_retention_rotary_is_relative():
    model = gated()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    S = torch.zeros(2, 2, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y0, _ = model(x)
        y1, _ = model(x, (S, torch.tensor([1000, 123457])))
    assert rel_err(y1, y0) <= 1e-10


@pytest.mark.parametrize("device", GATED_RETENTION_DEVICES)
@pytest.mark.parametrize("regime", ["plain", "one", "zero", "jumpy"])
def test_gated_retention_long_all_forms_finite_and_agree(device, regime):
    """T = 16384 in float32: every form finite, chunked and recurrent agree (parallel at 4096 on CPU)."""
    model = gated(torch.float32, device, **GATED_RETENTION_REGIMES[regime])
    T = 16384
    x = torch.randn(1, T, 32, device=device)
    with torch.no_grad():
        y_c, s_c = model(x, form="chunked")
        y_r, s_r = model(x, form="recurrent")
        Tp = T if device == "cuda" else 4096
        y_p, s_p = model(x[:, :Tp], form="parallel")
    for t in (y_c, s_c[0], y_r, s_r[0], y_p, s_p[0]):
        assert torch.isfinite(t).all()
    tol = 1e-3 if device == "cuda" else 1e-4
    assert rel_err(y_c, y_r) <= tol and rel_err(s_c[0], s_r[0]) <= tol
    # the parallel form's cumulative log gates c_t grow without bound (to ~1e7 with gates ~0), and
    # float32 differences c_t - c_s of numbers that large are coarse (1.9e-4 measured at T = 4096,
    # jumpy gates): with strong gates its precision at long T is only asserted finite; chunked
    # restarts c at each chunk and is the form to use
    err = rel_err(y_p, y_r[:, :Tp])
    print(f"parallel vs recurrent, {regime}, T={Tp}, {device}: {err:.2e}")
    if regime in ("plain", "one"):
        assert err <= tol


@needs_cuda
@pytest.mark.parametrize("regime", ["plain", "one", "zero", "jumpy"])
@pytest.mark.parametrize("form", ["chunked", "parallel"])
def test_gated_retention_long_bf16_backward_finite(form, regime):
    model = gated(torch.float32, "cuda", **GATED_RETENTION_REGIMES[regime])
    x = torch.randn(1 if form == "parallel" else 2, 16384, 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, (S, _) = model(x, form=form)
    (y.float().square().mean() + S.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gated_retention_init_as_yoco():
    """xavier_uniform, gain 2^-2.5 on q, k, v, g and the gate, 2^-1 on out (YOCO's GateRetention);
    the gate's bias, which YOCO's gate lacks, keeps nn.Linear's default."""
    torch.manual_seed(0)
    model = GatedRetention(256, n_head=16)
    for name, gain in (("q", 2 ** -2.5), ("k", 2 ** -2.5), ("v", 2 ** -2.5), ("g", 2 ** -2.5), ("gate", 2 ** -2.5),
                       ("out", 2 ** -1)):
        assert_xavier(getattr(model, name), gain, name)
    assert model.gate.bias.abs().max() <= 1 / math.sqrt(256)


# ----------------------------------------------------------------------------- mamba2.py: a naive per-head reference, groups, ragged chunks, extreme decays, short prefixes, defaults, init

from mamba2 import Mamba2  # noqa: E402


def mamba2_naive(model, x, state):
    """The block written out token by token, head by head, from the paper's equations; its own conv."""
    W = model.in_proj.weight
    K, H, P, G, N = model.d_conv, model.n_head, model.headdim, model.ngroups, model.d_state
    di = model.d_inner
    conv, h = [s.clone() for s in state]  # conv [B, C, K-1], h [B, H, P, N]
    ys = []
    for t in range(x.shape[1]):
        u = x[:, t] @ W.T
        z, xbc, dtr = u[:, :di], u[:, di:di + model.conv_dim], u[:, di + model.conv_dim:]
        window = torch.cat([conv, xbc[:, :, None]], -1)  # [B, C, K]
        conv = window[:, :, 1:]
        c = F.silu((window * model.conv1d.weight[:, 0]).sum(-1) + model.conv1d.bias)
        xs, Bv, Cv = c[:, :di], c[:, di:di + G * N], c[:, di + G * N:]
        y = torch.zeros(x.shape[0], di, dtype=x.dtype)
        h = h.clone()
        for hh in range(H):
            g = hh // (H // G)
            dt = F.softplus(dtr[:, hh] + model.dt_bias[hh])
            A = -torch.exp(model.A_log[hh])
            xh, Bg, Cg = xs[:, hh * P:(hh + 1) * P], Bv[:, g * N:(g + 1) * N], Cv[:, g * N:(g + 1) * N]
            h[:, hh] = torch.exp(dt * A)[:, None, None] * h[:, hh] + dt[:, None, None] * xh[:, :, None] * Bg[:, None, :]
            y[:, hh * P:(hh + 1) * P] = (h[:, hh] @ Cg[:, :, None])[..., 0] + model.D[hh] * xh
        y = y * F.silu(z)
        yg = y.view(y.shape[0], G, -1)
        y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + model.eps)).view(y.shape[0], -1) * model.norm_weight
        ys.append(y @ model.out_proj.weight.T)
    return torch.stack(ys, 1), (conv, h)


def mamba2_make(dtype=torch.float64, device="cpu", seed=0, **opts):
    torch.manual_seed(seed)
    m = Mamba2(32, **{**dict(headdim=8, d_state=8, chunk_size=8), **opts})
    with torch.no_grad():
        m.D.add_(0.1 * torch.randn_like(m.D))
        m.norm_weight.add_(0.1 * torch.randn_like(m.norm_weight))
    return m.to(device=device, dtype=dtype)


@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_mamba2_recurrent_matches_naive(ngroups):
    m = mamba2_make(ngroups=ngroups)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        _, s0 = m(torch.randn(2, 6, 32, dtype=torch.float64), form="recurrent")
        s0 = (s0[0], s0[1] + torch.randn_like(s0[1]))  # an arbitrary nonzero SSM state too
        y, s = m(x, s0, form="recurrent")
        y_ref, s_ref = mamba2_naive(m, x, s0)
    assert rel_err(y, y_ref) <= 1e-12
    for a, b in zip(s, s_ref):
        assert rel_err(a, b) <= 1e-12


def mamba2_check_forms(m, x, s0, tol, forms=("parallel", "chunked")):
    """Outputs, states and gradients (x, state, parameters) of each form against the recurrent form."""
    def run_form(form):
        xx = x.detach().clone().requires_grad_()
        ss = tuple(t.detach().clone().requires_grad_() for t in s0)
        y, s = m(xx, ss, form=form)
        torch.manual_seed(5)
        loss = (y * torch.randn_like(y)).sum() + sum((t * torch.randn_like(t)).sum() for t in s)
        grads = torch.autograd.grad(loss, [xx, *ss, *m.parameters()])
        return [y, *s], grads
    ref, ref_g = run_form("recurrent")
    for form in forms:
        out, g = run_form(form)
        for o, r in zip(out + list(g), ref + list(ref_g)):
            assert torch.isfinite(o).all(), form
            assert rel_err(o, r) <= tol, (form, rel_err(o, r))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
@pytest.mark.parametrize("ngroups,chunk,T", [(2, 8, 21), (4, 5, 3), (1, 7, 29), (2, 32, 19)])
def test_mamba2_forms_groups_and_ragged_chunks(ngroups, chunk, T, dtype, tol):
    m = mamba2_make(dtype, ngroups=ngroups, chunk_size=chunk)
    with torch.no_grad():
        _, s0 = m(torch.randn(2, 5, 32, dtype=dtype), form="recurrent")
    mamba2_check_forms(m, torch.randn(2, T, 32, dtype=dtype), s0, tol)


MAMBA2_EXTREMES = {
    "dt_huge": lambda m: m.dt_bias.fill_(30.0),         # dt ~ 30: decay exp(-30 A) ~ 0
    "dt_tiny": lambda m: m.dt_bias.fill_(-30.0),        # dt ~ 1e-13: decay ~ 1, nothing written
    "A_near_0": lambda m: m.A_log.fill_(-20.0),         # A ~ -2e-9: decay ~ 1
    "A_huge": lambda m: m.A_log.fill_(6.0),             # A ~ -400
    "mixed": lambda m: (m.dt_bias.copy_(torch.linspace(-20, 20, m.n_head)),
                        m.A_log.copy_(torch.linspace(-20, 5, m.n_head))),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
@pytest.mark.parametrize("case", list(MAMBA2_EXTREMES))
def test_mamba2_extreme_decays(case, dtype, tol):
    m = mamba2_make(dtype, ngroups=2)
    with torch.no_grad():
        MAMBA2_EXTREMES[case](m)
        _, s0 = m(torch.randn(2, 5, 32, dtype=dtype), form="recurrent")
    mamba2_check_forms(m, torch.randn(2, 27, 32, dtype=dtype), s0, tol)


@pytest.mark.parametrize("case", list(MAMBA2_EXTREMES))
def test_mamba2_extreme_long_finite(case):
    m = mamba2_make(torch.float32)
    with torch.no_grad():
        MAMBA2_EXTREMES[case](m)
    x = torch.randn(1, 16384, 32, requires_grad=True)
    y, s = m(x)
    (y.square().mean() + sum(t.square().mean() for t in s)).backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and all(torch.isfinite(t).all() for t in s)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("form", ["parallel", "chunked", "recurrent"])
@pytest.mark.parametrize("split", [1, 2, 3, 9])
def test_mamba2_short_prefix_conv_state(form, split):
    """A prefix shorter than d_conv - 1: the conv state is the (zero-padded) tail, the rest continues."""
    m = mamba2_make(ngroups=2)
    x = torch.randn(2, 14, 32, dtype=torch.float64)
    y_full, s_full = m(x, form=form)
    y1, s1 = m(x[:, :split], form=form)
    y2, s2 = m(x[:, split:], s1, form=form)
    assert rel_err(torch.cat([y1, y2], 1), y_full) <= 1e-10
    for a, b in zip(s2, s_full):
        assert rel_err(a, b) <= 1e-10


def test_mamba2_state_shapes_and_dtypes():
    m = mamba2_make(torch.float32)
    _, (conv, h) = m(torch.randn(3, 5, 32))
    assert conv.shape == (3, m.conv_dim, m.d_conv - 1) and h.shape == (3, m.n_head, m.headdim, m.d_state)
    assert conv.dtype == h.dtype == torch.float32
    m = Mamba2(32)  # the official defaults: headdim 64, d_state 128, one head here
    assert (m.n_head, m.headdim, m.d_state, m.d_conv, m.chunk_size) == (1, 64, 128, 4, 256)
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None


def test_mamba2_init_as_mamba_ssm():
    """As mamba_ssm's Mamba2: dt = softplus(dt_bias) log-uniform in [dt_min, dt_max] = [1e-3, 1e-1],
    A = -exp(A_log) uniform in [-16, -1] (A_init_range), D = 1, the norm's weight 1: 2048 heads."""
    torch.manual_seed(0)
    m = Mamba2(256, expand=8, headdim=1, d_state=8)
    dt = F.softplus(m.dt_bias.double())
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert_uniform(dt.log(), math.log(1e-3), math.log(0.1), "log dt")
    A = torch.exp(m.A_log.double())
    assert A.min() >= 1 and A.max() <= 16
    assert_uniform(-A, -16.0, -1.0, "A")
    assert (m.D == 1).all() and (m.norm_weight == 1).all()


@needs_cuda
@pytest.mark.parametrize("case", [None] + list(MAMBA2_EXTREMES))
def test_mamba2_cuda_bf16_long_extremes(case):
    m = mamba2_make(torch.float32, "cuda", ngroups=2)
    with torch.no_grad():
        if case:
            MAMBA2_EXTREMES[case](m)
    x = torch.randn(2, 16384, 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, s = m(x)
    (y.float().square().mean() + sum(t.float().square().mean() for t in s)).backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and all(torch.isfinite(t).all() for t in s)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.no_grad():  # and the bf16 chunked form still matches float32 recurrent on a shorter piece
        y32, _ = m(x[:, :300], form="recurrent")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y16, _ = m(x[:, :300])
    assert rel_err(y16, y32) <= 5e-2


# ----------------------------------------------------------------------------- mamba.py: a naive reference, extreme dt, chunked continuation, conv widths, init, long sequences, memory, the selective scan

import mamba  # noqa: E402


def mamba_naive(m, x, conv0=None, h0=None):
    """The block written out from the paper, from the raw parameters, channel-wise loops over time."""
    K, Di, N, R = m.d_conv, m.d_inner, m.d_state, m.dt_rank
    Bsz, T, _ = x.shape
    xz = x @ m.in_proj.weight.T
    u, z = xz[..., :Di], xz[..., Di:]
    ctx = torch.zeros(Bsz, K - 1, Di, dtype=x.dtype) if conv0 is None else conv0.transpose(1, 2)
    upad = torch.cat([ctx, u], 1)  # [B, K-1+T, Di]
    w, cb = m.conv1d.weight[:, 0, :], m.conv1d.bias  # [Di, K]
    A = -torch.exp(m.A_log)
    h = torch.zeros(Bsz, Di, N, dtype=x.dtype) if h0 is None else h0
    Wx = m.x_proj.weight
    ys = []
    for t in range(T):
        v = cb.clone().expand(Bsz, Di).clone()
        for k in range(K):
            v = v + w[:, k] * upad[:, t + k]
        v = v * torch.sigmoid(v)
        proj = v @ Wx.T
        dlow, Bt, Ct = proj[:, :R], proj[:, R:R + N], proj[:, R + N:]
        pre = dlow @ m.dt_proj.weight.T + m.dt_proj.bias
        dt = torch.where(pre > 20, pre, torch.log1p(torch.exp(pre)))
        new_h = torch.empty_like(h)
        for n in range(N):  # one state coordinate at a time
            new_h[:, :, n] = torch.exp(dt * A[:, n]) * h[:, :, n] + dt * Bt[:, n:n + 1] * v
        h = new_h
        y = (h * Ct[:, None, :]).sum(-1) + m.D * v
        ys.append(y * z[:, t] * torch.sigmoid(z[:, t]))
    out = torch.stack(ys, 1) @ m.out_proj.weight.T
    return out, upad[:, -(K - 1):].transpose(1, 2), h


@pytest.mark.parametrize("form", mamba.Mamba.forms)
@pytest.mark.parametrize("bias", [None, 20.0, -20.0])
def test_mamba_naive_reference(form, bias):
    m = make("mamba")
    if bias is not None:
        with torch.no_grad():
            m.dt_proj.bias.fill_(bias)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    y_ref, c_ref, h_ref = mamba_naive(m, x)
    y, (c, h) = m(x, form=form)
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(c, c_ref) <= 1e-12 and rel_err(h, h_ref) <= 1e-10
    # from a state left behind by a prefix
    x2 = torch.randn(2, 6, 32, dtype=torch.float64)
    y_ref2, c_ref2, h_ref2 = mamba_naive(m, x2, c_ref, h_ref)
    y2, (c2, h2) = m(x2, (c, h), form=form)
    assert rel_err(y2, y_ref2) <= 1e-10 and rel_err(c2, c_ref2) <= 1e-12 and rel_err(h2, h_ref2) <= 1e-10


def mamba_forms_agree(m, x, s0, tol, autocast_device=None):
    outs = []
    for form in ("recurrent", "parallel"):
        xx = x.detach().clone().requires_grad_()
        s = tuple(t.detach().clone().requires_grad_() for t in s0)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast_device is not None and form == "parallel"):
            y, st = m(xx, s, form=form)
        loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=x.device).view_as(y)).sum() + st[1].float().square().sum()
        grads = torch.autograd.grad(loss, [xx, *s, *m.parameters()])
        outs.append([y, *st, *grads])
    for i, (o, r) in enumerate(zip(*outs)):
        assert torch.isfinite(o).all(), i
        assert rel_err(o, r) <= tol, (i, rel_err(o, r))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("bias", [20.0, -20.0, 50.0, -50.0])
def test_mamba_extreme_dt_forms_agree(dtype, tol, bias):
    m = make("mamba", dtype)
    with torch.no_grad():
        m.dt_proj.bias.fill_(bias)
    x = torch.randn(2, 40, 32, dtype=dtype)
    _, s0 = m(torch.randn(2, 5, 32, dtype=dtype), form="recurrent")
    mamba_forms_agree(m, x, s0, tol)


@pytest.mark.parametrize("bias", [None, 20.0, -20.0])
def test_mamba_long_sequence_extreme_dt_finite_with_grad(bias):
    m = make("mamba", torch.float32)
    if bias is not None:
        with torch.no_grad():
            m.dt_proj.bias.fill_(bias)
    x = torch.randn(1, 16384, 32, requires_grad=True)
    y, (c, h) = m(x)
    (y.square().mean() + h.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 2, 13], [2, 3, 14], [5, 1, 13], [19]])
def test_mamba_parallel_chunks_continue(chunks):
    """Chunks shorter than d_conv - 1 exercise the conv state that reaches back several calls."""
    m = make("mamba")
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    y_full, s_full = m(x)
    ys, state, t = [], None, 0
    for n in chunks:
        y, state = m(x[:, t:t + n], state)
        ys.append(y)
        t += n
    assert rel_err(torch.cat(ys, 1), y_full) <= 1e-12
    for a, b in zip(state, s_full):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("d_conv", [1, 2, 4, 6])
def test_mamba_other_conv_widths(d_conv):
    m = make("mamba", d_conv=d_conv, dt_rank=3)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y_ref, c_ref, h_ref = mamba_naive(m, x) if d_conv > 1 else (None, None, None)
    y_p, s_p = m(x)
    y_r, s_r = m(x, form="recurrent")
    assert rel_err(y_p, y_r) <= 1e-10 and s_p[0].shape == (2, 64, d_conv - 1)
    if y_ref is not None:
        assert rel_err(y_p, y_ref) <= 1e-10


def test_mamba_init():
    """As the paper and mamba_ssm's Mamba: A = -(1..N) in every channel (S4D-real), D = 1, dt at init
    log-uniform in [dt_min, dt_max] = [1e-3, 1e-1] (softplus of dt_proj's bias), dt_proj's weight
    U(-dt_rank^-0.5, dt_rank^-0.5) (dt_init "random"); the distributions at 2048 channels."""
    m = mamba.Mamba(64)
    assert m.dt_rank == 4 and m.d_inner == 128 and m.A_log.shape == (128, 16)
    assert torch.allclose(-torch.exp(m.A_log[3]), -torch.arange(1., 17.))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.dt_proj.weight.abs().max() <= 0.5 and torch.equal(m.D, torch.ones(128))
    assert m.in_proj.bias is None and m.x_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None
    torch.manual_seed(0)
    m = mamba.Mamba(256, expand=8)
    assert torch.allclose(-torch.exp(m.A_log), -torch.arange(1., 17.).expand(2048, 16))
    assert_uniform(F.softplus(m.dt_proj.bias.double()).log(), math.log(1e-3), math.log(0.1), "log dt")
    assert_uniform(m.dt_proj.weight, -m.dt_rank ** -0.5, m.dt_rank ** -0.5, "dt_proj.weight")
    assert torch.equal(m.D, torch.ones(2048))


def test_mamba_bf16_parameters_run():
    m = make("mamba", torch.float32)
    x = torch.randn(2, 30, 32)
    y32, _ = m(x)
    mb = make("mamba", torch.bfloat16)
    for form in mb.forms:
        y, (c, h) = mb(x.bfloat16(), form=form)
        assert y.dtype == torch.bfloat16 and h.dtype == torch.float32 and rel_err(y, y32) <= 5e-2


@needs_cuda
@pytest.mark.parametrize("bias", [None, 20.0, -20.0])
def test_mamba_cuda_bf16_long_extreme_dt(bias):
    m = make("mamba", torch.float32, "cuda")
    if bias is not None:
        with torch.no_grad():
            m.dt_proj.bias.fill_(bias)
    x = torch.randn(2, 16384, 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, (c, h) = m(x)
    (y.float().square().mean() + h.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@needs_cuda
@pytest.mark.parametrize("bias", [20.0, -20.0])
def test_mamba_cuda_extreme_dt_forms_agree(bias):
    m = make("mamba", torch.float32, "cuda")
    with torch.no_grad():
        m.dt_proj.bias.fill_(bias)
    x = torch.randn(2, 300, 32, device="cuda")
    _, s0 = m(torch.randn(2, 5, 32, device="cuda"), form="recurrent")
    mamba_forms_agree(m, x, s0, 1e-3)
    mamba_forms_agree(m, x, s0, 5e-2, autocast_device="cuda")


def mamba_saved_numels(m, x):
    """The sizes of the tensors autograd keeps for the backward of the parallel form."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        m(x)
    return sizes


def test_mamba_parallel_keeps_no_state_sequence():
    """autograd keeps nothing [B, T, d_inner, N]-sized: the states are recomputed in the backward
    (the scan of a and b followed by y = C . h keeps a and h, N times the largest tensor here)."""
    m = make("mamba", torch.float32, d_state=16)
    x = torch.randn(2, 40, 32, requires_grad=True)
    bound = 2 * 40 * 2 * m.d_inner  # in_proj's output [B, T, 2 d_inner]
    assert max(mamba_saved_numels(m, x)) <= bound
    A = torch.rand(2, 40, m.d_inner, 16, requires_grad=True)  # the premise: the old form's saved a and h
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        sizes = []
        scan(A, A * 1.0)
    assert max(sizes) > bound


@needs_cuda
def test_mamba_parallel_memory_cuda():
    """Forward and backward under bf16 autocast take less memory than two [B, T, d_inner, N] float32
    tensors (the unfused form kept a and h and built b: three, plus their gradients)."""
    m = make("mamba", torch.float32, "cuda", d_state=16)
    x = torch.randn(2, 8192, 32, device="cuda", requires_grad=True)
    h_bytes = 2 * 8192 * m.d_inner * 16 * 4

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, (c, h) = m(x)
        (y.float().square().mean() + h.square().mean()).backward()

    step()  # one-time allocations (cuBLAS workspace, gradients) before the baseline
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2 * h_bytes, (torch.cuda.max_memory_allocated() - base, h_bytes)


# ---- scan.selective_scan (the fused kernel behind the parallel form) against a loop and the PyTorch engine

def selective_reference(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t, y_t = C_t . h_t, one step at a time."""
    h = torch.zeros(x.shape[0], x.shape[2], A.shape[1], dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


# (B, T, D, N, h0, dt scale): several tiles over time (16 on a GPU, 8 interpreted), several channel
# blocks, ragged T, D and N, and dt up to 30 (gates ~1e-26: the backward's h_t - b_t = a_t h_{t-1})
SELECTIVE_CASES = [(2, 21, 10, 4, True, 1.0), (1, 37, 9, 3, False, 1.0), (3, 8, 4, 4, True, 1.0), (2, 19, 6, 4, True, 30.0),
                   (2, 19, 6, 4, True, 1000.0)]  # dt up to 1000: most a_t underflow to 0


def check_selective(device, dtype, tol, cases=SELECTIVE_CASES, reference=None):
    """y, h_T and the gradients w.r.t. x, dt, A, B, C, h0 (through y and h_T) against the loop in
    float64, or against `reference` (selective_scan in float64: the PyTorch engine). x is passed
    transposed ([B, D, T] in memory, as the parallel form's conv leaves it)."""
    g = torch.Generator(device=device).manual_seed(0)
    for Bsz, T, D, N, with_h0, scale in cases:
        x = torch.randn(Bsz, D, T, device=device, generator=g).to(dtype).transpose(1, 2)
        dt = scale * torch.rand(Bsz, T, D, device=device, generator=g).to(dtype)
        A = -torch.rand(D, N, device=device, generator=g).to(dtype) * 2
        B, C = (torch.randn(Bsz, T, N, device=device, generator=g).to(dtype) for _ in range(2))
        acc = torch.promote_types(dtype, torch.float32)  # the state's dtype
        h0 = torch.randn(Bsz, D, N, device=device, generator=g).to(acc) if with_h0 else None
        leaves = [x, dt, A, B, C] + ([h0] if with_h0 else [])
        for t in leaves:
            t.requires_grad_()
        y, hT = selective_scan_module.selective_scan(*leaves[:5], h0)
        assert y.dtype == x.dtype and y.shape == x.shape and hT.dtype == acc and hT.shape == (Bsz, D, N)
        gy, gh = torch.randn(y.shape, device=device, generator=g), torch.randn(hT.shape, device=device, generator=g)
        gy = gy.to(y.dtype).float()  # autograd hands a bf16 output's gradient over in bf16: the reference gets the same
        grads = torch.autograd.grad((y.float() * gy).sum() + (hT * gh).sum(), leaves)
        ref = [t.detach().double().requires_grad_() for t in leaves]
        y_ref, h_ref = (reference or selective_reference)(*ref[:5], ref[5] if with_h0 else None)
        ref_grads = torch.autograd.grad((y_ref * gy.double()).sum() + (h_ref * gh.double()).sum(), ref)
        what = f"B={Bsz} T={T} D={D} N={N} h0={with_h0} dt*{scale} {dtype}"
        for n, o, r in zip(("y", "h_T", "dx", "ddt", "dA", "dB", "dC", "dh0"), [y, hT, *grads], [y_ref, h_ref, *ref_grads]):
            assert o.shape == r.shape and rel_err(o, r) <= tol, f"{n} {what}: {rel_err(o, r):.1e}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_selective_scan_torch(dtype, tol):
    check_selective("cpu", dtype, tol)


@pytest.mark.parametrize("mode", SCAN_MODES)
def test_selective_scan_triton_kernel_interpreted(mode):
    """The real kernels, forward and backward, run by Triton's interpreter: tiles of 8 steps by 4 channels, in one
    pass or in chunks."""
    interpreted("assert scan.use_triton(torch.zeros(1)); import selective_scan as ss; " + force_mode(mode)
                + "seen = t.spy_reduce('_selective_fwd_kernel', '_selective_bwd_kernel', module=ss); "
                "t.check_selective('cpu', torch.float32, 1e-5); " + mode_ran(mode))


@needs_cuda
@pytest.mark.parametrize("mode", SCAN_MODES)
# bf16: x, dt, B, C rounded to 8 bits before both; y and dx rounded once more, the sums stay float32
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_selective_scan_triton_cuda(dtype, tol, mode, monkeypatch):
    monkeypatch.setattr(scan_module, "PROGRAMS_PER_SM", SCAN_MODES[mode][0])
    monkeypatch.setattr(scan_module, "TILES_PER_CHUNK", SCAN_MODES[mode][1])
    cases = [(2, 333, 100, 16, True, 1.0), (1, 8192, 256, 16, True, 1.0), (4, 1000, 48, 5, False, 1.0),
             (2, 500, 64, 16, True, 30.0)]
    check_selective("cuda", dtype, tol, cases, reference=selective_scan_module.selective_scan)


@pytest.mark.parametrize("bad,message", [
    (lambda: selective_scan_module.selective_scan(*[torch.rand(2, 5, 4)] * 2, torch.rand(4, 3), *[torch.rand(2, 5, 2)] * 2), r"B must be"),
    (lambda: selective_scan_module.selective_scan(*[torch.rand(2, 0, 4)] * 2, torch.rand(4, 3), *[torch.rand(2, 0, 3)] * 2), "T > 0"),
    (lambda: selective_scan_module.selective_scan(*[torch.rand(2, 5, 4)] * 2, torch.rand(4, 3), *[torch.rand(2, 5, 3)] * 2,
                                        torch.rand(2, 3, 4)), "h0 must be"),
    (lambda: selective_scan_module.selective_scan(torch.rand(2, 5, 4), torch.ones(2, 5, 4, dtype=torch.long), torch.rand(4, 3),
                                        *[torch.rand(2, 5, 3)] * 2), "floating"),
    (lambda: selective_scan_module.selective_scan(*[torch.rand(2, 5, 4)] * 2, torch.rand(4, 3, device="meta"),
                                        *[torch.rand(2, 5, 3)] * 2), "one device"),
])
def test_selective_scan_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


# ----------------------------------------------------------------------------- deltanet.py: a naive delta rule, beta 0 and 1, the gradient-step reading, the layer by hand, long and adversarial keys, init
# (the delta rule written with explicit D x D matrices; the layer rebuilt by hand from its parameters)

import deltanet  # noqa: E402
from deltanet import DeltaNet  # noqa: E402

DELTANET_FORMS = ("recurrent", "parallel", "chunked")


def deltanet_naive(q, k, v, beta, S):
    """S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, y_t = S_t q_t, as written."""
    q, k, v, beta, S = (x.double() for x in (q, k, v, beta, S))
    I = torch.eye(k.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(q.shape[1]):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None, None]
        S = S @ (I - bt * kt[..., :, None] * kt[..., None, :]) + bt * vt[..., :, None] * kt[..., None, :]
        ys.append((S @ q[:, t, ..., None])[..., 0])
    return torch.stack(ys, 1), S


def deltanet_inputs(B=2, T=37, H=3, Dk=8, Dv=5, dtype=torch.float64, seed=0, beta=None, same_key=False):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, 1 if same_key else T, H, Dk, generator=g, dtype=dtype), dim=-1).expand(B, T, H, Dk)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    b = torch.rand(B, T, H, generator=g, dtype=dtype) if beta is None else beta(B, T, H, g).to(dtype)
    S0 = torch.randn(B, H, Dv, Dk, generator=g, dtype=dtype)
    return q, k.contiguous(), v, b, S0


def deltanet_core(form, q, k, v, beta, S, L=8):
    if form == "recurrent":
        return deltanet.delta_rule_recurrent(q, k, v, beta, S)
    if form == "parallel":
        return deltanet.delta_rule_parallel(q, k, v, beta, S)
    return deltanet.delta_rule_chunked(q, k, v, beta, S, L)


DELTANET_BETAS = {
    "random": None,
    "zero": lambda B, T, H, g: torch.zeros(B, T, H),
    "one": lambda B, T, H, g: torch.ones(B, T, H),
    "zero_or_one": lambda B, T, H, g: torch.randint(0, 2, (B, T, H), generator=g).float(),
}


@pytest.mark.parametrize("beta", DELTANET_BETAS)
@pytest.mark.parametrize("form", DELTANET_FORMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_deltanet_core_against_naive(form, beta, dtype, tol):
    q, k, v, b, S0 = deltanet_inputs(dtype=dtype, beta=DELTANET_BETAS[beta])
    y, S = deltanet_core(form, q, k, v, b, S0)
    y_ref, S_ref = deltanet_naive(q, k, v, b, S0)
    assert rel_err(y, y_ref) <= tol and rel_err(S, S_ref) <= tol


@pytest.mark.parametrize("form", DELTANET_FORMS)
def test_deltanet_beta_zero_skips_and_beta_one_overwrites(form):
    q, k, v, b, S0 = deltanet_inputs(beta=DELTANET_BETAS["zero"])
    y, S = deltanet_core(form, q, k, v, b, S0)
    assert rel_err(S, S0) <= 1e-12 and rel_err(y, torch.einsum("bhed,bthd->bthe", S0, q)) <= 1e-12
    q, k, v, b, S0 = deltanet_inputs(beta=DELTANET_BETAS["one"], same_key=True)  # one key written again and again
    y, S = deltanet_core(form, q, k, v, b, S0)
    assert rel_err(torch.einsum("bhed,bhd->bhe", S, k[:, -1]), v[:, -1]) <= 1e-10  # S k = v exactly
    P = torch.eye(8, dtype=torch.float64) - k[:, 0, :, :, None] * k[:, 0, :, None, :]
    assert rel_err(S @ P, S0 @ P) <= 1e-10  # and nothing orthogonal to k changed


def test_deltanet_gradient_step_reading():
    """S_t = S_{t-1} - beta_t * grad_S 1/2 ||S k_t - v_t||^2 at S = S_{t-1}."""
    q, k, v, b, S0 = deltanet_inputs(T=1)
    S_prev = S0.clone().requires_grad_()
    loss = 0.5 * (torch.einsum("bhed,bhd->bhe", S_prev, k[:, 0]) - v[:, 0]).square().sum()
    (grad,) = torch.autograd.grad(loss, S_prev)
    _, S1 = deltanet.delta_rule_recurrent(q, k, v, b, S0)
    assert rel_err(S1, S0 - b[:, 0, :, None, None] * grad) <= 1e-14


def deltanet_layer_reference(model, x, state=None):
    """The layer rebuilt from its parameters: conv as an explicit window sum, naive recurrence."""
    B, T, d = x.shape
    H, W = model.n_head, model.conv.weight[:, 0]  # [3d, K]
    K = W.shape[1]
    S0, conv0 = state if state is not None else (x.new_zeros(B, H, d // H, d // H), x.new_zeros(B, K - 1, 3 * d))
    p = torch.cat([conv0, x @ model.qkv.weight.T], 1)
    c = torch.stack([sum(p[:, t + i] * W[:, i] for i in range(K)) for t in range(T)], 1)
    q, k, v = F.silu(c).split(d, -1)
    q, k, v = (z.unflatten(-1, (H, -1)) for z in (q, k, v))
    q, k = (z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6) for z in (q, k))  # fla's l2norm eps
    q = q / math.sqrt(q.shape[-1])  # fla's scale: its kernels compute y_t = S_t (q_t * d_k^-1/2)
    y, S = deltanet_naive(q, k, v, torch.sigmoid(x @ model.beta.weight.T), S0)
    y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + model.eps) * model.norm
    if model.gate is not None:
        y = y * F.silu(x @ model.gate.weight.T).unflatten(-1, (H, -1))
    return y.flatten(2) @ model.out.weight.T, (S, p[:, -(K - 1):])


@pytest.mark.parametrize("use_gate", [False, True])
@pytest.mark.parametrize("form", DELTANET_FORMS)
def test_deltanet_layer_against_reference(form, use_gate):
    torch.manual_seed(0)
    model = DeltaNet(32, n_head=2, chunk_size=8, use_gate=use_gate).double()
    with torch.no_grad():
        model.norm.add_(0.1 * torch.randn_like(model.norm))
        x = torch.randn(2, 23, 32, dtype=torch.float64)
        _, state = model(torch.randn(2, 6, 32, dtype=torch.float64), form="recurrent")
        for st in (None, state):
            y, s = model(x, st, form=form)
            y_ref, s_ref = deltanet_layer_reference(model, x, st)
            assert rel_err(y, y_ref) <= 1e-10
            assert rel_err(s[1], s_ref[1]) == 0 and rel_err(s[0], s_ref[0]) <= 1e-10


def test_deltanet_defaults_as_fla():
    m = DeltaNet(64)
    assert m.n_head == 4 and m.chunk_size == 64 and m.conv.kernel_size == (4,) and m.gate is None


def test_deltanet_short_calls_carry_the_conv_state():
    """Calls shorter than the conv window (T = 1, 2) chain like one call."""
    torch.manual_seed(0)
    model = DeltaNet(32, n_head=2, chunk_size=8).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y_full, s_full = model(x)
    state, ys = None, []
    for a, b in [(0, 1), (1, 3), (3, 4), (4, 9)]:
        y, state = model(x[:, a:b], state, form="parallel")
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full) <= 1e-10 and rel_err(state[0], s_full[0]) <= 1e-10


@pytest.mark.parametrize("L", [8, 64])
def test_deltanet_long_chunked_matches_recurrent_float32(L):
    """T = 16384 float32 chunked (and random state) against a float64 recurrence."""
    q, k, v, b, S0 = deltanet_inputs(B=1, T=16384, H=2, Dk=16, Dv=16, dtype=torch.float32, seed=3)
    with torch.no_grad():
        y, S = deltanet.delta_rule_chunked(q, k, v, b, S0, L)
        y_ref, S_ref = deltanet.delta_rule_recurrent(q, k, v, b, S0.double())
    assert rel_err(y, y_ref) <= 1e-4 and rel_err(S, S_ref) <= 1e-4


@pytest.mark.parametrize("form", ["parallel", "chunked"])
def test_deltanet_adversarial_keys_float32(form):
    """Identical keys with beta = 1 (A = I + strictly-lower ones), and nearly collinear keys with
    beta near 1, at T = 4096 in float32: finite and equal to the float64 recurrence."""
    B, T, H, D = 1, 4096, 2, 16
    for spread in (0.0, 1e-3):
        g = torch.Generator().manual_seed(0)
        k = F.normalize(torch.randn(B, 1, H, D, generator=g) + spread * torch.randn(B, T, H, D, generator=g), dim=-1)
        q = F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
        v = torch.randn(B, T, H, D, generator=g)
        b = torch.ones(B, T, H) if spread == 0 else 1 - 1e-3 * torch.rand(B, T, H, generator=g)
        S0 = torch.zeros(B, H, D, D)
        with torch.no_grad():
            y, S = deltanet_core(form, q, k, v, b, S0, L=64)
            y_ref, S_ref = deltanet.delta_rule_recurrent(q, k, v, b, S0.double())
        assert rel_err(y, y_ref) <= 1e-3 and rel_err(S, S_ref) <= 1e-3, (spread, rel_err(y, y_ref), rel_err(S, S_ref))


def test_deltanet_layer_scales_q_as_fla_at_the_showdown_width():
    """d_model 384, fla's defaults: the layer equals the reference with fla's q scale. Without the
    scale the RMSNorm cancels it only up to its eps: outputs then differ by tens of percent."""
    torch.manual_seed(0)
    model = DeltaNet(384).double()
    x = torch.randn(2, 12, 384, dtype=torch.float64)
    with torch.no_grad():
        y, s = model(x)
        y_ref, s_ref = deltanet_layer_reference(model, x)
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(s[0], s_ref[0]) <= 1e-10


def affine_maps_in_order(M, C, S):
    """The chunk states of S -> S M_c + C_c, one chunk after another (chunks along dim 1)."""
    states = []
    for c in range(M.shape[1]):
        states.append(S)
        S = S @ M[:, c] + C[:, c]
    return torch.stack(states, 1), S


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 5, 8, 33])
def test_deltanet_chunk_states_composes_affine_maps(n_chunks):
    """The scan alone, on maps that are not contractions (so any misplaced factor shows)."""
    g = torch.Generator().manual_seed(n_chunks)
    M = torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(n_chunks, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    C = torch.randn(n_chunks, 2, 3, 5, 4, generator=g, dtype=torch.float64)
    M, C = M.transpose(0, 1), C.transpose(0, 1)  # [B, T/L, H, *]
    S = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    ins, last = deltanet.chunk_states(M, C, S)
    ins_ref, last_ref = affine_maps_in_order(M, C, S)
    assert rel_err(ins, ins_ref) <= 1e-12 and rel_err(last, last_ref) <= 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("chunks,T", [(1, 4), (2, 7), (3, 12), (5, 18), (8, 32), (33, 131)])
def test_deltanet_chunked_scan_matches_recurrent(chunks, T, dtype, tol):
    """Chunk size 4, T/4 rounded up = chunks (ragged where 4 does not divide T): outputs, final state
    and the gradients w.r.t. q, k, v, beta and S0 against the float64 recurrence."""
    inputs = [t.requires_grad_() for t in deltanet_inputs(T=T, H=2, dtype=dtype, seed=chunks)]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    g = torch.Generator().manual_seed(100 + chunks)
    gy, gS = torch.randn(2, T, 2, 5, generator=g, dtype=torch.float64), torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64)
    y, S = deltanet.delta_rule_chunked(*inputs, 4)
    y_ref, S_ref = deltanet.delta_rule_recurrent(*ref_inputs)
    grads = torch.autograd.grad((y.double() * gy).sum() + (S.double() * gS).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (S_ref * gS).sum(), ref_inputs)
    assert rel_err(y, y_ref) <= tol and rel_err(S, S_ref) <= tol
    for name, a, b in zip(["q", "k", "v", "beta", "S0"], grads, grads_ref):
        assert rel_err(a, b) <= tol, f"grad {name}: {rel_err(a, b):.2e}"


@needs_cuda
@pytest.mark.parametrize("form", ["parallel", "chunked"])
def test_deltanet_cuda_long_bf16_and_f32(form):
    """T = 16384 (parallel: 4096) on the GPU: bf16 autocast forward + backward finite; float32
    chunked against the float64 recurrence."""
    T = 16384 if form == "chunked" else 4096
    torch.manual_seed(0)
    model = DeltaNet(64).cuda()
    x = torch.randn(2, T, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, (S, conv) = model(x, form=form)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    q, k, v, b, S0 = (t.cuda() for t in deltanet_inputs(B=2, T=T, H=4, Dk=16, Dv=16, dtype=torch.float32, seed=5))
    with torch.no_grad():
        yc, Sc = deltanet_core(form, q, k, v, b, S0, L=64)
        yr, Sr = deltanet.delta_rule_recurrent(q, k, v, b, S0.double())
    assert rel_err(yc, yr) <= 2e-3 and rel_err(Sc, Sr) <= 2e-3, (rel_err(yc, yr), rel_err(Sc, Sr))  # tf32 matmuls


def test_deltanet_init_is_torch_default():
    """The docstring claims no init of the layer's own: the projections (the optional gate too) and
    the conv keep PyTorch's default, the RMSNorm's weight starts at 1."""
    torch.manual_seed(0)
    model = DeltaNet(256, use_gate=True)
    for name in ("qkv", "conv", "beta", "gate", "out"):
        assert_torch_default(getattr(model, name), name)
    assert (model.norm == 1).all()




# ----------------------------------------------------------------------------- gated_deltanet.py: a naive gated delta rule, gates and betas at 0 and 1, the layer by hand, init, ragged chunks, long handoff, T = 16384, compiled
# (the gated delta rule written with explicit D x D matrices and alpha itself; the layer rebuilt by hand from its parameters)

import gated_deltanet  # noqa: E402
from gated_deltanet import GatedDeltaNet  # noqa: E402

GDN_FORMS = ("recurrent", "parallel", "chunked")


def gated_deltanet_naive(q, k, v, beta, alpha, S):
    """S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, y_t = S_t q_t (Yang et al. 2025), as written."""
    q, k, v, beta, alpha, S = (x.double() for x in (q, k, v, beta, alpha, S))
    I = torch.eye(k.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(q.shape[1]):
        kt, vt, bt, at = k[:, t], v[:, t], beta[:, t, :, None, None], alpha[:, t, :, None, None]
        S = at * S @ (I - bt * kt[..., :, None] * kt[..., None, :]) + bt * vt[..., :, None] * kt[..., None, :]
        ys.append((S @ q[:, t, ..., None])[..., 0])
    return torch.stack(ys, 1), S


# log alpha: ordinary; mild (the state decays to ~0.2 in 37 tokens); alpha exactly 1; alpha = exp(-1e4) = 0;
# tokens that jump between the two
GDN_GATES = {
    "random": lambda B, T, H, g: -2 * torch.rand(B, T, H, generator=g),
    "mild": lambda B, T, H, g: -0.08 * torch.rand(B, T, H, generator=g),
    "one": lambda B, T, H, g: torch.zeros(B, T, H),
    "zero": lambda B, T, H, g: torch.full((B, T, H), -1e4),
    "jumpy": lambda B, T, H, g: -1e4 * torch.randint(0, 2, (B, T, H), generator=g),
}


def gdn_inputs(gate="random", dtype=torch.float64, seed=0, **kw):
    q, k, v, b, S0 = deltanet_inputs(dtype=dtype, seed=seed, **kw)
    g = GDN_GATES[gate](*b.shape, torch.Generator().manual_seed(seed + 1)).to(dtype)
    return q, k, v, b, g, S0


def gdn_core(form, q, k, v, beta, g, S, L=8):
    if form == "recurrent":
        return gated_deltanet.gated_delta_rule_recurrent(q, k, v, beta, g, S)
    if form == "parallel":
        return gated_deltanet.gated_delta_rule_parallel(q, k, v, beta, g, S)
    return gated_deltanet.gated_delta_rule_chunked(q, k, v, beta, g, S, L)


@pytest.mark.parametrize("gate", ["random", "one", "zero", "jumpy"])
@pytest.mark.parametrize("form", GDN_FORMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_gated_deltanet_core_against_naive(form, gate, dtype, tol):
    """Outputs, final state and gradients (q, k, v, beta, log alpha, S0) against the naive rule in
    float64. Where alpha underflows, d/d(log alpha) = alpha dL/dalpha is 0 in the naive rule, while the
    log-space forms get it as O(1) terms that cancel: that gradient is measured against the others' scale."""
    inputs = [t.requires_grad_() for t in gdn_inputs(gate, dtype)]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y, S = gdn_core(form, *inputs)
    q, k, v, b, g, S0 = ref_inputs
    y_ref, S_ref = gated_deltanet_naive(q, k, v, b, g.exp(), S0)
    assert rel_err(y, y_ref) <= tol and rel_err(S, S_ref) <= tol
    gen = torch.Generator().manual_seed(2)
    gy, gS = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64), torch.randn(S_ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * gy).sum() + (S.double() * gS).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (S_ref * gS).sum(), ref_inputs)
    scale = grads_ref[2].norm().item()  # dL/dv
    for name, a, r in zip(["q", "k", "v", "beta", "log alpha", "S0"], grads, grads_ref):
        err = rel_err(a, r) if name != "log alpha" else (a.double() - r).norm().item() / max(r.norm().item(), scale)
        assert err <= tol, f"grad {name}: {err:.2e}"


@pytest.mark.parametrize("form", GDN_FORMS)
def test_gated_deltanet_alpha_one_is_deltanet_alpha_zero_forgets(form):
    q, k, v, b, g, S0 = gdn_inputs("one")
    y, S = gdn_core(form, q, k, v, b, g, S0)
    y_ref, S_ref = deltanet_core(form, q, k, v, b, S0)  # alpha = 1 exactly: deltanet.py's own forms
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12
    q, k, v, b, g, S0 = gdn_inputs("zero")  # alpha = 0: only the current token's write survives
    y, S = gdn_core(form, q, k, v, b, g, S0)
    y_ref = b[..., None] * (q * k).sum(-1, keepdim=True) * v  # y_t = beta_t (k_t . q_t) v_t
    S_ref = b[:, -1, :, None, None] * v[:, -1, :, :, None] * k[:, -1, :, None, :]
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12


@pytest.mark.parametrize("form", GDN_FORMS)
def test_gated_deltanet_beta_zero_skips_and_beta_one_overwrites(form):
    q, k, v, b, g, S0 = gdn_inputs("mild", beta=DELTANET_BETAS["zero"])  # only the decay acts
    y, S = gdn_core(form, q, k, v, b, g, S0)
    c = g.cumsum(1)
    assert rel_err(S, S0 * c[:, -1, :, None, None].exp()) <= 1e-12
    assert rel_err(y, torch.einsum("bhed,bthd->bthe", S0, q) * c.exp()[..., None]) <= 1e-12
    q, k, v, b, g, S0 = gdn_inputs("mild", beta=DELTANET_BETAS["one"], same_key=True)  # one key, again and again
    y, S = gdn_core(form, q, k, v, b, g, S0)
    assert rel_err(torch.einsum("bhed,bhd->bhe", S, k[:, -1]), v[:, -1]) <= 1e-10  # S k = v exactly
    P = torch.eye(8, dtype=torch.float64) - k[:, 0, :, :, None] * k[:, 0, :, None, :]
    decay = g.sum(1).exp()[..., None, None]
    assert rel_err(S @ P, decay * S0 @ P) <= 1e-10  # what is orthogonal to k only decayed


@pytest.mark.parametrize("L", [1, 3, 8, 64])
def test_gated_deltanet_chunked_every_length(L):
    """Ragged last chunks, T shorter than a chunk, one token per chunk: against the recurrence."""
    for T in (1, 7, 8, 9, 23):
        q, k, v, b, g, S0 = gdn_inputs(T=T, seed=T)
        y, S = gated_deltanet.gated_delta_rule_chunked(q, k, v, b, g, S0, L)
        y_ref, S_ref = gated_deltanet.gated_delta_rule_recurrent(q, k, v, b, g, S0)
        assert rel_err(y, y_ref) <= 1e-10 and rel_err(S, S_ref) <= 1e-10, (T, L)


def gated_deltanet_layer_reference(model, x, state=None):
    """The layer rebuilt from its parameters as fla defines it: conv as an explicit window sum, alpha
    = exp(-softplus(w_a x + dt_bias) exp(A_log)), fla's q scale, FusedRMSNormGated, naive recurrence."""
    B, T, d = x.shape
    H, W = model.n_head, model.conv.weight[:, 0]  # [C, K]
    K, key, value = W.shape[1], model.key, model.value
    S0, conv0 = state if state is not None else (x.new_zeros(B, H, value // H, key // H), x.new_zeros(B, K - 1, W.shape[0]))
    p = torch.cat([conv0, x @ model.qkv.weight.T], 1)
    c = torch.stack([sum(p[:, t + i] * W[:, i] for i in range(K)) for t in range(T)], 1)
    q, k, v = (z.unflatten(-1, (H, -1)) for z in F.silu(c).split([key, key, value], -1))
    q, k = (z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6) for z in (q, k))  # fla's l2norm eps
    q = q / math.sqrt(q.shape[-1])  # fla's default scale
    alpha = torch.exp(-F.softplus(x @ model.a.weight.T + model.dt_bias) * torch.exp(model.A_log))
    y, S = gated_deltanet_naive(q, k, v, torch.sigmoid(x @ model.beta.weight.T), alpha, S0)
    y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + model.eps) * model.norm
    y = y * F.silu(x @ model.gate.weight.T).unflatten(-1, (H, -1))
    return y.flatten(2) @ model.out.weight.T, (S, p[:, -(K - 1):])


@pytest.mark.parametrize("form", GDN_FORMS)
def test_gated_deltanet_layer_against_reference(form):
    model = make("gated_deltanet")
    with torch.no_grad():
        model.norm.add_(0.1 * torch.randn_like(model.norm))
        x = torch.randn(2, 23, 32, dtype=torch.float64)
        _, state = model(torch.randn(2, 6, 32, dtype=torch.float64), form="recurrent")
        for st in (None, state):
            y, s = model(x, st, form=form)
            y_ref, s_ref = gated_deltanet_layer_reference(model, x, st)
            assert rel_err(y, y_ref) <= 1e-10
            assert rel_err(s[1], s_ref[1]) == 0 and rel_err(s[0], s_ref[0]) <= 1e-10


def test_gated_deltanet_defaults_and_init_as_fla():
    """fla's GatedDeltaNet: 6 heads, keys 0.75 d_model and values 1.5 d_model wide, conv 4 without
    bias, no projection biases, norm eps 1e-5; A = exp(A_log) ~ U(0, 16), dt = softplus(dt_bias)
    log-uniform in [1e-3, 0.1] (Mamba2's init)."""
    m = GatedDeltaNet(384)
    assert (m.n_head, m.key, m.value, m.chunk_size, m.eps) == (6, 288, 576, 64, 1e-5)
    assert m.conv.kernel_size == (4,) and m.conv.bias is None and m.norm.shape == (96,)
    assert all(lin.bias is None for lin in (m.qkv, m.a, m.beta, m.gate, m.out))
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(6 * 384 ** 2, rel=0.02)
    torch.manual_seed(0)
    m = GatedDeltaNet(800, n_head=100)  # 100 draws of each per-head parameter
    A, dt = m.A_log.detach().exp(), F.softplus(m.dt_bias.detach())
    assert A.min() > 0 and A.max() < 16 and A.min() < 1 and 6 < A.mean() < 10  # U(0, 16), not Mamba2's (1, 16)
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 0.1 * (1 + 1e-6)
    assert abs(dt.log().mean() - math.log(1e-2)) < 0.5  # the middle of [log 1e-3, log 0.1]
    with pytest.raises(ValueError, match="n_head"):
        GatedDeltaNet(30, n_head=4)


def test_gated_deltanet_long_handoff():
    """A prefill of 37 tokens (chunked, chunk 16), then 300 step() calls, each output against one
    parallel pass over the whole sequence; the final states too."""
    model = make("gated_deltanet", chunk_size=16)
    x = torch.randn(2, 337, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y_full, s_full = model(x, form="parallel")
        y, state = model(x[:, :37])
        assert rel_err(y, y_full[:, :37]) <= 1e-8
        for t in range(37, 337):
            y_t, state = model.step(x[:, t], state)
            assert rel_err(y_t, y_full[:, t]) <= 1e-8, f"step {t}"
    assert rel_err(state[0], s_full[0]) <= 1e-8 and rel_err(state[1], s_full[1]) <= 1e-12


# layer regimes: alpha exactly 1 (A_log = -inf); alpha = 0 (log alpha ~ -2e5); gates jumping between the two
GDN_LAYER_GATES = {"plain": {}, "one": dict(A_log=-math.inf), "zero": dict(A_log=10.0, dt_bias=10.0),
                   "jumpy": dict(A_log=10.0, a_scale=1e3)}


def gdn_layer(dtype=torch.float32, A_log=None, dt_bias=None, a_scale=None, **options):
    model = make("gated_deltanet", dtype, **options)
    with torch.no_grad():
        for p, value in ((model.A_log, A_log), (model.dt_bias, dt_bias)):
            if value is not None:
                p.fill_(value)
        if a_scale is not None:
            model.a.weight.mul_(a_scale)
    return model


@pytest.mark.parametrize("regime", GDN_LAYER_GATES)
def test_gated_deltanet_long_sequence_forward_backward_finite(regime):
    """T = 16384, float32, the default (chunked) form with its default chunk, gates at 0 and 1 too."""
    model = gdn_layer(**GDN_LAYER_GATES[regime], chunk_size=64)
    x = torch.randn(1, 16384, D_MODEL, requires_grad=True)
    y, (S, _) = model(x)
    (y.square().mean() + S.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- rwkv7.py: the official time mix by hand, decays and a at their extremes, ragged chunks, long handoff, T = 16384 with gradients, the official init and numbers
# (the reference follows BlinkDL/RWKV-LM RWKV-v7/rwkv_v7_demo.py, written independently of rwkv7.py:
# explicit Dk x Dk transitions, the official decay formula, GroupNorm by mean and variance, float64)

import rwkv7  # noqa: E402
from rwkv7 import RWKV7  # noqa: E402

RWKV7_REGIMES = {  # shifts of w0 and a0: sigmoid saturates, so w_t and a_t sit exactly at their ends
    "plain": (0.0, 0.0),
    "w_min": (1000.0, 0.0),  # w_t = exp(-e^-1/2) = 0.545, the fastest decay the soft clamp allows
    "w_one": (-1000.0, 0.0),  # w_t = 1, no decay
    "a_zero": (0.0, -1000.0),  # nothing removed: S only decays and adds v k^T
    "a_one": (0.0, 1000.0),  # the full delta rule: what S holds under kappa is removed
    "w_min_a_one": (1000.0, 1000.0),
    "w_one_a_one": (-1000.0, 1000.0),
}


def rwkv7_model(regime="plain", dtype=torch.float64, **options):
    model = make("rwkv7", dtype, **options)
    dw, da = RWKV7_REGIMES[regime]
    with torch.no_grad():
        model.w0.add_(dw)
        model.a0.add_(da)
    return model


def rwkv7_naive(model, x, state=None):
    """The time mix token by token, as the official demo: token shift from the previous token,
    w = exp(-exp(-softplus(-(w0 + tanh(x_w w1) w2)) - 0.5)), a = sigmoid(a0 + x_a a1 a2),
    g = sigmoid(x_g g1) g2, kappa = normalize(k * k_k), k *= 1 + (a - 1) k_a, the transition
    G_t = diag(w_t) - kappa_t (a_t * kappa_t)^T as a Dk x Dk matrix, S_t = S_{t-1} G_t + v_t k_t^T,
    o_t = S_t r_t, GroupNorm (eps 64e-5), + (r . (k * r_k)) v, times g, output."""
    p = {n: t.detach().double() for n, t in model.named_parameters()}
    B, T, C = x.shape
    H, N = model.n_head, model.head_size
    x = x.double()
    S, prev = (x.new_zeros(B, H, N, N), x.new_zeros(B, C)) if state is None else (state[0].double(), state[1].double())
    ys = []
    for t in range(T):
        xt = x[:, t]
        mix = {c: xt + (prev - xt) * p["x_" + c] for c in "rwkvag"}
        r, k, v = (mix[c] @ p[name + ".weight"].T for c, name in (("r", "receptance"), ("k", "key"), ("v", "value")))
        w = torch.exp(-torch.exp(-F.softplus(-(p["w0"] + torch.tanh(mix["w"] @ p["w1"]) @ p["w2"])) - 0.5))
        a = torch.sigmoid(p["a0"] + mix["a"] @ p["a1"] @ p["a2"])
        g = torch.sigmoid(mix["g"] @ p["g1"]) @ p["g2"]
        kk = (k * p["k_k"]).view(B, H, N)
        kappa = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k * (1 + (a - 1) * p["k_a"])
        r, k, v, w, a = (z.view(B, H, N) for z in (r, k, v, w, a))
        G = torch.diag_embed(w) - kappa[..., :, None] * (a * kappa)[..., None, :]
        S = S @ G + v[..., :, None] * k[..., None, :]
        o = (S @ r[..., None])[..., 0]
        o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + 64e-5)
        o = o * p["ln_x.weight"].view(H, N) + p["ln_x.bias"].view(H, N)
        o = o + (r * k * p["r_k"]).sum(-1, keepdim=True) * v
        ys.append((o.reshape(B, C) * g) @ p["output.weight"].T)
        prev = xt
    return torch.stack(ys, 1), (S, prev)


@pytest.mark.parametrize("regime", RWKV7_REGIMES)
@pytest.mark.parametrize("form", RWKV7.forms)
def test_rwkv7_layer_against_naive(form, regime):
    """Both forms against the official time mix by hand, from an empty state and from the state a
    prefix left (the token shift's last input included)."""
    model = rwkv7_model(regime)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, state = model(torch.randn(2, 6, D_MODEL, dtype=torch.float64), form="recurrent")
        for st in (None, state):
            y, (S, last) = model(x, st, form=form)
            y_ref, (S_ref, last_ref) = rwkv7_naive(model, x, st)
            assert rel_err(y, y_ref) <= 1e-10 and rel_err(S, S_ref) <= 1e-10 and torch.equal(last, last_ref)


RWKV7_FIXED_Y = [0.0297030030385485, 0.0495036196593315, 0.038007944729875, 0.00248356790594043,
                 0.0644878508137577, 0.265196885418854, 0.298247896198625, 0.142745965235698,
                 0.195527399225427, 0.123823964299588, -0.0261612389958126, -0.159607252458972]
RWKV7_FIXED_S = [0.301530711836971, 0.158396423211843, 0.215167170977037, 0.112964782029502]


@pytest.mark.parametrize("form", RWKV7.forms)
def test_rwkv7_numbers_of_the_official_demo(form):
    """Every parameter and the input set by formula (no RNG); RWKV7_FIXED_* are what the official
    demo's time mix (rwkv_v7_demo.py, its torch loop, float64, layer 0) returns for them: y at
    tokens 0, 5, 11 (first 4 channels) and the final state of head 1 (S[:2, :2]). They were computed
    outside the repository, with the demo's class and loop (commit 7384042f) loaded with these weights."""
    model = RWKV7(64, head_size=32, chunk_size=8).double()
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            p.copy_(0.5 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).view_as(p))
        x = torch.sin(torch.arange(12 * 64, dtype=torch.float64) * 0.3).view(1, 12, 64)
        y, (S, _) = model(x, form=form)
    assert torch.allclose(y[0, [0, 5, 11], :4].flatten(), torch.tensor(RWKV7_FIXED_Y, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(S[0, 1, :2, :2].flatten(), torch.tensor(RWKV7_FIXED_S, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("T", [1, 7, 8, 9, 23, 64, 65])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_rwkv7_chunked_every_length(T, chunk_size):
    """Ragged last chunks, one chunk, many chunks (T / L up to 65: seven doubling steps), from a state."""
    model = rwkv7_model("plain", chunk_size=chunk_size)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        _, state = model(torch.randn(2, 5, D_MODEL, dtype=torch.float64), form="recurrent")
        y, (S, _) = model(x, state, form="chunked")
        y_ref, (S_ref, _) = model(x, state, form="recurrent")
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(S, S_ref) <= 1e-10


def test_rwkv7_long_handoff():
    """A chunked prefill of 37 tokens, then 300 step() calls, each output against one chunked pass
    over all 337 tokens (chunk 16: the prefill ends mid-chunk, the steps cross 19 chunk boundaries)."""
    model = rwkv7_model("plain", chunk_size=16)
    x = torch.randn(2, 337, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y_full, (S_full, _) = model(x)
        y, state = model(x[:, :37])
        assert rel_err(y, y_full[:, :37]) <= 1e-10
        for t in range(37, 337):
            y_t, state = model.step(x[:, t], state)
            assert rel_err(y_t, y_full[:, t]) <= 1e-10, f"step {t}"
    assert rel_err(state[0], S_full) <= 1e-10 and torch.equal(state[1], x[:, -1])


RWKV7_CORE_EXTREMES = {  # log w, a: None is random (log w in the clamp's range)
    "w_min_a_one": (-math.exp(-0.5), 1.0), "w_min_a_zero": (-math.exp(-0.5), 0.0), "w_one_a_one": (0.0, 1.0),
    "random": (None, None)}


@pytest.mark.parametrize("case", RWKV7_CORE_EXTREMES)
def test_rwkv7_chunk_64_float32_at_the_clamp(case):
    """The numerics bound: chunk 64 (the largest allowed), every decay at the clamp (e^-39 over a
    chunk, factors e^+-19) or 1, a at 0 or 1 or random; T = 4096 float32 against float64."""
    log_w, a = RWKV7_CORE_EXTREMES[case]
    B, T, H, D = 1, 4096, 2, 16
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    kappa = F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    lw = -math.exp(-0.5) * torch.rand(B, T, H, D, generator=g) if log_w is None else torch.full((B, T, H, D), log_w)
    aa = torch.rand(B, T, H, D, generator=g) if a is None else torch.full((B, T, H, D), a)
    S0 = torch.randn(B, H, D, D, generator=g)
    with torch.no_grad():
        y, S = rwkv7.rwkv7_chunked(r, lw, k, v, kappa, aa, S0, 64)
        y_ref, S_ref = rwkv7.rwkv7_recurrent(r, lw, k, v, kappa, aa, S0.double())
    assert rel_err(y, y_ref) <= 1e-4 and rel_err(S, S_ref) <= 1e-4


@pytest.mark.parametrize("regime", ["w_min_a_one", "w_one_a_one"])
def test_rwkv7_16384_forward_and_backward_finite(regime):
    model = rwkv7_model(regime, torch.float32, chunk_size=64)
    x = torch.randn(1, 16384, D_MODEL, requires_grad=True)
    y, (S, _) = model(x)
    (y.square().mean() + S.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_rwkv7_init_as_official():
    """The official init (train_temp/src/model.py, layer 0, and generate_init_weight), re-derived
    here with its loops: token-shift mixes, w0, a0, k_k, k_a, r_k, zero LoRA downs and orthogonal
    ups with gain 0.1, r, k, v orthogonal with gains 1, 0.1, 1, output zero, ln_x 1 / 0 with eps
    64e-5; LoRA ranks of the released models; head size 64 (one head below d_model 64)."""
    C, N = 128, 64
    m = RWKV7(C)
    ddd = torch.tensor([i / C for i in range(C)])
    linear = torch.tensor([n / (C - 1) - 0.5 for n in range(C)])
    zigzag = torch.tensor([((n % N) - ((N - 1) / 2)) / ((N - 1) / 2) for n in range(C)])
    zigzag = zigzag * zigzag.abs()
    www = torch.tensor([-6 + 6 * (n / (C - 1)) ** (1 + 1 * 0.0 ** 0.3) for n in range(C)])
    expected = {"x_r": 1 - ddd ** 0.2, "x_w": 1 - ddd ** 0.9, "x_k": 1 - ddd ** 0.7, "x_v": 1 - ddd ** 0.7,
                "x_a": 1 - ddd ** 0.9, "x_g": 1 - ddd ** 0.2, "w0": www + 0.5 + zigzag * 2.5,
                "a0": -0.19 + zigzag * 0.3 + linear * 0.4, "k_k": 0.71 - linear * 0.1, "k_a": torch.full((C,), 1.02),
                "r_k": torch.full((2, N), -0.04), "ln_x.weight": torch.ones(C), "ln_x.bias": torch.zeros(C)}
    params = dict(m.named_parameters())
    for name, value in expected.items():
        assert torch.allclose(params[name].detach(), value, atol=1e-6), name
    for down, up in (("w1", "w2"), ("a1", "a2"), ("g1", "g2")):
        assert torch.equal(params[down], torch.zeros_like(params[down]))
        W = params[up].detach()  # [rank, C], rank <= C: orthonormal rows times 0.1
        assert torch.allclose(W @ W.T, 0.01 * torch.eye(W.shape[0]), atol=1e-5), up
    for name, gain in (("receptance", 1.0), ("key", 0.1), ("value", 1.0)):
        W = params[name + ".weight"].detach()
        assert torch.allclose(W @ W.T, gain ** 2 * torch.eye(C), atol=1e-5), name
    assert torch.equal(m.output.weight, torch.zeros(C, C)) and m.ln_x.eps == 64e-5 and m.n_head == 2
    assert all(params[n]._no_weight_decay for n in ("w1", "w2", "a1", "a2", "g1", "g2", "r_k"))  # official: no decay
    with torch.device("meta"):  # ranks only: 768 is the demo's 168M model, 2048 the train_temp README's 1.5B
        for d, ranks in ((768, (64, 64, 128)), (2048, (96, 96, 256))):
            big = RWKV7(d)
            assert (big.w1.shape[1], big.a1.shape[1], big.g1.shape[1]) == ranks and big.n_head == d // 64
    assert RWKV7(32).n_head == 1 and RWKV7(32).head_size == 32


@pytest.mark.parametrize("options", [dict(head_size=24), dict(head_size=1), dict(chunk_size=65), dict(chunk_size=0)])
def test_rwkv7_bad_options_are_errors(options):
    with pytest.raises(ValueError, match="head_size|chunk_size"):
        RWKV7(D_MODEL, **options)


# ----------------------------------------------------------------------------- attention.py: the KV cache, a naive RoFormer reference, relative rotary, extreme inputs, sdpa vs parallel, long sequences, init

from attention import Attention, rotary  # noqa: E402


def attention_model(dtype=torch.float64, n_head=2, seed=0):
    torch.manual_seed(seed)
    return Attention(D_MODEL, n_head=n_head).to(dtype)


def test_attention_cache_grows_one_per_step():
    m = attention_model()
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    state = None
    for t in range(9):
        _, state = m.step(x[:, t], state)
        assert all(s.shape == (2, 2, t + 1, D_MODEL // 2) for s in state)
    for form in Attention.forms:
        _, state = m(x[:, :5], form=form)
        assert state[0].shape[2] == 5
        _, state = m(x[:, 5:7], state, form=form)
        assert state[0].shape[2] == 7
        _, state = m.step(x[:, 7], state)
        assert state[0].shape[2] == state[1].shape[2] == 8


def attention_naive(m, x):
    """One head, written from the papers: R_t (RoFormer eq. 15: block-diagonal 2x2 rotations by
    t * 10000^(-2i/D)), q_t = R_t W_q x_t, k_s = R_s W_k x_s, y_t = sum_{s<=t} softmax(q_t.k_s/sqrt(D)) v_s."""
    Wq, Wk, Wv = m.qkv.weight.chunk(3, 0)
    B, T, D = x.shape
    ys = torch.zeros(B, T, D, dtype=x.dtype)
    for b in range(B):
        R = []
        for t in range(T):
            Rt = torch.zeros(D, D, dtype=x.dtype)
            for i in range(D // 2):
                a = t * 10000 ** (-2 * i / D)
                Rt[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=x.dtype)
            R.append(Rt)
        for t in range(T):
            q = R[t] @ Wq @ x[b, t]
            s = torch.stack([q @ (R[j] @ Wk @ x[b, j]) / math.sqrt(D) for j in range(t + 1)])
            w = torch.exp(s - s.max())
            w = w / w.sum()
            ys[b, t] = sum(w[j] * (Wv @ x[b, j]) for j in range(t + 1))
    return ys @ m.out.weight.T


@pytest.mark.parametrize("form", Attention.forms)
def test_attention_naive_single_head_reference(form):
    m = attention_model(n_head=1)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    ref = attention_naive(m, x)
    y, _ = m(x, form=form)
    assert rel_err(y, ref) <= 1e-12
    y1, s = m(x[:, :4], form=form)  # and through a cache
    y2, _ = m(x[:, 4:], s, form=form)
    assert rel_err(torch.cat([y1, y2], 1), ref) <= 1e-12


@pytest.mark.parametrize("shift", [1, 37, 1000, 16384])
def test_attention_rotary_relative_positions(shift):
    q, k = torch.randn(2, 3, 50, 16, dtype=torch.float64), torch.randn(2, 3, 50, 16, dtype=torch.float64)
    scores = rotary(q, 0) @ rotary(k, 0).transpose(-1, -2)
    shifted = rotary(q, shift) @ rotary(k, shift).transpose(-1, -2)
    assert rel_err(shifted, scores) <= 1e-12
    assert rel_err(scores, q @ k.transpose(-1, -2)) > 1e-2  # the rotation does something
    assert rel_err(rotary(q, shift).norm(dim=-1), q.norm(dim=-1)) <= 1e-14  # and is a rotation
    # a query at m and a key at n: only m - n matters
    a = rotary(q[:, :, :1], 5) @ rotary(k[:, :, :1], 2).transpose(-1, -2)
    b = rotary(q[:, :, :1], 5 + shift) @ rotary(k[:, :, :1], 2 + shift).transpose(-1, -2)
    assert rel_err(b, a) <= 1e-12


def test_attention_positions_are_absolute_in_the_cache():
    """A second forward must rotate at offset t: continuing from a cache equals one pass."""
    m = attention_model()
    x = torch.randn(1, 12, D_MODEL, dtype=torch.float64)
    y, _ = m(x, form="parallel")
    _, s = m(x[:, :5], form="sdpa")
    y2, _ = m(x[:, 5:], s, form="sdpa")
    assert rel_err(y2, y[:, 5:]) <= 1e-12
    y_wrong, _ = m(x[:, 5:], form="sdpa")  # same tokens without the past: differs
    assert rel_err(y_wrong, y[:, 5:]) > 1e-3


@pytest.mark.parametrize("form", ["sdpa", "parallel"])
def test_attention_no_nan_with_extreme_inputs(form):
    m = attention_model(torch.float32)
    x = (1e3 * torch.randn(2, 64, D_MODEL)).requires_grad_()
    _, s = m(x[:, :20].detach(), form=form)
    y, s2 = m(x[:, 20:], s, form=form)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    y0, _ = m(x[:, :1].detach(), form=form)  # the first row sees only itself: y = out(v_0)
    v0 = m.qkv(x[:, :1].detach()).chunk(3, -1)[2]
    assert rel_err(y0, m.out(v0)) <= 1e-6


def test_attention_sdpa_matches_parallel_with_cache_float32():
    m = attention_model(torch.float32)
    x = torch.randn(2, 40, D_MODEL)
    _, s = m(x[:, :17], form="recurrent")
    ya, sa = m(x[:, 17:], s, form="sdpa")
    yb, sb = m(x[:, 17:], s, form="parallel")
    assert rel_err(ya, yb) <= 1e-5 and all(rel_err(a, b) <= 1e-6 for a, b in zip(sa, sb))


def test_attention_cache_in_model_dtype_under_autocast():
    m = attention_model(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = m(torch.randn(1, 6, D_MODEL))
        y, s = m.step(torch.randn(1, D_MODEL), s)
    assert all(t.dtype == torch.float32 for t in s) and s[0].shape[2] == 7


@pytest.mark.parametrize("form", ["sdpa", "parallel"])
def test_attention_long_sequence_16384_float32(form):
    m = attention_model(torch.float32)
    with torch.no_grad():
        y, s = m(torch.randn(1, 16384, D_MODEL), form=form)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in s)


def test_attention_bad_head_count():
    with pytest.raises(ValueError, match="n_head"):
        Attention(32, n_head=3)
    with pytest.raises(ValueError, match="even"):
        Attention(24, n_head=8)  # head dim 3: rotary needs pairs
    assert Attention(512).n_head == 8


@pytest.mark.parametrize("form", Attention.forms)
def test_attention_dropout_only_in_training(form):
    """Weight dropout changes a training forward; in eval() the same weights give the very same output."""
    torch.manual_seed(0)
    plain, dropped = Attention(D_MODEL), Attention(D_MODEL, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, D_MODEL)
    y_plain, _ = plain.eval()(x, form=form)
    y_train, _ = dropped.train()(x, form=form)
    assert not torch.allclose(y_train, y_plain, atol=1e-3)
    assert torch.equal(dropped.eval()(x, form=form)[0], y_plain)  # same weights, same ops: bit-identical
    with pytest.raises(ValueError, match="dropout"):
        Attention(D_MODEL, dropout=1.0)


def test_attention_init_is_torch_default():
    """The docstring claims no init: the qkv and out projections keep nn.Linear's default."""
    torch.manual_seed(0)
    model = Attention(256)
    assert_torch_default(model.qkv, "qkv")
    assert_torch_default(model.out, "out")


# ----------------------------------------------------------------------------- rnn.py: torch.nn.RNNCell as reference, the Newton iteration cap, Newton's exact prefix, iteration counts, init
# (pytest -s prints the iteration counts)

import newton  # noqa: E402
from rnn import RNN, rnn_newton, rnn_recurrent  # noqa: E402


def rnn_naive(model, x, h):
    """torch.nn.RNNCell with W_hh = diag(w_h): the same layer, written by someone else."""
    H = model.w_h.numel()
    cell = torch.nn.RNNCell(x.shape[-1], H, nonlinearity="tanh").to(x.dtype)
    with torch.no_grad():
        cell.weight_ih.copy_(model.inp.weight), cell.bias_ih.copy_(model.inp.bias)
        cell.weight_hh.copy_(torch.diag(model.w_h)), cell.bias_hh.zero_()
    ys = []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        ys.append(model.out(h))
    return torch.stack(ys, 1), h


def rnn_hard(T, seed=0):
    """Strongly nonlinear, long memory: w_h in (0, 3) makes channels bistable (tanh(3 h) = h has
    three roots), so the solution flips between basins and Newton resolves it only slowly."""
    torch.manual_seed(seed)
    model = RNN(32).double()
    with torch.no_grad():
        model.w_h.mul_(3)
    return model, torch.randn(2, T, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64).tanh()


@pytest.mark.parametrize("form", RNN.forms)
def test_rnn_matches_torch_rnncell(form):
    torch.manual_seed(0)
    model = RNN(32).double()
    x, h0 = torch.randn(3, 50, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64).tanh()
    y, h = model(x, h0, form=form)
    y_ref, h_ref = rnn_naive(model, x, h0)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(h, h_ref) <= 1e-12


def test_rnn_cap_is_what_makes_it_exact():
    """Hundreds of Newton steps, never more than T, and still the recurrent form's outputs and
    gradients (implicit differentiation at the solution)."""
    T = 256
    model, x, h0 = rnn_hard(T)
    x.requires_grad_(), h0.requires_grad_()
    y, h = model(x, h0)
    k = model.stats["newton_iters"]
    print(f"\nrnn hard case, T={T}, float64: {k} Newton iterations")
    assert 50 < k <= T
    y_ref, h_ref = model(x, h0, form="recurrent")
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(h, h_ref) <= 1e-10
    gy = torch.randn_like(y)
    leaves = [x, h0] + list(model.parameters())
    grads = torch.autograd.grad((y * gy).sum() + h.sum(), leaves)
    ref = torch.autograd.grad((y_ref * gy).sum() + h_ref.sum(), leaves)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= 1e-8


@pytest.mark.parametrize("k", [1, 7, 64])
def test_rnn_first_k_steps_exact_after_k_iterations(k):
    """The guarantee behind the cap: k undamped Newton steps from any guess fix h_0 .. h_{k-1}."""
    model, x, h0 = rnn_hard(256)
    with torch.no_grad():
        u, w = model.inp(x), model.w_h
        h, iters = rnn_newton(u, w, h0, tol=0.0, cap=k)
        hs, s = [], h0
        for t in range(x.shape[1]):
            s = torch.tanh(u[:, t] + w * s)
            hs.append(s)
        h_ref = torch.stack(hs, 1)
    assert iters == k
    assert (h[:, :k] - h_ref[:, :k]).abs().max() <= 1e-12
    assert (h - h_ref).abs().max() > 1e-3  # not solved yet further on: the prefix is the guarantee


@pytest.mark.parametrize("dtype,most", [(torch.float32, 12), (torch.float64, 12)], ids=["f32", "f64"])
def test_rnn_iteration_counts_fresh_layer(dtype, most):
    """Fresh layer, x ~ N(0, 1): a handful of iterations, and the answer of the loop."""
    for T in (2048, 16384) if dtype == torch.float32 else (2048,):
        torch.manual_seed(0)
        model, x = RNN(32).to(dtype), torch.randn(1, T, 32, dtype=dtype)
        with torch.no_grad():
            y, _ = model(x)
            k = model.stats["newton_iters"]
            y_ref, _ = model(x, form="recurrent")
        print(f"\nrnn fresh layer, T={T}, {dtype}: {k} Newton iterations")
        assert k <= most and rel_err(y, y_ref) <= (1e-12 if dtype == torch.float64 else 1e-5)


# newton.py's kernel, on the CPU through Triton's interpreter (tiles of 8 steps by 8 channels there)

def spy_newton():
    """Wrap newton.rnn and newton.lstm; the set returned fills with the names of those called, so a test can
    see that the kernel, not rnn_newton or lstm_newton, solved."""
    seen = set()
    for name in ("rnn", "lstm"):
        solve = getattr(newton, name)
        setattr(newton, name, lambda *args, name=name, solve=solve: seen.add(name) or solve(*args))
    return seen


def check_newton_kernel_ragged(name, full=True, B=2, T=19, C=12, seed=0):
    """newton.rnn or newton.lstm against the loop in float64: T = 19 (the last tile ragged), C = 12 (a full and a
    partial block of channels), a random initial state, strong recurrent weights (many iterations)."""
    g = torch.Generator().manual_seed(seed)
    if name == "rnn":
        u, w = torch.randn(B, T, C, generator=g), 3 * torch.rand(C, generator=g)
        h0 = torch.randn(B, C, generator=g).tanh()
        h, k = newton.rnn(u, w, h0, 1e-6)
        ref = rnn_recurrent(u.double(), w.double(), h0.double())
    else:
        u, r = torch.randn(B, T, 4, C, generator=g), 5 * (2 * torch.rand(4, C, generator=g) - 1)
        s0 = torch.stack([torch.randn(B, C, generator=g), torch.randn(B, C, generator=g).tanh()], 1)
        h, k = newton.lstm(u, r, s0, 1e-6, full)
        c, ref, ss = s0[:, 0].double(), s0[:, 1].double(), []
        for t in range(T):
            c, ref = cell(u[:, t].double(), r.double(), c, ref)
            ss.append(torch.stack([c, ref], 1))
        ref = torch.stack(ss, 1)
    assert h.shape == ref.shape and rel_err(h, ref) <= 1e-5, (name, full, rel_err(h, ref))
    assert 1 <= k <= 8, k


def check_newton_kernel_iterations(name, full=True):
    """On one tile (B = 1, T = 8 = BLOCK_T, 8 channels) the kernel is rnn_newton's or lstm_newton's Newton: the same
    iteration count, over seeds and recurrent weights up to 1 and 3 (a wrong Jacobian still converges, slower)."""
    for seed in range(2):
        for scale in (1, 3):
            g = torch.Generator().manual_seed(seed)
            if name == "rnn":
                u, w, h0 = torch.randn(1, 8, 8, generator=g), scale * torch.rand(8, generator=g), torch.zeros(1, 8)
                got, ref = newton.rnn(u, w, h0, 1e-6)[1], rnn_newton(u, w, h0, 1e-6)[1]
            else:
                u, r = torch.randn(1, 8, 4, 8, generator=g), scale * (2 * torch.rand(4, 8, generator=g) - 1)
                s0 = torch.stack([torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g).tanh()], 1)
                got, ref = newton.lstm(u, r, s0, 1e-6, full)[1], lstm_newton(u, r, s0, 1e-6, full)[1]
            assert got == ref, (name, full, seed, scale, float(got), ref)


def check_newton_hard_float32(model, x, s0, device="cpu"):
    """A hard case (rnn_hard's or lstm_hard's model, input and state) in float32, parallel form against the
    recurrent one: outputs, final state and gradients w.r.t. the input, the initial state and every parameter, to
    float32's 1e-4. Returns the parallel form's iteration count."""
    model = model.to(device, torch.float32)

    def run(form):
        xf, sf = x.to(device, torch.float32).requires_grad_(), map_state(lambda t: t.to(device, torch.float32)
                                                                         .requires_grad_(), s0)
        y, state = model(xf, sf, form=form)
        loss = (y * gy).sum() + sum((t * (i + 2)).sum() for i, t in enumerate(tensors(state)))
        return [y, *tensors(state)], torch.autograd.grad(loss, [xf, *tensors(sf), *model.parameters()])
    gy = torch.randn(*x.shape[:2], model.out.out_features, generator=torch.Generator().manual_seed(3)).to(device)
    (out, grads), (ref, ref_grads) = run("parallel"), run("recurrent")
    for i, (o, r) in enumerate(zip(out + list(grads), ref + list(ref_grads))):
        assert rel_err(o, r) <= 1e-4, f"output/grad {i}: rel err {rel_err(o, r):.2e}"
    return float(model.stats["newton_iters"])


def test_rnn_newton_kernel_interpreted():
    """newton.py's kernel: the layer against its loop from a prefix's state (T = 21: three tiles, the last ragged;
    outputs, state, gradients), ragged channels, and rnn_hard at T = 20, where tiles need 5 to all 8 iterations
    (the cap that makes a tile exact)."""
    interpreted("import newton; seen = t.spy_newton(); t.check_form('rnn', 'parallel', torch.float32, 'cpu'); "
                "t.check_newton_kernel_ragged('rnn'); t.check_newton_kernel_iterations('rnn'); "
                "k = t.check_newton_hard_float32(*t.rnn_hard(20)); "
                "print(f'rnn hard case, T=20, float32, kernel: {k:.2f} Newton iterations per tile of 8'); "
                "assert 5 <= k <= 8, k; assert seen == {'rnn'}, seen")


@needs_cuda
def test_rnn_newton_kernel_cuda():
    """On the GPU (tiles of newton.PLAN): the kernel against rnn_newton and the loop at B=4, T=1000 (16 tiles, ragged
    channels), and rnn_hard at T=256 in float32 with gradients."""
    torch.manual_seed(0)
    u, w, h0 = (torch.randn(4, 1000, 200, device="cuda"), 2 * torch.rand(200, device="cuda"),
                torch.rand(4, 200, device="cuda"))
    h, k = newton.rnn(u, w, h0, 1e-6)
    assert rel_err(h, rnn_newton(u, w, h0, 1e-6)[0]) <= 1e-5 and rel_err(h, rnn_recurrent(u, w, h0)) <= 1e-5
    assert 1 <= float(k) <= newton.PLAN["rnn"][0]
    check_newton_hard_float32(*rnn_hard(256), device="cuda")


def test_rnn_init_as_documented():
    """w_h ~ U(0, 1), as the docstring says (every channel has memory, |dh_t/dh_{t-1}| < 1); W_x, b and
    W_o keep nn.Linear's default."""
    torch.manual_seed(0)
    model = RNN(64, d_hidden=4096)
    assert_uniform(model.w_h, 0.0, 1.0, "w_h")
    assert_torch_default(model.inp, "inp")
    assert_torch_default(model.out, "out")


# ----------------------------------------------------------------------------- lstm.py: torch.nn.LSTMCell as reference, the Newton iteration cap, Newton's exact prefix, exact vs diagonal Newton, init
# (pytest -s prints the iteration counts)

from lstm import LSTM, cell, lstm_newton  # noqa: E402


def lstm_naive(model, x, c, h):
    """torch.nn.LSTMCell (gate order i, f, g, o) with W_hh = diag(r) per gate: the same layer,
    written by someone else."""
    H = model.d_hidden
    ours = [0, 1, 3, 2]  # torch's i, f, g, o in our order i, f, o, g
    ref = torch.nn.LSTMCell(x.shape[-1], H).to(x.dtype)
    with torch.no_grad():
        ref.weight_ih.copy_(model.inp.weight.unflatten(0, (4, H))[ours].flatten(0, 1))
        ref.bias_ih.copy_(model.inp.bias.unflatten(0, (4, H))[ours].flatten())
        ref.weight_hh.copy_(torch.cat([torch.diag(model.r[g]) for g in ours]))
        ref.bias_hh.zero_()
    ys = []
    for t in range(x.shape[1]):
        h, c = ref(x[:, t], (h, c))
        ys.append(model.out(h))
    return torch.stack(ys, 1), (c, h)


def lstm_hard(T, r_scale=10.0, jacobian="full", seed=0):
    """Strongly nonlinear, long memory: recurrent weights up to r_scale, small inputs, forget bias
    4 (c remembers ~50 steps): h feeds back through saturated gates, and Newton crawls."""
    torch.manual_seed(seed)
    model = LSTM(32, jacobian=jacobian).double()
    with torch.no_grad():
        model.r.mul_(r_scale)
        model.inp.weight.mul_(0.35)
        model.inp.bias[32:64] += 3
    x = torch.randn(2, T, 32, dtype=torch.float64)
    return model, x, (torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64).tanh())


@pytest.mark.parametrize("form", LSTM.forms)
def test_lstm_matches_torch_lstmcell(form):
    torch.manual_seed(0)
    model = LSTM(32).double()
    x = torch.randn(3, 50, 32, dtype=torch.float64)
    s0 = (torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64).tanh())
    y, (c, h) = model(x, s0, form=form)
    y_ref, (c_ref, h_ref) = lstm_naive(model, x, *s0)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(c, c_ref) <= 1e-12 and rel_err(h, h_ref) <= 1e-12


# r up to 10: exact Newton takes 97 of 128 steps. The diagonal quasi-Newton is given r up to 5,
# where it needs all 128 (exact Newton: 22); at r up to 10 (T=256) it hits the cap ~1e-2 off: its
# diagonal Jacobian products overstate the true ones and amplify rounding (one more reason for full).
LSTM_HARD = [("full", 10.0), ("diag", 5.0)]


@pytest.mark.parametrize("jacobian,r_scale", LSTM_HARD)
def test_lstm_cap_is_what_makes_it_exact(jacobian, r_scale):
    """Nearly T Newton steps, never more, and still the recurrent form's outputs and
    gradients (implicit differentiation at the solution)."""
    T = 128
    model, x, s0 = lstm_hard(T, r_scale, jacobian)
    x.requires_grad_()
    s0 = tuple(t.requires_grad_() for t in s0)
    y, (c, h) = model(x, s0)
    k = model.stats["newton_iters"]
    print(f"\nlstm hard case, T={T}, float64, jacobian={jacobian}: {k} Newton iterations")
    assert 20 < k <= T
    y_ref, (c_ref, h_ref) = model(x, s0, form="recurrent")
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(c, c_ref) <= 1e-10 and rel_err(h, h_ref) <= 1e-10
    gy = torch.randn_like(y)
    leaves = [x, *s0] + list(model.parameters())
    grads = torch.autograd.grad((y * gy).sum() + c.sum() - h.sum(), leaves)
    ref = torch.autograd.grad((y_ref * gy).sum() + c_ref.sum() - h_ref.sum(), leaves)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= 1e-8


@pytest.mark.parametrize("jacobian,r_scale", LSTM_HARD)
@pytest.mark.parametrize("k", [1, 7, 64])
def test_lstm_first_k_steps_exact_after_k_iterations(k, jacobian, r_scale):
    """The guarantee behind the cap, for exact and quasi-Newton alike: k steps fix s_0 .. s_{k-1}."""
    model, x, (c, h) = lstm_hard(128, r_scale)
    full = jacobian == "full"
    with torch.no_grad():
        u, r = model.inp(x).unflatten(-1, (4, 32)), model.r
        s, iters = lstm_newton(u, r, torch.stack([c, h], 1), tol=0.0, full=full, cap=k)
        ref = []
        for t in range(x.shape[1]):
            c, h = cell(u[:, t], r, c, h)
            ref.append(torch.stack([c, h], 1))
        ref = torch.stack(ref, 1)
    assert iters == k
    assert (s[:, :k] - ref[:, :k]).abs().max() <= 1e-12
    assert (s - ref).abs().max() > 1e-3  # not solved yet further on: the prefix is the guarantee


def test_lstm_iteration_counts_fresh_layer(dtype=torch.float32):
    """Fresh layer, x ~ N(0, 1), T = 2048: exact Newton in a handful of iterations, the diagonal
    quasi-Newton in several times as many; both the answer of the loop."""
    counts = {}
    for jacobian in ("full", "diag"):
        torch.manual_seed(0)
        model, x = LSTM(32, jacobian=jacobian).to(dtype), torch.randn(1, 2048, 32, dtype=dtype)
        with torch.no_grad():
            y, _ = model(x)
            counts[jacobian] = model.stats["newton_iters"]
            y_ref, _ = model(x, form="recurrent")
        assert rel_err(y, y_ref) <= 1e-5
    print(f"\nlstm fresh layer, T=2048, {dtype}: Newton iterations {counts}")
    assert counts["full"] <= 12 < counts["diag"]


def test_lstm_newton_kernel_interpreted():
    """newton.py's kernel: the layer against its loop from a prefix's state (three tiles, the last ragged; outputs,
    state, gradients); with exact and diagonal Jacobians ragged channels and the reference's iteration counts; and
    lstm_hard at T = 20, where tiles need many of their 8 iterations."""
    interpreted("import newton; seen = t.spy_newton(); t.check_form('lstm', 'parallel', torch.float32, 'cpu')\n"
                "for full in (True, False):\n"
                "    t.check_newton_kernel_ragged('lstm', full)\n"
                "    t.check_newton_kernel_iterations('lstm', full)\n"
                "k = t.check_newton_hard_float32(*t.lstm_hard(20))\n"
                "print(f'lstm hard case, T=20, float32, kernel: {k:.2f} Newton iterations per tile of 8')\n"
                "assert 5 <= k <= 8, k\n"
                "assert seen == {'lstm'}, seen")


@needs_cuda
def test_lstm_newton_kernel_cuda():
    """On the GPU: the kernel against lstm_newton and the loop at B=4, T=1000, ragged channels, both Jacobians;
    lstm_hard at T=256 in float32 with gradients."""
    torch.manual_seed(0)
    u, r = torch.randn(4, 1000, 4, 200, device="cuda"), 2 * torch.rand(4, 200, device="cuda") - 1
    s0 = torch.stack([torch.randn(4, 200, device="cuda"), torch.rand(4, 200, device="cuda")], 1)
    c, h, ref = s0[:, 0], s0[:, 1], []
    for t in range(u.shape[1]):
        c, h = cell(u[:, t], r, c, h)
        ref.append(torch.stack([c, h], 1))
    ref = torch.stack(ref, 1)
    for full in (True, False):
        s, k = newton.lstm(u, r, s0, 1e-6, full)
        assert rel_err(s, lstm_newton(u, r, s0, 1e-6, full)[0]) <= 1e-5 and rel_err(s, ref) <= 1e-5
        assert 1 <= float(k) <= newton.PLAN["lstm"][0]
    for jacobian, r_scale in LSTM_HARD:
        check_newton_hard_float32(*lstm_hard(256, r_scale, jacobian), device="cuda")


@needs_cuda
@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_newton_kernel_in_a_cuda_graph(name):
    """The parallel form needs no host sync: captured in a CUDA graph, replayed on new inputs, it gives eager's
    outputs, state and iteration count."""
    model = make(name, torch.float32, "cuda")
    x, s0 = torch.randn(2, 300, D_MODEL, device="cuda"), None
    with torch.no_grad():
        model(x)  # kernels compiled and loaded before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, state = model(x)
            iters = model.stats["newton_iters"]
        x.copy_(torch.randn_like(x))
        graph.replay()
        y_ref, state_ref = model(x)
    for o, r in zip([y, *tensors(state)], [y_ref, *tensors(state_ref)]):
        assert torch.equal(o, r)
    assert torch.equal(iters, model.stats["newton_iters"])


def test_lstm_init_forget_bias_one_on_the_gate_that_keeps_c():
    """Gers et al. 2000: the forget gate's bias starts at 1. In the parameters: in the docstring's gate
    order [i, f, o, g] the f slice is 1, the other biases and W keep nn.Linear's default, r ~ U(-1, 1)
    as documented. In what the cell does: with W = 0 and r = 0 each gate is its bias, and two states
    that differ by 1 in c differ by f in the next c; f, the gate that multiplies c_{t-1}, is sigmoid(1)."""
    torch.manual_seed(0)
    H = 1024
    model = LSTM(64, d_hidden=H).double()
    b, bound = model.inp.bias.view(4, H), 1 / math.sqrt(64)
    assert (b[1] == 1).all(), "the forget slice of the bias is not 1"
    assert b[[0, 2, 3]].abs().max() <= bound, "a bias other than the forget gate's is not nn.Linear's default"
    assert_uniform(model.inp.weight, -bound, bound, "inp.weight")
    assert_uniform(model.r, -1.0, 1.0, "r")
    assert_torch_default(model.out, "out")
    with torch.no_grad():
        model.inp.weight.zero_()
        model.r.zero_()
        x, c = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64)
        h = torch.zeros(3, H, dtype=torch.float64)
        _, (c1, _) = model.step(x, (c, h))
        _, (c2, _) = model.step(x, (c + 1, h))
    forget = c2 - c1
    assert rel_err(forget, torch.full_like(forget, 1 / (1 + math.exp(-1)))) <= 1e-12, \
        f"c_{{t-1}} is multiplied by {forget.mean():.4f}, not sigmoid(1) = 0.7311"


# ----------------------------------------------------------------------------- train.py: a tiny run, checkpoints (latest and best), early stopping, bit-for-bit resume (and its best), Ctrl-C, the warmup lr, weight decay's groups, compile, clear errors, --help, DDP, sampling continues the state, MQAR, width matching, --mixer-args, --max-time, dropout, --report (CPU, seconds)

import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import train  # noqa: E402

TRAIN_TINY = ["--model", "linear_attention", "--device", "cpu", "--n-layer", "1", "--d-model", "32", "--block-size", "16",
              "--batch-size", "4", "--eval-iters", "1", "--eval-interval", "2", "--sample-len", "10", "--patience", "0"]


def train_corpus(n=20000):
    """Generated text: these tests need characters, not Shakespeare, so they run (never skip) on any checkout."""
    words, r = "to be or not that is the question whether tis nobler in the mind to suffer".split(), random.Random(0)
    return "\n".join(" ".join(r.choice(words) for _ in range(8)).capitalize() + "." for _ in range(n // 30))[:n]


@pytest.fixture
def train_data(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(train_corpus(), encoding="utf-8")
    return str(path)


def train_run(data, out, *extra):
    train.main(TRAIN_TINY + ["--data", data, "--out-dir", str(out), *extra])
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)


def train_same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_error_of(argv, capsys):
    """The message of the SystemExit that train.main(argv) must end in."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return str(e.value.code) + capsys.readouterr().err


def train_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_tiny_run_checkpoints_and_samples(train_data, tmp_path, capsys):
    ckpt = train_run(train_data, tmp_path / "out", "--max-iters", "3")
    out = capsys.readouterr().out
    assert out.startswith("cpu: small config") and "val " in out and "tok/s" in out
    assert ckpt["step"] == 3 and ckpt["vocab"] == "".join(sorted(set(open(train_data).read())))
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=True)  # loads without pickled code
    assert best["val"] == ckpt["best_val"] and best["step"] == ckpt["best_step"]
    sampled = out.split("sampled from best.pt")[1].split("-" * 40)[0]
    assert len(sampled.split("\n", 1)[1]) == 1 + 10 + 1, "no sample: the prompt, --sample-len characters, a newline"
    assert out.strip().splitlines()[-1].startswith("done: stopped on steps at step 3")


def test_train_resume_is_bit_for_bit(train_data, tmp_path, monkeypatch, capsys):
    whole = train_run(train_data, tmp_path / "a", "--max-iters", "4", "--dropout", "0.2")
    get_batch = train.get_batch

    def interrupt_at_2(data, i, *args):  # Ctrl-C as a KeyboardInterrupt in the middle of step 2
        if i == 2 and len(data) > 1000:
            raise KeyboardInterrupt
        return get_batch(data, i, *args)

    monkeypatch.setattr(train, "get_batch", interrupt_at_2)
    with pytest.raises(SystemExit) as e:
        train_run(train_data, tmp_path / "b", "--max-iters", "4", "--dropout", "0.2")
    assert e.value.code == 130 and "interrupted: saved" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train, "get_batch", get_batch)
    resumed = train_run(train_data, tmp_path / "b", "--max-iters", "4", "--resume")  # dropout 0.2 from the checkpoint
    assert resumed["step"] == 4 and train_same_weights(resumed["model"], whole["model"])
    assert resumed["best_val"] == whole["best_val"]
    assert "learning-rate schedule" not in capsys.readouterr().out  # the same schedule: nothing to say


def test_train_sigint_finishes_the_step_saves_and_exits_130(train_data, tmp_path, monkeypatch, capsys):
    get_batch = train.get_batch

    def sigint_at_1(data, i, *args):
        if i == 1 and len(data) > 1000:
            os.kill(os.getpid(), signal.SIGINT)
        return get_batch(data, i, *args)

    monkeypatch.setattr(train, "get_batch", sigint_at_1)
    with pytest.raises(SystemExit) as e:
        train_run(train_data, tmp_path / "c", "--max-iters", "5")
    assert e.value.code == 130 and "Ctrl-C" in capsys.readouterr().out
    assert torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["step"] == 2  # step 1 completed, then saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_train_resume_with_more_steps_says_the_schedule_changed(train_data, tmp_path, capsys):
    train_run(train_data, tmp_path, "--max-iters", "4", "--warmup", "2")
    capsys.readouterr()
    assert train_run(train_data, tmp_path, "--max-iters", "8", "--resume")["step"] == 8
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "learning-rate schedule" in ln]
    assert len(lines) == 1 and "--max-iters 8 (was 4)" in lines[0] and "step 4 gets lr 0.000" in lines[0], lines


def test_train_resume_keeps_the_best_of_both_legs(train_data, tmp_path, monkeypatch, capsys):
    """A resumed run knows its first leg's best: when the second leg never beats it, the final record, the checkpoint,
    the done line and the sample name step 2 and its val loss, and best.pt is left as the first leg wrote it."""
    vals = iter([3.0, 1.0, 2.0, 1.5, 1.2])  # evaluations at steps 0, 2, 4, then, resumed, 6 and 8
    monkeypatch.setattr(train, "evaluate", lambda *args: (next(vals), 0.5))
    train_run(train_data, tmp_path, "--max-iters", "4")
    best = (tmp_path / "best.pt").read_bytes()
    capsys.readouterr()
    ckpt = train_run(train_data, tmp_path, "--max-iters", "8", "--resume")
    assert next(vals, None) is None  # step 4 is not evaluated again
    final = train_log(tmp_path)[-1]
    assert (final["type"], final["steps"], final["best_val"], final["best_step"]) == ("final", 8, 1.0, 2), final
    assert (ckpt["best_val"], ckpt["best_step"]) == (1.0, 2) and (tmp_path / "best.pt").read_bytes() == best
    out = capsys.readouterr().out
    assert "sampled from best.pt (step 2)" in out and "best val 1.0000 at step 2," in out.strip().splitlines()[-1]


def test_train_compile_failure_falls_back_to_eager(train_data, tmp_path, monkeypatch, capsys):
    def broken(model, **kwargs):
        def fail(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    assert train_run(train_data, tmp_path / "d", "--max-iters", "2", "--compile")["step"] == 2
    assert "running eager" in capsys.readouterr().out


def test_train_compiles_by_default_on_cuda_only(train_data, tmp_path, monkeypatch):
    def compile_of(*flags):
        return train.get_config(train.parse_args(["--model", "rnn", "--out-dir", str(tmp_path / "none"), *flags]))[0].compile

    assert compile_of("--device", "cuda") is True and compile_of("--device", "cuda", "--no-compile") is False
    assert compile_of("--device", "cpu") is False and compile_of("--device", "cpu", "--compile") is True
    calls = []  # what --compile compiles, and with which mode (a pass-through: compiling for real takes minutes here)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append((fn, kwargs)) or fn)
    train_run(train_data, tmp_path / "e", "--max-iters", "2", "--compile")
    assert [type(fn).__name__ for fn, _ in calls] == ["LM"] and calls[0][1] == {"mode": train.COMPILE_MODE}


@needs_cuda
@pytest.mark.parametrize("name", PRESENT)
def test_train_compiled_steps_match_eager_cuda(name, train_data, tmp_path):
    """10 training steps of train.py compiled (train.COMPILE_MODE, CUDA graphs) against eager, bf16
    autocast, no dropout: the validation losses at steps 0, 5 and 10 agree to 2e-2 relative (the
    bf16 kernels round differently; 10 AdamW steps do not amplify that much, a wrong kernel does)."""
    args = ["--model", name, "--device", "cuda", "--n-layer", "2", "--d-model", "64", "--block-size", "64",
            "--batch-size", "8", "--max-iters", "10", "--eval-interval", "5", "--eval-iters", "2", "--log-interval", "5",
            "--sample-len", "0", "--dropout", "0", "--patience", "0", "--data", train_data]
    for flag, out in (("--no-compile", "eager"), ("--compile", "compiled")):
        train.main(args + [flag, "--out-dir", str(tmp_path / out)])
    eager, compiled = ([r["val_loss"] for r in train_log(tmp_path / out) if r["type"] == "eval"]
                       for out in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 3, (eager, compiled)
    assert all(abs(c - e) <= 2e-2 * abs(e) for c, e in zip(compiled, eager)), (compiled, eager)


def test_train_prefill_then_step_matches_forward():
    torch.manual_seed(0)
    model = train.LM(train.load_mixer("linear_attention"), 11, 2, 32).double().eval()
    idx = torch.randint(11, (2, 9))
    with torch.no_grad():
        full, _ = model(idx)
        logits, states = model(idx[:, :5])
        for t in range(5, 9):
            logits, states = model.step(idx[:, t], states)
            assert torch.allclose(logits, full[:, t], atol=1e-10)


@pytest.mark.parametrize("name,options", [("attention", {}), ("mamba2", dict(d_state=8, headdim=16, chunk_size=8))])
def test_train_sample_continues_the_state(name, options):
    """Greedy sampling: each sampled token is the argmax of one parallel pass over prompt + sample at its position.
    Planted in a scratch copy, each of these fails it: step() from an empty state at every token (both models), the
    prefill's state dropped (both), a KV cache that keeps the last 16 positions (attention). The prompt spans chunks."""
    torch.manual_seed(0)
    chars = "abcdefghijklmnopqrstuvwxyz ."
    model = train.LM(train.load_mixer(name), len(chars), 2, 32, mixer_args=options)  # float32: float64 convs are slow
    with torch.no_grad():  # weights that make the context matter (at init the tied embedding repeats a token)
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 * (0.1 if n == "wte.weight" else 3))
    prompt = "to be or not to be"
    text = train.sample(model, prompt, 40, chars, temperature=0)
    assert text.startswith(prompt) and len(text) == len(prompt) + 40 and len(set(text[len(prompt):])) >= 4
    idx = torch.tensor([[chars.index(c) for c in text]])
    with torch.no_grad():
        logits, _ = model.eval()(idx)
    expected = logits[0, len(prompt) - 1:-1].argmax(-1)
    assert "".join(chars[i] for i in expected) == text[len(prompt):]


def generation_lm(name, device="cpu"):
    """A 2-layer LM of width 32 with the small test options, and weights that make the context matter (at init the
    tied embedding repeats a token)."""
    torch.manual_seed(0)
    model = train.LM(train.load_mixer(name), 28, 2, 32, mixer_args=MODELS[name][1])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 * (0.1 if n == "wte.weight" else 3))
    return model.to(device)


def eager_decoding(model, idx, n, temperature, seed):
    """Decoding written out: the prompt in one pass, then step() on each sampled token (the argmax at temperature
    0, else softmax(logits / temperature) sampled by a generator seeded with seed)."""
    g, training = torch.Generator(device=idx.device).manual_seed(seed), model.training
    with torch.no_grad():
        logits, states = model.eval()(idx)
        logits, out = logits[:, -1], [idx]
        for _ in range(n):
            token = (logits.argmax(-1) if temperature == 0 else
                     torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=g)[:, 0])
            out.append(token[:, None])
            logits, states = model.step(token, states)
    model.train(training)
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", ["rnn", "lstm", "attention", "retnet", "mamba2"])
def test_train_generate_is_the_eager_decoding_loop(name):
    """On the CPU generate() runs eager: the loop's tokens for a batch of two prompts, at temperature 0 and 0.8 (the
    same draws), and the model left in the mode it came in."""
    model = generation_lm(name).train()
    idx = torch.randint(28, (2, 11), generator=torch.Generator().manual_seed(1))
    for temperature in (0, 0.8):
        out = train.generate(model, idx, 17, temperature, seed=5)
        assert out.shape == (2, 28) and torch.equal(out[:, :11], idx)
        assert torch.equal(out, eager_decoding(model, idx, 17, temperature, seed=5)), temperature
    assert model.training


@needs_cuda
@pytest.mark.parametrize("name", PRESENT)
def test_train_generate_graphed_gives_eager_tokens_cuda(name, monkeypatch):
    """generate() replaying one CUDA graph per token gives the tokens of eager decoding (cuda_graph=False), float32
    and bf16 autocast, temperature 0 and 0.8; every model but attention (its KV cache grows) is graphed."""
    model = generation_lm(name, "cuda")
    graphs = []
    step_graph = train.step_graph
    monkeypatch.setattr(train, "step_graph", lambda *args: graphs.append(1) or step_graph(*args))
    idx = torch.randint(28, (1, 23), device="cuda")
    for low in (False, True):
        for temperature in (0, 0.8):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
                eager = train.generate(model, idx, 40, temperature, seed=2, cuda_graph=False)
                graphed = train.generate(model, idx, 40, temperature, seed=2)
            assert torch.equal(graphed, eager), (low, temperature)
    assert len(graphs) == (0 if name == "attention" else 4), graphs


@pytest.mark.parametrize("content,message", [(None, "cannot read"), ("", "is empty"), ("x" * 50, "too short")])
def test_train_bad_data_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_text(content)
    assert message in train_error_of(TRAIN_TINY + ["--data", str(path), "--out-dir", str(tmp_path / "out")], capsys)


def test_train_cached_corpus_is_hash_checked_when_used(tmp_path, monkeypatch):
    text = train_corpus()
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "tinyshakespeare.txt").write_text(text, encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded again"))
    with pytest.raises(SystemExit) as e:
        train.get_data(None)
    assert "sha256" in str(e.value.code) and "delete it" in str(e.value.code)
    monkeypatch.setattr(train, "SHAKESPEARE_SHA256", hashlib.sha256(text.encode()).hexdigest())
    assert train.get_data(None) == text


TRAIN_BAD = [  # (flags, what the one-line error must name)
    (["--block-size", "0"], "--block-size must be >= 1"), (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "-1"], "--batch-size must be >= 1"), (["--n-layer", "0"], "--n-layer"),
    (["--d-model", "0"], "--d-model"), (["--eval-iters", "0"], "--eval-iters"), (["--eval-interval", "0"], "--eval-interval"),
    (["--log-interval", "0"], "--log-interval"), (["--max-iters", "-1"], "--max-iters"), (["--patience", "-1"], "--patience"),
    (["--lr", "0"], "--lr must be > 0"), (["--lr", "-0.001"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--dropout", "-0.1"], "--dropout"), (["--dropout", "1"], "--dropout"), (["--max-time", "0"], "--max-time"),
    (["--stop-acc", "1.5"], "--stop-acc must be in [0, 1]"), (["--stop-acc", "nan"], "--stop-acc"),
    (["--temperature", "-1"], "--temperature"), (["--prompt", "Z"], "--prompt"),
    (["--device", "gpu"], "--device gpu"), (["--device", "cuda:99"], "--device cuda:99"),
    (["--model", "mamba2", "--mixer-args", "d_state=-4"], "sizes must be >= 1, got d_state"),  # Mamba2's own ValueError
    (["--model", "linear_attention", "--mixer-args", "chunk_size=0"], "chunk_size"),
    (["--model", "attention", "--mixer-args", "n_head=0"], "n_head"),
    (["--model", "attention", "--mixer-args", "rope_base=0.0"], "loss is nan"),
]
if not CUDA:
    TRAIN_BAD.append((["--device", "cuda"], "--device cuda"))


@pytest.mark.parametrize("flags,message", TRAIN_BAD, ids=[" ".join(f) for f, _ in TRAIN_BAD])
def test_train_bad_arguments_are_one_line_errors_before_anything_is_written(train_data, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(TRAIN_TINY + ["--data", train_data, "--out-dir", str(tmp_path / "out"), *flags])
    assert isinstance(e.value.code, str) and message in e.value.code, e.value.code  # a message: exit status 1
    assert "\n" not in e.value.code.strip() and not (tmp_path / "out").exists()


def test_train_help_gives_every_flag_a_line_and_its_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    options = re.split(r"\n  (?=--)", capsys.readouterr().out.split("options:")[1])[1:]
    helps = {o.split()[0].rstrip(","): " ".join(o.split()) for o in options}
    assert len(helps) >= 25 and "--no-compile" in helps["--compile"]
    assert helps.pop("--model").endswith("(required)")
    assert all("(default: " in h for h in helps.values()), [f for f, h in helps.items() if "(default: " not in h]
    assert "GPU 64, CPU 16" in helps["--batch-size"] and "GPU on, CPU off" in helps["--compile"]


def test_train_never_overwrites_an_earlier_run(train_data, tmp_path, capsys):
    out = tmp_path / "run"
    train_run(train_data, out, "--max-iters", "2")
    files = {f: (out / f).read_bytes() for f in os.listdir(out)}
    msg = train_error_of(TRAIN_TINY + ["--data", train_data, "--out-dir", str(out)], capsys)
    assert "--resume" in msg and "--out-dir" in msg and "\n" not in msg.strip()
    msg = train_error_of(TRAIN_TINY + ["--data", train_data, "--out-dir", str(out), "--resume", "--batch-size", "0"],
                         capsys)
    assert "--batch-size" in msg  # and the log is not truncated:
    assert {f: (out / f).read_bytes() for f in files} == files


def test_train_never_overwrites_a_directory_that_holds_only_a_log(train_data, tmp_path, capsys):
    """A run killed before its first checkpoint leaves log.jsonl alone: a new run there stops with the one-line
    message and writes nothing, the log byte for byte as it was."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps(dict(type="start", step=0, model="linear_attention")) + "\n")
    log = (out / "log.jsonl").read_bytes()
    msg = train_error_of(TRAIN_TINY + ["--data", train_data, "--out-dir", str(out), "--max-iters", "2"], capsys)
    assert "holds an earlier run (log.jsonl)" in msg and "--resume" in msg and "\n" not in msg.strip()
    assert os.listdir(out) == ["log.jsonl"] and (out / "log.jsonl").read_bytes() == log


def test_train_corrupt_checkpoint_is_named(train_data, tmp_path, capsys):
    out = tmp_path / "run"
    train_run(train_data, out, "--max-iters", "2")
    whole = (out / "ckpt.pt").read_bytes()
    for broken in (whole[:len(whole) // 2], b"not a checkpoint"):
        (out / "ckpt.pt").write_bytes(broken)
        msg = train_error_of(TRAIN_TINY + ["--data", train_data, "--out-dir", str(out), "--resume"], capsys)
        assert "ckpt.pt is corrupt" in msg and "\n" not in msg.strip()


def test_train_stops_early_and_samples_from_the_best(train_data, tmp_path, monkeypatch, capsys):
    vals = iter([3.0, 2.0, 2.5, 1.0, 1.5, 1.6, 1.7, 0.5, 0.6])  # evaluations at steps 0, 2, 4, ...
    monkeypatch.setattr(train, "evaluate", lambda *args: (next(vals), 0.5))
    sampled_with = []
    monkeypatch.setattr(train, "sample", lambda model, *a, **k: sampled_with.append(model.state_dict()) or "x")
    ckpt = train_run(train_data, tmp_path / "a", "--max-iters", "30", "--patience", "2")
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    assert ckpt["step"] == 10 and best["step"] == 6 and best["val"] == 1.0  # 1.5 and 1.6 at steps 8, 10: stop
    assert train_same_weights(sampled_with[0], best["model"]) and not train_same_weights(best["model"], ckpt["model"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done: stopped on patience at step 10") and "best val 1.0000 at step 6" in last
    ckpt = train_run(train_data, tmp_path / "a", "--max-iters", "14", "--resume", "--patience", "0")  # past the stop
    assert ckpt["step"] == 14 and ckpt["best_step"] == 14 and ckpt["best_val"] == 0.5  # 1.7 at 12, 0.5 at 14
    vals = iter([3.0, 2.0, 2.5, 2.4])
    default = TRAIN_TINY[:TRAIN_TINY.index("--patience")] + ["--data", train_data, "--max-iters", "30"]
    train.main(default + ["--out-dir", str(tmp_path / "b")])  # text: --patience 1 by default
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 4
    assert train.get_config(train.parse_args(default + ["--task", "mqar", "--out-dir", str(tmp_path / "c")]))[0].patience == 0


def test_train_stops_once_the_accuracy_is_reached(train_data, tmp_path, monkeypatch, capsys):
    accs = iter([0.1, 0.5, 0.98, 0.97, 0.99, 1.0, 1.0])  # evaluations at steps 0, 2, 4, ...
    monkeypatch.setattr(train, "evaluate", lambda *args: (1.0, next(accs)))
    ckpt = train_run(train_data, tmp_path / "a", "--max-iters", "30", "--stop-acc", "0.99")
    assert ckpt["step"] == 8 and ckpt["acc"] == 0.99  # 0.98 at step 4 is not enough
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: stopped on accuracy at step 8")
    final = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[-1])
    assert final["type"] == "final" and final["stop"] == "accuracy" and final["steps"] == 8
    accs = iter([1.0] * 20)
    assert train_run(train_data, tmp_path / "b", "--max-iters", "6")["step"] == 6  # 0 by default: never


def test_train_ddp_two_processes_match_one(train_data, tmp_path):
    """torchrun with 2 gloo processes, each half of every batch, against one process with the whole batch."""
    argv = TRAIN_TINY + ["--model", "attention", "--data", train_data, "--max-iters", "4", "--sample-len", "0"]
    train.main(argv + ["--out-dir", str(tmp_path / "one")])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--monitor-interval=0.1",
                          os.path.join(HERE, "train.py"), *argv, "--out-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cpu x 2 processes" in run.stdout and "; 2 sequences per process" in run.stdout  # each half of a batch
    assert run.stdout.count("done: stopped") == 1  # rank 0 alone prints
    one, two = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    assert [(r["type"], r.get("step")) for r in one] == [(r["type"], r.get("step")) for r in two]
    for a, b in zip(one, two):  # float32 sums in another order: 1e-6 relative (measured: 7e-8); a bug moves them 1e-3
        for k in ("train_loss", "val_loss", "acc", "best_val"):
            if a.get(k) is not None or b.get(k) is not None:
                assert abs(a[k] - b[k]) <= 1e-6 * abs(a[k]), (k, a, b)
    w1, w2 = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("one", "two"))
    assert all(rel_err(w2[k], w1[k]) <= 1e-6 for k in w1)  # measured: 1e-8


def test_train_ddp_ctrl_c_saves_at_one_step_and_leaves_the_group(train_data, tmp_path):
    """A terminal's Ctrl-C under torchrun (SIGINT to the whole session): both processes stop at the same log line, rank
    0 saves there, and each leaves through end_process; a bare sys.exit there could abort in gloo's teardown."""
    argv = TRAIN_TINY + ["--data", train_data, "--max-iters", "2000", "--log-interval", "2", "--sample-len", "0",
                         "--out-dir", str(tmp_path)]
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--monitor-interval=0.1", os.path.join(HERE, "train.py"), *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in run.stdout:
            if line.startswith("step     6"):
                os.killpg(run.pid, signal.SIGINT)
                break
        out = run.communicate(timeout=120)[0]
    finally:  # a hang or a failure here must not leave torchrun and its workers running
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    # torchrun itself ends on the signal with a traceback of its own (SignalException) and rc 1: no other traceback
    assert "terminate called" not in out and out.count("Traceback") == out.count("SignalException: Process"), out
    assert "done: stopped" not in out  # no final line, no sample: the run is to be resumed
    saved = [line for line in out.splitlines() if line.startswith("interrupted: saved")]
    assert len(saved) == 1, out[-3000:]  # rank 0 alone prints
    step = int(saved[0].split(" at step ")[1].split(";")[0])
    assert 6 < step < 2000 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step


TRAIN_MQAR = TRAIN_TINY + ["--task", "mqar", "--num-pairs", "3", "--mqar-vocab", "16"]


def test_train_unknown_model_lists_the_models(capsys):
    msg = train_error_of(["--model", "transformer_xl"], capsys)
    assert "invalid choice" in msg and "linear_attention" in msg and "mamba2" in msg


def test_train_missing_model_file_is_a_clear_error(train_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train.MODELS, "ghost", "Ghost")
    argv = TRAIN_TINY + ["--model", "ghost", "--data", train_data, "--out-dir", str(tmp_path)]
    assert "ghost.py is not in" in train_error_of(argv, capsys)


def test_train_resume_without_checkpoint_is_a_clear_error(train_data, tmp_path, capsys):
    argv = TRAIN_TINY + ["--data", train_data, "--out-dir", str(tmp_path / "none"), "--resume"]
    assert "no checkpoint" in train_error_of(argv, capsys)


def test_train_no_model_is_a_clear_error(capsys):
    assert "--model" in train_error_of([], capsys)


def test_train_mqar_batch_is_recall_and_a_function_of_seed_and_i():
    P, V, B = 6, 40, 8
    x, y = train.get_mqar_batch(3, 7, 32, B, P, V, "cpu")
    assert torch.equal(x, train.get_mqar_batch(3, 7, 32, B, P, V, "cpu")[0])
    assert not torch.equal(x, train.get_mqar_batch(4, 7, 32, B, P, V, "cpu")[0])
    assert not torch.equal(x, train.get_mqar_batch(3, 8, 32, B, P, V, "cpu")[0])
    for xb, yb in zip(x.tolist(), y.tolist()):
        keys, values = xb[0:2 * P:2], xb[1:2 * P:2]
        assert len(set(keys)) == P and all(k < V // 2 <= v < V for k, v in zip(keys, values))
        queries = [t for t in range(len(yb)) if yb[t] != -100]
        assert len(queries) == P and all(t >= 2 * P and t % 2 == 0 for t in queries)
        assert sorted(xb[t] for t in queries) == sorted(keys)  # each key asked once, after the pairs
        assert all(xb.count(k) == 2 for k in keys)  # and nowhere else
        assert all(yb[t] == values[keys.index(xb[t])] for t in queries)  # the answer is the key's value


def test_train_mqar_run_logs_accuracy_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    def run(out, *extra):
        train.main(TRAIN_MQAR + ["--out-dir", str(out), "--max-iters", "4", *extra])
        return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)

    whole = run(tmp_path / "a", "--dropout", "0.1")
    out = capsys.readouterr().out
    assert "| acc " in out and "-" * 40 not in out  # accuracy printed, no sample
    log = train_log(tmp_path / "a")
    assert [r["step"] for r in log if r["type"] == "eval"] == [0, 2, 4] and log[-1]["type"] == "final"
    assert log[-1]["task"] == "mqar" and log[-1]["stop"] == "steps" and log[-1]["acc"] == whole["acc"]
    assert 0 <= whole["acc"] <= 1 and whole["args"]["task"] == "mqar" and whole["args"]["dropout"] == 0.1
    get_mqar_batch = train.get_mqar_batch

    def interrupt_at_2(i, *args):
        if i == 2:
            raise KeyboardInterrupt
        return get_mqar_batch(i, *args)

    monkeypatch.setattr(train, "get_mqar_batch", interrupt_at_2)
    with pytest.raises(SystemExit):
        run(tmp_path / "b", "--dropout", "0.1")
    monkeypatch.setattr(train, "get_mqar_batch", get_mqar_batch)
    resumed = run(tmp_path / "b", "--resume")  # --dropout 0.1 comes back from the checkpoint
    assert resumed["step"] == 4 and train_same_weights(resumed["model"], whole["model"])
    assert resumed["acc"] == whole["acc"] and resumed["best_val"] == whole["best_val"]
    assert [r["step"] for r in train_log(tmp_path / "b") if r["type"] == "eval"] == [0, 2, 4]  # appended, step 2 once
    no_dropout = run(tmp_path / "c")
    assert not train_same_weights(no_dropout["model"], whole["model"])


def test_train_start_and_final_records_have_the_study_fields_and_the_state_size(tmp_path, capsys):
    """deltanet at d_model 32: 4 heads of an 8 x 8 matrix and its short conv's last 3 inputs of q, k, v (3 x 96);
    conv-free, the matrix alone; attention's K and V grow with the tokens read."""
    argv = TRAIN_MQAR + ["--model", "deltanet", "--n-layer", "2", "--max-iters", "1", "--lr", "0.003"]
    train.main(argv + ["--seed", "5", "--out-dir", str(tmp_path / "a")])
    start, *_, final = train_log(tmp_path / "a")
    assert final["state_size"] == 4 * 8 * 8 + 3 * 3 * 32 and "state 544 numbers per layer" in capsys.readouterr().out
    # the first line already names the run, so that one killed before its final line is still reported
    assert start["type"] == "start" and start["step"] == 0 and all(final[k] == v for k, v in start.items()
                                                                     if k not in ("type", "step"))
    assert (final["lr"], final["block_size"], final["batch_size"], final["num_pairs"], final["seed"]) == (0.003, 16, 4,
                                                                                                        3, 5)
    train.main(argv + ["--mixer-args", "conv_size=1", "--out-dir", str(tmp_path / "b")])
    assert train_log(tmp_path / "b")[-1]["state_size"] == 4 * 8 * 8
    attn = train.LM(train.load_mixer("attention"), 16, 2, 32)
    assert train.state_size(attn, 16) == 2 * 16 * 32 and train.state_size(attn.eval(), 40) == 2 * 40 * 32
    assert not attn.training and train.state_size(attn.train(), 8) and attn.training  # its mode restored


def test_train_mqar_needs_room_for_the_queries(tmp_path, capsys):
    argv = TRAIN_MQAR + ["--num-pairs", "5", "--out-dir", str(tmp_path / "out")]  # 4 * 5 > block 16
    assert "4 * num_pairs <= --block-size" in train_error_of(argv, capsys)


def test_train_dropout_reaches_a_mixer_that_takes_one():
    attn = train.load_mixer("attention")
    assert train.LM(attn, 11, 1, 32, dropout=0.3).blocks[0].mixer.dropout == 0.3
    assert train.LM(attn, 11, 1, 32, dropout=0.3, mixer_args={"dropout": 0.1}).blocks[0].mixer.dropout == 0.1
    train.LM(train.load_mixer("mamba"), 11, 1, 32, dropout=0.3)  # takes none: not passed


def test_train_dropout_is_off_in_eval_and_step_still_matches():
    torch.manual_seed(0)
    model = train.LM(train.load_mixer("linear_attention"), 11, 2, 32, dropout=0.5).double()
    idx = torch.randint(11, (2, 9))
    with torch.no_grad():
        assert not torch.equal(model(idx)[0], model(idx)[0])  # training: dropout
        model.eval()
        full, _ = model(idx)
        assert torch.equal(full, model(idx)[0])
        logits, states = model(idx[:, :8])
        assert torch.allclose(model.step(idx[:, 8], states)[0], full[:, 8], atol=1e-10)


def test_train_width_matching(tmp_path, capsys):
    for name in ("mamba", "rnn", "attention"):
        d, n, target = train.match_width(train.load_mixer(name), 65, 2, 128, {})
        assert d % 16 == 0 and abs(n - target) <= 0.1 * target, (name, d, n, target)
    assert train.match_width(train.load_mixer("attention"), 65, 2, 128, {})[0] == 128
    argv = TRAIN_MQAR + ["--model", "rnn", "--max-iters", "0"]
    del argv[argv.index("--d-model"):argv.index("--d-model") + 2]
    train.main(argv + ["--out-dir", str(tmp_path / "a")])
    d = train.match_width(train.load_mixer("rnn"), 16, 1, 128, {})[0]
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["args"]["d_model"] == d  # resume keeps it
    assert "d_model=matched" in capsys.readouterr().out
    train.main(argv + ["--out-dir", str(tmp_path / "b"), "--d-model", "48"])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["args"]["d_model"] == 48


def test_train_mixer_args_reach_the_constructor(tmp_path, capsys):
    parsed = train.parse_mixer_args("d_state=8, jacobian=diag,A_init_range=(1, 16)")
    assert parsed == {"d_state": 8, "jacobian": "diag", "A_init_range": (1, 16)}
    argv = TRAIN_MQAR + ["--model", "mamba", "--max-iters", "0", "--out-dir", str(tmp_path / "a")]
    train.main(argv + ["--mixer-args", "d_state=8"])
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    argv[-1] = str(tmp_path / "b")
    assert ckpt["model"]["blocks.0.mixer.A_log"].shape == (2 * 32, 8) and ckpt["args"]["mixer_args"] == "d_state=8"
    msg = train_error_of(argv + ["--mixer-args", "d_sate=8"], capsys)
    assert "d_sate" in msg and "Mamba takes" in msg
    assert "expected k=v" in train_error_of(argv + ["--mixer-args", "d_state"], capsys)


def test_train_max_time_stops_on_time_and_anneals(tmp_path, capsys):
    argv = TRAIN_MQAR + ["--max-iters", "100000", "--max-time", "0.5", "--eval-interval", "100000",
                         "--log-interval", "100000", "--out-dir", str(tmp_path)]
    train.main(argv)
    assert "stopped on time" in capsys.readouterr().out
    ckpt, final = torch.load(tmp_path / "ckpt.pt", weights_only=False), train_log(tmp_path)[-1]
    assert 0 < ckpt["step"] < 100000 and ckpt["train_time"] >= 0.5 and final["stop"] == "time"
    assert train.get_lr(500, 1.0, 10, 1000, time_frac=1.0) == pytest.approx(0.1)  # the clock ends the schedule
    assert train.get_lr(500, 1.0, 10, 1000, time_frac=0.0) > 0.5


def test_train_warmup_then_cosine_as_the_optimizer_sees_it(train_data, tmp_path, monkeypatch):
    """The lr of each optimizer step in both groups, as the loop sets it: lr / warmup at step 0, lr at step
    warmup - 1, then the cosine from lr down towards lr / 10 at max_iters (written out here, not get_lr's)."""
    seen, make_optimizer = [], train.make_optimizer

    def spy(model, lr):
        optimizer = make_optimizer(model, lr)
        optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", spy)
    lr, warmup, steps = 0.01, 3, 8
    train_run(train_data, tmp_path, "--max-iters", str(steps), "--warmup", str(warmup), "--lr", str(lr))
    expected = [lr * (s + 1) / warmup if s < warmup
                else lr / 10 + 0.9 * lr * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))) / 2
                for s in range(steps)]
    assert len(seen) == steps and all(len(group_lrs) == 2 for group_lrs in seen), seen
    for group in (0, 1):
        assert [s[group] for s in seen] == pytest.approx(expected, rel=1e-12), (group, seen)
    assert seen[0][0] == pytest.approx(lr / warmup) and seen[warmup - 1][0] == pytest.approx(lr)


@pytest.mark.parametrize("name,mixer", [
    ("rwkv7", {"receptance.weight", "key.weight", "value.weight", "output.weight"}),  # not the LoRAs, not r_k
    ("mamba", {"in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"}),  # not A_log
])
def test_train_weight_decay_on_the_matrices_not_marked(name, mixer):
    """AdamW's groups on a real LM: weight decay 0.1 on exactly the matrices (the embedding, the MLP's, the mixer's
    named here) and 0 on the rest: every vector and scalar, and the matrices the mixer marks _no_weight_decay."""
    model = train.LM(train.load_mixer(name), 11, 1, 64)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(p.dim() >= 2 and getattr(p, "_no_weight_decay", False) for p in model.parameters())  # marks to obey
    decayed = {"wte.weight", "blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight"} | {f"blocks.0.mixer.{n}" for n in mixer}
    groups = [(g["weight_decay"], {names[id(p)] for p in g["params"]})
              for g in train.make_optimizer(model, 1e-3).param_groups]
    assert groups == [(0.1, decayed), (0.0, set(names.values()) - decayed)], groups


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
def test_train_commit_of_names_uncommitted_code(tmp_path):
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)  # noqa
    assert train.commit_of(tmp_path) == ""  # no repository
    git("init", "-q")
    (tmp_path / "m.py").write_text("x = 1\n")
    git("add", "m.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert len(head) >= 7 and train.commit_of(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("data")  # not the code: still clean
    assert train.commit_of(tmp_path) == head
    (tmp_path / "m.py").write_text("x = 2\n")
    assert train.commit_of(tmp_path) == head + " (modified)"


@pytest.fixture
def figures(monkeypatch):
    """The figures bench.py --report saves, by file name, to read their lines; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    saved, savefig = {}, Figure.savefig

    def spy(fig, path, **kw):
        saved[os.path.basename(path)] = fig
        return savefig(fig, path, **kw)
    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def test_train_report_tabulates_the_runs(train_data, tmp_path, capsys, figures):
    runs = tmp_path / "runs"
    train_run(train_data, runs / "text", "--max-iters", "2")
    train.main(TRAIN_MQAR + ["--max-iters", "2", "--out-dir", str(runs / "recall")])
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "log.jsonl").write_text(json.dumps(dict(type="eval", step=0)) + "\n")
    capsys.readouterr()
    importlib.import_module("bench").main(["--report", str(runs)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and rows[1].startswith("| recall | linear_attention | mqar |")  # then the recall table
    assert rows[2].startswith("| text | linear_attention | text |") and "unfinished" in out and "left out" in out
    if figures is None:  # no figure, and the report says why (CI installs matplotlib: the figures are checked there)
        assert "matplotlib is not installed" in out
        return
    by_time, by_tokens = figures["showdown.png"].axes  # val loss against time, and against tokens
    evals = [json.loads(line) for line in open(runs / "text" / "log.jsonl") if '"eval"' in line]
    assert [list(line.get_xdata()) for line in by_time.get_lines()] == [[r["train_time"] for r in evals]]
    assert [list(line.get_xdata()) for line in by_tokens.get_lines()] == [[r["tokens"] for r in evals[1:]]]
    assert evals[0]["tokens"] == 0 and evals[-1]["tokens"] == 2 * 4 * 16 and by_tokens.get_xscale() == "log"


def test_train_report_takes_a_cut_runs_best_evaluation_not_its_last(tmp_path, capsys):
    """Text runs cut before their final line (killed, or still running): the report's best val loss and the seeds
    table's step of it are each run's best evaluation's (1.5 at step 100, 1.7 at 200), not its last."""
    config = dict(model="attention", task="text", params=123456, d_model=64, n_layer=2, mixer_args={}, lr=1e-3,
                  block_size=32, batch_size=8, num_pairs=None, state_size=4096)
    for name, seed, vals in (("cut", 1337, [3.0, 1.5, 2.0]), ("cut_s2", 1338, [3.0, 1.8, 1.7, 1.75])):
        evals = [dict(type="eval", step=100 * i, tokens=25600 * i, train_time=1.0 * i, train_loss=v, val_loss=v,
                      acc=0.4, tok_s=None) for i, v in enumerate(vals)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [dict(type="start", step=0, seed=seed, **config)] + evals))
    importlib.import_module("bench").main(["--report", str(tmp_path)])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert [row[6] for row in rows[1:3]] == ["1.5000", "1.7000"]  # best val loss
    assert [row[8] for row in rows[1:3]] == ["cut at 200", "cut at 300"]  # stopped on
    assert rows[4] == ["attention", "cut, cut_s2", "1.6000", "1.5000", "1.7000", "100, 200"], rows


def test_train_report_spreads_the_seeds_of_each_text_configuration(capsys):
    def run(name, best_val, best_step, model="attention", lr=1e-3):
        return name, dict(model=model, d_model=64, n_layer=2, lr=lr, block_size=32, batch_size=8, best_val=best_val,
                          best_step=best_step)
    importlib.import_module("bench").report_seeds([
        run("attn", 1.44, 2750), run("rnn_s2", 1.47, 2000, "rnn"), run("attn_s2", 1.43, 2250),
        run("attn_lr3e-3", 1.30, 500, lr=3e-3),  # another configuration, one run: no row
        run("rnn", 1.46, 1750, "rnn"), run("attn_s3", 1.45, 2250), run("mamba", 1.51, 750, "mamba")])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert rows[1:] == [["attention", "attn, attn_s2, attn_s3", "1.4400", "1.4300", "1.4500", "2750, 2250, 2250"],
                        ["rnn", "rnn_s2, rnn", "1.4650", "1.4600", "1.4700", "2000, 1750"]]


def test_train_report_picks_the_best_lr_of_each_mqar_configuration(tmp_path, capsys, figures):
    def run(name, accs, lr, state=1600, model="deltanet", mixer_args=None, new=True):  # accs: evals every 100 steps
        (tmp_path / name).mkdir()
        final = dict(type="final", model=model, task="mqar", params=123456, d_model=64, n_layer=2,
                     mixer_args=mixer_args or {}, tok_s=1e5, best_val=0.1, acc=accs[-1], stop="steps")
        if new:
            final.update(lr=lr, block_size=64, batch_size=16, num_pairs=4, state_size=state)
        lines = [dict(type="eval", step=100 * i, acc=a, val_loss=1 - a, train_time=i) for i, a in enumerate(accs)]
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines + [final]))

    run("dn_1e-3", [0.2, 0.995, 0.9], 1e-3)  # at 0.99 once, but its final accuracy is the lower
    run("dn_3e-3", [0.1, 0.98, 0.992, 0.999], 3e-3)
    run("dn_3e-4", [0.1, 0.991], 3e-4)  # at 0.99 first: 0.991 and 0.999 above the stop are both "recalls"
    run("dn_1e-4", [0.1, 0.990], 1e-4)  # as soon: the more accurate wins, whichever is read first
    run("free_1e-3", [0.5, 0.9, 0.9, 0.995, 1.0], 1e-3, 1024, mixer_args={"conv_size": 1})
    run("free_3e-3", [0.5, 0.995, 1.0, 1.0, 1.0], 3e-3, 1024, mixer_args={"conv_size": 1})  # as good, sooner
    run("attn", [0.3, 1.0], 1e-3, 2 * 64 * 64, "attention")
    run("old", [0.0, 0.05], None, model="rnn", new=False)  # an older train.py: no lr, state_size, ...
    run("plateau", [0.0, 0.3, 0.5, 0.495, 0.51, 0.5], 1e-3, 64, "lstm")  # flat from step 200
    (tmp_path / "cut").mkdir()  # killed at step 200: its start line and evaluations, no final line
    start = dict(type="start", step=0, model="lstm", task="mqar", params=123456, d_model=64, n_layer=2, mixer_args={},
                 lr=3e-3, block_size=64, batch_size=16, num_pairs=4, state_size=64)
    lines = [start] + [dict(type="eval", step=100 * i, tokens=102400 * i, acc=a, val_loss=1 - a, train_time=i)
                       for i, a in enumerate([0.0, 0.4, 0.6])]
    (tmp_path / "cut" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    importlib.import_module("bench").main(["--report", str(tmp_path)])
    out = capsys.readouterr().out
    table = out.split("| model | mixer args |")[1]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]
    # model, mixer args, d_model, layers, block, pairs, state, params, accuracy, lr, steps to 0.99, flat from,
    # stopped on, runs; the lstm's cut run is its best (0.6 at its last evaluation, against 0.5)
    assert rows == [["attention", "-", "64", "2", "64", "4", "8,192", "0.12M", "1.000", "0.001", "100", "100",
                     "steps", "1"],
                    ["deltanet", "conv_size=1", "64", "2", "64", "4", "1,024", "0.12M", "1.000", "0.003", "100", "100",
                     "steps", "2"],
                    ["deltanet", "-", "64", "2", "64", "4", "1,600", "0.12M", "0.991", "0.0003", "100", "100", "steps",
                     "4"],
                    ["lstm", "-", "64", "2", "64", "4", "64", "0.12M", "0.600", "0.003", "-", "200", "cut at 200",
                     "2"],
                    ["rnn", "-", "64", "2", "-", "-", "-", "0.12M", "0.050", "-", "-", "100", "steps", "1"]]
    if figures is None:  # no figure, and the report says why (CI installs matplotlib: the figures are checked there)
        assert "matplotlib is not installed" in out
        return
    assert os.path.exists(tmp_path / "mqar.png") and "showdown.png" not in figures  # no text run, no curves
    (ax,) = figures["mqar.png"].axes
    lines = {line.get_label(): (line.get_linestyle(), list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.get_lines()}  # the old rnn run has no state size: no point
    assert lines == {"attention": ("-", [8192], [1.0]), "deltanet": ("-", [1600], [0.991]),
                     "deltanet conv_size=1": ("--", [1024], [1.0]), "lstm": ("-", [64], [0.6])}
    assert ax.get_xscale() == "log"


# ----------------------------------------------------------------------------- bench.py: imports, and its CPU smoke run
def test_bench_cpu_smoke_run_prints_every_table(capsys):
    bench = importlib.import_module("bench")
    bench.main(["--device", "cpu", "--quick"])
    out = capsys.readouterr().out
    for header in ("### scan.py", "### layers", "### chunked cores", "### decoding", "### training steps"):
        assert header in out, f"bench.py printed no {header!r} table"
    assert "Error" not in out and "OOM" not in out and "nan" not in out, out


@pytest.mark.parametrize("name,conv", [(n, c) for n, c in [("deltanet", "conv_size"), ("gated_deltanet", "conv_size"),
                                                           ("mamba", "d_conv"), ("mamba2", "d_conv")] if n in PRESENT])
def test_conv_free_variant_forms_agree(name, conv):
    """The recall study's conv-free variants (--mixer-args conv_size=1 / d_conv=1: a width-1 conv, no mixing in
    time): every form and a loop of step() agree."""
    torch.manual_seed(0)
    m = make(name, **{conv: 1})
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    state, ys = None, []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    for form in type(m).forms:
        y, _ = m(x, form=form)
        assert rel_err(y, torch.stack(ys, 1)) <= 1e-10, form
