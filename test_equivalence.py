"""Every form of every model computes the same function, forward and backward; scan.py is exact.

    pytest test_equivalence.py            # the default set: CPU float64 and float32, each Triton kernel interpreted
    SLOW=1 pytest test_equivalence.py     # and the slow cases (more interpreter runs, T = 65536 scans, ...)
    pytest test_equivalence.py -k mamba2  # one model

In order: scan.py, selective_scan.py and scalar_decay.py; the model contract (every model, every form); each model
against its independent reference (<model>_reference), at its extremes, and its init; train.py; bench.py. A test
imports the model file it needs (module()): a missing or broken file fails its own tests only.

References are plain sequential loops on fresh random inputs. Tolerances are relative errors ||out - ref|| / ||ref||:
float64 1e-8 (summation order alone is ~1e-15; room for rnn/lstm's ill-conditioned Newton solves), float32 1e-4
(~1e-7 per rounding over a few hundred operations), bf16 on a GPU 5e-2 (4e-3 per rounding, bf16 matmuls against a
float32 reference). GPU-only cases skip without CUDA.
"""
import contextlib
import copy
import gc
import hashlib
import importlib
import json
import math
import operator
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import types
import weakref

import pytest
import torch
import torch._functorch.config
import torch.nn.functional as F

import bench
import scan as scan_module
import train
from scan import scan
from causal_conv import causal_conv_silu
from scalar_decay import scalar_decay
from selective_scan import selective_scan

HERE = os.path.dirname(os.path.abspath(__file__))
# AOTAutograd's cache is keyed on the forward graph: it would replay a custom op's backward from before a change
torch._functorch.config.enable_autograd_cache = False
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SLOW = os.environ.get("SLOW") == "1"
slow = pytest.mark.skipif(not SLOW, reason="slow: run with SLOW=1")
# on a GPU the default run checks the GPU; what runs on the CPU alone and is long (T = 16384, gloo's DDP) the CPU's run
# covers, and SLOW=1 runs it there too
cpu_long = pytest.mark.skipif(CUDA and not SLOW, reason="the CPU's long case: on a GPU, run with SLOW=1")
LONG_DEVICES = [pytest.param("cpu", marks=cpu_long), pytest.param("cuda", marks=[needs_cuda, slow])]

# file -> (class, small options for tests: several chunks, a few heads, Mamba2's and Mamba3's groups, DeltaNet's gate)
MODELS = {
    "linear_attention": ("LinearAttention", dict(n_head=2, chunk_size=8)),
    "retnet": ("RetNet", dict(n_head=2, chunk_size=8)),
    "gated_retention": ("GatedRetention", dict(n_head=2, chunk_size=8)),
    "mamba2": ("Mamba2", dict(headdim=8, d_state=8, chunk_size=8, ngroups=2)),
    "mamba3": ("Mamba3", dict(headdim=8, d_state=8, chunk_size=8, ngroups=2)),
    "mamba": ("Mamba", dict(d_state=4)),
    "deltanet": ("DeltaNet", dict(n_head=2, chunk_size=8, use_gate=True)),
    "gated_deltanet": ("GatedDeltaNet", dict(n_head=2, chunk_size=8)),
    "rwkv7": ("RWKV7", dict(head_size=16, chunk_size=8, decay_lora=4, a_lora=4, gate_lora=8)),
    "kda": ("KDA", dict(head_dim=8, chunk_size=8)),
    "attention": ("Attention", dict(n_head=2)),
    "rnn": ("RNN", dict()),
    "lstm": ("LSTM", dict()),
    "mlstm": ("MLSTM", dict(chunk_size=8)),
}
CHUNKED = [m for m in MODELS if "chunk_size" in MODELS[m][1]]
LARGEST_CHUNK = {"kda": 32, "mlstm": 128}  # else 64 (kda's bound: e^(5 L / 2) factors inside a chunk)
D_MODEL = 32
TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def in_proj_rows(m, i):
    """Mamba3's in_proj rows that make its output i of (z, x, B, C, dt, A, lambda, angles)."""
    return m.in_proj.weight[sum(m.sizes[:i]):sum(m.sizes[:i + 1])]


# each model's gates at their ends, as edits make() applies: name -> {regime: edit(model)}
EXTREMES = {
    "gated_retention": {  # gamma exactly 1 (log gamma = -0), ~0 (log gamma = -625), one head each, jumping per token
        "one": lambda m: m.gate.bias.fill_(1e4), "zero": lambda m: m.gate.bias.fill_(-1e4),
        "mixed": lambda m: m.gate.bias.copy_(torch.tensor([1e4, -1e4])), "jumpy": lambda m: m.gate.weight.mul_(1e4)},
    "mamba2": {  # dt ~ 30: decay exp(-30 A) ~ 0; dt ~ 1e-13: decay ~ 1, nothing written; A ~ -2e-9: decay ~ 1; A ~ -400
        "dt_huge": lambda m: m.dt_bias.fill_(30.0), "dt_tiny": lambda m: m.dt_bias.fill_(-30.0),
        "A_near_0": lambda m: m.A_log.fill_(-20.0), "A_huge": lambda m: m.A_log.fill_(6.0),
        "mixed": lambda m: (m.dt_bias.copy_(torch.linspace(-20, 20, m.n_head)),
                            m.A_log.copy_(torch.linspace(-20, 5, m.n_head)))},
    "mamba": {f"dt_bias={b:g}": (lambda m, b=b: m.dt_proj.bias.fill_(b)) for b in (20.0, -20.0, 50.0, -50.0)},
    "gated_deltanet": {  # alpha exactly 1 (A_log = -inf); alpha = 0 (log alpha ~ -2e5); jumping between the two
        "one": lambda m: m.A_log.fill_(-math.inf), "zero": lambda m: (m.A_log.fill_(10.0), m.dt_bias.fill_(10.0)),
        "jumpy": lambda m: (m.A_log.fill_(10.0), m.a.weight.mul_(1e3))},
    "rwkv7": {r: (lambda m, dw=dw, da=da: (m.w0.add_(dw), m.a0.add_(da))) for r, (dw, da) in {
        # w0 and a0 shifted until sigmoid saturates: w_t = exp(-e^-1/2) = 0.545 (the fastest decay the soft clamp
        # allows) or 1 (no decay), a_t = 0 (nothing removed: S only decays and adds v k^T) or 1 (the full delta rule)
        "w_min": (1e3, 0.0), "w_one": (-1e3, 0.0), "a_zero": (0.0, -1e3), "a_one": (0.0, 1e3),
        "w_min_a_one": (1e3, 1e3), "w_one_a_one": (-1e3, 1e3)}.items()},
    "mamba3": {  # in_proj_rows(m, i): the rows that make A (5), lambda (6), the angles (7)
        "decay_1": lambda m: m.dt_bias.fill_(-40.0),  # dt ~ 4e-18: decay exactly 1, nothing written
        "decay_0": lambda m: (m.dt_bias.fill_(30.0), in_proj_rows(m, 5).mul_(1e4)),  # dt A to -1e5: exp underflows
        "decay_0_and_1": lambda m: (in_proj_rows(m, 5).mul_(1e4), m.dt_bias.fill_(2.0)),  # A = -A_floor or huge
        "lambda_0_and_1": lambda m: in_proj_rows(m, 6).mul_(1e3),  # sigmoid saturates: lambda exactly 0 or 1
        "fast_turns": lambda m: (in_proj_rows(m, 7).mul_(1e3), m.dt_bias.fill_(3.0)),  # |w| = pi, dt ~ 3
        "mixed": lambda m: (m.dt_bias.copy_(torch.linspace(-20, 20, m.n_head)), in_proj_rows(m, 5).mul_(1e4),
                            in_proj_rows(m, 6).mul_(1e3))},
    "kda": {  # alpha = 1 in every channel (the gate's sigmoid at 0); alpha = e^-5, the lowest (sigmoid at 1);
        # channels and tokens jumping between the two (f_proj x 100: most gates within 0.01 of an end)
        "one": lambda m: m.dt_bias.fill_(-1e4), "lowest": lambda m: m.dt_bias.fill_(1e4),
        "jumpy": lambda m: m.f_proj[1].weight.mul_(100)},
    "mlstm": {r: (lambda m, i=i, f=f: (m.gates.bias[:m.n_head].fill_(i), m.gates.bias[m.n_head:].fill_(f)))
              for r, (i, f) in {  # gate biases i~, f~: f = 1 exactly or exp(-1e4) = 0, i = e^1e4 or e^-1e4
                  "f_one_i_huge": (1e4, 1e4), "f_zero_i_tiny": (-1e4, -1e4), "f_zero_i_huge": (1e4, -1e4),
                  "f_one_i_tiny": (-1e4, 1e4)}.items()},
}
EXTREME_CASES = [(name, regime) for name in EXTREMES for regime in EXTREMES[name]]
# the parameters whose gradients are ~0 in the recurrence at the extremes (see check_form): a gate's that underflows;
# mlstm's q, k, gates where one token outweighs the rest (f = 0, i = e^1e4: the float32 recurrence is 0.5 off)
GATES = {"gated_retention": ("gate.",), "gated_deltanet": ("A_log", "dt_bias", "a."), "mlstm": ("wq", "wk", "gates.")}
# the regimes an independent reference cannot take: i = e^1e4 overflows mlstm's (the paper's unstabilised recurrence)
UNREFERENCED = [("mlstm", "f_one_i_huge"), ("mlstm", "f_zero_i_huge")]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values"
    scale = ref.norm()
    return ((out - ref).norm() / scale).item() if scale > 0 else (out - ref).norm().item()


def tensors(state):
    """The tensors of a state (a tensor, or tuples of tensors and tuples), in order."""
    return [state] if torch.is_tensor(state) else [t for s in state for t in tensors(s)]


def map_state(fn, state):
    """Apply fn to every tensor of a state (a tensor, or tuples of tensors and tuples), keeping its structure."""
    return fn(state) if torch.is_tensor(state) else type(state)(map_state(fn, s) for s in state)


def assert_close(got, want, tol, what):
    """Every tensor of two outputs or states: the same shapes, floats within tol, integers (step counters) equal."""
    for i, (a, b) in enumerate(zip(tensors(got), tensors(want), strict=True)):
        assert a.shape == b.shape, f"{what} [{i}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if b.is_floating_point():
            assert rel_err(a, b) <= tol, f"{what} [{i}]: rel err {rel_err(a, b):.2e}"
        else:
            assert torch.equal(a, b), f"{what} [{i}] differs"


def check_grads(fn, reference, leaves, names, tol, draw, what="", grad_tol=None, against=None):
    """fn(*leaves) against reference(*float64 copies): each output within tol, the gradient w.r.t. each leaf of a random
    projection draw(*shape) of the outputs within grad_tol (default tol); names: the outputs', then the gradients'.
    against {name: other}: name's error relative to max(its scale, other's) (where the reference's is 0)."""
    outs = fn(*leaves)
    ws = [draw(*o.shape).to(o.dtype) for o in outs]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    refs = reference(*ref)
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, ws)), leaves)
    ref_grads = torch.autograd.grad(sum((r * w.double()).sum() for r, w in zip(refs, ws)), ref)
    scale, against = dict(zip(names, [t.norm().item() for t in [*refs, *ref_grads]])), against or {}
    for i, (n, o, r) in enumerate(zip(names, [*outs, *grads], [*refs, *ref_grads], strict=True)):
        bound = tol if i < len(outs) else grad_tol or tol
        err = (o.double() - r).norm().item() / max(scale[n], scale[against[n]]) if n in against else rel_err(o, r)
        assert o.shape == r.shape and err <= bound, f"{what} {n}: rel err {err:.1e}"
    return outs


module = importlib.import_module  # module(name): the model file name.py, imported by the test that needs it


def model_class(name):
    return getattr(module(name), MODELS[name][0])


def make(name, dtype=torch.float64, device="cpu", edit=None, d_model=D_MODEL, **options):
    """MODELS[name] (options override its small ones), seeded, to dtype and device; edit(model) sets a regime.
    Constant parameters (zeros; ones: a norm's weight, Mamba's D) get 0.1 N(0, 1) added: a wrong index shows."""
    torch.manual_seed(0)
    model = model_class(name)(d_model, **{**MODELS[name][1], **options})
    with torch.no_grad():
        for p in model.parameters():
            if p.min() == p.max():
                p.add_(0.1 * torch.randn_like(p))
        if edit is not None:
            edit(model)
    return model.to(device=device, dtype=dtype)


def interpreted(code):
    """Run code in a fresh Python with TRITON_INTERPRET=1: Triton's kernels run on the CPU; fail with its output."""
    pytest.importorskip("triton")
    if CUDA and not SLOW:
        pytest.skip("this GPU runs the kernels themselves; SLOW=1 runs the interpreter too")
    done = subprocess.run([sys.executable, "-c", "import torch, scan, test_equivalence as t\n" + code], cwd=HERE,
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
    if done.returncode and "only 0-dimensional arrays can be converted to Python scalars" in done.stderr:
        import numpy, triton  # the interpreter's int() of its 1-element scalars; Triton 3.9's squeezes them first
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run under NumPy {numpy.__version__} "
                    "(pip install 'numpy<2.4', or a newer Triton)")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# ========== scan.py, selective_scan.py and scalar_decay.py ======================================

def scan_reference(a, b, h0=None, reverse=False):
    """h_t = a_t h_{t-1} + b_t step by step: a broadcast to b, or 2 x 2 blocks a [B, T, 2, 2, *] on b [B, T, 2, *]."""
    block = a.dim() > b.dim()
    a = a if block else a.expand(b.shape)
    h, out = (torch.zeros_like(b[:, 0]) if h0 is None else h0), [None] * b.shape[1]
    for t in (reversed(range(b.shape[1])) if reverse else range(b.shape[1])):
        h = ((a[:, t] * h[:, None]).sum(2) if block else a[:, t] * h) + b[:, t]
        out[t] = h
    return torch.stack(out, 1)


def selective_scan_reference(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t, y_t = C_t . h_t, one step at a time (scan_reference)."""
    h = scan_reference(torch.exp(dt[..., None] * A), (dt * x)[..., None] * B[:, :, None, :], h0)  # [B, T, D, N]
    return (h * C[:, :, None, :]).sum(-1), h[:, -1]


def scalar_decay_reference(q, k, v, g, S):
    """S_t = exp(g_t) S_{t-1} + v_t k_t^T, y_t = S_t q_t one step at a time; q, k [B, T, G, Dk] read by H / G heads."""
    q, k = (x.repeat_interleave(v.shape[2] // q.shape[2], 2) for x in (q, k))
    S = scan_reference(g.exp()[..., None, None], v[..., :, None] * k[..., None, :], S)  # [B, T, H, Dv, Dk]
    return torch.einsum("bthed,bthd->bthe", S, q), S[:, -1]


def causal_conv_reference(x, weight, bias, state):
    """y_t = silu(bias + sum_k w_k x_{t-K+1+k}) one step at a time, the state's rows before x."""
    K, window, ys = weight.shape[1], torch.cat([state, x], 1), []
    for t in range(x.shape[1]):
        p = (window[:, t:t + K] * weight.T).sum(1) + (0 if bias is None else bias)
        ys.append(p * torch.sigmoid(p))
    return torch.stack(ys, 1)


SCAN_CASES = [  # (b shape, a shape): full; a gate per head over 16 channels (da summed over a tile's channels); one
    # per head, constant over batch and time (summed over both); constant over time (summed over a tile's steps); ...;
    # a gate per head over 25 and 72 channels, no multiple of a tile's width: tiles that meet two heads' gates
    ((2, 37, 3), (2, 37, 3)), ((2, 40, 2, 16), (2, 40, 2, 1)), ((2, 40, 3, 16), (1, 1, 3, 1)),
    ((2, 40, 16), (2, 1, 16)), ((2, 70, 2, 4), (2, 70, 2, 1)), ((2, 45, 3, 4), (1, 45, 1, 4)), ((3, 1, 5), (3, 1, 5)),
    ((2, 50, 4), (1, 1, 4)), ((2, 33, 2, 5, 5), (2, 33, 2, 1, 1)), ((2, 3, 2, 9, 8), (1, 1, 2, 1, 1))]
BLOCK_SCAN_CASES = [(b, b[:2] + (2,) + b[2:]) for b in [(2, 37, 2, 3), (1, 70, 2, 5), (3, 1, 2, 4), (2, 45, 2, 3, 2)]]
# (B, T, D, N, h0, dt scale): several tiles over time (16 on a GPU, 8 interpreted), several channel
# blocks, ragged T, D and N, and dt up to 30 (gates ~1e-26: the backward's h_t - b_t = a_t h_{t-1})
SELECTIVE_CASES = [(2, 21, 10, 4, True, 1.0), (1, 37, 9, 3, False, 1.0), (3, 8, 4, 4, True, 1.0),
                   (2, 19, 6, 4, True, 30.0), (2, 19, 6, 4, True, 1000.0)]  # dt up to 1000: most a_t underflow to 0
# (B, T, G, H, Dk, Dv): one chunk and several (16 interpreted, 64 else), a padded tail, Dk and Dv no powers of two,
# several value tiles (16 columns interpreted), groups of heads sharing q and k
SCALAR_DECAY_CASES = [(2, 37, 2, 2, 16, 16), (1, 70, 1, 2, 20, 24), (1, 33, 1, 2, 16, 40)]
# (B, T, C, K, bias): several time tiles (16 interpreted, 32 else) and channel tiles, ragged; T < K - 1 (the state
# leaves a row of itself); no bias; K = 1 (no state); K - 1 past a tile's 16 steps
CAUSAL_CONV_CASES = [(2, 37, 20, 4, True), (1, 2, 17, 4, False), (2, 70, 33, 3, True), (1, 5, 8, 1, True),
                     (1, 30, 6, 20, True)]


def check_scan(device, dtype, tol, cases=SCAN_CASES + BLOCK_SCAN_CASES, reference=None):
    """scan (block_scan on 2 x 2 blocks) against `reference` (the loop) in float64: h and its gradients, h0 or not."""
    g = torch.Generator(device=device).manual_seed(0)
    draw = lambda *shape: torch.randn(shape, device=device, generator=g)  # noqa: E731
    for shape, a_shape in cases:
        block = len(a_shape) > len(shape)
        fn = scan_module.block_scan if block else scan
        for reverse, with_h0 in [(False, False), (False, True), (True, False), (True, True)]:
            b = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()
            a = torch.rand(a_shape, device=device, dtype=dtype, generator=g)
            a = (a - 0.5 if block else a * 1.2 - 0.1).requires_grad_()  # blocks: |a| <= 1
            h0 = torch.randn(shape[:1] + shape[2:], device=device, dtype=dtype, generator=g).requires_grad_()
            leaves, names = [a, b, h0][:2 + with_h0], ["h", "da", "db", "dh0"][:3 + with_h0]
            run = lambda f: lambda a, b, h0=None: (f(a, b, h0, reverse),)  # noqa: E731
            (h,) = check_grads(run(fn), run(reference or scan_reference), leaves, names, tol, draw,
                               f"{shape} a{a_shape} reverse={reverse} h0={with_h0}")
            assert h.shape == b.shape and h.dtype == b.dtype


def check_selective(device, dtype, tol, cases=SELECTIVE_CASES, reference=None):
    """y, h_T, dx, ddt, dA, dB, dC, dh0 against the loop or `reference` in float64; x [B, D, T] in memory."""
    g = torch.Generator(device=device).manual_seed(0)
    draw = lambda *shape: torch.randn(shape, device=device, generator=g)  # noqa: E731
    for Bsz, T, D, N, with_h0, scale in cases:
        x = torch.randn(Bsz, D, T, device=device, generator=g).to(dtype).transpose(1, 2)
        dt = scale * torch.rand(Bsz, T, D, device=device, generator=g).to(dtype)
        A = -torch.rand(D, N, device=device, generator=g).to(dtype) * 2
        B, C = (torch.randn(Bsz, T, N, device=device, generator=g).to(dtype) for _ in range(2))
        acc = torch.promote_types(dtype, torch.float32)  # the state's dtype
        h0 = [torch.randn(Bsz, D, N, device=device, generator=g).to(acc)] if with_h0 else []
        leaves = [t.requires_grad_() for t in [x, dt, A, B, C, *h0]]
        y, hT = check_grads(selective_scan, reference or selective_scan_reference, leaves,
                            ["y", "h_T", "dx", "ddt", "dA", "dB", "dC", "dh0"][:2 + len(leaves)], tol, draw,
                            f"B={Bsz} T={T} D={D} N={N} h0={with_h0} dt*{scale} {dtype}")
        assert y.dtype == x.dtype and y.shape == x.shape and hT.dtype == acc and hT.shape == (Bsz, D, N)


def check_scalar_decay(device, dtype, tol, cases=SCALAR_DECAY_CASES, reference=scalar_decay_reference):
    """scalar_decay against `reference` in float64: y, S_final and the gradients w.r.t. q, k, v, g and S (nonzero).
    g is 0 (no decay) every 5th step, -50 (the state forgotten) every 29th in one head; q, v transposed in memory."""
    gen = torch.Generator(device=device).manual_seed(0)
    r = lambda *shape: torch.randn(shape, device=device, generator=gen)  # noqa: E731
    for Bsz, T, G, H, Dk, Dv in cases:
        g = -0.1 * torch.rand(Bsz, T, H, device=device, generator=gen)  # the state outlives a chunk
        g[:, ::5], g[0, 3::29, 0] = 0.0, -50.0
        inputs = [r(Bsz, G, T, Dk).transpose(1, 2), r(Bsz, T, G, Dk), r(Bsz, H, T, Dv).transpose(1, 2), g,
                  r(Bsz, H, Dv, Dk)]
        acc = torch.promote_types(dtype, torch.float32)  # g and the states
        leaves = [x.to(dtype if i < 3 else acc).requires_grad_() for i, x in enumerate(inputs)]
        y, S = check_grads(scalar_decay, reference, leaves, ("y", "S", "dq", "dk", "dv", "dg", "dS"), tol, r,
                           f"B={Bsz} T={T} G={G} H={H} Dk={Dk} Dv={Dv} {dtype}")
        assert y.dtype == dtype and y.shape == (Bsz, T, H, Dv) and S.dtype == acc


def check_causal_conv(device, dtype, tol, cases=CAUSAL_CONV_CASES, reference=causal_conv_reference):
    """causal_conv_silu against `reference` in float64: y and the gradients w.r.t. x (a strided slice), the weight, the
    bias and the state (float32 or better, as the models keep it)."""
    gen = torch.Generator(device=device).manual_seed(0)
    r = lambda *shape: torch.randn(shape, device=device, generator=gen)  # noqa: E731
    for Bsz, T, C, K, with_bias in cases:
        acc = torch.promote_types(dtype, torch.float32)
        inputs = [r(Bsz, T, C + 5)[..., 2:2 + C].to(dtype), r(C, K).to(acc), r(C).to(acc) if with_bias else None,
                  r(Bsz, K - 1, C).to(acc)]
        leaves = [x.requires_grad_() for x in inputs if x is not None]
        fn = lambda f: lambda x, w, *rest: (f(x, w, *(rest if with_bias else (None, *rest))),)  # noqa: E731
        names = ["y", "dx", "dw"] + ["dbias"] * with_bias + ["dstate"]
        (y,) = check_grads(fn(causal_conv_silu), fn(reference), leaves, names, tol, r,
                           f"B={Bsz} T={T} C={C} K={K} bias={with_bias} {dtype}")
        assert y.dtype == dtype and y.shape == (Bsz, T, C)


def check_scan_compiled(device, quick=False):
    """scan and block_scan in torch.compile(fullgraph=True) against eager: a broadcast a read with stride 0 ([1, 1, H,
    1, 1] as retnet passes it, [B, N, H, 1, 1] as gated retention does), h0, reverse, and the gradients."""
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


# the kernels' two modes: the sequence in one pass, or cut into chunks side by side (each reduced to its map, rescanned
# from its entering state); the interpreter runs one by default, both with SLOW=1
SCAN_MODES = {"chunks": (10 ** 6, 1), "one pass": (0, 10 ** 6)}  # scan.PROGRAMS_PER_SM, scan.TILES_PER_CHUNK
INTERPRETED_MODES = ["chunks", pytest.param("one pass", marks=slow)]


def force_mode(monkeypatch, mode):
    monkeypatch.setattr(scan_module, "PROGRAMS_PER_SM", SCAN_MODES[mode][0])
    monkeypatch.setattr(scan_module, "TILES_PER_CHUNK", SCAN_MODES[mode][1])


def spy_launches(module, *kernels):
    """Wrap module's named kernels; the set returned fills with the names of those launched."""
    seen = set()

    class Spy(types.SimpleNamespace):
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.add(self.name) or self.kernel[grid](*args, **meta)
    for name in kernels:
        setattr(module, name, Spy(kernel=getattr(module, name), name=name))
    return seen


def spy_reduce(module, *kernels):
    """Wrap module's named kernels; the set returned fills with each launch's REDUCE (chunks: True; one pass: False)."""
    seen = set()

    class Spy(types.SimpleNamespace):
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.add(meta["REDUCE"]) or self.kernel[grid](*args, **meta)
    for name in kernels:
        setattr(module, name, Spy(kernel=getattr(module, name)))
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("check,f32_tol,cases", [
    (check_scan, 1e-5, SCAN_CASES + BLOCK_SCAN_CASES), (check_selective, 1e-5, SELECTIVE_CASES),
    # and three chunks of 64 with Dk, Dv < 16 and four heads per group; float32: exp(c_i - c_j) is a difference of
    # cumulative sums, |c| up to ~500 here in chunks of 64: ~3e-5 per factor
    (check_scalar_decay, 1e-4, SCALAR_DECAY_CASES + [(1, 150, 1, 4, 8, 5)]), (check_causal_conv, 1e-5,
                                                                              CAUSAL_CONV_CASES)],
    ids=["scan", "selective_scan", "scalar_decay", "causal_conv"])
def test_torch_engine(check, f32_tol, cases, dtype):
    """The PyTorch engines of scan.py, selective_scan.py, scalar_decay.py and causal_conv.py against their loops."""
    check("cpu", dtype, 1e-12 if dtype == torch.float64 else f32_tol, cases)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_scan_accumulates_in_float32(dtype, device):
    """bf16 and fp16 in, float32 sums rounded once on the way out, forward and backward: h_t = 1 + t e / 2 (e the
    dtype's epsilon) is exact in float32, where a running sum in the input's dtype drops the halves (1 + e / 2 is 1)."""
    b = torch.full((2, 1000, 3), torch.finfo(dtype).eps / 2, device=device, dtype=dtype)
    b[:, 0] = 1
    b.requires_grad_()
    h, exact = scan(torch.ones_like(b), b), torch.cumsum(b.detach().double(), 1)
    assert h.dtype == dtype and torch.equal(h, exact.to(dtype)), "h is not the float32 sum rounded once"
    (db,) = torch.autograd.grad(h, b, b.detach().flip(1))  # dL/db_t = sum_{s >= t} dL/dh_s
    assert torch.equal(db, exact.flip(1).to(dtype)), "dL/db is not the float32 sum rounded once"


@pytest.mark.parametrize("device", DEVICES)
def test_scan_gates_at_zero_and_one_and_long_sequences(device):
    b = torch.randn(2, 300, 8, device=device)
    a = torch.randint(0, 2, (2, 300, 8), device=device).float()  # forget everything, or keep everything
    assert rel_err(scan(a, b), scan_reference(a.double(), b.double())) <= 1e-6
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
    (lambda: selective_scan(*[torch.rand(2, 5, 4)] * 2, torch.rand(4, 3), *[torch.rand(2, 5, 2)] * 2), r"B must be"),
    (lambda: selective_scan(*[torch.rand(2, 0, 4)] * 2, torch.rand(4, 3), *[torch.rand(2, 0, 3)] * 2), "T > 0"),
    (lambda: selective_scan(*[torch.rand(2, 5, 4)] * 2, torch.rand(4, 3), *[torch.rand(2, 5, 3)] * 2,
                            torch.rand(2, 3, 4)), "h0 must be"),
    (lambda: selective_scan(torch.rand(2, 5, 4), torch.ones(2, 5, 4, dtype=torch.long), torch.rand(4, 3),
                            *[torch.rand(2, 5, 3)] * 2), "floating"),
    (lambda: selective_scan(*[torch.rand(2, 5, 4)] * 2, torch.rand(4, 3, device="meta"), *[torch.rand(2, 5, 3)] * 2),
     "one device"),
    (lambda: causal_conv_silu(torch.rand(2, 5, 4), torch.rand(4, 3), None, torch.rand(2, 3, 4)), r"state \[B, K - 1"),
    (lambda: causal_conv_silu(torch.rand(2, 5, 4), torch.rand(4, 3), torch.rand(3), torch.rand(2, 2, 4)), "bias"),
    (lambda: causal_conv_silu(torch.rand(2, 5, 4), torch.rand(4, 3, device="meta"), None, torch.rand(2, 2, 4)),
     "one device")])
