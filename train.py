"""
Training for every stage of Cola DLM, nanoGPT style: one file, argparse flags, DDP under torchrun.

    python train.py --stage vae     # stage 1: Text VAE pretraining (SPEC §3)
    python train.py --stage joint   # stage 2: joint VAE + block-causal DiT, from out/vae.pt (SPEC §5)
    python train.py                 # --stage all: stage 1 then stage 2
    torchrun --standalone --nproc_per_node=2 train.py --stage vae   # DDP (gloo on CPU, nccl on CUDA)

Checkpoints are self-describing (model configs, args, step, optimizer, RNG states, data position,
tokenizer) and written atomically; --resume continues a run exactly where it stopped.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from prepare import DataError, load_meta
from diffusion import ColaDLM, history_blocks, latent_stats, t_bin_sums
from dit import DiTConfig
from baselines import LMConfig, TransformerLM, match_layers
from vae import TextVAE, VAEConfig, count_params

HERE = os.path.dirname(os.path.abspath(__file__))

# The paper's recipe (SPEC §3, §5); a preset may override it where its scale calls for it.
RECIPE = dict(beta=1e-3, beta2=0.95, embed_lr_mult=1.0, lr=1.5e-4, min_lr=1e-5, warmup_iters=5000, grad_clip_scope="global",
              fm_batch_mult=1)

# Size presets. 'cpu' is the laptop default; 'paper' is the paper's configuration (SPEC §3-4, §10).
PRESETS = {
    "tiny": dict(vae=dict(width=64, n_enc_layers=1, n_dec_layers=1, n_heads=2, mlp_hidden=128),
                 dit=dict(width=64, n_layers=2, n_heads=2),
                 recipe=dict(lr=3e-3, min_lr=3e-4, warmup_iters=50)),
    # A few hundred steps over ~0.3M tokens: a large lr, beta2 0.999 (nanoGPT's Shakespeare config raises
    # it too: few tokens per step), and 10x lr on the vocabulary-sized matrices, whose rows for rare tokens
    # see a gradient only when the token occurs. beta 1e-4 puts the learned logSNR near the paper's ~4.5.
    # Stage 2: the prior learns slowly and the decoder's 50K head is most of a step's cost, so the DiT sees
    # 4x the decoded batch; and the VAE's reference-KL gradient norm (~1e3) would otherwise shrink every
    # DiT step through the global clip, so each network is clipped on its own.
    "cpu": dict(vae=dict(width=128, n_enc_layers=2, n_dec_layers=2, n_heads=4, mlp_hidden=384),
                dit=dict(width=192, n_layers=4, n_heads=4),
                recipe=dict(beta=1e-4, beta2=0.999, embed_lr_mult=10.0, lr=3e-3, min_lr=3e-4, warmup_iters=50,
                            fm_batch_mult=4, grad_clip_scope="network")),
    "paper": dict(vae=dict(width=1536, n_enc_layers=4, n_dec_layers=4, n_heads=12, mlp_hidden=3200,
                           vocab_size=100278),
                  dit=dict(width=2048, n_layers=24, n_heads=16, mlp_hidden=8192, rope_fraction=0.75)),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--model", default="cola", choices=["cola", "ar", "llada"],
                   help="cola (the stages below) or a matched baseline (trained for --main_iters)")
    p.add_argument("--stage", default="all", choices=["vae", "joint", "all"], help="Cola training stage")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="model size preset")
    p.add_argument("--data_dir", default=os.path.join(HERE, "data", "shakespeare"), help="prepared data (prepare.py)")
    p.add_argument("--out_dir", default=os.path.join(HERE, "out"), help="checkpoints and logs go here")
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint in --out_dir")
    # model knobs (override the preset)
    p.add_argument("--latent_dim", type=int, default=16, help="d: channels per latent")
    p.add_argument("--block_size", type=int, default=16, help="latents per block (VAE and DiT attention)")
    p.add_argument("--patch_size", type=int, default=1, help="tokens per latent")
    p.add_argument("--vae_width", type=int, default=None, help="VAE width (default: preset)")
    p.add_argument("--vae_layers", type=int, default=None, help="encoder and decoder blocks each (default: preset)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in every transformer block")
    p.add_argument("--fixed_logsnr", type=float, default=0.0, help=">0: fixed posterior variance at this logSNR")
    # stage-1 loss
    p.add_argument("--beta", type=float, default=None,
                   help="weight of the KL (stage 1) / entropy (stage 2) term (default: preset; paper 1e-3)")
    p.add_argument("--mask_prob", type=float, default=0.15, help="fraction of tokens replaced by [MASK] in the BERT branch")
    p.add_argument("--lam_mask", type=float, default=1.0, help="weight of the BERT-style masked branch (0: off)")
    # stage-2 (joint) loss and the prior
    p.add_argument("--dit_width", type=int, default=None, help="DiT width (default: preset)")
    p.add_argument("--dit_layers", type=int, default=None, help="DiT blocks (default: preset)")
    p.add_argument("--rope_fraction", type=float, default=None, help="fraction of DiT head channels RoPE rotates")
    p.add_argument("--lm_width", type=int, default=None, help="baseline width (default: the preset's VAE width)")
    p.add_argument("--lm_layers", type=int, default=0,
                   help="baseline blocks (0: as many as match the Cola model of this preset in parameters)")
    p.add_argument("--main_iters", type=int, default=250, help="optimizer steps of stage 2 (or of a baseline)")
    p.add_argument("--vae_lr_ratio", type=float, default=1.0, help="VAE lr / DiT lr in stage 2 (0 freezes the VAE)")
    p.add_argument("--lam_vae", type=float, default=1.0, help="weight of the VAE terms in stage 2")
    p.add_argument("--lam_fm", type=float, default=1.0, help="weight of the flow-matching loss")
    p.add_argument("--lam_ref", type=float, default=1.0, help="weight of KL(q || q_ref) to the frozen stage-1 encoder")
    p.add_argument("--t_loc", type=float, default=1.0, help="logit-normal location of t (paper: 1.0 at d=16)")
    p.add_argument("--t_scale", type=float, default=1.0, help="logit-normal scale of t")
    p.add_argument("--t_uniform", action="store_true", help="sample t uniformly instead of logit-normal")
    p.add_argument("--partial_prob", type=float, default=0.05, help="per-block probability of a known clean prefix")
    p.add_argument("--fm_batch_mult", type=int, default=None,
                   help="stage 2: the encoder and the prior see this many times --batch_size sequences per micro-"
                        "batch, the decoder terms --batch_size of them (default: preset; paper 1)")
    p.add_argument("--detach_zt", action="store_true", help="no FM gradient into the encoder (fallback if unstable)")
    p.add_argument("--stats_batches", type=int, default=16, help="batches used to estimate the latent shift/scale")
    # optimisation
    p.add_argument("--seq_len", type=int, default=64, help="tokens per training sequence")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per micro-batch per process")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--vae_iters", type=int, default=450, help="optimizer steps of stage 1")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: preset; paper 1.5e-4)")
    p.add_argument("--min_lr", type=float, default=None, help="final learning rate of the cosine (default: preset)")
    p.add_argument("--warmup_iters", type=int, default=None, help="linear warm-up steps (default: preset)")
    p.add_argument("--embed_lr_mult", type=float, default=None,
                   help="lr multiplier of embedding tables and output heads (default: preset; paper 1)")
    p.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default: preset; paper 0.95)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="grad-norm clip (0: off)")
    p.add_argument("--grad_clip_scope", default=None, choices=["global", "network"],
                   help="stage 2: one norm over VAE + DiT (paper) or one per network, so that the VAE's large "
                        "reference-KL gradients do not scale the DiT's step down (default: preset)")
    # running
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the model (--no-compile for quick runs: a cold compile costs ~30 s)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--log_interval", type=int, default=25, help="steps between log lines")
    p.add_argument("--eval_interval", type=int, default=150, help="steps between validations and checkpoints")
    p.add_argument("--eval_iters", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--stop_after", type=int, default=0,
                   help="checkpoint and exit after this many steps in this invocation (time-sliced jobs; 0 = off)")
    a = p.parse_args(argv)
    for k, v in {**RECIPE, **PRESETS[a.preset].get("recipe", {})}.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    errs = []
    if a.seq_len % (a.block_size * a.patch_size):
        errs.append(f"--seq_len {a.seq_len} must be a multiple of block_size*patch_size = {a.block_size * a.patch_size}")
    for name in ("batch_size", "grad_accum", "latent_dim", "block_size", "patch_size", "seq_len", "fm_batch_mult"):
        if getattr(a, name) < 1:
            errs.append(f"--{name} must be >= 1")
    if not 0 <= a.mask_prob <= 1:
        errs.append("--mask_prob must be in [0, 1]")
    if errs:
        p.error("; ".join(errs))
    return a


# ----------------------------------------------------------------------------------------------------
# distributed set-up

def setup_distributed(device_arg):
    """Returns (rank, world, local_rank, device). Works with or without torchrun."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        backend = "nccl" if device_arg.startswith("cuda") else "gloo"
        if device_arg.startswith("cuda"):
            device_arg = f"cuda:{local}"
            torch.cuda.set_device(device_arg)
        dist.init_process_group(backend=backend)
        return rank, world, local, device_arg
    return 0, 1, 0, device_arg


