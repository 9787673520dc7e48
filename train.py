"""
Training for every stage of Cola DLM and for the baselines, nanoGPT style: one file, argparse flags, DDP.
    python train.py --stage vae     # stage 1: Text VAE pretraining (docs/method.md §3)       -> out/vae.pt
    python train.py --stage joint   # stage 2: joint VAE + block-causal DiT, from out/vae.pt  -> out/ckpt.pt
    python train.py                 # --stage all: stage 1 then stage 2
    python train.py --model ar      # a matched baseline (ar or llada)                        -> out/ckpt.pt
    python train.py --resume        # continue the run in --out_dir exactly as it was configured
    torchrun --standalone --nproc_per_node=8 train.py ...    # DDP: gloo on CPU, nccl on CUDA
Top to bottom: the flags (the paper's values; presets override some), stage 1, stage 2, the baselines, the loop.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from baselines import TransformerLM, lm_generate, matched_lm_config
from checkpoint import (CheckpointError, TrainingError, build, checkpoint_for, claim_out_dir, halted, model_from,
                        resumable, resume_training, save_training_state)
from cli import (Parser, all_reduce_mean, autocast, cleanup_distributed, fail, float_in, int_at_least,
                 keep_freed_memory, nonneg_float, one_rank, positive_float, positive_int, setup_distributed, unit_float)
from decoder import GenerationError, SamplerConfig, generate
from diffusion import ColaDLM, LossConfig
from dit import DiTConfig
from flops import dry_run, joint_train_flops, lm_train_flops, vae_frozen, vae_train_flops
from layers import n_params
from tokendata import DEFAULT_DATA_DIR, TokenData, batch_seed
from tokenizer import REPO_DIR, DataError, get_tokenizer
from vae import TextVAE, VAEConfig

# the flags: defaults are the paper's (docs/method.md §3-§5), a preset overrides some of them
PRESETS = {
    "paper": {},  # the released model's sizes; its vocabulary (100,278) comes from the data
    "tiny": dict(vae_width=64, vae_layers=1, vae_heads=2, vae_mlp=128, dit_width=64, dit_layers=2, dit_heads=2,
                 dit_mlp=256, lr=3e-3, min_lr=3e-4, warmup_iters=50),
    # the laptop default; what each change to the paper's recipe buys is measured in docs/results.md
    "cpu": dict(vae_width=128, vae_layers=2, vae_heads=4, vae_mlp=384, dit_width=192, dit_layers=4, dit_heads=4,
                dit_mlp=768, beta=1e-4, beta2=0.999, embed_lr_mult=10.0, lr=3e-3, min_lr=3e-4, warmup_iters=50,
                fm_batch_mult=4, grad_clip_scope="network", noise_scale=0.5),
}


def get_args(argv=None):
    """The flags, each checked as it is read (a bad value is one line); args.given: those the command line gave."""
    p = Parser(description=__doc__)
    add = p.add_argument
    # what to train
    add("--model", default="cola", choices=["cola", "ar", "llada"], help="Cola DLM or a baseline")
    add("--stage", default="all", choices=["vae", "joint", "all"], help="Cola training stage")
    add("--preset", default="cpu", choices=list(PRESETS), help="size and recipe preset (overrides these defaults)")
    add("--dry_run", action="store_true", help="print configs, parameters, FLOPs per step; exit")
    add("--resume", action="store_true", help="continue the run in --out_dir with its own flags")
    add("--overwrite", action="store_true", help="start afresh even where --out_dir holds a checkpoint")
    add("--data_dir", default=DEFAULT_DATA_DIR, help="prepared data (prepare.py)")
    add("--out_dir", default=os.path.join(REPO_DIR, "out"), help="checkpoints and logs go here")
    # the models (paper sizes; docs/release.md)
    add("--latent_dim", type=positive_int, default=16, help="d: channels per latent")
    add("--block_size", type=positive_int, default=16, help="latents per block (VAE and DiT attention)")
    add("--patch_size", type=positive_int, default=1, help="tokens per latent")
    add("--vae_width", type=positive_int, default=1536, help="VAE width")
    add("--vae_layers", type=positive_int, default=4, help="encoder and decoder blocks each")
    add("--vae_heads", type=positive_int, default=12, help="VAE attention heads")
    add("--vae_mlp", type=positive_int, default=3072, help="VAE SwiGLU hidden size")
    add("--dit_width", type=positive_int, default=2048, help="DiT width")
    add("--dit_layers", type=positive_int, default=24, help="DiT blocks")
    add("--dit_heads", type=positive_int, default=16, help="DiT attention heads")
    add("--dit_mlp", type=positive_int, default=8192, help="DiT MLP hidden size")
    add("--rope_fraction", type=unit_float, default=0.75, help="share of DiT head channels RoPE rotates")
    add("--dit_init", default="adaln_zero", choices=["adaln_zero", "xavier"], help="DiT init (release: xavier)")
    add("--lm_width", type=positive_int, default=None, help="baseline width (default: the VAE width)")
    add("--lm_layers", type=int_at_least(0), default=0, help="baseline blocks (0: as many as match Cola's parameters)")
    add("--dropout", type=float_in(0.0, 1.0, high_open=True), default=0.0, help="dropout in every transformer block")
    add("--fixed_logsnr", type=nonneg_float, default=0.0, help=">0: fixed posterior variance at this logSNR")
    # the losses (diffusion.LossConfig)
    add("--beta", type=nonneg_float, default=1e-3, help="KL / entropy weight")
    add("--mask_prob", type=unit_float, default=0.15, help="fraction of tokens replaced by [MASK] in the BERT branch")
    add("--lam_mask", type=nonneg_float, default=1.0, help="weight of the BERT-style masked branch (0: off)")
    add("--vae_lr_ratio", type=nonneg_float, default=1.0, help="VAE lr / DiT lr in stage 2 (0 freezes the VAE)")
    add("--lam_vae", type=nonneg_float, default=1.0, help="weight of the VAE terms in stage 2")
    add("--lam_fm", type=nonneg_float, default=1.0, help="weight of the flow-matching loss")
    add("--lam_ref", type=nonneg_float, default=1.0, help="weight of KL(q || q_ref) to the frozen stage-1 encoder")
    add("--t_loc", type=float_in(), default=1.0, help="logit-normal location of t (paper: 1.0 at d=16)")
    add("--t_scale", type=positive_float, default=1.0, help="logit-normal scale of t")
    add("--t_uniform", action="store_true", help="sample t uniformly instead of logit-normal")
    add("--partial_prob", type=unit_float, default=0.05, help="per-block probability of a known clean prefix")
    add("--stats_batches", type=positive_int, default=16, help="batches that estimate the latent shift/scale")
    add("--seq_len", type=positive_int, default=64, help="tokens per training sequence")
    add("--batch_size", type=positive_int, default=16, help="sequences per micro-batch per process")
    add("--grad_accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    # the main command's budget (9.9e13 FLOPs at the cpu preset): a short stage 1 leaves the prior more steps
    add("--vae_iters", type=positive_int, default=150, help="optimizer steps of stage 1")
    add("--main_iters", type=positive_int, default=367, help="optimizer steps of stage 2 (or of a baseline)")
    add("--lr", type=positive_float, default=1.5e-4, help="peak learning rate (AdamW, linear warm-up, cosine decay)")
    add("--min_lr", type=nonneg_float, default=1e-5, help="final learning rate of the cosine")
    add("--warmup_iters", type=int_at_least(0), default=5000, help="linear warm-up steps")
    add("--beta2", type=float_in(0.0, 1.0, high_open=True), default=0.95, help="AdamW beta2")
    add("--weight_decay", type=nonneg_float, default=0.01, help="AdamW weight decay (matrices only)")
    add("--grad_clip", type=nonneg_float, default=1.0, help="grad-norm clip (0: off)")
    # changes to the paper's recipe for few tokens (docs/results.md): the cpu preset turns them on
    add("--embed_lr_mult", type=positive_float, default=1.0, help="lr multiplier of embeddings and output heads")
    add("--fm_batch_mult", type=positive_int, default=1, help="stage 2: the prior sees this x --batch_size")
    add("--grad_clip_scope", default="global", choices=["global", "network"], help="stage 2: clip the networks apart")
    add("--noise_scale", type=positive_float, default=1.0, help="the stored sampler's start noise")
    add("--t_rise", type=nonneg_float, default=0.0, help="stage 2 and its sampler: t rises by this along a block")
    # running
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile (cold: ~30 s)")
    add("--seed", type=int_at_least(0, 2**32 - 1), default=1337, help="random seed")
    add("--log_interval", type=positive_int, default=25, help="steps between log lines")
    add("--eval_interval", type=positive_int, default=150, help="steps between validations and checkpoints")
    add("--eval_iters", type=positive_int, default=8, help="validation batches per evaluation")
    add("--eval_sample", type=int_at_least(0), default=32, help="tokens sampled after each validation (0: none)")
    add("--stop_after", type=int_at_least(0), default=0, help="checkpoint and exit after this many steps (0: off)")
    args = p.parse_with_presets(argv, PRESETS)
    args.data_dir, args.out_dir = os.path.abspath(args.data_dir), os.path.abspath(args.out_dir)  # valid from any folder
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other")
    return args


def check_args(args):
    """Checks across flags (after a resume has restored the run's own)."""
    tokens_per_block = args.block_size * args.patch_size
    if args.seq_len % tokens_per_block:
        fail(f"--seq_len {args.seq_len} must be a multiple of block_size * patch_size = {tokens_per_block}")
    if args.min_lr > args.lr:
        fail(f"--min_lr {args.min_lr:g} is above --lr {args.lr:g}")


def vae_config(args, vocab_size):
    return VAEConfig(vocab_size=vocab_size, latent_dim=args.latent_dim, width=args.vae_width,
                     n_enc_layers=args.vae_layers, n_dec_layers=args.vae_layers, n_heads=args.vae_heads,
                     mlp_hidden=args.vae_mlp, block_size=args.block_size, patch_size=args.patch_size,
                     max_seq_len=max(args.seq_len, 1024), dropout=args.dropout, fixed_logsnr=args.fixed_logsnr)


def dit_config(args, vae_cfg):
    return DiTConfig(latent_dim=vae_cfg.latent_dim, width=args.dit_width, n_layers=args.dit_layers,
                     n_heads=args.dit_heads, mlp_hidden=args.dit_mlp, block_size=vae_cfg.block_size,
                     rope_fraction=args.rope_fraction, dropout=args.dropout, adaln_zero=args.dit_init == "adaln_zero")


def lm_config(args, vocab_size):
    """A baseline at the VAE's width, its depth matched to the Cola model's parameter count."""
    vcfg = vae_config(args, vocab_size)
    with torch.device("meta"):
        cola = ColaDLM(vcfg, dit_config(args, vcfg), reference=False)
    target = n_params(cola.vae) + n_params(cola.dit)
    width = args.lm_width or vcfg.width
    return matched_lm_config(args.model, target, vocab_size, width, vcfg.n_heads, vcfg.mlp_hidden * width // vcfg.width,
                             vcfg.max_seq_len, args.dropout, args.lm_layers), target


# what a stage hands the training loop
@dataclass
class Run:
    name: str                      # log prefix and log file: vae, joint, ar, llada
    model: torch.nn.Module         # the raw model; its forward(tokens, *loss_args) returns {'loss', ...}
    param_groups: list             # [(params, lr scale)]
    loss_args: tuple               # forward's arguments after the tokens
    max_iters: int
    ckpt_path: str
    ckpt_fields: dict              # kind, configs and anything else the checkpoint must hold
    flops_per_token: float         # training FLOPs per token of data (flops.py)
    flops_before: float = 0.0      # FLOPs of earlier stages (stage 1 for stage 2)
    fm_batch_mult: int = 1         # stage 2: micro-batches of fm_batch_mult x --batch_size sequences
    clip_groups: dict = field(default_factory=dict)  # {log suffix: params} clipped separately; empty: one norm
    resume_from: dict = None       # the checkpoint to continue
    validate: object = None        # validate(x) -> {metric: value} on one validation batch (no grad)
    sample: object = None          # sample(prompt ids, n, generator) -> n new token ids (a learner watches it learn)


def vocab_lr_groups(module, scale, vocab_mult):
    """[(params, lr scale)]: embeddings and output heads get vocab_mult x (a rare token's rows learn rarely)."""
    vocab = [m.weight for name, m in module.named_modules() if isinstance(m, torch.nn.Embedding) or name[-4:] == "head"]
    ids = {id(p) for p in vocab}
    return [([p for p in module.parameters() if id(p) not in ids], scale), (vocab, scale * vocab_mult)]


# stage 1: the Text VAE (docs/method.md §3)
def stage_vae(args, env, data):
    path = os.path.join(args.out_dir, "vae.pt")
    ckpt = resumable(path, "vae", args, data)  # with --resume: the checkpoint, of the data's tokenizer; else None
    torch.manual_seed(args.seed)  # the same init on every rank
    model = model_from(ckpt) if ckpt else TextVAE(vae_config(args, data.meta["vocab_size"]))
    if env["master"]:
        print(f"[vae] {n_params(model) / 1e6:.2f}M parameters, config {asdict(model.cfg)}", flush=True)
    loss_args = (args.beta, args.mask_prob, args.lam_mask)

    def validate(x):
        out = {**model(x, *loss_args), "recon_acc": model.recon_accuracy(x)}
        return {k: out[k] for k in ("loss", "ce", "kl", "mask_acc", "recon_acc", "logsnr")}

    return Run("vae", model, vocab_lr_groups(model, 1.0, args.embed_lr_mult), loss_args, args.vae_iters, path,
               dict(kind="vae", vae_config=asdict(model.cfg)), vae_train_flops(model, args.seq_len, args.lam_mask),
               resume_from=ckpt, validate=validate)


# stage 2: the VAE and the block-causal DiT prior, jointly (docs/method.md §4, §5)
def stage_joint(args, env, data):
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = resumable(path, "cola", args, data)
    vae_ckpt = ckpt or checkpoint_for(os.path.join(args.out_dir, "vae.pt"), "vae", data)  # checksummed, same tokenizer
    torch.manual_seed(args.seed)  # the same DiT init on every rank
    if ckpt:
        model = model_from(ckpt)
    else:  # the stage-1 VAE, the normalisation of its latents over --stats_batches batches, a fresh DiT
        vae_cfg = build(VAEConfig, vae_ckpt["vae_config"], vae_ckpt)
        model = ColaDLM(vae_cfg, dit_config(args, vae_cfg)).to(env["device"])
        model.init_from_stage1(vae_ckpt["model"], [data.batch("train", args.batch_size, batch_seed(args.seed + 2, i, 0),
                                                              env["device"]) for i in range(args.stats_batches)])
    stage1_flops = vae_ckpt["stage1_flops"] if ckpt else vae_ckpt["train_flops"]
    if env["master"]:
        print(f"[joint] VAE {n_params(model.vae) / 1e6:.2f}M + DiT {n_params(model.dit) / 1e6:.2f}M parameters; DiT "
              f"config {asdict(model.dit.cfg)}; latent scale {[round(v, 2) for v in model.latent_scale.tolist()]}")
    if args.vae_lr_ratio == 0:
        model.vae.requires_grad_(False)  # Joint x0: the VAE stays at stage 1
    # the VAE trains at exactly the DiT's lr times --vae_lr_ratio (the paper's "Joint x1")
    groups = [(model.dit.parameters(), 1.0), (model.vae.parameters(), args.vae_lr_ratio)]
    loss = LossConfig(**{f.name: getattr(args, f.name) for f in fields(LossConfig) if hasattr(args, f.name)})
    clip_groups = ({"_dit": list(model.dit.parameters()), "_vae": list(model.vae.parameters())}
                   if args.grad_clip_scope == "network" else {})

    def validate(x):  # the decoder terms over the whole validation batch
        out = {**model(x, replace(loss, fm_batch_mult=1)), "recon_acc": model.vae.recon_accuracy(x)}
        return {k: out[k] for k in ("loss", "ce", "mask_acc", "recon_acc", "fm", "ref_kl", "logsnr")}

    eot = data.meta["eot_id"]  # ends a row and pads a prompt's partial block
    sampler = SamplerConfig(noise_scale=args.noise_scale, t_rise=args.t_rise, stop_ids=(eot,), pad_id=eot)
    sample = lambda prompt, n, g: generate(model, [prompt], n, sampler, g)[0][0]
    return Run("joint", model, groups, (loss,), args.main_iters, path,
               dict(kind="cola", vae_config=asdict(model.vae.cfg), dit_config=asdict(model.dit.cfg),
                    stage1_flops=stage1_flops, sampler=asdict(sampler)),
               joint_train_flops(model, args.seq_len, args.fm_batch_mult, args.lam_mask, vae_frozen(args)),
               stage1_flops, fm_batch_mult=args.fm_batch_mult, clip_groups=clip_groups,
               resume_from=ckpt, validate=validate, sample=sample)


# the baselines: AR and LLaDA (docs/method.md §8)
def stage_lm(args, env, data):
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = resumable(path, args.model, args, data)
    cfg, target = (None, None) if ckpt else lm_config(args, data.meta["vocab_size"])
    torch.manual_seed(args.seed)
    model = model_from(ckpt) if ckpt else TransformerLM(cfg)
    cfg = model.cfg
    if not ckpt and env["master"]:
        print(f"[{args.model}] {n_params(model) / 1e6:.2f}M parameters ({cfg.n_layers} layers x {cfg.width}) "
              f"matched to Cola's {target / 1e6:.2f}M (VAE + DiT)", flush=True)
    validate = lambda x: {k: v for k, v in model(x).items() if k in ("loss", "acc")}
    sampler = SamplerConfig(stop_ids=(data.meta["eot_id"],))
    sample = lambda prompt, n, g: lm_generate(args.model, model, [prompt], n, sampler, g)[0][0]
    return Run(args.model, model, [(model.parameters(), 1.0)], (), args.main_iters, path,
               dict(kind=args.model, lm_config=asdict(cfg)), lm_train_flops(model, args.seq_len),
               resume_from=ckpt, validate=validate, sample=sample)


# the training loop every stage shares
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


def clip_gradients(groups, max_norm):
    """Clip each group {log suffix: params} to max_norm on its own -> {'gnorm<suffix>': norm before clipping}."""
    return {"gnorm" + k: torch.nn.utils.clip_grad_norm_(params, max_norm) for k, params in groups.items()}


def train(run, args, env, data):
    """Optimise run.model for run.max_iters steps. Returns False if --stop_after ended it early."""
    device, rank, world, master = env["device"], env["rank"], env["world"], env["master"]
    model = run.model.to(device).train()  # dropout on from the first step; ColaDLM keeps its reference in eval
    opt = make_optimizer(run.param_groups, args, device)
    log_path = os.path.join(args.out_dir, f"log_{run.name}.jsonl")
    # a resumed run continues its optimizer and every rank's random stream; a fresh one seeds each rank apart
    step = resume_training(run.resume_from, opt, log_path, args.seed, env) if run.resume_from else 0
    if not run.resume_from:
        torch.manual_seed(args.seed + rank * 1000)  # different noise on every rank
    fwd = torch.compile(model) if args.compile else model
    if world > 1:
        fwd = DDP(fwd, device_ids=[torch.device(device).index] if str(device).startswith("cuda") else None)
    amp = autocast(device, args.dtype)
    micro_batch = args.batch_size * run.fm_batch_mult
    tokens_per_step = micro_batch * args.seq_len * args.grad_accum * world
    flops = lambda: run.flops_before + step * tokens_per_step * run.flops_per_token
    halt = lambda what: halted(run.name, run.ckpt_path, what)
    enc = get_tokenizer(data.meta["tokenizer"])

    # atomic (temp file + rename; a Ctrl-C waits for it), checksummed, with every rank's random stream; weights
    # that are not finite stop the run instead (the last good checkpoint stays)
    save = lambda: save_training_state(run.ckpt_path, dict(
        **run.ckpt_fields, model=model.state_dict(), step=step, optimizer=opt.state_dict(), args=vars(args),
        tokenizer=data.meta["tokenizer"], data_sha256=data.meta.get("source_sha256"), train_flops=flops()),
        world, master, run.name)

    rng_devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []

    @contextlib.contextmanager
    def evaluating():
        """Eval mode, no gradients, a forked random stream: the training stream is left as it was."""
        model.eval()
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), amp:
            yield
        model.train()

    def validate():
        """Metrics over the validation batches and ranks, with fixed noise."""
        sums = {}
        with evaluating():
            torch.manual_seed(args.seed + 7)
            for i in range(args.eval_iters):
                x = data.batch("val", args.batch_size, batch_seed(args.seed + 1, rank * args.eval_iters + i, 0), device)
                for k, v in run.validate(x).items():
                    sums[k] = sums.get(k, 0.0) + float(v) / args.eval_iters
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
            with (fwd.no_sync() if world > 1 and not last else contextlib.nullcontext()), amp:
                out = fwd(x, *run.loss_args)
            (out["loss"] / args.grad_accum).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / args.grad_accum
        # a NaN or Inf loss stops every rank before the step: the weights and the last checkpoint stay good
        if not math.isfinite(all_reduce_mean({"loss": sums["loss"]}, env)["loss"]):
            raise halt(f"loss is {float(sums['loss'])} at step {step}; stopped")
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
            if not math.isfinite(val["loss"]):
                raise halt(f"validation loss is {val['loss']} at step {step}; not saved")
            if master:
                print(f"[{run.name}] val step {step} " + " ".join(f"{k} {v:.4g}" for k, v in val.items()) +
                      f" | {time.time() - start:.0f} s into this run", flush=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **val}) + "\n")
            save()
            if master and run.sample and args.eval_sample:  # a learner watches the model learn, from "\n"
                with evaluating(), contextlib.suppress(GenerationError):
                    g = torch.Generator(device).manual_seed(args.seed)
                    new = run.sample(enc.encode_ordinary("\n"), args.eval_sample, g)
                    print(f"[{run.name}] sample: {enc.decode(new)!r}", flush=True)
            t0 = time.time()
    return True


