"""Train a character-level language model with any mixer of the zoo, then sample from it.

    python train.py --model mamba2                          # tiny Shakespeare (downloaded once) to out/mamba2
    python train.py --model mamba --data my.txt --out-dir runs/mamba --max-iters 2000
    python train.py --model mamba --resume --patience 0     # continue out/mamba/ckpt.pt past its early stop
    python train.py --model mamba --task mqar --max-time 600 --mixer-args d_state=32,expand=1
    python train.py --model mamba3 --task parity --block-size 256 --stop-acc 0.99
    torchrun --nproc_per_node=4 train.py --model mamba2     # DDP: one process per GPU, the same global batch

nanoGPT's model with <model>.py's mixer for attention: x += mixer(norm(x)); x += mlp(norm(x)), head tied to the
embedding; unless --d-model is passed, each model gets the width at which it has the attention LM's parameter count.
<out-dir>/ckpt.pt is the latest state (--resume), best.pt the best val loss: training stops when that has not improved
for --patience evaluations, and the sample (a parallel prefill of the prompt, then each mixer's step()) comes from
best.pt. Batch i and step i's dropout are functions of (seed, i): --resume is bit-for-bit on the CPU (not with
--max-time, where the LR schedule follows the clock; on a GPU two runs of one seed already drift apart). Defaults (a
GPU's, or a small CPU config) < a checkpoint's flags < flags passed.
"""
import argparse
import ast
import contextlib
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"rnn": "RNN", "lstm": "LSTM", "attention": "Attention", "linear_attention": "LinearAttention",
          "retnet": "RetNet", "gated_retention": "GatedRetention", "mamba": "Mamba", "mamba2": "Mamba2",
          "mamba3": "Mamba3", "deltanet": "DeltaNet", "gated_deltanet": "GatedDeltaNet", "kda": "KDA", "rwkv7": "RWKV7",
          "mlstm": "MLSTM"}
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# torch.compile's mode for training and evaluation, measured on an H100 (bench.py --only train): CUDA graphs,
# attention 2.1M tok/s against 1.4M with mode "default" and 0.7M eager
COMPILE_MODE = "reduce-overhead"

# mqar_vocab: 256, not Zoology's 8192: only the num_pairs keys of a sequence compete for a state, so recall is
# as hard, while a small embedding trains in fewer steps and leaves the parameter budget to the mixers.
COMMON = dict(lr=1e-3, seed=1337, sample_len=300, prompt="\n", temperature=0.8, task="text", num_pairs=16,
              mqar_vocab=256, mixer_args="", patience=1, stop_acc=0.0, max_time=None, data=None)
# nanoGPT's shakespeare-char size on a GPU; a small one that runs in minutes on a laptop's CPU. d_model is
# attention's width there, the parameter budget every other model is matched to (unless --d-model). Dropout 0.3
# and 3000 steps, not nanoGPT's 0.2 and 5000: measured on an H100, attention's val loss is best at 2000-2500 steps
# (1.440). Patience 1: mamba2's val loss is best at step 750, then climbs (README, "Results").
GPU = dict(n_layer=6, d_model=384, block_size=256, batch_size=64, warmup=100, max_iters=3000,
           eval_interval=250, eval_iters=100, log_interval=50, dropout=0.3, compile=True)
CPU = dict(n_layer=2, d_model=128, block_size=128, batch_size=16, warmup=20, max_iters=1000,
           eval_interval=50, eval_iters=10, log_interval=10, dropout=0.0, compile=False)
SYNTHETIC = dict(dropout=0.0, patience=0)  # mqar, parity: fresh random sequences each step (Zoology: no dropout)


# ----------------------------------------------------------------------------- data

def get_data(path):
    """The text at path, or tiny Shakespeare from the cache (downloaded once; its sha256 checked at each use)."""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zoo",
                         "tinyshakespeare.txt")
    if path is None and not os.path.exists(cache):
        print(f"downloading tiny Shakespeare to {cache}")
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        try:  # checks the sha256, and writes to a temporary file first: never a partial file at path
            torch.hub.download_url_to_file(SHAKESPEARE_URL, cache, hash_prefix=SHAKESPEARE_SHA256, progress=False)
        except (OSError, RuntimeError) as e:  # offline, or an invalid hash value
            sys.exit(f"could not download tiny Shakespeare ({e}); pass a text file with --data PATH")
    try:
        with open(path or cache, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"cannot read {path or cache}: {e}")
    if path is None and hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        sys.exit(f"{cache} is not tiny Shakespeare (its sha256 differs): delete it to download it again")
    return text or sys.exit(f"{path or cache} is empty")


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


