"""
Cola DLM's block-by-block conditional decoding (docs/method.md §6), the generation loop generate(): the prompt
prefills the DiT's and the decoder's KV caches (start); each new block takes guided Euler steps from noise at t = 1
to 0 (denoise_block; known latents of a partial prompt block pinned clean), the VAE decoder turns it into tokens in
one parallel pass, and it joins both caches. Prompts are left-padded by whole blocks, hidden by the masks.
"""
import math
from dataclasses import dataclass

import torch

from diffusion import rising_t, sampler_step, time_grid
from layers import prefix_mask


@dataclass
class SamplerConfig:
    """How to sample (docs/method.md §6). Checkpoints store their preset's (sample.py's defaults)."""
    steps: int = 16                 # Euler steps per block (paper: 16)
    guidance: float = 7.0           # classifier-free guidance on the whole velocity; 1 = off (paper: 7)
    noise_scale: float = 1.0        # std of each block's starting noise; < 1 is a lower-temperature draw (paper: 1)
    eta: float = 0.0                # > 0: a stochastic sampler, this share of each step's noise drawn afresh (paper: 0)
    t_rise: float = 0.0             # the prior's rising t (diffusion.rising_t) as it was trained (paper: 0)
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


@dataclass
class StepState:
    """What on_step(state) sees after each Euler step of a block: the hook of watch.py's views."""
    k: int                          # the block's index among the generated ones
    i: int                          # the step's index, 0 .. steps - 1
    t: torch.Tensor                 # () the step's time, from 1 down to 1 / steps; (bs,) with a rising t
    x0: torch.Tensor                # (B, bs, d) the step's estimate of the clean block, normalised
    hist_valid: torch.Tensor        # (B, Tc) which latents of the caches are real
    caches: tuple                   # (DiT cache, decoder cache): read them only (decode_block(commit=False))
    seen: torch.Tensor              # (B, V) the tokens decoded so far (the repetition penalty's)


def choose_tokens(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """Pick one token per position. logits (B, T, V) -> (B, T). temperature 0 = greedy. The repetition penalty
    (CTRL's) divides the positive logits of the tokens seen (B, V) by it, and multiplies the negative ones."""
    logits, p = logits.float(), repetition_penalty
    if seen is not None and p != 1.0:
        logits = torch.where(seen.unsqueeze(1), torch.where(logits > 0, logits / p, logits * p), logits)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)  # in float32 a tinier one is 0: logits / 0 is NaN, not greedy
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
def encode_normalised(model, tokens, valid):
    """Normalised posterior means (B, N, d) of token rows (B, N * patch), latents marked invalid hidden."""
    if tokens.shape[1] == 0:
        return torch.zeros(tokens.shape[0], 0, model.vae.cfg.latent_dim, device=tokens.device)
    mu, _ = model.vae.encode(tokens, prefix_mask(valid, model.vae.cfg.block_size))
    return model.normalize(mu.float())


def denoise_block(model, z, grid, hist_valid, guidance, dit_cache, pin=None, pin_z=None, on_step=None, eta=0.0,
                  generator=None):
    """Guided steps (sampler_step's, eta) of the next block z (B, bs, d) along `grid` (steps + 1,) or (steps + 1, bs),
    after the history in the DiT cache; latents in `pin` (B, bs) are held at pin_z, at t = 0. on_step(i, x0) sees
    step i's estimate of the clean block, x0 = z_t - t v (B, bs, d): at the last step, the block itself."""
    B, bs, _ = z.shape
    pin = torch.zeros(B, bs, dtype=torch.bool, device=z.device) if pin is None else pin
    pin_z = z if pin_z is None else pin_z
    for i in range(len(grid) - 1):
        z = torch.where(pin.unsqueeze(-1), pin_z, z)
        t_tok = torch.where(pin, torch.zeros_like(z[..., 0]), grid[i].expand(B, bs))  # (B, bs)
        v = model.guided_velocity(z, t_tok, hist_valid, guidance, dit_cache).float()
        if on_step is not None:
            on_step(i, torch.where(pin.unsqueeze(-1), pin_z, z - t_tok.unsqueeze(-1) * v))
        noise = torch.randn(z.shape, device=z.device, generator=generator) if eta else None
        z = sampler_step(z, v, grid[i].unsqueeze(-1), grid[i + 1].unsqueeze(-1), eta, noise)
    return torch.where(pin.unsqueeze(-1), pin_z, z)


@dataclass
class PartialBlock:
    """The prompt's partial last block, which the first generated block completes; empty for the blocks after."""
    pin: torch.Tensor               # (B, bs) latents known from the prompt, held clean while denoising
    pin_z: torch.Tensor             # (B, bs, d) their normalised posterior means (None: no partial block)
    given: torch.Tensor             # (B, bs * patch) which tokens of the block are the prompt's
    tokens: torch.Tensor            # (B, bs * patch) the prompt's tokens there