def test_scans_reject_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


@pytest.mark.parametrize("mode", INTERPRETED_MODES)
@pytest.mark.parametrize("name,kernels", [("scan", "'_scan_kernel'"), (
    "selective_scan", "'_selective_fwd_kernel', '_selective_bwd_kernel'")], ids=["scan", "selective_scan"])
def test_scan_kernels_interpreted(name, kernels, mode):
    """The Triton kernels, forward and backward, interpreted on the CPU in the mode forced (checked to have run)."""
    check = "check_scan" if name == "scan" else "check_selective"
    interpreted(f"import {name} as m; assert scan.use_triton(torch.zeros(1)); "
                f"scan.PROGRAMS_PER_SM, scan.TILES_PER_CHUNK = {SCAN_MODES[mode]}; "
                f"seen = t.spy_reduce(m, {kernels}); t.{check}('cpu', torch.float32, 1e-5); "
                f"assert (True in seen) if {mode == 'chunks'} else seen == {{False}}, seen")


SCAN_FLAG_SETS = [{}, dict(HAS_H0=True), dict(REDUCE=True), dict(FOLD=True, HAS_H0=True),
                  dict(REVERSE=True, ADJOINT=True, HAS_H_EDGE=True), dict(REVERSE=True, ADJOINT=True, REDUCE=True),
                  dict(REVERSE=True, ADJOINT=True, FOLD=True, HAS_H_EDGE=True)]
SCAN_DA_SUMS = [dict(DA_SUM_T=True), dict(DA_SUM_C=True, TWO_RUNS=True), dict(DA_SUM_C=True, FOLD=True)]


@pytest.mark.skipif(scan_module.triton is None, reason="no Triton")
@pytest.mark.parametrize("flags", [dict(f, BLOCK2=b) for b in (False, True) for f in SCAN_FLAG_SETS] + [
    dict(f, REVERSE=True, ADJOINT=True, DA_ATOMIC=True, BLOCK2=False) for f in SCAN_DA_SUMS],
    ids=lambda f: "-".join(k for k, v in f.items() if v) or "forward")
def test_scan_kernel_compiles_for_sm90(flags):
    """_scan_kernel compiled for an H100 (sm_90) without a GPU, at each combination of flags _triton_scan launches: the
    interpreter does not check that a name assigned before the tile loop keeps its type inside it; the compiler does."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = scan_module._scan_kernel
    ptrs = {"A", "X", "H", "HS", "H0", "H_EDGE", "DA", "MAPS"}
    cx = dict(dict.fromkeys(["REVERSE", "ADJOINT", "REDUCE", "FOLD", "HAS_H0", "HAS_H_EDGE", "DA_ATOMIC", "DA_SUM_T",
                             "DA_SUM_C", "TWO_RUNS"], False), sa_i=1, BLOCK_T=16, BLOCK_C=8, R=4, CHUNKS=4, **flags)
    sig = {n: "constexpr" if n in cx else "*fp32" if n in ptrs else "i32" for n in fn.arg_names}
    scan_module.triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})


def test_scalar_decay_triton_kernel_interpreted():
    """The kernels, forward and backward, run by Triton's interpreter: chunks of 16, value tiles of 16 columns."""
    interpreted("import scalar_decay as sd; assert sd._kernel(*[torch.zeros(1, 1, 1, 16)] * 5); "
                "t.check_scalar_decay('cpu', torch.float32, 1e-5)")


def test_causal_conv_triton_kernels_interpreted():
    """The kernels, forward and backward, run by Triton's interpreter: tiles of 16 steps by 16 channels."""
    interpreted("import causal_conv as cc; assert scan.use_triton(torch.zeros(1)); "
                "seen = t.spy_launches(cc, '_pointwise_kernel', '_backward_kernel'); "
                "t.check_causal_conv('cpu', torch.float32, 1e-5); assert len(seen) == 2, seen")


@slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_scan_compiled(device):
    """The custom ops under Inductor: the kernel reads the strides of the tensors compiled code hands it at run time."""
    interpreted("t.check_scan_compiled('cpu', True)") if device == "cpu" else check_scan_compiled("cuda")


@needs_cuda
@pytest.mark.parametrize("dtype,mode", [  # float32 in chunks; the rest with SLOW=1 (bf16 models run the kernels)
    pytest.param(torch.float32, "chunks", id="f32-chunks"),
    pytest.param(torch.bfloat16, "one pass", id="bf16-one pass", marks=slow),
    pytest.param(torch.float32, "one pass", id="f32-one pass", marks=slow),
    pytest.param(torch.bfloat16, "chunks", id="bf16-chunks", marks=slow)])
@pytest.mark.parametrize("kernel", ["scan", "selective_scan", "scalar_decay", "causal_conv"])
def test_kernels_triton_cuda(kernel, dtype, mode, monkeypatch):
    """Each kernel in the mode forced against the loop (scan) or the PyTorch engine in float64, scalar_decay at model
    shapes (97 value columns; 96 by 192; 128 by 64). Unless SLOW=1, two shapes (scalar_decay: one), as each compiles
    in 2 to 5 s (float32's gradient kernel for Dk > 64 in 19 s): scalar_decay's Dk = 48, Dv = 80 pads both, 3 tiles."""
    force_mode(monkeypatch, mode)
    f32 = dtype == torch.float32
    if kernel == "scan":  # bf16: inputs and h rounded to 8 bits (4e-3 each), the sums float32: no compounding
        few = SCAN_CASES[:1] + BLOCK_SCAN_CASES[:1]  # full and 2 x 2 blocks (the broadcast gates' da: SLOW=1)
        check_scan("cuda", dtype, 1e-5 if f32 else 2e-2, SCAN_CASES + BLOCK_SCAN_CASES if SLOW else few)
    elif kernel == "selective_scan":  # bf16: x, dt, B, C rounded before both; y and dx once more, the sums float32
        cases = [(2, 333, 100, 16, True, 1.0), (1, 8192, 256, 16, True, 1.0), (4, 1000, 48, 5, False, 1.0),
                 (2, 500, 64, 16, True, 30.0)]
        check_selective("cuda", dtype, 1e-4 if f32 else 2e-2, cases if SLOW else cases[::2], reference=selective_scan)
    elif f32 != (mode == "chunks"):
        pytest.skip(f"{kernel}'s kernels have one mode: each dtype runs once")
    elif kernel == "causal_conv":  # bf16: x rounded before both, y and dx once more, the sums float32
        cases = CAUSAL_CONV_CASES + [(2, 300, 960, 4, True), (3, 77, 100, 4, False), (2, 130, 70, 2, True)]
        check_causal_conv("cuda", dtype, 1e-5 if f32 else 1e-2, cases, causal_conv_silu)
    else:  # bf16: q, k, v rounded before both; A, S, dS rounded for the dots, sums float32
        cases = [(1, 300, 1, 3, 48, 80), (2, 2048, 1, 2, 64, 64), (1, 300, 3, 3, 96, 97), (2, 333, 2, 2, 96, 192),
                 (1, 200, 1, 4, 128, 64), (1, 100, 1, 1, 32, 256)]
        check_scalar_decay("cuda", dtype, 1e-4 if f32 else 5e-2, cases if SLOW else cases[:1], scalar_decay)


@slow
@needs_cuda
@pytest.mark.parametrize("mode", SCAN_MODES)
def test_scan_triton_cuda_long(mode, monkeypatch):
    """Long, thin sequences (T = 65536 by 8; 3000 by 300, a gate a row) against the PyTorch engine (the loop: 15 s)."""
    force_mode(monkeypatch, mode)
    check_scan("cuda", torch.float32, 1e-4, [((1, 65536, 8), (1, 65536, 8)), ((2, 3000, 300), (2, 3000, 1))], scan)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [
    "scan", "scan_block", "scan_backward", "selective_scan", "selective_scan_backward", "scalar_decay",
    "scalar_decay_backward", "causal_conv_silu", "causal_conv_silu_backward", "rnn_parallel", "lstm_parallel",
    "lstm_backward"])
def test_custom_op_fakes_match_real(op, device):
    """Each custom op's fake (shapes, strides, dtypes) is what it returns at a ragged T: a broadcast gate for scan, a
    backward's saved tensors from a real forward (selective scan's: [B, 0, D, N] in PyTorch, [B, T/BLOCK_T, D, N])."""
    [module(n) for n in ("rnn", "lstm", "scalar_decay", "causal_conv") if op.startswith(n)]  # registers zoo::<n>...
    if op == "lstm_backward" and device == "cpu":
        pytest.skip("newton.py's kernel runs on CUDA (the CPU's interpreter test checks its gradients)")
    g, T = torch.Generator(device=device).manual_seed(0), 37
    r = lambda *shape: torch.rand(shape, device=device, generator=g)  # noqa: E731
    a, b, h0 = r(2, T, 3, 1), r(2, T, 3, 5), r(2, 3, 5)
    x, dt, A, B, C = r(2, T, 6), r(2, T, 6), -r(6, 4), r(2, T, 4), r(2, T, 4)
    sd_args = (r(2, T, 1, 16), r(2, T, 1, 16), r(2, T, 2, 20), -r(2, T, 2), r(2, 2, 20, 16))  # q, k shared by 2 heads
    args = {
        "scan": lambda: (a, b, h0, False, False),
        "scan_block": lambda: (r(2, T, 2, 2, 4), r(2, T, 2, 4), None, True, True),
        "scan_backward": lambda: (a, torch.ops.zoo.scan(a, b, h0, False, False), h0, r(2, T, 3, 5), False, False),
        "selective_scan": lambda: (x, dt, A, B, C, r(2, 6, 4)),
        "selective_scan_backward": lambda: (x, dt, A, B, C, None, torch.ops.zoo.selective_scan(x, dt, A, B, C, None)[2],
                                            r(2, T, 6), r(2, 6, 4)),
        "scalar_decay": lambda: sd_args,
        "causal_conv_silu": lambda: (x, r(6, 4), r(6), r(2, 3, 6)),
        "causal_conv_silu_backward": lambda: (x, r(6, 4), None, r(2, 3, 6), r(2, T, 6)),
        "scalar_decay_backward": lambda: (*sd_args, torch.ops.zoo.scalar_decay(*sd_args)[2], r(2, T, 2, 20),
                                          r(2, 2, 20, 16)),
        "rnn_parallel": lambda: (r(2, T, 5), r(5), r(2, 5), 1e-6),
        "lstm_parallel": lambda: (r(2, T, 4, 5), r(4, 5), r(2, 2, 5), 1e-6, True),
        "lstm_backward": lambda: (r(2, T, 4, 5), r(4, 5), r(2, T, 2, 5), r(2, 2, 5), r(2, T, 2, 5)),
    }[op]()
    torch.library.opcheck(getattr(torch.ops.zoo, op.removesuffix("_block")).default, args, test_utils="test_faketensor")


# ========== the model contract: every model, every form =========================================

def forms(name, recurrent=False):
    return [f for f in model_class(name).forms if recurrent or f != "recurrent"]


def chained(model, x, sizes, form=None, state=None):
    """model on consecutive pieces of x [B, T, ...] from state, sizes their lengths ("step": one step()) -> y, state."""
    ys, t = [], 0
    for n in sizes:
        y, state = model.step(x[:, t], state) if n == "step" else model(x[:, t:t + n], state, form=form)
        ys.append(y[:, None] if n == "step" else y)
        t += 1 if n == "step" else n
    return torch.cat(ys, 1), state


def check_form(name, form, dtype, device, T=21, tol=None, edit=None, gates=(), backend=None, **options):
    """form against the recurrent form from a prefix's state: outputs, final state, gradients w.r.t. the input, initial
    state and every parameter; bf16 under autocast (as train.py) against float32. backend: the default form compiled
    (fullgraph) against eager, bf16 within tol plus eager's distance from float32. CPU float32: within tol of the
    float32 or float64 recurrence (the float32 loop is rounded too). gates: those parameters' gradients against the
    input's scale (where a gate underflows they are ~1e-42 in the recurrence, O(1) terms cancelling in log space)."""
    param_dtype, low = (torch.float32, True) if dtype == torch.bfloat16 else (dtype, False)
    model = make(name, param_dtype, device, edit=edit, **options)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, T, D_MODEL, device=device, dtype=param_dtype, generator=g, requires_grad=True)
    with torch.no_grad():
        _, s0 = model(torch.randn(2, 5, D_MODEL, device=device, dtype=param_dtype, generator=g), form="recurrent")
        y, state = model(x, s0, form="recurrent")
    s0 = map_state(lambda t: t.clone().requires_grad_(t.is_floating_point()), s0)
    gy, *gs = [torch.randn(t.shape, device=device, generator=g) for t in [y, *tensors(state)] if t.is_floating_point()]
    leaves = [x] + [t for t in tensors(s0) if t.requires_grad] + list(model.parameters())
    params = [n for n, _ in model.named_parameters()]
    names = (["y"] + [f"state[{i}]" for i in range(len(tensors(state)))] + ["grad x"]
             + [f"grad state0[{i}]" for i in range(len(leaves) - 1 - len(params))] + ["grad " + n for n in params])
    gate_grads = {"grad " + n for n in params if n.startswith(gates)}

    def outputs(fn, low=False, x=x, s0=s0, leaves=leaves, **form):
        """Outputs, final state and the gradients of a random projection of both w.r.t. every leaf."""
        with torch.autocast(device, dtype=torch.bfloat16, enabled=low):
            y, state = fn(x, s0, **form)
        floats = [t for t in tensors(state) if t.is_floating_point()]
        loss = (y.float() * gy).sum() + sum((t.float() * w).sum() for t, w in zip(floats, gs))
        return [y] + tensors(state) + list(torch.autograd.grad(loss, leaves, allow_unused=True))

    if backend is None:
        ref, out, eager, exact = outputs(model, form="recurrent"), outputs(model, low, form=form), None, None
        if dtype == torch.float32 and device == "cpu":
            model64, widen = copy.deepcopy(model).double(), lambda t: t.detach().double().requires_grad_()  # noqa: E731
            x64, s64 = widen(x), map_state(lambda t: widen(t) if t.is_floating_point() else t, s0)
            leaves64 = [x64] + [t for t in tensors(s64) if t.requires_grad] + list(model64.parameters())
            exact = outputs(model64, x=x64, s0=s64, leaves=leaves64, form="recurrent")
    else:
        ref, exact = outputs(model), None
        torch._dynamo.reset()
        out = outputs(torch.compile(model, fullgraph=True, backend=backend), low)
        eager = outputs(model, True) if low else None
    tol, dx = tol or TOL[dtype], ref[names.index("grad x")].norm().item()

    def dist(o, r, what):
        if what in gate_grads:
            return (o.double() - r.double()).norm().item() / max(r.double().norm().item(), dx)
        return rel_err(o, r)
    for i, (what, o, r) in enumerate(zip(names, out, ref, strict=True)):
        where = f"{name}/{form or 'compiled'} T={T} {what}"
        assert (o is None) == (r is None), f"{where}: only one has one"
        if r is None:
            continue
        assert o.shape == r.shape, f"{where}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if not r.is_floating_point():
            assert torch.equal(o, r), f"{where} differs"
            continue
        err = min(dist(o, r, what), dist(o, exact[i], what) if exact else math.inf)
        bound = tol + (dist(eager[i], r, what) if eager else 0.0)
        assert err <= bound, f"{where}: rel err {err:.2e} > {bound:.2e}"


def check_long(name, regime, device, form=None, T=None, B=None, **options):
    """Output, state and gradients finite at T = 16384 (attention on the CPU: 4096) in float32 (bf16 autocast on a GPU)
    through the default form or form, chunks of 8 (2048 composed) and the largest (64; kda: 32, mlstm: 128), or as
    options say."""
    T = T or (4096 if name == "attention" and device == "cpu" else 16384)
    chunked = name in CHUNKED and form is None and not options
    for chunk in [dict(chunk_size=8), dict(chunk_size=LARGEST_CHUNK.get(name, 64))] if chunked else [{}]:
        model = make(name, torch.float32, device, edit=EXTREMES.get(name, {}).get(regime), **chunk, **options)
        x = torch.randn(B or (1 if device == "cpu" else 2), T, options.get("d_model", D_MODEL), device=device,
                        requires_grad=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            y, state = model(x) if form is None else model(x, form=form)
        floats = [t for t in tensors(state) if t.is_floating_point()]
        (y.float().square().mean() + sum(t.float().square().mean() for t in floats)).backward()
        what = f"{name} {regime} {chunk}"
        assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in floats), f"{what}: non-finite output"
        bad = [n for n, p in [("x", x), *model.named_parameters()]
               if p.grad is not None and not p.grad.isfinite().all()]
        assert not bad, f"{what}: non-finite gradients of {bad}"


# check_form's cases (name, regime, device, dtype, tol, lengths, options): every model on the CPU at T = 21 and on a
# GPU at 300 (bf16 autocast; float32 with SLOW=1, tf32 matmuls ~3e-4: test_kernels_triton_cuda checks each kernel's
# float32 against float64 by default); each model's gates at their ends (EXTREMES) at T = 1, one chunk and a ragged
# 27; where MODELS' options and the CPU do not reach: kda's largest chunk (factors up to e^80) in float32, its gates at
# their ends; mamba2's groups and ragged chunks; mamba on a GPU with dt at its ends (~1e-9, 20)
FORM_CASES = ([(name, "plain", device, dtype, tol, [21 if device == "cpu" else 300], {}) for device, dtype, tol in [
    ("cpu", torch.float64, TOL[torch.float64]), ("cpu", torch.float32, TOL[torch.float32]),
    ("cuda", torch.bfloat16, TOL[torch.bfloat16]), ("cuda", torch.float32, 1e-3)] for name in MODELS]
    + [(name, regime, "cpu", dtype, tol, [1, 8, 27], {})
       for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 1e-4)] for name, regime in EXTREME_CASES]
    + [("kda", r, "cpu", torch.float32, None, [100], dict(chunk_size=32)) for r in ["plain", *EXTREMES["kda"]]]
    + [("mamba2", "plain", "cpu", dtype, None, [T], dict(ngroups=G, chunk_size=L))
       for dtype in (torch.float64, torch.float32) for G, L, T in [(4, 5, 3), (1, 7, 29), (2, 32, 19)]]
    + [("mamba", r, "cuda", dtype, tol, [300], {}) for r in ("dt_bias=20", "dt_bias=-20")
       for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2))])


