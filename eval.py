"""
Evaluate one checkpoint (Cola DLM, AR or LLaDA) and write <run>/eval.json plus PNG plots.

    python eval.py                                    # out/ckpt.pt on the held-out split it was trained on
    python eval.py --out_dir out_ar --tasks tasks/comedies.jsonl
    python eval.py --judge out_judge/ckpt.pt --sweep_steps 8,16,32 --sweep_guidance 1,3,7
    python eval.py --score eval_output/mmlu.jsonl ...  # score existing generations; no model needed

Cola DLM's own measures, in order (docs/method.md §3-§7):
1. the VAE: reconstruction and masked-branch accuracy, logSNR, reconstruction under flow-path noise;
2. the prior's use of its history: FM loss with and without the clean history, paired, per t-bin, next to
   how often training visits each t-bin;
3. likelihood: bits per token through the CNF of the prior (ELBO and IWAE bounds);
4. generation diagnostics, where block generation breaks: teacher-forced block accuracy started from
   the true latents noised to t0 (SDEdit style; t0 = 1 is generation from noise), the same with a known
   prefix of the block (next-token prediction with the whole context), how far generated latents sit from
   what the decoder knows, and history drift (generated vs re-encoded history).
For every kind: bits per token, generation tasks (scoring.py: the paper's rules; generations written
back in the paper's task schema), and samples: judge-free n-gram metrics (the fraction of generated
token 2- and 3-grams that occur in the training split, distinct-n), judge perplexity, speed.
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError
from decoder import GenerationError, ar_generate, denoise_block, generate, llada_generate, load_model
from diffusion import flow_path, history_blocks, t_bin_sums, time_grid
from prepare import REPO_DIR, DataError, TokenData, batch_seed, get_tokenizer
from presets import sampler_settings
from scoring import TaskError, TrainNgrams, ngram_metrics, read_tasks, score, score_file

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


@torch.no_grad()
def eval_history_gap(model, data, n_batches, batch_size, seed, generator, targs):
    """FM loss with the clean history (cond) and without it (each block alone), paired on the same noise,
    uniform t, on blocks 1.. of held-out windows; the difference's standard error; both per t-bin, with
    the training density of t per bin."""
    cs, us, ts = [], [], []
    for i in range(n_batches):
        x = data.batch("val", batch_size, batch_seed(seed + 98, i, 0), model.latent_shift.device)
        t, c, u = model.fm_eval(x, t_uniform=True, generator=generator)
        cs.append(history_blocks(c))
        us.append(history_blocks(u))
        ts.append(t)
    c, u, t = torch.cat(cs), torch.cat(us), torch.cat(ts)
    gaps = (u - c).double()
    # the FM loss as training sees it: t from the training distribution, every block
    fm = [model.fm_eval(data.batch("val", batch_size, batch_seed(seed + 96, i, 0), model.latent_shift.device),
                        targs["t_loc"], targs["t_scale"], targs["t_uniform"], generator)[1].mean() for i in range(n_batches)]
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
    if kind == "cola":
        bounds = [cola_bits_per_token(model, x, iwae_k, steps, generator) for x in batches]
        return {"bits_per_token": float(np.mean([b[1] for b in bounds])),
                "bits_per_token_elbo": float(np.mean([b[0] for b in bounds]))}
    if kind == "ar":
        return {"bits_per_token": float(np.mean([ar_bits_per_token(model, x, eos_id) for x in batches]))}
    return {"bits_per_token": float(np.mean([llada_bits_per_token(model, x, generator=generator) for x in batches]))}


# ----------------------------------------------------------------------------------------------------
# 4. generation diagnostics (Cola)

def prefilled(model, hist):
    """Fresh caches holding the clean history hist (B, Tc, d) -> (caches, validity of the history)."""
    caches = model.new_caches()
    valid = torch.ones(hist.shape[:2], dtype=torch.bool, device=hist.device)
    if hist.shape[1]:
        model.prefill(hist, valid, caches)
    return caches, valid


def denoise_from(model, hist, start, t0, steps, guidance):
    """The real sampler's guided Euler steps from t0 to 0 for the block after the clean history hist,
    started at `start` (B, bs, d), with round(steps * t0) steps (the sampler's step size)."""
    caches, valid = prefilled(model, hist)
    grid = time_grid(max(1, round(steps * t0)), start.device, t_max=t0)
    return denoise_block(model, start, grid, valid, guidance, caches[0])


def decode_after(model, hist, z):
    """Decoder logits (B, tpb, V) of block z after the clean history hist."""
    caches, valid = prefilled(model, hist)
    return model.decode_and_commit(z, valid, caches)


def true_block(model, x, j):
    """Normalised posterior means of windows x (B, T): the history before block j, and block j."""
    bs = model.block_size
    zn = model.normalize(model.vae.encode(x)[0].float())  # (B, L, d)
    return zn[:, :j * bs], zn[:, j * bs:(j + 1) * bs]


@torch.no_grad()
def eval_sdedit(model, x, j, steps, guidance, generator, t0s=(0.25, 0.5, 0.75, 1.0)):
    """Teacher-forced block generation: block j of held-out windows x (B, T) is generated by the real
    sampler given the true clean history, started from the true latents noised to t0 (SDEdit style;
    t0 = 1 is generation from noise), decoded, and compared with the true tokens. Beside it, the
    accuracy of decoding the noisy start directly: what the DiT adds at each t0."""
    tokens_per_block = model.vae.cfg.tokens_per_block
    target = x[:, j * tokens_per_block:(j + 1) * tokens_per_block]
    hist, true = true_block(model, x, j)
    acc = lambda z: float((decode_after(model, hist, z).argmax(-1) == target).float().mean())
    res = {}
    for t0 in t0s:
        start = flow_path(true, torch.randn(true.shape, device=x.device, generator=generator),
                          torch.tensor(t0, device=x.device))
        res[f"after_dit_{t0}"] = acc(denoise_from(model, hist, start, t0, steps, guidance))
        if t0 < 1:
            res[f"noisy_{t0}"] = acc(start)
    return res


@torch.no_grad()
def eval_prefix_prediction(model, x, j, steps, guidance, generator, known=(0, 8, 15)):
    """How well the prior predicts tokens from their context: block j of held-out windows is generated by the
    real sampler after the true history, with its first k latents known (pinned clean, as when a prompt ends
    inside a block), and the other positions are compared with the true tokens. k = 15 is next-token
    prediction with the whole context, the AR model's task (its validation 'acc')."""
    tokens_per_block, bs = model.vae.cfg.tokens_per_block, model.block_size
    target = x[:, j * tokens_per_block:(j + 1) * tokens_per_block]
    hist, true = true_block(model, x, j)
    res = {}
    for k in known:
        pin = (torch.arange(bs, device=x.device) < k).expand(x.shape[0], bs)
        caches, valid = prefilled(model, hist)
        z = torch.randn(true.shape, device=x.device, generator=generator)
        out = denoise_block(model, z, time_grid(steps, x.device), valid, guidance, caches[0], pin, true)
        hit = decode_after(model, hist, out).argmax(-1) == target
        res[f"known_{k}"] = float(hit[:, k * model.vae.cfg.patch_size:].float().mean())
    return res


def reencode(model, tokens):
    """Normalised posterior means of a token window (B, T) -> (B, T / patch, d)."""
    return model.normalize(model.vae.encode(tokens)[0].float())


@torch.no_grad()
def eval_latent_fit(model, x, j, steps, guidance, generator):
    """How far generated latents of block j (true clean history, from noise) sit from what the decoder
    knows: the decoder's max-probability and entropy on generated and on posterior latents, and the
    distance from each latent to the posterior latent of the token it decodes to (the decoded block
    re-encoded after the same history), beside the typical distance between neighbouring posterior latents."""
    tokens_per_block = model.vae.cfg.tokens_per_block
    hist, true = true_block(model, x, j)
    noise = torch.randn(true.shape, device=x.device, generator=generator)
    res = {}
    for name, z in (("generated", denoise_from(model, hist, noise, 1.0, steps, guidance)), ("posterior", true)):
        p = torch.softmax(decode_after(model, hist, z).float(), -1)  # (B, tpb, V)
        res[f"maxprob_{name}"] = float(p.max(-1).values.mean())
        res[f"entropy_{name}"] = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        decoded = torch.cat([x[:, :j * tokens_per_block], p.argmax(-1)], 1)
        res[f"dist_to_reencoded_{name}"] = float((z - reencode(model, decoded)[:, hist.shape[1]:]).norm(dim=-1).mean())
    res["dist_between_neighbours"] = float((true[:, 1:] - true[:, :-1]).norm(dim=-1).mean())
    return res


def eval_history_drift(model, prompts, n_tokens, steps, guidance, generator, train_ngrams):
    """Free generation with its own latents as history, and the same with every finished block decoded and
    re-encoded before it becomes history: n-gram metrics of both, and how far the generated latents of
    each block sit from the re-encoding of their own tokens."""
    res = {}
    for name, flag in (("generated", False), ("reencoded", True)):
        drift = []
        outs, _ = generate(model, prompts, n_tokens, steps, guidance, generator=generator, stop_ids=(),
                           reencode_history=flag, on_drift=drift.append)
        res[f"{name}_history"] = ngram_metrics(outs, train_ngrams)
        res[f"{name}_history"]["drift_per_block"] = drift
    return res


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


def make_generator(kind, model, steps, guidance, eos_id, seed, temperature=0.0, **cola_options):
    """fn(prompts, max_new) -> (new-token lists, model passes summed over rows). Greedy (temperature 0),
    repetition penalty 1.1 on generated tokens (the paper's task settings); batched for every kind.
    temperature > 0 samples AR's and LLaDA's tokens; Cola's samples are random through their noise, and its
    decoder stays greedy."""
    g = torch.Generator(device=str(next(model.parameters()).device)).manual_seed(seed)

    def run(prompts, max_new):
        if kind == "cola":
            outs, st = generate(model, prompts, max_new, steps, guidance, repetition_penalty=1.1, stop_ids=(eos_id,),
                                pad_id=eos_id, generator=g, **cola_options)
            return outs, (st["dit"] + st["dit_commit"] + st["decoder"]) * len(prompts)
        if kind == "ar":
            outs, st = ar_generate(model, prompts, max_new, temperature, repetition_penalty=1.1, eos_id=eos_id,
                                   generator=g)
        else:
            outs, st = llada_generate(model, prompts, max_new, steps=max(steps, 8), block_length=min(16, max_new),
                                      temperature=temperature, eos_id=eos_id, generator=g)
        return outs, st["passes"] * len(prompts)
    return run


def builtin_tasks(text, n=64, seed=0, context_words=40):
    """A LAMBADA-style last-word cloze and a 2-option next-line choice, built from held-out text."""
    rng = random.Random(seed)
    words = text.split(" ")
    cloze = []
    for _ in range(n * 20):
        if len(cloze) == n:
            break
        i = rng.randrange(context_words, len(words) - 1)
        if "\n" in words[i] or not re.fullmatch(r"[A-Za-z]{3,}", words[i]):
            continue
        cloze.append({"prompt": " ".join(words[i - context_words:i]), "ground_truth": words[i], "choices": None,
                      "rule": "first_word"})
    lines = [line for line in text.split("\n") if len(line.split()) >= 4]
    ending = []
    for _ in range(n):
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
    return {"lambada_style": cloze, "ending_choice": ending}


def run_tasks(gen, enc, name, tasks, max_new, batch, out_path=None):
    """Accuracy (percent) of greedy answers; with out_path, the generations are written there in the paper's
    task schema (id, prompt, generate, ground_truth, choices), so that they can be re-scored."""
    rows = []
    for i in tqdm(range(0, len(tasks), batch), desc=f"task {name}", leave=False, disable=None):
        chunk = tasks[i:i + batch]
        outs, _ = gen([enc.encode_ordinary(t["prompt"]) for t in chunk], max_new)
        rows += [(t, enc.decode(o)) for t, o in zip(chunk, outs)]
    if out_path:
        tmp = out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for t, text in rows:
                f.write(json.dumps({"id": t["id"], "prompt": t["prompt"], "generate": text,
                                    "ground_truth": t["ground_truth"], "choices": t["choices"]}, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)
    return 100.0 * sum(score(text, t) for t, text in rows) / max(len(rows), 1)


# ----------------------------------------------------------------------------------------------------
# plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_diagnostics(res, path):
    """Accuracy vs t0 (SDEdit), FM loss per t-bin with the training density of t, the decoder on generated
    vs posterior latents, drift per block, and accuracy with a known prefix."""
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(23, 3.6))
    sd = res.get("sdedit", {})
    t0s = sorted(float(k.split("_")[-1]) for k in sd if k.startswith("after_dit_"))
    axes[0].plot(t0s, [sd[f"after_dit_{t}"] for t in t0s], marker="o", label="after the DiT")
    noisy = [t for t in t0s if f"noisy_{t}" in sd]
    axes[0].plot(noisy, [sd[f"noisy_{t}"] for t in noisy], marker="s", label="decoding the noisy start")
    axes[0].set_xlabel("t0 (1 = from noise)")
    axes[0].set_ylabel("token accuracy of the block")
    axes[0].legend(fontsize=7)
    if "fm_cond_per_t_bin" in res:
        n = len(res["fm_cond_per_t_bin"])
        centers = [(i + 0.5) / n for i in range(n)]
        axes[1].plot(centers, res["fm_cond_per_t_bin"], marker="o", label="FM loss, with history")
        axes[1].plot(centers, res["fm_uncond_per_t_bin"], marker="s", label="FM loss, without")
        ax2 = axes[1].twinx()
        ax2.bar(centers, res["train_t_density_per_bin"], width=0.8 / n, alpha=0.25, color="gray")
        ax2.set_ylabel("training share of t (bars)")
        axes[1].set_xlabel("t")
        axes[1].legend(fontsize=7)
    fit = res.get("latent_fit", {})
    if fit:
        names = ["maxprob", "entropy", "dist_to_reencoded"]
        for i, (src, color) in enumerate((("posterior", "tab:orange"), ("generated", "tab:blue"))):
            axes[2].bar([j + 0.4 * i for j in range(3)], [fit[f"{n}_{src}"] for n in names], width=0.4,
                        color=color, label=f"{src} latents")
        axes[2].axhline(fit["dist_between_neighbours"], color="gray", ls="--", lw=1, label="distance between tokens")
        axes[2].set_xticks([j + 0.2 for j in range(3)], ["max prob", "entropy", "|z - re-encoded|"])
        axes[2].set_title("the decoder on the block's latents", fontsize=9)
        axes[2].legend(fontsize=7)
    drift = res.get("history_drift", {})
    for name, r in drift.items():
        axes[3].plot(range(len(r["drift_per_block"])), r["drift_per_block"], marker="o", label=name)
    axes[3].set_xlabel("generated block")
    axes[3].set_ylabel("|generated latent - re-encoded|")
    axes[3].legend(fontsize=7)
    pp = res.get("prefix_prediction", {})
    ks = sorted(int(k.split("_")[1]) for k in pp)
    axes[4].bar([str(k) for k in ks], [pp[f"known_{k}"] for k in ks], color="tab:blue")
    axes[4].set_xlabel("known latents of the block (true history before it)")
    axes[4].set_ylabel("token accuracy, the other positions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_curves(run_dir, path):
    logs = sorted(f for f in os.listdir(run_dir) if f.startswith("log_") and f.endswith(".jsonl"))
    if not logs:
        return None
    plt = _plt()
    keys = ["loss", "recon_acc", "fm", "fm_cond", "fm_uncond", "logsnr", "acc"]
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.5), squeeze=False)
    for ax, name in zip(axes[0], logs):
        rows = [json.loads(line) for line in open(os.path.join(run_dir, name))]
        for k in keys:
            if k in rows[0]:
                ax.plot([r["step"] for r in rows], [r[k] for r in rows], marker="o", label=k)
        ax.set_title(name[4:-6])
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(sweep, key, metrics, path):
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.plot([r[key] for r in sweep], [r[m] for r in sweep], marker="o")
        ax.set_xlabel(key)
        ax.set_ylabel(m)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.join(REPO_DIR, "out"), help="run directory holding ckpt.pt")
    p.add_argument("--ckpt", default=None, help="checkpoint path (overrides --out_dir)")
    p.add_argument("--score", nargs="+", default=None, metavar="FILE",
                   help="score the 'generate' fields of task files by the paper's rules and exit (no model)")
    p.add_argument("--data_dir", default=None, help="prepared data (default: the one the run trained on)")
    p.add_argument("--results", default=None, help="JSON output path (default: <run dir>/eval.json)")
    p.add_argument("--batches", type=int, default=4, help="held-out batches for losses and likelihood")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per held-out batch")
    p.add_argument("--fm_batches", type=int, default=32, help="held-out batches for the FM history comparison (Cola)")
    p.add_argument("--ll_steps", type=int, default=16, help="midpoint steps of the CNF likelihood solve")
    p.add_argument("--iwae_k", type=int, default=2, help="posterior samples per sequence for Cola's bounds")
    p.add_argument("--diag_windows", type=int, default=64, help="held-out windows for the generation diagnostics (Cola; 0: skip)")
    p.add_argument("--tasks", nargs="*", default=[], help="JSONL task files to generate answers for and score")
    p.add_argument("--builtin_n", type=int, default=32, help="examples per built-in task (0: skip them)")
    p.add_argument("--task_max_new", type=int, default=32, help="new tokens per task answer (paper: <= 32)")
    p.add_argument("--n_samples", type=int, default=8, help="samples per round for the sample metrics and speed")
    p.add_argument("--sample_len", type=int, default=96, help="new tokens per sample")
    p.add_argument("--sample_prompt", default="\n", help="prompt of every sample ('held-out': the first 16 tokens of held-out windows)")
    p.add_argument("--sample_temperature", type=float, default=0.0,
                   help="AR and LLaDA: token temperature of the samples (0: greedy, as the tasks; Cola's come from its noise)")
    p.add_argument("--judge", default=None, help="AR checkpoint that scores sample perplexity (name it in every comparison)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps per block (Cola) / LLaDA steps (default: preset; paper 16)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (Cola; default: preset; paper 7)")
    p.add_argument("--noise_scale", type=float, default=None, help="Cola: std of each block's starting noise (default: preset; paper 1)")
    p.add_argument("--grid_power", type=float, default=1.0, help="Cola: > 1 makes the time grid denser near t = 0 (paper: 1)")
    p.add_argument("--eta", type=float, default=None, help="Cola: share of fresh noise per step (default: preset; paper 0)")
    p.add_argument("--budget", default=None, choices=["blocks", "tokens"],
                   help="Cola: 'blocks' (the release) or exactly the tokens asked for (default: preset)")
    p.add_argument("--round_bf16", default=None, action=argparse.BooleanOptionalAction,
                   help="Cola: round the DiT's inputs to bfloat16 as the release does (default: preset)")
    p.add_argument("--sweep_steps", default="", help="comma list of step counts to sweep (Cola)")
    p.add_argument("--sweep_guidance", default="", help="comma list of guidance scales to sweep (Cola)")
    p.add_argument("--sweep_noise", default="", help="comma list of starting-noise scales to sweep (Cola)")
    p.add_argument("--sample_repeats", type=int, default=3, help="rounds of --n_samples samples (different noise)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    for name in ("batches", "batch_size", "fm_batches", "ll_steps", "iwae_k", "steps", "n_samples", "sample_len",
                 "sample_repeats"):
        if (getattr(args, name) or 1) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def main(argv=None):
    args = get_args(argv)
    try:
        if args.score:
            scores = [score_file(path) for path in args.score]
            for sc in scores:
                print(json.dumps({**sc, "accuracy": round(sc["accuracy"], 2)}))
            if len(scores) > 1:  # the paper's average: the mean of the per-task accuracies
                mean = sum(sc["accuracy"] for sc in scores) / len(scores)
                print(json.dumps({"task": "average", "n_tasks": len(scores), "accuracy": round(mean, 2)}))
            return scores
        return evaluate(args)
    except (DataError, CheckpointError, TaskError, GenerationError) as e:
        sys.exit(f"error: {e}")