def start(model, prompts, max_new_tokens, pad_id):
    """Lay the prompts out in blocks (a partial last block filled with pad_id, which the encoder reads as in the
    release; rows left-padded by whole blocks), encode them, prefill both caches with the full blocks -> (their
    tokens (B, Tc * patch), which cached latents are real (B, Tc), the caches, the PartialBlock, the number of
    blocks that give every row max_new_tokens). Beyond the model's context: a GenerationError."""
    bs, patch, device = model.block_size, model.vae.cfg.patch_size, model.latent_shift.device
    tpb = bs * patch
    if not prompts:
        raise GenerationError("no prompts given")
    n_full, rem = [len(p) // tpb for p in prompts], [len(p) % tpb for p in prompts]
    n_blocks, Tc = max(math.ceil((r + max_new_tokens) / tpb) for r in rem), max(n_full) * bs  # Tc: full blocks
    if (max(n_full) + n_blocks) * tpb > model.vae.cfg.max_seq_len:
        raise GenerationError(f"prompt ({max(map(len, prompts))} tokens) + max_new_tokens ({max_new_tokens}) exceed "
                              f"the model's context of {model.vae.cfg.max_seq_len} tokens; ask for fewer new tokens")
    tokens = torch.full((len(prompts), (max(n_full) + any(rem)) * tpb), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), tokens.shape[1] // patch, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        first = (max(n_full) - n_full[b]) * tpb
        tokens[b, first:first + len(p)] = torch.tensor(p, dtype=torch.long)
        valid[b, first // patch:first // patch + (n_full[b] + (rem[b] > 0)) * bs] = True  # a partial block whole
    prompt_zn = encode_normalised(model, tokens, valid)  # (B, Np, d)
    caches, hist_valid = model.new_caches(), valid[:, :Tc]  # (B, Tc)
    if Tc > 0:
        model.prefill(prompt_zn[:, :Tc], hist_valid, caches)
    rem, idx = torch.tensor(rem, device=device)[:, None], torch.arange(tpb, device=device)
    partial = prompt_zn.shape[1] > Tc
    part = PartialBlock(idx[:bs] < (rem + patch - 1) // patch, prompt_zn[:, Tc:] if partial else None, idx < rem,
                        tokens[:, Tc * patch:] if partial else torch.zeros_like(idx < rem, dtype=torch.long))
    return tokens[:, :Tc * patch], hist_valid, caches, part, n_blocks


# the loop
@torch.no_grad()
def generate(model, prompts, max_new_tokens, sampler=SamplerConfig(), generator=None, noise=None, on_block=None,
             on_step=None):
    """Continue token-id `prompts` (a list of lists, any lengths, may be empty) by max_new_tokens tokens each,
    block by block: noise -> denoise -> decode -> commit. Returns (per row the new tokens, cut before its first
    stop token; {'blocks': generated}). noise(k, shape) gives block k's starting noise (default: N(0, I) from
    `generator`; a hook for release.py's per-row seeds). on_block(BlockState) runs after each block, and
    generation ends early if it returns True; on_step(StepState) after each Euler step (watch.py draws them)."""
    B, bs, d = len(prompts), model.block_size, model.vae.cfg.latent_dim
    tokens, hist_valid, caches, part, n_blocks = start(model, prompts, max_new_tokens, sampler.pad_id)
    seen = torch.zeros(B, model.vae.cfg.vocab_size, dtype=torch.bool, device=tokens.device)  # tokens decoded so far
    outputs, ended = [[] for _ in range(B)], [False] * B
    grid = time_grid(sampler.steps, tokens.device, 1 + sampler.t_rise)  # (steps + 1,): from t = 1 (+ the rise) to 0
    grid = rising_t(grid, bs, sampler.t_rise) if sampler.t_rise else grid  # (steps + 1, bs): one t per latent
    for k in range(n_blocks):
        z = noise(k, (B, bs, d)) if noise else torch.randn(B, bs, d, device=tokens.device, generator=generator)
        step_hook = on_step and (lambda i, x0: on_step(StepState(k, i, grid[i], x0, hist_valid, caches, seen)))
        scale, has_history = sampler.guidance, hist_valid.any(1)  # (B,): a row with none has equal passes: unguided
        guidance = scale if scale == 1.0 or has_history.all() else torch.where(has_history, scale, 1.0)
        z = denoise_block(model, sampler.noise_scale * z, grid, hist_valid, guidance, caches[0], part.pin, part.pin_z,
                          step_hook, sampler.eta, generator)
        if not torch.isfinite(z).all():
            raise GenerationError(f"block {k}'s latents are not finite: lower the guidance or the noise scale")
        logits = model.decode_block(z, hist_valid, caches)  # (B, tpb, V)
        hist_valid = torch.cat([hist_valid, torch.ones_like(part.pin)], 1)
        decoded = choose_tokens(logits, seen, sampler.temperature, sampler.top_k, sampler.top_p,
                                sampler.repetition_penalty, generator)  # (B, tpb)
        seen.scatter_(1, decoded, True)
        tokens = torch.cat([tokens, torch.where(part.given, part.tokens, decoded)], 1)  # the prompt's own as given
        kept = []
        for b in range(B):
            room = 0 if ended[b] else max_new_tokens - len(outputs[b])
            fresh, stop = keep_until_stop(decoded[b, int(part.given[b].sum()):].tolist(), room, sampler.stop_ids)
            outputs[b] += fresh
            ended[b] = ended[b] or stop or len(outputs[b]) >= max_new_tokens
            kept.append(fresh)
        part = PartialBlock(part.pin & False, None, part.given & False, part.tokens)  # only the first block has one
        if (on_block is not None and on_block(BlockState(k, z, decoded, tokens, hist_valid, caches, kept)) is True
                or all(ended)):
            return outputs, dict(blocks=k + 1)
    return outputs, dict(blocks=n_blocks)


def keep_until_stop(fresh, room, stop_ids):
    """A row keeps at most `room` of a block's new tokens, before the first stop token -> (kept, stopped)."""
    for i, tok in enumerate(fresh[:room]):
        if tok in stop_ids:
            return fresh[:i], True
    return fresh[:room], False