@pytest.mark.parametrize("name,regime,device,dtype,tol,lengths,options", [pytest.param(
    *case, marks=[needs_cuda] * (case[2] == "cuda") + [slow] * (case[2:4] == ("cuda", torch.float32)),
    id="-".join([*case[:3], str(case[3])[6:], *(f"{k}={v}" for k, v in case[6].items())])) for case in FORM_CASES])
def test_forms_match_recurrent(name, regime, device, dtype, tol, lengths, options):
    """Every form against the recurrent form (check_form): outputs, final states, all gradients."""
    if (name, regime) == ("gated_deltanet", "jumpy"):  # log alpha down to -2e7 a token, sums of them to ~1e8
        if dtype == torch.float32:
            pytest.skip("float32 cannot: the gate's slope (exp(A_log) e^10 times a's weight x 1e3, ~2e7) amplifies "
                        "the rounding of dL/dlog(alpha) (see check_form) into dL/dx, 7e-2 measured")
        tol = TOL[dtype]  # float64 sums of log alpha ~1e8 are good to ~1e-8: 2.7e-9 measured
    for T in lengths:
        for form in forms(name):
            check_form(name, form, dtype, device, T=T, tol=tol, edit=EXTREMES.get(name, {}).get(regime),
                       gates=GATES.get(name, ()) if regime != "plain" else (), **options)


# the models whose references start from a state; the state from empty not compared: mamba3's angles round to 0 or
# 2 pi (compared from a random state), mlstm's is unstabilised (test_mlstm_layer_...: as C~ exp(m))
FROM_A_STATE = ("mamba2", "mamba3", "deltanet", "gated_deltanet", "rwkv7", "rnn", "lstm")
REFERENCE_CASES = ([(name, "plain", {}) for name in MODELS] + [(*c, {}) for c in EXTREME_CASES if c not in UNREFERENCED]
                   + [("mamba2", "plain", dict(ngroups=G)) for G in (1, 4)]
                   + [("mamba3", "plain", o) for o in (dict(ngroups=1), dict(rope_fraction=1.0, d_state=6))]
                   + [("deltanet", "plain", dict(d_model=384, n_head=4, chunk_size=64, use_gate=False))]  # fla's
                   + [("retnet", "plain", dict(d_model=64, n_head=8))])  # gamma_h = 1 - 2^(-5-h) of 8 heads


@pytest.mark.parametrize("name,regime,options", REFERENCE_CASES, ids=[
    "-".join([name, regime, *(f"{k}={v}" for k, v in options.items())]) for name, regime, options in REFERENCE_CASES])
def test_forms_match_reference(name, regime, options):
    """Every form against <model>_reference from empty and after a prefix: outputs, the state where the reference
    keeps one; FROM_A_STATE also from a state moved by 10 U(0, 1) (mamba3's angles past 2 pi, kept in [0, 2 pi)).
    deltanet at fla's defaults, whose RMSNorm hides a missing q scale but for its eps."""
    reference = globals()[name + "_reference"]
    model, g = make(name, edit=EXTREMES.get(name, {}).get(regime), **options), torch.Generator().manual_seed(0)
    x = torch.randn(2, 23, options.get("d_model", D_MODEL), dtype=torch.float64, generator=g)
    with torch.no_grad():
        y_ref, s_ref = reference(model, x)
        for form in forms(name, recurrent=True):
            y, s = model(x, form=form)
            y_cont, s_cont = model(x[:, 6:], model(x[:, :6], form=form)[1], form=form)
            assert_close((y, y_cont), (y_ref, y_ref[:, 6:]), 1e-12, f"{name}/{form} y, y after a prefix")
            if s_ref is not None and name not in ("mamba3", "mlstm"):
                assert_close((s, s_cont), (s_ref, s_ref), 1e-12, f"{name}/{form} state, state after a prefix")
        if name not in FROM_A_STATE:
            return
        _, s0 = model(torch.randn(2, 6, x.shape[-1], dtype=torch.float64, generator=g), form="recurrent")
        s0 = map_state(lambda t: t + 10 * torch.rand(t.shape, dtype=t.dtype, generator=g) if t.is_floating_point()
                       else t, s0)
        y_ref, s_ref = reference(model, x, s0)
        for form in forms(name, recurrent=True):
            y, s = model(x, s0, form=form)
            assert_close((y, s), (y_ref, s_ref), 1e-12, f"{name}/{form} from a state: y, state")
            assert name != "mamba3" or ((s[0] >= 0).all() and (s[0] < 2 * math.pi).all()), form


@pytest.mark.parametrize("name,regime", [(name, "plain") for name in MODELS]
                         + [("mlstm", regime) for regime in EXTREMES["mlstm"]])
def test_short_calls_chain_like_one_call(name, regime):
    """Chained calls of each form (shorter than conv windows, mid-chunk, across chunks; prefill then step()) give one
    call's outputs and state, mLSTM with gates at their ends too; step() from no state: the first token's."""
    model, x = make(name, edit=EXTREMES.get(name, {}).get(regime)), torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y, _ = model.step(x[:, 0])
        assert y.shape == (2, D_MODEL) and rel_err(y, model(x[:, :1], form="recurrent")[0][:, 0]) <= 1e-12
        for form in forms(name, recurrent=True):
            y_full, s_full = model(x, form=form)
            for sizes in ([1, 1, 1, 1, 2, 13], [1, 2, 1, 5, 10], [2, 3, 14], [3, 16], [5, 1, 13], [9, 10], [7, 12],
                          [7] + ["step"] * 12):
                assert_close(chained(model, x, sizes, form), (y_full, s_full), 1e-12, f"{name}/{form} calls of {sizes}")


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_every_length(name):
    """The chunked form at L = 1, 3, 8, 64 from a prefix's state against the recurrent: T < L, ragged, 65 chunks."""
    model, g = make(name), torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, s0 = model(torch.randn(2, 5, D_MODEL, dtype=torch.float64, generator=g), form="recurrent")
        for T in (1, 7, 8, 9, 16, 23, 64, 65):
            x = torch.randn(2, T, D_MODEL, dtype=torch.float64, generator=g)
            y_ref, s_ref = model(x, s0, form="recurrent")
            for L in (1, 3, 8, 64):
                model.chunk_size = L
                assert_close(model(x, s0, form="chunked"), (y_ref, s_ref), 1e-12, f"{name} T={T} L={L}: y, state")