def get_parity_batch(i, seed, block_size, batch_size, device):
    """Batch i of running parity, a state-tracking task (Grazzi et al. 2024, arXiv:2411.12537): random bits, and
    at each position t the label XOR of bits 0..t."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    x = torch.randint(2, (batch_size, block_size), generator=g)
    return x.to(device, non_blocking=True), (x.cumsum(1) % 2).to(device, non_blocking=True)


def get_batches(cfg, ckpt, rank=0, world=1):
    """(chars, vocab_size, the data in words, train_batch(i), val_batch(k)): this process's rows of each batch
    (DDP: its share of the global batch). A resumed text run keeps its checkpoint's vocabulary."""
    seed, T, B, device = cfg.seed, cfg.block_size, cfg.batch_size, cfg.device
    shard = lambda xy: tuple(t.chunk(world)[rank] for t in xy)  # noqa: E731
    if cfg.task == "mqar":
        P, V = cfg.num_pairs, cfg.mqar_vocab
        if not 1 <= P <= V // 2 or 4 * P > T:
            sys.exit(f"--task mqar needs 1 <= --num-pairs <= --mqar-vocab / 2 and 4 * num_pairs <= --block-size, "
                     f"got num_pairs={P}, mqar_vocab={V}, block_size={T}")
        train_batch = lambda i: shard(get_mqar_batch(i, seed, T, B, P, V, device))  # noqa: E731
        return None, V, f"{P} key-value pairs per {T} tokens", train_batch, lambda k: train_batch(-1 - k)  # val: i < 0
    if cfg.task == "parity":
        train_batch = lambda i: shard(get_parity_batch(i, seed, T, B, device))  # noqa: E731
        return None, 2, f"{T} bits per sequence", train_batch, lambda k: train_batch(-1 - k)
    text = get_data(cfg.data)
    chars = (ckpt or {}).get("vocab") or "".join(sorted(set(text)))
    train_data, val_data = split(text, chars, T)
    if cfg.sample_len and (not cfg.prompt or set(cfg.prompt) - set(chars)):
        sys.exit(f"--prompt must be non-empty and use only the vocabulary's characters, got {cfg.prompt!r}")
    return (chars, len(chars), f"{len(train_data):,} train / {len(val_data):,} val characters",
            lambda i: shard(get_batch(train_data, i, seed, T, B, device)),
            lambda k: shard(get_batch(val_data, k, seed, T, B, device)))


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

    def reserve(self, states, n):
        """states with room for n steps of fixed shapes where a mixer's state grows (its reserve(state, n))."""
        return [b.mixer.reserve(s, n) if hasattr(b.mixer, "reserve") else s for b, s in zip(self.blocks, states)]

    def stats(self):
        """Each mixer's `stats` dict (rnn's and lstm's Newton iterations), averaged over layers."""
        per_layer = [b.mixer.stats for b in self.blocks if isinstance(getattr(b.mixer, "stats", None), dict)]
        return {k: sum(float(s[k]) for s in per_layer) / len(per_layer) for k in (per_layer or [{}])[0]}


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
    """The LM, or a one-line error with what the mixer says of its arguments (its own ValueError where it has one)."""
    try:
        return LM(mixer_cls, vocab_size, n_layer, d_model, dropout, mixer_args)
    except TypeError as e:  # an unknown keyword
        sys.exit(f"--mixer-args {mixer_args}: {e}; {mixer_cls.__name__} takes {inspect.signature(mixer_cls)}")
    except (ValueError, ArithmeticError, RuntimeError) as e:  # RuntimeError: a negative size reached torch
        sys.exit(f"{mixer_cls.__name__}(d_model={d_model}, **{mixer_args}): {type(e).__name__}: {e}")


