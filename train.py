"""
Training for every stage of Cola DLM and for the baselines, nanoGPT style: one file, argparse flags, DDP.

    python train.py --stage vae     # stage 1: Text VAE pretraining (docs/method.md §3)       -> out/vae.pt
    python train.py --stage joint   # stage 2: joint VAE + block-causal DiT, from out/vae.pt  -> out/ckpt.pt
    python train.py                 # --stage all: stage 1 then stage 2
    python train.py --model ar      # a matched baseline (ar or llada)                        -> out/ckpt.pt
    torchrun --standalone --nproc_per_node=8 train.py ...    # DDP: gloo on CPU, nccl on CUDA

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
from diffusion import ColaDLM, history_metrics, t_bin_line
from dit import DiTConfig
from layers import n_params
from prepare import DEFAULT_DATA_DIR, REPO_DIR, DataError, TokenData, batch_seed
from presets import PRESETS, RECIPE
from vae import TextVAE, VAEConfig

# ----------------------------------------------------------------------------------------------------
# arguments (the presets they start from are in presets.py)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    # what to train
    add("--model", default="cola", choices=["cola", "ar", "llada"], help="Cola DLM or a baseline")
    add("--stage", default="all", choices=["vae", "joint", "all"], help="Cola training stage")
    add("--preset", default="cpu", choices=list(PRESETS), help="model size preset")
    add("--data_dir", default=DEFAULT_DATA_DIR, help="prepared data (prepare.py)")
    add("--out_dir", default=os.path.join(REPO_DIR, "out"), help="checkpoints and logs go here")
    add("--resume", action="store_true", help="continue from the stage's checkpoint in --out_dir")
    add("--dry_run", action="store_true", help="print configs, parameters, FLOPs per step; exit")
    # the models (override the preset)
    add("--latent_dim", type=int, default=16, help="d: channels per latent")
    add("--block_size", type=int, default=16, help="latents per block (VAE and DiT attention)")
    add("--patch_size", type=int, default=1, help="tokens per latent")
    add("--vae_width", type=int, default=None, help="VAE width (default: preset)")
    add("--vae_layers", type=int, default=None, help="encoder and decoder blocks each (default: preset)")
    add("--dit_width", type=int, default=None, help="DiT width (default: preset)")
    add("--dit_layers", type=int, default=None, help="DiT blocks (default: preset)")
    add("--rope_fraction", type=float, default=None, help="share of DiT head channels RoPE rotates")
    add("--lm_width", type=int, default=None, help="baseline width (default: the preset's VAE width)")
    add("--lm_layers", type=int, default=0, help="baseline blocks (0: as many as match Cola's parameters)")
    add("--dropout", type=float, default=0.0, help="dropout in every transformer block")
    add("--fixed_logsnr", type=float, default=0.0, help=">0: fixed posterior variance at this logSNR")
    # the losses
    add("--beta", type=float, default=None, help="KL / entropy weight (paper 1e-3)")
    add("--mask_prob", type=float, default=0.15, help="fraction of tokens replaced by [MASK] in the BERT branch")
    add("--lam_mask", type=float, default=1.0, help="weight of the BERT-style masked branch (0: off)")
    add("--vae_lr_ratio", type=float, default=1.0, help="VAE lr / DiT lr in stage 2 (0 freezes the VAE)")
    add("--lam_vae", type=float, default=1.0, help="weight of the VAE terms in stage 2")
    add("--lam_fm", type=float, default=1.0, help="weight of the flow-matching loss")
    add("--lam_ref", type=float, default=1.0, help="weight of KL(q || q_ref) to the frozen stage-1 encoder")
    add("--t_loc", type=float, default=1.0, help="logit-normal location of t (paper: 1.0 at d=16)")
    add("--t_scale", type=float, default=1.0, help="logit-normal scale of t")
    add("--t_uniform", action="store_true", help="sample t uniformly instead of logit-normal")
    add("--partial_prob", type=float, default=0.05, help="per-block probability of a known clean prefix")
    add("--detach_zt", action="store_true", help="no FM gradient into the encoder (fallback if unstable)")
    add("--stats_batches", type=int, default=16, help="batches that estimate the latent shift/scale")
    # deviations from the paper's recipe (docs/method.md; README "What each deviation buys"): default preset
    add("--fm_batch_mult", type=int, default=None, help="stage 2: the prior sees this x --batch_size (paper 1)")
    add("--grad_clip_scope", choices=["global", "network"], help="stage 2: clip VAE+DiT together (paper) or apart")
    add("--decoder_noise", type=float, default=None, help="decoder reads latents noised to t<this (paper 0)")
    add("--lam_x0_ce", type=float, default=None, help="stage 2: decoder CE on the DiT's z0 estimate (paper 0)")
    add("--lam_token_aux", type=float, default=None, help="stage 2: DiT hidden states predict tokens (paper 0)")
    add("--embed_lr_mult", type=float, default=None, help="lr multiplier of embeddings and output heads (paper 1)")
    add("--dit_init", default="adaln_zero", choices=["adaln_zero", "xavier"], help="DiT init (release: xavier)")
    add("--self_cond", action="store_true", help="stage 2: the DiT also reads its own estimate of z0 (paper: off)")
    # optimisation
    add("--seq_len", type=int, default=64, help="tokens per training sequence")
    add("--batch_size", type=int, default=16, help="sequences per micro-batch per process")
    add("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    # the main command's budget (9.85e13 FLOPs at the cpu preset), split 150 + 367: a short stage 1 leaves
    # the prior more steps, which bought the most of any change at this budget (README, ablation s1short)
    add("--vae_iters", type=int, default=150, help="optimizer steps of stage 1")
    add("--main_iters", type=int, default=367, help="optimizer steps of stage 2 (or of a baseline)")
    add("--lr", type=float, default=None, help="peak learning rate (default: preset; paper 1.5e-4)")
    add("--min_lr", type=float, default=None, help="final learning rate of the cosine (default: preset)")
    add("--warmup_iters", type=int, default=None, help="linear warm-up steps (default: preset)")
    add("--beta2", type=float, default=None, help="AdamW beta2 (default: preset; paper 0.95)")
    add("--weight_decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    add("--grad_clip", type=float, default=1.0, help="grad-norm clip (0: off)")
    # running
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile (cold: ~30 s)")
    add("--seed", type=int, default=1337, help="random seed")
    add("--log_interval", type=int, default=25, help="steps between log lines")
    add("--eval_interval", type=int, default=150, help="steps between validations and checkpoints")
    add("--eval_iters", type=int, default=8, help="validation batches per evaluation")
    add("--stop_after", type=int, default=0, help="checkpoint and exit after this many steps (0: off)")
    args = p.parse_args(argv)
    for k, v in {**RECIPE, **PRESETS[args.preset].get("recipe", {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    errs = [f"--{n} must be >= 1" for n in ("batch_size", "grad_accum", "latent_dim", "block_size", "patch_size",
                                            "seq_len", "fm_batch_mult") if getattr(args, n) < 1]
    if args.seq_len % (args.block_size * args.patch_size):
        errs.append(f"--seq_len {args.seq_len} must be a multiple of block_size*patch_size = "
                    f"{args.block_size * args.patch_size}")
    if not 0 <= args.mask_prob <= 1:
        errs.append("--mask_prob must be in [0, 1]")
    if errs:
        p.error("; ".join(errs))
    return args


def vae_config(args, vocab_size):
    """The preset's VAE with the flags' overrides."""
    over = dict(width=args.vae_width, n_enc_layers=args.vae_layers, n_dec_layers=args.vae_layers)
    return VAEConfig(**{**PRESETS[args.preset]["vae"], **{k: v for k, v in over.items() if v},
                        "vocab_size": vocab_size, "latent_dim": args.latent_dim, "block_size": args.block_size,
                        "patch_size": args.patch_size, "dropout": args.dropout, "fixed_logsnr": args.fixed_logsnr,
                        "max_seq_len": max(args.seq_len, 1024)})


def dit_config(args, vae_cfg):
    """The preset's DiT with the flags' overrides, on the VAE's latents and blocks."""
    over = dict(width=args.dit_width, n_layers=args.dit_layers, rope_fraction=args.rope_fraction,
                adaln_zero=args.dit_init == "adaln_zero",
                token_head_dim=vae_cfg.width * vae_cfg.patch_size if args.lam_token_aux > 0 else 0,
                self_cond=args.self_cond)
    return DiTConfig(**{**PRESETS[args.preset]["dit"], **{k: v for k, v in over.items() if v is not None},
                        "latent_dim": vae_cfg.latent_dim, "block_size": vae_cfg.block_size, "dropout": args.dropout})


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
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
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
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay,
                    "lr_scale": lr_scale}, {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0,
                                            "lr_scale": lr_scale}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=str(device).startswith("cuda"))


