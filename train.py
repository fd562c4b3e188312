"""Train a character-level language model with any mixer of the zoo, then sample from it.

    python train.py --model linear_attention                        # tiny Shakespeare, downloaded once
    python train.py --model mamba --data my.txt --max-iters 2000
    python train.py --model mamba --resume                          # continue out/mamba/ckpt.pt

The model is nanoGPT's shape with the attention swapped out: embedding, n_layer pre-norm blocks
(x += mixer(norm(x)); x += mlp(norm(x))), final norm, output head tied to the embedding. The mixer
is <model>.py's class, built as Cls(d_model); it follows the contract
    forward(x [B, T, D], state=None, form=...) -> (y, state)      step(x [B, D], state) -> (y, state)
so the whole model threads one state per layer: sampling prefills the prompt in parallel (the
mixer's default form), then runs token by token with step().

Batch i is drawn from a generator seeded with (seed, i) alone, so --resume continues bit-for-bit.
"""
import argparse
import hashlib
import importlib
import math
import os
import signal
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

# nanoGPT's shakespeare-char size on a GPU; a small one that runs in minutes on a laptop's CPU
COMMON = dict(lr=1e-3, seed=1337, sample_len=300, prompt="\n", compile=False, resume=False, data=None)
GPU = dict(n_layer=6, d_model=384, block_size=256, batch_size=64, warmup=100, max_iters=5000,
           eval_interval=250, eval_iters=100, log_interval=50)
CPU = dict(n_layer=2, d_model=128, block_size=128, batch_size=16, warmup=20, max_iters=1000,
           eval_interval=50, eval_iters=10, log_interval=10)
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
    def __init__(self, mixer_cls, d_model):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.mixer = mixer_cls(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=False))

    def forward(self, x, state=None):
        y, state = self.mixer(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state

    def step(self, x, state):
        y, state = self.mixer.step(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


class LM(nn.Module):
    """forward(idx [B, T], states=None) -> (logits [B, T, V], states); step(idx [B], states) -> ([B, V], states)."""

    def __init__(self, mixer_cls, vocab_size, n_layer, d_model):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(mixer_cls, d_model) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d_model)
        # nanoGPT's init for what is ours; each mixer keeps its paper's init
        nn.init.normal_(self.wte.weight, std=0.02)
        for b in self.blocks:
            nn.init.normal_(b.mlp[0].weight, std=0.02)
            nn.init.normal_(b.mlp[2].weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, states=None):
        x, states = self.wte(idx), states or [None] * len(self.blocks)
        new = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state)
            new.append(state)
        return F.linear(self.norm(x), self.wte.weight), new

    def step(self, idx, states):
        x, new = self.wte(idx), []
        for block, state in zip(self.blocks, states):
            x, state = block.step(x, state)
            new.append(state)
        return F.linear(self.norm(x), self.wte.weight), new

    def stats(self):
        """Each mixer's `stats` dict (if it has one), averaged over layers."""
        per_layer = [b.mixer.stats for b in self.blocks if isinstance(getattr(b.mixer, "stats", None), dict)]
        keys = {k for s in per_layer for k in s}
        return {k: sum(float(s[k]) for s in per_layer if k in s) / sum(k in s for s in per_layer) for k in sorted(keys)}


def make_optimizer(model, lr):
    """AdamW; weight decay on matrices only (and never on a parameter marked _no_weight_decay)."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def get_lr(step, lr, warmup, max_iters):
    """Linear warmup to lr, then cosine decay to lr / 10 at max_iters."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_iters - warmup))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


# ----------------------------------------------------------------------------- train, eval, sample

def loss_of(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model, data, cfg, device, autocast):
    """Mean loss over the same eval_iters batches every time."""
    model.eval()
    losses = []
    for k in range(cfg.eval_iters):
        x, y = get_batch(data, k, cfg.seed, cfg.block_size, cfg.batch_size, device)
        with autocast:
            losses.append(loss_of(model, x, y))
    model.train()
    return torch.stack(losses).mean().item()


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


def save_checkpoint(path, model, optimizer, step, chars, cfg, best_val):
    ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, vocab=chars,
                args=vars(cfg), best_val=best_val, rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
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
    p.add_argument("--model", required=True, choices=list(MODELS), help="the mixer: <model>.py")
    p.add_argument("--data", help="a UTF-8 text file (default: tiny Shakespeare, downloaded once)")
    for flag, typ in (("max-iters", int), ("batch-size", int), ("block-size", int), ("n-layer", int),
                      ("d-model", int), ("lr", float), ("warmup", int), ("seed", int), ("sample-len", int),
                      ("eval-interval", int), ("eval-iters", int), ("log-interval", int)):
        p.add_argument("--" + flag, type=typ)
    p.add_argument("--device", help="cuda, cpu, mps, ... (default: cuda if there is one)")
    p.add_argument("--out-dir", help="checkpoints go here (default: out/<model>)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--prompt", help="the sample starts from this text (default: a newline)")
    return p.parse_args(argv)  # every default is None: device defaults < checkpoint < flags passed


