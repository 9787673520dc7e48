"""
The block-causal DiT of Cola DLM (docs/method.md §4): the prior p_psi(z0) over VAE latents, a velocity network
trained by flow matching, bidirectional inside a block of `block_size` latents and causal across blocks, one t per
latent (clean context at t = 0); the authors' released architecture at every size (docs/release.md):
    z (B, T, d) -> Linear -> N x [adaLN block] -> LN + adaLN shift/scale -> Linear -> v (B, T, d)
adaLN (DiT, Peebles & Xie): SiLU of the timestep embedding (of 1000 t) gives each sublayer's shift, scale and gate.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Attention


@dataclass
class DiTConfig:
    latent_dim: int = 16            # d: channels per latent (must match the VAE)
    width: int = 192                # transformer width, also of the timestep embedding (paper: 2048)
    n_layers: int = 4               # DiT blocks (paper: 24)
    n_heads: int = 4                # attention heads (paper: 16 of 128)
    mlp_hidden: int = 0             # GELU-tanh MLP hidden size; 0 = 4 * width (paper: 8192)
    block_size: int = 16            # latents per block (paper: 16)
    rope_theta: float = 10000.0     # RoPE base (paper: 10,000)
    rope_fraction: float = 0.75     # fraction of each head's channels rotated (paper: 96/128)
    freq_dim: int = 256             # sinusoidal features of the timestep (paper: 256)
    norm_eps: float = 1e-5          # eps of every LayerNorm (release: 1e-5)
    dropout: float = 0.0            # attention/MLP dropout (paper: none)
    adaln_zero: bool = True         # zero-init modulation and output (DiT's adaLN-Zero); False: Xavier everywhere,
                                    # as the authors' release initialises it (its zero-init is never called)


def timestep_embedding(t1000, dim, max_period=10000.0):
    """[sin | cos] features of the network's time t1000 = 1000 t (docs/method.md §2). (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t1000.device) / half)
    args = t1000.float().unsqueeze(-1) * freqs  # (..., half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width, freq_dim):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width))

    def forward(self, t1000):  # (B, T) -> (B, T, width)
        return self.mlp(timestep_embedding(t1000, self.freq_dim))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        w, eps, hidden = cfg.width, cfg.norm_eps, cfg.mlp_hidden or 4 * cfg.width
        self.ln1 = nn.LayerNorm(w, elementwise_affine=False, eps=eps)
        self.attn = Attention(w, cfg.n_heads, cfg.rope_theta, cfg.rope_fraction, qk_norm="head", eps=eps,
                              interleaved=True, dropout=cfg.dropout)
        self.ln2 = nn.LayerNorm(w, elementwise_affine=False, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, w),
                                 nn.Dropout(cfg.dropout))
        self.ada_attn = nn.Linear(w, 2 * w)  # shift, scale before attention
        self.gate_attn = nn.Linear(w, w)
        self.ada_mlp = nn.Linear(w, 2 * w)   # shift, scale before the MLP
        self.gate_mlp = nn.Linear(w, w)

    def forward(self, x, c, pos, mask, cache=None, commit=False):
        """c (B, T, w) is SiLU of the timestep embedding."""
        shift, scale = self.ada_attn(c).chunk(2, dim=-1)  # 2 x (B, T, w)
        x = x + self.gate_attn(c) * self.attn(modulate(self.ln1(x), shift, scale), pos, mask, cache, commit)
        shift, scale = self.ada_mlp(c).chunk(2, dim=-1)
        return x + self.gate_mlp(c) * self.mlp(modulate(self.ln2(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width, out_dim, eps):
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=eps)
        self.ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, out_dim)

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.ln(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.latent_dim, cfg.width)
        self.t_embed = TimestepEmbedder(cfg.width, cfg.freq_dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.final = FinalLayer(cfg.width, cfg.latent_dim, cfg.norm_eps)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier Linear; adaLN-Zero adds DiT's N(0, 0.02) timestep MLP and zeros on every adaLN map and the output
        projection: each block starts as the identity."""
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
        zeroed = [m for b in self.blocks for m in (b.ada_attn, b.gate_attn, b.ada_mlp, b.gate_mlp)]
        for m in zeroed + [self.final.ada, self.final.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, z, t):
        """The stream x (B, T, w) of the latents and what every adaLN Linear reads, c = SiLU(t_emb) (B, T, w);
        the network's time is 1000 t. A method of its own only for release.py, whose DiT rounds these inputs."""
        return self.inp(z), F.silu(self.t_embed(1000.0 * t.float()))

    def forward(self, z, t, pos, mask, cache=None, commit=False):
        """z (B, T, d) latents; t (B, T) per-latent time in [0, 1]; pos (T,) or (B, T) RoPE positions;
        mask (T, Tk) or (B, 1, T, Tk) bool, True = may attend (Tk includes cached keys).
        With a cache, the new keys are stored only if `commit` (clean blocks at t = 0)."""
        x, c = self.embed(z, t)
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, pos, mask, None if cache is None else cache.layers[i], commit)
        return self.final(x, c)  # (B, T, d)
