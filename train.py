"""Train a character-level language model with any mixer of the zoo, then sample from it.

    python train.py --model linear_attention                        # tiny Shakespeare, downloaded once
    python train.py --model mamba --data my.txt --max-iters 2000
    python train.py --model mamba --resume                          # continue out/mamba/ckpt.pt
    python train.py --model mamba --task mqar --max-time 600        # associative recall, 10 minutes of training
    python train.py --report out                                    # out/*/log.jsonl as a markdown table

The model is nanoGPT's shape with the attention swapped out: embedding, n_layer pre-norm blocks
(x += mixer(norm(x)); x += mlp(norm(x))), final norm, output head tied to the embedding. The mixer
is <model>.py's class, built as Cls(d_model, **mixer_args); it follows the contract
    forward(x [B, T, D], state=None, form=...) -> (y, state)      step(x [B, D], state) -> (y, state)
so the whole model threads one state per layer: sampling prefills the prompt in parallel (the
mixer's default form), then runs token by token with step().

Unless --d-model is passed, each model gets the width that gives its LM the parameter count of the
attention LM at the base width (384 on a GPU, 128 on the CPU), so the models compare at equal size.

Batch i is drawn from a generator seeded with (seed, i) alone, so --resume continues bit-for-bit
(without --max-time: with it the LR schedule follows the clock).
"""
import argparse
import ast
import glob
import hashlib
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
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"rnn": "RNN", "lstm": "LSTM", "attention": "Attention", "linear_attention": "LinearAttention",
          "retnet": "RetNet", "gated_retention": "GatedRetention", "mamba": "Mamba", "mamba2": "Mamba2",
          "deltanet": "DeltaNet"}
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# mqar_vocab: 256, not Zoology's 8192: only the num_pairs keys of a sequence compete for a state, so recall is
# as hard, while a small embedding trains in fewer steps and leaves the parameter budget to the mixers.
COMMON = dict(lr=1e-3, seed=1337, sample_len=300, prompt="\n", compile=False, resume=False, data=None,
              task="text", num_pairs=16, mqar_vocab=256, mixer_args="", max_time=None)
# nanoGPT's shakespeare-char size on a GPU; a small one that runs in minutes on a laptop's CPU. d_model is
# attention's width there, the parameter budget every other model is matched to (unless --d-model)
GPU = dict(n_layer=6, d_model=384, block_size=256, batch_size=64, warmup=100, max_iters=5000,
           eval_interval=250, eval_iters=100, log_interval=50, dropout=0.2)
CPU = dict(n_layer=2, d_model=128, block_size=128, batch_size=16, warmup=20, max_iters=1000,
           eval_interval=50, eval_iters=10, log_interval=10, dropout=0.0)
MQAR = dict(dropout=0.0)  # fresh random sequences every step leave nothing to overfit (Zoology trains without)
NOT_RESUMED = ("device", "resume")  # everything else a checkpoint restores unless passed again


# ----------------------------------------------------------------------------- data

