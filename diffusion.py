"""
Flow matching over VAE latents, and the joint stage-2 objective of Cola DLM (SPEC §2, §4, §5).

Time convention, fixed for the whole codebase: t in [0, 1], t = 0 is data, t = 1 is noise.
    z_t = (1 - t) * z0 + t * eps,   eps ~ N(0, I),   velocity target v = eps - z0,
and sampling integrates from t = 1 down to 0 with Euler steps z <- z - dt * v_hat.

The pure functions (sample_t, flow_path, velocity_target, two_l_layout, fm_loss, euler_step,
cfg_combine, latent_stats, ...) are what the tests pin; ColaDLM wires them to the VAE and the DiT.
"""
import copy

import torch
import torch.nn as nn

from dit import DiT, DiTConfig
from layers import cola_mask
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
    """Classifier-free guidance on the whole velocity prediction: v_u + s (v_c - v_u); s = 1 is off."""
    if scale == 1.0:
        return v_cond  # exactly, not up to rounding
    return v_uncond + scale * (v_cond - v_uncond)


def time_grid(steps, device="cpu"):
    """Uniform grid from t = 1 to t = 0 with `steps` intervals (paper: 16)."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


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


# ----------------------------------------------------------------------------------------------------
# the joint model

class ColaDLM(nn.Module):
    """Text VAE + block-causal DiT prior + frozen reference encoder + latent normalisation."""

    def __init__(self, vae_cfg: VAEConfig, dit_cfg: DiTConfig):
        super().__init__()
        assert vae_cfg.latent_dim == dit_cfg.latent_dim and vae_cfg.block_size == dit_cfg.block_size
        self.vae = TextVAE(vae_cfg)
        self.dit = DiT(dit_cfg)
        self.ref_enc = copy.deepcopy(self.vae.enc)  # frozen stage-1 encoder q_phi_ref (set by init_from_vae)
        self.ref_enc.requires_grad_(False)
        self.register_buffer("latent_shift", torch.zeros(vae_cfg.latent_dim))
        self.register_buffer("latent_scale", torch.ones(vae_cfg.latent_dim))

    @property
    def block_size(self):
        return self.dit.cfg.block_size

    def init_from_vae(self, vae_state, shift, scale):
        self.vae.load_state_dict(vae_state)
        self.ref_enc.load_state_dict(self.vae.enc.state_dict())
        self.latent_shift.copy_(shift)
        self.latent_scale.copy_(scale)

    def train(self, mode=True):
        super().train(mode)
        self.ref_enc.eval()  # the reference never has dropout on
        return self

    def normalize(self, z):
        return (z - self.latent_shift) * self.latent_scale

    def denormalize(self, zn):
        return zn / self.latent_scale + self.latent_shift

    def velocity_2l(self, z0n, zt, t_tok):
        """DiT velocity on the noisy half of the 2L sequence. z0n, zt (B, L, d); t_tok (B, L)."""
        L = zt.shape[1]
        seq, t, pos, mask = two_l_layout(z0n, zt, t_tok, self.block_size)
        return self.dit(seq, t, pos, mask)[:, L - self.block_size:]  # (B, L, d)

    def velocity_uncond(self, zt, t_tok):
        """Each noisy block alone at positions 0..bs-1 (the unconditional pass of CFG)."""
        B, L, d = zt.shape
        bs = self.block_size
        pos = torch.arange(bs, device=zt.device)
        mask = torch.ones(bs, bs, dtype=torch.bool, device=zt.device)
        v = self.dit(zt.reshape(B * L // bs, bs, d), t_tok.reshape(-1, bs), pos, mask)
        return v.reshape(B, L, d)

    def forward(self, tokens, beta=1e-3, mask_prob=0.15, lam_mask=1.0, lam_vae=1.0, lam_fm=1.0, lam_ref=1.0,
                t_loc=1.0, t_scale=1.0, t_uniform=False, partial_prob=0.05, detach_zt=False, decode_rows=0):
        """Stage-2 loss (SPEC §5). tokens (B, T) -> dict with 'loss' and its parts.
        decode_rows > 0 (off in the paper) runs the decoder terms, whose vocabulary head is the costly part at
        small width, on the first decode_rows sequences only; every sequence feeds the encoder, the entropy,
        the reference KL and the FM term. Both estimates stay unbiased; the prior just sees a larger batch."""
        vae = self.vae
        n_dec = decode_rows if 0 < decode_rows < tokens.shape[0] else tokens.shape[0]
        out = vae.recon_terms(tokens[:n_dec], mask_prob, lam_mask)
        mu, logvar, z = out.pop("mu"), out.pop("logvar"), out.pop("z")  # (n_dec, L, d)
        if n_dec < tokens.shape[0]:  # the other sequences: encoder only
            mu2, logvar2 = vae.encode(tokens[n_dec:])
            mu, logvar = torch.cat([mu, mu2]), torch.cat([logvar, logvar2])  # (B, L, d)
            z = torch.cat([z, vae.reparameterize(mu2, logvar2)])
        # beta * E_q log q(z|x) = -beta * entropy: keeps the posterior from shrinking to a point
        out["neg_entropy"] = (-0.5 * (logvar.float() + 1.0 + 1.8378770664093453)).sum(-1).mean()
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
        v_pred = self.velocity_2l(z0n, zt, t_tok)
        out["fm"] = fm_loss(v_pred, velocity_target(z0n.detach(), eps), ~known)
        out["loss"] = (lam_vae * (out["ce"] + beta * out["neg_entropy"] + lam_mask * out["mask_ce"])
                       + lam_fm * out["fm"] + lam_ref * out["ref_kl"])
        return out

    @torch.no_grad()
    def fm_eval(self, tokens, t_loc=1.0, t_scale=1.0, t_uniform=False, generator=None):
        """FM loss with the clean history (cond) and without it (uncond, each block alone) on the same
        noise, with the posterior mean as z0. Returns t (B,) and the losses per block, cond and uncond
        (B, n_blocks). Block 0 has no history, so its two losses are equal: compare blocks 1.. (history_gap)."""
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
