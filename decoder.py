"""
Generation: Cola DLM's block-wise loop with conditional decoding (docs/method.md §6), the baselines'
samplers (AR with a KV cache, LLaDA with low-confidence remasking), token choice, and loading any trained
model from its checkpoint alone.

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
import os

import torch

from baselines import TransformerLM
from checkpoint import CheckpointError, load_checkpoint
from diffusion import ColaDLM, euler_step, time_grid
from layers import KVCache, block_causal_mask, with_key_padding
from tokenizer import get_tokenizer, template_ids

MODEL_KINDS = ("cola", "ar", "llada")


class GenerationError(ValueError):
    """A request generate() cannot serve; the message is one line meant for the user."""


def load_model(path, device="cpu", kinds=MODEL_KINDS, dtype=torch.float32):
    """A model from this repo's checkpoint file, or from the authors' released snapshot directory
    (ColaDLM.from_pretrained) -> (model in eval mode on device, what the scripts read about it: the checkpoint
    dict, or for a snapshot the same fields (kind, step, args.preset, tokenizer) and its special tokens).
    dtype: the weights' dtype (a snapshot's; this repo's checkpoints load as they were trained, in fp32)."""
    if os.path.isdir(path):
        if "cola" not in kinds:
            raise CheckpointError(f"{path} is a released Cola DLM snapshot, expected {' or '.join(kinds)}")
        model, tokenizer = ColaDLM.from_pretrained(path, dtype)
        enc = get_tokenizer(tokenizer)
        specials = {name: enc.encode_single_token(name) for name in ("<|pad|>", "<|endoftext|>", "<|im_end|>")
                    if name in enc.special_tokens_set}
        if "<|pad|>" not in specials or "<|endoftext|>" not in specials:
            raise CheckpointError(f"{tokenizer} has no <|pad|> or <|endoftext|> special token")
        # the release pads prompts with <|pad|> and stops at <|endoftext|> or <|im_end|> (OLMo 2: 100277, 100257, 100265)
        info = dict(kind="cola", step=0, args=dict(preset="release"), tokenizer=tokenizer, train_flops=0.0,
                    pad_id=specials["<|pad|>"], stop_ids=[specials[n] for n in ("<|endoftext|>", "<|im_end|>") if n in specials],
                    prompt_template=template_ids(tokenizer))
        return model.to(device), info
    ckpt = load_checkpoint(path, kinds)
    model = ColaDLM.from_checkpoint(ckpt) if ckpt["kind"] == "cola" else TransformerLM.from_checkpoint(ckpt)
    return model.to(device).eval(), ckpt


def special_ids(info, enc):
    """(stop ids, pad id) of a loaded model: the release's for a snapshot, <|endoftext|> for this repo's."""
    return tuple(info.get("stop_ids", [enc.eot_token])), info.get("pad_id", enc.eot_token)


def encode_prompt(info, enc, text):
    """Token ids of a prompt: a snapshot's tokenizer reads special tokens in the text and wraps it in its
    post-processor's template, as the release's Tokenizer.encode does; this repo's models get plain BPE."""
    if "prompt_template" not in info:
        return enc.encode_ordinary(text)
    prefix, suffix = info["prompt_template"]
    return prefix + enc.encode(text, allowed_special="all") + suffix


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
# the baselines

def left_pad(prompts, pad_id, device):
    """Prompts of different lengths, right-aligned: tokens (B, P) and their validity (B, P). An empty prompt
    becomes the single token pad_id (<|endoftext|>, the start of a document)."""
    rows = [list(p) or [pad_id] for p in prompts]
    P = max(len(r) for r in rows)
    tokens = torch.full((len(rows), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), P, dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, P - len(r):] = torch.tensor(r, dtype=torch.long)
        valid[b, P - len(r):] = True
    return tokens.to(device), valid.to(device)


def check_context(prompts, max_new_tokens, context):
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > context:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                              f"model's context of {context} tokens")


