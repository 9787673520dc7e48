"""
The baselines Cola DLM is matched against (docs/method.md §8), built from the same transformer pieces:

- AR: a LLaMA-style causal transformer trained on next-token CE; decoding with a KV cache.
- LLaDA: the same network with bidirectional attention, trained as a masked diffusion model: per
  sequence t ~ U(0, 1), each token masked with probability t, CE on the masked tokens divided by t.
  Sampling (decoder.py) starts from all [MASK] and over `steps` steps unmasks the most confident
  predictions (low-confidence remasking), optionally block by block (semi-autoregressive).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import build, load_weights
from layers import Block, attention_flops, block_causal_mask, init_weights, matmul_params, n_params, scale_residual_init


@dataclass
class LMConfig:
    kind: str = "ar"                # 'ar' (causal, next token) or 'llada' (bidirectional, masked diffusion)
    vocab_size: int = 50257         # tokenizer vocabulary; LLaDA's embedding has one extra row: [MASK]
    width: int = 128                # transformer width
    n_layers: int = 4               # transformer blocks
    n_heads: int = 4                # attention heads
    mlp_hidden: int = 384           # SwiGLU hidden size
    max_seq_len: int = 256          # context length in tokens
    rope_theta: float = 10000.0     # RoPE base
    dropout: float = 0.0            # dropout in attention/MLP outputs

    @property
    def mask_id(self):
        return self.vocab_size


class TransformerLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        assert cfg.kind in ("ar", "llada"), cfg.kind
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size + (cfg.kind == "llada"), cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.n_heads, cfg.mlp_hidden, cfg.rope_theta, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        init_weights(self)
        scale_residual_init(self, cfg.n_layers)

    @classmethod
    def from_checkpoint(cls, ckpt):
        """The model of a baseline checkpoint dict (checkpoint.load_checkpoint)."""
        model = cls(build(LMConfig, ckpt["lm_config"], ckpt))
        load_weights(model, ckpt["model"], ckpt)
        return model

    def train_flops_per_token(self, seq_len):
        """Training FLOPs per token (layers.py's convention)."""
        return 6 * matmul_params(self) + 3 * attention_flops(self.cfg.n_layers, self.cfg.width, seq_len)

    def logits(self, tokens, pos=None, mask=None, cache=None):
        B, T = tokens.shape
        if pos is None:
            start = 0 if cache is None else len(cache)
            pos = torch.arange(start, start + T, device=tokens.device)
        if mask is None and self.cfg.kind == "ar":
            kpos = torch.arange(pos[-1] + 1, device=tokens.device) if cache is not None else pos
            mask = block_causal_mask(pos, kpos)  # block size 1 = causal
        x = self.embed(tokens)  # (B, T, w)
        for i, blk in enumerate(self.blocks):
            x = blk(x, pos, mask, None if cache is None else cache.layers[i], commit=True)
        return self.head(self.ln_f(x))  # (B, T, V)

    def forward(self, tokens, **_):
        return self.ar_loss(tokens) if self.cfg.kind == "ar" else self.llada_loss(tokens)

    def ar_loss(self, tokens):
        logits = self.logits(tokens[:, :-1])  # (B, T-1, V)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        return {"loss": ce, "ce": ce, "acc": (logits.argmax(-1) == tokens[:, 1:]).float().mean()}

    def llada_loss(self, tokens, t=None, eps=1e-3):
        """Masked-diffusion loss: an upper bound on the NLL per token (LLaDA eq. 3)."""
        B, T = tokens.shape
        if t is None:
            t = torch.rand(B, device=tokens.device)
        t = (1 - eps) * t + eps  # (B,) never exactly 0
        masked = torch.rand(B, T, device=tokens.device) < t.unsqueeze(1)  # (B, T)
        noisy = torch.where(masked, torch.full_like(tokens, self.cfg.mask_id), tokens)
        logits = self.logits(noisy)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view(B, T)
        loss = ((ce * masked) / t.unsqueeze(1)).sum() / (B * T)
        hit = (logits.argmax(-1) == tokens) & masked
        return {"loss": loss, "masked_ce": (ce * masked).sum() / masked.sum().clamp(min=1),
                "acc": hit.sum() / masked.sum().clamp(min=1)}


def matched_lm_config(kind, target_params, vocab_size, width, n_heads, mlp_hidden, max_seq_len, dropout=0.0,
                      n_layers=0):
    """A baseline at `width` whose depth (unless n_layers is given) brings its parameter count closest
    to target_params, the Cola model's VAE + DiT."""
    cfg = LMConfig(kind=kind, vocab_size=vocab_size, width=width, n_heads=n_heads if width % n_heads == 0 else 1,
                   mlp_hidden=mlp_hidden, max_seq_len=max_seq_len, dropout=dropout)
    cfg.n_layers = n_layers or match_layers(target_params, cfg)
    return cfg


def match_layers(target_params, cfg: LMConfig):
    """The number of layers at cfg's width that brings the LM closest to target_params."""
    with torch.device("meta"):
        base = n_params(TransformerLM(LMConfig(**{**cfg.__dict__, "n_layers": 0})))
        one = n_params(Block(cfg.width, cfg.n_heads, cfg.mlp_hidden, cfg.rope_theta))
    return max(1, round((target_params - base) / one))
