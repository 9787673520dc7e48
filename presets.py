"""
Train.py's flags, the size presets and the recipe they start from (as nanoGPT's config/ files), and the one
place where model configs are built from them: train.py, bench.py and scaling.py all call vae_config,
dit_config, lm_config and dry_run here. A flag left unset takes the preset's value, then the paper's recipe;
what each deviation from the paper's recipe buys is measured in docs/results.md.
"""
import argparse
import os
from dataclasses import asdict

import torch

from baselines import TransformerLM, matched_lm_config
from cli import Parser, float_in, int_at_least, nonneg_float, positive_float, positive_int, unit_float
from diffusion import ColaDLM
from dit import DiTConfig
from layers import n_params
from prepare import DEFAULT_DATA_DIR, REPO_DIR
from vae import VAEConfig

# The paper's recipe (docs/method.md §5); a preset may override it where its scale calls for it.
RECIPE = dict(beta=1e-3, beta2=0.95, embed_lr_mult=1.0, lr=1.5e-4, min_lr=1e-5, warmup_iters=5000,
              grad_clip_scope="global", fm_batch_mult=1)

# Size presets. 'cpu' is the laptop default; 'paper' is the paper's configuration (docs/method.md §3, §4, §10).
PRESETS = {
    "tiny": dict(vae=dict(width=64, n_enc_layers=1, n_dec_layers=1, n_heads=2, mlp_hidden=128),
                 dit=dict(width=64, n_layers=2, n_heads=2),
                 recipe=dict(lr=3e-3, min_lr=3e-4, warmup_iters=50)),
    # a few hundred steps over ~0.3M tokens; each deviation from RECIPE is measured in the README
    "cpu": dict(vae=dict(width=128, n_enc_layers=2, n_dec_layers=2, n_heads=4, mlp_hidden=384),
                dit=dict(width=192, n_layers=4, n_heads=4),
                recipe=dict(beta=1e-4, beta2=0.999, embed_lr_mult=10.0, lr=3e-3, min_lr=3e-4, warmup_iters=50,
                            fm_batch_mult=4, grad_clip_scope="network"),
                # each block starts from N(0, 0.5^2 I): a lower-temperature draw from a weak prior (README:
                # seen 3-gram rate x3, judge perplexity / 6 at this budget); samples of exactly the length asked
                # for, cut at <|endoftext|>; the DiT's inputs in fp32
                sampler=dict(noise_scale=0.5, budget="tokens", round_bf16=False)),
    # the released model's sizes (docs/release.md); its vocabulary (100,278) comes from the data
    "paper": dict(vae=dict(width=1536, n_enc_layers=4, n_dec_layers=4, n_heads=12, mlp_hidden=3072),
                  dit=dict(width=2048, n_layers=24, n_heads=16, mlp_hidden=8192, rope_fraction=0.75)),
}


# The sampler (docs/method.md §6, docs/release.md): the release's settings, which released snapshots use;
# a preset's "sampler" entry overrides them. budget 'blocks': ceil(max_new_tokens / 16) blocks and every token
# of them (decoder.n_blocks_to_generate); round_bf16: the DiT's inputs rounded to bfloat16.
SAMPLER = dict(steps=16, guidance=7.0, noise_scale=1.0, budget="blocks", round_bf16=True)


def sampler_settings(preset):
    """The sampler settings for checkpoints trained at this preset (sample.py and eval.py's defaults)."""
    return {**SAMPLER, **PRESETS.get(preset, {}).get("sampler", {})}


def fill_sampler(args, preset):
    """Give every sampler flag left unset (None) the preset's value; a released snapshot's preset is 'release'."""
    for k, v in sampler_settings(preset).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


# ----------------------------------------------------------------------------------------------------
# train.py's flags