def get_data(path):
    """The text at path, or tiny Shakespeare from the cache (downloaded and checked once)."""
    if path is None:
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zoo")
        path = os.path.join(cache, "tinyshakespeare.txt")
        if not os.path.exists(path):
            os.makedirs(cache, exist_ok=True)
            print(f"downloading tiny Shakespeare to {path}")
            try:
                raw = urllib.request.urlopen(SHAKESPEARE_URL, timeout=30).read()
            except OSError as e:
                sys.exit(f"could not download tiny Shakespeare ({e}); offline? pass a text file with --data PATH")
            if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
                sys.exit(f"{SHAKESPEARE_URL} does not have the expected sha256; pass a text file with --data PATH")
            with open(path + ".tmp", "wb") as f:
                f.write(raw)
            os.replace(path + ".tmp", path)
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
    unknown = set(text) - set(stoi)
    if unknown:
        sys.exit(f"the data has characters the checkpoint's vocabulary lacks: {''.join(sorted(unknown))[:40]!r}")
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    if len(data) - n < block_size + 1:
        sys.exit(f"the data has {len(data)} characters, too short for block_size={block_size}: the 10% val split "
                 f"needs block_size + 1 = {block_size + 1}, so at least {math.ceil((block_size + 1) / 0.1)} "
                 f"characters (or pass a smaller --block-size)")
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
    k1 v1 k2 v2 ... (distinct keys from the vocabulary's first half, values from its second half), then
    each key once more, in random order, at distinct even offsets after the pairs, nearer ones likelier
    (Zoology's power law p(gap) ~ gap^(a-1), a = 0.01); random values in between (Zoology's filler is any
    token, which in its 8192-token vocabulary almost never repeats a key; in a small one it often would).
    The label at a queried key is its value, -100 (ignored by the loss) everywhere else. Training uses
    i >= 0, validation i < 0."""
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
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        present = [m for m in MODELS if os.path.exists(os.path.join(HERE, m + ".py"))]
        sys.exit(f"model {name!r}: {name}.py is not in {HERE} (present: {', '.join(present) or 'none'})")
    return getattr(module, MODELS[name])


class Block(nn.Module):
    def __init__(self, mixer_cls, d_model, dropout=0.0, **mixer_args):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.mixer = mixer_cls(d_model, **mixer_args)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=False))
        self.drop = nn.Dropout(dropout)  # on each residual branch, as nanoGPT; identity in eval()

    def forward(self, x, state=None):
        y, state = self.mixer(self.norm1(x), state)
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.norm2(x))), state

    def step(self, x, state):
        y, state = self.mixer.step(self.norm1(x), state)
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.norm2(x))), state


class LM(nn.Module):
    """forward(idx [B, T], states=None) -> (logits [B, T, V], states); step(idx [B], states) -> ([B, V], states)."""

    def __init__(self, mixer_cls, vocab_size, n_layer, d_model, dropout=0.0, **mixer_args):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(mixer_cls, d_model, dropout, **mixer_args) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d_model)
        # nanoGPT's init for what is ours; each mixer keeps its paper's init
        nn.init.normal_(self.wte.weight, std=0.02)
        for b in self.blocks:
            nn.init.normal_(b.mlp[0].weight, std=0.02)
            nn.init.normal_(b.mlp[2].weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, states=None):
        x, states = self.drop(self.wte(idx)), states or [None] * len(self.blocks)
        new = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state)
            new.append(state)
        return F.linear(self.norm(x), self.wte.weight), new

    def step(self, idx, states):
        x, new = self.drop(self.wte(idx)), []
        for block, state in zip(self.blocks, states):
            x, state = block.step(x, state)
            new.append(state)
        return F.linear(self.norm(x), self.wte.weight), new

    def stats(self):
        """Each mixer's `stats` dict (if it has one), averaged over layers."""
        per_layer = [b.mixer.stats for b in self.blocks if isinstance(getattr(b.mixer, "stats", None), dict)]
        keys = {k for s in per_layer for k in s}
        return {k: sum(float(s[k]) for s in per_layer if k in s) / sum(k in s for s in per_layer) for k in sorted(keys)}


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
        return LM(mixer_cls, vocab_size, n_layer, d_model, dropout, **mixer_args)
    except TypeError as e:  # an unknown keyword
        sys.exit(f"--mixer-args {mixer_args}: {e}; {mixer_cls.__name__} takes {inspect.signature(mixer_cls)}")


def match_width(mixer_cls, vocab_size, n_layer, base, mixer_args):
    """(d_model, params, target): the width, a multiple of 16 in [base/2, 2 base], whose LM has the parameter
    count closest to the attention LM's at width base. Counted on the meta device: no memory, no init."""
    def count(cls, d, args):
        with torch.device("meta"):
            return sum(p.numel() for p in build(cls, vocab_size, n_layer, d, args).parameters())

    target, best = count(load_mixer("attention"), base, {}), None
    for d in range(base // 32 * 16 or 16, 2 * base + 1, 16):
        try:
            n = count(mixer_cls, d, mixer_args)
        except ValueError:  # a width the mixer rejects (heads must divide it, ...)
            continue
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (d, n)
    if best is None:
        sys.exit(f"{mixer_cls.__name__} {mixer_args or ''} accepts no d_model in [{base // 2}, {2 * base}]: "
                 f"pass --d-model")
    return (*best, target)


def make_optimizer(model, lr):
    """AdamW; weight decay on matrices only (and never on a parameter marked _no_weight_decay)."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99), fused=next(model.parameters()).is_cuda)  # fused: faster


def get_lr(step, lr, warmup, max_iters, time_frac=0.0):
    """Linear warmup to lr, then cosine decay to lr / 10 at max_iters, or sooner when time_frac (the share
    of --max-time spent) is further along: a slow model still anneals within its time budget."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, max_iters - warmup), time_frac))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


# ----------------------------------------------------------------------------- train, eval, sample

def loss_of(model, x, y, with_logits=False):
    logits, _ = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)  # mqar: answers only
    return (loss, logits) if with_logits else loss


@torch.no_grad()
def evaluate(model, batch, n, autocast):
    """(mean loss, accuracy of the argmax on the labelled positions) over the batches batch(0..n-1)."""
    model.eval()
    losses, hits, total = [], 0, 0
    for k in range(n):
        x, y = batch(k)
        with autocast:
            loss, logits = loss_of(model, x, y, with_logits=True)
        losses.append(loss)
        hits, total = hits + (logits.argmax(-1) == y).sum(), total + (y != -100).sum()
    model.train()
    return torch.stack(losses).mean().item(), (hits / total).item()


@torch.no_grad()
def sample(model, prompt, n, chars, device, autocast, seed, temperature=0.8):
    """Parallel prefill of the prompt, then n tokens with each mixer's step()."""
    stoi = {c: i for i, c in enumerate(chars)}
    if not prompt or set(prompt) - set(stoi):
        sys.exit(f"--prompt must be non-empty and use only the vocabulary's characters, got {prompt!r}")
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[stoi[c] for c in prompt]], device=device)
    out = []
    with autocast:
        logits, states = model(idx)
        logits = logits[:, -1]
        for _ in range(n):
            probs = F.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)[:, 0]
            out.append(chars[nxt.item()])
            logits, states = model.step(nxt, states)
    model.train()
    return prompt + "".join(out)


