"""
Evaluate any checkpoint (Cola DLM, AR or LLaDA) as the paper measures it (SPEC §7, §9), writing one
JSON of results plus PNG plots.

    python eval.py                                   # out/ckpt.pt on the held-out split it was trained on
    python eval.py --ckpt out_ar/ckpt.pt --tasks my_task.jsonl
    python eval.py --judge out_ar/ckpt.pt --sweep_steps 4,8,16 --sweep_cfg 1,3,5
    python eval.py --compare out/eval.json out_ar/eval.json out_llada/eval.json   # scaling plot only

- VAE (Cola): reconstruction and masked accuracy, logSNR, reconstruction accuracy under noise (vs t).
- Prior (Cola): FM validation loss, overall and per t-bin, with and without the clean history.
- Likelihood, bits per token on the same held-out windows: Cola's ELBO / IWAE bound through the CNF
  of the prior (Hutchinson divergence, one fixed probe per solve), AR's exact NLL, LLaDA's ELBO.
  The paper stresses that this likelihood is badly aligned with generation quality.
- Generation tasks scored as the paper scores its benchmarks: output cut at the first newline,
  lower-cased, punctuation stripped, whitespace collapsed; MCQ outputs mapped to the best-matching
  option; LAMBADA's first word. Task files are JSONL, one object per line:
  {"prompt": str, "answer": str, "options": [str, ...] (optional), "scoring": "first_word"|"option"|"exact"}
  Two tasks are built offline from the held-out text: a LAMBADA-style last-word cloze and a 2-option
  ending choice (Story Cloze style).
- Sample quality: distinct-n, repetition, unigram entropy, and perplexity under a --judge AR checkpoint.
- Speed: generated tokens/s and model passes per token.
"""
import argparse
import json
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from baselines import ar_generate, llada_generate
from decoder import GenerationError, generate
from prepare import DataError, get_tokenizer
from train import HERE, TokenData, batch_seed, load_model

LN2 = math.log(2)


# ----------------------------------------------------------------------------------------------------
# scoring (pure)

class TaskError(ValueError):
    pass


_PUNCT = re.compile("[" + re.escape(string.punctuation) + "\u2018\u2019\u201c\u201d]")


def normalize_answer(text):
    """Cut at the first newline, lower-case, strip punctuation, collapse whitespace."""
    text = text.lstrip("\n").split("\n", 1)[0].lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def first_word(text):
    words = normalize_answer(text).split()
    return words[0] if words else ""


def word_f1(a, b):
    ta, tb = a.split(), b.split()
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def best_option(output, options):
    """Index of the option that best matches the output (word F1, then longest common prefix; ties: first)."""
    out = normalize_answer(output)
    scores = []
    for i, opt in enumerate(options):
        o = normalize_answer(opt)
        prefix = len(os.path.commonprefix([out, o])) / max(len(o), 1)
        scores.append((word_f1(out, o), prefix, -i))
    return -max(scores)[2]


def score_one(output, task):
    kind = task["scoring"]
    if kind == "first_word":
        return float(first_word(output) == first_word(task["answer"]))
    if kind == "option":
        return float(task["options"][best_option(output, task["options"])].strip() == task["answer"].strip())
    return float(normalize_answer(output) == normalize_answer(task["answer"]))


def read_tasks(path):
    """Parse and check a JSONL task file; a bad line raises TaskError naming its line number."""
    if not os.path.exists(path):
        raise TaskError(f"task file {path} not found")
    tasks = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{path}:{n}: each line must be a JSON object")
            for key in ("prompt", "answer"):
                if not isinstance(obj.get(key), str):
                    raise TaskError(f"{path}:{n}: '{key}' must be a string")
            scoring = obj.get("scoring", "option" if "options" in obj else "exact")
            if scoring not in ("first_word", "option", "exact"):
                raise TaskError(f"{path}:{n}: 'scoring' must be first_word, option or exact, got {scoring!r}")
            opts = obj.get("options")
            if opts is not None and (not isinstance(opts, list) or len(opts) < 2
                                     or not all(isinstance(o, str) for o in opts)):
                raise TaskError(f"{path}:{n}: 'options' must be a list of at least 2 strings")
            if scoring == "option":
                if opts is None:
                    raise TaskError(f"{path}:{n}: scoring 'option' needs 'options'")
                if obj["answer"].strip() not in [o.strip() for o in opts]:
                    raise TaskError(f"{path}:{n}: 'answer' is not one of the options")
            tasks.append({"prompt": obj["prompt"], "answer": obj["answer"], "options": opts, "scoring": scoring})
    if not tasks:
        raise TaskError(f"task file {path} holds no task")
    return tasks


