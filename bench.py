"""Benchmarks of the zoo on a GPU, printed as markdown tables (and bench.png with matplotlib).

    python bench.py                      # all six sections on the GPU
    python bench.py --quick --only scan,chunked
    python bench.py --device cpu --quick # a tiny smoke run of every section (what the tests call)
    python bench.py --report out         # train.py's runs out/*/log.jsonl as tables, out/showdown.png, out/mqar.png

1. scan    scan.py forward and forward+backward as plain calls: time, bytes moved and the fraction of the copy
           bandwidth, accelerated-scan beside.
2. forms   each model's default (parallel or chunked) form against its recurrent loop, fwd+bwd.
3. chunked the chunked cores and the short causal conv, eager and compiled, against flash-linear-attention (when
           installed) and SDPA.
4. decode  tokens/s and peak memory of step() after a parallel prefill, against context length; train.py's
           whole LM at batch 1 through train.generate: eager, replaying a CUDA graph per token, and replaying
           a CUDA graph of the step compiled by Inductor.
5. train   tokens/s of train.py's training step for every model, eager and compiled, at the showdown size.
6. mamba   Mamba(512) forward and backward, time and peak memory, against mambapy's MambaBlock (when installed).
GPU times are medians of triton.testing.do_bench; the recurrent loops (a Python loop over T) are
timed once, after a warm-up on 16 tokens. Optional comparators are used only where installed.
"""
import argparse
import datetime
import glob
import importlib
import inspect
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import scan as scan_module
from scan import scan

MODELS = {"rnn": "RNN", "lstm": "LSTM", "attention": "Attention", "linear_attention": "LinearAttention",
          "retnet": "RetNet", "gated_retention": "GatedRetention", "mamba": "Mamba", "mamba2": "Mamba2",
          "deltanet": "DeltaNet", "gated_deltanet": "GatedDeltaNet",
          "rwkv7": "RWKV7", "kda": "KDA", "mamba3": "Mamba3", "mlstm": "MLSTM"}
FP32 = {"rnn", "lstm"}  # Newton's method wants float32; the others run under bf16 autocast
SECTIONS = ("scan", "forms", "chunked", "decode", "train", "mamba")
SKIP = []  # --skip: case names (substrings) left out, e.g. a comparator whose compilation hangs


def optional(module, name):
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # not installed, or broken on this machine
        return None


def sync(dev):
    torch.cuda.synchronize() if dev.type == "cuda" else None


def timeit(fn, dev, once=False):
    """Milliseconds: do_bench's median on the GPU, perf_counter elsewhere or for one slow repetition."""
    if dev.type == "cuda" and not once:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    reps = 1 if once else 3
    fn() if not once else None
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) * 1e3 / reps


def fwd_bwd(fn, inputs):
    """fn's first output, then its gradient w.r.t. inputs against a fixed random output gradient."""
    grads = {}

    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        if "g" not in grads:
            grads["g"] = torch.randn_like(out)
        torch.autograd.grad(out, inputs, grads["g"], allow_unused=True)
    return run


def attempt(fn):
    """fn(), or the reason it failed, short enough for a table cell."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}".replace("|", "/")


def fmt(x, digits=3):
    return x if isinstance(x, str) else f"{x:.{digits}g}" if x < 100 else f"{x:,.0f}"


def table(title, header, rows=()):
    """Print a markdown table's head and rows; returns a function that prints one more row at once
    (a long section shows its results as they come, and a killed run keeps what it had)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)

    def row(cells):
        print("| " + " | ".join(fmt(c) if isinstance(c, float) else str(c) for c in cells) + " |", flush=True)
    for r in rows:
        row(r)
    return row