@torch.no_grad()
def ar_generate(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                eos_id=50256, generator=None, on_token=None):
    """Token-by-token decoding of a batch of prompts with a KV cache: one batched forward pass per token.
    Prompts are left-padded, the padded keys masked out (RoPE sees only relative positions), so each row
    gets what it would get alone. Returns (new-token lists, {'passes': batched passes}).
    on_token(tokens) is called with each row's new token (None once the row has stopped)."""
    if not prompts:
        raise GenerationError("no prompts given")
    check_context(prompts, max_new_tokens, model.cfg.max_seq_len)
    device = model.head.weight.device
    tokens, key_valid = left_pad(prompts, eos_id, device)
    B, P = tokens.shape
    pos = torch.arange(P, device=device)
    cache = KVCache(model.cfg.n_layers)
    logits = model.logits(tokens, pos, with_key_padding(block_causal_mask(pos, pos), key_valid, key_valid), cache)
    seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)  # generated tokens (the penalty's)
    outs, done, passes = [[] for _ in range(B)], [False] * B, 1
    for n in range(max_new_tokens):
        tok = choose_tokens(logits[:, -1:], seen, temperature, top_k, top_p, repetition_penalty, generator)  # (B, 1)
        new = []
        for b, t in enumerate(tok[:, 0].tolist()):
            done[b] = done[b] or t == eos_id
            new.append(None if done[b] else t)
            if not done[b]:
                outs[b].append(t)
        seen[torch.arange(B, device=device), tok[:, 0]] = True
        if on_token is not None:
            on_token(new)
        if all(done) or n == max_new_tokens - 1:
            break
        key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
        logits = model.logits(tok, pos[-1:] + n + 1, key_valid[:, None, None, :], cache)  # (B, 1, V)
        passes += 1
    return outs, {"passes": passes}


@torch.no_grad()
def llada_generate(model, prompts, max_new_tokens, steps=32, block_length=None, temperature=0.0, eos_id=50256,
                   generator=None):
    """LLaDA sampling with low-confidence remasking for a batch of prompts (left-padded, padded keys masked).
    block_length < max_new_tokens gives semi-autoregressive blocks, each unmasked over
    steps * block_length / max_new_tokens steps. Returns (new-token lists, {'passes': batched passes})."""
    if not prompts:
        raise GenerationError("no prompts given")
    check_context(prompts, max_new_tokens, model.cfg.max_seq_len)
    device = model.head.weight.device
    mask_id = model.cfg.mask_id
    prompt, prompt_valid = left_pad(prompts, eos_id, device)
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, max_new_tokens), mask_id, dtype=torch.long, device=device)], 1)  # (B, T)
    key_valid = torch.cat([prompt_valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], 1)
    T = x.shape[1]
    attn = with_key_padding(torch.ones(T, T, dtype=torch.bool, device=device), key_valid, key_valid)
    pos = torch.arange(T, device=device)
    block_length = block_length or max_new_tokens
    n_blocks = math.ceil(max_new_tokens / block_length)
    steps_per_block = max(1, steps // n_blocks)
    passes = 0
    for blk in range(n_blocks):
        lo, hi = P + blk * block_length, min(P + (blk + 1) * block_length, T)
        n_masked = hi - lo
        for i in range(steps_per_block):
            k = n_masked // steps_per_block + (i < n_masked % steps_per_block)  # positions to unmask this step
            if k == 0:
                continue
            logits = model.logits(x, pos, attn).float()  # (B, T, V)
            passes += 1
            probs = torch.softmax(logits / max(temperature, 1e-8) if temperature > 0 else logits, -1)
            pred = (torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(B, T) if temperature > 0
                    else logits.argmax(-1))
            conf = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)  # (B, T)
            eligible = torch.zeros_like(x, dtype=torch.bool)
            eligible[:, lo:hi] = x[:, lo:hi] == mask_id
            conf = torch.where(eligible, conf, torch.full_like(conf, -1.0))
            pick = torch.topk(conf, k, dim=-1).indices  # (B, k): the k most confident masked positions per row
            x.scatter_(1, pick, pred.gather(1, pick))
    outs = []
    for row in x[:, P:].tolist():
        outs.append(row[:row.index(eos_id)] if eos_id in row else row)
    return outs, {"passes": passes}