def match_width(mixer_cls, vocab_size, n_layer, base, mixer_args):
    """(d_model, params, target): the width, a multiple of 16 in [base/2, 2 base], whose LM has the parameter
    count closest to the attention LM's at width base. Counted on the meta device: no memory, no init."""
    def count(cls, d, args):
        try:
            with torch.device("meta"):
                return sum(p.numel() for p in LM(cls, vocab_size, n_layer, d, 0.0, args).parameters())
        except (TypeError, ValueError, ArithmeticError, RuntimeError):  # a width (or keyword) the mixer rejects
            return None

    target = count(load_mixer("attention"), base, {})
    sizes = [(d, n) for d in range(base // 32 * 16 or 16, 2 * base + 1, 16) if (n := count(mixer_cls, d, mixer_args))]
    if not sizes:
        with torch.device("meta"):  # the mixer's own complaint at the base width, if that is what it is
            build(mixer_cls, vocab_size, n_layer, base, mixer_args)
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


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:160]


def start_or_resume(cfg, ckpt, mixer_cls, mixer_args, vocab_size):
    """(model, optimizer, progress, matched): the LM (its width matched to the attention LM's parameters where
    --d-model is not given) and its AdamW, loaded from ckpt where resuming; progress is (step, best_val, best_step,
    stale, evaluated, acc, train_time), the checkpoint's or a fresh run's; matched says what the width matched."""
    matched = ""
    if cfg.d_model is None:
        base = (GPU if cfg.device.startswith("cuda") else CPU)["d_model"]
        cfg.d_model, _, target = match_width(mixer_cls, vocab_size, cfg.n_layer, base, mixer_args)
        matched = f" (matched: the attention LM at d_model {base} has {target:,})"
    torch.manual_seed(cfg.seed)
    model = build(mixer_cls, vocab_size, cfg.n_layer, cfg.d_model, mixer_args, cfg.dropout).to(cfg.device)
    if bad := {k: v for k, v in mixer_args.items() if type(v) is int and v < 1}:  # the mixers' ints are all sizes
        sys.exit(f"--mixer-args {bad}: sizes must be >= 1")
    optimizer = make_optimizer(model, cfg.lr)
    progress = (0, math.inf, None, 0, None, None, 0.0)
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            progress = tuple(ckpt[k] for k in "step best_val best_step stale evaluated acc train_time".split())
        except (RuntimeError, ValueError, KeyError) as e:
            sys.exit(f"{os.path.join(cfg.out_dir, 'ckpt.pt')} does not fit this model (another --model, --n-layer, "
                     f"--d-model, --task?) or is no train.py checkpoint: {type(e).__name__}: {first_line(e)}")
        old, step = {k: ckpt["args"][k] for k in ("lr", "warmup", "max_iters")}, progress[0]
        if changed := [f"--{k.replace('_', '-')} {vars(cfg)[k]} (was {v})" for k, v in old.items()
                       if vars(cfg)[k] != v]:
            print(f"the learning-rate schedule changed with {', '.join(changed)}: step {step} gets lr "
                  f"{get_lr(step, cfg.lr, cfg.warmup, cfg.max_iters):.3g}, not {get_lr(step, **old):.3g}")
    return model, optimizer, progress, matched


# ----------------------------------------------------------------------------- train, eval, sample

def loss_of(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100), logits  # mqar: answers only


@torch.no_grad()
def evaluate(model, batch, n, autocast):
    """(mean loss, accuracy of the argmax on the labelled positions) over batch(0..n-1), in all processes."""
    model.eval()
    sums = 0
    for k in range(n):
        x, y = batch(k)
        with autocast:
            loss, logits = loss_of(model, x, y)
        sums = sums + torch.stack([loss.float(), (logits.argmax(-1) == y).sum().float(), (y != -100).sum().float()])
    model.train()
    if dist.is_initialized():  # DDP: each process holds an equal share of every batch
        dist.all_reduce(sums)
        sums[0] /= dist.get_world_size()
    return (sums[0] / n).item(), (sums[1] / sums[2]).item()


@torch.no_grad()
def sample(model, prompt, n, chars, temperature=0.8, seed=0, autocast=torch.autocast("cpu", enabled=False)):
    """The prompt and n characters after it, by generate() (on CUDA, one CUDA graph per token: eager's tokens);
    temperature 0 picks the argmax."""
    with autocast:
        out = generate(model, torch.tensor([[chars.index(c) for c in prompt]], device=model.wte.weight.device), n,
                       temperature, seed, cuda_graph=True)
    return "".join(chars[i] for i in out[0].tolist())


@torch.no_grad()
def generate(model, idx, n, temperature=0.8, seed=0, cuda_graph=False, compile=False):
    """idx [B, T] -> [B, T + n]: a parallel prefill of idx, then n tokens, each from one model.step; temperature 0
    picks the argmax. With cuda_graph=True on CUDA a state that grows (attention's KV cache) first gets room for
    the n steps (LM.reserve), and the steps after the first replay one CUDA graph of model.step (step_graph): one
    launch for the whole model where eager decoding at batch 1 spends its time launching each op's kernels. Off
    CUDA the steps run eager. Graphed or not, the same math on the same numbers: the same tokens (a reserved
    cache's empty slots add zero weights to attention's sums, which may round differently).
    compile=True has Inductor fuse the graphed step first (step_graph): fewer kernels per token, whose sums
    may round differently from eager's; it applies only where the steps are graphed (else ignored): there the
    state's shapes are fixed, so the step compiles once (attention: once per reserved length)."""
    training, T = model.training, idx.shape[1]
    model.eval()
    g, out = torch.Generator(device=idx.device).manual_seed(seed), torch.cat([idx, idx.new_empty(idx.shape[0], n)], 1)
    logits, states = model(idx)
    logits, graphed = logits[:, -1], None
    if cuda_graph and idx.is_cuda:  # room for n steps, the cache's length rounded up to a multiple of 1024: calls
        states = model.reserve(states, n - (T + n) % -1024)  # that round alike share one compiled step (compile=True)
    for i in range(n):
        out[:, T + i] = token = (logits.argmax(-1) if temperature == 0 else torch.multinomial(
            F.softmax(logits.float() / temperature, dim=-1), 1, generator=g)[:, 0])
        if i + 1 == n:
            break
        if graphed:
            logits = graphed(token)
            continue
        logits, new = model.step(token, states)
        if i == 0 and n > 2 and cuda_graph and idx.is_cuda and shapes(new) == shapes(states):
            graphed = step_graph(model, token, new, compile)
        states = new
    model.train(training)
    return out


def state_tensors(state):
    """The tensors of a state (a tensor, None, or a tuple or list of them, nested), in order."""
    return [state] if isinstance(state, torch.Tensor) else [t for s in state or () for t in state_tensors(s)]


def shapes(state):
    return [t.shape for t in state_tensors(state)]


def step_graph(model, token, states, compile=False):
    """model.step captured as one CUDA graph, on static copies of token [B] and states: returns run(token), which
    copies token in, replays the graph (the new states are copied back into the static ones inside it) and returns
    the next logits [B, V] (a static buffer: the next run overwrites it). compile=True captures
    torch.compile(model.step) instead, compiled by the warm-up: Inductor's fused kernels, fewer per step (mode
    "default": this graph is the only CUDA graph, none of Inductor's own). Every model's step is LM.step, which
    Dynamo compiles for at most 8 kinds of model or dtype in a process, then fails (torch._dynamo.reset() clears).
    Under autocast the graph reads each nn.Linear's weight as cast at capture: run() sees no later change to it."""
    def copy(state):
        return type(state)(copy(s) for s in state) if isinstance(state, (tuple, list)) else (
            state if state is None else state.clone())

    step = torch.compile(model.step, fullgraph=True, dynamic=False) if compile else model.step
    token, states = token.clone(), copy(states)
    # Under autocast each step casts every nn.Linear's weight again, one kernel each; the graph reads copies cast
    # once here instead (the same numbers: autocast leaves a tensor already in its dtype as it is)
    low = torch.get_autocast_dtype(token.device.type) if torch.is_autocast_enabled(token.device.type) else None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and low and m.weight.dtype != low]
    weights, cast = [m.weight for m in linears], [nn.Parameter(m.weight.detach().to(low), False) for m in linears]
    for m, w in zip(linears, cast):
        m.weight = w
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on copies (kernels compiled and loaded); the static states stay
            step(token.clone(), copy(states))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # the step, then its new states copied into the static ones
            logits, new = step(token, states)
            for s, t in zip(state_tensors(states), state_tensors(new), strict=True):
                if (s.shape, s.dtype) != (t.shape, t.dtype):
                    raise ValueError(f"step_graph: a state changed from {s.shape} {s.dtype} to {t.shape} {t.dtype}")
                s.copy_(t)
    finally:
        for m, w in zip(linears, weights):
            m.weight = w

    def run(next_token):
        token.copy_(next_token)
        graph.replay()
        return logits
    run.states, run.weights = states, cast  # the graph reads (and writes) these: they must live as long as it does
    return run