def cleanup_distributed():
    # free DDP wrappers first (trainers sit in reference cycles): a reducer torn down after its process
    # group aborts gloo at exit now and then ("terminate called without an active exception")
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# data

class TokenData:
    """Random windows from a memmapped token file. The batch for (step, micro) is a pure function of
    (seed, rank, step, micro), so the data position is just the step and resume is exact."""

    def __init__(self, data_dir, seq_len):
        self.meta = load_meta(data_dir)
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(data_dir, f"{split}.bin")
            if not os.path.exists(path):
                raise DataError(f"{path} not found: run prepare.py")
            arr = np.memmap(path, dtype=dtype, mode="r")
            if len(arr) < seq_len:
                raise DataError(f"{path} has {len(arr)} tokens, fewer than one sequence ({seq_len}); "
                                "use a smaller --seq_len or more data")
            self.splits[split] = arr
        self.seq_len = seq_len

    def batch(self, split, batch_size, seed, device):
        arr = self.splits[split]
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(arr) - self.seq_len + 1, (batch_size,), generator=g).tolist()
        x = torch.from_numpy(np.stack([arr[s:s + self.seq_len].astype(np.int64) for s in starts]))
        return x.to(device, non_blocking=True)


def batch_seed(base, rank, step, micro):
    return (base * 1_000_003 + rank * 7919 + step * 104_729 + micro) % (2 ** 63)


