"""
The baselines Cola DLM is matched against (SPEC §8), built from the same transformer pieces:

- AR: a LLaMA-style causal transformer trained on next-token CE; decoding with a KV cache.
- LLaDA: the same network with bidirectional attention, trained as a masked diffusion model: per
  sequence t ~ U(0, 1), each token masked with probability t, CE on the masked tokens divided by t.
  Sampling starts from all [MASK] and over `steps` steps unmasks the most confident predictions
  (low-confidence remasking), optionally block by block (semi-autoregressive).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Block, KVCache, block_causal_mask, init_weights, scale_residual_init


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


def match_layers(target_params, cfg: LMConfig):
    """The number of layers at cfg's width that brings the LM closest to target_params."""
    base = sum(p.numel() for p in TransformerLM(LMConfig(**{**cfg.__dict__, "n_layers": 0})).parameters())
    one = sum(p.numel() for p in Block(cfg.width, cfg.n_heads, cfg.mlp_hidden, cfg.rope_theta).parameters())
    return max(1, round((target_params - base) / one))


# ----------------------------------------------------------------------------------------------------
# sampling

@torch.no_grad()
def ar_generate(model, prompt, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                eos_id=None, generator=None, on_token=None):
    """Token-by-token decoding with a KV cache: one forward pass per token. prompt: list of ids."""
    from decoder import choose_tokens
    cfg = model.cfg
    device = model.head.weight.device
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        from decoder import GenerationError
        raise GenerationError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                              f"model's context of {cfg.max_seq_len} tokens")
    cache = KVCache(cfg.n_layers)
    seen = torch.zeros(1, cfg.vocab_size, dtype=torch.bool, device=device)
    ids = list(prompt) or [eos_id if eos_id is not None else 0]  # an empty prompt starts from <|endoftext|>
    seen[0, torch.tensor(prompt, dtype=torch.long, device=device)] = True if prompt else False
    x = torch.tensor([ids], device=device)
    out, passes = [], 0
    for _ in range(max_new_tokens):
        logits = model.logits(x, cache=cache)[:, -1:]  # (1, 1, V)
        passes += 1
        tok = int(choose_tokens(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)[0, 0])
        if tok == eos_id:
            break
        out.append(tok)
        seen[0, tok] = True
        if on_token is not None:
            on_token(tok)
        x = torch.tensor([[tok]], device=device)
    return out, {"passes": passes}


@torch.no_grad()
def llada_generate(model, prompt, max_new_tokens, steps=32, block_length=None, temperature=0.0, eos_id=None,
                   generator=None):
    """LLaDA sampling with low-confidence remasking. block_length < max_new_tokens gives semi-autoregressive
    blocks, each unmasked over steps * block_length / max_new_tokens steps."""
    cfg = model.cfg
    device = model.head.weight.device
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        from decoder import GenerationError
        raise GenerationError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                              f"model's context of {cfg.max_seq_len} tokens")
    block_length = block_length or max_new_tokens
    n_blocks = math.ceil(max_new_tokens / block_length)
    steps_per_block = max(1, steps // n_blocks)
    P = len(prompt)
    x = torch.full((1, P + max_new_tokens), cfg.mask_id, dtype=torch.long, device=device)
    if P:
        x[0, :P] = torch.tensor(prompt, device=device)
    passes = 0
    for b in range(n_blocks):
        lo, hi = P + b * block_length, min(P + (b + 1) * block_length, P + max_new_tokens)
        n_masked = hi - lo
        per_step = [n_masked // steps_per_block + (i < n_masked % steps_per_block) for i in range(steps_per_block)]
        for k in per_step:
            if k == 0:
                continue
            logits = model.logits(x).float()  # (1, T, V)
            passes += 1
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                pred = torch.multinomial(probs[0], 1, generator=generator).T  # (1, T)
            else:
                probs = torch.softmax(logits, -1)
                pred = logits.argmax(-1)
            conf = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)  # (1, T)
            eligible = torch.zeros_like(conf, dtype=torch.bool)
            eligible[:, lo:hi] = x[:, lo:hi] == cfg.mask_id
            conf = torch.where(eligible, conf, torch.full_like(conf, -1.0))
            pick = torch.topk(conf, k, dim=-1).indices  # the k most confident masked positions
            x[0, pick[0]] = pred[0, pick[0]]
    out = x[0, P:].tolist()
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id)]
    return out, {"passes": passes}
