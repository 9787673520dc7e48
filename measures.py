"""The measures eval.py reports for one model (docs/method.md §3-§9): Cola's VAE and its prior's use of the history,
likelihood (Cola's ELBO / IWAE bounds through its prior's CNF, AR's exact NLL, LLaDA's Monte-Carlo ELBO), samplers at
the paper's task settings, sample quality, tasks, the prior's next-token accuracy from a known prefix (§6), plots."""
import json
import math
import random
import re
import zlib
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import pyplot, save_figure, write_atomic
from baselines import lm_generate
from decoder import denoise_block, generate
from release import release_generate, row_noise
from diffusion import flow_path, sample_t, time_grid
from tokendata import batch_seed
from scoring import completion_prefixes, ngram_metrics, open_brackets, score, score_completion, valid_line

LN2 = math.log(2)


# -------------------------------------------------------------------------------- 1. the VAE
def reencode(model, tokens):
    """Normalised posterior means of a token window (B, T) -> (B, T / patch, d)."""
    return model.normalize(model.vae.encode(tokens)[0].float())


@torch.no_grad()
def eval_vae(model, batches, beta, mask_prob, generator, ts=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0)):
    """Masked-branch accuracy, logSNR, and reconstruction accuracy of posterior means moved along the flow path to t."""
    vae, res, acc_t = model.vae, {"mask_acc": 0.0, "logsnr": 0.0}, [0.0] * len(ts)
    for x in batches:
        out = vae(x, beta=beta, mask_prob=mask_prob, lam_mask=1.0)
        for k in res:
            res[k] += float(out[k]) / len(batches)
        zn = reencode(model, x)
        for i, t in enumerate(ts):
            noise = torch.randn(zn.shape, device=zn.device, generator=generator)
            logits = vae.decode(model.denormalize(flow_path(zn, noise, torch.tensor(t, device=zn.device))))
            acc_t[i] += float((logits.argmax(-1) == x).float().mean()) / len(batches)
    return {**res, "recon_acc": acc_t[0], "recon_acc_vs_t": dict(zip(map(str, ts), acc_t))}


# -------------------------------------------------------------------------------- 2. the prior's use of its history
def training_t_density(n_bins, loc, scale, uniform):
    """Fraction of training draws of t in each bin [i/n, (i+1)/n): logit-normal(loc, scale) or uniform."""
    if uniform:
        return [1.0 / n_bins] * n_bins
    edges = torch.logit(torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))  # -inf .. inf
    return torch.distributions.Normal(loc, scale).cdf(edges).diff().tolist()


def velocity_uncond(model, zt, t_tok):
    """The unconditional pass, as guided_velocity computes it: each noisy block alone at positions 0..bs-1."""
    (B, L, d), bs = zt.shape, model.block_size
    pos, mask = torch.arange(bs, device=zt.device), torch.ones(bs, bs, dtype=torch.bool, device=zt.device)
    return model.dit(zt.reshape(-1, bs, d), t_tok.reshape(-1, bs), pos, mask).reshape(B, L, d)