# ----------------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, obj):
    """Write to a temporary file, then rename: a crash never leaves a truncated checkpoint behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, expect_kind=None):
    if not os.path.exists(path):
        raise DataError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise DataError(f"{path} is not a checkpoint of this project")
    if expect_kind is not None and ckpt["kind"] not in expect_kind:
        raise DataError(f"{path} holds a '{ckpt['kind']}' model, expected {' or '.join(expect_kind)}")
    return ckpt


def rng_state():
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------------------
# optimisation

def lr_at(step, a, max_iters):
    """Linear warm-up to --lr, then cosine decay to --min_lr at max_iters."""
    if step < a.warmup_iters:
        return a.lr * (step + 1) / a.warmup_iters
    frac = min(1.0, (step - a.warmup_iters) / max(1, max_iters - a.warmup_iters))
    return a.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (a.lr - a.min_lr)


def make_optimizer(named_groups, a, device):
    """AdamW (0.9, --beta2); weight decay on matrices only. named_groups: [(params_iter, lr_scale)]."""
    groups = []
    for params, lr_scale in named_groups:
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups.append({"params": decay, "weight_decay": a.weight_decay, "lr_scale": lr_scale})
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale})
    fused = str(device).startswith("cuda")
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, a.beta2), fused=fused)


def lr_groups(module, scale, embed_mult):
    """[(params, lr scale)]: the vocabulary-sized matrices (token embeddings and output heads) get
    `embed_mult` times the module's learning rate: a rare token's rows are updated only when it occurs."""
    emb = [m.weight for name, m in module.named_modules()
           if isinstance(m, torch.nn.Embedding) or name.endswith("head")]
    ids = {id(p) for p in emb}
    return [([p for p in module.parameters() if id(p) not in ids], scale), (emb, scale * embed_mult)]


def vae_config_from_args(a, vocab_size):
    cfg = dict(PRESETS[a.preset]["vae"])
    cfg.update(vocab_size=vocab_size, latent_dim=a.latent_dim, block_size=a.block_size,
               patch_size=a.patch_size, dropout=a.dropout, fixed_logsnr=a.fixed_logsnr,
               max_seq_len=max(a.seq_len, 1024))
    if a.vae_width:
        cfg["width"] = a.vae_width
    if a.vae_layers:
        cfg["n_enc_layers"] = cfg["n_dec_layers"] = a.vae_layers
    return VAEConfig(**cfg)


# ----------------------------------------------------------------------------------------------------
# compute accounting

def linear_params(module):
    """Weights of every nn.Linear (embedding lookups cost no FLOPs; the output head is a Linear)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def attn_flops(n_layers, width, n_keys):
    """Forward FLOPs per query position of QK^T and AV: SDPA with a bool mask computes all keys."""
    return n_layers * 2 * 2 * n_keys * width


