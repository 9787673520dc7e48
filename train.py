"""
Training for every stage of Cola DLM and for the baselines, nanoGPT style: one file, argparse flags,
DDP under torchrun (gloo on CPU, nccl on CUDA).

    python train.py --stage vae     # stage 1: Text VAE pretraining (docs/method.md §3)       -> out/vae.pt
    python train.py --stage joint   # stage 2: joint VAE + block-causal DiT, from out/vae.pt  -> out/ckpt.pt
    python train.py                 # --stage all: stage 1 then stage 2
    python train.py --model ar      # a matched baseline (ar or llada)                        -> out/ckpt.pt
    torchrun --standalone --nproc_per_node=2 train.py --stage vae

The file reads top to bottom: arguments and presets, set-up, stage 1, stage 2, the baselines, then the
one training loop they share. Checkpoints are self-describing (model configs, args, step, optimizer,
every rank's random state) and written atomically; --resume continues a run where it stopped.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from baselines import LMConfig, TransformerLM, matched_lm_config
from checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from diffusion import ColaDLM, history_blocks, latent_stats, t_bin_sums
from dit import DiTConfig
from layers import n_params
from prepare import DEFAULT_DATA_DIR, REPO_DIR, DataError, TokenData, batch_seed
from vae import TextVAE, VAEConfig

# ----------------------------------------------------------------------------------------------------
# arguments and presets

# The paper's recipe (docs/method.md §5); a preset may override it where its scale calls for it.
RECIPE = dict(beta=1e-3, beta2=0.95, embed_lr_mult=1.0, lr=1.5e-4, min_lr=1e-5, warmup_iters=5000,
              grad_clip_scope="global", fm_batch_mult=1)

# Size presets. 'cpu' is the laptop default; 'paper' is the paper's configuration (docs/method.md §3, §4, §10).
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
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="prepared data (prepare.py)")
    p.add_argument("--out_dir", default=os.path.join(REPO_DIR, "out"), help="checkpoints and logs go here")
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint in --out_dir")
    p.add_argument("--dry_run", action="store_true",
                   help="print the model configs, parameter counts and training FLOPs per step as JSON, then exit")
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
    args = p.parse_args(argv)
    for k, v in {**RECIPE, **PRESETS[args.preset].get("recipe", {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    errs = []
    if args.seq_len % (args.block_size * args.patch_size):
        errs.append(f"--seq_len {args.seq_len} must be a multiple of block_size*patch_size = "
                    f"{args.block_size * args.patch_size}")
    for name in ("batch_size", "grad_accum", "latent_dim", "block_size", "patch_size", "seq_len", "fm_batch_mult"):
        if getattr(args, name) < 1:
            errs.append(f"--{name} must be >= 1")
    if not 0 <= args.mask_prob <= 1:
        errs.append("--mask_prob must be in [0, 1]")
    if errs:
        p.error("; ".join(errs))
    return args


def vae_config(args, vocab_size):
    cfg = dict(PRESETS[args.preset]["vae"])
    cfg.update(vocab_size=vocab_size, latent_dim=args.latent_dim, block_size=args.block_size,
               patch_size=args.patch_size, dropout=args.dropout, fixed_logsnr=args.fixed_logsnr,
               max_seq_len=max(args.seq_len, 1024))
    if args.vae_width:
        cfg["width"] = args.vae_width
    if args.vae_layers:
        cfg["n_enc_layers"] = cfg["n_dec_layers"] = args.vae_layers
    return VAEConfig(**cfg)


def dit_config(args, vae_cfg):
    cfg = dict(PRESETS[args.preset]["dit"])
    cfg.update(latent_dim=vae_cfg.latent_dim, block_size=vae_cfg.block_size, dropout=args.dropout)
    if args.dit_width:
        cfg["width"] = args.dit_width
    if args.dit_layers:
        cfg["n_layers"] = args.dit_layers
    if args.rope_fraction is not None:
        cfg["rope_fraction"] = args.rope_fraction
    return DiTConfig(**cfg)


def lm_config(args, vocab_size):
    """A baseline at the preset's VAE width, its depth matched to the Cola model's parameter count."""
    vcfg = vae_config(args, vocab_size)
    with torch.device("meta"):
        cola = ColaDLM(vcfg, dit_config(args, vcfg))
    target = n_params(cola.vae) + n_params(cola.dit)
    width = args.lm_width or vcfg.width
    return matched_lm_config(args.model, target, vocab_size, width, vcfg.n_heads, vcfg.mlp_hidden * width // vcfg.width,
                             vcfg.max_seq_len, args.dropout, args.lm_layers), target


# ----------------------------------------------------------------------------------------------------
# set-up: processes, optimizer, schedule

def setup_distributed(device):
    """Returns (rank, world, device). Works with or without torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def cleanup_distributed():
    gc.collect()  # free DDP wrappers first: a reducer torn down after its process group can abort gloo at exit
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def lr_at(step, args, max_iters):
    """Linear warm-up to --lr, then cosine decay to --min_lr at max_iters."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    frac = min(1.0, (step - args.warmup_iters) / max(1, max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (args.lr - args.min_lr)


def make_optimizer(param_groups, args, device):
    """AdamW (0.9, --beta2); weight decay on matrices only. param_groups: [(params, lr_scale)]."""
    groups = []
    for params, lr_scale in param_groups:
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay,
                       "lr_scale": lr_scale})
        groups.append({"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": lr_scale})
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=str(device).startswith("cuda"))


def vocab_lr_groups(module, scale, vocab_mult):
    """[(params, lr scale)]: the vocabulary-sized matrices (token embeddings and output heads) get
    vocab_mult times the module's learning rate: a rare token's rows are updated only when it occurs."""
    vocab = [m.weight for name, m in module.named_modules()
             if isinstance(m, torch.nn.Embedding) or name.endswith("head")]
    ids = {id(p) for p in vocab}
    return [([p for p in module.parameters() if id(p) not in ids], scale), (vocab, scale * vocab_mult)]


@dataclass
class Run:
    """What a stage hands the training loop."""
    name: str                      # log prefix and log file: vae, joint, ar, llada
    model: torch.nn.Module         # the raw model; its forward(tokens, **loss_kwargs) returns {'loss', ...}
    param_groups: list             # [(params, lr scale)]
    loss_kwargs: dict
    max_iters: int
    ckpt_path: str
    ckpt_fields: dict              # kind, configs and anything else the checkpoint must hold
    flops_per_token: float         # training FLOPs per token of data (layers.py's convention)
    flops_before: float = 0.0      # FLOPs of earlier stages (stage 1 for stage 2)
    micro_batch: int = 0           # sequences per micro-batch (0: --batch_size)
    clip_groups: dict = field(default_factory=dict)  # {log suffix: params} clipped separately; empty: one norm
    resume_from: dict = None       # the checkpoint to continue
    validate: object = None        # validate(x) -> {metric: value} on one validation batch (no grad)
    report: object = None          # report(metrics) -> extra lines to print after the validation line


# ----------------------------------------------------------------------------------------------------
# stage 1: the Text VAE (docs/method.md §3)

def stage_vae(args, env, data):
    path = os.path.join(args.out_dir, "vae.pt")
    ckpt = load_checkpoint(path, ("vae",)) if args.resume and os.path.exists(path) else None
    cfg = VAEConfig(**ckpt["vae_config"]) if ckpt else vae_config(args, data.meta["vocab_size"])
    torch.manual_seed(args.seed)  # the same init on every rank
    model = TextVAE(cfg)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if env["master"]:
        print(f"[vae] {n_params(model) / 1e6:.2f}M parameters, config {asdict(cfg)}", flush=True)
    loss_kwargs = dict(beta=args.beta, mask_prob=args.mask_prob, lam_mask=args.lam_mask)

    def validate(x):
        out = model(x, **loss_kwargs)
        out["recon_acc"] = model.recon_accuracy(x)
        return {k: out[k] for k in ("loss", "ce", "kl", "mask_acc", "recon_acc", "logsnr")}

    return Run("vae", model, vocab_lr_groups(model, 1.0, args.embed_lr_mult), loss_kwargs, args.vae_iters, path,
               dict(kind="vae", vae_config=asdict(cfg)), model.train_flops_per_token(args.seq_len, args.lam_mask),
               resume_from=ckpt, validate=validate)


# ----------------------------------------------------------------------------------------------------
# stage 2: the VAE and the block-causal DiT prior, jointly (docs/method.md §4, §5)

@torch.no_grad()
def estimate_latent_stats(vae, args, data, device):
    """Per-channel shift/scale of q(z|x) over training batches (the same batches on every rank)."""
    vae.eval()
    mus, logvars = [], []
    for i in range(args.stats_batches):
        mu, logvar = vae.encode(data.batch("train", args.batch_size, batch_seed(args.seed + 2, i, 0), device))
        mus.append(mu)
        logvars.append(logvar)
    vae.train()
    return latent_stats(torch.cat(mus), torch.cat(logvars))


def stage_joint(args, env, data):
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, ("cola",)) if args.resume and os.path.exists(path) else None
    if ckpt:
        model = ColaDLM.from_checkpoint(ckpt)
        stage1_flops = ckpt["stage1_flops"]
    else:
        vae_ckpt = load_checkpoint(os.path.join(args.out_dir, "vae.pt"), ("vae",))
        vae_cfg = VAEConfig(**vae_ckpt["vae_config"])
        torch.manual_seed(args.seed)  # the same DiT init on every rank
        model = ColaDLM(vae_cfg, dit_config(args, vae_cfg))
        model.vae.load_state_dict(vae_ckpt["model"])
        shift, scale = estimate_latent_stats(model.vae.to(env["device"]), args, data, env["device"])
        model.init_from_vae(vae_ckpt["model"], shift, scale)
        stage1_flops = vae_ckpt["train_flops"]
    if env["master"]:
        print(f"[joint] VAE {n_params(model.vae) / 1e6:.2f}M + DiT {n_params(model.dit) / 1e6:.2f}M parameters; "
              f"DiT config {asdict(model.dit.cfg)}", flush=True)
        print("[joint] latent shift " + " ".join(f"{v:.2f}" for v in model.latent_shift.tolist()) +
              " | scale " + " ".join(f"{v:.2f}" for v in model.latent_scale.tolist()), flush=True)
    if args.vae_lr_ratio == 0:
        model.vae.requires_grad_(False)  # Joint x0: the VAE stays at stage 1
    # the VAE trains at exactly the DiT's lr times --vae_lr_ratio (the paper's "Joint x1"); stage 1's
    # vocabulary-matrix multiplier is not applied: it lets the latents drift from q_ref
    groups = [(model.dit.parameters(), 1.0), (model.vae.parameters(), args.vae_lr_ratio)]
    loss_kwargs = dict(beta=args.beta, mask_prob=args.mask_prob, lam_mask=args.lam_mask, lam_vae=args.lam_vae,
                       lam_fm=args.lam_fm, lam_ref=args.lam_ref, t_loc=args.t_loc, t_scale=args.t_scale,
                       t_uniform=args.t_uniform, partial_prob=args.partial_prob, detach_zt=args.detach_zt,
                       decode_rows=args.batch_size if args.fm_batch_mult > 1 else 0)
    clip_groups = ({"_dit": list(model.dit.parameters()), "_vae": list(model.vae.parameters())}
                   if args.grad_clip_scope == "network" else {})

    def validate(x):
        out = model(x, **loss_kwargs)
        out["recon_acc"] = model.vae.recon_accuracy(x)
        # the prior with and without its clean history on the same noise; uniform t so that every bin gets
        # samples; blocks 1.. only (block 0 has no history, so both passes agree there)
        t, cond, uncond = model.fm_eval(x, t_uniform=True)
        cond, uncond = history_blocks(cond), history_blocks(uncond)  # (B,)
        res = {k: out[k] for k in ("loss", "ce", "mask_acc", "recon_acc", "fm", "ref_kl", "logsnr")}
        res.update(fm_cond=cond.mean(), fm_uncond=uncond.mean())
        for name, err in (("c", cond), ("u", uncond)):  # per t-bin sums and counts, averaged like the rest
            sums = t_bin_sums(t, err)
            res.update({f"bin_{name}{i}": sums[0, i] for i in range(sums.shape[1])})
            res.update({f"bin_n{i}": sums[1, i] for i in range(sums.shape[1])})
        return res

    def report(val):
        bins = sorted({int(k[5:]) for k in val if k.startswith("bin_n")})
        parts = [f"{i / len(bins):.1f}:{val[f'bin_c{i}'] / val[f'bin_n{i}']:.3f}|{val[f'bin_u{i}'] / val[f'bin_n{i}']:.3f}"
                 for i in bins if val[f"bin_n{i}"] > 0]
        return ["val FM per t-bin (with history | without): " + " ".join(parts)]

    return Run("joint", model, groups, loss_kwargs, args.main_iters, path,
               dict(kind="cola", vae_config=asdict(model.vae.cfg), dit_config=asdict(model.dit.cfg),
                    stage1_flops=stage1_flops),
               model.train_flops_per_token(args.seq_len, 1 / args.fm_batch_mult, args.lam_mask), stage1_flops,
               micro_batch=args.batch_size * args.fm_batch_mult, clip_groups=clip_groups, resume_from=ckpt,
               validate=validate, report=report)


# ----------------------------------------------------------------------------------------------------
# the baselines: AR and LLaDA (docs/method.md §8)

def stage_lm(args, env, data):
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, (args.model,)) if args.resume and os.path.exists(path) else None
    cfg, target = (LMConfig(**ckpt["lm_config"]), None) if ckpt else lm_config(args, data.meta["vocab_size"])
    torch.manual_seed(args.seed)
    model = TransformerLM(cfg)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    elif env["master"]:
        print(f"[{args.model}] {n_params(model) / 1e6:.2f}M parameters ({cfg.n_layers} layers x {cfg.width}) "
              f"matched to Cola's {target / 1e6:.2f}M (VAE + DiT)", flush=True)

    def validate(x):
        return {k: v for k, v in model(x).items() if k in ("loss", "acc")}

    return Run(args.model, model, [(model.parameters(), 1.0)], {}, args.main_iters, path,
               dict(kind=args.model, lm_config=asdict(cfg)), model.train_flops_per_token(args.seq_len),
               resume_from=ckpt, validate=validate)


# ----------------------------------------------------------------------------------------------------
# the training loop every stage shares

class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the message is one line meant for the user."""