# ------------------------------------------------------------------------------------------ 1. scan
def bench_scan(dev, quick, low):  # low unused: the scan is timed in float32 and bf16 both
    """Forward and forward+backward of a plain call (custom op, launch and autograd included), the bytes each must
    move (forward: read a, b, write h; backward: read a, h, dh, write da, db) and the fraction of the copy
    bandwidth that makes; accelerated-scan's plain Triton kernels beside, on the same problem in their layout."""
    gpu = dev.type == "cuda"
    n = 2 ** 28 if gpu else 2 ** 22  # 1 GiB of float32 on the GPU
    x = torch.randn(n, device=dev)
    y = torch.empty_like(x)
    copy = 2 * x.nbytes / timeit(lambda: y.copy_(x), dev) / 1e9  # bytes read + written, TB/s
    del x, y
    ascan = optional("accelerated_scan.scalar", "scan")
    shapes = [(8, 4096, 1024), (16, 512, 4096), (1, 65536, 64)] if gpu else [(2, 256, 64)]
    rows = []
    for shape in shapes[:2] if quick and gpu else shapes:
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.rand(shape, device=dev, dtype=dtype).requires_grad_()  # gates in (0, 1)
            b = torch.randn(shape, device=dev, dtype=dtype).requires_grad_()
            fwd = timeit(lambda: scan(a.detach(), b.detach()), dev)
            both = timeit(fwd_bwd(lambda: scan(a, b), (a, b)), dev)
            of_copy = lambda ms, passes: f"{passes * a.nbytes / ms / 1e9 / copy:.0%}"  # noqa: E731
            if ascan is None or not gpu:
                theirs = ["not installed" if ascan is None else "cuda only"] * 2
            else:  # the same problem in its layout: [B, C, T] contiguous
                at, bt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (a, b))
                theirs = [attempt(lambda: timeit(lambda: ascan(at.detach(), bt.detach()), dev)),
                          attempt(lambda: timeit(fwd_bwd(lambda: ascan(at, bt), (at, bt)), dev))]
            speedup = f"{theirs[1] / both:.2f}" if isinstance(theirs[1], float) else "-"
            rows.append([list(shape), str(dtype)[6:], fwd * 1e3, f"{3 * a.nbytes / 1e6:.0f}", of_copy(fwd, 3),
                         both * 1e3, f"{8 * a.nbytes / 1e6:.0f}", of_copy(both, 8),
                         *[t * 1e3 if isinstance(t, float) else t for t in theirs], speedup])
    table(f"scan.py, h_t = a_t h_(t-1) + b_t, plain calls (copy bandwidth {copy:.2f} TB/s)",
          ["[B, T, C]", "dtype", "fwd us", "fwd MB", "of copy", "fwd+bwd us", "fwd+bwd MB", "of copy",
           "accelerated-scan fwd us", "its fwd+bwd us", "its time / ours"], rows)


# ----------------------------------------------------------------------------------------- 2. forms
def layer(name, d_model, dev):
    return getattr(importlib.import_module(name), MODELS[name])(d_model).to(dev)


def autocast(dev, name, low):
    return torch.autocast(dev.type, dtype=low, enabled=low != torch.float32 and name not in FP32)


def bench_forms(dev, quick, low):
    gpu = dev.type == "cuda"
    Ts, batch, d = ([512, 2048] if quick else [512, 2048, 8192], 8, 512) if gpu else ([64], 2, 64)
    rows = []
    for name in MODELS:
        torch.manual_seed(0)
        m = layer(name, d, dev)
        form = inspect.signature(m.forward).parameters["form"].default

        def run(x, form):
            def go():
                with autocast(dev, name, low):
                    y, _ = m(x, form=form)
                return y
            return fwd_bwd(go, [x, *m.parameters()])
        run(torch.randn(batch, 16, d, device=dev, requires_grad=True), "recurrent")()  # warm-up
        for T in Ts:
            x = torch.randn(batch, T, d, device=dev, requires_grad=True)
            par = attempt(lambda: timeit(run(x, form), dev))
            iters = per_iter = "-"
            if "newton_iters" in getattr(m, "stats", {}):  # rnn, lstm: forward ms over the Newton iterations
                iters = float(m.stats["newton_iters"])
                fwd = attempt(lambda: timeit(torch.no_grad()(lambda: m(x, form=form)), dev))
                per_iter = fwd / iters if isinstance(fwd, float) else fwd
                iters = f"{iters:.3g}"
            rec = attempt(lambda: timeit(run(x, "recurrent"), dev, once=True))
            speedup = f"{rec / par:.1f}" if isinstance(par, float) and isinstance(rec, float) else "-"
            rows.append([name, "fp32" if name in FP32 else str(low)[6:], form, T, par, rec, speedup, iters, per_iter])
            del x
        del m
        torch.cuda.empty_cache() if gpu else None
    table(f"layers Cls({d}) at batch {batch}: default form vs recurrent loop, fwd+bwd ms; rnn and lstm: Newton "
          f"iterations (newton.py's kernel: the mean over its tiles) and forward ms per iteration",
          ["model", "dtype", "form", "T", "form ms", "recurrent ms", "speedup", "newton iters", "fwd ms / iter"], rows)