def train_flops_per_token(kind, model, seq_len, stage=None, decode_frac=1.0):
    """Training FLOPs per token of data, convention: 6 per matmul weight per position a network runs on
    (forward 2 + backward 4), 2 for forward-only networks, plus attention scores/values at the full
    (masked-but-computed) key length. Cola's stage 1 runs encoder+decoder on two copies (clean, masked);
    stage 2 adds the frozen reference encoder (forward only) and the DiT on (2L - bs) latents per L, and
    runs the decoder (both copies) and the masked copy's encoder on the decoded fraction of the batch."""
    if kind in ("ar", "llada"):
        c = model.cfg
        return 6 * linear_params(model) + 3 * attn_flops(c.n_layers, c.width, seq_len)
    vae = model.vae if hasattr(model, "vae") else model
    c = vae.cfg
    n_lat = seq_len // c.patch_size
    enc = (6 * linear_params(vae.enc) + 3 * attn_flops(c.n_enc_layers, c.width, n_lat)) / c.patch_size
    dec = ((6 * (linear_params(vae.dec) - linear_params(vae.dec.head)) + 3 * attn_flops(c.n_dec_layers, c.width, n_lat))
           / c.patch_size + 6 * linear_params(vae.dec.head))
    if stage != "joint":
        return 2 * (enc + dec)
    L, bs = n_lat, c.block_size
    d = model.dit.cfg
    f = enc * (1 + decode_frac) + 2 * dec * decode_frac + 2 * linear_params(model.ref_enc) / c.patch_size
    f += (6 * linear_params(model.dit) + 3 * attn_flops(d.n_layers, d.width, 2 * L - bs)) * (2 * L - bs) / L / c.patch_size
    return f


# ----------------------------------------------------------------------------------------------------
# the training loop shared by every stage