# ----------------------------------------------------------------------------------------------------
# Cola DLM

def draw_noise(shape, device, generator):
    """The starting noise of a block (a seam for tests that need batch-independent noise)."""
    return torch.randn(shape, device=device, generator=generator)


def row_noise(shape, device, row_seeds, k):
    """Block k's starting noise with one seed per row, row_seeds[b] + k * 10^7: a row gets the same noise
    whatever batch it runs in (the release's COLA_INFER_PER_SAMPLE_NOISE_SEED scheme). shape (B, bs, d)."""
    return torch.stack([torch.randn(shape[1:], device=device,
                                    generator=torch.Generator(device=device).manual_seed(s + k * 10_000_000))
                        for s in row_seeds])


def prompt_layout(prompts, block_size, patch, pad_id, device):
    """Lay a batch of prompts out in blocks. A prompt's partial last block is filled on the right with pad_id,
    which the encoder reads (the release pads the same way, so those pads shape the block's latents); rows are
    then left-padded by whole blocks, hidden from every pass, so that all rows reach block boundaries together.
    Returns tokens (B, Tp), the latents every pass may attend to (B, Np), the number of full prompt blocks
    (common to all rows after padding), and per row the tokens of its partial last block."""
    tpb = block_size * patch
    n_full = [len(p) // tpb for p in prompts]
    rem = [len(p) % tpb for p in prompts]
    n_blocks = max(n_full) + (1 if any(rem) else 0)
    B = len(prompts)
    tokens = torch.full((B, n_blocks * tpb), pad_id, dtype=torch.long)
    valid = torch.zeros(B, n_blocks * block_size, dtype=torch.bool)
    for b, p in enumerate(prompts):
        start = (max(n_full) - n_full[b]) * tpb
        tokens[b, start:start + len(p)] = torch.tensor(p, dtype=torch.long)
        n_lat = (n_full[b] + (rem[b] > 0)) * block_size  # the partial block whole, its pads included
        valid[b, start // patch:start // patch + n_lat] = True
    return tokens.to(device), valid.to(device), max(n_full), rem


def denoise_block(model, z, grid, hist_valid, guidance, dit_cache, pin=None, pin_z=None, round_bf16=False):
    """Guided Euler steps for the next block along `grid` (from t = grid[0] down to grid[-1]), given the
    committed history in the DiT cache. Latents marked in `pin` (B, bs) are held at pin_z at t = 0.
    z (B, bs, d) normalised, at time grid[0]."""
    B, block_size, _ = z.shape
    if pin is None:
        pin = torch.zeros(B, block_size, dtype=torch.bool, device=z.device)
        pin_z = z
    hint = None  # self-conditioning: the previous step's estimate of z0
    for i in range(len(grid) - 1):
        z = torch.where(pin.unsqueeze(-1), pin_z, z)
        t_tok = torch.where(pin, torch.zeros_like(z[..., 0]), grid[i].expand(B, block_size))  # (B, bs)
        v = model.guided_velocity(z, t_tok, hist_valid, guidance, dit_cache, hint, round_bf16=round_bf16).float()
        if model.dit.cfg.self_cond:
            hint = z - t_tok.unsqueeze(-1) * v
        z = euler_step(z, v, grid[i] - grid[i + 1])
    return torch.where(pin.unsqueeze(-1), pin_z, z)


def encode_normalised(model, tokens, valid):
    """Normalised posterior means (B, N, d) of token rows (B, N * patch), block-causal with the VAE's blocks,
    latents marked invalid (left padding) hidden."""
    if tokens.shape[1] == 0:
        return torch.zeros(tokens.shape[0], 0, model.vae.cfg.latent_dim, device=tokens.device)
    blk = torch.arange(valid.shape[1], device=tokens.device) // model.vae.cfg.block_size
    mu, _ = model.vae.encode(tokens, with_key_padding(block_causal_mask(blk, blk), valid, valid))
    return model.normalize(mu.float())


def n_blocks_to_generate(budget, max_new_tokens, rem, block_size, patch):
    """'blocks' (the release): ceil(max_new_tokens / tokens per block) blocks, the first one's prompt share
    included, and a single block when the prompt's partial block alone needs more latents than that budget;
    'tokens': enough blocks for max_new_tokens new tokens in every row."""
    tpb = block_size * patch
    if budget == "tokens":
        return max(math.ceil((r + max_new_tokens) / tpb) for r in rem)
    if any(r and max_new_tokens < block_size - math.ceil(r / patch) for r in rem):
        return 1
    return max(1, math.ceil(max_new_tokens / tpb))


def keep_new_tokens(rows, outputs, stopped, budget, stop_ids, max_new_tokens):
    """Append each row's new tokens of a block to its output -> the tokens kept per row. 'blocks' keeps them
    all (the release's output, stop tokens and what follows included); 'tokens' cuts a row before its first
    stop token (the row stops there) and at max_new_tokens."""
    kept = []
    for b, row in enumerate(rows):
        fresh = []
        for tok in row:
            if budget == "tokens" and (stopped[b] or len(outputs[b]) + len(fresh) >= max_new_tokens):
                break
            if budget == "tokens" and tok in stop_ids:
                stopped[b] = True
                break
            fresh.append(tok)
        outputs[b].extend(fresh)
        kept.append(fresh)
    return kept


@torch.no_grad()
def generate(model, prompts, max_new_tokens=32, steps=16, guidance=7.0, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.1, stop_ids=(50256,), pad_id=50256, generator=None, on_block=None,
             budget="blocks", round_bf16=False, noise_scale=1.0, row_seeds=None, reencode_history=False,
             on_drift=None):
    """Continue token-id `prompts` (a list of lists, any lengths, may be empty) block by block, as the
    authors' inference does (docs/release.md).

    1. The prompt is encoded with the posterior mean; its full blocks prefill the DiT's and the decoder's
       KV caches. 2. Each new block starts from noise and takes `steps` guided Euler steps from t = 1 to 0;
       the known latents of a partial last prompt block stay pinned clean ("clean-condition repaint"), and a
       row with no history yet is not guided. 3. One decoder pass turns the block into tokens (the repetition
       penalty covers every token decoded before, the first block's prompt positions too); the block is
       committed to both caches at t = 0. The prompt's own tokens are left out of the output.
    budget: 'blocks' (the release's) or 'tokens' (n_blocks_to_generate, keep_new_tokens). round_bf16 rounds
    the DiT's inputs to bfloat16 as the release does (so that an fp32 run matches it); row_seeds (one int per
    row) draws each row's noise from its own seed (row_noise), else all rows draw from `generator`.
    Returns (list of new-token lists, stats). stats counts model passes: 'dit' (batched guided passes),
    'dit_commit', 'decoder' and 'blocks'. on_block(k, new_tokens) is called after each block.
    Options that are not the paper's: noise_scale < 1 starts each block from N(0, noise_scale^2 I), a
    lower-temperature sample; reencode_history decodes every finished block, re-encodes its tokens, and lets
    the re-encoded latents (not the generated ones) be the history of later blocks; on_drift(distance) is
    called after each block with the mean distance between its generated latents and the re-encoding of
    its tokens.
    """
    vcfg = model.vae.cfg
    block_size, patch, d = model.block_size, vcfg.patch_size, vcfg.latent_dim
    tokens_per_block = block_size * patch
    device = model.latent_shift.device
    B = len(prompts)
    if B == 0:
        raise GenerationError("no prompts given")
    longest = max(len(p) for p in prompts)
    if longest > vcfg.max_seq_len:
        raise GenerationError(f"prompt of {longest} tokens is longer than the model's context of {vcfg.max_seq_len} tokens")
    tokens, valid, n_prompt_blocks, rem = prompt_layout(prompts, block_size, patch, pad_id, device)
    n_gen = n_blocks_to_generate(budget, max_new_tokens, rem, block_size, patch)
    if (n_prompt_blocks + n_gen) * tokens_per_block > vcfg.max_seq_len:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                              f"context of {vcfg.max_seq_len} tokens; ask for fewer new tokens")
    Tc = n_prompt_blocks * block_size  # latents of the full prompt blocks
    prompt_zn = encode_normalised(model, tokens, valid)  # (B, Np, d)
    caches = model.new_caches()
    hist_valid = valid[:, :Tc]  # (B, Tc): real latents among the committed ones
    stats = dict(dit=0, dit_commit=0, decoder=0, blocks=0)
    if Tc > 0:
        model.prefill(prompt_zn[:, :Tc], hist_valid, caches, round_bf16=round_bf16)
        stats["dit_commit"] += 1
        stats["decoder"] += 1
    # repaint: the latents of a partial last prompt block are known and stay pinned (first block only)
    pin = torch.zeros(B, block_size, dtype=torch.bool, device=device)
    pin_z = torch.zeros(B, block_size, d, device=device)
    if prompt_zn.shape[1] > Tc:
        for b in range(B):
            pin[b, :math.ceil(rem[b] / patch)] = True
        pin_z = prompt_zn[:, Tc:Tc + block_size]
    # a row whose history is empty has equal conditional and unconditional passes: no guidance there (release)
    first_guidance = guidance
    if guidance != 1.0 and not bool(hist_valid.any(1).all()):
        first_guidance = torch.where(hist_valid.any(1), torch.tensor(float(guidance)), torch.tensor(1.0)).to(device)

    seen = torch.zeros(B, vcfg.vocab_size, dtype=torch.bool, device=device)  # every token decoded so far
    outputs, stopped = [[] for _ in range(B)], [False] * B
    grid = time_grid(steps, device)
    own = torch.ones(B, block_size, dtype=torch.bool, device=device)
    for k in range(n_gen):
        shape = (B, block_size, d)
        z = noise_scale * (draw_noise(shape, device, generator) if row_seeds is None else
                           row_noise(shape, device, row_seeds, k))  # (B, bs, d), normalised
        z = denoise_block(model, z, grid, hist_valid, first_guidance if k == 0 else guidance, caches[0], pin, pin_z,
                          round_bf16)
        stats["dit"] += steps
        logits = model.decode_and_commit(z, hist_valid, caches, round_bf16=round_bf16)  # (B, tpb, V)
        hist_valid = torch.cat([hist_valid, own], 1)
        stats["decoder"] += 1
        stats["dit_commit"] += 1
        stats["blocks"] += 1
        new = choose_tokens(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)  # (B, tpb)
        seen.scatter_(1, new, True)
        if reencode_history or on_drift is not None:
            text = new.clone()
            if k == 0 and any(rem):  # the prompt's own tokens of this block, as given
                for b in range(B):
                    text[b, :rem[b]] = torch.tensor(prompts[b][len(prompts[b]) - rem[b]:], device=device)
            tokens = torch.cat([tokens[:, :(Tc + k * block_size) * patch], text], 1)  # the whole text so far
            zr = encode_normalised(model, tokens, hist_valid)  # (B, N, d)
            if on_drift is not None:
                on_drift(float((zr[:, -block_size:] - z).norm(dim=-1).mean()))
            if reencode_history:  # rebuild both caches from the re-encoded text
                caches = model.new_caches()
                model.prefill(zr, hist_valid, caches, round_bf16=round_bf16)
        rows = [new[b, rem[b] if k == 0 else 0:].tolist() for b in range(B)]
        block_new = keep_new_tokens(rows, outputs, stopped, budget, set(stop_ids), max_new_tokens)
        if budget == "blocks":  # the release: a row is done once its block holds a stop token, prompt positions too
            stopped = [s or any(t in stop_ids for t in row) for s, row in zip(stopped, new.tolist())]
        pin = torch.zeros_like(pin)
        if on_block is not None:
            on_block(k, block_new)
        if all(stopped) or (budget == "tokens" and all(len(o) >= max_new_tokens for o in outputs)):
            break
    return outputs, stats