# --------------------------------------------------------------------------------------- 3. chunked
def core_cases(B, T, H, D, dev, low):
    """name -> (fn, inputs it differentiates) for the zoo's chunked cores, fla's, mamba_ssm's SSD and SDPA."""
    import causal_conv, deltanet, gated_deltanet, gated_retention, linear_attention, mamba2, retnet, rwkv7
    import scalar_decay
    rand = lambda *s, dtype=low: torch.randn(*s, device=dev, dtype=dtype).requires_grad_()
    q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
    S = torch.randn(B, H, D, D, device=dev) * 0.1
    log_gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(H, device=dev, dtype=torch.float32)))
    g = (F.logsigmoid(torch.randn(B, T, H, device=dev) + 4) / 16).requires_grad_()  # log gates <= 0
    kn = F.normalize(k.detach().float(), dim=-1).to(low).requires_grad_()
    beta = torch.rand(B, T, H, device=dev).requires_grad_()
    log_w = (-math.exp(-0.5) * torch.rand(B, T, H, D, device=dev)).requires_grad_()  # RWKV-7's clamped decay
    iclr = torch.rand(B, T, H, D, device=dev).requires_grad_()  # RWKV-7's in-context learning rate a
    dt = F.softplus(torch.randn(B, T, H, device=dev) - 3).requires_grad_()
    A = -(torch.rand(H, device=dev) + 0.5)
    Bm, Cm, h = rand(B, T, 1, 64), rand(B, T, 1, 64), torch.randn(B, H, D, 64, device=dev) * 0.1
    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    cases = {
        "linear_attention_chunked": (lambda: linear_attention.linear_attention_chunked(q, k, v, S, 64), (q, k, v)),
        "retention_chunked": (lambda: retnet.retention_chunked(q, k, v, log_gamma, S, 64), (q, k, v)),
        "gated_retention_chunked": (lambda: gated_retention.gated_retention_chunked(q, k, v, g, S, 64), (q, k, v, g)),
        "ssd_chunked (mamba2)": (lambda: mamba2.ssd_chunked(q, dt * A, dt, Bm, Cm, h, 64), (q, dt, Bm, Cm)),
        "scalar_decay (fused; g: gated retention's)": (lambda: scalar_decay.scalar_decay(q, k, v, g, S), (q, k, v, g)),
        "scalar_decay (fused; mamba2's SSD)": (lambda: scalar_decay.scalar_decay(
            Cm, Bm, (q * dt[..., None]).to(low), dt * A, h), (q, dt, Bm, Cm)),
        "delta_rule_chunked": (lambda: deltanet.delta_rule_chunked(q, kn, v, beta, S, 64), (q, kn, v, beta)),
        "gated_delta_rule_chunked": (lambda: gated_deltanet.gated_delta_rule_chunked(q, kn, v, beta, g, S, 64),
                                     (q, kn, v, beta, g)),
        "rwkv7_chunked": (lambda: rwkv7.rwkv7_chunked(q, log_w, k, v, kn, iclr, S, 64), (q, log_w, k, v, kn, iclr)),
    }
    C = 3 * H * D  # q, k and v's channels, as DeltaNet's conv sees them
    xc, wc, sc = rand(B, T, C), torch.randn(C, 4, device=dev).requires_grad_(), torch.zeros(B, 3, C, device=dev)
    cases["causal_conv_silu [B, T, 3 H D], width 4"] = (
        lambda: causal_conv.causal_conv_silu(xc, wc, None, sc), (xc, wc))
    cases["conv1d + silu, [B, 3 H D, T] (PyTorch)"] = (
        lambda: F.silu(F.conv1d(F.pad(xc.mT, (3, 0)), wc[:, None], groups=C)).mT, (xc, wc))
    fla_conv = optional("fla.modules.causal_conv1d", "causal_conv1d")
    cases["fla causal_conv1d"] = ("not installed" if fla_conv is None else "cuda only" if dev.type != "cuda"
                                  else (lambda: fla_conv(xc, wc, None, activation="silu")[0], (xc, wc)))
    beta_low = beta.detach().to(low).requires_grad_()
    for mod, name, args, kw in [("linear_attn", "chunk_linear_attn", (q, k, v), {"normalize": False}),
                                ("retention", "chunk_retention", (q, k, v), {}),
                                ("simple_gla", "chunk_simple_gla", (q, k, v), {"g": g}),
                                ("delta_rule", "chunk_delta_rule", (q, kn, v, beta_low), {}),
                                ("gated_delta_rule", "chunk_gated_delta_rule", (q, kn, v, g, beta_low), {}),
                                ("rwkv7", "chunk_rwkv7", (q, log_w, k, v, kn, iclr), {})]:
        fn, ins = optional("fla.ops." + mod, name), [t for t in (*args, *kw.values()) if torch.is_tensor(t)]
        if name == "chunk_rwkv7" and fn is not None:
            fn = fla_rwkv7(fn, low)
        cases["fla " + name] = ("not installed" if fn is None else "cuda only" if dev.type != "cuda"
                                else (lambda fn=fn, args=args, kw=kw: fn(*args, **kw), ins))
    ssd = optional("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    cases["mamba_ssm mamba_chunk_scan_combined"] = ("not installed" if ssd is None else "cuda only" if dev.type != "cuda"
                                                    else (lambda: ssd(q, dt, A, Bm, Cm, 64), (q, dt, Bm, Cm)))
    cases["sdpa causal [B, H, T, D]"] = (
        lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), (qh, kh, vh))
    return cases