@torch.no_grad()
def state_size(model, T):
    """Numbers each layer's mixer keeps as its state after reading T tokens (the recall study's x axis, Zoology's
    figure 2): a recurrent model's constant, attention's KV cache of T tokens; a state's size, not its values, so
    one sequence of zeros tells it."""
    training = model.training
    model.eval()
    _, states = model(torch.zeros(1, T, dtype=torch.long, device=model.wte.weight.device))
    model.train(training)
    return sum(t.numel() for t in state_tensors(states)) // len(states)


def commit_of(folder):
    """The short hash of folder's git HEAD, with " (modified)" where the tracked files differ from it (a log of
    uncommitted code says so); "" outside a repository or without git."""
    if not shutil.which("git"):
        return ""
    git = lambda *args: subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True)  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD").stdout.strip()
    return commit + (" (modified)" if commit and git("diff", "--quiet", "HEAD").returncode == 1 else "")


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(flag, help, default=None, **kw):  # every help line ends with the default, on a GPU and on the CPU
        gpu, cpu = ({**COMMON, **d}.get(flag.replace("-", "_")) for d in (GPU, CPU))
        default = "required" if kw.get("required") else "default: " + (default or (
            f"{gpu}" if gpu == cpu else f"GPU {gpu}, CPU {cpu}"))
        p.add_argument("--" + flag, help=f"{help} ({default})".replace("%", "%%"), **kw)

    add("model", "the mixer, <model>.py", choices=list(MODELS), required=True)
    add("task", "text: the next character; mqar: multi-query associative recall; parity: the XOR of the bits so far",
        choices=["text", "mqar", "parity"])
    add("data", "a UTF-8 text file for --task text", "tiny Shakespeare, kept in ~/.cache/zoo", metavar="PATH")
    add("out-dir", "where ckpt.pt (latest), best.pt (best val) and log.jsonl go", "out/<model>", metavar="DIR")
    add("resume", "continue <out-dir>/ckpt.pt with its flags, unless passed again", "off", action="store_true")
    add("device", "cpu, cuda, cuda:1, mps, ...", "cuda if there is one, else cpu")
    add("compile", f"torch.compile the model with mode {COMPILE_MODE!r}; eager if that fails", "GPU on, CPU off",
        action=argparse.BooleanOptionalAction)
    add("n-layer", "blocks", type=int)
    add("d-model", "width", "matched to the attention LM's parameters at GPU 384, CPU 128", type=int)
    add("block-size", "context length in tokens", type=int)
    add("batch-size", "sequences per step, in all processes together", type=int)
    add("lr", "peak learning rate (AdamW), after linear warmup, cosine decay to a tenth", type=float)
    add("warmup", "warmup steps", type=int)
    add("max-iters", "training steps", type=int)
    add("max-time", "seconds of training, evaluation excluded; the LR schedule follows the clock", "none", type=float)
    add("dropout", "on the embedding, residual branches, attention weights", "GPU 0.3, CPU 0.0; mqar, parity 0",
        type=float)
    add("patience", "evaluations without a better val loss before stopping; 0: never", "1; mqar, parity 0", type=int)
    add("stop-acc", "stop at this val accuracy (mqar, parity: 0.99 counts the steps to it); 0: never", type=float)
    add("eval-interval", "steps between evaluations", type=int)
    add("eval-iters", "batches per evaluation", type=int)
    add("log-interval", "steps between log lines", type=int)
    add("seed", "batches, init and dropout are functions of it", type=int)
    add("sample-len", "characters to sample after training; 0: none", type=int)
    add("prompt", "the sample's prompt", "a newline")
    add("temperature", "sampling temperature; 0: greedy (argmax)", type=float)
    add("mixer-args", "keyword arguments for the mixer's class, as k=v,k2=v2", "none")
    add("num-pairs", "mqar: key-value pairs per sequence", type=int)
    add("mqar-vocab", "mqar: vocabulary size", type=int)
    return p.parse_args(argv)  # every default is None: device defaults < checkpoint < flags passed