def builtin_tasks(text, n=64, seed=0, context_words=40):
    """LAMBADA-style last-word cloze and a 2-option next-line choice from held-out text."""
    rng = random.Random(seed)
    words = text.split(" ")
    cloze = []
    for _ in range(n * 20):
        if len(cloze) == n:
            break
        i = rng.randrange(context_words, len(words) - 1)
        target = words[i]
        if "\n" in target or not re.fullmatch(r"[A-Za-z]{3,}", target):
            continue
        cloze.append({"prompt": " ".join(words[i - context_words:i]), "answer": target, "options": None,
                      "scoring": "first_word"})
    lines = [l for l in text.split("\n") if len(l.split()) >= 4]
    ending = []
    for _ in range(n):
        i = rng.randrange(4, len(lines) - 1)
        distractor = lines[rng.randrange(len(lines))]
        while distractor == lines[i]:
            distractor = lines[rng.randrange(len(lines))]
        opts = [lines[i], distractor]
        rng.shuffle(opts)
        ending.append({"prompt": "\n".join(lines[i - 4:i]) + "\n", "answer": lines[i], "options": opts,
                       "scoring": "option"})
    return {"lambada_style": cloze, "ending_choice": ending}


def sample_stats(samples):
    """distinct-1/2/3 over all samples, 4-gram repetition inside samples, unigram entropy (bits)."""
    res = {}
    for n in (1, 2, 3):
        grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
        res[f"distinct_{n}"] = len(set(grams)) / max(len(grams), 1)
    rep, tot = 0, 0
    for s in samples:
        seen = set()
        for i in range(len(s) - 3):
            g = tuple(s[i:i + 4])
            rep += g in seen
            tot += 1
            seen.add(g)
    res["repetition_4"] = rep / max(tot, 1)
    counts = Counter(t for s in samples for t in s)
    total = sum(counts.values())
    res["unigram_entropy_bits"] = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
    return res


# ----------------------------------------------------------------------------------------------------
# likelihood

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
    log N(z1; 0, I). The 2L layout gives every block its clean history, so this is
    sum_b log p(zn_b | zn_<b)."""
    B, L, d = zn.shape
    probe = torch.randn(zn.shape, device=zn.device, generator=generator)  # one fixed probe per solve
    z, logdet, h = zn.clone(), torch.zeros(B, device=zn.device), 1.0 / steps

    def field(t):
        t_tok = torch.full((B, L), t, device=zn.device)
        return lambda x: model.velocity_2l(zn, x, t_tok).float()

    for i in range(steps):
        t = i * h
        v = field(t)(z)
        z_mid = z + 0.5 * h * v
        v_mid, div = hutchinson_divergence(field(t + 0.5 * h), z_mid, probe)
        z = z + h * v_mid
        logdet = logdet + h * div
    log_p1 = -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)
    return log_p1 + logdet


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
    elbo = log_w.mean(0)
    iwae = torch.logsumexp(log_w, 0) - math.log(k)
    return float(-elbo.mean() / (T * LN2)), float(-iwae.mean() / (T * LN2))


@torch.no_grad()
def ar_bits_per_token(model, x, bos_id):
    """Exact NLL of every token of x, the first one given <|endoftext|> as BOS."""
    inp = torch.cat([torch.full_like(x[:, :1], bos_id), x[:, :-1]], 1)
    logits = model.logits(inp).float()
    return float(F.cross_entropy(logits.transpose(1, 2), x) / LN2)


@torch.no_grad()
def llada_bits_per_token(model, x, k=8, generator=None):
    """Monte-Carlo ELBO of the masked diffusion model (stratified t), bits per token."""
    total = 0.0
    for i in range(k):
        u = torch.rand(x.shape[0], device=x.device, generator=generator)
        t = (i + u) / k
        total += float(model.llada_loss(x, t=t)["loss"])
    return total / k / LN2


# ----------------------------------------------------------------------------------------------------
# models behind one interface

def make_generator(kind, model, steps, cfg_scale, eos_id, seed):
    """fn(list of prompt ids, max_new) -> (list of new ids, model passes summed over samples). Greedy, as
    the paper's tasks."""
    g = torch.Generator(device=str(next(model.parameters()).device)).manual_seed(seed)

    def run(prompts, max_new):
        if kind == "cola":
            outs, st = generate(model, prompts, max_new, steps, cfg_scale, repetition_penalty=1.1, eos_id=eos_id,
                                pad_id=eos_id, generator=g)
            # a batched pass serves every row: count it once per row, as AR's passes are per sample
            return outs, (st["dit"] + st["dit_commit"] + st["decoder"]) * len(prompts)
        outs, passes = [], 0
        for p in prompts:
            if kind == "ar":
                o, st = ar_generate(model, p, max_new, repetition_penalty=1.1, eos_id=eos_id)
            else:
                o, st = llada_generate(model, p, max_new, steps=max(steps, 8), block_length=min(16, max_new),
                                       eos_id=eos_id)
            outs.append(o)
            passes += st["passes"]
        return outs, passes
    return run