def get_args(argv=None):
    """train.py's flags, each checked as it is read (cli.py's types): a bad value is one line, before any work."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    # what to train
    add("--model", default="cola", choices=["cola", "ar", "llada"], help="Cola DLM or a baseline")
    add("--stage", default="all", choices=["vae", "joint", "all"], help="Cola training stage")
    add("--preset", default="cpu", choices=list(PRESETS), help="model size preset")
    add("--data_dir", default=DEFAULT_DATA_DIR, help="prepared data (prepare.py)")
    add("--out_dir", default=os.path.join(REPO_DIR, "out"), help="checkpoints and logs go here")
    add("--resume", action="store_true", help="continue from the stage's checkpoint in --out_dir")
    add("--overwrite", action="store_true", help="start afresh even where --out_dir holds a checkpoint")
    add("--dry_run", action="store_true", help="print configs, parameters, FLOPs per step; exit")
    # the models (override the preset)
    add("--latent_dim", type=positive_int, default=16, help="d: channels per latent")
    add("--block_size", type=positive_int, default=16, help="latents per block (VAE and DiT attention)")
    add("--patch_size", type=positive_int, default=1, help="tokens per latent")
    add("--vae_width", type=positive_int, default=None, help="VAE width (default: preset)")
    add("--vae_layers", type=positive_int, default=None, help="encoder and decoder blocks each (default: preset)")
    add("--dit_width", type=positive_int, default=None, help="DiT width (default: preset)")
    add("--dit_layers", type=positive_int, default=None, help="DiT blocks (default: preset)")
    add("--rope_fraction", type=unit_float, default=None, help="share of DiT head channels RoPE rotates")
    add("--lm_width", type=positive_int, default=None, help="baseline width (default: the preset's VAE width)")
    add("--lm_layers", type=int_at_least(0), default=0, help="baseline blocks (0: as many as match Cola's parameters)")
    add("--dropout", type=float_in(0.0, 1.0, high_open=True), default=0.0, help="dropout in every transformer block")
    add("--fixed_logsnr", type=nonneg_float, default=0.0, help=">0: fixed posterior variance at this logSNR")
    # the losses
    add("--beta", type=nonneg_float, default=None, help="KL / entropy weight (paper 1e-3)")
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
    add("--detach_zt", action="store_true", help="no FM gradient into the encoder (fallback if unstable)")
    add("--stats_batches", type=positive_int, default=16, help="batches that estimate the latent shift/scale")
    # deviations from the paper's recipe (docs/results.md): the cpu preset turns some on
    add("--fm_batch_mult", type=positive_int, default=None, help="stage 2: the prior sees this x --batch_size (paper 1)")
    add("--grad_clip_scope", choices=["global", "network"], help="stage 2: clip VAE+DiT together (paper) or apart")
    add("--embed_lr_mult", type=positive_float, default=None, help="lr multiplier of embeddings and output heads (paper 1)")
    add("--dit_init", default="adaln_zero", choices=["adaln_zero", "xavier"], help="DiT init (release: xavier)")
    add("--self_cond", action="store_true", help="stage 2: the DiT also reads its own estimate of z0 (paper: off)")
    # optimisation
    add("--seq_len", type=positive_int, default=64, help="tokens per training sequence")
    add("--batch_size", type=positive_int, default=16, help="sequences per micro-batch per process")
    add("--grad_accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    # the main command's budget (9.85e13 FLOPs at the cpu preset), split 150 + 367: a short stage 1 leaves
    # the prior more steps, which bought the most of any change at this budget (docs/results.md, s1short)
    add("--vae_iters", type=positive_int, default=150, help="optimizer steps of stage 1")
    add("--main_iters", type=positive_int, default=367, help="optimizer steps of stage 2 (or of a baseline)")
    add("--lr", type=positive_float, default=None, help="peak learning rate (default: preset; paper 1.5e-4)")
    add("--min_lr", type=nonneg_float, default=None, help="final learning rate of the cosine (default: preset)")
    add("--warmup_iters", type=int_at_least(0), default=None, help="linear warm-up steps (default: preset)")
    add("--beta2", type=float_in(0.0, 1.0, high_open=True), default=None, help="AdamW beta2 (default: preset; paper 0.95)")
    add("--weight_decay", type=nonneg_float, default=0.01, help="AdamW weight decay (matrices only)")
    add("--grad_clip", type=nonneg_float, default=1.0, help="grad-norm clip (0: off)")
    # running
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile (cold: ~30 s)")
    add("--seed", type=int_at_least(0), default=1337, help="random seed")
    add("--log_interval", type=positive_int, default=25, help="steps between log lines")
    add("--eval_interval", type=positive_int, default=150, help="steps between validations and checkpoints")
    add("--eval_iters", type=positive_int, default=8, help="validation batches per evaluation")
    add("--stop_after", type=int_at_least(0), default=0, help="checkpoint and exit after this many steps (0: off)")
    args = p.parse_args(argv)
    args.given = sorted(given_flags(p, argv))  # what the command line set, for the resume checks
    for k, v in {**RECIPE, **PRESETS[args.preset].get("recipe", {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seq_len % (args.block_size * args.patch_size):
        p.error(f"--seq_len {args.seq_len} must be a multiple of block_size * patch_size = "
                f"{args.block_size * args.patch_size}")
    if args.min_lr > args.lr:
        p.error(f"--min_lr {args.min_lr:g} is above --lr {args.lr:g}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other")
    return args


def given_flags(parser, argv):
    """The destinations of the flags an argv sets (abbreviations and --flag=value included)."""
    import sys
    given = set()
    for word in (sys.argv[1:] if argv is None else argv):
        if word.startswith("--"):
            name = word[2:].split("=")[0]
            match = [a.dest for a in parser._actions if any(o[2:].startswith(name) for o in a.option_strings)]
            exact = [a.dest for a in parser._actions if "--" + name in a.option_strings]
            given.update(exact or match[:1])
    return given


# ----------------------------------------------------------------------------------------------------
# the model configs of a set of flags

def vae_config(args, vocab_size):
    """The preset's VAE with the flags' overrides (a flag left unset is None: the preset's value stands)."""
    over = dict(width=args.vae_width, n_enc_layers=args.vae_layers, n_dec_layers=args.vae_layers)
    return VAEConfig(**{**PRESETS[args.preset]["vae"], **{k: v for k, v in over.items() if v is not None},
                        "vocab_size": vocab_size, "latent_dim": args.latent_dim, "block_size": args.block_size,
                        "patch_size": args.patch_size, "dropout": args.dropout, "fixed_logsnr": args.fixed_logsnr,
                        "max_seq_len": max(args.seq_len, 1024)})


def dit_config(args, vae_cfg):
    """The preset's DiT with the flags' overrides, on the VAE's latents and blocks."""
    over = dict(width=args.dit_width, n_layers=args.dit_layers, rope_fraction=args.rope_fraction,
                adaln_zero=args.dit_init == "adaln_zero", self_cond=args.self_cond)
    return DiTConfig(**{**PRESETS[args.preset]["dit"], **{k: v for k, v in over.items() if v is not None},
                        "latent_dim": vae_cfg.latent_dim, "block_size": vae_cfg.block_size, "dropout": args.dropout})


def lm_config(args, vocab_size):
    """A baseline at the preset's VAE width, its depth matched to the Cola model's parameter count."""
    vcfg = vae_config(args, vocab_size)
    with torch.device("meta"):
        cola = ColaDLM(vcfg, dit_config(args, vcfg), reference=False)
    target = n_params(cola.vae) + n_params(cola.dit)
    width = args.lm_width or vcfg.width
    return matched_lm_config(args.model, target, vocab_size, width, vcfg.n_heads, vcfg.mlp_hidden * width // vcfg.width,
                             vcfg.max_seq_len, args.dropout, args.lm_layers), target


def dry_run(args, vocab_size):
    """Configs, parameters and FLOPs per optimizer step of a set of flags, built on the meta device."""
    tokens, L = args.batch_size * args.seq_len * args.grad_accum, args.seq_len
    with torch.device("meta"):
        if args.model != "cola":
            lm = TransformerLM(lm_config(args, vocab_size)[0])
            return dict(model=args.model, lm_config=asdict(lm.cfg), params=n_params(lm),
                        flops_per_step=lm.train_flops_per_token(L) * tokens)
        vcfg = vae_config(args, vocab_size)
        cola = ColaDLM(vcfg, dit_config(args, vcfg))
    frozen = args.vae_lr_ratio == 0 and args.lam_vae == 0 and args.lam_ref == 0
    joint = cola.train_flops_per_token(L, 1 / args.fm_batch_mult, args.lam_mask, frozen)
    return dict(model="cola", vae_iters=args.vae_iters, main_iters=args.main_iters, vae_config=asdict(vcfg),
                dit_config=asdict(cola.dit.cfg), params=n_params(cola.vae) + n_params(cola.dit),
                vae_flops_per_step=cola.vae.train_flops_per_token(L, args.lam_mask) * tokens,
                joint_flops_per_step=joint * tokens * args.fm_batch_mult)