def fla_rwkv7(chunk_rwkv7, low):
    """fla's chunk_rwkv7 called with the zoo's arguments: its S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T
    takes a = -kappa_hat and b = kappa_hat * a_t, all in the low dtype."""
    return lambda r, log_w, k, v, kappa, a: chunk_rwkv7(r, log_w.to(low), k, v, -kappa, kappa * a.to(low))


def bench_chunked(dev, quick, low):
    gpu = dev.type == "cuda"
    shapes = ([(8, 2048, 8, 64)] if quick else [(8, 2048, 8, 64), (2, 8192, 8, 64)]) if gpu else [(1, 128, 2, 16)]
    for shape in shapes:
        row = table(f"chunked cores at [B, T, H, D] = {list(shape)}, chunk 64, {str(low)[6:]}, against fla and "
                    f"causal SDPA", ["core", "fwd ms", "fwd+bwd ms"])
        torch.manual_seed(0)
        cases = core_cases(*shape, dev, low)
        zoo = [n for n in cases if not n.startswith(("fla", "sdpa", "mamba_ssm"))]
        cases.update({f"{n}, compiled": (torch.compile(cases[n][0]), cases[n][1]) for n in zoo if gpu})
        for name, case in cases.items():
            with torch.autocast(dev.type, dtype=low, enabled=low != torch.float32):
                if any(s in name for s in SKIP):
                    case = "skipped (--skip)"
                if isinstance(case, str):
                    row([name, case, case])
                    continue
                row([name, attempt(lambda: timeit(case[0], dev)), attempt(lambda: timeit(fwd_bwd(*case), dev))])
        torch._dynamo.reset()
        torch.cuda.empty_cache() if gpu else None


# ----------------------------------------------------------------------------------------- 5. train
def bench_train(dev, quick, low):
    """train.py's language model at the showdown configuration (GPU: 6 layers, widths matched to the
    attention LM's ~10.6M parameters, batch 64 x 256, bf16 autocast, AdamW), eager and compiled as
    train.py compiles it: tokens/s of whole training steps (forward, backward, clip, optimizer)."""
    import train
    gpu = dev.type == "cuda"
    V, (n_layer, base, B, T), steps = 65, ((6, 384, 64, 256) if gpu else (1, 32, 2, 32)), (20 if gpu else 2)
    mode = getattr(train, "COMPILE_MODE", None)
    add = table(f"training steps of train.py's LM, {n_layer} layers, batch {B} x {T}, {str(low)[6:]}: tokens/s "
                f"(compiled: torch.compile mode={mode!r})",
                ["model", "d_model", "params", "eager tok/s", "compiled tok/s", "compiled / eager",
                 "of compiled attention", "compile s"])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    names = ["attention"] + [n for n in MODELS if n != "attention"]
    reference = None
    for name in names:
        cls = train.load_mixer(name)
        d, params, _ = train.match_width(cls, V, n_layer, base, {})
        rates, compile_s = [], "-"
        for compiled in (False, True) if gpu else (False,):  # Inductor on the CPU: ~40 s a model
            torch.manual_seed(0)
            model = train.build(cls, V, n_layer, d, {}, 0.0).to(dev)
            opt = train.make_optimizer(model, 1e-3)
            fwd = torch.compile(model, mode=mode) if compiled else model
            x, y = (torch.randint(0, V, (B, T), device=dev) for _ in range(2))

            def step():
                with torch.autocast(dev.type, dtype=low, enabled=low != torch.float32):
                    loss, _ = train.loss_of(fwd, x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            def measure():
                t0 = time.perf_counter()
                for _ in range(3):  # compilation, CUDA-graph recording, warm-up
                    step()
                sync(dev)
                t1 = time.perf_counter()
                for _ in range(steps):
                    step()
                sync(dev)
                return t1 - t0, B * T * steps / (time.perf_counter() - t1)
            got = attempt(measure)
            rates.append(got[1] if isinstance(got, tuple) else got)
            if compiled and isinstance(got, tuple):
                compile_s = f"{got[0]:.0f}"
            del model, opt, fwd
            torch._dynamo.reset()
            torch.cuda.empty_cache() if gpu else None
        rates += ["-"] * (2 - len(rates))
        eager, comp = rates
        reference = comp if name == "attention" and isinstance(comp, float) else reference
        ratio = f"{comp / eager:.2f}" if isinstance(comp, float) and isinstance(eager, float) else "-"
        of_att = f"{comp / reference:.2f}" if isinstance(comp, float) and reference else "-"
        add([name, d, f"{params / 1e6:.2f}M", eager, comp, ratio, of_att, compile_s])


# ---------------------------------------------------------------------------------------- 4. decode
def bench_decode(dev, quick, low):
    gpu = dev.type == "cuda"
    contexts = ([1024, 4096, 16384] if quick else [1024, 4096, 16384, 65536]) if gpu else [64, 128]
    d, n_steps = (512, 64) if gpu else (64, 8)
    results = {}
    add_row = table(f"decoding: step() after a prefill, Cls({d}), batch 1: tokens/s / peak MiB",
                    ["model"] + [f"context {c:,}" for c in contexts])
    for name in MODELS:
        torch.manual_seed(0)
        m = layer(name, d, dev)
        row = [name]
        for ctx in contexts:
            cell = attempt(lambda: decode(m, name, ctx, d, n_steps, dev, low))
            results.setdefault(name, []).append((cell[0], float(cell[1])) if isinstance(cell, tuple) and gpu
                                                else (math.nan, math.nan))
            row.append(f"{cell[0]:,.0f} / {cell[1]}" if isinstance(cell, tuple) else cell)
        add_row(row)
        del m
        torch.cuda.empty_cache() if gpu else None
    decode_lm(dev, contexts, low)
    return results, contexts


def decode(m, name, ctx, d, n_steps, dev, low):
    gpu = dev.type == "cuda"
    base = torch.cuda.memory_allocated() if gpu else 0
    with torch.no_grad(), autocast(dev, name, low):
        _, state = m(torch.randn(1, ctx, d, device=dev))  # the default (parallel) form
        token = torch.randn(1, d, device=dev)
        _, state = m.step(token, state)  # warm-up
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n_steps):
            _, state = m.step(token, state)
        sync(dev)
        elapsed = time.perf_counter() - t0
    mib = f"{(torch.cuda.max_memory_allocated() - base) / 2 ** 20:.1f}" if gpu else "n/a"
    return n_steps / elapsed, mib


