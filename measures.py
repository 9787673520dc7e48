"""
The measures eval.py reports for one model (docs/method.md §3-§9): Cola's VAE and its prior's use of the
history, likelihood for every kind (Cola's ELBO / IWAE bounds through the CNF of its prior, AR's exact NLL,
LLaDA's Monte-Carlo ELBO), and the generation measures: samplers with the paper's task settings, sample
quality (seen n-grams, distinct-n, judge perplexity, over rounds with standard errors), built-in tasks and
task files scored by scoring.py.
"""
import json
import math
import random
import re
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import write_atomic
from baselines import ar_generate, llada_generate
from decoder import generate
from release import release_generate
from diffusion import flow_path, sample_t
from prepare import batch_seed
from scoring import ngram_metrics, score

LN2 = math.log(2)


# ----------------------------------------------------------------------------------------------------
# 1. the VAE

@torch.no_grad()
def eval_vae(model, batches, beta, mask_prob, generator, ts=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0)):
    """Masked-branch accuracy, logSNR, and greedy reconstruction accuracy of the posterior mean moved
    along the flow path to t (in the DiT's normalised space): t = 0 is plain reconstruction."""
    vae, res = model.vae, {"mask_acc": 0.0, "logsnr": 0.0}
    acc_t = [0.0] * len(ts)
    for x in batches:
        out = vae(x, beta=beta, mask_prob=mask_prob, lam_mask=1.0)
        res["mask_acc"] += float(out["mask_acc"]) / len(batches)
        res["logsnr"] += float(out["logsnr"]) / len(batches)
        zn = model.normalize(vae.encode(x)[0].float())
        for i, t in enumerate(ts):
            noise = torch.randn(zn.shape, device=zn.device, generator=generator)
            logits = vae.decode(model.denormalize(flow_path(zn, noise, torch.tensor(t, device=zn.device))))
            acc_t[i] += float((logits.argmax(-1) == x).float().mean()) / len(batches)
    res["recon_acc"] = acc_t[0]
    res["recon_acc_vs_t"] = dict(zip(map(str, ts), acc_t))
    return res


# ----------------------------------------------------------------------------------------------------
# 2. the prior's use of its history

def training_t_density(n_bins, loc, scale, uniform):
    """Fraction of training draws of t in each bin [i/n, (i+1)/n): logit-normal(loc, scale) or uniform."""
    if uniform:
        return [1.0 / n_bins] * n_bins
    cdf = lambda t: 0.0 if t <= 0 else 1.0 if t >= 1 else 0.5 * (1 + math.erf((math.log(t / (1 - t)) - loc) / (scale * math.sqrt(2))))
    return [cdf((i + 1) / n_bins) - cdf(i / n_bins) for i in range(n_bins)]


def velocity_uncond(model, zt, t_tok):
    """The unconditional pass on the training layout: each noisy block alone at positions 0..bs-1 (what
    ColaDLM.guided_velocity's unconditional rows compute from the cache). zt (B, L, d), t_tok (B, L)."""
    B, L, d = zt.shape
    bs = model.block_size
    pos = torch.arange(bs, device=zt.device)
    mask = torch.ones(bs, bs, dtype=torch.bool, device=zt.device)
    return model.dit(zt.reshape(-1, bs, d), t_tok.reshape(-1, bs), pos, mask).reshape(B, L, d)