def run_tasks(gen, enc, tasks, max_new, batch):
    hits, n = 0.0, 0
    for i in range(0, len(tasks), batch):
        chunk = tasks[i:i + batch]
        outs, _ = gen([enc.encode_ordinary(t["prompt"]) for t in chunk], max_new)
        for t, o in zip(chunk, outs):
            hits += score_one(enc.decode(o), t)
            n += 1
    return hits / max(n, 1)


# ----------------------------------------------------------------------------------------------------
# plots

def plot_training_curves(run_dir, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = sorted(f for f in os.listdir(run_dir) if f.startswith("log_") and f.endswith(".jsonl"))
    if not logs:
        return None
    keys = ["loss", "recon_acc", "fm", "fm_cond", "fm_uncond", "logsnr", "acc"]
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.5), squeeze=False)
    for ax, name in zip(axes[0], logs):
        rows = [json.loads(l) for l in open(os.path.join(run_dir, name))]
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


def plot_scaling(results, metric, path):
    """metric vs training FLOPs, one series per model kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in sorted({r["kind"] for r in results}):
        pts = sorted((r["train_flops"], r[metric]) for r in results if r["kind"] == kind and metric in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(sweep, key, metrics, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    p.add_argument("--out_dir", default=os.path.join(HERE, "out"), help="run directory holding ckpt.pt")
    p.add_argument("--ckpt", default=None, help="checkpoint path (overrides --out_dir)")
    p.add_argument("--data_dir", default=None, help="prepared data (default: the one the run trained on)")
    p.add_argument("--results", default=None, help="JSON output path (default: <run dir>/eval.json)")
    p.add_argument("--batches", type=int, default=4, help="held-out batches for losses and likelihood")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per held-out batch")
    p.add_argument("--fm_batches", type=int, default=32,
                   help="held-out batches for the FM loss with / without history (Cola)")
    p.add_argument("--ll_steps", type=int, default=16, help="midpoint steps of the CNF likelihood solve")
    p.add_argument("--iwae_k", type=int, default=2, help="posterior samples per sequence for Cola's bounds")
    p.add_argument("--tasks", nargs="*", default=[], help="JSONL task files to score")
    p.add_argument("--builtin_n", type=int, default=32, help="examples per built-in task (0: skip them)")
    p.add_argument("--task_max_new", type=int, default=32, help="new tokens per task answer (paper: <= 32)")
    p.add_argument("--n_samples", type=int, default=8, help="samples for sample-quality metrics and speed")
    p.add_argument("--sample_len", type=int, default=64, help="new tokens per sample")
    p.add_argument("--judge", default=None, help="AR checkpoint that scores sample perplexity")
    p.add_argument("--steps", type=int, default=16, help="Euler steps per block (Cola) / LLaDA steps")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale (Cola)")
    p.add_argument("--sweep_steps", default="", help="comma list of step counts to sweep (Cola)")
    p.add_argument("--sweep_cfg", default="", help="comma list of guidance scales to sweep (Cola)")
    p.add_argument("--compare", nargs="*", default=None,
                   help="eval JSON files of several runs: draw the scaling plot and exit")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    for name in ("batches", "batch_size", "fm_batches", "ll_steps", "iwae_k", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    return a


def main(argv=None):
    a = get_args(argv)
    try:
        if a.compare is not None:
            results = []
            for f in a.compare:
                if not os.path.exists(f):
                    raise DataError(f"results file {f} not found")
                results.append(json.load(open(f)))
            for m in ("bits_per_token", "task_accuracy"):
                print("wrote", plot_scaling(results, m, os.path.join(a.results or ".", f"scaling_{m}.png")))
            return
        return evaluate(a)
    except (DataError, TaskError, GenerationError) as e:
        sys.exit(f"error: {e}")


def evaluate(a):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    path = a.ckpt or os.path.join(a.out_dir, "ckpt.pt")
    run_dir = os.path.dirname(os.path.abspath(path))
    tasks = {os.path.basename(f): read_tasks(f) for f in a.tasks}  # check every file before the long work
    model, ckpt = load_model(path, device)
    kind, targs = ckpt["kind"], ckpt["args"]
    enc = get_tokenizer(ckpt["tokenizer"])
    eos = enc.eot_token
    data = TokenData(a.data_dir or targs["data_dir"], targs["seq_len"])
    torch.manual_seed(a.seed)
    g = torch.Generator(device=device).manual_seed(a.seed)
    batches = [data.batch("val", a.batch_size, batch_seed(a.seed + 99, 0, 0, i), device) for i in range(a.batches)]
    res = {"kind": kind, "ckpt": path, "step": ckpt["step"], "train_flops": ckpt.get("train_flops", 0.0),
           "params": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ref_enc")),
           "seq_len": targs["seq_len"], "heldout_tokens": a.batches * a.batch_size * targs["seq_len"]}
    t0 = time.time()
    if kind == "cola":
        from diffusion import flow_path, history_blocks, t_bin_sums
        vae = model.vae
        ts = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
        acc = {k: 0.0 for k in ("recon_acc", "mask_acc", "logsnr", "fm", "fm_cond", "fm_uncond")}
        noise_acc = [0.0] * len(ts)
        for x in batches:
            out = vae(x, **{k: targs[k] for k in ("beta", "mask_prob")}, lam_mask=1.0)
            acc["mask_acc"] += float(out["mask_acc"]) / a.batches
            acc["logsnr"] += float(out["logsnr"]) / a.batches
            mu, _ = vae.encode(x)
            zn = model.normalize(mu.float())
            for i, t in enumerate(ts):
                noisy = flow_path(zn, torch.randn(zn.shape, device=device, generator=g), torch.tensor(t, device=device))
                noise_acc[i] += float((vae.decode(model.denormalize(noisy)).argmax(-1) == x).float().mean()) / a.batches
            with torch.no_grad():
                fm = model(x, t_loc=targs["t_loc"], t_scale=targs["t_scale"], t_uniform=targs["t_uniform"])
            acc["fm"] += float(fm["fm"]) / a.batches
        # the prior with and without its clean history, on the same noise: a paired comparison over more
        # windows than the likelihood uses (it is cheap), uniform t so that every bin gets samples
        cs, us, tt = [], [], []
        for i in range(a.fm_batches):
            x = data.batch("val", a.batch_size, batch_seed(a.seed + 98, 0, 0, i), device)
            t, c, u = model.fm_eval(x, t_uniform=True, generator=g)
            cs.append(history_blocks(c))  # (B,): blocks 1.., the ones with a history
            us.append(history_blocks(u))
            tt.append(t)
        c, u, t = torch.cat(cs), torch.cat(us), torch.cat(tt)
        acc["fm_cond"], acc["fm_uncond"] = float(c.mean()), float(u.mean())
        bins_c, bins_u = t_bin_sums(t, c), t_bin_sums(t, u)
        gaps = (u - c).double()
        acc["recon_acc"] = noise_acc[0]
        res.update(acc)
        res["recon_acc_vs_t"] = dict(zip(map(str, ts), noise_acc))
        res["fm_history_gap"] = float(gaps.mean())  # > 0: the history helps
        res["fm_history_gap_stderr"] = float(gaps.std() / len(gaps) ** 0.5) if len(gaps) > 1 else 0.0
        res["fm_cond_per_t_bin"] = (bins_c[0] / bins_c[1].clamp(min=1)).tolist()
        res["fm_uncond_per_t_bin"] = (bins_u[0] / bins_u[1].clamp(min=1)).tolist()
        elbo = iwae = 0.0
        for x in batches:
            e, w = cola_bits_per_token(model, x, a.iwae_k, a.ll_steps, g)
            elbo, iwae = elbo + e / a.batches, iwae + w / a.batches
        res["bits_per_token"] = iwae
        res["bits_per_token_elbo"] = elbo
    elif kind == "ar":
        res["bits_per_token"] = sum(ar_bits_per_token(model, x, eos) for x in batches) / a.batches
    else:
        res["bits_per_token"] = sum(llada_bits_per_token(model, x, generator=g) for x in batches) / a.batches
    print(f"[eval] losses and likelihood: {time.time() - t0:.1f} s", flush=True)

    # generation: tasks, samples, speed
    gen = make_generator(kind, model, a.steps, a.cfg, eos, a.seed)
    val_text = enc.decode(data.splits["val"][:200_000].astype(np.int64).tolist())
    if a.builtin_n:
        tasks.update(builtin_tasks(val_text, a.builtin_n, a.seed))
    res["tasks"] = {name: run_tasks(gen, enc, ts, a.task_max_new, 8) for name, ts in tasks.items()}
    if res["tasks"]:
        res["task_accuracy"] = sum(res["tasks"].values()) / len(res["tasks"])
    prompts = [x[:16].tolist() for x in batches[0][:a.n_samples]]
    t1 = time.time()
    samples, passes = gen(prompts, a.sample_len)
    dt = time.time() - t1
    n_tok = sum(len(s) for s in samples)
    res["gen_tokens_per_s"] = n_tok / dt
    res["passes_per_token"] = passes / max(n_tok, 1)
    res.update(sample_stats(samples))
    res["samples"] = [enc.decode(p) + " ||| " + enc.decode(s) for p, s in zip(prompts[:3], samples[:3])]
    if a.judge:
        judge, jck = load_model(a.judge, device)
        if jck["kind"] != "ar":
            raise DataError(f"--judge {a.judge} holds a '{jck['kind']}' model; the judge must be an AR checkpoint")
        res["judge_ppl"] = judge_perplexity(judge, prompts, samples)
    # sweeps (Cola): steps and guidance
    for key, values in (("steps", a.sweep_steps), ("cfg", a.sweep_cfg)):
        if values and kind == "cola":
            sweep = []
            for v in [float(s) for s in values.split(",")]:
                st = int(v) if key == "steps" else a.steps
                cf = v if key == "cfg" else a.cfg
                gen_v = make_generator(kind, model, st, cf, eos, a.seed)
                t1 = time.time()
                smp, _ = gen_v(prompts, a.sample_len)
                row = {key: v, "tokens_per_s": sum(map(len, smp)) / (time.time() - t1), **sample_stats(smp)}
                if a.builtin_n:
                    row["task_accuracy"] = sum(run_tasks(gen_v, enc, ts, a.task_max_new, 8)
                                               for ts in tasks.values()) / len(tasks)
                if a.judge:
                    row["judge_ppl"] = judge_perplexity(judge, prompts, smp)
                sweep.append(row)
            res[f"sweep_{key}"] = sweep
            metrics = [m for m in ("judge_ppl", "task_accuracy", "distinct_2") if m in sweep[0]]
            plot_sweep(sweep, key, metrics, os.path.join(run_dir, f"sweep_{key}.png"))
    plot_training_curves(run_dir, os.path.join(run_dir, "training_curves.png"))
    out_path = a.results or os.path.join(run_dir, "eval.json")
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, out_path)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
               if isinstance(v, (int, float)) or k == "tasks"}
    print(json.dumps(summary))
    print(f"wrote {out_path}")
    return res


@torch.no_grad()
def judge_perplexity(judge, prompts, samples):
    """Perplexity of each sample's tokens under the judge given its prompt, pooled over samples."""
    nll, n = 0.0, 0
    for p, s in zip(prompts, samples):
        if not s:
            continue
        ids = torch.tensor([p + s], device=judge.head.weight.device)
        logits = judge.logits(ids[:, :-1]).float()
        ce = F.cross_entropy(logits[0, len(p) - 1:], ids[0, len(p):], reduction="sum")
        nll, n = nll + float(ce), n + len(s)
    return math.exp(nll / max(n, 1))


if __name__ == "__main__":
    main()
