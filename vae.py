"""
The Text VAE of Cola DLM (docs/method.md §3): tokens <-> one continuous latent of d channels per `patch_size`
tokens, through block-causal transformers (a prompt is encoded and decoded block by block); the authors' released
architecture at every size (docs/release.md):
    encoder q_phi(z|x): embed -> patch (Conv1d) -> post-norm blocks -> Linear -> (mu: LayerNorm, logvar: clamped)
    decoder p_theta(x|z): Linear -> post-norm blocks -> unpatch -> LayerNorm -> Linear -> vocab
Stage 1: CE(decoder(z), x) + beta KL(q || N(0, I)) + lambda_mask CE(decoder(z~), x), z~ from 15% [MASK]ed text.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Attention, SwiGLU, block_causal_mask, init_weights


@dataclass
class VAEConfig:
    vocab_size: int = 50257         # tokenizer vocabulary; the encoder embedding has one extra row: [MASK]
    latent_dim: int = 16            # d: channels per latent (paper: 16)
    width: int = 128                # transformer width (paper: 1536)
    n_enc_layers: int = 2           # encoder blocks (paper: 4)
    n_dec_layers: int = 2           # decoder blocks (paper: 4)
    n_heads: int = 4                # attention heads (paper: 12 of 128)
    mlp_hidden: int = 384           # SwiGLU hidden size (release: 3072, its ffn_dim 6144 halved)
    block_size: int = 16            # latents per attention block (paper: 16; the DiT's is a multiple of it)
    patch_size: int = 1             # tokens per latent (paper tried 2)
    max_seq_len: int = 1024         # longest token sequence the model is meant for
    rope_theta: float = 500000.0    # RoPE base (paper: 500,000)
    norm_eps: float = 1e-6          # eps of every LayerNorm (release: 1e-6)
    dropout: float = 0.0            # dropout in attention/MLP outputs (paper: none)
    logvar_min: float = -30.0       # clamp of the posterior log-variance (paper: [-30, 20])
    logvar_max: float = 20.0
    fixed_logsnr: float = 0.0       # > 0: fixed posterior variance sigma^2 = exp(-logSNR) instead of learned

    @property
    def mask_id(self):
        return self.vocab_size


def gaussian_kl_std_normal(mu, logvar):
    """KL(N(mu, e^logvar) || N(0, I)) summed over the last (channel) dim."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def gaussian_kl(mu, logvar, mu_ref, logvar_ref):
    """KL(N(mu, e^logvar) || N(mu_ref, e^logvar_ref)) summed over the last dim."""
    return 0.5 * (logvar_ref - logvar + (logvar.exp() + (mu - mu_ref).pow(2)) / logvar_ref.exp() - 1.0).sum(-1)


def vae_logsnr(mu, logvar):
    """log(E[mu^2] / E[sigma^2]) over data, positions and channels (docs/method.md §3)."""
    return torch.log(mu.float().pow(2).mean() / logvar.float().exp().mean())