def get_config(args, world=1, local_rank=0):
    """Device (then task) defaults < what the checkpoint was trained with (--resume) < the flags passed."""
    passed = {k: v for k, v in vars(args).items() if v is not None}
    device = passed.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = f"cuda:{local_rank}" if world > 1 and device.startswith("cuda") else device  # DDP: a GPU per process
    out_dir = passed.get("out_dir") or os.path.join("out", passed["model"])
    ckpt, restored, path = None, {}, os.path.join(out_dir, "ckpt.pt")
    if passed.get("resume"):
        if not os.path.exists(path):
            sys.exit(f"--resume: no checkpoint at {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            restored = {k: v for k, v in ckpt["args"].items() if k not in ("device", "resume", "compile")}
        except Exception as e:
            sys.exit(f"--resume: {path} is corrupt or not train.py's ({type(e).__name__}: {first_line(e)[:80]})")
    elif files := [f for f in ("ckpt.pt", "best.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]:
        sys.exit(f"{out_dir} holds an earlier run ({', '.join(files)}): continue it with --resume, or start over "
                 f"with another --out-dir (or delete {out_dir})")
    given, cuda = {**restored, **passed}, device.startswith("cuda")
    synthetic = SYNTHETIC if given.get("task", "text") != "text" else {}
    cfg = argparse.Namespace(**{**COMMON, **(GPU if cuda else CPU), **synthetic,
                                "d_model": None, **given, "device": device, "out_dir": out_dir})  # None: matched
    shown = "n_layer d_model block_size batch_size lr dropout warmup max_iters eval_interval eval_iters patience"
    shown += " max_time mixer_args compile" + {"text": "", "mqar": " task num_pairs mqar_vocab"}.get(cfg.task, " task")
    shown += " stop_acc" if cfg.stop_acc else ""
    shown = {k: getattr(cfg, k) for k in shown.split()} | {"d_model": cfg.d_model or "matched"}
    shown = " ".join(f"{k.replace('_size', '')}={v}" for k, v in shown.items() if v not in (None, ""))
    print(f"{device}{f' x {world} processes' if world > 1 else ''}: {'' if cuda else 'small config '}{shown}"
          + (f" (resumed from {path})" if ckpt else "") + " -- any flag overrides")
    return cfg, ckpt


def check(cfg, world=1):
    """Every size, rate and the device, before anything is written: one line and a non-zero exit, no traceback."""
    lows = dict.fromkeys("n_layer d_model block_size batch_size eval_interval eval_iters log_interval".split(), 1)
    for k, low in (lows | dict.fromkeys("max_iters warmup sample_len patience".split(), 0)).items():
        if (v := getattr(cfg, k)) is not None and not v >= low:
            sys.exit(f"--{k.replace('_', '-')} must be >= {low}, got {v}")
    for k, ok, rule in (("lr", 0 < cfg.lr < math.inf, "> 0"), ("dropout", 0 <= cfg.dropout < 1, "in [0, 1)"),
                        ("max-time", cfg.max_time is None or cfg.max_time > 0, "> 0"),
                        ("stop-acc", 0 <= cfg.stop_acc <= 1, "in [0, 1]"),
                        ("temperature", 0 <= cfg.temperature < math.inf, ">= 0"),
                        ("batch-size", cfg.batch_size % world == 0, f"a multiple of the {world} processes")):
        if not ok:
            sys.exit(f"--{k} must be {rule}, got {getattr(cfg, k.replace('-', '_'))}")
    try:
        torch.empty(1, device=cfg.device)
    except Exception as e:
        sys.exit(f"--device {cfg.device} is not usable here: {first_line(e)}")


def ready_to_train(model, cfg, batch, local_rank=0, world=1):
    """(net, fwd, autocast): the model compiled where --compile (net, for evaluation), DDP's wrapper of it (fwd, for
    training) and bf16 autocast on a GPU, after one forward and backward of batch(0) that checks the model before
    anything is written: the mixer's own checks that need data, and a loss that is no number (one-line errors)."""
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def first_step(f):
        with autocast:
            loss = loss_of(f, *batch(0))[0]
        loss.backward()
        return loss.item()

    try:
        if not math.isfinite(loss := first_step(model)):
            sys.exit(f"{cfg.model}: the first batch's loss is {loss} (--mixer-args {cfg.mixer_args!r}?)")
    except ValueError as e:
        sys.exit(f"{cfg.model}: {e}")
    net = model
    if cfg.compile:  # torch.compile compiles at the first call: make that call here, where a failure can run eager
        try:
            first_step(compiled := torch.compile(model, mode=COMPILE_MODE))
            net = compiled
        except Exception as e:
            print(f"torch.compile failed ({type(e).__name__}: {first_line(e)}); running eager")
    model.zero_grad(set_to_none=True)
    fwd = nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if cuda else None) if world > 1 else net
    return net, fwd, autocast


def run_record(cfg, model, mixer_args):
    """What log.jsonl's start and final lines say of the run: bench.py --report's columns."""
    return dict(model=cfg.model, task=cfg.task, params=sum(p.numel() for p in model.parameters()),
                d_model=cfg.d_model, n_layer=cfg.n_layer, mixer_args=mixer_args, lr=cfg.lr, block_size=cfg.block_size,
                batch_size=cfg.batch_size, seed=cfg.seed, num_pairs=cfg.num_pairs if cfg.task == "mqar" else None,
                state_size=state_size(model, cfg.block_size), commit=commit_of(HERE) or None,
                device=torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda")
                else f"{cfg.device} ({os.cpu_count()} cores)")


@contextlib.contextmanager
def ctrl_c_ends_the_step():
    """Yields a list that the first Ctrl-C fills (finish this step, save, stop); a second one raises
    KeyboardInterrupt at once. Signals reach the main thread only: in another, nothing is installed."""
    interrupted = []

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit at once)", flush=True)

    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        yield interrupted
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old_handler)


