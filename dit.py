"""
The block-causal DiT of Cola DLM: the prior p_psi(z0) over VAE latents, a velocity network trained by
flow matching (docs/method.md §4). Bidirectional attention inside a block of `block_size` latents, causal across
blocks; one timestep per latent (clean context latents carry t = 0).

    z (B, T, d) -> Linear -> N x [adaLN-Zero block] -> LN + adaLN shift/scale -> Linear -> v (B, T, d)

adaLN-Zero (DiT, Peebles & Xie): from SiLU(t_emb) a Linear gives shift/scale/gate for the attention
and MLP sublayers, zero-initialised with the output projection so every block starts as the identity.
Attention has per-head QK LayerNorm and RoPE (optionally on a fraction of each head's channels); a KV
cache holds the clean context blocks during generation.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from layers import Attention, KVCache


@dataclass
class DiTConfig:
    latent_dim: int = 16            # d: channels per latent (must match the VAE)
    width: int = 192                # transformer width (paper: 2048)
    n_layers: int = 4               # DiT blocks (paper: 24)
    n_heads: int = 4                # attention heads (paper: 16 of 128)
    mlp_hidden: int = 0             # GELU-tanh MLP hidden size; 0 = 4 * width (paper: 8192)
    block_size: int = 16            # latents per block (paper: 16)
    rope_theta: float = 10000.0     # RoPE base (paper: 10,000)
    rope_fraction: float = 1.0      # fraction of each head's channels rotated (paper: 96/128 = 0.75)
    freq_dim: int = 256             # sinusoidal features of the timestep (paper: 256)
    dropout: float = 0.0            # attention/MLP dropout (paper: none)
    adaln_zero: bool = True         # zero-init modulation and output (DiT's adaLN-Zero); False: Xavier everywhere,
                                    # as the authors' release initialises it (its zero-init is never called)
    token_head_dim: int = 0         # > 0 (not the paper's): a training-only projection of the middle block's
                                    # hidden states to the VAE decoder's head, for an auxiliary token loss
    self_cond: bool = False         # (not the paper's) the DiT also reads an estimate of z0 (self-conditioning)

    @property
    def hidden(self):
        return self.mlp_hidden or 4 * self.width


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal features of 1000*t (docs/method.md §2: the network sees t in [0, 1000]). t (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float()).unsqueeze(-1) * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width, freq_dim):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):  # (B, T) -> (B, T, width)
        return self.mlp(timestep_embedding(t, self.freq_dim))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        w = cfg.width
        self.ln1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(w, cfg.n_heads, cfg.rope_theta, cfg.rope_fraction, qk_norm=True, dropout=cfg.dropout)
        self.ln2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(w, cfg.hidden), nn.GELU(approximate="tanh"), nn.Linear(cfg.hidden, w),
                                 nn.Dropout(cfg.dropout))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))

    def forward(self, x, c, pos, mask, cache=None, commit=False):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).chunk(6, dim=-1)  # 6 x (B, T, w)
        x = x + gate_a * self.attn(modulate(self.ln1(x), shift_a, scale_a), pos, mask, cache, commit)
        return x + gate_m * self.mlp(modulate(self.ln2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, width, out_dim):
        super().__init__()
        self.ln = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, out_dim)

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.ln(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.latent_dim * (2 if cfg.self_cond else 1), cfg.width)
        self.t_embed = TimestepEmbedder(cfg.width, cfg.freq_dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.final = FinalLayer(cfg.width, cfg.latent_dim)
        if cfg.token_head_dim:
            self.token_proj = nn.Linear(cfg.width, cfg.token_head_dim)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: Xavier Linear, N(0, 0.02) timestep MLP, and zeros on every adaLN modulation and
        the output projection (adaLN-Zero): each block starts as the identity and the output as 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if not self.cfg.adaln_zero:
            return
        for m in self.t_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        nn.init.zeros_(self.final.out.weight)
        nn.init.zeros_(self.final.out.bias)

    def new_cache(self):
        return KVCache(self.cfg.n_layers)

    def forward(self, z, t, pos, mask, cache=None, commit=False, with_tokens=False, hint=None):
        """z (B, T, d) latents; t (B, T) per-latent time in [0, 1]; pos (T,) or (B, T) RoPE positions;
        mask (T, Tk) or (B, 1, T, Tk) bool, True = may attend (Tk includes cached keys).
        With a cache, the new keys are stored only if `commit` (clean blocks at t = 0).
        with_tokens: also return token_proj of the middle block's output (B, T, token_head_dim).
        hint (B, T, d): with self_cond, an estimate of z0 (None: zeros); a clean latent (t = 0) is its own."""
        if self.cfg.self_cond:
            hint = torch.zeros_like(z) if hint is None else hint
            z = torch.cat([z, torch.where(t.unsqueeze(-1) == 0, z, hint)], -1)  # (B, T, 2d)
        x = self.inp(z)  # (B, T, w)
        c = self.t_embed(t)  # (B, T, w)
        mid = None
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, pos, mask, None if cache is None else cache.layers[i], commit)
            if with_tokens and i == (len(self.blocks) - 1) // 2:
                mid = self.token_proj(x)
        v = self.final(x, c)  # (B, T, d)
        return (v, mid) if with_tokens else v