def get_config(argv):
    """Device defaults < what the checkpoint was trained with (--resume) < the flags passed."""
    passed = {k: v for k, v in vars(parse_args(argv)).items() if v is not None}
    device = passed.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = passed.get("out_dir") or os.path.join("out", passed["model"])
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt")) if passed.get("resume") else None
    restored = {k: v for k, v in ckpt["args"].items() if k not in NOT_RESUMED} if ckpt else {}
    cuda = device.startswith("cuda")
    cfg = argparse.Namespace(**{**COMMON, **(GPU if cuda else CPU), **restored, **passed,
                                "device": device, "out_dir": out_dir})
    shown = "n_layer d_model block_size batch_size lr warmup max_iters eval_interval eval_iters".split()
    print(f"{device}: {'' if cuda else 'small config '}" + " ".join(f"{k.replace('_size', '')}={getattr(cfg, k)}"
          for k in shown) + (f" (resumed from {out_dir}/ckpt.pt)" if ckpt else "") + " -- any flag overrides")
    return cfg, ckpt


def try_compile(model, batch, autocast):
    """torch.compile fails lazily, at the first call: run one forward and backward now."""
    try:
        compiled = torch.compile(model)
        with autocast:
            loss_of(compiled, *batch).backward()
        return compiled
    except Exception as e:
        print(f"--compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:100]}); running eager")
        return model
    finally:
        model.zero_grad(set_to_none=True)


def main(argv=None):
    cfg, ckpt = get_config(argv)
    device, cuda = cfg.device, cfg.device.startswith("cuda")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    text = get_data(cfg.data)
    chars = ckpt["vocab"] if ckpt else "".join(sorted(set(text)))
    train_data, val_data = split(text, chars, cfg.block_size)
    torch.manual_seed(cfg.seed)
    model = LM(load_mixer(cfg.model), len(chars), cfg.n_layer, cfg.d_model).to(device)
    optimizer = make_optimizer(model, cfg.lr)
    step, best_val = 0, float("inf")
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            sys.exit(f"{ckpt_path} does not fit this model (different --model, --n-layer or --d-model?): {e}")
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        torch.set_rng_state(ckpt["rng"])
        if cuda and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    os.makedirs(cfg.out_dir, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model}: {n_params / 1e6:.2f}M parameters, vocab {len(chars)}, "
          f"{len(train_data):,} train / {len(val_data):,} val characters")

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    batch0 = get_batch(train_data, 0, cfg.seed, cfg.block_size, cfg.batch_size, device)
    fwd = try_compile(model, batch0, autocast) if cfg.compile else model

    interrupted = []  # first Ctrl-C: finish this step, save, stop; a second one aborts at once

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit at once)", flush=True)

    main_thread = threading.current_thread() is threading.main_thread()  # signals only work there
    old_handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None

    def save():
        save_checkpoint(ckpt_path, model, optimizer, step, chars, cfg, best_val)

    t_start = t_last = time.time()
    start_step, last_step, train_losses = step, step, []
    try:
        while True:
            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
            if is_eval or step % cfg.log_interval == 0:
                now = time.time()
                line, stats = f"step {step:5d}", model.stats()  # the last training step's stats
                if train_losses:
                    line += f" | train {torch.stack(train_losses).mean().item():.4f}"
                if is_eval:
                    val = evaluate(fwd, val_data, cfg, device, autocast)
                    best_val = min(best_val, val)
                    line += f" | val {val:.4f}"
                if step > last_step:
                    per_step = (now - t_start) / (step - start_step)
                    line += (f" | {(step - last_step) * cfg.batch_size * cfg.block_size / (now - t_last):,.0f} tok/s"
                             f" | {fmt_time(now - t_start)} elapsed, ETA {fmt_time(per_step * (cfg.max_iters - step))}")
                line += "".join(f" | {k} {v:.3g}" for k, v in stats.items())
                print(line, flush=True)
                if is_eval:
                    save()
                t_last, last_step, train_losses = time.time(), step, []
            if step >= cfg.max_iters or interrupted:
                break
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, cfg.lr, cfg.warmup, cfg.max_iters)
            x, y = get_batch(train_data, step, cfg.seed, cfg.block_size, cfg.batch_size, device)
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
        save()
        print(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        return
    print(f"done: step {step} in {fmt_time(time.time() - t_start)}, best val {best_val:.4f}, saved {ckpt_path}")
    if cfg.sample_len > 0:
        print("-" * 40 + "\n" + sample(model, cfg.prompt, cfg.sample_len, chars, device, autocast, cfg.seed))


if __name__ == "__main__":
    main()