@torch.no_grad()
def fm_with_and_without_history(model, tokens, generator=None, targs=None):
    """(t (B,), FM loss per block (B, n_blocks) with the clean history, without it): same noise, t ~ U(0, 1) (targs:
    as training draws it, no uncond pass). Block 0 has no history."""
    z0n = reencode(model, tokens)  # (B, L, d)
    B, L, _ = z0n.shape
    eps = torch.randn(z0n.shape, device=z0n.device, generator=generator)
    t = torch.rand(B, device=z0n.device, generator=generator) if targs is None else \
        sample_t(B, targs["t_loc"], targs["t_scale"], targs["t_uniform"], z0n.device, generator)
    t_tok = t.unsqueeze(1).expand(B, L)
    zt, target = flow_path(z0n, eps, t_tok), eps - z0n
    per_block = lambda v: (v.float() - target).pow(2).reshape(B, L // model.block_size, -1).mean(-1)
    cond = per_block(model.velocity_2l(z0n, zt, t_tok))
    return t, cond, per_block(velocity_uncond(model, zt, t_tok)) if targs is None else None


def t_bin_means(t, err, n_bins=10):
    """Mean of err per t-bin [0, 0.1), ..., [0.9, 1.0] (0 where a bin is empty); t, err (N,)."""
    b = (t.clamp(0, 1 - 1e-6) * n_bins).long()
    sums = torch.zeros(n_bins, device=err.device).index_add_(0, b, err.float())
    return (sums / torch.bincount(b, minlength=n_bins).clamp(min=1)).tolist()


@torch.no_grad()
def eval_history_gap(model, data, n_batches, batch_size, seed, generator, targs):
    """FM loss with and without the clean history, paired, on blocks 1.. of held-out windows, per t-bin beside the
    training density of t; 'fm': the loss with t as training draws it, on every block."""
    batch = lambda i, base: data.batch("val", batch_size, batch_seed(seed + base, i, 0), model.latent_shift.device)
    t, c, u = (torch.cat(v) for v in zip(*(fm_with_and_without_history(model, batch(i, 98), generator)
                                           for i in range(n_batches))))
    first = 1 if c.shape[1] > 1 else 0  # blocks 1.. have a history
    c, u = c[:, first:].mean(1), u[:, first:].mean(1)
    gaps = (u - c).double()
    fm = [fm_with_and_without_history(model, batch(i, 96), generator, targs)[1].mean() for i in range(n_batches)]
    return {"fm": float(torch.stack(fm).mean()), "fm_cond": float(c.mean()), "fm_uncond": float(u.mean()),
            "fm_history_gap": float(gaps.mean()),  # > 0: the history helps
            "fm_history_gap_stderr": float(gaps.std() / len(gaps) ** 0.5) if len(gaps) > 1 else 0.0,
            "fm_cond_per_t_bin": t_bin_means(t, c), "fm_uncond_per_t_bin": t_bin_means(t, u),
            "train_t_density_per_bin": training_t_density(10, targs["t_loc"], targs["t_scale"], targs["t_uniform"])}


# -------------------------------------------------------------------------------- 3. likelihood
def hutchinson_divergence(fn, z, probe):
    """(fn(z), probe^T (d fn / d z) probe): per batch row, an unbiased estimate of the divergence of fn."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        v = fn(z)
        (vjp,) = torch.autograd.grad(v, z, probe)
    return v.detach(), (vjp * probe).flatten(1).sum(1)


def cola_log_prior(model, zn, steps=32, generator=None):
    """log p_psi(zn) (nats, per sequence) of latents zn (B, L, d) by the CNF change of variables: dz/dt = v from t = 0
    to 1 (midpoint) with its divergence, + log N(z1; 0, I); the 2L layout: sum_b log p(zn_b | zn_<b)."""
    B, L, d = zn.shape
    probe = torch.randn(zn.shape, device=zn.device, generator=generator)  # one fixed probe per solve
    z, logdet, h = zn.clone(), torch.zeros(B, device=zn.device), 1.0 / steps
    v = lambda x, t: model.velocity_2l(zn, x, torch.full((B, L), t, device=zn.device)).float()
    for i in range(steps):
        t = i * h
        z_mid = z + 0.5 * h * v(z, t)
        v_mid, div = hutchinson_divergence(lambda x: v(x, t + 0.5 * h), z_mid, probe)
        z, logdet = z + h * v_mid, logdet + h * div
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1) + logdet


@torch.no_grad()
def cola_bits_per_token(model, x, k=4, steps=32, generator=None):
    """ELBO and IWAE bounds on log p(x) in bits per token. x (B, T)."""
    mu, logvar = model.vae.encode(x)  # (B, N, d)
    log_w = []
    for _ in range(k):
        eps = torch.randn(mu.shape, device=x.device, generator=generator)
        z = mu + (0.5 * logvar).exp() * eps
        log_q = (-0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi))).flatten(1).sum(1)
        log_px = -F.cross_entropy(model.vae.decode(z).float().transpose(1, 2), x, reduction="none").sum(1)
        # p(z) = p_psi(normalize(z)) * |d normalize / dz|
        log_pz = cola_log_prior(model, model.normalize(z.float()), steps, generator) \
            + z.shape[1] * model.latent_scale.log().sum()
        log_w.append(log_px + log_pz - log_q)
    log_w = torch.stack(log_w)  # (k, B)
    elbo, iwae = log_w.mean(0), torch.logsumexp(log_w, 0) - math.log(k)
    return float(-elbo.mean() / (x.shape[1] * LN2)), float(-iwae.mean() / (x.shape[1] * LN2))


@torch.no_grad()
def ar_bits_per_token(model, x, bos_id):
    """Exact NLL of every token of x, the first one given <|endoftext|> as BOS."""
    inp = torch.cat([torch.full_like(x[:, :1], bos_id), x[:, :-1]], 1)
    return float(F.cross_entropy(model.logits(inp).float().transpose(1, 2), x) / LN2)


@torch.no_grad()
def llada_bits_per_token(model, x, k=8, generator=None):
    """Monte-Carlo ELBO of the masked diffusion model (stratified t), bits per token."""
    t = lambda i: (i + torch.rand(x.shape[0], device=x.device, generator=generator)) / k
    return sum(float(model.llada_loss(x, t=t(i))["loss"]) for i in range(k)) / k / LN2


def eval_likelihood(model, kind, batches, eos_id, generator, iwae_k=2, steps=16):
    """Bits per token on held-out batches (Cola: IWAE bound and ELBO); the baselines' validation accuracy too."""
    if kind == "cola":
        elbo, iwae = np.mean([cola_bits_per_token(model, x, iwae_k, steps, generator) for x in batches], 0)
        return {"bits_per_token": float(iwae), "bits_per_token_elbo": float(elbo)}
    acc = float(np.mean([float(model(x)["acc"]) for x in batches]))
    bits = [ar_bits_per_token(model, x, eos_id) if kind == "ar" else llada_bits_per_token(model, x, generator=generator)
            for x in batches]
    return {"bits_per_token": float(np.mean(bits)), "val_acc": acc}


# -------------------------------------------------------------------------------- generation: samples and tasks
def judge_perplexity(judge, prompts, samples):
    """Perplexity of each sample's tokens under the judge given its prompt, pooled over samples."""
    nll = 0.0
    for p, s in zip(prompts, samples):
        if s:  # a prompt of no tokens starts from the last id as BOS
            ids = torch.tensor([(p or [judge.cfg.vocab_size - 1]) + s], device=judge.head.weight.device)
            start = max(len(p), 1)
            logits = judge.logits(ids[:, :-1])[0, start - 1:].float()
            nll += float(F.cross_entropy(logits, ids[0, start:], reduction="sum"))
    return math.exp(nll / max(sum(map(len, samples)), 1))


def sample_quality(make_gen, prompts, sample_len, seed, repeats, train_ngrams, judge=None, first=None):
    """n-gram metrics and judge perplexity of rounds of samples from make_gen(seed + r) (`first`: round 0's, made):
    each metric's mean, and '<metric>_se' its standard error over the rounds."""
    rounds = []
    for r in range(repeats):
        smp = first if (r == 0 and first is not None) else make_gen(seed + r)(prompts, sample_len)[0]
        ppl = {} if judge is None else {"judge_ppl": judge_perplexity(judge, prompts, smp)}
        rounds.append({**ngram_metrics(smp, train_ngrams), **ppl})
    vals = {k: np.array([r[k] for r in rounds], dtype=np.float64) for k in rounds[0]}
    se = {k + "_se": float(v.std(ddof=1) / np.sqrt(repeats)) if repeats > 1 else 0.0 for k, v in vals.items()}
    return {**{k: float(v.mean()) for k, v in vals.items()}, **se}


def make_generator(kind, model, sampler, seed, temperature=0.0, release=False):
    """fn(prompts, max_new, row_seeds=None) -> (new-token lists, model passes): Cola with `sampler` (a snapshot as the
    release samples); AR and LLaDA at `temperature` (0: greedy), repetition penalty 1.1 (the paper's task settings)."""
    g = torch.Generator(device=str(next(model.parameters()).device)).manual_seed(seed)

    def run(prompts, max_new, row_seeds=None):
        if kind == "cola":  # row_seeds: each row's noise from its own seed (--item_noise_seed), as the release's
            outs, st = (release_generate(model, prompts, max_new, sampler, row_seeds, g) if release
                        else generate(model, prompts, max_new, sampler, g, row_noise(row_seeds, g.device)))
            return outs, st["blocks"] * (sampler.steps + 2) * len(prompts)  # per block: steps, commit, decode
        lm = replace(sampler, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.1)  # LLaDA: no penalty
        outs, st = lm_generate(kind, model, prompts, max_new, lm, g, max(sampler.steps, 8), min(16, max_new))
        return outs, st["passes"] * len(prompts)
    return run


def builtin_tasks(text, n=64, seed=0, context_words=40):
    """A LAMBADA-style last-word cloze and a 2-option next-line choice, built from held-out text."""
    rng, words, cloze = random.Random(seed), text.split(" "), []
    for _ in range(n * 20 if len(words) > context_words + 1 else 0):  # a text of too few words has no cloze
        if len(cloze) == n:
            break
        i = rng.randrange(context_words, len(words) - 1)
        if "\n" in words[i] or not re.fullmatch(r"[A-Za-z]{3,}", words[i]):
            continue
        cloze.append({"id": len(cloze), "prompt": " ".join(words[i - context_words:i]), "ground_truth": words[i],
                      "choices": None, "rule": "first_word"})
    lines, ending = [line for line in text.split("\n") if len(line.split()) >= 4], []
    for _ in range(n if len(lines) > 5 and len(set(lines)) > 1 else 0):  # a distractor must differ from the answer
        i = rng.randrange(4, len(lines) - 1)
        while (distractor := lines[rng.randrange(len(lines))]) == lines[i]:
            pass
        opts = [lines[i], distractor]
        rng.shuffle(opts)
        ending.append({"id": len(ending), "prompt": "\n".join(lines[i - 4:i]) + "\n", "ground_truth": lines[i],
                       "choices": opts, "rule": "choice"})
    return {name: tasks for name, tasks in (("lambada_style", cloze), ("ending_choice", ending)) if tasks}


def item_seed(base, item_id):
    """The release's per-item noise seed: base + id * 1000, a non-integer id through its crc32."""
    try:
        sid = int(item_id)
    except (TypeError, ValueError, OverflowError):  # a name, or Infinity
        sid = -1
    if not 0 <= sid < 2 ** 40:  # not a seed torch can take
        sid = zlib.crc32(str(item_id).encode("utf-8")) & 0xFFFFFFFF
    return base + sid * 1000


def run_tasks(gen, enc, prompt_ids, name, tasks, max_new, batch, out_path, noise_seed=None):
    """Accuracy (percent) of the answers, the generations written to out_path in the paper's task schema; with
    noise_seed (Cola), each item's noise from item_seed, as the release's benchmark script."""
    rows = []
    for i in tqdm(range(0, len(tasks), batch), desc=f"task {name}", leave=False, disable=None):
        chunk = tasks[i:i + batch]
        seeds = None if noise_seed is None else [item_seed(noise_seed, t["id"]) for t in chunk]
        outs, _ = gen([prompt_ids(t["prompt"]) for t in chunk], max_new, seeds)
        rows += [(t, enc.decode(o)) for t, o in zip(chunk, outs)]
    write_atomic(out_path, lambda f: f.writelines(
        json.dumps({"id": t["id"], "prompt": t["prompt"], "generate": text, "ground_truth": t["ground_truth"],
                    "choices": t["choices"]}, ensure_ascii=False) + "\n" for t, text in rows))
    return 100.0 * sum(score(text, t) for t, text in rows) / max(len(rows), 1)


# -------------------------------------------------------------------------------- the history testbed (testbed.py)
def eval_testbed(make_gen, encode, decode, val_text, n_prompts, n_samples, sample_len, seed, repeats, max_new=32,
                 prefix_len=31):
    """The testbed's measures, round r from make_gen(seed + r): 'uncond_valid', per sample from "\n" its valid share
    of complete lines (none: 0); 'completion_valid', 'open_left' (signed; '_abs') after "\n" + a held-out prefix. Each
    a mean, '<m>_se' over prompts (per-item means over rounds), '<m>_se_seeds' over rounds; round 0's first texts."""
    prefixes, per = completion_prefixes(val_text, n_prompts, prefix_len), {}
    for r in range(repeats):
        gen = make_gen(seed + r)
        free = [decode(s) for s in gen([encode("\n")] * n_samples, sample_len)[0]]
        done = [decode(s) for s in gen([encode("\n" + p) for p in prefixes], max_new)[0]]
        scores = [score_completion(p, s) for p, s in zip(prefixes, done)]
        row = {"uncond_valid": [np.mean([valid_line(x) for x in s.split("\n")[:-1]] or 0.0) for s in free],
               "completion_valid": [float(v) for v, _ in scores], "open_left": [e for _, e in scores],
               "open_left_abs": [abs(e) for _, e in scores]}
        per = {k: per.get(k, []) + [v] for k, v in row.items()}
        texts = texts if r else {"uncond_samples": free[:4], "completions": [p + " ||| " + s for p, s in
                                                                            zip(prefixes[:6], done)]}
    res = {"prompts": len(prefixes), "prompt_open_mean": float(np.mean([len(open_brackets(p)) for p in prefixes]))}
    for k, v in per.items():
        a = np.array(v, dtype=np.float64)  # (rounds, items)
        res.update({k: float(a.mean()), k + "_se": float(a.mean(0).std(ddof=1) / np.sqrt(a.shape[1])),
                    k + "_se_seeds": float(a.mean(1).std(ddof=1) / np.sqrt(repeats)) if repeats > 1 else 0.0})
    return {**res, **texts}


# -------------------------------------------------------------------------------- next-token accuracy of the prior
def prefilled(model, hist):
    """Fresh caches holding the clean history hist (B, Tc, d) -> (caches, validity of the history)."""
    caches, valid = model.new_caches(), torch.ones(hist.shape[:2], dtype=torch.bool, device=hist.device)
    if hist.shape[1]:
        model.prefill(hist, valid, caches)
    return caches, valid


def denoise_from(model, hist, start, steps, guidance, pin=None, pin_z=None):
    """The sampler's guided Euler steps from `start` (t = 1) of the block after hist; latents in `pin` held at pin_z."""
    caches, valid = prefilled(model, hist)
    return denoise_block(model, start, time_grid(steps, start.device), valid, guidance, caches[0], pin, pin_z)


def decode_after(model, hist, z):
    """Decoder logits (B, tpb, V) of block z after the clean history hist."""
    caches, valid = prefilled(model, hist)
    return model.decode_block(z, valid, caches)


def true_block(model, x, j):
    """Normalised posterior means of windows x (B, T): the history before block j, and block j."""
    zn, bs = reencode(model, x), model.block_size
    return zn[:, :j * bs], zn[:, j * bs:(j + 1) * bs]


@torch.no_grad()
def eval_prefix_prediction(model, x, j, steps, guidance, generator, known=None, noise_scale=1.0):
    """Token accuracy of block j generated from noise after the true history with its first k latents known and pinned,
    on the other positions (k = bs - 1: next-token prediction with the whole context); known: default 0, bs/2, bs-1.
    noise_scale 1 scores a sample (not an argmax, as AR's accuracy is); 0 the ODE from the origin, a point estimate."""
    bs, patch, (hist, true), res = model.block_size, model.vae.cfg.patch_size, true_block(model, x, j), {}
    for k in (0, bs // 2, bs - 1) if known is None else known:
        pin = (torch.arange(bs, device=x.device) < k).expand(x.shape[0], bs)
        z = torch.randn(true.shape, device=x.device, generator=generator) * noise_scale
        out = denoise_from(model, hist, z, steps, guidance, pin, true)
        hit = decode_after(model, hist, out).argmax(-1) == x[:, j * bs * patch:(j + 1) * bs * patch]
        res[f"known_{k}"] = float(hit[:, k * patch:].float().mean())
    return res


def plot_lines(panels, path):
    """One row of line plots saved to path; a panel is ({label: [(x, y), ...]}, its Axes.set settings)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (lines, settings) in zip(axes[0], panels):
        for label, pts in lines.items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(**settings)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    return save_figure(plt, fig, path)