def decode_lm(dev, contexts, low):
    """train.py's LM at its GPU configuration (widths matched as train.py matches them), batch 1, bf16 autocast as
    train.py samples: train.generate's decoding tokens/s, eager, replaying one CUDA graph per step, and replaying
    one CUDA graph of the step compiled by Inductor (fewer kernels), from the difference of two lengths after an
    untimed call (the prefill and the graph's capture cancel; the compilation is done); peak MiB of the longer call,
    prefill included, above the weights."""
    import train
    gpu = dev.type == "cuda"
    V, (n_layer, base), (short, long) = 65, ((train.GPU["n_layer"], train.GPU["d_model"]) if gpu else (1, 32)), (
        (16, 272) if gpu else (1, 9))
    ways = {"eager": (False, False), "graphed": (True, False), "graphed+compiled": (True, True)}
    add_row = table(f"decoding train.py's LM ({n_layer} layers, batch 1, {str(low)[6:]}) with train.generate: "
                    "tokens/s / peak MiB, eager, in a CUDA graph, and compiled in a CUDA graph",
                    ["model", "d_model"] + [f"context {c:,} {how}" for c in contexts for how in ways])

    def rate(model, idx, graphed, compiled):
        with torch.autocast(dev.type, dtype=low, enabled=low != torch.float32):
            seconds = []
            for n in (short, short, long):  # the first, untimed call compiles and warms up
                sync(dev)
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                train.generate(model, idx, n, temperature=0, cuda_graph=graphed, compile=compiled)
                sync(dev)
                seconds.append(time.perf_counter() - t0)
        peak = f"{(torch.cuda.max_memory_allocated() - weights) / 2 ** 20:.0f}" if gpu else "n/a"
        return (long - short) / (seconds[2] - seconds[1]), peak

    for name in MODELS:
        cls = train.load_mixer(name)
        d = train.match_width(cls, V, n_layer, base, {})[0]
        torch.manual_seed(0)
        model = train.build(cls, V, n_layer, d, {}).to(dev)
        torch._dynamo.reset()  # every model's step is LM.step: Dynamo keeps at most 8 compilations of one function
        weights = torch.cuda.memory_allocated() if gpu else 0
        row = [name, d]
        for ctx in contexts:
            idx = torch.randint(0, V, (1, ctx), device=dev)
            for graphed, compiled in ways.values():
                cell = attempt(lambda: rate(model, idx, graphed, compiled)) if gpu or not graphed else "cuda only"
                row.append(f"{cell[0]:,.0f} / {cell[1]}" if isinstance(cell, tuple) else cell)
        add_row(row)
        del model
        torch.cuda.empty_cache() if gpu else None


