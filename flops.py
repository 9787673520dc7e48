"""Training compute, counted the same way for Cola DLM and the baselines (the ladder's x axis, docs/results.md).

6 FLOPs per matmul weight per position trained on (forward 2, backward 4), 2 for a forward-only pass;
embedding lookups are free; attention scores and values cost 2 * 2 * keys * width per query and layer in the
forward pass, at the full key length (SDPA with a bool mask computes every key)."""
import os
from dataclasses import asdict

import torch
import torch.nn as nn

from baselines import TransformerLM
from diffusion import ColaDLM
from layers import n_params
from tokendata import load_meta


def matmul_params(module):
    """Weights of every nn.Linear and nn.Conv1d in module (the output heads are Linears; embeddings are not)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))


def attention_flops(n_layers, width, n_keys):
    """Forward FLOPs per query position of QK^T and AV."""
    return n_layers * 2 * 2 * n_keys * width


def vae_passes(vae, seq_len):
    """Training FLOPs per token of an encoder and a decoder pass (the vocab head per token, the rest per latent)."""
    c, n_lat = vae.cfg, seq_len // vae.cfg.patch_size
    enc = (6 * matmul_params(vae.enc) + 3 * attention_flops(c.n_enc_layers, c.width, n_lat)) / c.patch_size
    body = 6 * (matmul_params(vae.dec) - matmul_params(vae.dec.head))
    dec = (body + 3 * attention_flops(c.n_dec_layers, c.width, n_lat)) / c.patch_size + 6 * matmul_params(vae.dec.head)
    return enc, dec


def vae_train_flops(vae, seq_len, lam_mask=1.0):
    """Stage 1: encoder and decoder on the clean text, and again on the masked copy when lam_mask > 0."""
    return (2 if lam_mask > 0 else 1) * sum(vae_passes(vae, seq_len))


def joint_train_flops(model, seq_len, fm_batch_mult=1, lam_mask=1.0, vae_frozen=False):
    """Stage 2 per token: the encoder on every sequence (and on the masked copy of the decoded ones), the decoder
    on 1/fm_batch_mult of them (both copies), the reference encoder forward only, the DiT on (2L - bs) latents per L;
    a frozen VAE costs its encoder's forward pass only (a third of its training)."""
    c, d, copies = model.vae.cfg, model.dit.cfg, 2 if lam_mask > 0 else 1
    enc, dec = vae_passes(model.vae, seq_len)
    f = enc / 3 if vae_frozen else (enc * (1 + (copies - 1) / fm_batch_mult) + copies * dec / fm_batch_mult
                                    + 2 * matmul_params(model.ref_enc) / c.patch_size)
    L = seq_len // c.patch_size
    n_dit = 2 * L - model.block_size
    dit_pass = (2 * matmul_params(model.dit) + attention_flops(d.n_layers, d.width, n_dit)) * n_dit / L / c.patch_size
    return f + 3 * dit_pass


def lm_train_flops(lm, seq_len):
    """A baseline's training FLOPs per token."""
    return 6 * matmul_params(lm) + 3 * attention_flops(lm.cfg.n_layers, lm.cfg.width, seq_len)


def vae_frozen(args):
    """Stage 2 trains the prior alone: no VAE work at all."""
    return args.vae_lr_ratio == 0 and args.lam_vae == 0 and args.lam_ref == 0


def dry_run(args, vae_config, dit_config, lm_config):
    """train.py --dry_run: configs, parameters, training FLOPs per step (meta device, --data_dir's vocab or GPT-2's)."""
    vocab = load_meta(args.data_dir)["vocab_size"] if os.path.exists(f"{args.data_dir}/meta.json") else 50257
    tokens, L = args.batch_size * args.seq_len * args.grad_accum, args.seq_len
    with torch.device("meta"):
        if args.model != "cola":
            lm = TransformerLM(lm_config(args, vocab)[0])
            return dict(model=args.model, lm_config=asdict(lm.cfg), params=n_params(lm),
                        flops_per_step=lm_train_flops(lm, L) * tokens)
        vae_cfg = vae_config(args, vocab)
        cola = ColaDLM(vae_cfg, dit_config(args, vae_cfg))
    joint = joint_train_flops(cola, L, args.fm_batch_mult, args.lam_mask, vae_frozen(args))
    return dict(model="cola", vae_iters=args.vae_iters, main_iters=args.main_iters, vae_config=asdict(vae_cfg),
                dit_config=asdict(cola.dit.cfg), params=n_params(cola.vae) + n_params(cola.dit),
                vae_flops_per_step=vae_train_flops(cola.vae, L, args.lam_mask) * tokens,
                joint_flops_per_step=joint * tokens * args.fm_batch_mult)
