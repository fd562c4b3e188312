"""Train a character-level language model with any mixer of the zoo, then sample from it.

    python train.py --model linear_attention                    # tiny Shakespeare (downloaded once), to out/<model>
    python train.py --model mamba --data my.txt --max-iters 2000 --out-dir runs/mamba
    python train.py --model mamba --resume                      # continue out/mamba/ckpt.pt
    python train.py --model mamba --task mqar --max-time 600    # associative recall, 10 minutes of training
    python train.py --model mamba --mixer-args d_state=32,expand=1 --compile   # Mamba(d_model, d_state=32, ...)
    python train.py --report out                                # out/*/log.jsonl as a table, out/showdown.png

nanoGPT's model with <model>.py's mixer for attention: x += mixer(norm(x)); x += mlp(norm(x)), head tied to the
embedding. Sampling prefills the prompt in parallel (forward), then runs each mixer's step(). Unless --d-model is
passed, each model gets the width at which it has the attention LM's parameter count (at d_model 384 on a GPU,
128 on the CPU). Batch i depends on (seed, i) alone, so --resume is bit-for-bit (not with --max-time: the LR
schedule then follows the clock). Flags override the defaults (a GPU's, or a smaller CPU config) and the values
a checkpoint was trained with (--resume).
"""
import argparse
import ast
import glob
import importlib
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"rnn": "RNN", "lstm": "LSTM", "attention": "Attention", "linear_attention": "LinearAttention",
          "retnet": "RetNet", "gated_retention": "GatedRetention", "mamba": "Mamba", "mamba2": "Mamba2",
          "deltanet": "DeltaNet", "gated_deltanet": "GatedDeltaNet",
          "rwkv7": "RWKV7"}
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# mqar_vocab: 256, not Zoology's 8192: only the num_pairs keys of a sequence compete for a state, so recall is
# as hard, while a small embedding trains in fewer steps and leaves the parameter budget to the mixers.
COMMON = dict(lr=1e-3, seed=1337, sample_len=300, prompt="\n", compile=False, resume=False, data=None,
              task="text", num_pairs=16, mqar_vocab=256, mixer_args="", max_time=None)
# nanoGPT's shakespeare-char size on a GPU; a small one that runs in minutes on a laptop's CPU. d_model is
# attention's width there, the parameter budget every other model is matched to (unless --d-model). Dropout
# 0.3 and 3000 steps, not nanoGPT's 0.2 and 5000: measured on an H100, attention's val loss is best at 2000-2500
# steps (1.440) and overfits after; with 0.2 it peaks at 1.455 by step 1500 (README, "Results")
GPU = dict(n_layer=6, d_model=384, block_size=256, batch_size=64, warmup=100, max_iters=3000,
           eval_interval=250, eval_iters=100, log_interval=50, dropout=0.3)
CPU = dict(n_layer=2, d_model=128, block_size=128, batch_size=16, warmup=20, max_iters=1000,
           eval_interval=50, eval_iters=10, log_interval=10, dropout=0.0)
MQAR = dict(dropout=0.0)  # fresh random sequences every step leave nothing to overfit (Zoology trains without)


# ----------------------------------------------------------------------------- data

def get_data(path):
    """The text at path, or tiny Shakespeare from the cache (downloaded and checked once)."""
    if path is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        path = os.path.join(cache, "zoo", "tinyshakespeare.txt")
        if not os.path.exists(path):
            print(f"downloading tiny Shakespeare to {path}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:  # checks the sha256, and writes to a temporary file first: never a partial file at path
                torch.hub.download_url_to_file(SHAKESPEARE_URL, path, hash_prefix=SHAKESPEARE_SHA256, progress=False)
            except (OSError, RuntimeError) as e:  # offline, or an invalid hash value
                sys.exit(f"could not download tiny Shakespeare ({e}); pass a text file with --data PATH")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"cannot read --data {path}: {e}")
    if not text:
        sys.exit(f"--data {path} is empty")
    return text