def save_checkpoint(path, model, optimizer, step, chars, cfg, **stats):
    ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, vocab=chars,
                args=vars(cfg), rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, **stats)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # a Ctrl-C mid-write never leaves a broken checkpoint


def load_checkpoint(path):
    if not os.path.exists(path):
        sys.exit(f"--resume: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), help="the mixer: <model>.py (required)")
    p.add_argument("--task", choices=["text", "mqar"], help="text: next character of --data (default); "
                   "mqar: multi-query associative recall on random tokens (Zoology)")
    p.add_argument("--data", help="a UTF-8 text file (default: tiny Shakespeare, downloaded once)")
    for flag, typ in (("max-iters", int), ("batch-size", int), ("block-size", int), ("n-layer", int),
                      ("d-model", int), ("lr", float), ("dropout", float), ("warmup", int), ("seed", int),
                      ("sample-len", int), ("eval-interval", int), ("eval-iters", int), ("log-interval", int),
                      ("num-pairs", int), ("mqar-vocab", int)):
        p.add_argument("--" + flag, type=typ)
    p.add_argument("--mixer-args", metavar="K=V,...", help="keyword arguments of the mixer's class, e.g. d_state=32")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="stop after this much training time (evals "
                   "excluded); the LR schedule then follows the clock, so --resume is bit-for-bit only without it")
    p.add_argument("--device", help="cuda, cpu, mps, ... (default: cuda if there is one)")
    p.add_argument("--out-dir", help="checkpoints and log.jsonl go here (default: out/<model>)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--prompt", help="the sample starts from this text (default: a newline)")
    p.add_argument("--report", metavar="DIR", help="train nothing: DIR/*/log.jsonl as a table, DIR/showdown.png")
    args = p.parse_args(argv)  # every default is None: device defaults < checkpoint < flags passed
    if args.model is None and args.report is None:
        p.error("the following arguments are required: --model (or --report DIR)")
    return args