class Trainer:
    """Holds the model, optimizer and the step loop. A stage provides: the raw model, the loss call,
    the parameter groups, an evaluate() and what goes into its checkpoint."""

    def __init__(self, a, env, data, raw_model, param_groups, loss_kwargs, max_iters, ckpt_path, ckpt_extra,
                 micro_batch=None):
        self.a, self.data, self.max_iters, self.ckpt_path = a, data, max_iters, ckpt_path
        self.rank, self.world, self.device = env["rank"], env["world"], env["device"]
        self.master = self.rank == 0
        self.raw = raw_model.to(self.device)
        self.loss_kwargs, self.ckpt_extra = loss_kwargs, ckpt_extra
        self.opt = make_optimizer(param_groups, a, self.device)
        self.step = 0
        self.clip_groups = None  # {suffix: params} clipped separately; None: one global norm
        self.micro_batch = micro_batch or a.batch_size  # training sequences per micro-batch per process
        self.tokens_per_step = self.micro_batch * a.seq_len * a.grad_accum * self.world
        self.model = self.raw
        if a.compile:
            self.model = torch.compile(self.model)
        if self.world > 1:
            self.model = DDP(self.model, device_ids=[int(str(self.device).split(":")[1])]
                             if str(self.device).startswith("cuda") else None)
        dev_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        self.autocast = (torch.autocast(dev_type, dtype=torch.bfloat16) if a.dtype == "bfloat16"
                         else contextlib.nullcontext())

    def state(self):
        return dict(step=self.step, optimizer=self.opt.state_dict(), rng=rng_state(), args=vars(self.a),
                    tokenizer=self.data.meta["tokenizer"], data_position={"step": self.step, "seed": self.a.seed},
                    **self.ckpt_extra())

    def load_state(self, ckpt):
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        # each rank continues its own stream: offset as at the start (seeded by rank)
        if self.rank:
            torch.manual_seed(self.a.seed + self.rank * 1000 + self.step)

    def train_step(self):
        a = self.a
        lr = lr_at(self.step, a, self.max_iters)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        sums = {}
        for micro in range(a.grad_accum):
            x = self.data.batch("train", self.micro_batch, batch_seed(a.seed, self.rank, self.step, micro), self.device)
            last = micro == a.grad_accum - 1
            # gradients are all-reduced only on the last micro-batch (DDP no_sync otherwise)
            sync = self.model.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    out = self.model(x, **self.loss_kwargs)
                (out["loss"] / a.grad_accum).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / a.grad_accum
        if a.grad_clip > 0:
            for name, params in (self.clip_groups or {"": list(self.raw.parameters())}).items():
                sums["gnorm" + name] = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return sums, lr

    @torch.no_grad()
    def validate(self, metrics_fn, train_flops):
        """Average the scalars of metrics_fn(x) over the validation batches with fixed noise (comparable
        between evaluations, and the training RNG stream is left as it was), over ranks too."""
        a = self.a
        self.raw.eval()
        rng = torch.get_rng_state()
        torch.manual_seed(a.seed + 7)
        sums = {}
        for x in val_batches(a, self.data, self.rank, self.device):
            with self.autocast:
                out = metrics_fn(x)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) / a.eval_iters
        torch.set_rng_state(rng)
        self.raw.train()
        res = self.all_reduce_mean(sums)
        res["train_flops"] = train_flops
        return res

    def all_reduce_mean(self, metrics):
        if self.world == 1:
            return {k: float(v) for k, v in metrics.items()}
        keys = sorted(metrics)
        t = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=self.device) for k in keys])
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    def run(self, evaluate, log_prefix):
        a = self.a
        tokens_per_step = self.tokens_per_step
        t0, acc, n, steps_here = time.time(), {}, 0, 0
        start = time.time()
        while self.step < self.max_iters:
            if a.stop_after and steps_here == a.stop_after:
                if self.master:
                    save_checkpoint(self.ckpt_path, self.state())
                    print(f"[{log_prefix}] stopped at step {self.step} (--stop_after); continue with --resume", flush=True)
                return False
            steps_here += 1
            metrics, lr = self.train_step()
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + v
            n += 1
            if self.step % a.log_interval == 0 or self.step == self.max_iters:
                m = self.all_reduce_mean({k: v / n for k, v in acc.items()})
                dt = (time.time() - t0) / n
                if self.master:
                    parts = " ".join(f"{k} {v:.4f}" for k, v in m.items())
                    print(f"[{log_prefix}] step {self.step}/{self.max_iters} {parts} lr {lr:.2e} "
                          f"{dt * 1000:.0f} ms/step {tokens_per_step / dt:,.0f} tok/s", flush=True)
                t0, acc, n = time.time(), {}, 0
            if self.step % a.eval_interval == 0 or self.step == self.max_iters:
                val = evaluate()
                if self.master:
                    main = {k: v for k, v in val.items() if not k.startswith(("fm_t", "fmu_t"))}
                    print(f"[{log_prefix}] val step {self.step} " +
                          " ".join(f"{k} {v:.4g}" for k, v in main.items()) +
                          f" | {time.time() - start:.0f} s into this run", flush=True)
                    if len(main) < len(val):
                        print(f"[{log_prefix}] val FM per t-bin (cond | uncond): " + " ".join(
                            f"{i / 10:.1f}:{val[f'fm_t{i}']:.3f}|{val[f'fmu_t{i}']:.3f}"
                            for i in range(10) if f"fm_t{i}" in val), flush=True)
                    save_checkpoint(self.ckpt_path, self.state())
                    with open(os.path.join(a.out_dir, f"log_{log_prefix}.jsonl"), "a") as f:
                        f.write(json.dumps({"step": self.step, **val}) + "\n")
                t0 = time.time()
        return True