def vocab_lr_groups(module, scale, vocab_mult):
    """[(params, lr scale)]: embeddings and output heads get vocab_mult x (a rare token's rows learn rarely)."""
    vocab = [m.weight for name, m in module.named_modules() if isinstance(m, torch.nn.Embedding) or name[-4:] == "head"]
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
    loss_kwargs = {k: getattr(args, k) for k in ("beta", "mask_prob", "lam_mask", "decoder_noise")}

    def validate(x):
        out = model(x, **loss_kwargs)
        out["recon_acc"] = model.recon_accuracy(x)
        return {k: out[k] for k in ("loss", "ce", "kl", "mask_acc", "recon_acc", "logsnr")}

    return Run("vae", model, vocab_lr_groups(model, 1.0, args.embed_lr_mult), loss_kwargs, args.vae_iters, path,
               dict(kind="vae", vae_config=asdict(cfg)), model.train_flops_per_token(args.seq_len, args.lam_mask),
               resume_from=ckpt, validate=validate)


# ----------------------------------------------------------------------------------------------------
# stage 2: the VAE and the block-causal DiT prior, jointly (docs/method.md §4, §5)

JOINT_LOSS_ARGS = ("beta", "mask_prob", "lam_mask", "lam_vae", "lam_fm", "lam_ref", "t_loc", "t_scale", "t_uniform",
                   "partial_prob", "detach_zt", "decoder_noise", "lam_x0_ce", "lam_token_aux")  # ColaDLM.forward's

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
        model = ColaDLM(vae_cfg, dit_config(args, vae_cfg)).to(env["device"])
        model.init_from_stage1(vae_ckpt["model"], [data.batch("train", args.batch_size, batch_seed(args.seed + 2, i, 0),
                                                              env["device"]) for i in range(args.stats_batches)])
        stage1_flops = vae_ckpt["train_flops"]
    if env["master"]:
        print(f"[joint] VAE {n_params(model.vae) / 1e6:.2f}M + DiT {n_params(model.dit) / 1e6:.2f}M parameters; DiT "
              f"config {asdict(model.dit.cfg)}; latent scale {[round(v, 2) for v in model.latent_scale.tolist()]}")
    frozen = args.vae_lr_ratio == 0 and args.lam_vae == 0 and args.lam_ref == 0  # no VAE work at all
    if args.vae_lr_ratio == 0:
        model.vae.requires_grad_(False)  # Joint x0: the VAE stays at stage 1
    # the VAE trains at exactly the DiT's lr times --vae_lr_ratio (the paper's "Joint x1"); stage 1's
    # vocabulary-matrix multiplier is not applied: it lets the latents drift from q_ref
    groups = [(model.dit.parameters(), 1.0), (model.vae.parameters(), args.vae_lr_ratio)]
    loss_kwargs = {k: getattr(args, k) for k in JOINT_LOSS_ARGS}
    loss_kwargs["decode_rows"] = args.batch_size if args.fm_batch_mult > 1 else 0
    clip_groups = ({"_dit": list(model.dit.parameters()), "_vae": list(model.vae.parameters())}
                   if args.grad_clip_scope == "network" else {})

    def validate(x):
        out = model(x, **loss_kwargs)
        out["recon_acc"] = model.vae.recon_accuracy(x)
        res = {k: out[k] for k in ("loss", "ce", "mask_acc", "recon_acc", "fm", "ref_kl", "logsnr")}
        # the prior with and without its clean history on the same noise, uniform t (every bin gets samples)
        return {**res, **history_metrics(*model.fm_eval(x, t_uniform=True))}

    report = lambda val: ["val FM per t-bin (with history | without): " + t_bin_line(val)]

    return Run("joint", model, groups, loss_kwargs, args.main_iters, path,
               dict(kind="cola", vae_config=asdict(model.vae.cfg), dit_config=asdict(model.dit.cfg),
                    stage1_flops=stage1_flops),
               model.train_flops_per_token(args.seq_len, 1 / args.fm_batch_mult, args.lam_mask, args.lam_x0_ce > 0,
                                           args.lam_token_aux > 0, frozen), stage1_flops,
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


def clip_gradients(groups, max_norm):
    """Clip each group {log suffix: params} to max_norm on its own -> {'gnorm<suffix>': norm before clipping}."""
    return {"gnorm" + k: torch.nn.utils.clip_grad_norm_(params, max_norm) for k, params in groups.items()}


def all_reduce_mean(metrics, env):
    keys = sorted(metrics)
    t = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=env["device"]) for k in keys])
    if env["world"] > 1:
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
        states = run.resume_from["rng"]  # every rank continues its own random stream
        set_rng_state(states[rank]) if len(states) == world else torch.manual_seed(args.seed + rank * 1000 + step)
        if master:
            print(f"[{run.name}] resumed at step {step}" + ("" if len(states) == world else
                  f"; warning: saved by {len(states)} processes, so the random streams are reseeded"), flush=True)
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
        states = [rng_state()] * world
        if world > 1:  # every rank's random state, so that a resume continues every stream
            dist.all_gather_object(states, rng_state())
        if master:
            save_checkpoint(run.ckpt_path, dict(**run.ckpt_fields, model=model.state_dict(), step=step,
                                                optimizer=opt.state_dict(), rng=states, args=vars(args),
                                                data_position=dict(step=step, seed=args.seed),
                                                tokenizer=data.meta["tokenizer"], train_flops=flops()))
        if world > 1:
            dist.barrier()  # the next stage reads this file on every rank

    def validate():
        """Metrics averaged over the validation batches and ranks, with fixed noise: comparable between
        evaluations, and the training random stream is left as it was."""
        model.eval()
        sums, rng_devices = {}, [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), autocast:
            torch.manual_seed(args.seed + 7)
            for i in range(args.eval_iters):
                x = data.batch("val", args.batch_size, batch_seed(args.seed + 1, rank * args.eval_iters + i, 0), device)
                for k, v in run.validate(x).items():
                    sums[k] = sums.get(k, 0.0) + float(v) / args.eval_iters
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
            last = micro == args.grad_accum - 1  # gradients are all-reduced on the last micro-batch only
            with (fwd.no_sync() if world > 1 and not last else contextlib.nullcontext()), autocast:
                out = fwd(x, **run.loss_kwargs)
            (out["loss"] / args.grad_accum).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / args.grad_accum
        # a NaN or Inf loss stops every rank before the step: the weights and the last checkpoint stay good
        if not math.isfinite(all_reduce_mean({"loss": sums["loss"]}, env)["loss"]):
            raise TrainingError(f"[{run.name}] loss is {float(sums['loss'])} at step {step}; stopped, "
                                f"{run.ckpt_path} holds the last good checkpoint (try a lower --lr)")
        if args.grad_clip > 0:
            sums.update(clip_gradients(run.clip_groups or {"": list(model.parameters())}, args.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, steps_here, n = step + 1, steps_here + 1, n + 1
        acc = {k: acc.get(k, 0.0) + v for k, v in sums.items()}
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
    tokens, L = args.batch_size * args.seq_len * args.grad_accum, args.seq_len
    with torch.device("meta"):
        if args.model != "cola":
            lm = TransformerLM(lm_config(args, vocab_size)[0])
            return dict(model=args.model, lm_config=asdict(lm.cfg), params=n_params(lm),
                        flops_per_step=lm.train_flops_per_token(L) * tokens)
        vcfg = vae_config(args, vocab_size)
        cola = ColaDLM(vcfg, dit_config(args, vcfg))
    return dict(model="cola", vae_iters=args.vae_iters, main_iters=args.main_iters,
                vae_config=asdict(vcfg), dit_config=asdict(cola.dit.cfg), params=n_params(cola.vae) +
                n_params(cola.dit), vae_flops_per_step=cola.vae.train_flops_per_token(L, args.lam_mask) * tokens,
                joint_flops_per_step=cola.train_flops_per_token(
                    L, 1 / args.fm_batch_mult, args.lam_mask, args.lam_x0_ce > 0, args.lam_token_aux > 0,
                    args.vae_lr_ratio == 0 and args.lam_vae == 0 and args.lam_ref == 0)
                * tokens * args.fm_batch_mult)


def run_stages(args, env):
    """Train what the flags ask for: a baseline, or Cola's stage 1 and/or stage 2. Returns the last Run."""
    if args.dry_run:  # the data's vocabulary if it is prepared, else GPT-2's
        meta = os.path.join(args.data_dir, "meta.json")
        vocab = json.load(open(meta))["vocab_size"] if os.path.exists(meta) else 50257
        if env["master"]:
            print(json.dumps(dry_run(args, vocab)))
        return None
    data = TokenData(args.data_dir, args.seq_len)
    if env["master"]:
        os.makedirs(args.out_dir, exist_ok=True)
    if args.model != "cola":
        runs = [stage_lm]
    else:
        runs = ([stage_vae] if args.stage in ("vae", "all") else []) + ([stage_joint] if args.stage != "vae" else [])
    for make in runs:
        run = make(args, env, data)
        if not train(run, args, env, data):  # --stop_after ended it: the next stage waits for --resume
            break
    return run


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        run_stages(args, dict(rank=rank, world=world, device=device, master=rank == 0))
    except (DataError, CheckpointError, TrainingError) as e:
        sys.exit(f"error: {e}")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
