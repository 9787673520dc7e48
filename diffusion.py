"""
Flow matching over VAE latents and the joint stage-2 objective of Cola DLM (docs/method.md §2, §4, §5). Time, for
the whole codebase: t = 0 is data, t = 1 is noise; z_t = (1 - t) z0 + t eps, velocity target v = eps - z0, Euler
steps from t = 1 down to 0. Pure functions, the stage-2 LossConfig, then ColaDLM: its loss and the cached passes.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from dit import DiT, DiTConfig
from layers import KVCache, cached_block_masks, cached_causal_mask, prefix_mask, two_l_mask
from vae import TextVAE, VAEConfig, gaussian_kl, vae_logsnr


# pure functions
def sample_t(n, loc=1.0, scale=1.0, uniform=False, device="cpu", generator=None):
    """n times in (0, 1): logit-normal, t = sigmoid(u) with u ~ N(loc, scale^2), or uniform."""
    if uniform:
        return torch.rand(n, device=device, generator=generator)
    return torch.sigmoid(torch.randn(n, device=device, generator=generator) * scale + loc)


def flow_path(z0, eps, t):
    """z_t = (1 - t) z0 + t eps; t broadcasts from (B,) or (B, T) over the trailing dims."""
    while t.dim() < z0.dim():
        t = t.unsqueeze(-1)
    return (1 - t) * z0 + t * eps


def velocity_target(z0, eps):
    """d z_t / d t along the straight path."""
    return eps - z0


def sampler_step(z, v, t, t_next, eta=0.0, noise=None):
    """One step from t to t_next < t (towards data). eta = 0: Euler's; eta > 0 keeps the clean estimate z - t v and
    draws a share eta^2 of the noise estimate z + (1 - t) v afresh (noise ~ N(0, I)): DDIM's eta on the flow path."""
    if not eta:
        return z - (t - t_next) * v
    return (1 - t_next) * (z - t * v) + t_next * ((1 - eta ** 2) ** 0.5 * (z + (1 - t) * v) + eta * noise)


def apply_guidance(v_cond, v_uncond, scale):
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


def rising_t(s, block_size, width):
    """t_i = clamp(s - width (1 - i / (bs - 1)), 0, 1) at progress s (...,) -> (..., bs), s from 1 + width (noise) to 0:
    a block's first latents are cleaner and settle first (AR-Diffusion's rising t, inside a block)."""
    i = torch.arange(block_size, device=s.device) / max(block_size - 1, 1)
    return (s.unsqueeze(-1) - width * (1 - i)).clamp(0, 1)


def two_l_layout(z0, zt, t_tok, block_size):
    """The BD3-LM style training input of clean z0 and noisy zt (B, L, d): seq (B, 2L - bs, d), t (B, 2L - bs)
    (0 on the clean half), pos (2L - bs,), mask (layers.two_l_mask). The clean half is stop-gradient: the
    prior's history is no path for gradients into the encoder."""
    B, L, _ = z0.shape
    Lc = L - block_size
    seq = torch.cat([z0[:, :Lc].detach(), zt], dim=1)  # (B, 2L-bs, d)
    t = torch.cat([torch.zeros(B, Lc, device=zt.device, dtype=t_tok.dtype), t_tok], dim=1)  # (B, 2L-bs)
    mask, pos = two_l_mask(L, block_size, zt.device)
    return seq, t, pos, mask


def partial_known_prefix(B, L, block_size, prob, device="cpu", generator=None):
    """(B, L) bool, latents kept clean (t = 0) and out of the loss: per block with probability `prob`, a prefix
    of 1 .. bs-1 latents, as when sampling continues a partial prompt block."""
    nb = L // block_size
    pick = torch.rand(B, nb, device=device, generator=generator) < prob  # (B, nb)
    length = torch.randint(1, max(block_size, 2), (B, nb), device=device, generator=generator)  # (B, nb)
    known = pick.unsqueeze(-1) & (torch.arange(block_size, device=device) < length.unsqueeze(-1))  # (B, nb, bs)
    return known.reshape(B, L)


def fm_loss(v_pred, v_target, valid=None):
    """MSE averaged over channels and valid positions. v (B, T, d); valid (B, T) bool or None."""
    err = (v_pred.float() - v_target.float()).pow(2).mean(-1)  # (B, T)
    if valid is None:
        return err.mean()
    return (err * valid).sum() / valid.sum().clamp(min=1)


def latent_stats(mu, logvar):
    """Per-channel shift, scale making (z - shift) * scale zero-mean, unit-variance for z ~ q(z|x), mu and logvar
    (..., d): Var[z] = Var[mu] + E[sigma^2]."""
    mu, var = mu.reshape(-1, mu.shape[-1]).double(), logvar.reshape(-1, logvar.shape[-1]).double().exp()
    shift = mu.mean(0)
    total_var = (mu - shift).pow(2).mean(0) + var.mean(0)
    return shift.float(), total_var.rsqrt().float()