def get_config(args):
    """Device (then task) defaults < what the checkpoint was trained with (--resume) < the flags passed."""
    passed = {k: v for k, v in vars(args).items() if v is not None}
    device = passed.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = passed.get("out_dir") or os.path.join("out", passed["model"])
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt")) if passed.get("resume") else None
    restored = {k: v for k, v in ckpt["args"].items() if k not in NOT_RESUMED} if ckpt else {}
    cuda, task = device.startswith("cuda"), {**COMMON, **restored, **passed}["task"]
    cfg = argparse.Namespace(**{**COMMON, **(GPU if cuda else CPU), **(MQAR if task == "mqar" else {}), **restored,
                                **passed, "device": device, "out_dir": out_dir})
    if "d_model" not in {**restored, **passed}:
        cfg.d_model = None  # matched to attention's parameter count once the vocabulary is known
    shown = "n_layer d_model block_size batch_size lr dropout warmup max_iters eval_interval eval_iters".split()
    shown += [k for k in ("max_time", "mixer_args") if getattr(cfg, k) not in (None, "")]
    shown += ["task", "num_pairs", "mqar_vocab"] if cfg.task == "mqar" else []
    print(f"{device}: {'' if cuda else 'small config '}" + " ".join(
          f"{k.replace('_size', '')}={'matched' if getattr(cfg, k) is None else getattr(cfg, k)}" for k in shown)
          + (f" (resumed from {out_dir}/ckpt.pt)" if ckpt else "") + " -- any flag overrides")
    return cfg, ckpt