def agree(world, device, *numbers):
    """numbers averaged over the DDP processes: each gets the same clock, train loss and reasons to stop."""
    shared = torch.tensor(numbers, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(shared := shared.to(device))
    return (shared / world).tolist()


def main(argv=None):
    args = parse_args(argv)
    rank, local_rank, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))  # torchrun's
    world = max(world, 1)
    if rank:  # DDP (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE): rank 0 alone prints and writes
        sys.stdout = open(os.devnull, "w")
    cfg, ckpt = get_config(args, world, local_rank)
    check(cfg, world)
    device, cuda, B, T = cfg.device, cfg.device.startswith("cuda"), cfg.batch_size, cfg.block_size
    paths = {name: os.path.join(cfg.out_dir, name) for name in ("ckpt.pt", "best.pt", "log.jsonl")}
    mixer_cls, mixer_args = load_mixer(cfg.model), parse_mixer_args(cfg.mixer_args)
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    chars, vocab_size, data_line, train_batch, val_batch = get_batches(cfg, ckpt, rank, world)
    model, optimizer, progress, matched = start_or_resume(cfg, ckpt, mixer_cls, mixer_args, vocab_size)
    step, best_val, best_step, stale, evaluated, acc, train_time = progress
    net, fwd, autocast = ready_to_train(model, cfg, train_batch, local_rank, world)
    run = run_record(cfg, model, mixer_args)
    print(f"{cfg.model}: {run['params']:,} parameters at d_model {cfg.d_model}{matched}, vocab {vocab_size}, "
          f"{data_line}" + (f"; {len(train_batch(0)[0])} sequences per process" if world > 1 else ""))

    def save(name, **record):  # rank 0; a checkpoint to .tmp first: a Ctrl-C mid-write never leaves a broken one
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            if name == "log.jsonl":  # a fresh run found none; --resume appends
                with open(paths[name], "a") as f:
                    return f.write(json.dumps(record) + "\n")
            torch.save(dict(model=model.state_dict(), step=step, vocab=chars, args=vars(cfg), **record),
                       paths[name] + ".tmp")
            os.replace(paths[name] + ".tmp", paths[name])

    def save_latest():
        save("ckpt.pt", optimizer=optimizer.state_dict(), best_val=best_val, best_step=best_step, stale=stale,
             evaluated=evaluated, acc=acc, train_time=train_time)

    save("log.jsonl", type="start", step=step, **run)  # first, so that a run killed before its final line is known
    t_start = t_last = time.time()  # t_last: when the current stretch of training (between log lines) began
    start_step, last_step, train_losses, stop = step, step, [], None
    with ctrl_c_ends_the_step() as interrupted:
        try:
            while True:
                late = cfg.max_time is not None and train_time + time.time() - t_last >= cfg.max_time
                if (step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or step >= cfg.max_iters
                        or world == 1 and (late or interrupted)):  # a log line: DDP's processes agree here only
                    if cuda:
                        torch.cuda.synchronize()  # the steps still queued on the GPU are training time
                    now, stats = time.time(), model.stats()  # stats: the last training step's, before evaluate()
                    train_time, train_loss, late, interrupted_any = agree(
                        world, device, train_time + now - t_last,
                        torch.stack(train_losses).mean().item() if train_losses else 0.0, late, bool(interrupted))
                    tok_s = (step - last_step) * B * T / (now - t_last) if step > last_step else None
                    line = f"step {step:5d}" + (f" | train {train_loss:.4f}" if train_losses else "")
                    # evaluate, checkpoint
                    if (step % cfg.eval_interval == 0 or step >= cfg.max_iters or late) and step != evaluated:
                        val, acc = evaluate(net, val_batch, cfg.eval_iters, autocast)
                        stale, evaluated = stale + 1, step
                        if val < best_val:
                            best_val, best_step, stale = val, step, 0
                            save("best.pt", val=val)
                        line += f" | val {val:.4f} | acc {acc:.3f}"
                        save_latest()
                        save("log.jsonl", type="eval", step=step, tokens=step * B * T, train_time=train_time,
                             train_loss=train_loss if train_losses else None, val_loss=val, acc=acc, tok_s=tok_s)
                    # log
                    if tok_s is not None:
                        eta = (now - t_start) / (step - start_step) * (cfg.max_iters - step)
                        eta = eta if cfg.max_time is None else max(0.0, min(eta, cfg.max_time - train_time))
                        line += f" | {tok_s:,.0f} tok/s | {fmt_time(train_time)} trained, ETA {fmt_time(eta)}"
                    print(line + "".join(f" | {k} {v:.3g}" for k, v in stats.items()), flush=True)
                    t_last, last_step, train_losses = time.time(), step, []
                    # stop
                    if stop := ("steps" if step >= cfg.max_iters else "time" if late else "Ctrl-C" if interrupted_any
                                else "patience" if cfg.patience and stale >= cfg.patience
                                else "accuracy" if cfg.stop_acc and acc is not None and acc >= cfg.stop_acc else None):
                        break
                # the lr: on the clock as of the last log line, the same in every process
                time_frac = train_time / cfg.max_time if cfg.max_time else 0.0
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(step, cfg.lr, cfg.warmup, cfg.max_iters, time_frac)
                # step
                torch.manual_seed((cfg.seed * 1_000_003 + step) * world + rank)  # dropout: (seed, step, rank)'s
                with autocast:
                    loss, _ = loss_of(fwd, *train_batch(step))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                train_losses.append(loss.detach())
                step += 1
        except KeyboardInterrupt:  # a second Ctrl-C
            stop = "Ctrl-C"
    if stop == "Ctrl-C":
        train_time += time.time() - t_last
        save_latest()
        print(f"interrupted: saved {paths['ckpt.pt']} at step {step}; continue with --resume")
        end_process(world, 130)
    text_sample = None
    if cfg.task == "text" and cfg.sample_len > 0 and rank == 0:
        model.load_state_dict(torch.load(paths["best.pt"], map_location=device, weights_only=True)["model"])
        text_sample = sample(model, cfg.prompt, cfg.sample_len, chars, cfg.temperature, cfg.seed, autocast)
        print("-" * 40 + f" sampled from best.pt (step {best_step})\n{text_sample}\n" + "-" * 40)
    save("log.jsonl", type="final", **run, steps=step, tokens=step * B * T, train_time=train_time,
         tok_s=step * B * T / train_time if train_time else None, best_val=best_val, best_step=best_step, acc=acc,
         stop=stop, sample=text_sample)
    print(f"done: stopped on {stop} at step {step} after {fmt_time(train_time)} of training (this run: "
          f"{fmt_time(time.time() - t_start)} wall); best val {best_val:.4f} at step {best_step}, in "
          f"{paths['best.pt']}; state {run['state_size']:,} numbers per layer")
    end_process(world, 0)


def end_process(world, code):
    """Exit with code (0: return); a DDP process leaves its process group and ends at once."""
    if world > 1:
        dist.destroy_process_group()
        # gloo's worker threads drop a finished collective's tensors a moment later; if the interpreter is shutting
        # down by then, taking the GIL for them aborts the process ("terminate called without an active exception",
        # 3 to 7 runs in 100 on 2 CPU cores, seen in gdb): end here, with no shutdown for them to race
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