def all_reduce_mean(metrics, env):
    if env["world"] == 1:
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    t = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=env["device"]) for k in keys])
    dist.all_reduce(t)
    return {k: float(v) / env["world"] for k, v in zip(keys, t)}


def train(run, args, env, data):
    """Optimise run.model for run.max_iters steps. Returns False if --stop_after ended it early."""
    device, rank, world, master = env["device"], env["rank"], env["world"], env["master"]
    model = run.model.to(device)
    opt = make_optimizer(run.param_groups, args, device)
    step = 0
    if run.resume_from:
        opt.load_state_dict(run.resume_from["optimizer"])
        step = run.resume_from["step"]
        states = run.resume_from["rng"]
        if len(states) == world:  # every rank continues its own random stream
            set_rng_state(states[rank])
        else:
            torch.manual_seed(args.seed + rank * 1000 + step)
            if master:
                print(f"[{run.name}] warning: saved by {len(states)} processes, resumed by {world}: the random "
                      "streams are reseeded, so this run is not the exact continuation", flush=True)
        if master:
            print(f"[{run.name}] resumed at step {step}", flush=True)
    else:
        torch.manual_seed(args.seed + rank * 1000)  # different noise on every rank
    fwd = torch.compile(model) if args.compile else model
    if world > 1:
        fwd = DDP(fwd, device_ids=[torch.device(device).index] if str(device).startswith("cuda") else None)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    micro_batch = run.micro_batch or args.batch_size
    tokens_per_step = micro_batch * args.seq_len * args.grad_accum * world
    flops = lambda: run.flops_before + step * tokens_per_step * run.flops_per_token

    def save():
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master:
            save_checkpoint(run.ckpt_path, dict(**run.ckpt_fields, model=model.state_dict(), step=step,
                                                optimizer=opt.state_dict(), rng=states, args=vars(args),
                                                data_position=dict(step=step, seed=args.seed),
                                                tokenizer=data.meta["tokenizer"], train_flops=flops()))

    def validate():
        """Metrics averaged over the validation batches and ranks, with fixed noise: comparable between
        evaluations, and the training random stream is left as it was."""
        model.eval()
        saved = torch.get_rng_state()
        torch.manual_seed(args.seed + 7)
        sums = {}
        with torch.no_grad(), autocast:
            for i in range(args.eval_iters):
                x = data.batch("val", args.batch_size, batch_seed(args.seed + 1, rank * args.eval_iters + i, 0), device)
                for k, v in run.validate(x).items():
                    sums[k] = sums.get(k, 0.0) + float(v) / args.eval_iters
        torch.set_rng_state(saved)
        model.train()
        return {**all_reduce_mean(sums, env), "train_flops": flops()}

    t0, start, acc, n, steps_here = time.time(), time.time(), {}, 0, 0
    while step < run.max_iters:
        if args.stop_after and steps_here == args.stop_after:
            save()
            if master:
                print(f"[{run.name}] stopped at step {step} (--stop_after); continue with --resume", flush=True)
            return False
        lr = lr_at(step, args, run.max_iters)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        sums = {}
        for micro in range(args.grad_accum):
            x = data.batch("train", micro_batch, batch_seed(args.seed, rank * args.grad_accum + micro, step), device)
            # gradients are all-reduced on the last micro-batch only
            last = micro == args.grad_accum - 1
            with (fwd.no_sync() if world > 1 and not last else contextlib.nullcontext()), autocast:
                out = fwd(x, **run.loss_kwargs)
            (out["loss"] / args.grad_accum).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / args.grad_accum
        bad = torch.tensor(0.0 if math.isfinite(float(sums["loss"])) else 1.0, device=device)
        if world > 1:
            dist.all_reduce(bad)  # every rank stops together
        if bad > 0:  # checked before the step: the weights and the last checkpoint stay good
            raise TrainingError(f"[{run.name}] loss is {float(sums['loss'])} at step {step}; stopped, "
                                f"{run.ckpt_path} holds the last good checkpoint (try a lower --lr)")
        if args.grad_clip > 0:
            for suffix, params in (run.clip_groups or {"": list(model.parameters())}).items():
                sums["gnorm" + suffix] = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        steps_here += 1
        for k, v in sums.items():
            acc[k] = acc.get(k, 0.0) + v
        n += 1
        if step % args.log_interval == 0 or step == run.max_iters:
            m = all_reduce_mean({k: v / n for k, v in acc.items()}, env)
            dt = (time.time() - t0) / n
            if master:
                print(f"[{run.name}] step {step}/{run.max_iters} " + " ".join(f"{k} {v:.4f}" for k, v in m.items()) +
                      f" lr {lr:.2e} {dt * 1000:.0f} ms/step {tokens_per_step / dt:,.0f} tok/s", flush=True)
            t0, acc, n = time.time(), {}, 0
        if step % args.eval_interval == 0 or step == run.max_iters:
            val = validate()
            if master:
                line = {k: v for k, v in val.items() if not k.startswith("bin_")}
                print(f"[{run.name}] val step {step} " + " ".join(f"{k} {v:.4g}" for k, v in line.items()) +
                      f" | {time.time() - start:.0f} s into this run", flush=True)
                for extra in (run.report(val) if run.report else []):
                    print(f"[{run.name}] {extra}", flush=True)
                with open(os.path.join(args.out_dir, f"log_{run.name}.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, **val}) + "\n")
            save()
            t0 = time.time()
    return True


def dry_run(args, vocab_size):
    """Configs, parameters and FLOPs per optimizer step of this invocation, built on the meta device."""
    tokens = args.batch_size * args.seq_len * args.grad_accum
    with torch.device("meta"):
        if args.model == "cola":
            vcfg = vae_config(args, vocab_size)
            cola = ColaDLM(vcfg, dit_config(args, vcfg))
            return dict(model="cola", vae_config=asdict(vcfg), dit_config=asdict(cola.dit.cfg),
                        params=n_params(cola.vae) + n_params(cola.dit),
                        vae_flops_per_step=cola.vae.train_flops_per_token(args.seq_len, args.lam_mask) * tokens,
                        joint_flops_per_step=cola.train_flops_per_token(args.seq_len, 1 / args.fm_batch_mult,
                                                                        args.lam_mask) * tokens * args.fm_batch_mult)
        cfg, _ = lm_config(args, vocab_size)
        lm = TransformerLM(cfg)
        return dict(model=args.model, lm_config=asdict(cfg), params=n_params(lm),
                    flops_per_step=lm.train_flops_per_token(args.seq_len) * tokens)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    env = dict(rank=rank, world=world, device=device, master=rank == 0)
    try:
        data = TokenData(args.data_dir, args.seq_len)
        if args.dry_run:
            if env["master"]:
                print(json.dumps(dry_run(args, data.meta["vocab_size"])))
            return
        if env["master"]:
            os.makedirs(args.out_dir, exist_ok=True)
        if args.model != "cola":
            train(stage_lm(args, env, data), args, env, data)
            return
        finished = True
        if args.stage in ("vae", "all"):
            finished = train(stage_vae(args, env, data), args, env, data)
        if args.stage == "joint" or (args.stage == "all" and finished):
            train(stage_joint(args, env, data), args, env, data)
    except (DataError, CheckpointError, TrainingError) as e:
        sys.exit(f"error: {e}")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