# ------------------------------------------------------------------------------------------ 6. mamba
def bench_mamba(dev, quick, low):
    """Forward and backward of Mamba(512) and of mambapy's MambaBlock (the same configuration: d_state 16, expand 2,
    d_conv 4), batch 8, float32 and bf16 autocast: milliseconds and peak memory above the inputs (the GPU's)."""
    import mamba
    block, config = optional("mambapy.mamba", "MambaBlock"), optional("mambapy.mamba", "MambaConfig")
    gpu = dev.type == "cuda"
    torch.manual_seed(0)
    layers = {"Mamba(512)": mamba.Mamba(512).to(dev)}
    if block is not None:
        layers["mambapy MambaBlock"] = block(config(d_model=512, n_layers=1)).to(dev)
    rows, batch = [], 8 if gpu else 2
    for T in (512, 2048) if gpu else (32,):
        for dtype in (torch.float32, low) if gpu else (torch.float32,):
            x = torch.randn(batch, T, 512, device=dev, requires_grad=True)
            times = {}
            for name, m in layers.items():
                def go():
                    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                        y = m(x)
                    return y[0] if isinstance(y, tuple) else y  # Mamba returns (y, state)
                run = fwd_bwd(go, [x, *m.parameters()])
                torch.cuda.reset_peak_memory_stats(dev) if gpu else None
                inputs = torch.cuda.memory_allocated(dev) if gpu else 0
                times[name] = attempt(lambda: timeit(run, dev))
                peak = (torch.cuda.max_memory_allocated(dev) - inputs) / 1e9 if gpu else "-"
                rows.append([name, T, str(dtype)[6:], times[name], peak, "-"])
            ours, theirs = times["Mamba(512)"], times.get("mambapy MambaBlock")
            if block is None:
                rows[-1][-1] = "mambapy not installed"
            elif isinstance(ours, float) and isinstance(theirs, float):
                rows[-1][-1] = f"{theirs / ours:.2f}"
    table(f"Mamba's layer at batch {batch} against mambapy, fwd+bwd",
          ["layer", "T", "dtype", "ms", "peak GB", "mambapy's time / ours"], rows)


# ------------------------------------------------------------------------------------------ main
COLOUR = dict(zip(MODELS, [f"C{i}" for i in range(10)] + ["black", "navy", "magenta", "teal"]))  # one per model


