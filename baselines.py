"""The baselines Cola DLM is matched against (docs/method.md §8), from the same transformer pieces: AR, a LLaMA-style
causal transformer on next-token CE, decoded with a KV cache; LLaDA, the same network with bidirectional attention
trained as a masked diffusion model (per sequence t ~ U(0, 1), each token masked with probability t, CE on the
masked tokens divided by t), sampled from all [MASK] by unmasking the most confident predictions over `steps`
passes (low-confidence remasking), optionally block by block. The network, its losses, then the two samplers."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from decoder import GenerationError, choose_tokens
from layers import Attention, KVCache, SwiGLU, block_causal_mask, init_weights, n_params, with_key_padding


class Block(nn.Module):
    """Pre-LN transformer block (LayerNorm, attention, SwiGLU) of the baselines (the VAE's is vae.VAEBlock)."""

    def __init__(self, width, n_heads, mlp_hidden, rope_theta, dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, n_heads, rope_theta, 1.0, qk_norm="head", dropout=dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = SwiGLU(width, mlp_hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pos, mask, cache=None, commit=False):
        x = x + self.drop(self.attn(self.ln1(x), pos, mask, cache, commit))
        return x + self.mlp(self.ln2(x))


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
        for name, p in self.named_parameters():  # output projections at 0.02 / sqrt(2 n_layers), as GPT-2
            if name.endswith("attn.proj.weight") or name.endswith("mlp.out.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))

    def logits(self, tokens, pos=None, mask=None, cache=None):
        """(B, T, V) next-token logits; pos and mask default to a whole uncached sequence (causal for AR)."""
        pos = torch.arange(tokens.shape[1], device=tokens.device) if pos is None else pos
        if mask is None and self.cfg.kind == "ar":
            mask = block_causal_mask(pos, pos)  # block size 1 = causal
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
        t = (1 - eps) * (torch.rand(B, device=tokens.device) if t is None else t) + eps  # (B,) never exactly 0
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
    """A baseline at `width` of n_layers, or of the depth closest to target_params (Cola's VAE + DiT)."""
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


def left_pad(model, prompts, max_new_tokens, pad_id):
    """Prompts right-aligned on the model's device: tokens (B, P) and their validity (B, P); an empty prompt is the
    single token pad_id (<|endoftext|>, the start of a document). Beyond the context, a GenerationError."""
    if not prompts:
        raise GenerationError("no prompts given")
    longest, context = max(len(p) for p in prompts), model.cfg.max_seq_len
    if longest + max_new_tokens > context:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                              f"model's context of {context} tokens")
    rows, device = [list(p) or [pad_id] for p in prompts], model.head.weight.device
    P = max(len(r) for r in rows)
    return (torch.tensor([[pad_id] * (P - len(r)) + r for r in rows], dtype=torch.long, device=device),
            torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows], device=device))


@torch.no_grad()
def ar_generate(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                eos_id=50256, generator=None, on_token=None):
    """KV-cached decoding of a left-padded batch, padded keys masked (RoPE sees relative positions: each row gets what
    it would alone) -> (new-token lists, {'passes': n}); on_token(new tokens or None once stopped, their probs)."""
    tokens, key_valid = left_pad(model, prompts, max_new_tokens, eos_id)
    (B, P), device = tokens.shape, tokens.device
    pos, cache = torch.arange(P, device=device), KVCache(model.cfg.n_layers)
    logits = model.logits(tokens, pos, with_key_padding(block_causal_mask(pos, pos), key_valid, key_valid), cache)
    seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)  # generated tokens (the penalty's)
    outs, done, passes = [[] for _ in range(B)], [False] * B, 1
    for n in range(max_new_tokens):
        tok = choose_tokens(logits[:, -1:], seen, temperature, top_k, top_p, repetition_penalty, generator)  # (B, 1)
        new = [None if d or t == eos_id else t for d, t in zip(done, tok[:, 0].tolist())]
        done, outs = [t is None for t in new], [o if t is None else o + [t] for o, t in zip(outs, new)]
        seen[torch.arange(B, device=device), tok[:, 0]] = True
        if on_token is not None:
            on_token(new, torch.softmax(logits[:, -1].float(), -1).gather(1, tok)[:, 0])
        if all(done) or n == max_new_tokens - 1:
            break
        key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
        logits = model.logits(tok, pos[-1:] + n + 1, key_valid[:, None, None, :], cache)  # (B, 1, V)
        passes += 1
    return outs, {"passes": passes}


@torch.no_grad()
def llada_generate(model, prompts, max_new_tokens, steps=32, block_length=None, temperature=0.0, eos_id=50256,
                   generator=None, on_step=None):
    """LLaDA sampling with low-confidence remasking (left-padded, padded keys masked); block_length < max_new_tokens:
    semi-autoregressive blocks of steps * block_length / max_new_tokens steps -> (new-token lists, {'passes': n}).
    on_step(x, conf) after each pass: the new tokens (B, N; mask_id if masked), each one's unmasking probability."""
    prompt, prompt_valid = left_pad(model, prompts, max_new_tokens, eos_id)
    (B, P), device, mask_id = prompt.shape, prompt.device, model.cfg.mask_id
    x = torch.cat([prompt, torch.full((B, max_new_tokens), mask_id, dtype=torch.long, device=device)], 1)  # (B, T)
    key_valid = torch.cat([prompt_valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], 1)
    T, block_length = x.shape[1], block_length or max_new_tokens
    attn = with_key_padding(torch.ones(T, T, dtype=torch.bool, device=device), key_valid, key_valid)
    pos, n_blocks = torch.arange(T, device=device), math.ceil(max_new_tokens / block_length)
    steps_per_block = max(1, steps // n_blocks)
    passes, unmasked_conf = 0, torch.zeros(B, T, device=device)
    for blk in range(n_blocks):
        lo, hi = P + blk * block_length, min(P + (blk + 1) * block_length, T)
        for i in range(steps_per_block):
            k = (hi - lo) // steps_per_block + (i < (hi - lo) % steps_per_block)  # positions to unmask this step
            if k == 0:
                continue
            logits = model.logits(x, pos, attn).float()  # (B, T, V)
            passes += 1
            probs = torch.softmax(logits / max(temperature, 1e-8) if temperature > 0 else logits, -1)
            pred = (torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(B, T) if temperature > 0
                    else logits.argmax(-1))
            conf = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)  # (B, T)
            conf = torch.where((x == mask_id) & (pos >= lo) & (pos < hi), conf, -1.0)  # only this block's masks
            pick = torch.topk(conf, k, dim=-1).indices  # (B, k): the k most confident masked positions per row
            x.scatter_(1, pick, pred.gather(1, pick))
            if on_step is not None:
                on_step(x[:, P:], unmasked_conf.scatter_(1, pick, conf.gather(1, pick))[:, P:])
    return [row[:row.index(eos_id)] if eos_id in row else row for row in x[:, P:].tolist()], {"passes": passes}


def lm_generate(kind, model, prompts, max_new_tokens, sampler, generator=None, steps=32, block_length=None,
                on_token=None, on_step=None):
    """AR or LLaDA under a decoder.SamplerConfig (LLaDA: `steps` passes, temperature only; hooks on_token, on_step)."""
    if kind == "ar":
        return ar_generate(model, prompts, max_new_tokens, sampler.temperature, sampler.top_k, sampler.top_p,
                           sampler.repetition_penalty, sampler.stop_ids[0], generator, on_token)
    return llada_generate(model, prompts, max_new_tokens, steps, block_length, sampler.temperature, sampler.stop_ids[0],
                          generator, on_step)