@torch.no_grad()
def fm_with_and_without_history(model, tokens, generator=None):
    """The prior with and without its clean history: FM loss per block (B, n_blocks), cond and uncond, on the same
    noise and t ~ U(0, 1) (t (B,) returned too), with the posterior mean as z0. Block 0 has no history, so its
    two losses are equal: compare blocks 1.."""
    z0n = model.normalize(model.vae.encode(tokens)[0].float())  # (B, L, d)
    B, L, _ = z0n.shape
    eps = torch.randn(z0n.shape, device=z0n.device, generator=generator)
    t = torch.rand(B, device=z0n.device, generator=generator)  # (B,)
    t_tok = t.unsqueeze(1).expand(B, L)
    zt, target = flow_path(z0n, eps, t_tok), eps - z0n
    per_block = lambda v: (v.float() - target).pow(2).reshape(B, L // model.block_size, -1).mean(-1)
    return t, per_block(model.velocity_2l(z0n, zt, t_tok)), per_block(velocity_uncond(model, zt, t_tok))


def t_bin_sums(t, err, n_bins=10):
    """Sum of err and counts per t-bin ([0, 0.1), ..., [0.9, 1.0]); t, err (N,). -> (2, n_bins)."""
    b = (t.clamp(0, 1 - 1e-6) * n_bins).long()
    sums = torch.zeros(n_bins, device=err.device).index_add_(0, b, err.float())
    counts = torch.zeros(n_bins, device=err.device).index_add_(0, b, torch.ones_like(err, dtype=torch.float))
    return torch.stack([sums, counts])


@torch.no_grad()
def training_fm(model, x, targs, generator):
    """The FM loss as training sees it: t from the training distribution, every block, posterior means."""
    z0n = model.normalize(model.vae.encode(x)[0].float())  # (B, L, d)
    B, L, _ = z0n.shape
    eps = torch.randn(z0n.shape, device=z0n.device, generator=generator)
    t = sample_t(B, targs["t_loc"], targs["t_scale"], targs["t_uniform"], z0n.device, generator).unsqueeze(1).expand(B, L)
    v = model.velocity_2l(z0n, flow_path(z0n, eps, t), t)
    return (v.float() - (eps - z0n)).pow(2).mean()


@torch.no_grad()
def eval_history_gap(model, data, n_batches, batch_size, seed, generator, targs):
    """FM loss with the clean history (cond) and without it (each block alone), paired on the same noise,
    uniform t, on blocks 1.. of held-out windows; the difference's standard error; both per t-bin, with
    the training density of t per bin."""
    cs, us, ts = [], [], []
    for i in range(n_batches):
        x = data.batch("val", batch_size, batch_seed(seed + 98, i, 0), model.latent_shift.device)
        t, c, u = fm_with_and_without_history(model, x, generator)  # blocks 1.. have a history
        cs.append(c[:, 1:].mean(1) if c.shape[1] > 1 else c.mean(1))
        us.append(u[:, 1:].mean(1) if u.shape[1] > 1 else u.mean(1))
        ts.append(t)
    c, u, t = torch.cat(cs), torch.cat(us), torch.cat(ts)
    gaps = (u - c).double()
    # the FM loss as training sees it: t from the training distribution, every block
    fm = [training_fm(model, data.batch("val", batch_size, batch_seed(seed + 96, i, 0), model.latent_shift.device),
                      targs, generator) for i in range(n_batches)]
    bins_c, bins_u = t_bin_sums(t, c), t_bin_sums(t, u)
    return {"fm": float(torch.stack(fm).mean()), "fm_cond": float(c.mean()), "fm_uncond": float(u.mean()),
            "fm_history_gap": float(gaps.mean()),  # > 0: the history helps
            "fm_history_gap_stderr": float(gaps.std() / len(gaps) ** 0.5) if len(gaps) > 1 else 0.0,
            "fm_cond_per_t_bin": (bins_c[0] / bins_c[1].clamp(min=1)).tolist(),
            "fm_uncond_per_t_bin": (bins_u[0] / bins_u[1].clamp(min=1)).tolist(),
            "train_t_density_per_bin": training_t_density(bins_c.shape[1], targs["t_loc"], targs["t_scale"],
                                                          targs["t_uniform"])}


# ----------------------------------------------------------------------------------------------------
# 3. likelihood

def hutchinson_divergence(fn, z, probe):
    """Returns (fn(z), probe^T (d fn / d z) probe): an unbiased estimate of the divergence for a
    Gaussian or Rademacher probe. fn maps (B, ...) -> (B, ...); the estimate is per batch row."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        v = fn(z)
        (vjp,) = torch.autograd.grad(v, z, probe)
    return v.detach(), (vjp * probe).flatten(1).sum(1)


def cola_log_prior(model, zn, steps=32, generator=None):
    """log p_psi(zn) (nats, per sequence) of normalised latents zn (B, L, d) by the CNF change of
    variables: integrate dz/dt = v from t = 0 to 1 (midpoint rule) with the divergence, then add
    log N(z1; 0, I). The 2L layout gives every block its clean history: sum_b log p(zn_b | zn_<b)."""
    B, L, d = zn.shape
    probe = torch.randn(zn.shape, device=zn.device, generator=generator)  # one fixed probe per solve
    z, logdet, h = zn.clone(), torch.zeros(B, device=zn.device), 1.0 / steps

    def field(t):
        t_tok = torch.full((B, L), t, device=zn.device)
        return lambda x: model.velocity_2l(zn, x, t_tok).float()

    for i in range(steps):
        t = i * h
        z_mid = z + 0.5 * h * field(t)(z)
        v_mid, div = hutchinson_divergence(field(t + 0.5 * h), z_mid, probe)
        z = z + h * v_mid
        logdet = logdet + h * div
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1) + logdet


@torch.no_grad()
def cola_bits_per_token(model, x, k=4, steps=32, generator=None):
    """ELBO and IWAE bounds on log p(x) in bits per token. x (B, T)."""
    vae = model.vae
    mu, logvar = vae.encode(x)  # (B, N, d)
    std = (0.5 * logvar).exp()
    log_w = []
    for _ in range(k):
        eps = torch.randn(mu.shape, device=x.device, generator=generator)
        z = mu + std * eps
        log_q = (-0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi))).flatten(1).sum(1)
        log_px = -F.cross_entropy(vae.decode(z).float().transpose(1, 2), x, reduction="none").sum(1)
        # p(z) = p_psi(normalize(z)) * |d normalize / dz|
        log_pz = cola_log_prior(model, model.normalize(z.float()), steps, generator) \
            + z.shape[1] * model.latent_scale.log().sum()
        log_w.append(log_px + log_pz - log_q)
    log_w = torch.stack(log_w)  # (k, B)
    T = x.shape[1]
    elbo, iwae = log_w.mean(0), torch.logsumexp(log_w, 0) - math.log(k)
    return float(-elbo.mean() / (T * LN2)), float(-iwae.mean() / (T * LN2))


@torch.no_grad()
def ar_bits_per_token(model, x, bos_id):
    """Exact NLL of every token of x, the first one given <|endoftext|> as BOS."""
    inp = torch.cat([torch.full_like(x[:, :1], bos_id), x[:, :-1]], 1)
    return float(F.cross_entropy(model.logits(inp).float().transpose(1, 2), x) / LN2)


@torch.no_grad()
def llada_bits_per_token(model, x, k=8, generator=None):
    """Monte-Carlo ELBO of the masked diffusion model (stratified t), bits per token."""
    total = 0.0
    for i in range(k):
        t = (i + torch.rand(x.shape[0], device=x.device, generator=generator)) / k
        total += float(model.llada_loss(x, t=t)["loss"])
    return total / k / LN2


def eval_likelihood(model, kind, batches, eos_id, generator, iwae_k=2, steps=16):
    """Bits per token on held-out batches; for the baselines also their validation accuracy (AR: the next
    token; LLaDA: masked tokens at a uniform masking rate)."""
    if kind == "cola":
        bounds = [cola_bits_per_token(model, x, iwae_k, steps, generator) for x in batches]
        return {"bits_per_token": float(np.mean([b[1] for b in bounds])),
                "bits_per_token_elbo": float(np.mean([b[0] for b in bounds]))}
    acc = float(np.mean([float(model(x)["acc"]) for x in batches]))
    if kind == "ar":
        return {"bits_per_token": float(np.mean([ar_bits_per_token(model, x, eos_id) for x in batches])), "val_acc": acc}
    return {"bits_per_token": float(np.mean([llada_bits_per_token(model, x, generator=generator) for x in batches])),
            "val_acc": acc}



# ----------------------------------------------------------------------------------------------------
# generation: samples and tasks

def judge_perplexity(judge, prompts, samples):
    """Perplexity of each sample's tokens under the judge given its prompt, pooled over samples."""
    nll, n = 0.0, 0
    for p, s in zip(prompts, samples):
        if not s:
            continue
        ids = torch.tensor([(p or [judge.cfg.vocab_size - 1]) + s], device=judge.head.weight.device)
        logits = judge.logits(ids[:, :-1]).float()
        start = max(len(p), 1)
        nll += float(F.cross_entropy(logits[0, start - 1:], ids[0, start:], reduction="sum"))
        n += len(s)
    return math.exp(nll / max(n, 1))


def sample_quality(make_gen, prompts, sample_len, seed, repeats, train_ngrams, judge=None, first=None):
    """n-gram metrics (scoring.ngram_metrics) and judge perplexity of `repeats` rounds of samples with
    different noise, make_gen(seed) giving each round's generator: the mean, and '<metric>_se' its
    standard error over the rounds. `first` reuses samples already made with seed `seed`."""
    rounds = []
    for r in range(repeats):
        smp = first if (r == 0 and first is not None) else make_gen(seed + r)(prompts, sample_len)[0]
        row = ngram_metrics(smp, train_ngrams)
        if judge is not None:
            row["judge_ppl"] = judge_perplexity(judge, prompts, smp)
        rounds.append(row)
    res = {}
    for k in rounds[0]:
        vals = np.array([r[k] for r in rounds], dtype=np.float64)
        res[k] = float(vals.mean())
        res[k + "_se"] = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
    return res


def make_generator(kind, model, sampler, seed, temperature=0.0, release=False):
    """fn(prompts, max_new, row_seeds=None) -> (new-token lists, model passes summed over rows). Cola samples
    with `sampler` (decoder.SamplerConfig; a released snapshot as the release does); AR and LLaDA decode greedy
    (temperature 0) or sample, repetition penalty 1.1 (the paper's task settings); batched for every kind."""
    g = torch.Generator(device=str(next(model.parameters()).device)).manual_seed(seed)
    stop = sampler.stop_ids[0]

    def run(prompts, max_new, row_seeds=None):
        if kind == "cola":
            if release:
                outs, st = release_generate(model, prompts, max_new, sampler, row_seeds, g)
            else:
                outs, st = generate(model, prompts, max_new, sampler, g)
            return outs, st["blocks"] * (sampler.steps + 2) * len(prompts)  # per block: steps, commit, decode
        if kind == "ar":
            outs, st = ar_generate(model, prompts, max_new, temperature, repetition_penalty=1.1, eos_id=stop, generator=g)
        else:
            outs, st = llada_generate(model, prompts, max_new, steps=max(sampler.steps, 8), block_length=min(16, max_new),
                                      temperature=temperature, eos_id=stop, generator=g)
        return outs, st["passes"] * len(prompts)
    return run


def builtin_tasks(text, n=64, seed=0, context_words=40):
    """A LAMBADA-style last-word cloze and a 2-option next-line choice, built from held-out text."""
    rng = random.Random(seed)
    words = text.split(" ")
    cloze = []
    for _ in range(n * 20 if len(words) > context_words + 1 else 0):  # a text of too few words has no cloze
        if len(cloze) == n:
            break
        i = rng.randrange(context_words, len(words) - 1)
        if "\n" in words[i] or not re.fullmatch(r"[A-Za-z]{3,}", words[i]):
            continue
        cloze.append({"prompt": " ".join(words[i - context_words:i]), "ground_truth": words[i], "choices": None,
                      "rule": "first_word"})
    lines = [line for line in text.split("\n") if len(line.split()) >= 4]
    ending = []
    for _ in range(n if len(lines) > 5 and len(set(lines)) > 1 else 0):  # a distractor must differ from the answer
        i = rng.randrange(4, len(lines) - 1)
        distractor = lines[rng.randrange(len(lines))]
        while distractor == lines[i]:
            distractor = lines[rng.randrange(len(lines))]
        opts = [lines[i], distractor]
        rng.shuffle(opts)
        ending.append({"prompt": "\n".join(lines[i - 4:i]) + "\n", "ground_truth": lines[i], "choices": opts,
                       "rule": "choice"})
    for tasks in (cloze, ending):
        for i, t in enumerate(tasks):
            t["id"] = i
    return {name: tasks for name, tasks in (("lambada_style", cloze), ("ending_choice", ending)) if tasks}


def item_seed(base, item_id):
    """The release's per-item noise seed: base + id * 1000, a non-integer id through its crc32."""
    try:
        sid = int(item_id)
    except (TypeError, ValueError):
        sid = zlib.crc32(str(item_id).encode("utf-8")) & 0xFFFFFFFF
    return base + sid * 1000


def run_tasks(gen, enc, prompt_ids, name, tasks, max_new, batch, out_path=None, noise_seed=None):
    """Accuracy (percent) of greedy answers; with out_path, the generations are written there in the paper's
    task schema (id, prompt, generate, ground_truth, choices), so that they can be re-scored.
    prompt_ids(text) -> the prompt's token ids; noise_seed (Cola): every item's noise from its own seed
    (item_seed), as the release's benchmark script runs."""
    rows = []
    for i in tqdm(range(0, len(tasks), batch), desc=f"task {name}", leave=False, disable=None):
        chunk = tasks[i:i + batch]
        seeds = None if noise_seed is None else [item_seed(noise_seed, t["id"]) for t in chunk]
        outs, _ = gen([prompt_ids(t["prompt"]) for t in chunk], max_new, **({} if seeds is None else {"row_seeds": seeds}))
        rows += [(t, enc.decode(o)) for t, o in zip(chunk, outs)]
    if out_path:
        write_atomic(out_path, lambda f: f.writelines(
            json.dumps({"id": t["id"], "prompt": t["prompt"], "generate": text, "ground_truth": t["ground_truth"],
                        "choices": t["choices"]}, ensure_ascii=False) + "\n" for t, text in rows))
    return 100.0 * sum(score(text, t) for t, text in rows) / max(len(rows), 1)