def report(root):
    """train.py's runs root/*/log.jsonl (finished, or cut off: their last evaluation) as a markdown table, their
    val-loss curves in root/showdown.png; the mqar runs also as the recall study's table and root/mqar.png
    (report_mqar), the parity runs as a table of the same columns."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "log.jsonl"))):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        evals = [r for r in rows if r.get("type") == "eval"]
        finals, starts = ([r for r in rows if r.get("type") == kind] for kind in ("final", "start"))
        if not finals and starts and evals:  # cut off (killed, or still running): its last evaluation stands
            last = evals[-1]
            best = min(evals, key=lambda r: r["val_loss"])
            finals = [dict(starts[-1], steps=last["step"], train_time=last["train_time"], acc=last.get("acc"),
                           tok_s=last["tokens"] / last["train_time"] if last["train_time"] else None,
                           best_val=best["val_loss"], best_step=best["step"], stop=f"cut at {last['step']}")]
        if finals:
            runs.append((os.path.basename(os.path.dirname(path)), evals, finals[-1]))
        else:
            print(f"{path}: no final line and no start line with an evaluation (an older train.py?), left out")
    if not runs:
        raise SystemExit(f"--report: no run to report in {root}/*/log.jsonl")
    print("| run | model | task | params | d_model | tok/s | best val loss | accuracy | stopped on | sample |\n"
          + "|---" * 10 + "|")
    for name, _, f in runs:
        text = "<br>".join([ln for ln in (f.get("sample") or "").splitlines() if ln.strip()][:2]).replace("|", "\\|")
        print(f"| {name} | {f['model']} | {f['task']} | {f['params'] / 1e6:.2f}M | {f['d_model']} "
              f"| {f['tok_s'] or 0:,.0f} | {f['best_val']:.4f} | {f['acc'] or 0:.3f} | {f['stop']} | {text} |")
    report_seeds([(name, f) for name, _, f in runs if f["task"] == "text"])
    recall = report_mqar([(evals, f) for _, evals, f in runs if f["task"] == "mqar"])
    report_mqar([(evals, f) for _, evals, f in runs if f["task"] == "parity"])  # its own table, the same columns
    try:
        from matplotlib.figure import Figure  # no pyplot: no display, no backend to pick
    except ImportError:
        return print("matplotlib is not installed: no showdown.png" + (" or mqar.png" if recall else "")
                     + " (pip install matplotlib)")
    if curves := [(name, f["model"], evals) for name, evals, f in runs if f["task"] == "text"]:
        # against time (what a budget of seconds buys) and against tokens (what each token teaches)
        by_time, by_tokens = (fig := Figure(figsize=(13, 5))).subplots(1, 2, sharey=True)
        for name, model, evals in curves:
            colour = COLOUR.get(model, "gray")
            by_time.plot([r["train_time"] for r in evals], [r["val_loss"] for r in evals], label=name, color=colour)
            seen = [r for r in evals if r.get("tokens")]  # a log axis: not step 0
            by_tokens.plot([r["tokens"] for r in seen], [r["val_loss"] for r in seen], label=name, color=colour)
        best = min(r["val_loss"] for *_, evals in curves for r in evals)
        by_time.set(xlabel="training time (s), evaluation excluded", ylabel="val loss",
                    ylim=(best - 0.05, best + 0.6))  # the end of the race, not the first steps
        by_tokens.set(xlabel="training tokens", xscale="log")
        for ax in (by_time, by_tokens):
            ax.grid(alpha=0.3)
        by_tokens.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.savefig(os.path.join(root, "showdown.png"), dpi=120, bbox_inches="tight")
        print(f"wrote {os.path.join(root, 'showdown.png')}")
    if recall:
        plot_mqar(recall, root, Figure)


def report_seeds(runs):
    """The spread over seeds: text runs [(name, final record)] of one configuration (model, d_model, n_layer, lr,
    block_size, batch_size; the seed aside) with more than one run, as one row each, lowest mean first."""
    groups = {}
    for name, f in runs:
        key = tuple(f.get(k) for k in ("model", "d_model", "n_layer", "lr", "block_size", "batch_size"))
        groups.setdefault(key, []).append((name, f))
    rows = sorted((sum(f["best_val"] for _, f in g) / len(g), g) for g in groups.values() if len(g) > 1)
    if rows:
        print("\n| model | runs | best val loss: mean | min | max | at steps |\n" + "|---" * 6 + "|")
    for mean, g in rows:
        best = [f["best_val"] for _, f in g]
        print(f"| {g[0][1]['model']} | {', '.join(name for name, _ in g)} | {mean:.4f} | {min(best):.4f} "
              f"| {max(best):.4f} | {', '.join(str(f['best_step']) for _, f in g)} |")


def report_mqar(runs):
    """The recall study's table: one row per configuration (model, mixer args, d_model, n_layer, block_size,
    num_pairs) with its best run over the learning rates swept. Returns the rows, [(configuration, the best run's
    final record, its first eval step at accuracy 0.99 or None, its first within 0.01 of its final accuracy (where
    the curve flattens), runs)], sorted by model, then state size."""
    if not runs:
        return []
    configs = {}
    for evals, f in runs:
        args = ",".join(f"{k}={v}" for k, v in sorted((f.get("mixer_args") or {}).items()))
        key = (f["model"], args, f["d_model"], f["n_layer"], f.get("block_size"), f.get("num_pairs"))
        reached = min((r["step"] for r in evals if (r.get("acc") or 0) >= 0.99), default=None)
        flat = min((r["step"] for r in evals if (r.get("acc") or 0) >= (f.get("acc") or 0) - 0.01), default=None)
        configs.setdefault(key, []).append((f, reached, flat))
    rows = []

    def rank(run):
        """Runs that end at 0.99 or above first, the sooner there the better (with --stop-acc 0.99 they stop at
        0.990 to 0.999, digits of evaluation noise), of two at the same step the more accurate; then the rest
        by final accuracy."""
        f, reached, _ = run
        acc = f.get("acc") or 0
        recalls = acc >= 0.99 and reached is not None
        return recalls, -reached if recalls else acc, acc

    for key, group in configs.items():
        f, reached, flat = max(group, key=rank)
        rows.append((key, f, reached, flat, len(group)))

    def order(row):  # model, state size (unknown last), then the rest of the configuration
        (model, args, d_model, n_layer, block, pairs), f = row[:2]
        state = f.get("state_size")
        return model, state is None, state or 0, d_model, n_layer, block or 0, pairs or 0, args
    rows.sort(key=order)
    dash = lambda x, form="{}": "-" if x is None else form.format(x)  # noqa: E731  older logs lack the new fields
    print("\n| model | mixer args | d_model | layers | block | pairs | state / layer | params | accuracy | lr "
          "| steps to 0.99 | flat from step | stopped on | runs |\n" + "|---" * 14 + "|")
    for (model, args, d_model, n_layer, block, pairs), f, reached, flat, n in rows:
        print(f"| {model} | {args or '-'} | {d_model} | {n_layer} | {dash(block)} | {dash(pairs)} "
              f"| {dash(f.get('state_size'), '{:,}')} | {f['params'] / 1e6:.2f}M | {dash(f.get('acc'), '{:.3f}')} "
              f"| {dash(f.get('lr'), '{:g}')} | {dash(reached)} | {dash(flat)} | {f['stop']} | {n} |")
    return rows


def plot_mqar(rows, root, Figure):
    """root/mqar.png, Zoology's figure 2: accuracy (best over lrs) against state size per layer, one line per
    (model, mixer args), one panel per (block_size, num_pairs); conv-free variants dashed in their model's colour."""
    def conv_free(f):  # the study's variants without the short conv: width 1
        args = f.get("mixer_args") or {}
        return args.get("conv_size") == 1 or args.get("d_conv") == 1

    rows = [(key, f) for key, f, *_ in rows if f.get("state_size")]
    if not rows:
        return print("the mqar runs' logs have no state_size (an older train.py): no mqar.png")
    settings = sorted({key[4:] for key, _ in rows})  # (block_size, num_pairs)
    fig = Figure(figsize=(4.5 * len(settings), 4))
    for ax, (block, pairs) in zip(fig.subplots(1, len(settings), sharey=True, squeeze=False)[0], settings):
        lines = {}
        for key, f in rows:
            if key[4:] == (block, pairs):
                lines.setdefault(key[:2], []).append(f)
        for (model, args), fs in sorted(lines.items()):
            fs.sort(key=lambda f: f["state_size"])
            ax.plot([f["state_size"] for f in fs], [f.get("acc") or 0 for f in fs], "o--" if conv_free(fs[0]) else "o-",
                    color=COLOUR.get(model, "gray"), label=f"{model} {args}".strip())
        ax.set(xscale="log", xlabel="state size per layer (numbers)", title=f"{pairs} pairs in {block} tokens",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("accuracy (best over learning rates)")
    handles = {h.get_label(): h for ax in fig.axes for h in ax.get_lines()}  # a variant once, whatever its panels
    labels = sorted(handles)
    fig.axes[-1].legend([handles[k] for k in labels], labels, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.savefig(os.path.join(root, "mqar.png"), dpi=120, bbox_inches="tight")
    print(f"wrote {os.path.join(root, 'mqar.png')}")


def plot(decoded, contexts):
    """bench.png: decode tokens/s and the memory step() adds, against context, one line per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("\n(matplotlib is not installed: no bench.png)")
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, cells in decoded.items():
        speed.plot(contexts, [c[0] for c in cells], "o-", label=name)
        memory.plot(contexts, [max(c[1], 0.1) for c in cells], "o-", label=name)  # log axis: 0 MiB drawn at 0.1
    speed.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="tokens/s", title="decoding with step()")
    memory.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="peak MiB while stepping (state included)",
               title="memory of a step: flat, but attention's KV cache")
    speed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig("bench.png", dpi=120)
    print("\nwrote bench.png (decode tokens/s and memory against context)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, no T = 8192 or 64K context")
    p.add_argument("--only", action="append", help="sections, repeatable or comma-separated: " + ",".join(SECTIONS))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--skip", action="append", default=[], metavar="NAME",
                   help="leave out the chunked cores whose name contains NAME (repeatable)")
    p.add_argument("--report", metavar="DIR", help="no benchmark: train.py's runs DIR/*/log.jsonl, tables and plots")
    args = p.parse_args(argv)
    if args.report:
        return report(args.report)
    SKIP[:] = args.skip
    only = [s for o in args.only or [",".join(SECTIONS)] for s in o.split(",") if s]
    if bad := [s for s in only if s not in SECTIONS]:
        p.error(f"--only: unknown section(s) {bad}; choose from {SECTIONS}")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        print("The GPU tables need CUDA" + (": a tiny CPU smoke run follows (shapes and timings are not benchmarks)."
                                            if args.device else "; pass --device cpu for a tiny CPU smoke run."))
        if not args.device:
            return
    tv = getattr(scan_module.triton, "__version__", "none")  # None where Triton is missing
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# bench.py: {name}, torch {torch.__version__}, triton {tv}, {datetime.date.today()}")
    low = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for section in SECTIONS:  # in this order, whatever the order of --only
        if section in only:
            result = globals()["bench_" + section](dev, args.quick, low)
            if section == "decode" and dev.type == "cuda":
                plot(*result)


if __name__ == "__main__":
    main()