def try_compile(model, batch, autocast):
    """torch.compile fails lazily, at the first call: run one forward and backward now."""
    try:
        compiled = torch.compile(model)
        with autocast, torch.random.fork_rng():  # dropout here must not shift training's RNG (bit-for-bit resume)
            loss_of(compiled, *batch).backward()
        return compiled
    except Exception as e:
        print(f"--compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:100]}); running eager")
        return model
    finally:
        model.zero_grad(set_to_none=True)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    except OSError:
        return None


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    cfg, ckpt = get_config(args)
    device, cuda = cfg.device, cfg.device.startswith("cuda")
    base = (GPU if cuda else CPU)["d_model"]
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    mixer_cls, mixer_args = load_mixer(cfg.model), parse_mixer_args(cfg.mixer_args)
    if cfg.task == "mqar":
        P, T, V = cfg.num_pairs, cfg.block_size, cfg.mqar_vocab
        if not 1 <= P <= V // 2 or 4 * P > T:
            sys.exit(f"--task mqar needs 1 <= --num-pairs <= --mqar-vocab / 2 (distinct keys and values) and "
                     f"4 * num_pairs <= --block-size (the pairs, then each key again at an even offset of its own), "
                     f"got num_pairs={P}, mqar_vocab={V}, block_size={T}")
        chars, vocab_size, data_line = None, V, f"{P} key-value pairs per {T} tokens"
        train_batch = lambda i: get_mqar_batch(i, cfg.seed, T, cfg.batch_size, P, V, device)  # noqa: E731
        val_batch = lambda k: get_mqar_batch(-1 - k, cfg.seed, T, cfg.batch_size, P, V, device)  # noqa: E731
    else:
        text = get_data(cfg.data)
        chars = (ckpt or {}).get("vocab") or "".join(sorted(set(text)))
        train_data, val_data = split(text, chars, cfg.block_size)
        vocab_size, data_line = len(chars), f"{len(train_data):,} train / {len(val_data):,} val characters"
        train_batch = lambda i: get_batch(train_data, i, cfg.seed, cfg.block_size, cfg.batch_size, device)  # noqa: E731
        val_batch = lambda k: get_batch(val_data, k, cfg.seed, cfg.block_size, cfg.batch_size, device)  # noqa: E731
    matched = ""
    if cfg.d_model is None:
        cfg.d_model, _, target = match_width(mixer_cls, vocab_size, cfg.n_layer, base, mixer_args)
        matched = f" (matched: the attention LM at d_model {base} has {target:,})"
    torch.manual_seed(cfg.seed)
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

    def save():
        save_checkpoint(ckpt_path, model, optimizer, step, chars, cfg,
                        best_val=best_val, acc=acc, train_time=train_time)

    tokens_per_step = cfg.batch_size * cfg.block_size
    t_start = t_last = time.time()  # t_last: when the current stretch of training (between log lines) began
    start_step, last_step, train_losses, out_of_time = step, step, [], False
    try:
        while True:
            out_of_time = cfg.max_time is not None and train_time + time.time() - t_last >= cfg.max_time
            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters or out_of_time
            if is_eval or step % cfg.log_interval == 0:
                if cuda:
                    torch.cuda.synchronize()  # the steps still queued on the GPU are training time
                now = time.time()
                train_time += now - t_last
                line, stats = f"step {step:5d}", model.stats()  # the last training step's stats
                train_loss = torch.stack(train_losses).mean().item() if train_losses else None
                tok_s = (step - last_step) * tokens_per_step / (now - t_last) if step > last_step else None
                if train_loss is not None:
                    line += f" | train {train_loss:.4f}"
                if is_eval:
                    val, acc = evaluate(fwd, val_batch, cfg.eval_iters, autocast)
                    best_val = min(best_val, val)
                    line += f" | val {val:.4f} | acc {acc:.3f}"
                if tok_s is not None:
                    eta = (now - t_start) / (step - start_step) * (cfg.max_iters - step)
                    eta = eta if cfg.max_time is None else max(0.0, min(eta, cfg.max_time - train_time))
                    line += f" | {tok_s:,.0f} tok/s | {fmt_time(train_time)} trained, ETA {fmt_time(eta)}"
                line += "".join(f" | {k} {v:.3g}" for k, v in stats.items())
                print(line, flush=True)
                if is_eval:
                    save()
                    log(type="eval", step=step, tokens=step * tokens_per_step, train_time=train_time,
                        train_loss=train_loss, val_loss=val, acc=acc, tok_s=tok_s)
                t_last, last_step, train_losses = time.time(), step, []
            if step >= cfg.max_iters or out_of_time or interrupted:
                break
            time_frac = (train_time + time.time() - t_last) / cfg.max_time if cfg.max_time else 0.0
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, cfg.lr, cfg.warmup, cfg.max_iters, time_frac)
            x, y = train_batch(step)
            with autocast:
                loss = loss_of(fwd, x, y)
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
        print(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        return
    stop = "steps" if step >= cfg.max_iters else "time"
    limit = f"--max-iters {cfg.max_iters}" if stop == "steps" else f"--max-time {cfg.max_time:g}s"
    print(f"done: stopped on {stop} ({limit}) at step {step} after {fmt_time(train_time)} of training "
          f"(this run: {fmt_time(time.time() - t_start)} wall), best val {best_val:.4f}, saved {ckpt_path}")
    text_sample = None
    if cfg.task == "text" and cfg.sample_len > 0:
        text_sample = sample(model, cfg.prompt, cfg.sample_len, chars, device, autocast, cfg.seed)
        print("-" * 40 + "\n" + text_sample)
    log(type="final", model=cfg.model, task=cfg.task, params=n_params, d_model=cfg.d_model, n_layer=cfg.n_layer,
        mixer_args=mixer_args, steps=step, tokens=step * tokens_per_step, train_time=train_time,
        tok_s=step * tokens_per_step / train_time if train_time else None, best_val=best_val, acc=acc, stop=stop,
        sample=text_sample, device=torch.cuda.get_device_name(device) if cuda else f"{device} ({os.cpu_count()} cores)",
        commit=git_commit())


def report(root):
    """A markdown table of the finished runs root/*/log.jsonl, and their val-loss curves in root/showdown.png."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "log.jsonl"))):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        finals = [r for r in rows if r.get("type") == "final"]
        if not finals:
            print(f"{path}: no final line (running or interrupted), left out")
            continue
        runs.append((os.path.basename(os.path.dirname(path)), [r for r in rows if r.get("type") == "eval"], finals[-1]))
    if not runs:
        sys.exit(f"--report: no finished run in {root}/*/log.jsonl")
    print("| run | model | task | params | d_model | tok/s | best val loss | accuracy | stopped on | sample |\n"
          + "|---" * 10 + "|")
    for name, _, f in runs:
        text = "<br>".join([ln for ln in (f.get("sample") or "").splitlines() if ln.strip()][:2]).replace("|", "\\|")
        print(f"| {name} | {f['model']} | {f['task']} | {f['params'] / 1e6:.2f}M | {f['d_model']} "
              f"| {f['tok_s'] or 0:,.0f} | {f['best_val']:.4f} | {f['acc'] or 0:.3f} | {f['stop']} | {text} |")
    curves = [(name, evals) for name, evals, f in runs if f["task"] == "text"]
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no showdown.png (pip install matplotlib)")
    if curves:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, evals in curves:
            ax.plot([r["train_time"] for r in evals], [r["val_loss"] for r in evals], label=name)
        ax.set(xlabel="training time (s), evaluation excluded", ylabel="val loss")
        ax.legend(), ax.grid(alpha=0.3)
        fig.savefig(os.path.join(root, "showdown.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {os.path.join(root, 'showdown.png')}")


if __name__ == "__main__":
    main()
