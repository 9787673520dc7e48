"""
Flow matching over VAE latents, and the joint stage-2 objective of Cola DLM (docs/method.md §2, §4, §5).

Time convention, fixed for the whole codebase: t in [0, 1], t = 0 is data, t = 1 is noise.
    z_t = (1 - t) * z0 + t * eps,   eps ~ N(0, I),   velocity target v = eps - z0,
and sampling integrates from t = 1 down to 0 with Euler steps z <- z - dt * v_hat.

The pure functions (sample_t, flow_path, velocity_target, two_l_layout, fm_loss, euler_step,
cfg_combine, latent_stats, ...) are what the tests pin; ColaDLM wires them to the VAE and the DiT.
"""
import copy

import torch
import torch.nn as nn

import release
from checkpoint import CheckpointError, build, load_weights
from dit import DiT, DiTConfig
from layers import KVCache, attention_flops, block_causal_mask, cola_mask, matmul_params, with_key_padding
from vae import TextVAE, VAEConfig, gaussian_kl, vae_logsnr


# ----------------------------------------------------------------------------------------------------
# pure functions

def sample_t(n, loc=1.0, scale=1.0, uniform=False, device="cpu", generator=None):
    """n times in (0, 1): logit-normal t = sigmoid(u), u ~ N(loc, scale^2) (paper: loc 1.0 at d = 16),
    or uniform."""
    if uniform:
        return torch.rand(n, device=device, generator=generator)
    u = torch.randn(n, device=device, generator=generator) * scale + loc
    return torch.sigmoid(u)


def flow_path(z0, eps, t):
    """z_t = (1 - t) z0 + t eps; t broadcasts from (B,) or (B, T) over the trailing dims."""
    while t.dim() < z0.dim():
        t = t.unsqueeze(-1)
    return (1 - t) * z0 + t * eps


def velocity_target(z0, eps):
    """d z_t / d t along the straight path."""
    return eps - z0


def euler_step(z, v, dt):
    """One step from t to t - dt (towards data)."""
    return z - dt * v


def cfg_combine(v_cond, v_uncond, scale):
    """Classifier-free guidance on the whole velocity prediction: v_u + s (v_c - v_u); s = 1 is off.
    scale: a number, or one per row (B,) (the release turns guidance off for a row with no history)."""
    if not torch.is_tensor(scale):
        if scale == 1.0:
            return v_cond  # exactly, not up to rounding
        return v_uncond + scale * (v_cond - v_uncond)
    scale = scale.to(v_cond.dtype).view(-1, *([1] * (v_cond.dim() - 1)))  # (B, 1, 1)
    return torch.where(scale == 1.0, v_cond, v_uncond + scale * (v_cond - v_uncond))


def time_grid(steps, device="cpu", t_max=1.0):
    """Uniform grid from t = t_max down to 0 with `steps` intervals (the paper's: 16 from t = 1)."""
    return t_max * torch.linspace(1.0, 0.0, steps + 1, device=device)


def two_l_mask(L, block_size, device="cpu"):
    """(2L - bs, 2L - bs) bool mask of the "2L" training sequence [clean 0..L-bs-1 | noisy 0..L-1]."""
    Lc = L - block_size
    pos = torch.cat([torch.arange(Lc), torch.arange(L)]).to(device)
    noisy = torch.cat([torch.zeros(Lc, dtype=torch.bool), torch.ones(L, dtype=torch.bool)]).to(device)
    blk = pos // block_size
    return cola_mask(blk, noisy, blk, noisy)


def two_l_layout(z0, zt, t_tok, block_size):
    """Build the BD3-LM style training input from clean latents z0 and noisy latents zt, both (B, L, d).

    Returns seq (B, 2L - bs, d), t (B, 2L - bs) with t = 0 on the clean half, pos (2L - bs,) sharing RoPE
    positions between a noisy latent and its clean counterpart, and the mask. The clean half is
    stop-gradient: the prior's history is not a path for gradients into the encoder.
    """
    B, L, _ = z0.shape
    Lc = L - block_size
    seq = torch.cat([z0[:, :Lc].detach(), zt], dim=1)  # (B, 2L-bs, d)
    t = torch.cat([torch.zeros(B, Lc, device=zt.device, dtype=t_tok.dtype), t_tok], dim=1)  # (B, 2L-bs)
    pos = torch.cat([torch.arange(Lc), torch.arange(L)]).to(zt.device)
    return seq, t, pos, two_l_mask(L, block_size, zt.device)