def split(text, chars, block_size):
    """Encode with the vocabulary chars; 90% train, 10% val; both must hold a block plus its target."""
    stoi = {c: i for i, c in enumerate(chars)}
    if unknown := set(text) - set(stoi):
        sys.exit(f"the data has characters the checkpoint's vocabulary lacks: {''.join(sorted(unknown))[:40]!r}")
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    if len(data) - n < block_size + 1:
        sys.exit(f"the data has {len(data)} characters, too short for block_size={block_size}: the 10% val split needs "
                 f"block_size + 1, so {math.ceil((block_size + 1) / 0.1)} in all (or pass a smaller --block-size)")
    return data[:n], data[n:]


def get_batch(data, i, seed, block_size, batch_size, device):
    """Batch i: a function of (seed, i) only, whatever happened before."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=g)
    x = torch.stack([data[j:j + block_size] for j in ix])
    y = torch.stack([data[j + 1:j + 1 + block_size] for j in ix])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def get_mqar_batch(i, seed, block_size, batch_size, num_pairs, vocab, device):
    """Batch i of multi-query associative recall as in Zoology (Arora et al. 2023, arXiv:2312.04927):
    k1 v1 k2 v2 ... (distinct keys from the vocabulary's first half, values from its second), then each key again
    at distinct even offsets, nearer ones likelier; random values between. Labels: each query's value, else -100."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    B, T, P, half = batch_size, block_size, num_pairs, vocab // 2
    keys = torch.rand(B, half, generator=g).argsort(1)[:, :P]  # P distinct keys per row, in random order
    values = half + torch.rand(B, half, generator=g).argsort(1)[:, :P]
    x = torch.randint(half, vocab, (B, T), generator=g)  # filler: each key appears twice only, pair and query
    x[:, 0:2 * P:2], x[:, 1:2 * P:2] = keys, values
    # P distinct gaps drawn one by one with weights gap^(a-1), vectorised: the top P of log-weight + Gumbel noise
    gaps = torch.arange(1, (T - 2 * P) // 2 + 1)
    gumbel = -(-torch.rand(B, len(gaps), generator=g).log()).log()
    pos = 2 * P + 2 * ((0.01 - 1) * gaps.log() + gumbel).topk(P, dim=1).indices
    x.scatter_(1, pos, keys)
    y = torch.full((B, T), -100).scatter_(1, pos, values)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- model

def load_mixer(name):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    try:
        return getattr(importlib.import_module(name), MODELS[name])
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        sys.exit(f"model {name!r}: {name}.py is not in {HERE}")


class Block(nn.Module):
    def __init__(self, mixer_cls, d_model, dropout=0.0, mixer_args=None):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        if "dropout" in inspect.signature(mixer_cls).parameters:  # attention's, on its weights (as nanoGPT)
            mixer_args = {"dropout": dropout, **(mixer_args or {})}
        self.mixer = mixer_cls(d_model, **(mixer_args or {}))
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=False))
        self.drop = nn.Dropout(dropout)  # on each residual branch, as nanoGPT; identity in eval()

    def forward(self, x, state=None, step=False):
        y, state = (self.mixer.step if step else self.mixer)(self.norm1(x), state)
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.norm2(x))), state


class LM(nn.Module):
    """forward(idx [B, T], states=None) -> (logits [B, T, V], states); step(idx [B], states) -> ([B, V], states)."""

    def __init__(self, mixer_cls, vocab_size, n_layer, d_model, dropout=0.0, mixer_args=None):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(mixer_cls, d_model, dropout, mixer_args) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d_model)
        # nanoGPT's init for what is ours; each mixer keeps its paper's init
        nn.init.normal_(self.wte.weight, std=0.02)
        for b in self.blocks:
            nn.init.normal_(b.mlp[0].weight, std=0.02)
            nn.init.normal_(b.mlp[2].weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, states=None, step=False):
        x, new = self.drop(self.wte(idx)), []
        for block, state in zip(self.blocks, states or [None] * len(self.blocks)):
            x, state = block(x, state, step)
            new.append(state)
        return F.linear(self.norm(x), self.wte.weight), new

    def step(self, idx, states):
        return self(idx, states, step=True)

    def stats(self):
        """Each mixer's `stats` dict (if it has one), averaged over layers."""
        per_layer = [b.mixer.stats for b in self.blocks if isinstance(getattr(b.mixer, "stats", None), dict)]
        keys = sorted(per_layer[0]) if per_layer else []  # every layer is the same class: the same keys
        return {k: sum(float(s[k]) for s in per_layer) / len(per_layer) for k in keys}