# ----------------------------------------------------------------------------------------------------
# stage 1

def val_batches(a, data, rank, device):
    for i in range(a.eval_iters):
        yield data.batch("val", a.batch_size, batch_seed(a.seed + 1, rank, 0, i), device)


def train_vae(a, env, data):
    path = os.path.join(a.out_dir, "vae.pt")
    ckpt = load_checkpoint(path, ("vae",)) if a.resume and os.path.exists(path) else None
    cfg = VAEConfig(**ckpt["vae_config"]) if ckpt else vae_config_from_args(a, data.meta["vocab_size"])
    torch.manual_seed(a.seed)  # same init on every rank
    model = TextVAE(cfg)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if env["rank"] == 0:
        print(f"[vae] {count_params(model) / 1e6:.2f}M parameters, config {asdict(cfg)}", flush=True)
    loss_kwargs = dict(beta=a.beta, mask_prob=a.mask_prob, lam_mask=a.lam_mask)
    fpt = train_flops_per_token("cola", model, a.seq_len, "vae")
    trainer = Trainer(a, env, data, model, lr_groups(model, 1.0, a.embed_lr_mult), loss_kwargs, a.vae_iters, path,
                      lambda: dict(kind="vae", vae_config=asdict(cfg), model=model.state_dict(),
                                   train_flops=trainer.step * trainer.tokens_per_step * fpt))
    if ckpt:
        trainer.load_state(ckpt)
        if env["rank"] == 0:
            print(f"[vae] resumed at step {trainer.step}", flush=True)
    else:
        torch.manual_seed(a.seed + env["rank"] * 1000)  # different noise per rank

    def metrics(x):
        out = model(x, **loss_kwargs)
        out["recon_acc"] = model.recon_accuracy(x)
        return {k: out[k] for k in ("loss", "ce", "kl", "mask_acc", "recon_acc", "logsnr")}

    def evaluate():
        return trainer.validate(metrics, trainer.step * trainer.tokens_per_step * fpt)

    trainer.finished = trainer.run(evaluate, "vae")
    return trainer


# ----------------------------------------------------------------------------------------------------
# stage 2

def dit_config_from_args(a, vae_cfg):
    cfg = dict(PRESETS[a.preset]["dit"])
    cfg.update(latent_dim=vae_cfg.latent_dim, block_size=vae_cfg.block_size, dropout=a.dropout)
    if a.dit_width:
        cfg["width"] = a.dit_width
    if a.dit_layers:
        cfg["n_layers"] = a.dit_layers
    if a.rope_fraction is not None:
        cfg["rope_fraction"] = a.rope_fraction
    return DiTConfig(**cfg)


@torch.no_grad()
def estimate_latent_stats(vae, a, data, device):
    """Per-channel shift/scale of q(z|x) over training batches (the same batches on every rank)."""
    vae.eval()
    mus, logvars = [], []
    for i in range(a.stats_batches):
        mu, logvar = vae.encode(data.batch("train", a.batch_size, batch_seed(a.seed + 2, 0, 0, i), device))
        mus.append(mu)
        logvars.append(logvar)
    vae.train()
    return latent_stats(torch.cat(mus), torch.cat(logvars))


def joint_loss_kwargs(a):
    return dict(beta=a.beta, mask_prob=a.mask_prob, lam_mask=a.lam_mask, lam_vae=a.lam_vae, lam_fm=a.lam_fm,
                lam_ref=a.lam_ref, t_loc=a.t_loc, t_scale=a.t_scale, t_uniform=a.t_uniform,
                partial_prob=a.partial_prob, detach_zt=a.detach_zt,
                decode_rows=a.batch_size if a.fm_batch_mult > 1 else 0)