@dataclass
class LossConfig:
    """The stage-2 loss's weights and noise schedule (docs/method.md §5); train.py fills it from its flags."""
    beta: float = 1e-3              # weight of -entropy of q(z|x) (paper 1e-3)
    mask_prob: float = 0.15         # tokens replaced by [MASK] in the BERT-style branch
    lam_mask: float = 1.0           # weight of the masked branch (0: off)
    lam_vae: float = 1.0            # weight of the VAE terms (0 with a frozen VAE: the decoder does not run)
    lam_fm: float = 1.0             # weight of the flow-matching loss
    lam_ref: float = 1.0            # weight of KL(q || q_ref) to the frozen stage-1 encoder
    t_loc: float = 1.0              # logit-normal location of t (paper: 1.0 at d = 16)
    t_scale: float = 1.0            # logit-normal scale of t
    t_uniform: bool = False         # t ~ U(0, 1) instead
    partial_prob: float = 0.05      # per block: a known clean prefix of random length (as a partial prompt block)
    fm_batch_mult: int = 1          # > 1 (not the paper's): the decoder terms on the first 1/fm_batch_mult of the rows
    t_rise: float = 0.0             # > 0 (not the paper's): t rises along each block by this much (rising_t)


# the joint model
class ColaDLM(nn.Module):
    """Text VAE + block-causal DiT prior + frozen reference encoder + latent normalisation."""

    def __init__(self, vae_cfg: VAEConfig, dit_cfg: DiTConfig, reference=True):
        super().__init__()
        assert vae_cfg.latent_dim == dit_cfg.latent_dim, "the VAE and the DiT must share latent_dim"
        assert dit_cfg.block_size % vae_cfg.block_size == 0, "the DiT's block_size must be a multiple of the VAE's"
        self.vae = TextVAE(vae_cfg)
        self.dit = DiT(dit_cfg)
        self.ref_enc = copy.deepcopy(self.vae.enc).requires_grad_(False) if reference else None  # q_phi_ref
        self.register_buffer("latent_shift", torch.zeros(vae_cfg.latent_dim))
        self.register_buffer("latent_scale", torch.ones(vae_cfg.latent_dim))
        self.decoder_reads_normalized = False  # a hook for release.py only: its decoder reads normalised latents

    @property
    def block_size(self):  # latents per generated block: the DiT's (the VAE's may be finer)
        return self.dit.cfg.block_size

    @torch.no_grad()
    def init_from_stage1(self, vae_state, batches):
        """Stage 2 starts from the stage-1 VAE, a frozen copy of its encoder, and latent_stats over `batches`."""
        self.vae.load_state_dict(vae_state)
        self.ref_enc.load_state_dict(self.vae.enc.state_dict())
        posts = [self.vae.eval().encode(x) for x in batches]
        self.vae.train()
        shift, scale = latent_stats(torch.cat([mu for mu, _ in posts]), torch.cat([lv for _, lv in posts]))
        self.latent_shift.copy_(shift)
        self.latent_scale.copy_(scale)

    def train(self, mode=True):
        super().train(mode)
        if self.ref_enc is not None:
            self.ref_enc.eval()  # the reference never has dropout on
        return self

    def normalize(self, z):
        return (z - self.latent_shift) * self.latent_scale

    def denormalize(self, zn):
        return zn / self.latent_scale + self.latent_shift

    # training

    def velocity_2l(self, z0n, zt, t_tok):
        """DiT velocity on the noisy half of the 2L sequence. z0n, zt (B, L, d); t_tok (B, L)."""
        L = zt.shape[1]
        seq, t, pos, mask = two_l_layout(z0n, zt, t_tok, self.block_size)
        return self.dit(seq, t, pos, mask)[:, L - self.block_size:]  # (B, L, d)

    def encode_for_prior(self, tokens, objective: LossConfig):
        """The VAE terms and the posterior (mu, logvar, z), each (B, L, d). With fm_batch_mult > 1 the decoder runs on
        the first 1/fm_batch_mult of the rows only (its vocabulary head is the costly part at small width)."""
        n_dec = max(1, tokens.shape[0] // objective.fm_batch_mult)
        if objective.lam_vae == 0:  # a frozen VAE: no decoder at all
            zero = torch.zeros((), device=tokens.device)
            out, n_dec, posts = dict(ce=zero, acc=zero, mask_ce=zero, mask_acc=zero), 0, []
        else:
            out = self.vae.recon_terms(tokens[:n_dec], objective.mask_prob, objective.lam_mask)
            posts = [(out.pop("mu"), out.pop("logvar"), out.pop("z"))]
        if n_dec < tokens.shape[0]:  # the other sequences: encoder only
            mu, logvar = self.vae.encode(tokens[n_dec:])
            posts.append((mu, logvar, self.vae.reparameterize(mu, logvar)))
        mu, logvar, z = (torch.cat(parts) for parts in zip(*posts))
        return out, mu, logvar, z

    def forward(self, tokens, objective=LossConfig()):
        """Stage-2 loss (docs/method.md §5). tokens (B, T) -> dict with 'loss' and its parts."""
        out, mu, logvar, z = self.encode_for_prior(tokens, objective)  # (B, L, d) each
        # beta * E_q log q(z|x) = -beta * entropy: keeps the posterior from shrinking to a point
        out["neg_entropy"] = (-0.5 * (logvar.float() + 1.0 + 1.8378770664093453)).sum(-1).mean()
        out["ref_kl"] = torch.zeros((), device=tokens.device)
        if objective.lam_ref > 0:
            with torch.no_grad():
                mu_ref, logvar_ref = self.ref_enc(tokens)
            out["ref_kl"] = gaussian_kl(mu.float(), logvar.float(), mu_ref.float(), logvar_ref.float()).mean()
        out["logsnr"] = vae_logsnr(mu.detach(), logvar.detach())
        z0n = self.normalize(z.float())  # (B, L, d): flow matching on normalised latents
        B, L, _ = z0n.shape
        eps = torch.randn_like(z0n)
        t = sample_t(B, objective.t_loc, objective.t_scale, objective.t_uniform, tokens.device)  # (B,)
        w, bs = objective.t_rise, self.block_size
        t_tok = rising_t(t * (1 + w), bs, w).repeat(1, L // bs) if w else t.unsqueeze(1).expand(B, L)  # (B, L)
        known = partial_known_prefix(B, L, bs, objective.partial_prob, tokens.device)  # (B, L)
        t_tok = torch.where(known, torch.zeros_like(t_tok), t_tok)
        known = known | (t_tok == 0)  # a latent at t = 0 (rising t) holds no noise to predict
        zt = flow_path(z0n, eps, t_tok)  # the FM gradient reaches the encoder through z_t
        out["fm"] = fm_loss(self.velocity_2l(z0n, zt, t_tok), velocity_target(z0n.detach(), eps), ~known)
        vae_terms = out["ce"] + objective.beta * out["neg_entropy"] + objective.lam_mask * out["mask_ce"]
        out["loss"] = objective.lam_vae * vae_terms + objective.lam_fm * out["fm"] + objective.lam_ref * out["ref_kl"]
        return out

    # the cached passes of block-wise generation (docs/method.md §6; decoder.generate is the loop)

    def new_caches(self):
        """(DiT cache, decoder cache), both empty."""
        return KVCache(self.dit.cfg.n_layers), KVCache(self.vae.cfg.n_dec_layers)

    def decoder_input(self, zn):
        """The decoder reads raw latents (the release's reads normalised ones)."""
        return zn if self.decoder_reads_normalized else self.denormalize(zn)

    def prefill(self, zn, key_valid, caches):
        """Commit whole clean prompt blocks zn (B, Tc, d) to both caches (the DiT's at t = 0); key_valid (B, Tc)."""
        B, Tc, _ = zn.shape
        pos = torch.arange(Tc, device=zn.device)
        self.dit(zn, zn.new_zeros(B, Tc), pos, prefix_mask(key_valid, self.block_size), caches[0], commit=True)
        self.vae.decode(self.decoder_input(zn), pos, prefix_mask(key_valid, self.vae.cfg.block_size), caches[1])

    def guided_velocity(self, z, t_tok, hist_valid, guidance, dit_cache):
        """v_u + s (v_c - v_u) of the noisy block z (B, bs, d) at t_tok (B, bs) after the cached history (real where
        hist_valid (B, Tc)): the conditional rows (history + block) and the unconditional ones (the block alone, at
        positions 0..bs-1) run as one batch, as DiT's forward_with_cfg. guidance: a number or one per row (B,)."""
        B, bs, _ = z.shape
        Tc = hist_valid.shape[1]
        pos = torch.arange(Tc, Tc + bs, device=z.device)  # (bs,)
        cond_mask, uncond_mask = cached_block_masks(hist_valid, bs)
        if not torch.is_tensor(guidance) and guidance == 1.0:  # the conditional pass alone
            return self.dit(z, t_tok, pos, cond_mask, dit_cache)
        both_pos = torch.cat([pos.expand(B, bs), torch.arange(bs, device=z.device).expand(B, bs)])  # (2B, bs)
        v = self.dit(torch.cat([z, z]), torch.cat([t_tok, t_tok]), both_pos, torch.cat([cond_mask, uncond_mask]),
                     dit_cache)  # (2B, bs, d)
        v_cond, v_uncond = v.chunk(2)
        return apply_guidance(v_cond, v_uncond, guidance)

    def decode_block(self, z, hist_valid, caches, commit=True):
        """Decoder logits (B, bs * patch, V) of the finished block z (B, bs, d), which then joins both caches
        (commit=False: the logits only, both caches unchanged; watch.py reads each step's estimate so)."""
        B, bs, _ = z.shape
        Tc = hist_valid.shape[1]
        pos = torch.arange(Tc, Tc + bs, device=z.device)
        key_valid = torch.cat([hist_valid, hist_valid.new_ones(B, bs)], 1)  # (B, Tc + bs)
        logits = self.vae.decode(self.decoder_input(z), pos, cached_causal_mask(key_valid, bs, self.vae.cfg.block_size),
                                 caches[1], commit)
        if commit:
            self.dit(z, z.new_zeros(B, bs), pos, cached_block_masks(hist_valid, bs)[0], caches[0], commit=True)
        return logits