@pytest.mark.parametrize("name", MODELS)
def test_long_decoding_matches_one_pass(name):
    """A 37-token prefill, then 300 step()s or one call, give one pass's outputs and state (every form's): 37 and 337
    cross chunks (16) and conv windows (4); 337 passes 256, where a power-of-two cache or counter would wrap."""
    model = make(name, **({"chunk_size": 16} if name in CHUNKED else {}))
    x = torch.randn(2, 337, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    P, tol = 37, 1e-12  # float64: the summation order alone
    with torch.no_grad():
        y_full, s_full = model(x)
        y_pre, state = model(x[:, :P])
        assert_close(y_pre, y_full[:, :P], tol, f"{name}: the prefill")
        assert_close(model(x[:, P:], state), (y_full[:, P:], s_full), tol, f"{name}: a forward continuing from it")
        ys, state = chained(model, x[:, P:], ["step"] * (x.shape[1] - P), state=state)
        assert_close((*ys.unbind(1), state), (*y_full[:, P:].unbind(1), s_full), tol, f"{name}: step() at P + i, state")
        for form in forms(name, recurrent=True):
            assert_close(model(x, form=form), (y_full, s_full), tol, f"{name}: one {form} pass: y, state")


# the models with a short conv, its width option, and width 1 (the recall study's conv-free variants); Mamba's others
@pytest.mark.parametrize("name,conv,width", [(name, conv, 1) for name, conv in [
    ("deltanet", "conv_size"), ("gated_deltanet", "conv_size"), ("mamba", "d_conv"), ("mamba2", "d_conv"),
    ("kda", "conv_size"), ("mlstm", "conv_size")]] + [("mamba", "d_conv", width) for width in (2, 4, 6)])
def test_conv_widths_forms_agree(name, conv, width):
    """Every form and a loop of step() agree, and mamba's reference; its conv state keeps the last width - 1 inputs."""
    m = make(name, **{conv: width}, **({"dt_rank": 3} if width > 1 else {}))
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    y_steps, _ = chained(m, x, ["step"] * x.shape[1])
    for form in forms(name, recurrent=True):
        y, s = m(x, form=form)
        assert rel_err(y, y_steps) <= 1e-10, form
    if name == "mamba":
        assert s[0].shape == (2, 64, width - 1) and (width == 1 or rel_err(y, mamba_reference(m, x)[0]) <= 1e-10)


@pytest.mark.parametrize("name,d_model,options,message", [
    *[("rwkv7", 32, {o: v}, o) for o, values in (("head_size", (24, 1)), ("chunk_size", (65, 0))) for v in values],
    ("attention", 32, dict(n_head=3), "n_head"), ("attention", 24, dict(n_head=8), "even"),  # head dim 3: no pairs
    ("attention", 32, dict(dropout=1.0), "dropout"), ("gated_deltanet", 30, dict(n_head=4), "n_head"),
    ("mamba3", 32, dict(d_state=2), "rope_fraction"),  # d_state 2: no angle to turn
    ("mamba3", 32, dict(headdim=24), "headdim"), ("kda", 48, dict(head_dim=32), "head_dim"),
    ("kda", 64, dict(chunk_size=33), "chunk_size"), ("kda", 64, dict(chunk_size=0), "chunk_size"),
    ("mlstm", 31, dict(n_head=4), "d_model"), ("mlstm", 32, dict(n_head=3), "d_model"),
] + [(name, D_MODEL, dict(form="no-such-form"), "form") for name in MODELS])
def test_bad_options_are_errors(name, d_model, options, message):
    """A bad option of the constructor, or an unknown form, is a ValueError that names it."""
    with pytest.raises(ValueError, match=message):
        (make(name)(torch.randn(1, 3, d_model, dtype=torch.float64), **options) if "form" in options
         else model_class(name)(d_model, **options))


@pytest.mark.parametrize("device", LONG_DEVICES)
@pytest.mark.parametrize("name,regime", [(name, "plain") for name in MODELS] + EXTREME_CASES)
def test_long_sequence_is_finite(name, regime, device):
    check_long(name, regime, device)


@pytest.mark.parametrize("device,backend,dtype,tol", [
    pytest.param("cpu", "aot_eager", torch.float32, 1e-5, id="cpu"),
    pytest.param("cuda", "inductor", torch.float32, 1e-3, id="cuda-f32", marks=[needs_cuda, slow]),
    pytest.param("cuda", "inductor", torch.bfloat16, 1e-2, id="cuda-bf16", marks=[needs_cuda, slow])])
@pytest.mark.parametrize("name", MODELS)
def test_compiled_matches_eager(name, device, backend, dtype, tol):
    """CPU: Dynamo's whole graph and AOTAutograd (aot_eager: Inductor's C++ takes ~40 s a model here); GPU: Inductor."""
    check_form(name, None, dtype, device, T=45, tol=tol, backend=backend)


@slow
@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_compiled_matches_eager_inductor_interpreted(name):
    """Inductor's own code on the CPU with scan.py's kernel interpreted, for the fastest-compiling graphs: AOTAutograd
    traces the Newton ops' backward formulas, which call scan, with functional tensors no kernel may be launched on."""
    interpreted(f"t.check_form({name!r}, None, torch.float32, 'cpu', T=45, tol=1e-5, backend='inductor')")


# ========== each model: its reference, its extremes, its init ===================================

def assert_drawn(cdf, what):
    """cdf: a distribution's CDF at sorted draws from it: their Kolmogorov-Smirnov distance below 1.95 / sqrt(n)."""
    n = cdf.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks <= 1.95 / math.sqrt(n), f"{what}: KS distance {ks:.3f}, n = {n}"


def uniform(low, high, of=lambda w: w, slack=1e-6):
    """A check that of(w)'s entries are draws from U(low, high): inside (slack: float32 rounding at the ends)."""
    def check(w, what):
        x, pad = of(w.detach().double()).flatten().sort().values, slack * (high - low)
        assert x[0] >= low - pad and x[-1] <= high + pad, \
            f"{what}: range [{x[0]:.4g}, {x[-1]:.4g}] is not inside [{low:.4g}, {high:.4g}]"
        assert_drawn((x - low) / (high - low), f"{what} from U({low:.4g}, {high:.4g})")
    return check


def normal(std, of=lambda w: w):
    """A check that of(w)'s entries are draws from N(0, std^2)."""
    def check(w, what):
        x = of(w).detach().double().flatten().sort().values
        assert_drawn(0.5 * (1 + torch.erf(x / (std * math.sqrt(2)))), f"{what} from N(0, {std:.4g}^2)")
    return check


def xavier(gain):
    """nn.init.xavier_uniform_(weight, gain): U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    def check(layer, what):
        bound = gain * math.sqrt(6 / sum(layer.weight.shape))  # weight [fan_out, fan_in]
        uniform(-bound, bound)(layer.weight, f"{what}.weight (xavier, gain {gain:.4g})")
    return check


def TORCH(layer, what):
    """nn.Linear's and nn.Conv1d's init (kaiming_uniform, a = sqrt(5)): weight and bias U(+-1/sqrt(w[0].numel()))."""
    bound = 1 / math.sqrt(layer.weight[0].numel())
    uniform(-bound, bound)(layer.weight, f"{what}.weight")
    if layer.bias is not None:
        assert layer.bias.abs().max() <= bound, f"{what}.bias outside U(-{bound:.4g}, {bound:.4g})"


def holds(claim):
    def check(w, what):
        assert claim(w.detach() if torch.is_tensor(w) else w), what
    return check


LOG_DT = uniform(math.log(1e-3), math.log(0.1), lambda w: F.softplus(w).log())  # Mamba's dt_init: softplus(dt_bias)
# each model's defaults and init as its docstring and the code it follows say: name -> [(constructor arguments,
# {attribute: the value it equals (None: no such bias), or checks of it})], at widths that give hundreds of draws
INITS = {
    "linear_attention": [(dict(d_model=256), {"qkv": TORCH, "out": TORCH})],  # no init of its own
    "attention": [(dict(d_model=512), {"n_head": 8}), (dict(d_model=256), {"qkv": TORCH, "out": TORCH})],
    "retnet": [(dict(d_model=256, n_head=8), {  # torchscale 0.3.0's: gain 2^-2.5 on W_Q, W_K, W_V, W_G; GroupNorm 1, 0
        **dict.fromkeys("qkvg", xavier(2 ** -2.5)), "out": xavier(1.0), "norm.weight": 1, "norm.bias": 0})],
    "gated_retention": [(dict(d_model=256, n_head=16), {  # YOCO's GateRetention; its gate has no bias: nn.Linear's
        **dict.fromkeys(["q", "k", "v", "g", "gate"], xavier(2 ** -2.5)), "out": xavier(0.5),
        "gate.bias": uniform(-1 / 16, 1 / 16)})],
    "mamba2": [  # mamba_ssm's Mamba2: no projection biases; A = -exp(A_log) ~ U(-16, -1) (A_init_range), D = 1
        (dict(d_model=32), {"n_head": 1, "headdim": 64, "d_state": 128, "d_conv": 4, "chunk_size": 256,
                            "in_proj.bias": None, "out_proj.bias": None, "conv1d.bias.shape": (320,)}),
        (dict(d_model=256, expand=8, headdim=1, d_state=8), {  # 2048 heads
            "dt_bias": LOG_DT, "A_log": uniform(1.0, 16.0, torch.exp, slack=0), "D": 1, "norm_weight": 1})],
    "mamba3": [  # mamba_ssm's Mamba3 (SISO): rope_fraction 1/2, in_proj to 2 d_inner + 2 G N + 3 H + d_state / 4 angles
        (dict(d_model=64), {"d_state": 128, "headdim": 64, "d_inner": 128, "ngroups": 1, "n_head": 2, "n_angles": 32,
                            "chunk_size": 64, "A_floor": 1e-4, "eps": 1e-5, "in_proj.bias": None, "out_proj.bias": None,
                            "in_proj.weight.shape": (2 * 128 + 2 * 128 + 3 * 2 + 32, 64), "in_proj": TORCH,
                            "out_proj": TORCH, "B_bias.shape": (2, 128), "C_bias.shape": (2, 128), "B_bias": 1,
                            "C_bias": 1, "B_norm_weight": 1, "C_norm_weight": 1, "D": 1}),
        (dict(d_model=256, expand=8, headdim=1, d_state=8), {"dt_bias": LOG_DT})],
    "mamba": [  # the paper's and mamba_ssm's: A = -(1..N) in every channel (S4D-real), D = 1, dt_init "random":
        # dt_proj's weight U(-dt_rank^-0.5, dt_rank^-0.5)
        (dict(d_model=64), {"dt_rank": 4, "d_inner": 128, "A_log.shape": (128, 16), "in_proj.bias": None,
                            "x_proj.bias": None, "out_proj.bias": None, "conv1d.bias.shape": (128,)}),
        (dict(d_model=256, expand=8), {"dt_rank": 16, "D": 1, "dt_proj.bias": LOG_DT,
                                       "A_log": holds(lambda w: torch.allclose(w.exp(), torch.arange(1.0, 17.0))),
                                       "dt_proj.weight": uniform(-16 ** -0.5, 16 ** -0.5)})],
    "deltanet": [  # fla's defaults; no init of its own (the optional gate's too), the RMSNorm's weight 1
        (dict(d_model=64), {"n_head": 4, "chunk_size": 64, "conv.kernel_size": (4,), "gate": None}),
        (dict(d_model=256, use_gate=True), {**dict.fromkeys(["qkv", "conv", "beta", "gate", "out"], TORCH),
                                            "norm": 1})],
    "gated_deltanet": [  # fla's: keys 0.75 d_model and values 1.5 d_model wide, no biases, ~6 d_model^2 parameters
        (dict(d_model=384), {"n_head": 6, "key": 288, "value": 576, "chunk_size": 64, "eps": 1e-5,
                             "conv.kernel_size": (4,), "conv.bias": None, "norm.shape": (96,),
                             **{name + ".bias": None for name in ("qkv", "a", "beta", "gate", "out")},
                             "parameters": holds(lambda ps: sum(p.numel() for p in ps()) == pytest.approx(
                                 6 * 384 ** 2, rel=0.02))}),
        (dict(d_model=800, n_head=100), {  # A = exp(A_log) ~ U(0, 16), not Mamba2's (1, 16); dt as Mamba2's
            "A_log": holds(lambda w: 0 < w.exp().min() < 1 and w.exp().max() < 16 and 6 < w.exp().mean() < 10),
            "dt_bias": holds(lambda w: 1e-3 * (1 - 1e-6) <= F.softplus(w).min() and F.softplus(w).max() <= 0.1 * (
                1 + 1e-6) and abs(F.softplus(w).log().mean() - math.log(1e-2)) < 0.5)})],  # log dt centred
    "kda": [  # fla's KimiDeltaAttention at its default width 2048: f_proj and g_proj of rank head_dim (only g_proj's
        # second with a bias); A_log = 0 (fla's with safe_gate), the norm's weight 1; PyTorch's default elsewhere
        (dict(d_model=2048), {"n_head": 16, "head_dim": 128, "chunk_size": 32, "eps": 1e-5, "conv.kernel_size": (4,),
                              "conv.bias": None, "conv.in_channels": 3 * 2048, "A_log.shape": (16,),
                              "norm.shape": (128,), "f_proj.0.weight.shape": (128, 2048),
                              "f_proj.1.weight.shape": (2048, 128), "g_proj.0.weight.shape": (128, 2048),
                              "g_proj.1.weight.shape": (2048, 128), "named_parameters": holds(lambda ps: [
                                  n for n, _ in ps() if n.endswith("bias")] == ["dt_bias", "g_proj.1.bias"]),
                              # q, k, v, o; f_proj and g_proj; b_proj; convs; A_log; dt_bias; norm; g_proj's bias
                              "parameters": holds(lambda ps: sum(p.numel() for p in ps()) == 4 * 2048 ** 2 + 4 * 2048
                                                  * 128 + 2048 * 16 + 3 * 2048 * 4 + 16 + 2048 + 128 + 2048)}),
        (dict(d_model=512), {"n_head": 4, "A_log": 0, "norm": 1, "dt_bias": LOG_DT, **dict.fromkeys(
            ["qkv", "conv", "f_proj.0", "f_proj.1", "b_proj", "g_proj.0", "g_proj.1", "o_proj"], TORCH)}),
        (dict(d_model=32), {"head_dim": 32}), (dict(d_model=384), {"n_head": 3})],
    "rnn": [(dict(d_model=64, d_hidden=4096), {"w_h": uniform(0.0, 1.0), "inp": TORCH, "out": TORCH})],  # |w_h| < 1
    "lstm": [(dict(d_model=64, d_hidden=1024), {  # the biases in the docstring's gate order [i, f, o, g]: f's 1
        "inp.weight": uniform(-1 / 8, 1 / 8), "r": uniform(-1.0, 1.0), "out": TORCH,
        "inp.bias": holds(lambda b: (b.view(4, -1)[1] == 1).all() and b.view(4, -1)[[0, 2, 3]].abs().max() <= 1 / 8)})],
    "mlstm": [  # xLSTM's mLSTMLayer and mLSTMCell: small init N(0, 2 / (5 d_model)), wang init N(0, (2 / sqrt(d))^2)
        (dict(d_model=256), {**dict.fromkeys(["up.weight", "wq", "wk", "wv"], normal(math.sqrt(2 / (5 * 256)))),
                             "down.weight": normal(2 / 16), "conv": TORCH, "gates.weight": 0, "skip": 1, "norm": 0,
                             "n_head": 4, "skip.shape": (512,), "wq.shape": (128, 4, 4), "up.bias": None,
                             "down.bias": None, "conv.bias.shape": (512,),
                             "gates.bias": holds(lambda b: torch.equal(b[4:], torch.linspace(3.0, 6.0, 4)))}),
        (dict(d_model=256, n_head=256), {"gates.bias": [normal(0.1, lambda b: b[:256]), holds(
            lambda b: torch.equal(b[256:], torch.linspace(3.0, 6.0, 256)))]})],
}


@pytest.mark.parametrize("name", INITS)
def test_defaults_and_init_as_documented(name):
    """INITS: every attribute as the table says, of a model built with each entry's arguments."""
    for options, expected in INITS[name]:
        torch.manual_seed(0)
        model = model_class(name)(**options)
        for what, want in expected.items():
            got, where = operator.attrgetter(what)(model), f"{name}{options} {what}"
            for check in want if isinstance(want, list) else [want]:
                if callable(check):
                    check(got, where)
                else:
                    same = torch.equal(got, torch.full_like(got, check)) if torch.is_tensor(got) else got == check
                    assert same, f"{where}: {got} is not {check}"


def rms_norm(y, eps):
    return y / torch.sqrt(y.square().mean(-1, keepdim=True) + eps)


# ---------- linear_attention.py -----------------------------------------------------------------

def linear_attention_reference(model, x):
    """Katharopoulos et al. 2020 (eq. 4-9), float64: phi = elu + 1, y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),
    S_i = sum_{j<=i} phi(k_j) v_j^T and z_i = sum_{j<=i} phi(k_j) rebuilt for every i by a loop over j (eps: the
    module's guard). Returns y and the state as documented: [S^T; z^T] [B, H, E + 1, D]."""
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    Wq, Wk, Wv = model.qkv.weight.double().chunk(3, 0)  # output rows [q | k | v], head after head
    q, k, v = ((x.double() @ W.T).unflatten(-1, (model.n_head, -1)) for W in (Wq, Wk, Wv))
    y = torch.zeros_like(v)
    for i in range(x.shape[1]):
        S = sum(phi(k[:, j])[..., :, None] * v[:, j][..., None, :] for j in range(i + 1))  # S_i [B, H, D, E]
        z = sum(phi(k[:, j]) for j in range(i + 1))  # z_i [B, H, D]
        y[:, i] = (phi(q[:, i])[..., :, None] * S).sum(-2) / ((phi(q[:, i]) * z).sum(-1, keepdim=True) + model.eps)
    return y.flatten(2) @ model.out.weight.double().T, torch.cat([S.transpose(-1, -2), z[..., None, :]], -2)


# ---------- retnet.py and gated_retention.py ----------------------------------------------------

def retention_reference(model, x, gamma):
    """Retention from the formulas, independent of retnet.py and gated_retention.py: complex rotary, a double loop
    over y_t = sum_{s<=t} (prod_{s<r<=t} gamma_r) Re(q_t conj k_s) v_s / sqrt(Dk), gamma [B, T, H] taken literally
    (no log space). Returns y [B, T, H, Dv] before the norm."""
    B, T, d = x.shape
    q, k, v = ((x @ lin.weight.T).view(B, T, model.n_head, -1) for lin in (model.q, model.k, model.v))
    D = q.shape[-1]
    theta = torch.tensor([10000.0 ** (-j / (D // 2 - 1)) for j in range(D // 2)], dtype=torch.float64)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * theta)
    qc, kc = (torch.view_as_complex(z.reshape(B, T, -1, D // 2, 2).contiguous()) * rot[:, None] for z in (q, k))
    y = torch.zeros_like(v)
    for ti in range(T):
        for si in range(ti + 1):
            decay = gamma[:, si + 1:ti + 1].prod(1)  # [B, H]: prod_{s<r<=t} gamma_r, 1 where empty
            score = (qc[:, ti] * kc[:, si].conj()).sum(-1).real / math.sqrt(D)  # [B, H]
            y[:, ti] += (decay * score)[..., None] * v[:, si]
    return y


def retnet_reference(model, x):
    """RetNet (Sun et al. 2023): gamma_h = 1 - 2^(-5-h) (sec. 2.2), GroupNorm per head, swish gate."""
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(model.n_head)], dtype=torch.float64)
    y = retention_reference(model, x, gamma.expand(*x.shape[:2], -1))
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + model.norm.eps)
    y = y.flatten(2) * model.norm.weight + model.norm.bias
    return (F.silu(x @ model.g.weight.T) * y) @ model.out.weight.T, None


def gated_retention_reference(model, x):
    """Gated retention (YOCO, Sun et al. 2024): gamma_t = sigmoid(w.x_t + b)^(1/16), RMSNorm, swish gate."""
    y = retention_reference(model, x, torch.sigmoid(x @ model.gate.weight.T + model.gate.bias) ** (1 / 16))
    return (F.silu(x @ model.g.weight.T) * rms_norm(y, model.eps).flatten(2)) @ model.out.weight.T, None


@pytest.mark.parametrize("name", ["retnet", "gated_retention"])
def test_retention_positions_are_relative_and_per_sequence(name):
    """Positions are relative (from an empty state the start counter does not matter) and per row of the batch."""
    model, x = make(name).requires_grad_(False), torch.randn(2, 11, 32, dtype=torch.float64)
    y0, (S, _) = model(x)
    assert rel_err(model(x, (torch.zeros_like(S), torch.tensor([1000, 123457])))[0], y0) <= 1e-10
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    (_, s_a), (_, s_b) = (model(torch.randn(1, n, 32, dtype=torch.float64)) for n in (3, 6))
    y, (_, seen) = model(x, tuple(torch.cat(pair) for pair in zip(s_a, s_b)))
    rows = [model(x[i:i + 1], s_i, form="recurrent")[0] for i, s_i in enumerate((s_a, s_b))]
    assert rel_err(y, torch.cat(rows)) <= 1e-12 and seen.tolist() == [12, 15]


RETENTION_LONG = [("retnet", "plain")] + [("gated_retention", r) for r in ("plain", "one", "zero", "jumpy")]


@pytest.mark.parametrize("device", LONG_DEVICES)
@pytest.mark.parametrize("name,regime", RETENTION_LONG)
def test_retention_long_forms_finite_and_agree(name, regime, device):
    """T = 16384 float32 (parallel: 4096 on the CPU): every form finite, chunked = recurrent (tf32 on a GPU); parallel
    with strong gates only finite: float32 c_t - c_s of log gates ~1e7 are coarse (1.9e-4, T = 4096, jumpy). Gated
    retention's gate at one is log gamma = 0 exactly: no decay at all."""
    model = make(name, torch.float32, device, edit=EXTREMES.get(name, {}).get(regime))
    x, Tp, tol = torch.randn(1, 16384, 32, device=device), *((16384, 1e-3) if device == "cuda" else (4096, 1e-4))
    with torch.no_grad():
        assert regime != "one" or (F.logsigmoid(model.gate(x)) / model.tau == 0).all()
        (y_c, s_c), (y_r, s_r) = (model(x, form=form) for form in ("chunked", "recurrent"))
        y_p, s_p = model(x[:, :Tp], form="parallel")
    assert all(torch.isfinite(t).all() for t in (y_c, s_c[0], y_r, s_r[0], y_p, s_p[0]))
    assert rel_err(y_c, y_r) <= tol and rel_err(s_c[0], s_r[0]) <= tol
    print(f"{name} parallel vs recurrent, {regime}, T={Tp}, {device}: {rel_err(y_p, y_r[:, :Tp]):.2e}")
    assert regime not in ("plain", "one") or rel_err(y_p, y_r[:, :Tp]) <= tol


@needs_cuda
@pytest.mark.parametrize("name,regime,form,T,options", [  # retention's [B, H, T, T] matrices: batch 1
    (*case, "parallel", 16384, dict(B=1)) for case in RETENTION_LONG] + [
    ("deltanet", "plain", form, T, dict(d_model=64, n_head=4, chunk_size=64, use_gate=False))  # fla's defaults
    for form, T in (("parallel", 4096), ("chunked", 16384))],
    ids=[f"{name}-{regime}" for name, regime in RETENTION_LONG] + ["deltanet-parallel", "deltanet-chunked"])
def test_long_forms_finite_cuda(name, regime, form, T, options):
    """check_long through non-default forms under bf16 autocast: retention's parallel; deltanet at fla's defaults."""
    check_long(name, regime, "cuda", form, T, **options)


# ---------- mamba2.py ---------------------------------------------------------------------------

def mamba2_reference(model, x, state=None):
    """The block from the paper's equations: a window-sum conv, h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t =
    h_t C_t + D x_t per head (scalar_decay_reference), groups sharing B and C, RMSNorm per group of the gated output."""
    K, H, P, G, N, di = model.d_conv, model.n_head, model.headdim, model.ngroups, model.d_state, model.d_inner
    B, T = x.shape[:2]
    conv0, h0 = state if state is not None else (x.new_zeros(B, model.conv_dim, K - 1), x.new_zeros(B, H, P, N))
    z, xbc, dtr = (x @ model.in_proj.weight.T).split([di, model.conv_dim, H], -1)
    pad = torch.cat([conv0.transpose(1, 2), xbc], 1)  # [B, K - 1 + T, conv_dim]
    c = F.silu(sum(pad[:, i:i + T] * model.conv1d.weight[:, 0, i] for i in range(K)) + model.conv1d.bias)
    xs, Bv, Cv = c.split([di, G * N, G * N], -1)
    xs, dt = xs.unflatten(-1, (H, P)), F.softplus(dtr + model.dt_bias)  # [B, T, H, P], [B, T, H]
    y, h = scalar_decay_reference(Cv.unflatten(-1, (G, N)), Bv.unflatten(-1, (G, N)), dt[..., None] * xs,
                                  -torch.exp(model.A_log) * dt, h0)
    y = (y + model.D[:, None] * xs).flatten(2) * F.silu(z)
    y = rms_norm(y.unflatten(-1, (G, -1)), model.eps).flatten(2) * model.norm_weight
    return y @ model.out_proj.weight.T, (pad[:, pad.shape[1] - (K - 1):].transpose(1, 2), h)


@pytest.mark.parametrize("name,shapes", [  # [B, *shape] after T tokens
    ("mamba2", lambda m, T: [(m.conv_dim, m.d_conv - 1), (m.n_head, m.headdim, m.d_state)]),
    ("mamba3", lambda m, T: [(m.n_head, m.n_angles), (m.n_head, m.headdim, m.d_state), (m.n_head, m.d_state),
                             (m.n_head, m.headdim)]),
    ("attention", lambda m, T: [(m.n_head, T, D_MODEL // m.n_head)] * 2)], ids=["mamba2", "mamba3", "attention"])
def test_state_shapes_and_float32_under_autocast(name, shapes):
    """The state's documented shapes (after 5 tokens and a step()) and dtype float32, under bf16 autocast too."""
    m = make(name, torch.float32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, state = m(torch.randn(3, 5, D_MODEL))
            _, stepped = m.step(torch.randn(3, D_MODEL), state)
        for T, s in ((5, state), (6, stepped)):
            assert [(t.shape, t.dtype) for t in s] == [((3, *sh), torch.float32) for sh in shapes(m, T)], (autocast, T)


@needs_cuda
@pytest.mark.parametrize("regime", EXTREMES["mamba2"])
def test_mamba2_cuda_bf16_at_the_extremes(regime):
    """The bf16 chunked form still matches float32 recurrent on 300 tokens with the decays at their ends."""
    m = make("mamba2", torch.float32, "cuda", edit=EXTREMES["mamba2"][regime])
    x = torch.randn(2, 300, 32, device="cuda")
    with torch.no_grad():
        y32, _ = m(x, form="recurrent")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y16, _ = m(x)
    assert rel_err(y16, y32) <= 5e-2


# ---------- mamba3.py ---------------------------------------------------------------------------

def to_complex(v, theta, n):
    """A turned pair (v_2i, v_2i+1) of the layer's state -> the complex number it stands for in the unturned
    frame, exp(i theta) (v_2i - i v_2i+1); dimensions from 2 n on stay real. theta [B, H, (1,) n], v [B, H, (P,) N]."""
    return torch.exp(1j * theta) * torch.complex(v[..., 0:2 * n:2], -v[..., 1:2 * n:2]), v[..., 2 * n:]


def from_complex(vc, vr, theta):
    """to_complex's inverse: the complex pairs vc and the real dimensions vr -> the layer's turned vector."""
    z = vc * torch.exp(-1j * theta)
    return torch.cat([torch.stack([z.real, -z.imag], -1).flatten(-2), vr], -1)


def mamba3_reference(m, x, state=None):
    """The paper's complex SSM with the exponential-trapezoidal rule, written out token by token in float64 complex
    numbers, with no rotary: per complex pair, B~ = b_2i - i b_2i+1, C~ = c_2i + i c_2i+1 and
        h_t = exp(dt (A + i w)) h_{t-1} + (1 - lambda) dt exp(dt (A + i w)) B~_{t-1} x_{t-1} + lambda dt B~_t x_t,
        y_t = Re(h_t C~_t) + D x,  w = pi tanh(angle),
    the rest of the N dimensions real (w = 0). The layer's state (turned by theta, the sum of dt w) is read and
    returned in its own layout: theta mod 2 pi, h, B_prev, x_prev."""
    H, P, N, G, n = m.n_head, m.headdim, m.d_state, m.ngroups, m.n_angles
    state = state or [x.new_zeros(x.shape[0], H, *s) for s in ((n,), (P, N), (N,), (P,))]
    theta, h, B_prev, x_prev = (s.clone() for s in state)
    hc, hr = to_complex(h, theta[:, :, None], n)  # [B, H, P, n] complex, [B, H, P, N - 2n]
    bc_prev, br_prev = to_complex(B_prev, theta, n)
    ys = []
    for t in range(x.shape[1]):  # every head at once: [B, H, ...]; head k reads group k // (H / G)
        z, xs, Bv, Cv, dtr, Ar, lr, ang = (x[:, t] @ m.in_proj.weight.T).split(m.sizes, -1)
        dt, lam = F.softplus(dtr + m.dt_bias)[..., None], torch.sigmoid(lr)[..., None]  # [B, H, 1]
        A = -torch.where(Ar >= 0, 1 + Ar, 1 / (1 - Ar)).clamp(min=m.A_floor)[..., None]
        b, c = ((rms_norm(u.unflatten(-1, (G, N)), m.eps) * w).repeat_interleave(H // G, 1) + bias
                for u, w, bias in ((Bv, m.B_norm_weight, m.B_bias), (Cv, m.C_norm_weight, m.C_bias)))  # [B, H, N]
        bc, br = torch.complex(b[..., 0:2 * n:2], -b[..., 1:2 * n:2]), b[..., 2 * n:]  # turned pairs, the rest real
        cc = torch.complex(c[..., 0:2 * n:2], c[..., 1:2 * n:2])
        alpha_c = torch.exp(dt * torch.complex(A, math.pi * torch.tanh(ang)[:, None]))  # [B, H, n]
        theta = theta + dt * math.pi * torch.tanh(ang)[:, None]
        xk, xp = xs.unflatten(-1, (H, P))[..., None], x_prev[..., None]  # [B, H, P, 1]
        beta_, gamma = ((1 - lam) * dt)[..., None], (lam * dt)[..., None]  # [B, H, 1, 1]; beta = beta_ * alpha
        hc = alpha_c[:, :, None] * (hc + beta_ * xp * bc_prev[:, :, None]) + gamma * xk * bc[:, :, None]
        hr = torch.exp(dt * A)[..., None] * (hr + beta_ * xp * br_prev[:, :, None]) + gamma * xk * br[:, :, None]
        y = (hc * cc[:, :, None]).sum(-1).real + (hr * c[:, :, None, 2 * n:]).sum(-1) + m.D[:, None] * xk[..., 0]
        bc_prev, br_prev, x_prev = bc, br, xk[..., 0]
        ys.append((y.flatten(1) * F.silu(z)) @ m.out_proj.weight.T)
    return torch.stack(ys, 1), (theta.remainder(2 * math.pi), from_complex(hc, hr, theta[:, :, None]),
                                from_complex(bc_prev, br_prev, theta), x_prev)


@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunked"])
def test_mamba3_lambda_one_is_mamba2_euler(form):
    """lambda = 1: every form is Mamba-2's exponential-Euler recurrence (scalar_decay_reference); 1/2 is not."""
    mamba3, g = module("mamba3"), torch.Generator().manual_seed(0)
    Bsz, T, H, P, N = 2, 13, 3, 4, 6
    x, B, C = (torch.randn(Bsz, T, H, d, dtype=torch.float64, generator=g) for d in (P, N, N))
    dt = torch.rand(Bsz, T, H, dtype=torch.float64, generator=g)
    gl = -dt * torch.rand(Bsz, T, H, dtype=torch.float64, generator=g) * 3
    h, B_prev, x_prev = (torch.randn(*s, dtype=torch.float64, generator=g)
                         for s in ((Bsz, H, P, N), (Bsz, H, N), (Bsz, H, P)))
    trapezoid = lambda lam: getattr(mamba3, f"trapezoid_{form}")(  # noqa: E731
        x, gl, dt, torch.full_like(dt, lam), B, C, h, B_prev, x_prev, *[5] * (form == "chunked"))
    euler = scalar_decay_reference(C, B, dt[..., None] * x, gl, h)
    assert_close(trapezoid(1.0), euler, 1e-12, "lambda = 1: y, h")
    assert rel_err(trapezoid(0.5)[0], euler[0]) > 1e-2


# ---------- mamba.py ----------------------------------------------------------------------------

def mamba_reference(m, x):
    """The block written out from the paper, from the raw parameters: its own conv (a window sum), softplus as
    log(1 + e^x) (x itself above 20), the SSM by selective_scan_reference (one step at a time)."""
    K, Di, N, R = m.d_conv, m.d_inner, m.d_state, m.dt_rank
    u, z = (x @ m.in_proj.weight.T).split(Di, -1)
    upad = torch.cat([x.new_zeros(x.shape[0], K - 1, Di), u], 1)  # [B, K-1+T, Di]
    v = m.conv1d.bias + sum(m.conv1d.weight[:, 0, k] * upad[:, k:k + x.shape[1]] for k in range(K))
    v = v * torch.sigmoid(v)
    dlow, Bt, Ct = (v @ m.x_proj.weight.T).split([R, N, N], -1)
    pre = dlow @ m.dt_proj.weight.T + m.dt_proj.bias
    dt = torch.where(pre > 20, pre, torch.log1p(torch.exp(pre)))
    y, h = selective_scan_reference(v, dt, -torch.exp(m.A_log), Bt, Ct)
    return ((y + m.D * v) * z * torch.sigmoid(z)) @ m.out_proj.weight.T, (upad[:, -(K - 1):].transpose(1, 2), h)


def test_mamba_bf16_parameters_run():
    x, mb = torch.randn(2, 30, 32), make("mamba", torch.bfloat16)
    y32, _ = make("mamba", torch.float32)(x)
    for form in mb.forms:
        y, (c, h) = mb(x.bfloat16(), form=form)
        assert y.dtype == torch.bfloat16 and h.dtype == torch.float32 and rel_err(y, y32) <= 5e-2


def test_mamba_parallel_keeps_no_state_sequence():
    """autograd keeps nothing [B, T, d_inner, N]-sized (a scan then y = C . h keeps a and h): backward recomputes."""
    def largest_saved(fn, *args):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn(*args)
        return max(sizes)
    m, x = make("mamba", torch.float32, d_state=16), torch.randn(2, 40, 32, requires_grad=True)
    A = torch.rand(2, 40, m.d_inner, 16, requires_grad=True)  # the premise: the old form's saved a and h
    # the bound: in_proj's output [B, T, 2 d_inner]
    assert largest_saved(m, x) <= 2 * 40 * 2 * m.d_inner < largest_saved(lambda A: scan(A, A * 1.0), A)


@needs_cuda
def test_mamba_parallel_memory_cuda():
    """bf16 forward and backward take less than two [B, T, d_inner, N] float32 tensors (the unfused form: 3 + grads)."""
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


# ---------- deltanet.py, gated_deltanet.py, kda.py: the delta rules ------------------------------

def delta_rule_reference(q, k, v, beta, S, alpha=None):
    """S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, y_t = S_t q_t, as written with explicit Dk x Dk
    matrices: the delta rule (alpha = 1) and the gated delta rule (Yang et al. 2025)."""
    q, k, v, beta, S = (x.double() for x in (q, k, v, beta, S))
    alpha = torch.ones_like(beta) if alpha is None else alpha.double()
    I, ys = torch.eye(k.shape[-1], dtype=torch.float64), []
    for t in range(q.shape[1]):
        kt, vt, bt, at = k[:, t], v[:, t], beta[:, t, :, None, None], alpha[:, t, :, None, None]
        S = at * S @ (I - bt * kt[..., :, None] * kt[..., None, :]) + bt * vt[..., :, None] * kt[..., None, :]
        ys.append((S @ q[:, t, ..., None])[..., 0])
    return torch.stack(ys, 1), S


def kda_paper(q, k, v, beta, alpha, S):
    """Kimi Linear's KDA as written, float64: S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t, each transition an explicit Dk x Dk matrix; S [B, H, Dk, Dv] (the paper's layout, kda.py's mT)."""
    q, k, v, beta, alpha, S = (x.double() for x in (q, k, v, beta, alpha, S))
    I, ys = torch.eye(k.shape[-1], dtype=torch.float64), []
    for t in range(q.shape[1]):
        kt, bt = k[:, t, :, :, None], beta[:, t, :, None, None]
        S = (I - bt * kt @ kt.mT) @ torch.diag_embed(alpha[:, t]) @ S + bt * kt @ v[:, t, :, None, :]
        ys.append((S.mT @ q[:, t, :, :, None])[..., 0])
    return torch.stack(ys, 1), S


def delta_reference(rule, q, k, v, beta, *g_S):
    """The rule's reference on delta_inputs' inputs, in kda.py's layout."""
    if rule == "kda":
        y, S = kda_paper(q, k, v, beta, g_S[0].exp(), g_S[1].mT)
        return y, S.mT
    return delta_rule_reference(q, k, v, beta, g_S[-1], *[g.exp() for g in g_S[:-1]])


# log alpha, gated_deltanet's one per head: ordinary; mild (the state decays to ~0.2 in 37 tokens); 1; exp(-1e4) = 0;
# jumping between the two. kda's one per key channel: ordinary; 1; e^-5, the gate's bound (kda.LOWER_BOUND); jumping
LOG_ALPHAS = {
    "gated_deltanet": {
        "random": lambda s, g: -2 * torch.rand(s, generator=g), "mild": lambda s, g: -0.08 * torch.rand(s, generator=g),
        "one": lambda s, g: torch.zeros(s), "zero": lambda s, g: torch.full(s, -1e4),
        "jumpy": lambda s, g: -1e4 * torch.randint(0, 2, s, generator=g)},
    "kda": {"random": lambda s, g: -5 * torch.rand(s, generator=g), "one": lambda s, g: torch.zeros(s),
            "lowest": lambda s, g: torch.full(s, -5.0), "jumpy": lambda s, g: -5 * torch.randint(0, 2, s, generator=g)},
}
BETAS = {"random": None, "zero": lambda B, T, H, g: torch.zeros(B, T, H), "one": lambda B, T, H, g: torch.ones(B, T, H),
         "zero_or_one": lambda B, T, H, g: torch.randint(0, 2, (B, T, H), generator=g).float()}
DELTA_FORMS = {"deltanet": ("recurrent", "parallel", "chunked"), "gated_deltanet": ("recurrent", "parallel", "chunked"),
               "kda": ("recurrent", "chunked")}


def delta_inputs(rule="deltanet", gate="random", B=2, T=37, H=3, Dk=8, Dv=5, dtype=torch.float64, seed=0, beta=None,
                 spread=None):
    """q, k [B, T, H, Dk] (unit vectors), v [B, T, H, Dv], beta [B, T, H] (BETAS), the rule's log alpha (LOG_ALPHAS:
    gated_deltanet [B, T, H], kda [B, T, H, Dk], deltanet none) and S0 [B, H, Dv, Dk]. spread: one key per head, moved
    by spread N(0, 1) each token (0: the same key again and again)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=dtype), dim=-1)
    k = torch.randn(B, T if spread is None else 1, H, Dk, generator=g, dtype=dtype)
    k = F.normalize(k + spread * torch.randn(B, T, H, Dk, generator=g, dtype=dtype) if spread else k, dim=-1)
    k = k.expand(B, T, H, Dk)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    b = torch.rand(B, T, H, generator=g, dtype=dtype) if beta is None else beta(B, T, H, g).to(dtype)
    S0 = torch.randn(B, H, Dv, Dk, generator=g, dtype=dtype)
    log_alpha = [] if rule == "deltanet" else [
        LOG_ALPHAS[rule][gate]((B, T, H, Dk)[:3 + (rule == "kda")], torch.Generator().manual_seed(seed + 1)).to(dtype)]
    return q, k.contiguous(), v, b, *log_alpha, S0


def delta_rule(rule, form, *inputs, L=8):
    """The rule's core <form> (deltanet.py's delta_rule_<form>, ...) on delta_inputs' inputs; chunked: chunks of L."""
    name = {"deltanet": "delta_rule", "gated_deltanet": "gated_delta_rule", "kda": "kda"}[rule] + "_" + form
    return getattr(module(rule), name)(*inputs, *[L] * (form == "chunked"))


def test_delta_rule_gradient_step_reading():
    """S_t = S_{t-1} - beta_t * grad_S 1/2 ||S k_t - v_t||^2 at S = S_{t-1}."""
    q, k, v, b, S0 = delta_inputs(T=1)
    grad = torch.func.grad(lambda S: 0.5 * (torch.einsum("bhed,bhd->bhe", S, k[:, 0]) - v[:, 0]).square().sum())(S0)
    _, S1 = delta_rule("deltanet", "recurrent", q, k, v, b, S0)
    assert rel_err(S1, S0 - b[:, 0, :, None, None] * grad) <= 1e-14


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 5, 8, 33])
@pytest.mark.parametrize("name", ["deltanet", "kda"])
def test_chunk_states_composes_affine_maps(name, n_chunks):
    """The scan alone, on maps that are not contractions (a misplaced factor shows), against the maps one by one."""
    g = torch.Generator().manual_seed(n_chunks)
    M = torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(2, n_chunks, 3, 4, 4, generator=g, dtype=torch.float64)
    C = torch.randn(2, n_chunks, 3, 5, 4, generator=g, dtype=torch.float64)  # [B, T/L, H, *]
    S = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    ins, last = module(name).chunk_states(M, C, S)
    for c in range(n_chunks):
        assert rel_err(ins[:, c], S) <= 1e-12, c
        S = S @ M[:, c] + C[:, c]
    assert rel_err(last, S) <= 1e-12


@pytest.mark.parametrize("device,form,L,T,tol,spread", [
    *[pytest.param("cpu", "chunked", L, 16384, 1e-4, None, marks=cpu_long) for L in (8, 64)],
    *[("cpu", form, 64, 4096, 1e-3, spread) for form in ("parallel", "chunked") for spread in (0.0, 1e-3)],
    pytest.param("cuda", "parallel", 64, 4096, 2e-3, None, marks=needs_cuda),  # tf32 matmuls
    pytest.param("cuda", "chunked", 64, 16384, 2e-3, None, marks=[needs_cuda, slow])])
def test_delta_rule_long_float32(device, form, L, T, tol, spread):
    """T = 16384 (the GPU's parallel form: 4096) in float32 from a random state against the float64 recurrence; keys
    at T = 4096 identical with beta = 1 (A = I + strictly-lower ones) or spread 1e-3 apart with beta near 1."""
    beta = None if spread is None else (lambda B, T, H, g: 1 - spread * torch.rand(B, T, H, generator=g))
    B, H, seed = (1, 2, 3) if device == "cpu" else (2, 4, 5)
    q, k, v, b, S0 = (t.to(device) for t in delta_inputs(B=B, T=T, H=H, Dk=16, Dv=16, dtype=torch.float32, seed=seed,
                                                         beta=beta, spread=spread))
    with torch.no_grad():
        assert_close(delta_rule("deltanet", form, q, k, v, b, S0, L=L),
                     delta_rule("deltanet", "recurrent", q, k, v, b, S0.double()), tol, f"spread {spread}: y, S")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("rule,case", [("deltanet", beta) for beta in BETAS]
                         + [(rule, gate) for rule in LOG_ALPHAS for gate in LOG_ALPHAS[rule] if gate != "mild"])
def test_delta_rules_against_reference(rule, case, dtype, tol):
    """Every form's outputs, state and gradients against the float64 reference, T = 70, chunks 4, 8, 32 (ragged),
    betas and alphas at their ends; dL/dlog(alpha) against dL/dv's scale (0 in the reference where alpha underflows)."""
    beta = BETAS[case] if rule == "deltanet" else None
    inputs = [t.requires_grad_() for t in delta_inputs(rule, case, T=70, dtype=dtype, beta=beta)]
    names = ["y", "S"] + ["grad " + n for n in ["q", "k", "v", "beta"] + ["log alpha"] * (rule != "deltanet") + ["S0"]]
    gen = torch.Generator().manual_seed(2)
    for form, L in [(form, L) for form in DELTA_FORMS[rule] for L in ((4, 8, 32) if form == "chunked" else (8,))]:
        check_grads(lambda *i: delta_rule(rule, form, *i, L=L), lambda *i: delta_reference(rule, *i), inputs, names,
                    tol, lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64), f"{form} L={L}",
                    against={"grad log alpha": "grad v"} if rule == "gated_deltanet" else None)


@pytest.mark.parametrize("rule,form", [(rule, form) for rule in LOG_ALPHAS for form in DELTA_FORMS[rule]])
def test_one_decay_per_head_is_the_gated_delta_rule(rule, form):
    """One decay per head (in every channel, kda) is the gated delta rule, alpha = 1 exactly deltanet.py's form;
    alpha = 0 keeps only the current token's write (kda: the recurrence; its chunked form needs log alpha >= -5)."""
    for gate in ("random", "one") if (rule, form) == ("kda", "chunked") else ("random", "one", "zero"):
        q, k, v, b, g, S0 = delta_inputs("gated_deltanet", gate)
        if rule == "kda":  # alpha = 0 as exp(-inf)
            g = (torch.full_like(g, -math.inf) if gate == "zero" else g)[..., None].expand_as(k)
        y, S = delta_rule(rule, form, q, k, v, b, g, S0)
        refs = {"random": [delta_rule_reference(q, k, v, b, S0, g[..., 0].exp() if rule == "kda" else g.exp())],
                "one": [delta_rule_reference(q, k, v, b, S0), delta_rule("deltanet", form, q, k, v, b, S0)],
                "zero": [(b[..., None] * (q * k).sum(-1, keepdim=True) * v,  # y_t = beta_t (k_t . q_t) v_t
                          b[:, -1, :, None, None] * v[:, -1, :, :, None] * k[:, -1, :, None, :])]}[gate]
        for y_ref, S_ref in refs:
            assert rel_err(y, y_ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12, gate


@pytest.mark.parametrize("rule,form", [(rule, form) for rule in DELTA_FORMS for form in DELTA_FORMS[rule]])
def test_delta_rules_beta_zero_skips_and_beta_one_overwrites(rule, form):
    """beta = 0: nothing is written, S only decays. beta = 1: each token overwrites its key's slot, S_t k_t = v_t; with
    one key again and again S k = v exactly, and (one decay per head) what is orthogonal to k only decays."""
    def rule_of(beta, read_k=False, **kw):  # q, k, v, log alpha per key channel, S0, y, S
        q, k, v, b, *g, S0 = delta_inputs(rule, "mild" if rule == "gated_deltanet" else "random", beta=beta, **kw)
        y, S = delta_rule(rule, form, k if read_k else q, k, v, b, *g, S0)
        g = g[0] if rule == "kda" else (g[0] if g else torch.zeros_like(b))[..., None].expand_as(k)
        return q, k, v, g, S0, y, S
    q, k, v, g, S0, y, S = rule_of(BETAS["zero"])
    c = g.cumsum(1)
    assert rel_err(S, S0 * c[:, -1, :, None, :].exp()) <= 1e-12
    assert rel_err(y, torch.einsum("bhed,bthd->bthe", S0, q * c.exp())) <= 1e-12
    q, k, v, g, S0, y, S = rule_of(BETAS["one"], read_k=True)
    assert rel_err(y, v) <= 1e-10
    q, k, v, g, S0, y, S = rule_of(BETAS["one"], spread=0.0)
    assert rel_err(torch.einsum("bhed,bhd->bhe", S, k[:, -1]), v[:, -1]) <= 1e-10  # S k = v exactly
    if rule != "kda":
        P = torch.eye(8, dtype=torch.float64) - k[:, 0, :, :, None] * k[:, 0, :, None, :]
        assert rel_err(S @ P, g[..., 0].sum(1).exp()[..., None, None] * S0 @ P) <= 1e-10  # nothing orthogonal changed


@pytest.mark.parametrize("L", [1, 3, 8, 32])
def test_kda_chunked_every_length(L):
    """Ragged last chunks, T below a chunk, one token per chunk, gates jumping between their ends: as the recurrence."""
    for T in (1, 2, 7, 8, 9, 23, 31, 32, 33, 70):
        inputs = delta_inputs("kda", "jumpy", T=T, seed=T)
        assert_close(delta_rule("kda", "chunked", *inputs, L=L), delta_rule("kda", "recurrent", *inputs), 1e-10, T)


def conv_qkv_reference(model, x, sizes, H, conv0=None):
    """fla's short-conv path as written: x @ model.qkv^T through a causal depthwise conv (a window sum from conv0 [B,
    K - 1, C] or zeros), SiLU, q, k, v of sizes and H heads; q and k l2-normalised (fla's eps 1e-6), q scaled by
    Dk^-1/2 (as fla's kernels). Returns q, k, v [B, T, H, *] and the conv's last K - 1 inputs."""
    W, K = model.conv.weight[:, 0], model.conv.weight.shape[-1]  # W [C, K]
    p = torch.cat([x.new_zeros(x.shape[0], K - 1, W.shape[0]) if conv0 is None else conv0, x @ model.qkv.weight.T], 1)
    c = torch.stack([sum(p[:, t + i] * W[:, i] for i in range(K)) for t in range(x.shape[1])], 1)
    q, k, v = (z.unflatten(-1, (H, -1)) for z in F.silu(c).split(sizes, -1))
    q, k = (z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6) for z in (q, k))
    return q / math.sqrt(q.shape[-1]), k, v, p[:, -(K - 1):]


def deltanet_reference(model, x, state=None):
    """DeltaNet and Gated DeltaNet rebuilt as fla defines them: conv_qkv_reference, (gated) alpha = exp(-softplus(w_a x
    + dt_bias) exp(A_log)), the rule as written, RMSNorm, the output gate (gated: FusedRMSNormGated)."""
    (B, T, d), H, gated = x.shape, model.n_head, hasattr(model, "A_log")
    key, value = (model.key, model.value) if gated else (d, d)
    S0, conv0 = state if state is not None else (x.new_zeros(B, H, value // H, key // H), None)
    q, k, v, conv = conv_qkv_reference(model, x, [key, key, value], H, conv0)
    alpha = [torch.exp(-F.softplus(x @ model.a.weight.T + model.dt_bias) * torch.exp(model.A_log))] if gated else []
    y, S = delta_rule_reference(q, k, v, torch.sigmoid(x @ model.beta.weight.T), S0, *alpha)
    y = rms_norm(y, model.eps) * model.norm
    if model.gate is not None:
        y = y * F.silu(x @ model.gate.weight.T).unflatten(-1, (H, -1))
    return y.flatten(2) @ model.out.weight.T, (S, conv)


gated_deltanet_reference = deltanet_reference


def kda_reference(model, x):
    """The layer rebuilt from its parameters as fla's KimiDeltaAttention defines it (safe_gate, lower_bound -5):
    conv_qkv_reference, fla's lower-bound gate, the paper's recurrence, FusedRMSNormGated with a sigmoid."""
    (B, T, d), H, D = x.shape, model.n_head, model.head_dim
    q, k, v, conv = conv_qkv_reference(model, x, d, H)
    f = (x @ model.f_proj[0].weight.T @ model.f_proj[1].weight.T).unflatten(-1, (H, D))
    alpha = torch.exp(-5 * torch.sigmoid(model.A_log.exp()[:, None] * (f + model.dt_bias.view(H, D))))
    y, S = kda_paper(q, k, v, torch.sigmoid(x @ model.b_proj.weight.T), alpha, x.new_zeros(B, H, D, D))
    gate = x @ model.g_proj[0].weight.T @ model.g_proj[1].weight.T + model.g_proj[1].bias
    y = rms_norm(y, 1e-5) * model.norm * torch.sigmoid(gate).unflatten(-1, (H, D))
    return y.flatten(2) @ model.o_proj.weight.T, (S.mT, conv)


# ---------- rwkv7.py ----------------------------------------------------------------------------

def rwkv7_reference(model, x, state=None):
    """The time mix token by token in float64, as BlinkDL/RWKV-LM's RWKV-v7/rwkv_v7_demo.py: token shift,
    w = exp(-exp(-softplus(-(w0 + tanh(x_w w1) w2)) - 0.5)), a = sigmoid(a0 + x_a a1 a2), g = sigmoid(x_g g1) g2,
    kappa = normalize(k * k_k), k *= 1 + (a - 1) k_a, the transition G_t = diag(w_t) - kappa_t (a_t * kappa_t)^T as a Dk
    x Dk matrix, S_t = S_{t-1} G_t + v_t k_t^T, o_t = S_t r_t, GroupNorm (eps 64e-5), + (r . (k * r_k)) v, times g."""
    p = {n: t.detach().double() for n, t in model.named_parameters()}
    (B, T, C), H, N, x = x.shape, model.n_head, model.head_size, x.double()
    S, prev = (x.new_zeros(B, H, N, N), x.new_zeros(B, C)) if state is None else (state[0].double(), state[1].double())
    shifted = torch.cat([prev[:, None], x[:, :-1]], 1)  # the previous token's x
    mix = {c: x + (shifted - x) * p["x_" + c] for c in "rwkvag"}
    r, k, v = (mix[c] @ p[name + ".weight"].T for c, name in (("r", "receptance"), ("k", "key"), ("v", "value")))
    w = torch.exp(-torch.exp(-F.softplus(-(p["w0"] + torch.tanh(mix["w"] @ p["w1"]) @ p["w2"])) - 0.5))
    a = torch.sigmoid(p["a0"] + mix["a"] @ p["a1"] @ p["a2"])
    g = torch.sigmoid(mix["g"] @ p["g1"]) @ p["g2"]
    kk = (k * p["k_k"]).view(B, T, H, N)
    kappa = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k * (1 + (a - 1) * p["k_a"])
    r, k, v, w, a = (z.view(B, T, H, N) for z in (r, k, v, w, a))
    outs = []
    for t in range(T):  # the state, token by token
        G = torch.diag_embed(w[:, t]) - kappa[:, t, ..., :, None] * (a[:, t] * kappa[:, t])[..., None, :]
        S = S @ G + v[:, t, ..., :, None] * k[:, t, ..., None, :]
        outs.append((S @ r[:, t, ..., None])[..., 0])
    o = torch.stack(outs, 1)
    o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + 64e-5)
    o = o * p["ln_x.weight"].view(H, N) + p["ln_x.bias"].view(H, N) + (r * k * p["r_k"]).sum(-1, keepdim=True) * v
    return (o.reshape(B, T, C) * g) @ p["output.weight"].T, (S, x[:, -1])


def test_rwkv7_numbers_of_the_official_demo():
    """The official demo's time mix (rwkv_v7_demo.py at 7384042f, torch loop, float64, layer 0), run outside the
    repository on parameters and input set by formula: y at tokens 0, 5, 11 (4 channels each), S[1, :2, :2]."""
    demo_y = [0.0297030030385485, 0.0495036196593315, 0.038007944729875, 0.00248356790594043,
              0.0644878508137577, 0.265196885418854, 0.298247896198625, 0.142745965235698,
              0.195527399225427, 0.123823964299588, -0.0261612389958126, -0.159607252458972]
    demo_S = [0.301530711836971, 0.158396423211843, 0.215167170977037, 0.112964782029502]
    model = model_class("rwkv7")(64, head_size=32, chunk_size=8).double()
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            p.copy_(0.5 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).view_as(p))
        x = torch.sin(torch.arange(12 * 64, dtype=torch.float64) * 0.3).view(1, 12, 64)
        for form in model.forms:
            y, (S, _) = model(x, form=form)
            for got, want in ((y[0, [0, 5, 11], :4], demo_y), (S[0, 1, :2, :2], demo_S)):
                assert torch.allclose(got.flatten(), torch.tensor(want, dtype=torch.float64), atol=1e-12), form


@pytest.mark.parametrize("log_w,a", [(-math.exp(-0.5), 1.0), (-math.exp(-0.5), 0.0), (0.0, 1.0), (None, None)],
                         ids=["w_min_a_one", "w_min_a_zero", "w_one_a_one", "random"])  # None: random within the clamp
def test_rwkv7_chunk_64_float32_at_the_clamp(log_w, a):
    """Chunk 64 (largest), decays at the clamp (e^-39 a chunk) or 1, a 0, 1 or random: float32 vs float64, T = 4096."""
    rwkv7, g = module("rwkv7"), torch.Generator().manual_seed(0)
    B, T, H, D = 1, 4096, 2, 16
    r, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    kappa = F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    lw = -math.exp(-0.5) * torch.rand(B, T, H, D, generator=g) if log_w is None else torch.full((B, T, H, D), log_w)
    aa = torch.rand(B, T, H, D, generator=g) if a is None else torch.full((B, T, H, D), a)
    S0 = torch.randn(B, H, D, D, generator=g)
    with torch.no_grad():
        assert_close(rwkv7.rwkv7_chunked(r, lw, k, v, kappa, aa, S0, 64),
                     rwkv7.rwkv7_recurrent(r, lw, k, v, kappa, aa, S0.double()), 1e-4, "y, S")


def test_rwkv7_init_as_official():
    """The official init (train_temp/src/model.py, generate_init_weight), released models' LoRA ranks, head size 64."""
    RWKV7, C, N = model_class("rwkv7"), 128, 64
    m = RWKV7(C)
    ddd, linear = torch.tensor([i / C for i in range(C)]), torch.tensor([n / (C - 1) - 0.5 for n in range(C)])
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
    assert all(torch.equal(params[down], torch.zeros_like(params[down])) for down in ("w1", "a1", "g1"))
    for name, gain in (("w2", 0.1), ("a2", 0.1), ("g2", 0.1), ("receptance.weight", 1), ("key.weight", 0.1),
                       ("value.weight", 1)):
        W = params[name].detach()  # [rank or C, C]: orthonormal rows times the gain
        assert torch.allclose(W @ W.T, gain ** 2 * torch.eye(W.shape[0]), atol=1e-5), name
    assert torch.equal(m.output.weight, torch.zeros(C, C)) and m.ln_x.eps == 64e-5 and m.n_head == 2
    assert all(params[n]._no_weight_decay for n in ("w1", "w2", "a1", "a2", "g1", "g2", "r_k"))  # official: no decay
    with torch.device("meta"):  # ranks only: 768 is the demo's 168M model, 2048 the train_temp README's 1.5B
        for d, ranks in ((768, (64, 64, 128)), (2048, (96, 96, 256))):
            big = RWKV7(d)
            assert (big.w1.shape[1], big.a1.shape[1], big.g1.shape[1]) == ranks and big.n_head == d // 64
    assert RWKV7(32).n_head == 1 and RWKV7(32).head_size == 32


# ---------- attention.py ------------------------------------------------------------------------

def attention_reference(m, x):
    """Each head written from the papers: R_t (RoFormer eq. 15: block-diagonal 2x2 rotations by t * 10000^(-2i/D), D
    the head's width), q_t = R_t W_q x_t, k_s = R_s W_k x_s, y_t = sum_{s<=t} softmax(q_t.k_s/sqrt(D)) v_s. Returns y
    and the cache: every k_s and v_s [B, H, T, D]."""
    B, T, d = x.shape
    H, D = m.n_head, d // m.n_head
    Wq, Wk, Wv = (W.view(H, D, d) for W in m.qkv.weight.chunk(3, 0))
    turn = lambda a: torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=x.dtype)  # noqa
    R = [torch.block_diag(*[turn(t * 10000 ** (-2 * i / D)) for i in range(D // 2)]) for t in range(T)]
    K, V, ys = (torch.zeros(B, H, T, D, dtype=x.dtype) for _ in range(3))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                K[b, h, t], V[b, h, t] = R[t] @ Wk[h] @ x[b, t], Wv[h] @ x[b, t]
                s = torch.stack([(R[t] @ Wq[h] @ x[b, t]) @ K[b, h, j] / math.sqrt(D) for j in range(t + 1)])
                w = torch.exp(s - s.max())
                ys[b, h, t] = sum(w[j] / w.sum() * V[b, h, j] for j in range(t + 1))
    return ys.transpose(1, 2).flatten(2) @ m.out.weight.T, (K, V)


@pytest.mark.parametrize("compiled", [False, True])
def test_attention_reserved_cache_steps_as_the_growing_one(compiled):
    """step() on reserve()'s cache gives the growing cache's outputs, fixed shapes, written in place (train.step_graph
    copies no cache), compiled (fullgraph, aot_eager) too; forward() refuses a reserved cache."""
    m = make("attention")
    step = torch.compile(m.step, fullgraph=True, dynamic=False, backend="aot_eager") if compiled else m.step
    x = torch.randn(2, 14, D_MODEL, dtype=torch.float64)
    _, grown = m(x[:, :5])
    reserved = m.reserve(grown, 9)
    shapes, caches = [t.shape for t in reserved], [c.data_ptr() for c in reserved[:2]]
    for t in range(5, 14):
        y, grown = m.step(x[:, t], grown)
        y_reserved, reserved = step(x[:, t], reserved)
        assert rel_err(y_reserved, y) <= 1e-13 and [s.shape for s in reserved] == shapes, t
        assert [c.data_ptr() for c in reserved[:2]] == caches, "step() did not write the reserved cache in place"
        assert int(reserved[2]) == t + 1 and all(torch.equal(r[:, :, :t + 1], g) for r, g in zip(reserved, grown))
    with pytest.raises(ValueError, match="reserve"):
        m(x[:, :2], reserved)


def test_attention_reserved_cache_in_autocast_dtype():
    """Under autocast reserve() keeps a float32 model's cache in bf16, the dtype step()'s matmuls read: the outputs
    and keys and values of a float32 cache padded as reserve() pads it, bit for bit. Else the cache keeps its dtype."""
    m, x = make("attention", torch.float32), torch.randn(2, 10, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grown = m(x[:, :4])
        reserved, padded = m.reserve(grown, 6), (*(F.pad(c, (0, 0, 0, 6)) for c in grown), torch.tensor(4))
        assert [c.dtype for c in reserved[:2]] == [torch.bfloat16] * 2 and padded[0].dtype == torch.float32
        (y, reserved), (y_padded, padded) = (chained(m, x[:, 4:], ["step"] * 6, state=s) for s in (reserved, padded))
        assert torch.equal(y, y_padded) and all(torch.equal(r.float(), p) for r, p in zip(reserved[:2], padded[:2]))
    assert all(c.dtype == torch.float32 for c in m.reserve(grown, 6)[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(c.dtype == torch.float64 for c in m.reserve([c.double() for c in grown], 6)[:2])


@pytest.mark.parametrize("shift", [1, 37, 1000, 16384])
def test_attention_rotary_relative_positions(shift):
    rotary = module("attention").rotary
    q, k = torch.randn(2, 3, 50, 16, dtype=torch.float64), torch.randn(2, 3, 50, 16, dtype=torch.float64)
    scores = rotary(q, 0) @ rotary(k, 0).mT
    assert rel_err(rotary(q, shift) @ rotary(k, shift).mT, scores) <= 1e-12  # queries at m, keys at n: m - n counts
    assert rel_err(rotary(q, 5 + shift) @ rotary(k, 2 + shift).mT, rotary(q, 5) @ rotary(k, 2).mT) <= 1e-12
    assert rel_err(scores, q @ k.mT) > 1e-2  # the rotation does something
    assert rel_err(rotary(q, shift).norm(dim=-1), q.norm(dim=-1)) <= 1e-14  # and is a rotation


@pytest.mark.parametrize("form", ["sdpa", "parallel"])
def test_attention_no_nan_with_extreme_inputs(form):
    """Inputs x 1e3 in float32: finite, backward too, the first row out(v_0); T = 16384 finite (parallel: SLOW=1)."""
    m, x = make("attention", torch.float32), (1e3 * torch.randn(2, 64, D_MODEL)).requires_grad_()
    _, s = m(x[:, :20].detach(), form=form)
    y, s2 = m(x[:, 20:], s, form=form)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    y0, _ = m(x[:, :1].detach(), form=form)  # the first row sees only itself: y = out(v_0)
    assert rel_err(y0, m.out(m.qkv(x[:, :1].detach()).chunk(3, -1)[2])) <= 1e-6
    if form == "sdpa" or SLOW:
        with torch.no_grad():
            y, s = m(torch.randn(1, 16384, D_MODEL), form=form)
        assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in s)


def test_attention_sdpa_matches_parallel_with_cache_float32():
    m, x = make("attention", torch.float32), torch.randn(2, 40, D_MODEL)
    _, s = m(x[:, :17], form="recurrent")
    (ya, sa), (yb, sb) = (m(x[:, 17:], s, form=form) for form in ("sdpa", "parallel"))
    assert rel_err(ya, yb) <= 1e-5 and all(rel_err(a, b) <= 1e-6 for a, b in zip(sa, sb))


def test_attention_dropout_only_in_training():
    """Weight dropout changes a training forward; in eval() the same weights give the very same output."""
    plain, dropped = make("attention", torch.float32), make("attention", torch.float32, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, D_MODEL)
    for form in plain.forms:
        y_plain, y_train = plain.eval()(x, form=form)[0], dropped.train()(x, form=form)[0]
        assert not torch.allclose(y_train, y_plain, atol=1e-3), form
        assert torch.equal(dropped.eval()(x, form=form)[0], y_plain), form  # same weights, same ops: bit-identical


# ---------- rnn.py and lstm.py, newton.py's kernel (pytest -s prints the iteration counts) -------

def rnn_reference(model, x, h=None):
    """torch.nn.RNN with W_hh = diag(w_h): the same layer, written by someone else."""
    ref = torch.nn.RNN(x.shape[-1], model.w_h.numel(), batch_first=True).to(x.dtype)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(model.inp.weight), ref.bias_ih_l0.copy_(model.inp.bias)
        ref.weight_hh_l0.copy_(torch.diag(model.w_h)), ref.bias_hh_l0.zero_()
    hs, h = ref(x, None if h is None else h[None])
    return model.out(hs), h[0]


def lstm_reference(model, x, state=None):
    """torch.nn.LSTM (gate order i, f, g, o) with W_hh = diag(r) per gate: the same layer, by someone else."""
    H, ours = model.d_hidden, [0, 1, 3, 2]  # torch's i, f, g, o in our order i, f, o, g
    ref = torch.nn.LSTM(x.shape[-1], H, batch_first=True).to(x.dtype)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(model.inp.weight.unflatten(0, (4, H))[ours].flatten(0, 1))
        ref.bias_ih_l0.copy_(model.inp.bias.unflatten(0, (4, H))[ours].flatten())
        ref.weight_hh_l0.copy_(torch.cat([torch.diag(model.r[g]) for g in ours]))
        ref.bias_hh_l0.zero_()
    hs, (h, c) = ref(x, None if state is None else (state[1][None], state[0][None]))
    return model.out(hs), (c[0], h[0])


def newton_hard(case, T):
    """Strongly nonlinear, long memory, and Newton crawls: the model (float64), x and a state. rnn: w_h in (0, 3)
    makes channels bistable (tanh(3 h) = h has three roots), so the solution flips between basins. lstm (lstm-full):
    recurrent weights up to 10, small inputs, forget bias 4 (c remembers ~50 steps): h feeds back through saturated
    gates; exact Newton takes 97 of 128 steps. lstm-diag, the diagonal quasi-Newton, is given r up to 5, where it needs
    all 128 (exact Newton: 22); at r up to 10 (T=256) it hits the cap ~1e-2 off: its diagonal Jacobian products
    overstate the true ones and amplify rounding (one more reason for full)."""
    if case == "rnn":
        model = make("rnn", edit=lambda m: m.w_h.mul_(3))
        return model, torch.randn(2, T, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64).tanh()
    diag = case == "lstm-diag"
    model = make("lstm", jacobian="diag" if diag else "full",
                 edit=lambda m: (m.r.mul_(5.0 if diag else 10.0), m.inp.weight.mul_(0.35), m.inp.bias[32:64].add_(3)))
    x = torch.randn(2, T, 32, dtype=torch.float64)
    return model, x, (torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64).tanh())


@pytest.mark.parametrize("name,jacobian,dtype,lengths", [
    ("rnn", "full", torch.float32, (2048, 16384)), ("rnn", "full", torch.float64, (2048,)),
    ("lstm", "full", torch.float32, (2048,)), ("lstm", "diag", torch.float32, (2048,))],
    ids=["rnn-f32", "rnn-f64", "lstm-full", "lstm-diag"])
def test_newton_iteration_counts_fresh_layer(name, jacobian, dtype, lengths):
    """Fresh layer: exact Newton in at most 12 iterations, the lstm's diagonal quasi-Newton in more; both the loop's."""
    for T in lengths:
        torch.manual_seed(0)
        model = model_class(name)(32, **({"jacobian": jacobian} if name == "lstm" else {})).to(dtype)
        x = torch.randn(1, T, 32, dtype=dtype)
        with torch.no_grad():
            y, k = model(x)[0], model.stats["newton_iters"]
            y_ref, _ = model(x, form="recurrent")
        print(f"\n{name} fresh layer, T={T}, {dtype}, jacobian={jacobian}: {k} Newton iterations")
        assert rel_err(y, y_ref) <= (1e-12 if dtype == torch.float64 else 1e-5)
        assert k <= 12 if jacobian == "full" else k > 12, k


def newton_loop(name, u, w, s0):
    """rnn.py's or lstm.py's recurrence one step at a time, all its states as the Newton solvers return them: u [B, T,
    D] (lstm: [B, T, 4, D]), w [D] (lstm: r [4, D]), s0 [B, D] (lstm: (c, h) [B, 2, D]) -> [B, T, D] ([B, T, 2, D])."""
    if name == "rnn":
        return module("rnn").rnn_recurrent(u, w, s0)
    ss, c, h = [], *s0.unbind(1)
    for t in range(u.shape[1]):
        c, h = module("lstm").cell(u[:, t], w, c, h)
        ss.append(torch.stack([c, h], 1))
    return torch.stack(ss, 1)


def newton_inputs(name, B, T, C, scale, g=None, device="cpu"):
    """newton_loop's inputs: u ~ N(0, 1), w ~ scale U(0, 1) (lstm: r ~ scale U(-1, 1)), tanh N(0, 1) h0, N(0, 1) c0."""
    draw = lambda f, *shape: f(*shape, generator=g, device=device)  # noqa: E731
    if name == "rnn":
        return draw(torch.randn, B, T, C), scale * draw(torch.rand, C), draw(torch.randn, B, C).tanh()
    u, r = draw(torch.randn, B, T, 4, C), scale * (2 * draw(torch.rand, 4, C) - 1)
    return u, r, torch.stack([draw(torch.randn, B, C), draw(torch.randn, B, C).tanh()], 1)


@pytest.mark.parametrize("case,T,least", [("rnn", 256, 50), ("lstm-full", 128, 20), ("lstm-diag", 128, 20)])
def test_newton_cap_is_what_makes_it_exact(case, T, least):
    """Many Newton steps (rnn: hundreds) but <= T give the recurrent outputs, state and gradients (implicit
    differentiation); the cap's guarantee, exact and quasi-Newton: k undamped steps from any guess fix s_0..s_{k-1}."""
    name, (model, x, s0) = case[:4], newton_hard(case, T)
    with torch.no_grad():
        u, w, s0_ = ((model.inp(x), model.w_h, s0) if name == "rnn" else
                     (model.inp(x).unflatten(-1, (4, 32)), model.r, torch.stack(s0, 1)))
        ref, full = newton_loop(name, u, w, s0_), [case != "lstm-diag"] * (name == "lstm")
        for k in (1, 7, 64):
            s, iters = getattr(module(name), f"{name}_newton")(u, w, s0_, 0.0, *full, cap=k)
            assert iters == k and (s[:, :k] - ref[:, :k]).abs().max() <= 1e-12 and (s - ref).abs().max() > 1e-3, k
    x, s0 = x.requires_grad_(), map_state(lambda t: t.requires_grad_(), s0)
    (y, s), k = model(x, s0), model.stats["newton_iters"]
    print(f"\n{case} hard case, T={T}, float64: {k} Newton iterations")
    assert least < k <= T
    y_ref, s_ref = model(x, s0, form="recurrent")
    assert_close((y, s), (y_ref, s_ref), 1e-10, f"{name}: y, state")
    gy, leaves = torch.randn_like(y), [x, *tensors(s0)] + list(model.parameters())
    loss = lambda y, s: (y * gy).sum() + sum((-1) ** i * t.sum() for i, t in enumerate(tensors(s)))  # noqa: E731
    assert_close(torch.autograd.grad(loss(y, s), leaves), torch.autograd.grad(loss(y_ref, s_ref), leaves), 1e-8,
                 f"{name}: gradients")


def spy_newton():
    """Wrap newton.rnn and newton.lstm; the set returned collects those called (the kernel solved, not the loop)."""
    newton, seen = module("newton"), set()
    for name in ("rnn", "lstm"):
        setattr(newton, name, lambda *args, name=name, solve=getattr(newton, name): seen.add(name) or solve(*args))
    return seen


def check_newton_kernel(name, full=True):
    """newton.rnn/lstm against the loop in float64 at T = 19, C = 12 (ragged tile and channel block), a random state and
    strong weights; lstm_backward against autograd through the loop; on one tile (B = 1, T = C = 8), rnn_newton's or
    lstm_newton's iteration count over seeds and weights up to 1 and 3 (a wrong Jacobian is slower)."""
    u, w, s0 = newton_inputs(name, 2, 19, 12, 3 if name == "rnn" else 5, g := torch.Generator().manual_seed(0))
    s, k = getattr(module("newton"), name)(u, w, s0, 1e-6, *[full] * (name == "lstm"))
    u64, w64, s064 = (t.double().requires_grad_() for t in (u, w, s0))
    ref = newton_loop(name, u64, w64, s064)
    assert s.shape == ref.shape and rel_err(s, ref) <= 1e-5 and 1 <= k <= 8, (name, full, rel_err(s, ref), k)
    if name == "lstm":  # the adjoint kernel against autograd through the loop
        ds = torch.randn(s.shape, generator=g)
        grads = module("newton").lstm_backward(u, w, s, s0, ds)
        for got, want in zip(grads, torch.autograd.grad(ref, (u64, w64, s064), ds.double())):
            assert got.shape == want.shape and rel_err(got, want) <= 1e-5, (full, rel_err(got, want))
    for seed, scale in [(seed, scale) for seed in range(2) for scale in (1, 3)]:
        args = (*newton_inputs(name, 1, 8, 8, scale, torch.Generator().manual_seed(seed)), 1e-6)
        args += (full,) * (name == "lstm")
        got, ref = getattr(module("newton"), name)(*args)[1], getattr(module(name), f"{name}_newton")(*args)[1]
        assert got == ref, (name, full, seed, scale, float(got), ref)


def check_newton_hard_float32(model, x, s0, device="cpu"):
    """newton_hard's case in float32: parallel outputs, state, gradients within 1e-4 of the float64 recurrence or 3x the
    float32 loop's error (bistable channels amplify GPU matmul rounding in dL/dx to ~2e-4). Returns the iterations."""
    model64, model = copy.deepcopy(model).to(device, torch.float64), model.to(device, torch.float32)

    def run(model, form, dtype):
        xf = x.to(device, dtype).requires_grad_()
        sf = map_state(lambda t: t.to(device, dtype).requires_grad_(), s0)
        y, state = model(xf, sf, form=form)
        loss = (y * gy).sum() + sum((t * (i + 2)).sum() for i, t in enumerate(tensors(state)))
        return [y, *tensors(state), *torch.autograd.grad(loss, [xf, *tensors(sf), *model.parameters()])]
    gy = torch.randn(*x.shape[:2], model.out.out_features, generator=torch.Generator().manual_seed(3)).to(device)
    out, loop, ref = (run(model, "parallel", torch.float32), run(model, "recurrent", torch.float32),
                      run(model64, "recurrent", torch.float64))
    for i, (o, l, r) in enumerate(zip(out, loop, ref)):
        assert rel_err(o, r) <= max(1e-4, 3 * rel_err(l, r)), \
            f"output/grad {i}: rel err {rel_err(o, r):.2e}, the float32 loop's {rel_err(l, r):.2e}"
    return float(model.stats["newton_iters"])


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_newton_kernel_interpreted(name):
    """newton.py's kernel interpreted (tiles 8 x 8): check_form, check_newton_kernel, the hard case (5-8 iterations)."""
    interpreted(f"import newton; seen = t.spy_newton(); t.check_form({name!r}, 'parallel', torch.float32, 'cpu')\n"
                f"for full in {(True, False) if name == 'lstm' else (True,)}:\n"
                f"    t.check_newton_kernel({name!r}, full)\n"
                f"k = t.check_newton_hard_float32(*t.newton_hard({name!r}, 20))\n"
                f"print(f'{name} hard case, T=20, float32, kernel: {{k:.2f}} Newton iterations per tile of 8')\n"
                f"assert 5 <= k <= 8, k\n"
                f"assert seen == {{{name!r}}}, seen")


@needs_cuda
@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_newton_kernel_cuda(name):
    """GPU kernel against rnn_newton/lstm_newton (both Jacobians) and the loop (B=4, T=1000); hard cases at T=256,
    float32, gradients; no host sync: in a CUDA graph replayed on new inputs it gives eager's outputs, state, count."""
    torch.manual_seed(0)
    u, w, s0 = newton_inputs(name, 4, 1000, 200, 2 if name == "rnn" else 1, device="cuda")
    ref = newton_loop(name, u, w, s0)
    for full in (True, False) if name == "lstm" else (True,):
        args = (u, w, s0, 1e-6) + (full,) * (name == "lstm")
        s, k = getattr(module("newton"), name)(*args)
        assert rel_err(s, getattr(module(name), f"{name}_newton")(*args)[0]) <= 1e-5 and rel_err(s, ref) <= 1e-5
        assert 1 <= float(k) <= module("newton").PLAN[name][0]
    for case in ("lstm-full", "lstm-diag") if name == "lstm" else ("rnn",):
        check_newton_hard_float32(*newton_hard(case, 256), device="cuda")
    model, x = make(name, torch.float32, "cuda"), torch.randn(2, 300, D_MODEL, device="cuda")
    with torch.no_grad():
        model(x)  # kernels compiled and loaded before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, state = model(x)
            iters = model.stats["newton_iters"]
        x.copy_(torch.randn_like(x))
        graph.replay()
        y_ref, state_ref = model(x)
    assert all(torch.equal(o, r) for o, r in zip([y, *tensors(state)], [y_ref, *tensors(state_ref)], strict=True))
    assert torch.equal(iters, model.stats["newton_iters"])


def test_lstm_forget_bias_is_one_on_the_gate_that_keeps_c():
    """Gers et al. 2000: forget bias 1, read off the cell (W = r = 0): c differing by 1 differs by sigmoid(1) next."""
    model = model_class("lstm")(64, d_hidden=1024).double()
    with torch.no_grad():
        model.inp.weight.zero_(), model.r.zero_()
        x, c, h = (torch.randn(3, n, dtype=torch.float64) for n in (64, 1024, 1024))
        forget = model.step(x, (c + 1, h))[1][0] - model.step(x, (c, h))[1][0]
    assert rel_err(forget, torch.full_like(forget, 1 / (1 + math.exp(-1)))) <= 1e-12, \
        f"c_{{t-1}} is multiplied by {forget.mean():.4f}, not sigmoid(1) = 0.7311"


# ---------- mlstm.py ----------------------------------------------------------------------------

def mlstm_unstabilised(q, k, v, log_i, g, C, n):
    """The paper's mLSTM as written (Beck et al. 2024, sec. 2.3), float64, no stabiliser: i_t = exp(i~_t),
    f_t = exp(g_t), C_t = f_t C_{t-1} + i_t v_t k_t^T, n_t = f_t n_{t-1} + i_t k_t, h_t = C_t q_t / max(|n_t q_t|, 1);
    C [B, H, Dv, Dk], n [B, H, Dk]; the recurrences one step at a time (scan_reference)."""
    q, k, v, i, f = (t.double() for t in (q, k, v, log_i.exp(), g.exp()))
    C = scan_reference(f[..., None, None], i[..., None, None] * v[..., :, None] * k[..., None, :], C)  # [B, T, H, ...]
    n = scan_reference(f[..., None], i[..., None] * k, n)
    h = (C @ q[..., None])[..., 0] / (n * q).sum(-1).abs().clamp_min(1.0)[..., None]
    return h, C[:, -1], n[:, -1]


def mlstm_reference(model, x):
    """xLSTM's mLSTM layer (xlstm/blocks/mlstm/layer.py) from the paper's unstabilised equations (mlstm_unstabilised),
    float64 (x and the model), from the empty state; its own conv window sum, block-diagonal matrices and per-head
    LayerNorm. Returns y and the unstabilised (C, n): the layer keeps C~ = C exp(-m), n~ alike."""
    P = dict(model.named_parameters())
    inner, H, K = P["skip"].shape[0], model.n_head, P["conv.weight"].shape[-1]
    x_m, z = (x @ P["up.weight"].T).split(inner, -1)
    pad = F.pad(x_m, (0, 0, K - 1, 0))
    x_c = F.silu(sum(pad[:, i:i + x.shape[1]] * P["conv.weight"][:, 0, i] for i in range(K)) + P["conv.bias"])
    q, k, v = (u @ torch.block_diag(*P[w]).T for u, w in ((x_c, "wq"), (x_c, "wk"), (x_m, "wv")))
    pre = torch.cat([q, k, v], -1) @ P["gates.weight"].T + P["gates.bias"]
    q, k, v = (u.unflatten(-1, (H, -1)) for u in (q, k, v))
    C0, n0 = x.new_zeros(x.shape[0], H, inner // H, inner // H), x.new_zeros(x.shape[0], H, inner // H)
    h, C, n = mlstm_unstabilised(q, k / math.sqrt(k.shape[-1]), v, pre[..., :H], F.logsigmoid(pre[..., H:]), C0, n0)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + model.eps)
    h = h.flatten(2) * (1 + P["norm"]) + P["skip"] * x_c
    return (h * F.silu(z)) @ P["down.weight"].T, (C, n)


def mlstm_core(form, *inputs):
    return getattr(module("mlstm"), f"mlstm_{form}")(*inputs, *[8] * (form == "chunked"))


# gate regimes (log_i, g from N(0, 1) draws a, b): moderate ones, where the unstabilised recurrence is exact in
# float64; and extreme ones: f = 1 exactly, f = exp(-1e4) = 0, i = e^100 (overflows float32), i = e^-100,
# i = e^1e4 (exp(-m) = 0: the padding's 0 / 0), f = 0 with i = e^-1e4 (m = -1e4: exp(-m) = inf), gates jumping
MLSTM_MODERATE = {  # default: xLSTM's init, i~ ~ N(0, 0.1), f~ in [3, 6]
    "default": lambda a, b: (0.1 * a, F.logsigmoid(b + 4.5)), "strong": lambda a, b: (3 * a, F.logsigmoid(2 * b)),
    "i_large": lambda a, b: (20 + a, F.logsigmoid(b + 2)), "i_small": lambda a, b: (-20 + a, F.logsigmoid(b - 2))}
MLSTM_EXTREME = {
    "f_one": lambda a, b: (a, torch.zeros_like(b)), "f_zero": lambda a, b: (a, torch.full_like(b, -1e4)),
    "i_huge": lambda a, b: (100 + a, F.logsigmoid(b + 3)), "i_tiny": lambda a, b: (-100 + a, F.logsigmoid(b + 3)),
    "i_overflow": lambda a, b: (1e4 + a, F.logsigmoid(b + 3)),
    "f_zero_i_tiny": lambda a, b: (-1e4 + a, torch.full_like(b, -1e4)),
    "jumpy": lambda a, b: (30 * a, F.logsigmoid(30 * b))}


def mlstm_core_inputs(regime, dtype=torch.float64, B=2, T=21, H=2, Dk=8, Dv=6, seed=0, positive=False):
    """q, k, v, log_i, g and a random state (C~, n~, m) for a gate regime; positive: q and k >= 0."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rand(B, T, H, Dk), rand(B, T, H, Dk) * Dk ** -0.5, rand(B, T, H, Dv)
    q, k = (q.abs(), k.abs()) if positive else (q, k)
    log_i, g = {**MLSTM_MODERATE, **MLSTM_EXTREME}[regime](rand(B, T, H), rand(B, T, H))
    state = (rand(B, H, Dv, Dk), rand(B, H, Dk), rand(B, H))
    return [t.to(dtype) for t in (q, k, v, log_i, g)], tuple(t.to(dtype) for t in state)


@pytest.mark.parametrize("regime", MLSTM_MODERATE)
@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunked"])
def test_mlstm_core_matches_unstabilised_paper(form, regime):
    """The stabiliser cancels: every form's h, C~ exp(m), n~ exp(m) and gradients are the unstabilised recurrence's."""
    inputs, (C0, n0, m0) = mlstm_core_inputs(regime)

    def stabilised(q, k, v, log_i, g, C0, n0):
        h, (C, n, m) = mlstm_core(form, q, k, v, log_i, g, (C0, n0, m0))
        return h, C * m.exp()[..., None, None], n * m.exp()[..., None]

    def paper(q, k, v, log_i, g, C0, n0):
        return mlstm_unstabilised(q, k, v, log_i, g, C0 * m0.exp()[..., None, None], n0 * m0.exp()[..., None])
    gen = torch.Generator().manual_seed(1)
    check_grads(stabilised, paper, [t.requires_grad_() for t in inputs + [C0, n0]],
                ["h", "C", "n"] + ["grad " + n for n in ("q", "k", "v", "log_i", "g", "C0", "n0")], 1e-10,
                lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64), grad_tol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("regime", list(MLSTM_EXTREME) + ["default"])
@pytest.mark.parametrize("T", [1, 8, 21])
def test_mlstm_core_forms_match_recurrent_under_extreme_gates(regime, dtype, T):
    """From a random state, gates at 0, 1 and past float32's exp: outputs, states, gradients finite and
    the recurrence's, m the paper's max(log f_t + m_{t-1}, i~_t); C~, n~ in its frame C~ exp(m - m_rec) (float32 rounds
    m ~ 1e4 by 1e-3). Gradients against dL/dv's scale (0 up to rounding where one token outweighs the rest). float32:
    q, k >= 0, else n^T q can be tiny, resolved to ~1e-7 sum|terms| / |n^T q| (3e-3 in the loop's dL/dq)."""
    inputs, state = mlstm_core_inputs(regime, dtype, T=T, positive=dtype == torch.float32)
    assert regime != "i_huge" or dtype == torch.float64 or torch.isinf(inputs[3].exp()).any()  # e^100 overflows
    leaves = [t.requires_grad_() for t in inputs + list(state[:2])]
    state, m_paper = (leaves[5], leaves[6], state[2]), state[2]
    for t in range(T):  # the paper's max recurrence
        m_paper = torch.maximum(inputs[4][:, t].detach() + m_paper, inputs[3][:, t].detach())
    with torch.no_grad():
        m_ref = mlstm_core("recurrent", *inputs, state)[1][2]
    gen = torch.Generator().manual_seed(1)
    gh, gC, gn = (torch.randn(t.shape, generator=gen, dtype=dtype) for t in (inputs[2], state[0], state[1]))
    names, outs = ["h", "C", "n", "m", "q", "k", "v", "log_i", "g", "C0", "n0"], {}
    for form in ("recurrent", "parallel", "chunked"):
        h, (C, n, m) = mlstm_core(form, *inputs, state)
        C, n = C * (m - m_ref).exp()[..., None, None], n * (m - m_ref).exp()[..., None]
        grads = torch.autograd.grad((h * gh).sum() + (C * gC).sum() + (n * gn).sum(), leaves)
        outs[form] = [h, C, n, m, *grads]
        assert rel_err(m, m_paper) <= 1e-6, f"{form}: m rel err {rel_err(m, m_paper):.2e}"
    scale = outs["recurrent"][names.index("v")].norm().item()
    for form in ("parallel", "chunked"):
        for i, (name, o, r) in enumerate(zip(names, outs[form], outs["recurrent"])):
            err = rel_err(o, r) if i < 4 else (o - r).norm().item() / (max(r.norm().item(), scale) or 1.0)
            assert err <= TOL[dtype], f"{form} {name}: {err:.2e}"


@pytest.mark.parametrize("i_bias", [0.0, 15.0, -15.0])
def test_mlstm_layer_state_and_gradients_match_unstabilised_reference(i_bias):
    """Every form against mlstm_reference, input gates as drawn and e^+-15: outputs, C~ exp(m), n~ exp(m), gradients
    of x and every parameter; no gradient through m: two calls joined by the state have one call's gradients."""
    model = make("mlstm", chunk_size=4, edit=lambda m: m.gates.bias[:m.n_head].add_(i_bias))
    x = torch.randn(2, 17, D_MODEL, dtype=torch.float64, requires_grad=True)
    y_ref, (C_ref, n_ref) = mlstm_reference(model, x)
    gy = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [x] + list(model.parameters())
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), leaves)
    for form in model.forms:
        y, (C, n, m, _) = model(x, form=form)
        assert_close((y, C * m.exp()[..., None, None], n * m.exp()[..., None]), (y_ref, C_ref, n_ref), 1e-10, form)
        one = torch.autograd.grad((y * gy).sum(), leaves)
        assert_close(one, grads_ref, 1e-9, f"{form}: grads of x, *parameters")
        y_two, _ = chained(model, x, [9, 8], form)
        assert_close(torch.autograd.grad((y_two * gy).sum(), leaves), one, 1e-10, f"{form}: grads through two calls")


# ========== train.py ============================================================================

TRAIN_TINY = ("--model linear_attention --device cpu --n-layer 1 --d-model 32 --block-size 16 --batch-size 4 "
              "--eval-iters 1 --eval-interval 2 --sample-len 10 --patience 0").split()
TRAIN_MQAR = "--task mqar --num-pairs 3 --mqar-vocab 16".split()


def train_corpus(n=20000):
    """Generated text: these tests need characters, not Shakespeare, so they run (never skip) on any checkout."""
    words, r = "to be or not that is the question whether tis nobler in the mind to suffer".split(), random.Random(0)
    return "\n".join(" ".join(r.choice(words) for _ in range(8)).capitalize() + "." for _ in range(n // 30))[:n]


@pytest.fixture
def train_data(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(train_corpus(), encoding="utf-8")
    return str(path)


def train_argv(data, out, *extra, default=None):
    """TRAIN_TINY, less the flag default and its value (train.py's default then), on data into out, then extra."""
    i = TRAIN_TINY.index(default) if default else len(TRAIN_TINY)
    return TRAIN_TINY[:i] + TRAIN_TINY[i + 2:] + ["--data", data, "--out-dir", str(out), *extra]


def train_run(data, out, *extra, default=None):
    """train.py's tiny config on the text at data (which --task mqar or parity never reads) into out -> its ckpt.pt."""
    train.main(train_argv(data, out, *extra, default=default))
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)


def train_same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_error_of(argv, capsys, usage=False):
    """train.main(argv)'s exit message: train.py's own (status 1; one line with stderr), or usage argparse's (2)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value.code) + capsys.readouterr().err
    assert e.value.code == 2 if usage else isinstance(e.value.code, str) and "\n" not in msg.strip(), msg
    return msg if usage else e.value.code


def train_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def write_log(folder, records):
    folder.mkdir()
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("task,sigint", [("text", False), ("mqar", True), ("parity", False)])
def test_train_task_logs_and_resumes_bit_for_bit(task, sigint, train_data, tmp_path, monkeypatch, capsys):
    """Each task: 3 steps with dropout (text samples best.pt); Ctrl-C at step 2 exits 130, resumed ends the same."""
    flags, data_line = {"text": ([], " val characters"), "mqar": (TRAIN_MQAR, "vocab 16, 3 key-value pairs"),
                        "parity": (["--task", "parity"], "vocab 2, 16 bits per sequence")}[task]
    flags = flags + ["--max-iters", "3"]
    whole = train_run(train_data, tmp_path / "a", *flags, "--dropout", "0.2")
    out, log = capsys.readouterr().out, train_log(tmp_path / "a")
    assert out.startswith("cpu: small config") and data_line in out and "| val " in out and "| acc " in out
    assert f"vocab {len(whole['model']['wte.weight'])}," in out and "tok/s" in out
    assert out.strip().splitlines()[-1].startswith("done: stopped on steps at step 3")
    assert [r["step"] for r in log if r["type"] == "eval"] == [0, 2, 3] and log[-1]["type"] == "final"
    assert [log[-1][k] for k in ("task", "stop", "acc")] == [task, "steps", whole["acc"]] and 0 <= whole["acc"] <= 1
    assert whole["step"] == 3 and whole["args"]["task"] == task and whole["args"]["dropout"] == 0.2
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)  # loads without pickled code
    assert best["val"] == whole["best_val"] and best["step"] == whole["best_step"]
    assert ("-" * 40 in out) == (task == "text")
    if task == "text":
        assert whole["vocab"] == "".join(sorted(set(open(train_data).read())))
        assert len(out.split("sampled from best.pt")[1].split("-" * 40)[0].split("\n", 1)[1]) == 1 + 10 + 1
    get_batches, step = train.get_batches, 1 if sigint else 2

    def ctrl_c_at_step(*args):  # as step's batch is drawn: a SIGINT (train.py's handler lets the step finish), or the
        *rest, train_batch, val_batch = get_batches(*args)  # KeyboardInterrupt of a second Ctrl-C (default_int_handler
        ctrl_c = signal.raise_signal if sigint else lambda sig: signal.default_int_handler(sig, None)  # raises it: the
        return *rest, lambda i: (i == step and ctrl_c(signal.SIGINT)) or train_batch(i), val_batch  # step is lost)
    monkeypatch.setattr(train, "get_batches", ctrl_c_at_step)
    with pytest.raises(SystemExit) as e:
        train_run(train_data, tmp_path / "b", *flags, "--dropout", "0.2")
    out = capsys.readouterr().out
    assert e.value.code == 130 and "interrupted: saved" in out and ("Ctrl-C:" in out) == sigint
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2  # a SIGINT: step 1 completed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.undo()
    resumed = train_run(train_data, tmp_path / "b", *flags, "--resume")  # --dropout 0.2 from the checkpoint
    assert resumed["step"] == 3 and train_same_weights(resumed["model"], whole["model"])
    assert (resumed["acc"], resumed["best_val"]) == (whole["acc"], whole["best_val"])
    assert [r["step"] for r in train_log(tmp_path / "b") if r["type"] == "eval"] == [0, 2, 3]  # appended, step 2 once
    assert "learning-rate schedule" not in capsys.readouterr().out  # the same schedule: nothing to say
    assert not train_same_weights(train_run(train_data, tmp_path / "c", *flags)["model"], whole["model"])  # dropout


def test_train_defaults_follow_the_device_and_the_task(tmp_path):
    """--compile on by default on CUDA only; mqar and parity (fresh sequences each step): no dropout, no patience."""
    def cfg(*flags):
        return train.get_config(train.parse_args(["--model", "rnn", "--out-dir", str(tmp_path), *flags]))[0]
    assert cfg("--device", "cuda").compile is True and cfg("--device", "cuda", "--no-compile").compile is False
    assert cfg("--device", "cpu").compile is False and cfg("--device", "cpu", "--compile").compile is True
    assert cfg("--device", "cuda").dropout > 0 and cfg().patience > 0
    for task in ("mqar", "parity"):
        assert (cfg("--device", "cuda", "--task", task).dropout, cfg("--task", task).patience) == (0, 0), task


def test_train_compile_compiles_the_lm_and_a_failure_falls_back_to_eager(train_data, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: broken)
    assert train_run(train_data, tmp_path / "d", "--max-iters", "2", "--compile")["step"] == 2
    assert "running eager" in capsys.readouterr().out
    calls = []  # what --compile compiles, and with which mode (a pass-through: compiling for real takes minutes here)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append((fn, kwargs)) or fn)
    train_run(train_data, tmp_path / "e", "--max-iters", "2", "--compile")
    assert [type(fn).__name__ for fn, _ in calls] == ["LM"] and calls[0][1] == {"mode": train.COMPILE_MODE}
    assert "running eager" not in capsys.readouterr().out


@slow
@needs_cuda
@pytest.mark.parametrize("name", MODELS)
def test_train_compiled_steps_match_eager_cuda(name, train_data, tmp_path):
    """10 steps of train.py compiled (train.COMPILE_MODE) and eager, bf16 autocast: val losses at steps 0, 5, 10 within
    2e-2 relative (bf16 kernels round differently; 10 AdamW steps do not amplify that much, a wrong kernel does)."""
    args = ["--model", name, "--data", train_data] + (
        "--device cuda --n-layer 2 --d-model 64 --block-size 64 --batch-size 8 --max-iters 10 --eval-interval 5 "
        "--eval-iters 2 --log-interval 5 --sample-len 0 --dropout 0 --patience 0").split()
    for flag, out in (("--no-compile", "eager"), ("--compile", "compiled")):
        train.main(args + [flag, "--out-dir", str(tmp_path / out)])
    eager, compiled = ([r["val_loss"] for r in train_log(tmp_path / out) if r["type"] == "eval"]
                       for out in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 3, (eager, compiled)
    assert all(abs(c - e) <= 2e-2 * abs(e) for c, e in zip(compiled, eager)), (compiled, eager)


def test_train_dropout_reaches_a_mixer_that_takes_one_is_off_in_eval_and_prefill_then_step_matches_forward():
    """Dropout reaches attention, changes a training forward; eval(): the same logits, prefill + step() a forward's."""
    attn = train.load_mixer("attention")
    assert train.LM(attn, 11, 1, 32, dropout=0.3).blocks[0].mixer.dropout == 0.3
    assert train.LM(attn, 11, 1, 32, dropout=0.3, mixer_args={"dropout": 0.1}).blocks[0].mixer.dropout == 0.1
    train.LM(train.load_mixer("mamba"), 11, 1, 32, dropout=0.3)  # takes none: not passed
    torch.manual_seed(0)
    model = train.LM(train.load_mixer("linear_attention"), 11, 2, 32, dropout=0.5).double()
    idx = torch.randint(11, (2, 9))
    with torch.no_grad():
        assert not torch.equal(model(idx)[0], model(idx)[0])  # training: dropout
        model.eval()
        assert torch.equal(full := model(idx)[0], model(idx)[0])
        logits, _ = chained(model, idx[:, 5:], ["step"] * 4, state=model(idx[:, :5])[1])
        assert torch.allclose(logits, full[:, 5:], atol=1e-10)


def generation_lm(name, device="cpu", mixer_args=None):
    """A 2-layer LM (width 32, 28 characters, MODELS' options or mixer_args), weights that make the context matter."""
    torch.manual_seed(0)
    mixer_args = MODELS[name][1] if mixer_args is None else mixer_args
    model = train.LM(train.load_mixer(name), 28, 2, 32, mixer_args=mixer_args)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 * (0.1 if n == "wte.weight" else 3))
    return model.to(device)


@pytest.mark.parametrize("name,options", [("attention", {}), ("mamba2", dict(d_state=8, headdim=16, chunk_size=8))])
def test_train_sample_continues_the_state(name, options):
    """Greedy sampling: each sampled token is the argmax of one parallel pass over prompt + sample at its position (it
    fails on step() from an empty state, the prefill's state dropped, a KV cache of 16 positions)."""
    chars, prompt = "abcdefghijklmnopqrstuvwxyz .", "to be or not to be"
    model = generation_lm(name, mixer_args=options)  # float32: float64 convs are slow
    text = train.sample(model, prompt, 40, chars, temperature=0)
    assert text.startswith(prompt) and len(text) == len(prompt) + 40 and len(set(text[len(prompt):])) >= 4
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor([[chars.index(c) for c in text]]))
    assert "".join(chars[i] for i in logits[0, len(prompt) - 1:-1].argmax(-1)) == text[len(prompt):]


@pytest.mark.parametrize("name", ["rnn", "lstm", "attention", "retnet", "mamba2", "mamba"])
def test_train_generate_is_the_eager_decoding_loop(name, monkeypatch):
    """On the CPU generate() is the eager loop (cuda_graph, compile change nothing) at temperature 0, 0.8; mode kept."""
    model = generation_lm(name).train()
    monkeypatch.setattr(torch, "compile", lambda *args, **kw: pytest.fail("torch.compile called off CUDA"))
    idx = torch.randint(28, (2, 11), generator=torch.Generator().manual_seed(1))
    for temperature in (0, 0.8):
        out = train.generate(model, idx, 17, temperature, seed=5, cuda_graph=temperature > 0, compile=temperature > 0)
        assert out.shape == (2, 28) and torch.equal(out[:, :11], idx) and model.training
        g, tokens = torch.Generator().manual_seed(5), [idx]  # the loop: the prompt in one pass, then step() on each
        with torch.no_grad():
            logits, states = model.eval()(idx)
            logits = logits[:, -1]
            for _ in range(17):
                token = (logits.argmax(-1) if temperature == 0 else
                         torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=g)[:, 0])
                tokens.append(token[:, None])
                logits, states = model.step(token, states)
        assert torch.equal(out, torch.cat(tokens, 1)), temperature
        model.train()


@needs_cuda
@pytest.mark.parametrize("name", MODELS)
def test_train_generate_graphed_gives_eager_tokens_cuda(name, monkeypatch):
    """generate(cuda_graph=True) gives eager's tokens, float32 and bf16 autocast, temperature 0 and 0.8, every model."""
    model, graphs = generation_lm(name, "cuda"), []
    step_graph = train.step_graph
    monkeypatch.setattr(train, "step_graph", lambda *args: graphs.append(1) or step_graph(*args))
    idx = torch.randint(28, (1, 23), device="cuda")
    for low in (False, True):
        for temperature in (0, 0.8):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
                eager = train.generate(model, idx, 40, temperature, seed=2, cuda_graph=False)
                graphed = train.generate(model, idx, 40, temperature, seed=2, cuda_graph=True)
            assert torch.equal(graphed, eager), (low, temperature)
    assert len(graphs) == 4, graphs


@needs_cuda
@pytest.mark.parametrize("name", ["attention", *(pytest.param(n, marks=slow) for n in ("mamba", "rwkv7"))])
def test_train_generate_graphed_compiled_follows_eager_logits_cuda(name, monkeypatch):
    """generate(cuda_graph=True, compile=True) compiles model.step (fullgraph, dynamic=False), calls it
    twice, replays it; Inductor may sum otherwise (ties): each replay's logits within 1e-3 of eager step()'s."""
    torch._dynamo.reset()  # a fresh count of LM.step's compilations (at most 8)
    model = generation_lm(name, "cuda")
    compiles, calls, replays, compile, step_graph = [], [], [], torch.compile, train.step_graph

    def spy_compile(fn, **kw):
        compiles.append((fn == model.step, kw))
        compiled = compile(fn, **kw)
        return lambda *args: calls.append(1) or compiled(*args)

    def spy_graph(*args):
        run = step_graph(*args)
        return lambda token: replays.append(run(token).clone()) or replays[-1]
    monkeypatch.setattr(torch, "compile", spy_compile)
    monkeypatch.setattr(train, "step_graph", spy_graph)
    T, n = 23, 40
    idx = torch.randint(28, (1, T), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    out = train.generate(model, idx, n, 0, cuda_graph=True, compile=True)
    assert compiles == [(True, dict(fullgraph=True, dynamic=False))] and len(calls) == 2, (compiles, calls)
    assert len(replays) == n - 2 and len(set(out[0, T:].tolist())) >= 3
    with torch.no_grad():
        _, states = model(idx)
        for k in range(n - 1):  # replays[k - 1]: the logits after out[:, T + k], the first step being eager
            logits, states = model.step(out[:, T + k], states)
            if k:
                assert rel_err(replays[k - 1], logits) <= 1e-3, k


def test_train_step_graph_keeps_its_buffers_alive(monkeypatch):
    """step_graph's function keeps the static token, states and autocast's cast weights alive through gc (a freed one is
    reused: the graph writes others' memory) and restores the model's weights; CPU stand-ins for streams, graphs."""
    stream = lambda: types.SimpleNamespace(wait_stream=lambda other: None)  # noqa: E731
    for name, stand_in in [("Stream", stream), ("current_stream", stream), ("stream", contextlib.nullcontext),
                           ("CUDAGraph", lambda: None), ("graph", contextlib.nullcontext)]:
        monkeypatch.setattr(torch.cuda, name, stand_in)
    model, seen = generation_lm("mamba").eval(), []  # two state tensors a layer
    step, linears = model.step, [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = [m.weight for m in linears]
    monkeypatch.setattr(model, "step", lambda token, states: seen.append([weakref.ref(t) for t in [
        token, *train.state_tensors(states), *(m.weight for m in linears)]]) or step(token, states))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, states = model(torch.randint(28, (1, 5)))
        run = train.step_graph(model, logits[:, -1].argmax(-1), states)
        gc.collect()
    assert len(seen) == 2 and all(ref() is not None for ref in seen[1]), "a static buffer of the graph was freed"
    assert any(ref() is None for ref in seen[0][:-len(linears)])  # the warm-up's state copies are not kept
    assert all(ref().dtype == torch.bfloat16 for ref in seen[1][-len(linears):])
    assert all(m.weight is w for m, w in zip(linears, weights, strict=True)), "the model's weights not restored"
    del run


def test_train_cached_corpus_is_hash_checked_when_used(tmp_path, monkeypatch):
    text = train_corpus()
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "tinyshakespeare.txt").write_text(text, encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded again"))
    with pytest.raises(SystemExit, match="sha256.*delete it"):
        train.get_data(None)
    monkeypatch.setattr(train, "SHAKESPEARE_SHA256", hashlib.sha256(text.encode()).hexdigest())
    assert train.get_data(None) == text


TRAIN_BAD = [  # (flags, what the one-line error must name); TMP: a folder holding empty.txt and short.txt
    *[(flags, flags.split()[0]) for flags in (  # the flag
        "--n-layer 0", "--d-model 0", "--eval-iters 0", "--eval-interval 0", "--max-iters -1", "--log-interval 0",
        "--patience -1", "--lr -0.001", "--lr nan", "--dropout -0.1", "--dropout 1", "--max-time 0", "--stop-acc nan",
        "--temperature -1", "--prompt Z")],
    *[(flags, flags) for flags in ["--device gpu", "--device cuda:99"] + ["--device cuda"] * (not CUDA)],
    *[(flags, flags.split()[0] + " must be >= 1") for flags in ("--block-size 0", "--batch-size 0", "--batch-size -1")],
    ("--lr 0", "--lr must be > 0"), ("--stop-acc 1.5", "--stop-acc must be in [0, 1]"), ("--resume", "no checkpoint"),
    ("--model linear_attention --mixer-args chunk_size=0", "chunk_size"),
    ("--model attention --mixer-args n_head=0", "n_head"), ("--mixer-args conv_size", "expected k=v"),
    ("--model deltanet --mixer-args conv_sise=1", "'conv_sise'; DeltaNet takes"),  # the name, the mixer's signature
    ("--model attention --mixer-args rope_base=0.0", "loss is nan"), ("--data TMP/absent.txt", "cannot read"),
    ("--data TMP/empty.txt", "is empty"), ("--data TMP/short.txt", "too short"),
    ("--model mamba2 --mixer-args d_state=-4", "sizes must be >= 1, got d_state"),  # Mamba2's own ValueError
    ("--task mqar --num-pairs 5 --mqar-vocab 16", "4 * num_pairs <= --block-size")]  # 4 * 5 > 16


@pytest.mark.parametrize("flags,message", TRAIN_BAD, ids=[f for f, _ in TRAIN_BAD])
def test_train_bad_arguments_are_one_line_errors_before_anything_is_written(flags, message, train_data, tmp_path,
                                                                            capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("x" * 50)
    msg = train_error_of(train_argv(train_data, tmp_path / "out", *flags.replace("TMP", str(tmp_path)).split()), capsys)
    assert message in msg and not (tmp_path / "out").exists(), msg


def test_train_help_names_each_default_and_a_bad_model_is_a_clear_error(train_data, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="^0$"):  # status 0
        train.parse_args(["--help"])
    options = re.split(r"\n  (?=--)", capsys.readouterr().out.split("options:")[1])[1:]
    helps = {o.split()[0].rstrip(","): " ".join(o.split()) for o in options}
    assert len(helps) >= 25 and "--no-compile" in helps["--compile"] and helps.pop("--model").endswith("(required)")
    assert all("(default: " in h for h in helps.values()), [f for f, h in helps.items() if "(default: " not in h]
    assert "GPU 64, CPU 16" in helps["--batch-size"] and "GPU on, CPU off" in helps["--compile"]
    msg = train_error_of(["--model", "transformer_xl"], capsys, usage=True)
    assert "invalid choice" in msg and "linear_attention" in msg and "mamba2" in msg
    assert "--model" in train_error_of([], capsys, usage=True)
    monkeypatch.setitem(train.MODELS, "ghost", "Ghost")
    assert "ghost.py is not in" in train_error_of(train_argv(train_data, tmp_path, "--model", "ghost"), capsys)


def test_train_never_overwrites_an_earlier_run_and_names_a_corrupt_checkpoint(train_data, tmp_path, capsys):
    """A new run in the directory of an earlier one, or of one killed before its first checkpoint (log.jsonl alone),
    stops with a one-line message (train_error_of) and writes nothing; so does --resume from a corrupt checkpoint."""
    out = tmp_path / "run"
    train_run(train_data, out, "--max-iters", "2")
    files = {f: (out / f).read_bytes() for f in os.listdir(out)}
    msg = train_error_of(train_argv(train_data, out), capsys)
    assert "--resume" in msg and "--out-dir" in msg
    assert "--batch-size" in train_error_of(train_argv(train_data, out, "--resume", "--batch-size", "0"), capsys)
    assert {f: (out / f).read_bytes() for f in files} == files  # and the log is not truncated
    for broken in (files["ckpt.pt"][:len(files["ckpt.pt"]) // 2], b"not a checkpoint"):
        (out / "ckpt.pt").write_bytes(broken)
        assert "ckpt.pt is corrupt" in train_error_of(train_argv(train_data, out, "--resume"), capsys)
    write_log(out := tmp_path / "killed", [dict(type="start", step=0, model="linear_attention")])
    log = (out / "log.jsonl").read_bytes()  # killed before its first checkpoint: log.jsonl alone, kept byte for byte
    msg = train_error_of(train_argv(train_data, out, "--max-iters", "2"), capsys)
    assert "holds an earlier run (log.jsonl)" in msg and "--resume" in msg
    assert os.listdir(out) == ["log.jsonl"] and (out / "log.jsonl").read_bytes() == log


def test_train_stops_on_time_patience_or_accuracy_and_samples_from_the_best(train_data, tmp_path, monkeypatch, capsys):
    """A run stops on --max-time, --patience or --stop-acc and samples from best.pt. Resumed, it keeps earlier legs'
    best when a leg never beats it (records, checkpoint, best.pt) and says once that the lr schedule changed."""
    ckpt = train_run(train_data, tmp_path / "t", *TRAIN_MQAR, "--max-iters", "100000", "--max-time", "0.5",
                     "--eval-interval", "100000", "--log-interval", "100000")
    assert "stopped on time" in capsys.readouterr().out and train_log(tmp_path / "t")[-1]["stop"] == "time"
    assert 0 < ckpt["step"] < 100000 and ckpt["train_time"] >= 0.5
    assert train.get_lr(500, 1.0, 10, 1000, time_frac=1.0) == pytest.approx(0.1)  # the clock ends the schedule
    assert train.get_lr(500, 1.0, 10, 1000, time_frac=0.0) > 0.5
    vals, sampled_with = iter([3.0, 2.0, 2.5, 1.0, 1.5, 1.6, 0.5, 1.7, 0.6, 0.7]), []  # evaluations at steps 0, 2, ...
    monkeypatch.setattr(train, "evaluate", lambda *args: (next(vals), 0.5))
    monkeypatch.setattr(train, "sample", lambda model, *a, **k: sampled_with.append(model.state_dict()) or "x")
    ckpt = train_run(train_data, tmp_path / "a", "--max-iters", "30", "--patience", "2")
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    assert ckpt["step"] == 10 and best["step"] == 6 and best["val"] == 1.0  # 1.5 and 1.6 at steps 8, 10: stop
    assert train_same_weights(sampled_with[0], best["model"]) and not train_same_weights(best["model"], ckpt["model"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done: stopped on patience at step 10") and "best val 1.0000 at step 6" in last
    ckpt = train_run(train_data, tmp_path / "a", "--max-iters", "14", "--resume", "--patience", "0")  # past the stop
    assert ckpt["step"] == 14 and ckpt["best_step"] == 12 and ckpt["best_val"] == 0.5  # 0.5 at 12, 1.7 at 14
    best, _ = (tmp_path / "a" / "best.pt").read_bytes(), capsys.readouterr()
    ckpt = train_run(train_data, tmp_path / "a", "--max-iters", "18", "--resume")  # 0.6 at 16, 0.7 at 18: no better
    assert ckpt["step"] == 18 and next(vals, None) is None  # step 14 is not evaluated again
    final = train_log(tmp_path / "a")[-1]
    assert (final["type"], final["steps"], final["best_val"], final["best_step"]) == ("final", 18, 0.5, 12), final
    assert (ckpt["best_val"], ckpt["best_step"]) == (0.5, 12) and (tmp_path / "a" / "best.pt").read_bytes() == best
    out = capsys.readouterr().out
    assert "sampled from best.pt (step 12)" in out and "best val 0.5000 at step 12," in out.strip().splitlines()[-1]
    lines = [ln for ln in out.splitlines() if "learning-rate schedule" in ln]
    assert len(lines) == 1 and "--max-iters 18 (was 14)" in lines[0] and "step 14 gets lr 0.000" in lines[0], lines
    vals = iter([3.0, 2.0, 2.5, 2.4])  # text: --patience 1 by default
    assert train_run(train_data, tmp_path / "b", "--max-iters", "30", default="--patience")["step"] == 4
    accs = iter([0.1, 0.5, 0.98, 0.97, 0.99, 1.0, 1.0])  # evaluations at steps 0, 2, 4, ...
    monkeypatch.setattr(train, "evaluate", lambda *args: (1.0, next(accs)))
    ckpt = train_run(train_data, tmp_path / "c", "--max-iters", "30", "--stop-acc", "0.99")
    assert ckpt["step"] == 8 and ckpt["acc"] == 0.99  # 0.98 at step 4 is not enough
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: stopped on accuracy at step 8")
    assert [train_log(tmp_path / "c")[-1][k] for k in ("type", "stop", "steps")] == ["final", "accuracy", 8]
    accs = iter([1.0] * 20)
    assert train_run(train_data, tmp_path / "d", "--max-iters", "6")["step"] == 6  # --stop-acc 0 by default: never


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--monitor-interval=0.1",
            os.path.join(HERE, "train.py")]


@cpu_long
def test_train_ddp_two_processes_match_one(train_data, tmp_path):
    """torchrun with 2 gloo processes, each half of every batch, against one process with the whole batch."""
    argv = TRAIN_TINY + ["--model", "attention", "--data", train_data, "--max-iters", "4", "--sample-len", "0"]
    train.main(argv + ["--out-dir", str(tmp_path / "one")])
    run = subprocess.run(TORCHRUN + [*argv, "--out-dir", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


@cpu_long
def test_train_ddp_ctrl_c_saves_at_one_step_and_leaves_the_group(train_data, tmp_path):
    """Ctrl-C to torchrun: both ranks stop at one step, rank 0 saves, each exits by end_process (gloo-safe)."""
    argv = train_argv(train_data, tmp_path, "--max-iters", "2000", "--log-interval", "2", "--sample-len", "0")
    run = subprocess.Popen(TORCHRUN + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        next(line for line in run.stdout if line.startswith("step     6"))  # StopIteration: it ended before
        os.killpg(run.pid, signal.SIGINT)
        out = run.communicate(timeout=120)[0]
    finally:  # a hang or a failure here must not leave torchrun and its workers running
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    # torchrun itself ends on the signal with a traceback of its own (SignalException) and rc 1: no other traceback
    assert "terminate called" not in out and out.count("Traceback") == out.count("SignalException: Process"), out
    assert "done: stopped" not in out  # no final line, no sample: the run is to be resumed
    saved = re.findall(r"^interrupted: saved .* at step (\d+);", out, re.M)
    assert len(saved) == 1 and 6 < int(saved[0]) < 2000, out[-3000:]  # rank 0 alone prints
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == int(saved[0])


def test_train_mqar_batch_is_recall_and_a_function_of_seed_and_i():
    P, V, B = 6, 40, 8
    x, y = train.get_mqar_batch(3, 7, 32, B, P, V, "cpu")
    assert torch.equal(x, train.get_mqar_batch(3, 7, 32, B, P, V, "cpu")[0])
    assert not any(torch.equal(x, train.get_mqar_batch(i, seed, 32, B, P, V, "cpu")[0]) for i, seed in ((4, 7), (3, 8)))
    for xb, yb in zip(x.tolist(), y.tolist()):
        keys, values = xb[0:2 * P:2], xb[1:2 * P:2]
        assert len(set(keys)) == P and all(k < V // 2 <= v < V for k, v in zip(keys, values))
        queries = [t for t in range(len(yb)) if yb[t] != -100]
        assert len(queries) == P and all(t >= 2 * P and t % 2 == 0 for t in queries)
        assert sorted(xb[t] for t in queries) == sorted(keys)  # each key asked once, after the pairs
        assert all(xb.count(k) == 2 for k in keys)  # and nowhere else
        assert all(yb[t] == values[keys.index(xb[t])] for t in queries)  # the answer is the key's value


def test_train_parity_batch_is_the_running_xor_of_bits_held_out_and_scored_at_every_position():
    x, y = train.get_parity_batch(3, 7, 40, 8, "cpu")
    assert x.shape == y.shape == (8, 40) and set(x.unique().tolist()) == {0, 1} == set(y.unique().tolist())
    assert y.tolist() == [[sum(b[:t + 1]) % 2 for t in range(40)] for b in x.tolist()]  # XOR of bits 0..t, t included
    assert torch.equal(x, train.get_parity_batch(3, 7, 40, 8, "cpu")[0])
    assert not any(torch.equal(x, train.get_parity_batch(i, seed, 40, 8, "cpu")[0]) for i, seed in ((4, 7), (3, 8)))
    cfg = types.SimpleNamespace(task="parity", seed=1337, block_size=16, batch_size=4, device="cpu")
    *_, train_batch, val_batch = train.get_batches(cfg, None)
    assert not torch.equal(val_batch(0)[0], train_batch(0)[0])  # held-out sequences

    class WrongAtTheLastPosition(torch.nn.Module):
        def forward(self, x):
            y = x.cumsum(1) % 2
            y[:, -1] ^= 1
            return F.one_hot(y, 2).float(), None
    assert train.evaluate(WrongAtTheLastPosition(), val_batch, 2, torch.autocast("cpu", enabled=False))[1] == 15 / 16


def test_train_records_hold_the_run_and_its_state_size_and_mixer_args_reach_the_mixer(train_data, tmp_path, capsys):
    """deltanet at d_model 32: 4 heads of an 8 x 8 matrix and its short conv's last 3 inputs of q, k, v (3 x 96);
    conv-free (--mixer-args conv_size=1), the matrix alone; attention's K and V grow with the tokens read."""
    parsed = train.parse_mixer_args("d_state=8, jacobian=diag,A_init_range=(1, 16)")
    assert parsed == {"d_state": 8, "jacobian": "diag", "A_init_range": (1, 16)}
    flags = [*TRAIN_MQAR, "--model", "deltanet", "--n-layer", "2", "--max-iters", "1", "--lr", "0.003"]
    train_run(train_data, tmp_path / "a", *flags, "--seed", "5")
    start, *_, final = train_log(tmp_path / "a")
    assert final["state_size"] == 4 * 8 * 8 + 3 * 3 * 32 and "state 544 numbers per layer" in capsys.readouterr().out
    # the first line already names the run, so that one killed before its final line is still reported
    assert {**final, **start} == {**final, "type": "start", "step": 0}  # the start record holds the final one's values
    assert [final[k] for k in ("lr", "block_size", "batch_size", "num_pairs", "seed")] == [0.003, 16, 4, 3, 5]
    ckpt = train_run(train_data, tmp_path / "b", *flags, "--mixer-args", "conv_size=1")
    assert train_log(tmp_path / "b")[-1]["state_size"] == 4 * 8 * 8 and ckpt["args"]["mixer_args"] == "conv_size=1"
    assert ckpt["model"]["blocks.0.mixer.conv.weight"].shape[-1] == 1 and ckpt["args"]["d_model"] == 32  # as given
    attn = train.LM(train.load_mixer("attention"), 16, 2, 32)
    assert train.state_size(attn, 16) == 2 * 16 * 32 and train.state_size(attn.eval(), 40) == 2 * 40 * 32
    assert not attn.training and train.state_size(attn.train(), 8) and attn.training  # its mode restored


def test_train_width_matching(train_data, tmp_path, capsys):
    """Widths match the attention LM's parameters; an unknown --mixer-args keyword in the search: a one-line error."""
    for name in ("mamba", "rnn", "attention"):
        d, n, target = train.match_width(train.load_mixer(name), 65, 2, 128, {})
        assert d % 16 == 0 and abs(n - target) <= 0.1 * target, (name, d, n, target)
    assert train.match_width(train.load_mixer("attention"), 65, 2, 128, {})[0] == 128
    ckpt = train_run(train_data, tmp_path / "a", *TRAIN_MQAR, "--model", "rnn", "--max-iters", "0", default="--d-model")
    assert ckpt["args"]["d_model"] == train.match_width(train.load_mixer("rnn"), 16, 1, 128, {})[0]  # resume keeps it
    assert "d_model=matched" in capsys.readouterr().out
    msg = train_error_of(train_argv(train_data, tmp_path / "b", "--model", "deltanet", "--mixer-args", "conv_sise=1",
                                    default="--d-model"), capsys)
    assert "'conv_sise'; DeltaNet takes" in msg and not (tmp_path / "b").exists()


def test_train_warmup_then_cosine_as_the_optimizer_sees_it(train_data, tmp_path, monkeypatch):
    """Each step's lr in both groups: warmup, then cosine to lr / 10 (written out, not get_lr's)."""
    seen, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda optimizer: seen.append([g["lr"] for g in optimizer.param_groups]) or step(optimizer))
    lr, warmup, steps = 0.01, 3, 8
    train_run(train_data, tmp_path, "--max-iters", str(steps), "--warmup", str(warmup), "--lr", str(lr))
    expected = [lr * (s + 1) / warmup if s < warmup
                else lr / 10 + 0.9 * lr * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))) / 2
                for s in range(steps)]
    assert seen == [pytest.approx([e, e], rel=1e-12) for e in expected], seen  # both groups, every step
    assert seen[0][0] == pytest.approx(lr / warmup) and seen[warmup - 1][0] == pytest.approx(lr)


@pytest.mark.parametrize("name,mixer", [
    ("rwkv7", {"receptance.weight", "key.weight", "value.weight", "output.weight"}),  # not the LoRAs, not r_k
    ("mamba", {"in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"})])  # no A_log
def test_train_weight_decay_on_the_matrices_not_marked(name, mixer):
    """Weight decay 0.1 on the matrices (embedding, MLP's, the mixer's named), 0 on the rest and on _no_weight_decay."""
    model = train.LM(train.load_mixer(name), 11, 1, 64)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(p.dim() >= 2 and getattr(p, "_no_weight_decay", False) for p in model.parameters())  # marks to obey
    decayed = {"wte.weight", "blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight"} | {f"blocks.0.mixer.{n}" for n in mixer}
    groups = [(g["weight_decay"], {names[id(p)] for p in g["params"]})
              for g in train.make_optimizer(model, 1e-3).param_groups]
    assert groups == [(0.1, decayed), (0.0, set(names.values()) - decayed)], groups


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
def test_train_commit_of_names_uncommitted_code(tmp_path):
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,  # noqa
                                       text=True).stdout.strip()
    assert train.commit_of(tmp_path) == ""  # no repository
    git("init", "-q")
    (tmp_path / "m.py").write_text("x = 1\n")
    git("add", "m.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m")
    head = git("rev-parse", "--short", "HEAD")
    assert len(head) >= 7 and train.commit_of(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("data")  # not the code: still clean
    assert train.commit_of(tmp_path) == head
    (tmp_path / "m.py").write_text("x = 2\n")
    assert train.commit_of(tmp_path) == head + " (modified)"


# ========== bench.py ============================================================================

def test_bench_cpu_smoke_run_prints_every_table(capsys):
    bench.main(["--device", "cpu", "--quick"])
    out = capsys.readouterr().out
    for header in ("### scan.py", "### layers", "### chunked cores", "### decoding", "### training steps",
                   "### Mamba's layer"):
        assert header in out, f"bench.py printed no {header!r} table"
    assert "Error" not in out and "OOM" not in out and "nan" not in out, out


@pytest.fixture
def figures(monkeypatch):
    """The figures bench.py --report saves, by file name, to read their lines; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    saved, savefig = {}, Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.update({os.path.basename(path): fig})
                        or savefig(fig, path, **kw))
    return saved


def table_rows(out):
    return [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]


def test_bench_report_tabulates_the_runs(train_data, tmp_path, capsys, figures):
    runs = tmp_path / "runs"
    for name, flags in (("text", []), ("recall", TRAIN_MQAR), ("parity", ["--task", "parity"])):
        train_run(train_data, runs / name, *flags, "--max-iters", "2")
    write_log(runs / "unfinished", [dict(type="eval", step=0)])
    capsys.readouterr()
    bench.main(["--report", str(runs)])
    rows = table_rows(out := capsys.readouterr().out)
    assert len(rows) == 8 and [row[:3] for row in rows[1:4]] == [
        [run, "linear_attention", task] for run, task in (("parity", "parity"), ("recall", "mqar"), ("text", "text"))]
    assert rows[5][0] == "linear_attention" and rows[5][4:6] == ["16", "3"]  # the recall table: block 16, 3 pairs
    assert rows[7][0] == "linear_attention" and rows[7][4:6] == ["16", "-"]  # the parity table: no pairs
    assert "unfinished" in out and "left out" in out
    if figures is None:  # no figure, and the report says why (CI installs matplotlib: the figures are checked there)
        assert "matplotlib is not installed" in out
        return
    by_time, by_tokens = figures["showdown.png"].axes  # val loss against time, and against tokens
    evals = [json.loads(line) for line in open(runs / "text" / "log.jsonl") if '"eval"' in line]
    assert [list(line.get_xdata()) for line in by_time.get_lines()] == [[r["train_time"] for r in evals]]
    assert [list(line.get_xdata()) for line in by_tokens.get_lines()] == [[r["tokens"] for r in evals[1:]]]
    assert evals[0]["tokens"] == 0 and evals[-1]["tokens"] == 2 * 4 * 16 and by_tokens.get_xscale() == "log"


def test_bench_report_spreads_the_seeds_of_each_text_configuration_and_takes_a_cut_runs_best(tmp_path, capsys):
    def run(name, best_val, best_step, model="attention", lr=1e-3):
        return name, dict(model=model, d_model=64, n_layer=2, lr=lr, block_size=32, batch_size=8, best_val=best_val,
                          best_step=best_step)
    bench.report_seeds([run("attn", 1.44, 2750), run("rnn_s2", 1.47, 2000, "rnn"), run("attn_s2", 1.43, 2250),
                        run("attn_lr3e-3", 1.30, 500, lr=3e-3),  # another configuration, one run: no row
                        run("rnn", 1.46, 1750, "rnn"), run("attn_s3", 1.45, 2250), run("mamba", 1.51, 750, "mamba")])
    assert table_rows(capsys.readouterr().out)[1:] == [
        ["attention", "attn, attn_s2, attn_s3", "1.4400", "1.4300", "1.4500", "2750, 2250, 2250"],
        ["rnn", "rnn_s2, rnn", "1.4650", "1.4600", "1.4700", "2000, 1750"]]
    # text runs cut before their final line (killed, or still running): the report's best val loss and the seeds
    # table's step of it are each run's best evaluation's (1.5 at step 100, 1.7 at 200), not its last
    config = dict(model="attention", task="text", params=123456, d_model=64, n_layer=2, mixer_args={}, lr=1e-3,
                  block_size=32, batch_size=8, num_pairs=None, state_size=4096)
    for name, seed, vals in (("cut", 1337, [3.0, 1.5, 2.0]), ("cut_s2", 1338, [3.0, 1.8, 1.7, 1.75])):
        write_log(tmp_path / name, [dict(type="start", step=0, seed=seed, **config)] + [
            dict(type="eval", step=100 * i, tokens=25600 * i, train_time=1.0 * i, train_loss=v, val_loss=v, acc=0.4,
                 tok_s=None) for i, v in enumerate(vals)])
    bench.main(["--report", str(tmp_path)])
    rows = table_rows(capsys.readouterr().out)
    assert [r[6:9:2] for r in rows[1:3]] == [["1.5000", "cut at 200"], ["1.7000", "cut at 300"]]  # best val, stopped on
    assert rows[4] == ["attention", "cut, cut_s2", "1.6000", "1.5000", "1.7000", "100, 200"], rows


def test_bench_report_picks_the_best_lr_of_each_mqar_configuration(tmp_path, capsys, figures):
    def run(name, accs, lr, state=1600, model="deltanet", mixer_args=None, cut=False):  # accs: evals every 100 steps
        config = dict(model=model, task="mqar", params=123456, d_model=64, n_layer=2, mixer_args=mixer_args or {})
        if lr:
            config.update(lr=lr, block_size=64, batch_size=16, num_pairs=4, state_size=state)
        evals = [dict(type="eval", step=100 * i, tokens=102400 * i, acc=a, val_loss=1 - a, train_time=i)
                 for i, a in enumerate(accs)]
        final = dict(type="final", **config, tok_s=1e5, best_val=0.1, acc=accs[-1], stop="steps")
        write_log(tmp_path / name, [dict(type="start", step=0, **config)] + evals if cut else evals + [final])
    run("dn_1e-3", [0.2, 0.995, 0.9], 1e-3)  # at 0.99 once, but its final accuracy is the lower
    run("dn_3e-3", [0.1, 0.98, 0.992, 0.999], 3e-3)
    run("dn_3e-4", [0.1, 0.991], 3e-4)  # at 0.99 first: 0.991 and 0.999 above the stop are both "recalls"
    run("dn_1e-4", [0.1, 0.990], 1e-4)  # as soon: the more accurate wins, whichever is read first
    run("free_1e-3", [0.5, 0.9, 0.9, 0.995, 1.0], 1e-3, 1024, mixer_args={"conv_size": 1})
    run("free_3e-3", [0.5, 0.995, 1.0, 1.0, 1.0], 3e-3, 1024, mixer_args={"conv_size": 1})  # as good, sooner
    run("attn", [0.3, 1.0], 1e-3, 2 * 64 * 64, "attention")
    run("old", [0.0, 0.05], None, model="rnn")  # an older train.py: no lr, state_size, ...
    run("plateau", [0.0, 0.3, 0.5, 0.495, 0.51, 0.5], 1e-3, 64, "lstm")  # flat from step 200
    run("cut", [0.0, 0.4, 0.6], 3e-3, 64, "lstm", cut=True)  # killed at step 200: a start line, evaluations, no final
    bench.main(["--report", str(tmp_path)])
    out = capsys.readouterr().out
    # model, mixer args, d_model, layers, block, pairs, state, params, accuracy, lr, steps to 0.99, flat from,
    # stopped on, runs; the lstm's cut run is its best (0.6 at its last evaluation, against 0.5)
    assert table_rows(out.split("| model | mixer args |")[1]) == [
        ["attention", "-", "64", "2", "64", "4", "8,192", "0.12M", "1.000", "0.001", "100", "100", "steps", "1"],
        ["deltanet", "conv_size=1", "64", "2", "64", "4", "1,024", "0.12M", "1.000", "0.003", "100", "100", "steps",
         "2"],
        ["deltanet", "-", "64", "2", "64", "4", "1,600", "0.12M", "0.991", "0.0003", "100", "100", "steps", "4"],
        ["lstm", "-", "64", "2", "64", "4", "64", "0.12M", "0.600", "0.003", "-", "200", "cut at 200", "2"],
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
