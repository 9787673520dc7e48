"""
Cola DLM's block-by-block conditional decoding (docs/method.md §6): the paper's generation loop.

  1. the prompt's posterior means, normalised, prefill the DiT's KV cache (at t = 0) and the decoder's;
  2. each new block takes `steps` guided Euler steps from noise at t = 1 to 0 (the conditional pass reads the
     cache, the unconditional one sees the block alone); known latents of a partial last prompt block stay
     pinned clean ("clean-condition repaint");
  3. the VAE decoder turns the block into tokens in one parallel pass, and the block joins both caches.
Prompts of different lengths are left-padded by whole blocks, hidden by the masks; RoPE sees relative positions.
"""
import math
from dataclasses import dataclass

import torch

from diffusion import euler_step, time_grid
from layers import prefix_mask


@dataclass
class SamplerConfig:
    """How to sample (docs/method.md §6). Checkpoints store their preset's (sample.py's defaults)."""
    steps: int = 16                 # Euler steps per block (paper: 16)
    guidance: float = 7.0           # classifier-free guidance on the whole velocity; 1 = off (paper: 7)
    noise_scale: float = 1.0        # std of each block's starting noise; < 1 is a lower-temperature draw (paper: 1)
    temperature: float = 0.0        # token choice: 0 = greedy
    top_k: int = 0                  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0              # nucleus mass (1 = off)
    repetition_penalty: float = 1.1  # CTRL-style, over every token decoded so far (1 = off)
    stop_ids: tuple = (50256,)      # a row ends before the first of these (<|endoftext|>)
    pad_id: int = 50256             # fills a prompt's partial last block (the encoder reads it) and empty prompts


class GenerationError(ValueError):
    """A request generate() cannot serve; the message is one line meant for the user."""


@dataclass
class BlockState:
    """What on_block(state) sees after each block: the hook of measures and of samplers built on this loop."""
    k: int                          # the block's index among the generated ones
    z: torch.Tensor                 # (B, bs, d) its normalised latents
    decoded: torch.Tensor           # (B, bs * patch) the tokens chosen from its logits (prompt positions too)
    tokens: torch.Tensor            # (B, N * patch) every token so far: the prompt's blocks, then the decoded ones
    hist_valid: torch.Tensor        # (B, N) which latents of the caches are real (not left padding)
    caches: tuple                   # (DiT cache, decoder cache); a hook may refill them in place
    kept: list                      # per row, the new tokens this block added to its output


# token choice (pure)

def choose_tokens(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """Pick one token per position. logits (B, T, V) -> (B, T). temperature 0 = greedy. The repetition penalty
    (CTRL's) divides the positive logits of the tokens seen (B, V) by it, and multiplies the negative ones."""
    logits, p = logits.float(), repetition_penalty
    if seen is not None and p != 1.0:
        logits = torch.where(seen.unsqueeze(1), torch.where(logits > 0, logits / p, logits * p), logits)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest set reaching top_p
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits.masked_fill(drop, -torch.inf))
    probs = torch.softmax(logits, -1)
    B, T, V = probs.shape
    return torch.multinomial(probs.reshape(B * T, V), 1, generator=generator).reshape(B, T)


# the pieces of the loop