# the stages a command asks for
def run_stages(args, env):
    """Train what the flags ask for: a baseline, or Cola's stage 1 and/or stage 2."""
    data = TokenData(args.data_dir, args.seq_len)
    os.makedirs(args.out_dir, exist_ok=True)
    runs = ([stage_lm] if args.model != "cola" else
            ([stage_vae] if args.stage in ("vae", "all") else []) + ([stage_joint] if args.stage != "vae" else []))
    for make in runs:
        run = make(args, env, data)
        if not train(run, args, env, data):  # --stop_after: the next stage waits for --resume
            break
    return run


def main(argv=None):
    args = get_args(argv)
    try:
        if args.dry_run:
            check_args(args)
            return print(json.dumps(dry_run(args, vae_config, dit_config, lm_config)))
        rank, world, device = setup_distributed(args.device)
        env = dict(rank=rank, world=world, device=device, master=rank == 0)
        keep_freed_memory()
        # the master locks the folder (a second run stops), refuses to replace a checkpoint without --resume or
        # --overwrite, restores a resumed run's flags (refusing contradicting ones), and tells every rank
        with claim_out_dir(args, world, env["master"], check_args) as args:
            run_stages(args, env)
    except (DataError, CheckpointError, TrainingError) as e:
        sys.exit(one_rank(f"error: {e}"))  # under torchrun: rank 0's line only
    except KeyboardInterrupt:
        sys.exit(one_rank("error: interrupted; the last checkpoint is kept (continue with --resume)"))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
