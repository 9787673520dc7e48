"""
Conditional decoding and block-wise generation for Cola DLM (SPEC §6).

Text is produced one block of `block_size` latents (block_size * patch_size tokens) at a time:
  1. the prompt is encoded with the posterior mean and normalised; its full blocks prefill the DiT's
     KV cache (at t = 0) and the VAE decoder's KV cache;
  2. each new block starts from noise and takes `steps` guided Euler steps from t = 1 to 0; the
     conditional pass reads the cache, the unconditional pass sees the block alone at positions
     0..bs-1, and both run as one batched forward; the known latents of a partial last prompt block
     are pinned clean (t = 0) at every step ("clean-condition repaint");
  3. the VAE decoder turns the finished block into tokens in one parallel pass (its cache holds the
     earlier blocks), a token is chosen per position, and the block is committed to the DiT cache at
     t = 0.
Prompts of different lengths run together: each row is left-padded by whole blocks so all rows reach
block boundaries together; padded keys are masked out, and RoPE only sees relative positions.
"""
import math

import torch

from diffusion import cfg_combine, euler_step, time_grid
from layers import KVCache, block_causal_mask, cola_mask, with_key_padding


class GenerationError(ValueError):
    """A request generate() cannot serve; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------------------------
# token choice (pure)

def apply_repetition_penalty(logits, seen, penalty):
    """CTRL-style penalty: logits of tokens already in the text are divided by `penalty` when positive,
    multiplied when negative. logits (B, T, V); seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    seen = seen.unsqueeze(1)  # (B, 1, V)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def choose_tokens(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                  generator=None):
    """Pick one token per position. logits (B, T, V) -> (B, T). temperature 0 = greedy."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    B, T, V = probs.shape
    return torch.multinomial(probs.reshape(B * T, V), 1, generator=generator).reshape(B, T)


# ----------------------------------------------------------------------------------------------------
# generation

def draw_noise(shape, device, generator):
    """The starting noise of a block (a seam for tests that need batch-independent noise)."""
    return torch.randn(shape, device=device, generator=generator)


def _prompt_layout(prompts, tpb, patch, pad_id, device):
    """Left-pad each prompt by whole blocks. Returns the padded tokens (B, Tp), latent validity (B, Np),
    the number of full prompt blocks N (common to all rows after padding) and per-row known latents and
    leftover tokens of the partial last block."""
    n_full = [len(p) // tpb for p in prompts]
    rem = [len(p) % tpb for p in prompts]
    N = max(n_full)
    has_partial = any(rem)
    n_blocks = N + (1 if has_partial else 0)
    B = len(prompts)
    tokens = torch.full((B, n_blocks * tpb), pad_id, dtype=torch.long)
    valid_tok = torch.zeros(B, n_blocks * tpb, dtype=torch.bool)
    for b, p in enumerate(prompts):
        start = (N - n_full[b]) * tpb
        tokens[b, start:start + len(p)] = torch.tensor(p, dtype=torch.long)
        full_end = start + n_full[b] * tpb + (rem[b] // patch) * patch  # whole latents only
        valid_tok[b, start:full_end] = True
    valid_lat = valid_tok.reshape(B, -1, patch).all(-1)  # (B, Np)
    known = [r // patch for r in rem]
    return tokens.to(device), valid_lat.to(device), N, known, rem


@torch.no_grad()
def generate(model, prompts, max_new_tokens=64, steps=16, cfg_scale=3.0, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.1, eos_id=50256, pad_id=50256, generator=None, use_cache=True, on_block=None):
    """Generate continuations of token-id `prompts` (a list of lists, any lengths, may be empty).

    Returns (list of new-token lists, stats). stats counts model passes: 'dit' batched DiT forwards
    (cond+uncond share one), 'dit_commit', 'decoder', and 'blocks'. on_block(k, new_tokens) is called after
    each block with the new tokens of every row. use_cache=False recomputes every pass from scratch over
    the whole history (slow; for testing the cache).
    """
    vae, dit = model.vae, model.dit
    cfg = vae.cfg
    bs, patch, d = cfg.block_size, cfg.patch_size, cfg.latent_dim
    tpb = bs * patch
    device = model.latent_shift.device
    B = len(prompts)
    if B == 0:
        raise GenerationError("no prompts given")
    longest = max(len(p) for p in prompts)
    if longest > cfg.max_seq_len:
        raise GenerationError(f"prompt of {longest} tokens is longer than the model's context of {cfg.max_seq_len} tokens")
    tokens, valid, N, known, rem = _prompt_layout(prompts, tpb, patch, pad_id, device)
    n_gen = max(math.ceil((r + max_new_tokens) / tpb) for r in rem)
    if (N + n_gen) * tpb > cfg.max_seq_len:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                              f"context of {cfg.max_seq_len} tokens; ask for fewer new tokens")

    # 1. encode the prompt with the posterior mean (block-causal, padded keys masked out)
    prompt_zn, prompt_mu = None, None
    if tokens.shape[1] > 0:
        lat_blk = torch.arange(valid.shape[1], device=device) // bs
        enc_mask = with_key_padding(block_causal_mask(lat_blk, lat_blk), valid, valid)
        prompt_mu, _ = vae.encode(tokens, enc_mask)  # (B, Np, d)
        prompt_zn = model.normalize(prompt_mu.float())
    hist_valid = valid[:, :N * bs]  # (B, Tc) keys of committed blocks that are real
    hist_zn = prompt_zn[:, :N * bs] if N > 0 else torch.zeros(B, 0, d, device=device)  # committed clean latents
    stats = dict(dit=0, dit_commit=0, decoder=0, blocks=0)

    # 2. prefill the caches with the prompt's full blocks
    dit_cache, dec_cache = KVCache(dit.cfg.n_layers), KVCache(cfg.n_dec_layers)
    if use_cache and N > 0:
        pos = torch.arange(N * bs, device=device)
        m = with_key_padding(block_causal_mask(pos // bs, pos // bs), hist_valid, hist_valid)
        dit(hist_zn, torch.zeros(B, N * bs, device=device), pos, m, dit_cache, commit=True)
        vae.decode(prompt_mu[:, :N * bs], pos, m, dec_cache)
        stats["dit_commit"] += 1
        stats["decoder"] += 1

    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        if p:
            seen[b, torch.tensor(p, device=device)] = True
    outputs = [[] for _ in range(B)]
    done = [max_new_tokens <= 0] * B
    grid = time_grid(steps, device)
    for k in range(n_gen):
        j = N + k  # block index in the padded frame
        pos = torch.arange(j * bs, (j + 1) * bs, device=device)  # (bs,)
        Tc = hist_zn.shape[1]
        # pinned latents of the partial prompt block (first generated block only)
        pin = torch.zeros(B, bs, dtype=torch.bool, device=device)
        pin_z = torch.zeros(B, bs, d, device=device)
        if k == 0 and prompt_zn is not None and prompt_zn.shape[1] > N * bs:
            for b in range(B):
                pin[b, :known[b]] = True
            pin_z = prompt_zn[:, N * bs:(N + 1) * bs]
        # keys: committed history (real ones only) + the whole current block
        own = torch.ones(B, bs, dtype=torch.bool, device=device)
        cond_mask = torch.cat([hist_valid, own], 1)[:, None, None, :].expand(B, 1, bs, Tc + bs)

        def velocity(z, t_tok):
            if use_cache:
                if cfg_scale == 1.0:
                    return dit(z, t_tok, pos, cond_mask, dit_cache, commit=False)
                uncond_mask = torch.cat([torch.zeros_like(hist_valid), own], 1)[:, None, None, :].expand(B, 1, bs, Tc + bs)
                both_pos = torch.cat([pos.expand(B, bs), torch.arange(bs, device=device).expand(B, bs)])  # (2B, bs)
                v = dit(torch.cat([z, z]), torch.cat([t_tok, t_tok]), both_pos,
                        torch.cat([cond_mask, uncond_mask]), dit_cache, commit=False)
                v_cond, v_uncond = v.chunk(2)
            else:  # recompute over [clean history | noisy block] with the training mask rule
                seq = torch.cat([hist_zn, z], 1)
                t_all = torch.cat([torch.zeros(B, Tc, device=device), t_tok], 1)
                all_pos = torch.arange(Tc + bs, device=device)
                noisy = all_pos >= Tc
                m = with_key_padding(cola_mask(all_pos // bs, noisy, all_pos // bs, noisy),
                                     torch.cat([hist_valid, own], 1))
                v_cond = dit(seq, t_all, all_pos, m)[:, Tc:]
                if cfg_scale == 1.0:
                    return v_cond
                local = torch.arange(bs, device=device)
                v_uncond = dit(z, t_tok, local, torch.ones(bs, bs, dtype=torch.bool, device=device))
            return cfg_combine(v_cond, v_uncond, cfg_scale)

        z = draw_noise((B, bs, d), device, generator)
        for i in range(steps):
            z = torch.where(pin.unsqueeze(-1), pin_z, z)
            t_tok = torch.where(pin, torch.zeros_like(pin, dtype=z.dtype), grid[i].expand(B, bs))
            z = euler_step(z, velocity(z, t_tok).float(), grid[i] - grid[i + 1])
            stats["dit"] += 1
        z = torch.where(pin.unsqueeze(-1), pin_z, z)  # (B, bs, d), normalised

        # 3. decode the block in one pass, then commit it
        z_raw = model.denormalize(z)
        if use_cache:
            logits = vae.decode(z_raw, pos, cond_mask, dec_cache)  # (B, tpb, V)
            dit(z, torch.zeros(B, bs, device=device), pos, cond_mask, dit_cache, commit=True)
        else:
            seq = model.denormalize(torch.cat([hist_zn, z], 1))
            all_pos = torch.arange(Tc + bs, device=device)
            m = with_key_padding(block_causal_mask(all_pos // bs, all_pos // bs), torch.cat([hist_valid, own], 1))
            logits = vae.decode(seq, all_pos, m)[:, -tpb:]
        stats["decoder"] += 1
        stats["dit_commit"] += 1
        stats["blocks"] += 1
        new = choose_tokens(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)  # (B, tpb)
        hist_zn = torch.cat([hist_zn, z], 1)
        hist_valid = torch.cat([hist_valid, own], 1)
        block_new = []
        for b in range(B):
            start = rem[b] if k == 0 else 0
            if k == 0 and rem[b]:  # the prompt's own tokens of this block are kept as given
                new[b, :rem[b]] = torch.tensor(prompts[b][len(prompts[b]) - rem[b]:], device=device)
            fresh = []
            for tok in new[b, start:].tolist():
                if done[b]:
                    break
                if tok == eos_id:
                    done[b] = True
                    break
                fresh.append(tok)
                if len(outputs[b]) + len(fresh) >= max_new_tokens:
                    done[b] = True
            outputs[b].extend(fresh)
            block_new.append(fresh)
        seen[torch.arange(B, device=device).unsqueeze(1), new] = True
        if on_block is not None:
            on_block(k, block_new)
        if all(done):
            break
    return outputs, stats