@torch.no_grad()  # every measure is inference; the CNF divergence turns gradients on locally
def evaluate(args):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    run_dir = os.path.dirname(os.path.abspath(path))
    tasks = dict(read_tasks(f) for f in args.tasks)  # check every file before the long work
    model, ckpt = load_model(path, device)
    judge = None
    if args.judge:
        judge, jck = load_model(args.judge, device)
        if jck["kind"] != "ar":
            raise DataError(f"--judge {args.judge} holds a '{jck['kind']}' model; the judge must be an AR checkpoint")
    kind, targs = ckpt["kind"], ckpt["args"]
    for k, v in sampler_settings(targs.get("preset", "paper")).items():  # unset flags: the preset's sampler
        if getattr(args, k) is None:
            setattr(args, k, v)
    enc = get_tokenizer(ckpt["tokenizer"])
    eos = enc.eot_token
    data = TokenData(args.data_dir or targs["data_dir"], targs["seq_len"])
    train_ngrams = TrainNgrams(data.tokens("train", limit=50_000_000), data.meta["vocab_size"])
    torch.manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    batches = [data.batch("val", args.batch_size, batch_seed(args.seed + 99, i, 0), device) for i in range(args.batches)]
    res = {"kind": kind, "ckpt": path, "step": ckpt["step"], "train_flops": ckpt.get("train_flops", 0.0),
           "params": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ref_enc")),
           "seq_len": targs["seq_len"], "heldout_tokens": args.batches * args.batch_size * targs["seq_len"],
           "judge": args.judge, "guidance": args.guidance, "steps": args.steps}
    t0 = time.time()
    if kind == "cola":
        res.update(eval_vae(model, batches, targs["beta"], targs["mask_prob"], g))
        res.update(eval_history_gap(model, data, args.fm_batches, args.batch_size, args.seed, g, targs))
    res.update(eval_likelihood(model, kind, batches, eos, g, args.iwae_k, args.ll_steps))
    print(f"[eval] losses and likelihood: {time.time() - t0:.1f} s", flush=True)
    if kind == "cola" and args.diag_windows:
        t0 = time.time()
        x = torch.cat([data.batch("val", args.diag_windows, batch_seed(args.seed + 97, 0, 0), device)])
        j = min(2, x.shape[1] // model.vae.cfg.tokens_per_block - 1)  # the block to generate: one with history
        res["sdedit"] = eval_sdedit(model, x, j, args.steps, args.guidance, g)
        res["latent_fit"] = eval_latent_fit(model, x, j, args.steps, args.guidance, g)
        res["prefix_prediction"] = eval_prefix_prediction(model, x, j, args.steps, args.guidance, g)
        res["history_drift"] = eval_history_drift(model, [x[i, :16].tolist() for i in range(args.n_samples)],
                                                  args.sample_len, args.steps, args.guidance, g, train_ngrams)
        plot_diagnostics(res, os.path.join(run_dir, "diagnostics.png"))
        print(f"[eval] generation diagnostics: {time.time() - t0:.1f} s", flush=True)

    # generation: tasks, samples, speed
    cola_options = dict(noise_scale=args.noise_scale, grid_power=args.grid_power, eta=args.eta, budget=args.budget,
                        round_bf16=args.round_bf16) if kind == "cola" else {}
    gen = make_generator(kind, model, args.steps, args.guidance, eos, args.seed, **cola_options)
    val_text = enc.decode(data.tokens("val", limit=200_000).tolist())
    if args.builtin_n:
        tasks.update(builtin_tasks(val_text, args.builtin_n, args.seed))
    os.makedirs(os.path.join(run_dir, "generations"), exist_ok=True)
    res["tasks"] = {name: run_tasks(gen, enc, name, ts, args.task_max_new, 32,
                                    os.path.join(run_dir, "generations", f"{name}.jsonl"))
                    for name, ts in tasks.items()}
    if res["tasks"]:
        res["task_accuracy"] = sum(res["tasks"].values()) / len(res["tasks"])
    if args.sample_prompt == "held-out":
        prompts = [x[:16].tolist() for x in batches[0][:args.n_samples]]
    else:
        prompts = [enc.encode_ordinary(args.sample_prompt)] * args.n_samples
    res["sample_temperature"] = args.sample_temperature if kind != "cola" else 0.0
    sample_gen = make_generator(kind, model, args.steps, args.guidance, eos, args.seed, args.sample_temperature,
                                **cola_options) if args.sample_temperature > 0 and kind != "cola" else gen
    t1 = time.time()
    samples, passes = sample_gen(prompts, args.sample_len)
    dt = time.time() - t1
    n_tok = sum(len(s) for s in samples)
    res["gen_tokens_per_s"] = n_tok / dt
    res["passes_per_token"] = passes / max(n_tok, 1)
    quality = lambda first=None, **over: sample_quality(
        lambda seed: make_generator(kind, model, int(over.get("steps", args.steps)), over.get("guidance", args.guidance),
                                    eos, seed, args.sample_temperature, **{**cola_options, **{k: v for k, v in over.items()
                                                                     if k in cola_options}}),
        prompts, args.sample_len, args.seed, args.sample_repeats, train_ngrams, judge, first)
    res.update(quality(first=samples))
    res["samples"] = [enc.decode(p) + " ||| " + enc.decode(s) for p, s in zip(prompts, samples)]
    for key, values in (("steps", args.sweep_steps), ("guidance", args.sweep_guidance),
                        ("noise_scale", args.sweep_noise)):
        if values and kind == "cola":
            sweep = [{key: float(v), **quality(**{key: float(v)})} for v in values.split(",")]
            res[f"sweep_{key}"] = sweep
            metrics = [m for m in ("judge_ppl", "seen_2gram_rate", "seen_3gram_rate", "distinct_2") if m in sweep[0]]
            plot_sweep(sweep, key, metrics, os.path.join(run_dir, f"sweep_{key}.png"))
    plot_training_curves(run_dir, os.path.join(run_dir, "training_curves.png"))
    out_path = args.results or os.path.join(run_dir, "eval.json")
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, out_path)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
               if isinstance(v, (int, float)) or k == "tasks"}
    print(json.dumps(summary))
    for s in res["samples"][:3]:
        print("sample:", repr(s))
    print(f"wrote {out_path}")
    return res


if __name__ == "__main__":
    main()