def build_cola(ckpt):
    model = ColaDLM(VAEConfig(**ckpt["vae_config"]), DiTConfig(**ckpt["dit_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def load_model(path, device="cpu", kinds=("cola", "ar", "llada")):
    """A trained model from its checkpoint alone -> (model in eval mode on device, checkpoint)."""
    ckpt = load_checkpoint(path, kinds)
    if ckpt["kind"] == "cola":
        model = build_cola(ckpt)
    else:
        model = TransformerLM(LMConfig(**ckpt["lm_config"]))
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def train_joint(a, env, data):
    path = os.path.join(a.out_dir, "ckpt.pt")
    device = env["device"]
    ckpt = load_checkpoint(path, ("cola",)) if a.resume and os.path.exists(path) else None
    if ckpt:
        model = build_cola(ckpt)
        vae_cfg, dit_cfg = model.vae.cfg, model.dit.cfg
        stage1_flops = ckpt["stage1_flops"]
    else:
        vae_ckpt = load_checkpoint(os.path.join(a.out_dir, "vae.pt"), ("vae",))
        vae_cfg = VAEConfig(**vae_ckpt["vae_config"])
        dit_cfg = dit_config_from_args(a, vae_cfg)
        torch.manual_seed(a.seed)  # same DiT init on every rank
        model = ColaDLM(vae_cfg, dit_cfg)
        model.vae.load_state_dict(vae_ckpt["model"])
        shift, scale = estimate_latent_stats(model.vae.to(device), a, data, device)
        model.init_from_vae(vae_ckpt["model"], shift, scale)
        stage1_flops = vae_ckpt["train_flops"]
    if env["rank"] == 0:
        print(f"[joint] VAE {count_params(model.vae) / 1e6:.2f}M + DiT {count_params(model.dit) / 1e6:.2f}M "
              f"parameters; DiT config {asdict(dit_cfg)}", flush=True)
        print("[joint] latent shift " + " ".join(f"{v:.2f}" for v in model.latent_shift.tolist()) +
              " | scale " + " ".join(f"{v:.2f}" for v in model.latent_scale.tolist()), flush=True)
    if a.vae_lr_ratio == 0:
        model.vae.requires_grad_(False)  # Joint x0: the VAE stays at stage 1
    # the VAE trains at exactly the DiT's lr times --vae_lr_ratio (the paper's "Joint x1"); the
    # vocabulary-matrix multiplier of stage 1 is not applied: it lets the latents drift from q_ref
    groups = [(model.dit.parameters(), 1.0), (model.vae.parameters(), a.vae_lr_ratio)]
    loss_kwargs = joint_loss_kwargs(a)
    fpt = train_flops_per_token("cola", model, a.seq_len, "joint", 1 / a.fm_batch_mult)
    trainer = Trainer(a, env, data, model, groups, loss_kwargs, a.main_iters, path,
                      lambda: dict(kind="cola", vae_config=asdict(vae_cfg), dit_config=asdict(dit_cfg),
                                   model=model.state_dict(), stage1_flops=stage1_flops,
                                   train_flops=stage1_flops + trainer.step * trainer.tokens_per_step * fpt),
                      micro_batch=a.batch_size * a.fm_batch_mult)
    if a.grad_clip_scope == "network":
        trainer.clip_groups = {"_dit": list(model.dit.parameters()), "_vae": list(model.vae.parameters())}
    if ckpt:
        trainer.load_state(ckpt)
        if env["rank"] == 0:
            print(f"[joint] resumed at step {trainer.step}", flush=True)
    else:
        torch.manual_seed(a.seed + env["rank"] * 1000)

    bins = {}

    def metrics(x):
        out = model(x, **loss_kwargs)
        out["recon_acc"] = model.vae.recon_accuracy(x)
        t, cond, uncond = model.fm_eval(x, t_uniform=True)  # uniform t: every bin gets samples
        cond, uncond = history_blocks(cond), history_blocks(uncond)  # (B,): blocks that have a history
        bins["c"] = bins.get("c", 0) + t_bin_sums(t, cond)
        bins["u"] = bins.get("u", 0) + t_bin_sums(t, uncond)
        res = {k: out[k] for k in ("loss", "ce", "mask_acc", "recon_acc", "fm", "ref_kl", "logsnr")}
        return {**res, "fm_cond": cond.mean(), "fm_uncond": uncond.mean()}

    def evaluate():
        bins.clear()
        res = trainer.validate(metrics, stage1_flops + trainer.step * trainer.tokens_per_step * fpt)
        if env["world"] > 1:
            for b in bins.values():
                dist.all_reduce(b)
        for i in range(bins["c"].shape[1]):
            if bins["c"][1, i] > 0:
                res[f"fm_t{i}"] = float(bins["c"][0, i] / bins["c"][1, i])
                res[f"fmu_t{i}"] = float(bins["u"][0, i] / bins["u"][1, i])
        return res

    trainer.finished = trainer.run(evaluate, "joint")
    return trainer


# ----------------------------------------------------------------------------------------------------
# baselines

def lm_config_from_args(a, vocab_size):
    """A baseline at the preset's VAE width, with its depth matched to the Cola model's parameter count."""
    vcfg = vae_config_from_args(a, vocab_size)
    width = a.lm_width or vcfg.width
    heads = vcfg.n_heads if width % vcfg.n_heads == 0 else 1
    cfg = LMConfig(kind=a.model, vocab_size=vocab_size, width=width, n_heads=heads, mlp_hidden=vcfg.mlp_hidden * width // vcfg.width,
                   max_seq_len=vcfg.max_seq_len, dropout=a.dropout)
    with torch.device("meta"):
        cola = ColaDLM(vcfg, dit_config_from_args(a, vcfg))
    target = count_params(cola.vae) + count_params(cola.dit)
    cfg.n_layers = a.lm_layers or match_layers(target, cfg)
    return cfg, target


def train_lm(a, env, data):
    path = os.path.join(a.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, (a.model,)) if a.resume and os.path.exists(path) else None
    if ckpt:
        cfg = LMConfig(**ckpt["lm_config"])
    else:
        cfg, target = lm_config_from_args(a, data.meta["vocab_size"])
    torch.manual_seed(a.seed)
    model = TransformerLM(cfg)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    elif env["rank"] == 0:
        print(f"[{a.model}] {count_params(model) / 1e6:.2f}M parameters ({cfg.n_layers} layers x {cfg.width}) "
              f"matched to Cola's {target / 1e6:.2f}M (VAE + DiT)", flush=True)
    fpt = train_flops_per_token(a.model, model=model, seq_len=a.seq_len)
    trainer = Trainer(a, env, data, model, [(model.parameters(), 1.0)], {}, a.main_iters, path,
                      lambda: dict(kind=a.model, lm_config=asdict(cfg), model=model.state_dict(),
                                   train_flops=trainer.step * trainer.tokens_per_step * fpt))
    if ckpt:
        trainer.load_state(ckpt)
    else:
        torch.manual_seed(a.seed + env["rank"] * 1000)

    def evaluate():
        return trainer.validate(lambda x: {k: v for k, v in model(x).items() if k in ("loss", "acc")},
                                trainer.step * trainer.tokens_per_step * fpt)

    trainer.finished = trainer.run(evaluate, a.model)
    return trainer


def main(argv=None):
    a = get_args(argv)
    rank, world, local, device = setup_distributed(a.device)
    env = dict(rank=rank, world=world, device=device)
    try:
        if rank == 0:
            os.makedirs(a.out_dir, exist_ok=True)
        data = TokenData(a.data_dir, a.seq_len)
        finished = True
        if a.model != "cola":
            train_lm(a, env, data)
        elif a.stage in ("vae", "all"):
            finished = train_vae(a, env, data).finished
        if a.model == "cola" and (a.stage == "joint" or (a.stage == "all" and finished)):
            train_joint(a, env, data)
    except DataError as e:
        cleanup_distributed()
        sys.exit(f"error: {e}")
    cleanup_distributed()


if __name__ == "__main__":
    main()