def parse_mixer_args(text):
    """"d_state=32,jacobian=diag,A_init_range=(1, 16)" -> dict; a value that is no Python literal stays a string."""
    args = {}
    for item in filter(None, re.split(r",(?=\s*\w+\s*=)", text or "")):  # split at commas that start a k=
        k, eq, v = (s.strip() for s in item.partition("="))
        if not eq or not k.isidentifier():
            sys.exit(f"--mixer-args: expected k=v[,k2=v2...], got {item.strip()!r}")
        try:
            args[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            args[k] = v
    return args


def build(mixer_cls, vocab_size, n_layer, d_model, mixer_args, dropout=0.0):
    try:
        return LM(mixer_cls, vocab_size, n_layer, d_model, dropout, mixer_args)
    except TypeError as e:  # an unknown keyword
        sys.exit(f"--mixer-args {mixer_args}: {e}; {mixer_cls.__name__} takes {inspect.signature(mixer_cls)}")


def match_width(mixer_cls, vocab_size, n_layer, base, mixer_args):
    """(d_model, params, target): the width, a multiple of 16 in [base/2, 2 base], whose LM has the parameter
    count closest to the attention LM's at width base. Counted on the meta device: no memory, no init."""
    def count(cls, d, args):
        try:
            with torch.device("meta"):
                return sum(p.numel() for p in build(cls, vocab_size, n_layer, d, args).parameters())
        except ValueError:  # a width the mixer rejects (heads must divide it, ...)
            return None

    target = count(load_mixer("attention"), base, {})
    sizes = [(d, n) for d in range(base // 32 * 16 or 16, 2 * base + 1, 16) if (n := count(mixer_cls, d, mixer_args))]
    if not sizes:
        sys.exit(f"{mixer_cls.__name__} accepts no d_model in [{base // 2}, {2 * base}]: pass --d-model")
    return (*min(sizes, key=lambda dn: abs(dn[1] - target)), target)


def make_optimizer(model, lr):
    """AdamW; weight decay on matrices only (and never on a parameter marked _no_weight_decay)."""
    params = list(model.parameters())
    decay = [p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in params]
    groups = [{"params": [p for p, d in zip(params, decay) if d], "weight_decay": 0.1},
              {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=params[0].is_cuda)  # fused: faster


def get_lr(step, lr, warmup, max_iters, time_frac=0.0):
    """Linear warmup to lr, then cosine decay to lr / 10 at max_iters, or sooner when time_frac (the share
    of --max-time spent) is further along: a slow model still anneals within its time budget."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, max_iters - warmup), time_frac))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


# ----------------------------------------------------------------------------- train, eval, sample

def loss_of(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100), logits  # mqar: answers only


@torch.no_grad()
def evaluate(model, batch, n, autocast):
    """(mean loss, accuracy of the argmax on the labelled positions) over the batches batch(0..n-1)."""
    model.eval()
    losses, hits, total = [], 0, 0
    for k in range(n):
        x, y = batch(k)
        with autocast:
            loss, logits = loss_of(model, x, y)
        losses.append(loss)
        hits, total = hits + (logits.argmax(-1) == y).sum(), total + (y != -100).sum()
    model.train()
    return torch.stack(losses).mean().item(), (hits / total).item()


@torch.no_grad()
def sample(model, prompt, n, chars, device, autocast, seed, temperature=0.8):
    """Parallel prefill of the prompt, then n tokens with each mixer's step()."""
    if not prompt or set(prompt) - set(chars):
        sys.exit(f"--prompt must be non-empty and use only the vocabulary's characters, got {prompt!r}")
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    out = prompt
    with autocast:
        logits, states = model(torch.tensor([[chars.index(c) for c in prompt]], device=device))
        logits = logits[:, -1]
        for _ in range(n):
            nxt = torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1, generator=g)[:, 0]
            out += chars[nxt.item()]
            logits, states = model.step(nxt, states)
    model.train()
    return out


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS))
    p.add_argument("--task", choices=["text", "mqar"])
    p.add_argument("--resume", action="store_true", default=None)
    p.add_argument("--compile", action="store_true", default=None)
    ints = "max-iters batch-size block-size n-layer d-model warmup seed sample-len eval-interval eval-iters"
    for flags, typ in ((ints + " log-interval num-pairs mqar-vocab", int), ("lr dropout max-time", float),
                       ("data mixer-args device out-dir prompt report", str)):
        for flag in flags.split():
            p.add_argument("--" + flag, type=typ)
    args = p.parse_args(argv)  # every default is None: device defaults < checkpoint < flags passed
    if args.model is None and args.report is None:
        p.error("the following arguments are required: --model (or --report DIR)")
    return args


def get_config(args):
    """Device (then task) defaults < what the checkpoint was trained with (--resume) < the flags passed."""
    passed = {k: v for k, v in vars(args).items() if v is not None}
    device = passed.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = passed.get("out_dir") or os.path.join("out", passed["model"])
    path = os.path.join(out_dir, "ckpt.pt")
    if passed.get("resume") and not os.path.exists(path):
        sys.exit(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False) if passed.get("resume") else None
    restored = {k: v for k, v in ckpt["args"].items() if k not in ("device", "resume")} if ckpt else {}
    given, cuda = {**restored, **passed}, device.startswith("cuda")
    cfg = argparse.Namespace(**{**COMMON, **(GPU if cuda else CPU), **(MQAR if given.get("task") == "mqar" else {}),
                                "d_model": None, **given, "device": device, "out_dir": out_dir})  # None: matched
    shown = "n_layer d_model block_size batch_size lr dropout warmup max_iters eval_interval eval_iters max_time"
    shown += " mixer_args" + (" task num_pairs mqar_vocab" if cfg.task == "mqar" else "")
    shown = {k: getattr(cfg, k) for k in shown.split()} | {"d_model": cfg.d_model or "matched"}
    shown = " ".join(f"{k.replace('_size', '')}={v}" for k, v in shown.items() if v not in (None, ""))
    print(f"{device}: {'' if cuda else 'small config '}{shown}" + (f" (resumed from {path})" if ckpt else "")
          + " -- any flag overrides")
    return cfg, ckpt


def try_compile(model, batch, autocast):
    """torch.compile fails lazily, at the first call: run one forward and backward now."""
    try:
        compiled = torch.compile(model)
        with autocast, torch.random.fork_rng():  # dropout here must not shift training's RNG (bit-for-bit resume)
            loss_of(compiled, *batch)[0].backward()
        return compiled
    except Exception as e:
        print(f"--compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:100]}); running eager")
        return model
    finally:
        model.zero_grad(set_to_none=True)


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    cfg, ckpt = get_config(args)
    device, cuda, seed, B, T = cfg.device, cfg.device.startswith("cuda"), cfg.seed, cfg.batch_size, cfg.block_size
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    mixer_cls, mixer_args = load_mixer(cfg.model), parse_mixer_args(cfg.mixer_args)
    if cfg.task == "mqar":
        P, V = cfg.num_pairs, cfg.mqar_vocab
        if not 1 <= P <= V // 2 or 4 * P > T:
            sys.exit(f"--task mqar needs 1 <= --num-pairs <= --mqar-vocab / 2 and 4 * num_pairs <= --block-size, "
                     f"got num_pairs={P}, mqar_vocab={V}, block_size={T}")
        chars, vocab_size, data_line = None, V, f"{P} key-value pairs per {T} tokens"
        train_batch = lambda i: get_mqar_batch(i, seed, T, B, P, V, device)  # noqa: E731
        val_batch = lambda k: train_batch(-1 - k)  # noqa: E731  validation: i < 0
    else:
        text = get_data(cfg.data)
        chars = (ckpt or {}).get("vocab") or "".join(sorted(set(text)))
        train_data, val_data = split(text, chars, T)
        vocab_size, data_line = len(chars), f"{len(train_data):,} train / {len(val_data):,} val characters"
        train_batch = lambda i: get_batch(train_data, i, seed, T, B, device)  # noqa: E731
        val_batch = lambda k: get_batch(val_data, k, seed, T, B, device)  # noqa: E731
    matched = ""
    if cfg.d_model is None:
        base = (GPU if cuda else CPU)["d_model"]
        cfg.d_model, _, target = match_width(mixer_cls, vocab_size, cfg.n_layer, base, mixer_args)
        matched = f" (matched: the attention LM at d_model {base} has {target:,})"
    torch.manual_seed(seed)
    try:
        model = build(mixer_cls, vocab_size, cfg.n_layer, cfg.d_model, mixer_args, cfg.dropout).to(device)
    except ValueError as e:
        sys.exit(f"{cfg.model}: {e}")
    optimizer = make_optimizer(model, cfg.lr)
    step, best_val, acc, train_time = 0, float("inf"), None, 0.0
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            sys.exit(f"{ckpt_path} does not fit this model (different --model, --n-layer, --d-model, --task?): {e}")
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val, acc, train_time = ckpt["step"], ckpt["best_val"], ckpt.get("acc"), ckpt.get("train_time", 0.0)
        torch.set_rng_state(ckpt["rng"])
        if cuda and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    os.makedirs(cfg.out_dir, exist_ok=True)
    open(log_path, "a" if ckpt else "w").close()  # a fresh run starts a fresh log; --resume appends to it
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model}: {n_params:,} parameters at d_model {cfg.d_model}{matched}, vocab {vocab_size}, {data_line}")

    def log(**record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save():  # to .tmp first: a Ctrl-C mid-write never leaves a broken checkpoint
        torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, vocab=chars,
                        args=vars(cfg), rng=torch.get_rng_state(), best_val=best_val, acc=acc, train_time=train_time,
                        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
                   ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    fwd = try_compile(model, train_batch(0), autocast) if cfg.compile else model

    interrupted = []  # first Ctrl-C: finish this step, save, stop; a second one aborts at once

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit at once)", flush=True)

    main_thread = threading.current_thread() is threading.main_thread()  # signals only work there
    old_handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    t_start = t_last = time.time()  # t_last: when the current stretch of training (between log lines) began
    start_step, last_step, train_losses = step, step, []
    try:
        while True:
            out_of_time = cfg.max_time is not None and train_time + time.time() - t_last >= cfg.max_time
            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters or out_of_time
            if is_eval or step % cfg.log_interval == 0:
                if cuda:
                    torch.cuda.synchronize()  # the steps still queued on the GPU are training time
                now = time.time()
                train_time += now - t_last
                stats = model.stats()  # the last training step's, before evaluate() overwrites them
                train_loss = torch.stack(train_losses).mean().item() if train_losses else None
                tok_s = (step - last_step) * B * T / (now - t_last) if step > last_step else None
                line = f"step {step:5d}" + (f" | train {train_loss:.4f}" if train_losses else "")
                if is_eval:
                    val, acc = evaluate(fwd, val_batch, cfg.eval_iters, autocast)
                    best_val = min(best_val, val)
                    line += f" | val {val:.4f} | acc {acc:.3f}"
                    save()
                    log(type="eval", step=step, tokens=step * B * T, train_time=train_time,
                        train_loss=train_loss, val_loss=val, acc=acc, tok_s=tok_s)
                if tok_s is not None:
                    eta = (now - t_start) / (step - start_step) * (cfg.max_iters - step)
                    eta = eta if cfg.max_time is None else max(0.0, min(eta, cfg.max_time - train_time))
                    line += f" | {tok_s:,.0f} tok/s | {fmt_time(train_time)} trained, ETA {fmt_time(eta)}"
                print(line + "".join(f" | {k} {v:.3g}" for k, v in stats.items()), flush=True)
                t_last, last_step, train_losses = time.time(), step, []
            if step >= cfg.max_iters or out_of_time or interrupted:
                break
            time_frac = (train_time + time.time() - t_last) / cfg.max_time if cfg.max_time else 0.0
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, cfg.lr, cfg.warmup, cfg.max_iters, time_frac)
            x, y = train_batch(step)
            with autocast:
                loss, _ = loss_of(fwd, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_losses.append(loss.detach())
            step += 1
    except KeyboardInterrupt:
        interrupted.append(True)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old_handler)
    if interrupted:
        train_time += time.time() - t_last
        save()
        return print(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
    stop = "steps" if step >= cfg.max_iters else "time"
    print(f"done: stopped on {stop} at step {step} after {fmt_time(train_time)} of training "
          f"(this run: {fmt_time(time.time() - t_start)} wall), best val {best_val:.4f}, saved {ckpt_path}")
    text_sample = None
    if cfg.task == "text" and cfg.sample_len > 0:
        text_sample = sample(model, cfg.prompt, cfg.sample_len, chars, device, autocast, seed)
        print("-" * 40 + "\n" + text_sample)
    log(type="final", model=cfg.model, task=cfg.task, params=n_params, d_model=cfg.d_model, n_layer=cfg.n_layer,
        mixer_args=mixer_args, steps=step, tokens=step * B * T, train_time=train_time,
        tok_s=step * B * T / train_time if train_time else None, best_val=best_val, acc=acc, stop=stop,
        sample=text_sample, device=torch.cuda.get_device_name(device) if cuda else f"{device} ({os.cpu_count()} cores)",
        commit=git_commit())


def report(root):
    """A markdown table of the finished runs root/*/log.jsonl, and their val-loss curves in root/showdown.png."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "log.jsonl"))):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if finals := [r for r in rows if r.get("type") == "final"]:
            evals = [r for r in rows if r.get("type") == "eval"]
            runs.append((os.path.basename(os.path.dirname(path)), evals, finals[-1]))
        else:
            print(f"{path}: no final line (running or interrupted), left out")
    if not runs:
        sys.exit(f"--report: no finished run in {root}/*/log.jsonl")
    print("| run | model | task | params | d_model | tok/s | best val loss | accuracy | stopped on | sample |\n"
          + "|---" * 10 + "|")
    for name, _, f in runs:
        text = "<br>".join([ln for ln in (f.get("sample") or "").splitlines() if ln.strip()][:2]).replace("|", "\\|")
        print(f"| {name} | {f['model']} | {f['task']} | {f['params'] / 1e6:.2f}M | {f['d_model']} "
              f"| {f['tok_s'] or 0:,.0f} | {f['best_val']:.4f} | {f['acc'] or 0:.3f} | {f['stop']} | {text} |")
    try:
        from matplotlib.figure import Figure  # no pyplot: no display, no backend to pick
    except ImportError:
        return print("matplotlib is not installed: no showdown.png (pip install matplotlib)")
    curves = [(name, evals) for name, evals, f in runs if f["task"] == "text"]
    if curves:
        fig = Figure(figsize=(8, 5))
        ax = fig.subplots()
        for name, evals in curves:
            ax.plot([r["train_time"] for r in evals], [r["val_loss"] for r in evals], label=name)
        best = min(r["val_loss"] for _, evals in curves for r in evals)
        ax.set(xlabel="training time (s), evaluation excluded", ylabel="val loss",
               ylim=(best - 0.05, best + 0.6))  # the end of the race, not the first steps
        ax.legend(), ax.grid(alpha=0.3)
        fig.savefig(os.path.join(root, "showdown.png"), dpi=120, bbox_inches="tight")
        print(f"wrote {os.path.join(root, 'showdown.png')}")


if __name__ == "__main__":
    main()