class VAEBlock(nn.Module):
    """The release's post-norm block: x <- LN_a(x) + Attn(x); x <- x + LN_m(SwiGLU(x))."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w = cfg.width
        self.attn = Attention(w, cfg.n_heads, cfg.rope_theta, 1.0, qk_norm="width", eps=cfg.norm_eps,
                              out_bias=True, dropout=cfg.dropout)
        self.ln_attn = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.mlp = SwiGLU(w, cfg.mlp_hidden, bias=True)
        self.ln_mlp = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, mask, cache=None, commit=False):
        x = self.ln_attn(x) + self.drop(self.attn(x, pos, mask, cache, commit))
        return x + self.drop(self.ln_mlp(self.mlp(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        self.embed = nn.Embedding(cfg.vocab_size + 1, w)  # + [MASK]
        self.patch = nn.Conv1d(w, w, kernel_size=p, stride=p)  # p tokens -> one latent (present at p = 1 too)
        self.blocks = nn.ModuleList(VAEBlock(cfg) for _ in range(cfg.n_enc_layers))
        self.to_latent = nn.Linear(w, 2 * cfg.latent_dim)

    def forward(self, tokens, mask=None):
        """tokens (B, T) -> mu, logvar (B, N, d) with N = T / patch_size."""
        cfg = self.cfg
        x = self.patch(self.embed(tokens).transpose(1, 2)).transpose(1, 2)  # (B, N, w)
        pos = torch.arange(x.shape[1], device=tokens.device)
        if mask is None:
            blk = pos // cfg.block_size
            mask = block_causal_mask(blk, blk)
        for block in self.blocks:
            x = block(x, pos, mask)
        mu, logvar = self.to_latent(x).chunk(2, dim=-1)  # (B, N, d) each
        mu = F.layer_norm(mu, (cfg.latent_dim,), eps=cfg.norm_eps)  # no parameters: E[mu^2] = 1 per latent
        if cfg.fixed_logsnr > 0:
            return mu, torch.full_like(logvar, -cfg.fixed_logsnr)
        return mu, logvar.clamp(cfg.logvar_min, cfg.logvar_max)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        self.from_latent = nn.Linear(cfg.latent_dim, w)
        self.blocks = nn.ModuleList(VAEBlock(cfg) for _ in range(cfg.n_dec_layers))
        self.unpatch = nn.Linear(w, p * w)  # one latent -> p token positions (present at p = 1 too)
        self.ln_f = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.head = nn.Linear(w, cfg.vocab_size)  # untied from the encoder embedding

    def forward(self, z, pos=None, mask=None, cache=None, commit=True):
        """z (B, N, d) -> logits (B, N * patch_size, V). With a cache, z is the next block(s), committed if `commit`."""
        cfg = self.cfg
        B, N, _ = z.shape
        if pos is None:
            pos = torch.arange(N, device=z.device)
        if mask is None:
            blk = pos // cfg.block_size
            mask = block_causal_mask(blk, blk)
        x = self.from_latent(z)  # (B, N, w)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, mask, None if cache is None else cache.layers[i], commit)
        # unpatch: channel c of token j of a latent is output c * p + j (the release's layout)
        x = self.unpatch(x).view(B, N, cfg.width, cfg.patch_size).transpose(2, 3).reshape(B, N * cfg.patch_size, -1)
        return self.head(self.ln_f(x))  # (B, T, V)


class TextVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.enc = Encoder(cfg)
        self.dec = Decoder(cfg)
        init_weights(self)  # N(0, 0.02) as the release; the blocks' output LayerNorms keep the stream tame

    def encode(self, tokens, mask=None):
        return self.enc(tokens, mask)

    def decode(self, z, pos=None, mask=None, cache=None, commit=True):
        return self.dec(z, pos, mask, cache, commit)

    @staticmethod
    def reparameterize(mu, logvar):
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def mask_tokens(self, tokens, mask_prob):
        """Replace a random `mask_prob` of the tokens with [MASK] (BERT-style branch)."""
        hide = torch.rand(tokens.shape, device=tokens.device) < mask_prob
        return torch.where(hide, torch.full_like(tokens, self.cfg.mask_id), tokens)

    def recon_terms(self, tokens, mask_prob, lam_mask):
        """The terms both stages share: CE of a sampled latent, the masked branch, the posterior. The clean and the
        masked copies run as one batch (one big head matmul is cheaper than two on CPU)."""
        B = tokens.shape[0]
        both = torch.cat([tokens, self.mask_tokens(tokens, mask_prob)]) if lam_mask > 0 else tokens  # (2B, T)
        mu, logvar = self.encode(both)  # (2B, N, d)
        z = self.reparameterize(mu, logvar)
        logits = self.decode(z)  # (2B, T, V)
        target = tokens.repeat(2, 1) if lam_mask > 0 else tokens
        ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none").view(-1, *tokens.shape)
        hit = (logits.argmax(-1) == target).float().view(-1, *tokens.shape)
        masked = (ce[1].mean(), hit[1].mean()) if lam_mask > 0 else (torch.zeros((), device=tokens.device),) * 2
        return {"mu": mu[:B], "logvar": logvar[:B], "z": z[:B], "ce": ce[0].mean(), "acc": hit[0].mean(),
                "mask_ce": masked[0], "mask_acc": masked[1]}

    def forward(self, tokens, beta=1e-3, mask_prob=0.15, lam_mask=1.0):
        """Stage-1 loss (docs/method.md §3). tokens (B, T) -> dict with 'loss' and metrics."""
        out = self.recon_terms(tokens, mask_prob, lam_mask)
        mu, logvar, _ = out.pop("mu"), out.pop("logvar"), out.pop("z")
        out["kl"] = gaussian_kl_std_normal(mu.float(), logvar.float()).mean()  # per latent, summed over d
        out["loss"] = out["ce"] + beta * out["kl"] + lam_mask * out["mask_ce"]
        out["logsnr"] = vae_logsnr(mu.detach(), logvar.detach())
        return out

    @torch.no_grad()
    def recon_accuracy(self, tokens):
        """Greedy token accuracy decoding the posterior mean."""
        mu, _ = self.encode(tokens)
        return (self.decode(mu).argmax(-1) == tokens).float().mean()