def cached_block_masks(hist_valid, block_size):
    """Masks of a noisy block's queries over [cached history | the block itself] during generation.
    hist_valid (B, Tc) marks real (not padded) history latents. Returns (cond, uncond), each
    (B, 1, bs, Tc + bs): the conditional pass sees the real history and its own block; the
    unconditional pass sees its own block only (the cached keys are all hidden)."""
    B = hist_valid.shape[0]
    own = torch.ones(B, block_size, dtype=torch.bool, device=hist_valid.device)
    cond = torch.cat([hist_valid, own], 1)[:, None, None, :].expand(B, 1, block_size, -1)
    uncond = torch.cat([torch.zeros_like(hist_valid), own], 1)[:, None, None, :].expand(B, 1, block_size, -1)
    return cond, uncond


def cached_causal_mask(key_valid, n_new, block_size):
    """(B, 1, n_new, Tk) mask of the last n_new positions over all Tk = Tc + n_new keys, block-causal with
    `block_size` (the decoder's own, which may be finer than the DiT's) and hiding invalid keys."""
    Tk = key_valid.shape[1]
    pos = torch.arange(Tk, device=key_valid.device)
    rule = block_causal_mask(pos[Tk - n_new:] // block_size, pos // block_size)  # (n_new, Tk)
    return (rule & key_valid.unsqueeze(1)).unsqueeze(1)


def partial_known_prefix(B, L, block_size, prob, device="cpu", generator=None):
    """(B, L) bool: latents kept clean at t = 0 and left out of the loss. With probability `prob` per
    block a random-length prefix (1 .. bs-1) of the noisy block is known, as when sampling continues a
    prompt whose last block is partial."""
    nb = L // block_size
    pick = torch.rand(B, nb, device=device, generator=generator) < prob  # (B, nb)
    length = torch.randint(1, max(block_size, 2), (B, nb), device=device, generator=generator)  # (B, nb)
    idx = torch.arange(block_size, device=device)
    known = pick.unsqueeze(-1) & (idx < length.unsqueeze(-1))  # (B, nb, bs)
    return known.reshape(B, L)


def fm_loss(v_pred, v_target, valid=None):
    """MSE averaged over channels and valid positions. v (B, T, d); valid (B, T) bool or None."""
    err = (v_pred.float() - v_target.float()).pow(2).mean(-1)  # (B, T)
    if valid is None:
        return err.mean()
    valid = valid.float()
    return (err * valid).sum() / valid.sum().clamp(min=1)


def latent_stats(mu, logvar):
    """Per-channel shift and scale so that (z - shift) * scale has zero mean and unit variance, where
    z ~ q(z|x): Var[z] = Var[mu] + E[sigma^2]. mu, logvar (..., d). Deterministic (no sampling)."""
    mu, var = mu.reshape(-1, mu.shape[-1]).double(), logvar.reshape(-1, logvar.shape[-1]).double().exp()
    shift = mu.mean(0)
    total_var = (mu - shift).pow(2).mean(0) + var.mean(0)
    return shift.float(), total_var.rsqrt().float()


def history_blocks(err):
    """Mean over the blocks that have a clean history (1..), per sequence. err (B, n_blocks) -> (B,).
    Block 0 is denoised from nothing in both passes, so including it only dilutes the comparison."""
    return err[:, 1:].mean(1) if err.shape[1] > 1 else err.mean(1)


def t_bin_sums(t, err, n_bins=10):
    """Sum of err and counts per t-bin ([0, 0.1), ..., [0.9, 1.0]); t, err (N,). -> (2, n_bins)."""
    b = (t.clamp(0, 1 - 1e-6) * n_bins).long()
    sums = torch.zeros(n_bins, device=err.device).index_add_(0, b, err.float())
    counts = torch.zeros(n_bins, device=err.device).index_add_(0, b, torch.ones_like(err, dtype=torch.float))
    return torch.stack([sums, counts])


def history_metrics(t, cond, uncond, n_bins=10):
    """Validation scalars of the FM loss with (cond) and without (uncond) the clean history, per block
    (B, n_blocks), at times t (B,): both means over blocks 1.., and per t-bin sums and counts (so that
    averages over batches and ranks stay exact ratios; t_bin_line prints them)."""
    cond, uncond = history_blocks(cond), history_blocks(uncond)  # (B,)
    res = {"fm_cond": cond.mean(), "fm_uncond": uncond.mean()}
    for name, err in (("c", cond), ("u", uncond)):
        sums = t_bin_sums(t, err, n_bins)
        res.update({f"bin_{name}{i}": sums[0, i] for i in range(n_bins)})
        res.update({f"bin_n{i}": sums[1, i] for i in range(n_bins)})
    return res


def t_bin_line(metrics):
    """'0.0:cond|uncond 0.1:...' from history_metrics' bins (after averaging)."""
    n = len([k for k in metrics if k.startswith("bin_n")])
    return " ".join(f"{i / n:.1f}:{metrics[f'bin_c{i}'] / metrics[f'bin_n{i}']:.3f}|"
                    f"{metrics[f'bin_u{i}'] / metrics[f'bin_n{i}']:.3f}" for i in range(n) if metrics[f"bin_n{i}"] > 0)


# ----------------------------------------------------------------------------------------------------
# the joint model

class ColaDLM(nn.Module):
    """Text VAE + block-causal DiT prior + frozen reference encoder + latent normalisation."""

    def __init__(self, vae_cfg: VAEConfig, dit_cfg: DiTConfig, decoder_reads_normalized=False, reference=True):
        super().__init__()
        assert vae_cfg.latent_dim == dit_cfg.latent_dim, "the VAE and the DiT must share latent_dim"
        assert dit_cfg.block_size % vae_cfg.block_size == 0, "the DiT's block_size must be a multiple of the VAE's"
        self.decoder_reads_normalized = decoder_reads_normalized  # True for the release (decoder_input)
        self.vae = TextVAE(vae_cfg)
        self.dit = DiT(dit_cfg)
        self.ref_enc = None  # frozen stage-1 encoder q_phi_ref (set by init_from_vae); training only
        if reference:
            self.ref_enc = copy.deepcopy(self.vae.enc).requires_grad_(False)
        self.register_buffer("latent_shift", torch.zeros(vae_cfg.latent_dim))
        self.register_buffer("latent_scale", torch.ones(vae_cfg.latent_dim))

    @classmethod
    def from_checkpoint(cls, ckpt):
        """The model of a stage-2 checkpoint dict (checkpoint.load_checkpoint); a config or weights that do
        not fit this code are a one-line CheckpointError."""
        vae_cfg, dit_cfg = build(VAEConfig, ckpt["vae_config"], ckpt), build(DiTConfig, ckpt["dit_config"], ckpt)
        if vae_cfg.latent_dim != dit_cfg.latent_dim or dit_cfg.block_size % vae_cfg.block_size:
            raise CheckpointError(f"{ckpt.get('path')}: its VAE and DiT configs do not fit together")
        model = cls(vae_cfg, dit_cfg)
        load_weights(model, ckpt["model"], ckpt)
        return model

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """The authors' released model from its snapshot directory, as nanoGPT's GPT.from_pretrained
        (release.py, docs/release.md), its weights in `dtype` (bfloat16 halves the memory: run it under
        autocast). Returns (model in eval mode, path of its tokenizer.json)."""
        vae_dir, dit_dir, tokenizer = release.snapshot_folders(path)
        vae_cfg, shift, scale = release.vae_config(vae_dir)
        if not release.latent_norm_ok(shift, scale):
            raise release.SnapshotError(f"{vae_dir}/config.json: shifting_factor {shift} / scaling_factor {scale} "
                                        "do not give a usable normalisation")
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in that dtype: no fp32 copy of a 2B model is ever made
        try:
            model = cls(vae_cfg, release.dit_config(dit_dir, vae_cfg), decoder_reads_normalized=True, reference=False)
        finally:
            torch.set_default_dtype(default)
        release.load_weights(model, vae_dir, "vae.")
        release.load_weights(model, dit_dir, "dit.")
        release.check_rope_buffer(dit_dir, model.dit.cfg)
        model.latent_shift.fill_(shift)  # the release normalises with two scalars: (z - shift) * scale
        model.latent_scale.fill_(scale)
        return model.eval(), tokenizer

    @property
    def block_size(self):
        """Latents per generated block (the DiT's; the VAE's attention blocks may be finer)."""
        return self.dit.cfg.block_size

    @property
    def tokens_per_block(self):
        return self.dit.cfg.block_size * self.vae.cfg.patch_size

    def init_from_vae(self, vae_state, shift, scale):
        self.vae.load_state_dict(vae_state)
        self.ref_enc.load_state_dict(self.vae.enc.state_dict())
        self.latent_shift.copy_(shift)
        self.latent_scale.copy_(scale)

    @torch.no_grad()
    def init_from_stage1(self, vae_state, batches):
        """Start stage 2: the stage-1 VAE, its frozen copy as the reference encoder, and the latent
        normalisation estimated on `batches` of training tokens (latent_stats of the posterior)."""
        self.vae.load_state_dict(vae_state)
        self.vae.eval()
        posts = [self.vae.encode(x) for x in batches]
        self.vae.train()
        shift, scale = latent_stats(torch.cat([mu for mu, _ in posts]), torch.cat([lv for _, lv in posts]))
        self.init_from_vae(vae_state, shift, scale)

    def train(self, mode=True):
        super().train(mode)
        if self.ref_enc is not None:
            self.ref_enc.eval()  # the reference never has dropout on
        return self

    def normalize(self, z):
        return (z - self.latent_shift) * self.latent_scale

    def denormalize(self, zn):
        return zn / self.latent_scale + self.latent_shift

    def velocity_2l(self, z0n, zt, t_tok, hint=None):
        """DiT velocity on the noisy half of the 2L sequence. z0n, zt (B, L, d); t_tok (B, L).
        hint (B, L, d): the self-conditioning estimate of z0 on the noisy half (DiTConfig.self_cond)."""
        L = zt.shape[1]
        seq, t, pos, mask = two_l_layout(z0n, zt, t_tok, self.block_size)
        if hint is not None:
            hint = torch.cat([torch.zeros_like(seq[:, :L - self.block_size]), hint], 1)
        return self.dit(seq, t, pos, mask, hint=hint)[:, L - self.block_size:]  # (B, L, d)

    def velocity_uncond(self, zt, t_tok, hint=None):
        """Each noisy block alone at positions 0..bs-1 (the unconditional pass of CFG)."""
        B, L, d = zt.shape
        bs = self.block_size
        pos = torch.arange(bs, device=zt.device)
        mask = torch.ones(bs, bs, dtype=torch.bool, device=zt.device)
        v = self.dit(zt.reshape(B * L // bs, bs, d), t_tok.reshape(-1, bs), pos, mask,
                     hint=None if hint is None else hint.reshape(B * L // bs, bs, d))
        return v.reshape(B, L, d)

    def forward(self, tokens, beta=1e-3, mask_prob=0.15, lam_mask=1.0, lam_vae=1.0, lam_fm=1.0, lam_ref=1.0,
                t_loc=1.0, t_scale=1.0, t_uniform=False, partial_prob=0.05, detach_zt=False, decode_rows=0):
        """Stage-2 loss (docs/method.md §5). tokens (B, T) -> dict with 'loss' and its parts.
        Not the paper's, off by default: decode_rows > 0 runs the decoder terms, whose vocabulary head is
        the costly part at small width, on the first decode_rows sequences only (every sequence feeds the
        encoder, the entropy, the reference KL and the FM term; both estimates stay unbiased, the prior just
        sees a larger batch)."""
        vae = self.vae
        n_dec = decode_rows if 0 < decode_rows < tokens.shape[0] else tokens.shape[0]
        if lam_vae > 0:
            out = vae.recon_terms(tokens[:n_dec], mask_prob, lam_mask)
            mu, logvar, z = out.pop("mu"), out.pop("logvar"), out.pop("z")  # (n_dec, L, d)
        else:  # no VAE terms (a frozen VAE): the decoder does not run at all
            zero = torch.zeros((), device=tokens.device)
            out, n_dec = dict(ce=zero, acc=zero, mask_ce=zero, mask_acc=zero), 0
        if n_dec < tokens.shape[0]:  # the other sequences: encoder only
            mu2, logvar2 = vae.encode(tokens[n_dec:])
            z2 = vae.reparameterize(mu2, logvar2)
            mu, logvar, z = ((torch.cat([mu, mu2]), torch.cat([logvar, logvar2]), torch.cat([z, z2])) if n_dec
                             else (mu2, logvar2, z2))  # (B, L, d)
        # beta * E_q log q(z|x) = -beta * entropy: keeps the posterior from shrinking to a point
        out["neg_entropy"] = (-0.5 * (logvar.float() + 1.0 + 1.8378770664093453)).sum(-1).mean()
        out["ref_kl"] = torch.zeros((), device=tokens.device)
        if lam_ref > 0:
            with torch.no_grad():
                mu_ref, logvar_ref = self.ref_enc(tokens)
            out["ref_kl"] = gaussian_kl(mu.float(), logvar.float(), mu_ref.float(), logvar_ref.float()).mean()
        out["logsnr"] = vae_logsnr(mu.detach(), logvar.detach())
        # flow matching on normalised latents
        z0n = self.normalize(z.float())  # (B, L, d)
        B, L, _ = z0n.shape
        eps = torch.randn_like(z0n)
        t_tok = sample_t(B, t_loc, t_scale, t_uniform, tokens.device).unsqueeze(1).expand(B, L)  # (B, L)
        known = partial_known_prefix(B, L, self.block_size, partial_prob, tokens.device)  # (B, L)
        t_tok = torch.where(known, torch.zeros_like(t_tok), t_tok)
        zt = flow_path(z0n.detach() if detach_zt else z0n, eps, t_tok)  # gradient reaches the encoder via z_t
        hint = None
        if self.dit.cfg.self_cond and float(torch.rand(())) < 0.5:  # half the batches read their own estimate
            with torch.no_grad():
                hint = zt - t_tok.unsqueeze(-1) * self.velocity_2l(z0n, zt, t_tok).float()
        v_pred = self.velocity_2l(z0n, zt, t_tok, hint=hint)
        out["fm"] = fm_loss(v_pred, velocity_target(z0n.detach(), eps), ~known)
        out["loss"] = (lam_vae * (out["ce"] + beta * out["neg_entropy"] + lam_mask * out["mask_ce"])
                       + lam_fm * out["fm"] + lam_ref * out["ref_kl"])
        return out

    def train_flops_per_token(self, seq_len, decode_frac=1.0, lam_mask=1.0, vae_frozen=False):
        """Stage-2 training FLOPs per token (layers.py's convention): the encoder on every sequence (and on
        the masked copy of the decoded ones), the decoder on the decoded fraction of the batch (both copies),
        the frozen reference encoder forward only, and the DiT on (2L - bs) latents per L."""
        c, d = self.vae.cfg, self.dit.cfg
        copies = 2 if lam_mask > 0 else 1
        enc, dec = self.vae.flops_per_token(seq_len)
        if vae_frozen:  # the encoder forward only (a third of its training FLOPs), no decoder, no reference
            f = enc / 3
        else:
            f = enc * (1 + (copies - 1) * decode_frac) + copies * dec * decode_frac
            f += 2 * matmul_params(self.ref_enc) / c.patch_size
        L, bs = seq_len // c.patch_size, self.block_size
        n_dit = 2 * L - bs
        dit_pass = (2 * matmul_params(self.dit) + attention_flops(d.n_layers, d.width, n_dit)) * n_dit / L / c.patch_size
        return f + dit_pass * (3 + 0.5 * d.self_cond)  # forward + backward, half the time a self-conditioning forward

    # ------------------------------------------------------------------------------------------------
    # generation with KV caches (docs/method.md §6): decoder.generate() is the block loop over these

    def new_caches(self):
        """(DiT cache, decoder cache), both empty."""
        return KVCache(self.dit.cfg.n_layers), KVCache(self.vae.cfg.n_dec_layers)

    def decoder_input(self, zn):
        """What the decoder reads for normalised latents zn: the raw latents it was trained on, or zn itself
        for a model whose sampler hands the decoder normalised latents (the release's inference does)."""
        return zn if self.decoder_reads_normalized else self.denormalize(zn)

    def prefill(self, zn, key_valid, caches, round_bf16=False):
        """Commit clean prompt blocks to both caches: the DiT at t = 0 and the decoder.
        zn (B, Tc, d) normalised latents, Tc a whole number of blocks; key_valid (B, Tc) real latents."""
        dit_cache, dec_cache = caches
        B, Tc, _ = zn.shape
        pos = torch.arange(Tc, device=zn.device)
        blk = pos // self.block_size
        mask = with_key_padding(block_causal_mask(blk, blk), key_valid, key_valid)  # (B, 1, Tc, Tc)
        self.dit(zn, torch.zeros(B, Tc, device=zn.device), pos, mask, dit_cache, commit=True, round_bf16=round_bf16)
        vblk = pos // self.vae.cfg.block_size
        self.vae.decode(self.decoder_input(zn), pos, with_key_padding(block_causal_mask(vblk, vblk), key_valid,
                                                                      key_valid), dec_cache)

    def guided_velocity(self, z, t_tok, hist_valid, guidance, dit_cache, hint=None, round_bf16=False):
        """v_u + s (v_c - v_u) for the next noisy block after the cached history, DiT's forward_with_cfg
        pattern: the conditional rows (history + block, at the block's positions) and the unconditional
        rows (the block alone at positions 0..bs-1) go through the DiT as one batch.
        z (B, bs, d) normalised noisy latents; t_tok (B, bs); hist_valid (B, Tc) real cached latents;
        guidance: a number or one per row (B,); hint (B, bs, d): the previous step's estimate of z0
        (self-conditioning only); round_bf16: the DiT's inputs rounded as the release's sampler does."""
        B, bs, _ = z.shape
        Tc = hist_valid.shape[1]
        pos = torch.arange(Tc, Tc + bs, device=z.device)  # (bs,)
        cond_mask, uncond_mask = cached_block_masks(hist_valid, bs)
        if not torch.is_tensor(guidance) and guidance == 1.0:  # the conditional pass alone
            return self.dit(z, t_tok, pos, cond_mask, dit_cache, commit=False, hint=hint, round_bf16=round_bf16)
        local = torch.arange(bs, device=z.device)
        both_pos = torch.cat([pos.expand(B, bs), local.expand(B, bs)])  # (2B, bs)
        v = self.dit(torch.cat([z, z]), torch.cat([t_tok, t_tok]), both_pos, torch.cat([cond_mask, uncond_mask]),
                     dit_cache, commit=False, hint=None if hint is None else torch.cat([hint, hint]),
                     round_bf16=round_bf16)  # (2B, bs, d)
        v_cond, v_uncond = v.chunk(2)
        return cfg_combine(v_cond, v_uncond, guidance)

    def decode_and_commit(self, z, hist_valid, caches, round_bf16=False):
        """Decoder logits (B, bs * patch, V) of the finished block z (B, bs, d, normalised), which then joins
        both caches: the decoder keeps its keys, the DiT commits the block at t = 0."""
        dit_cache, dec_cache = caches
        B, bs, _ = z.shape
        Tc = hist_valid.shape[1]
        pos = torch.arange(Tc, Tc + bs, device=z.device)
        key_valid = torch.cat([hist_valid, torch.ones(B, bs, dtype=torch.bool, device=z.device)], 1)  # (B, Tc + bs)
        dec_mask = cached_causal_mask(key_valid, bs, self.vae.cfg.block_size)
        logits = self.vae.decode(self.decoder_input(z), pos, dec_mask, dec_cache)
        cond_mask, _ = cached_block_masks(hist_valid, bs)
        self.dit(z, torch.zeros(B, bs, device=z.device), pos, cond_mask, dit_cache, commit=True, round_bf16=round_bf16)
        return logits

    @torch.no_grad()
    def fm_eval(self, tokens, t_loc=1.0, t_scale=1.0, t_uniform=False, generator=None):
        """FM loss with the clean history (cond) and without it (uncond, each block alone) on the same
        noise, with the posterior mean as z0. Returns t (B,) and the losses per block, cond and uncond
        (B, n_blocks). Block 0 has no history, so its two losses are equal: compare blocks 1.. (history_blocks, history_metrics)."""
        mu, _ = self.vae.encode(tokens)
        z0n = self.normalize(mu.float())  # (B, L, d)
        B, L, _ = z0n.shape
        eps = torch.randn(z0n.shape, device=z0n.device, generator=generator)
        t = sample_t(B, t_loc, t_scale, t_uniform, tokens.device, generator)  # (B,)
        t_tok = t.unsqueeze(1).expand(B, L)
        zt = flow_path(z0n, eps, t_tok)
        target = velocity_target(z0n, eps)
        per_block = lambda v: (v.float() - target).pow(2).reshape(B, L // self.block_size, -1).mean(-1)
        return t, per_block(self.velocity_2l(z0n, zt, t_tok)), per_block(self.velocity_uncond(zt, t_tok))