def prompt_layout(prompts, block_size, patch, pad_id, device):
    """Lay prompts out in blocks: a partial last block is filled with pad_id (the encoder reads it, as in the
    release), then rows are left-padded by whole blocks. Returns tokens (B, Tp), the latents a pass may attend to
    (B, Np), the number of full prompt blocks (after padding), and per row the tokens of its partial block."""
    tpb = block_size * patch
    n_full = [len(p) // tpb for p in prompts]
    rem = [len(p) % tpb for p in prompts]
    n_blocks = max(n_full) + (1 if any(rem) else 0)
    tokens = torch.full((len(prompts), n_blocks * tpb), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), n_blocks * block_size, dtype=torch.bool)
    for b, p in enumerate(prompts):
        start = (max(n_full) - n_full[b]) * tpb
        tokens[b, start:start + len(p)] = torch.tensor(p, dtype=torch.long)
        n_lat = (n_full[b] + (rem[b] > 0)) * block_size  # the partial block whole, its pads included
        valid[b, start // patch:start // patch + n_lat] = True
    return tokens.to(device), valid.to(device), max(n_full), rem


def encode_normalised(model, tokens, valid):
    """Normalised posterior means (B, N, d) of token rows (B, N * patch), latents marked invalid hidden."""
    if tokens.shape[1] == 0:
        return torch.zeros(tokens.shape[0], 0, model.vae.cfg.latent_dim, device=tokens.device)
    mu, _ = model.vae.encode(tokens, prefix_mask(valid, model.vae.cfg.block_size))
    return model.normalize(mu.float())


def denoise_block(model, z, grid, hist_valid, guidance, dit_cache, pin=None, pin_z=None):
    """Guided Euler steps of the next block z (B, bs, d) along `grid` (t = grid[0] down to grid[-1]), after the
    history in the DiT cache; latents marked in `pin` (B, bs) are held at pin_z, at t = 0."""
    B, bs, _ = z.shape
    pin = torch.zeros(B, bs, dtype=torch.bool, device=z.device) if pin is None else pin
    pin_z = z if pin_z is None else pin_z
    for i in range(len(grid) - 1):
        z = torch.where(pin.unsqueeze(-1), pin_z, z)
        t_tok = torch.where(pin, torch.zeros_like(z[..., 0]), grid[i].expand(B, bs))  # (B, bs)
        v = model.guided_velocity(z, t_tok, hist_valid, guidance, dit_cache).float()
        z = euler_step(z, v, grid[i] - grid[i + 1])
    return torch.where(pin.unsqueeze(-1), pin_z, z)


def check_request(model, prompts, max_new_tokens, rem):
    """The number of blocks that give every row max_new_tokens; beyond the model's context, a GenerationError."""
    if not prompts:
        raise GenerationError("no prompts given")
    tpb, context = model.block_size * model.vae.cfg.patch_size, model.vae.cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    n_blocks = max(math.ceil((r + max_new_tokens) / tpb) for r in rem)
    if (longest // tpb) * tpb + n_blocks * tpb > context:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                              f"context of {context} tokens; ask for fewer new tokens")
    return n_blocks


# the loop

@torch.no_grad()
def generate(model, prompts, max_new_tokens, cfg=SamplerConfig(), generator=None, noise=None, on_block=None):
    """Continue token-id `prompts` (a list of lists, any lengths, may be empty) by max_new_tokens tokens each,
    block by block. Returns (per row the new tokens, cut before its first stop token; {'blocks': generated}).
    noise(k, shape) gives block k's starting noise (default: N(0, I) from `generator`); on_block(BlockState)
    runs after each block, and generation ends early if it returns True."""
    B, bs, d, patch = len(prompts), model.block_size, model.vae.cfg.latent_dim, model.vae.cfg.patch_size
    device = model.latent_shift.device
    tokens, valid, n_full, rem = prompt_layout(prompts, bs, patch, cfg.pad_id, device)
    n_blocks = check_request(model, prompts, max_new_tokens, rem)
    Tc = n_full * bs  # latents of the full prompt blocks
    prompt_zn = encode_normalised(model, tokens, valid)  # (B, Np, d)
    caches, hist_valid = model.new_caches(), valid[:, :Tc]  # (B, Tc): real latents among the committed ones
    if Tc > 0:
        model.prefill(prompt_zn[:, :Tc], hist_valid, caches)
    pin = torch.tensor([[i < math.ceil(r / patch) for i in range(bs)] for r in rem], device=device)  # (B, bs)
    pin_z = prompt_zn[:, Tc:] if prompt_zn.shape[1] > Tc else None  # repaint: the partial block's known latents
    given = torch.arange(bs * patch, device=device) < torch.tensor(rem, device=device)[:, None]  # (B, tpb)
    prompt_part, tokens = tokens[:, Tc * patch:], tokens[:, :Tc * patch]
    guidance = cfg.guidance  # a row with no history has equal conditional and unconditional passes: no guidance
    if guidance != 1.0 and not bool(hist_valid.any(1).all()):
        guidance = torch.where(hist_valid.any(1), guidance, 1.0)  # (B,)
    seen = torch.zeros(B, model.vae.cfg.vocab_size, dtype=torch.bool, device=device)  # every token decoded so far
    outputs, ended, grid = [[] for _ in range(B)], [False] * B, time_grid(cfg.steps, device)
    for k in range(n_blocks):
        shape = (B, bs, d)
        z = cfg.noise_scale * (noise(k, shape) if noise else torch.randn(shape, device=device, generator=generator))
        z = denoise_block(model, z, grid, hist_valid, guidance if k == 0 else cfg.guidance, caches[0], pin, pin_z)
        if not torch.isfinite(z).all():
            raise GenerationError(f"block {k}'s latents are not finite: lower the guidance or the noise scale")
        logits = model.decode_and_commit(z, hist_valid, caches)  # (B, tpb, V)
        hist_valid = torch.cat([hist_valid, torch.ones_like(pin)], 1)
        decoded = choose_tokens(logits, seen, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, generator)
        seen.scatter_(1, decoded, True)
        tokens = torch.cat([tokens, torch.where(given, prompt_part, decoded) if k == 0 and Tc < valid.shape[1]
                            else decoded], 1)  # the prompt's own tokens as given
        kept = []
        for b in range(B):
            fresh, stop = keep_until_stop(decoded[b, rem[b] if k == 0 else 0:].tolist(),
                                          0 if ended[b] else max_new_tokens - len(outputs[b]), cfg.stop_ids)
            outputs[b] += fresh
            ended[b] = ended[b] or stop or len(outputs[b]) >= max_new_tokens
            kept.append(fresh)
        pin, pin_z = torch.zeros_like(pin), None
        state = BlockState(k, z, decoded, tokens, hist_valid, caches, kept)
        if (on_block is not None and on_block(state) is True) or all(ended):
            return outputs, dict(blocks=k + 1)
    return outputs, dict(blocks=n_blocks)


def keep_until_stop(fresh, room, stop_ids):
    """A row keeps at most `room` of a block's new tokens, before the first stop token -> (kept, stopped)."""
    for i, tok in enumerate(fresh[:room]):
        if tok in stop_ids:
            return fresh[:i], True
    return fresh[:room], False
