"""
Evaluate one checkpoint (Cola DLM, AR or LLaDA) and write <run>/eval.json plus PNG plots.

    python eval.py                                    # out/ckpt.pt on the held-out split it was trained on
    python eval.py --out_dir out_ar --tasks tasks/comedies.jsonl
    python eval.py --judge out_judge/ckpt.pt --sweep_steps 8,16,32 --sweep_guidance 1,3,7
    python eval.py --score eval_output/mmlu.jsonl ...  # score existing generations; no model needed
    python eval.py --init_from hf/Cola-DLM --tasks eval_output/tasks_default/lambada.jsonl   # the released model (-> out_release)

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
token 2- and 3-grams that occur in the training split, distinct-n), judge perplexity, speed. The measures
live in measures.py and diagnostics.py; this script checks its inputs, runs them in order and writes the
results. A released snapshot without --data_dir gets the task files and samples only.
"""
import argparse
import json
from dataclasses import replace
import os
import sys
import time

import torch

from checkpoint import CheckpointError, load_model, stored_sampler
from cli import Parser, check_writable_dir, check_writable_file, fail, float_list, int_at_least, int_list, nonneg_float, nonneg_int, \
    pick_device, positive_float, positive_int, pyplot, readable_file, write_json
from decoder import GenerationError
from diagnostics import (eval_history_drift, eval_latent_fit, eval_prefix_prediction, eval_sdedit,
                         plot_diagnostics)
from measures import (builtin_tasks, eval_history_gap, eval_likelihood, eval_vae, make_generator, run_tasks,
                      sample_quality)
from prepare import REPO_DIR, DataError, TokenData, batch_seed
from tokenizer import get_tokenizer, same_tokenizer
from release import encode_prompt
from scoring import TaskError, TrainNgrams, ngram_metrics, read_tasks, score_file


def read_log(path):
    """The rows of a training log that parse (a run killed mid-write leaves a torn last line)."""
    rows = []
    for line in open(path, encoding="utf-8", errors="replace"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]


def training_logs(run_dir):
    """{log name: rows} of the run's training logs, read before any measure runs."""
    names = sorted(f for f in os.listdir(run_dir) if f.startswith("log_") and f.endswith(".jsonl"))
    logs = {name: read_log(os.path.join(run_dir, name)) for name in names if os.path.isfile(os.path.join(run_dir, name))}
    return {name: rows for name, rows in logs.items() if rows}


def plot_training_curves(logs, path):
    if not logs:
        return None
    plt = pyplot()
    keys = ["loss", "recon_acc", "fm", "fm_cond", "fm_uncond", "logsnr", "acc"]
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], logs.items()):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_title(name[4:-6])
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(sweep, key, metrics, path):
    plt = pyplot()
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
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="run directory holding ckpt.pt (default: out; with --init_from, "
                   "where the results go, default: out_release)")
    p.add_argument("--ckpt", default=None, help="checkpoint path (overrides --out_dir)")
    p.add_argument("--init_from", default=None, metavar="DIR", help="the authors' released snapshot instead of a checkpoint")
    p.add_argument("--score", nargs="+", type=readable_file, default=None, metavar="FILE",
                   help="score the 'generate' fields of task files by the paper's rules and exit (no model)")
    p.add_argument("--data_dir", default=None, help="prepared data (default: the one the run trained on)")
    p.add_argument("--results", default=None, help="JSON output path (default: <run dir>/eval.json)")
    # held-out measures
    p.add_argument("--batches", type=positive_int, default=4, help="held-out batches for losses and likelihood")
    p.add_argument("--batch_size", type=positive_int, default=8, help="sequences per held-out batch")
    p.add_argument("--fm_batches", type=positive_int, default=32, help="held-out batches for the FM history comparison (Cola)")
    # Cola's likelihood bound
    p.add_argument("--ll_steps", type=positive_int, default=16, help="midpoint steps of the CNF likelihood solve")
    p.add_argument("--iwae_k", type=positive_int, default=2, help="posterior samples per sequence for Cola's bounds")
    # generation diagnostics
    p.add_argument("--diag_windows", type=nonneg_int, default=64, help="held-out windows for the generation diagnostics (Cola; 0: skip)")
    p.add_argument("--prefix_windows", type=positive_int, default=512,
                   help="held-out windows for the prior's next-token accuracy (Cola, eval_prefix_prediction)")
    # tasks and samples
    p.add_argument("--tasks", nargs="*", type=readable_file, default=[], help="JSONL task files to generate answers for and score")
    p.add_argument("--builtin_n", type=nonneg_int, default=32, help="examples per built-in task (0: skip them)")
    p.add_argument("--task_max_new", type=positive_int, default=32, help="new tokens per task answer (paper: <= 32)")
    p.add_argument("--task_batch", type=positive_int, default=32, help="task items generated together (release: 20)")
    p.add_argument("--item_noise_seed", type=nonneg_int, default=None,
                   help="Cola: each task item's noise from seed N + id * 1000 (the release's benchmark script: 66)")
    p.add_argument("--n_samples", type=positive_int, default=8, help="samples per round for the sample metrics and speed")
    p.add_argument("--sample_len", type=positive_int, default=96, help="new tokens per sample")
    p.add_argument("--sample_prompt", default="\n", help="prompt of every sample ('held-out': the first 16 tokens of held-out windows)")
    p.add_argument("--sample_temperature", type=nonneg_float, default=0.0,
                   help="AR and LLaDA: token temperature of the samples (0: greedy, as the tasks; Cola's come from its noise)")
    p.add_argument("--judge", default=None, type=readable_file, help="AR checkpoint that scores sample perplexity (name it in every comparison)")
    # the sampler (default: the one the checkpoint stores, decoder.SamplerConfig)
    p.add_argument("--steps", type=positive_int, default=None, help="Euler steps per block (Cola) / LLaDA steps (paper 16)")
    p.add_argument("--guidance", type=positive_float, default=None, help="guidance scale (Cola; paper 7)")
    p.add_argument("--noise_scale", type=positive_float, default=None, help="Cola: std of each block's starting noise (paper 1)")
    # sampler sweeps (Cola)
    p.add_argument("--sweep_steps", type=int_list, default=None, help="comma list of step counts to sweep (Cola)")
    p.add_argument("--sweep_guidance", type=float_list, default=None, help="comma list of guidance scales to sweep (Cola)")
    p.add_argument("--sweep_noise", type=float_list, default=None, help="comma list of starting-noise scales to sweep (Cola)")
    p.add_argument("--sample_repeats", type=positive_int, default=3, help="rounds of --n_samples samples (different noise)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int_at_least(0, 2**32 - 1), default=0, help="random seed")
    p.add_argument("--dry_run", action="store_true", help="check the flags and exit (scaling.py checks its --eval_args)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        return None
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


def setup(args):
    """Everything evaluate() needs, checked before any measure runs: the model, its tokenizer, the judge,
    the data, the task files (each prompt fits the model's context) and a writable results path."""
    device = pick_device(args.device)
    out_dir = args.out_dir or os.path.join(REPO_DIR, "out_release" if args.init_from else "out")
    path = args.init_from or args.ckpt or os.path.join(out_dir, "ckpt.pt")
    run_dir = out_dir if args.init_from else os.path.dirname(os.path.abspath(path))
    out_path = check_results(args.results or os.path.join(run_dir, "eval.json"))
    tasks, files = read_task_files(args.tasks, check_run_dir(run_dir))
    model, info = load_model(path, device)
    enc = get_tokenizer(info["tokenizer"])
    judge = None
    if args.judge:
        judge, jinfo = load_model(args.judge, device)
        if jinfo["kind"] != "ar":
            raise DataError(f"--judge {args.judge} holds a '{jinfo['kind']}' model; the judge must be an AR checkpoint")
        if not same_tokenizer(jinfo["tokenizer"], info["tokenizer"]):
            raise DataError(f"--judge {args.judge} uses tokenizer {jinfo['tokenizer']}, the model {info['tokenizer']}")
    data_dir = args.data_dir or info["args"].get("data_dir")
    data = TokenData(data_dir, info["args"].get("seq_len", 64)) if data_dir else None
    if data is not None and not same_tokenizer(data.meta["tokenizer"], info["tokenizer"]):
        raise DataError(f"{data_dir} was prepared with tokenizer {data.meta['tokenizer']}, the model uses {info['tokenizer']}")
    context = model.vae.cfg.max_seq_len if info["kind"] == "cola" else model.cfg.max_seq_len
    for name, items in tasks.items():
        for t in items:
            n = len(encode_prompt(info, enc, t["prompt"]))
            if n + args.task_max_new > context:
                raise TaskError(f"task {name} item {t['id']}: prompt of {n} tokens + --task_max_new {args.task_max_new} "
                                f"exceed the model's context of {context} tokens")
    clash = [files[name] for name in ("lambada_style", "ending_choice") if name in files]
    if clash and args.builtin_n and data is not None:
        raise TaskError(f"task file {clash[0]} has the name of a built-in task; rename it or pass --builtin_n 0")
    check_outputs(run_dir, [*tasks, "lambada_style", "ending_choice"])
    sampler = stored_sampler(info, enc.eot_token, steps=args.steps, guidance=args.guidance, noise_scale=args.noise_scale,
                             repetition_penalty=1.1)
    args.steps, args.guidance = sampler.steps, sampler.guidance
    return dict(sampler=sampler, device=device, path=path, run_dir=run_dir, out_path=out_path, tasks=tasks, model=model, info=info,
                enc=enc, judge=judge, data=data, logs=training_logs(run_dir))


def check_results(path):
    """--results names a new file or a previous eval result (recognised by its content), nothing else."""
    check_writable_file(path, "--results")
    if not os.path.exists(path):
        return path
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            old = json.loads(head + f.read()) if head == b"{" else None
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and {"kind", "ckpt", "step", "params"} <= old.keys()):
        fail(f"--results {path} exists and is not an eval result; name a new file")
    return path


def check_run_dir(run_dir):
    """The run folder and its generations folder take the plots and generations -> the generations folder."""
    gen_dir = os.path.join(check_writable_dir(run_dir, "run folder"), "generations")
    return check_writable_dir(gen_dir, "generations folder") if os.path.exists(gen_dir) else gen_dir


def check_outputs(run_dir, task_names):
    """No file eval.py writes into the run folder (plots, generations) is a folder there."""
    files = ["training_curves.png", "diagnostics.png"] + [f"sweep_{k}.png" for k in ("steps", "guidance", "noise_scale")]
    for f in files + [os.path.join("generations", f"{name}.jsonl") for name in task_names]:
        if os.path.isdir(os.path.join(run_dir, f)):
            fail(f"{os.path.join(run_dir, f)} is a folder, where eval.py writes a file")


def read_task_files(paths, gen_dir):
    """{name: tasks}, {name: file}: one file per name, and never a file its own generations would replace."""
    tasks, files = {}, {}
    for f in paths:
        name, items = read_tasks(f)
        if name in files:
            raise TaskError(f"task files {files[name]} and {f} share the name {name}; rename one")
        out = os.path.join(gen_dir, f"{name}.jsonl")
        if os.path.exists(out) and os.path.samefile(f, out):
            raise TaskError(f"task file {f} is where its generations go; move it out of {gen_dir}")
        tasks[name], files[name] = items, f
    return tasks, files


@torch.no_grad()  # every measure is inference; the CNF divergence turns gradients on locally
def evaluate(args):
    env = setup(args)
    model, info, enc, data, device = env["model"], env["info"], env["enc"], env["data"], env["device"]
    kind, targs, run_dir = info["kind"], info["args"], env["run_dir"]
    stop_ids = env["sampler"].stop_ids
    torch.manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    res = {"kind": kind, "ckpt": env["path"], "step": info["step"], "train_flops": info.get("train_flops", 0.0),
           "params": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ref_enc")),
           "judge": args.judge, "guidance": args.guidance, "steps": args.steps}
    train_ngrams, batches = None, []
    if data is not None:
        train_ngrams = TrainNgrams.of(data)
        batches = [data.batch("val", args.batch_size, batch_seed(args.seed + 99, i, 0), device)
                   for i in range(args.batches)]
        res.update(seq_len=data.seq_len, heldout_tokens=args.batches * args.batch_size * data.seq_len)
        t0 = time.time()
        if kind == "cola":
            res.update(eval_vae(model, batches, targs.get("beta", 1e-3), targs.get("mask_prob", 0.15), g))
            res.update(eval_history_gap(model, data, args.fm_batches, args.batch_size, args.seed, g, targs))
        res.update(eval_likelihood(model, kind, batches, stop_ids[0], g, args.iwae_k, args.ll_steps))
        print(f"[eval] losses and likelihood: {time.time() - t0:.1f} s", flush=True)
    if kind == "cola" and args.diag_windows and data is not None:
        t0 = time.time()
        x = data.batch("val", args.diag_windows, batch_seed(args.seed + 97, 0, 0), device)
        j = min(2, x.shape[1] // (model.block_size * model.vae.cfg.patch_size) - 1)  # the block to generate: one with history
        res["sdedit"] = eval_sdedit(model, x, j, args.steps, args.guidance, g)
        res["latent_fit"] = eval_latent_fit(model, x, j, args.steps, args.guidance, g)
        xp = data.batch("val", args.prefix_windows, batch_seed(args.seed + 95, 0, 0), device)
        res["prefix_prediction"] = eval_prefix_prediction(model, xp, j, args.steps, args.guidance, g)
        res["prefix_windows"] = args.prefix_windows
        res["history_drift"] = eval_history_drift(model, [x[i, :16].tolist() for i in range(args.n_samples)],
                                                  args.sample_len, env["sampler"], g, train_ngrams)
        plot_diagnostics(res, os.path.join(run_dir, "diagnostics.png"))
        print(f"[eval] generation diagnostics: {time.time() - t0:.1f} s", flush=True)
    res.update(generation(args, env, batches, train_ngrams))
    plot_training_curves(env["logs"], os.path.join(run_dir, "training_curves.png"))
    write_json(env["out_path"], res)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
               if isinstance(v, (int, float)) or k == "tasks"}
    print(json.dumps(summary))
    for s in res["samples"][:3]:
        print("sample:", repr(s))
    print(f"wrote {env['out_path']}")
    return res


def generation(args, env, batches, train_ngrams):
    """Tasks, samples and speed, and the sampler sweeps (Cola)."""
    model, info, enc, data, kind = env["model"], env["info"], env["enc"], env["data"], env["info"]["kind"]
    make = lambda seed, temperature=0.0, **over: make_generator(
        kind, model, replace(env["sampler"], **over), seed, temperature, info.get("release", False))
    gen, res, tasks = make(args.seed), {}, dict(env["tasks"])
    if args.builtin_n and data is not None:
        tasks.update(builtin_tasks(enc.decode(data.tokens("val", limit=200_000).tolist()), args.builtin_n, args.seed))
    os.makedirs(os.path.join(env["run_dir"], "generations"), exist_ok=True)
    prompt_ids = lambda text: encode_prompt(info, enc, text)
    res["tasks"] = {name: run_tasks(gen, enc, prompt_ids, name, ts, args.task_max_new, args.task_batch,
                                    os.path.join(env["run_dir"], "generations", f"{name}.jsonl"),
                                    args.item_noise_seed if kind == "cola" else None)
                    for name, ts in tasks.items()}
    if res["tasks"]:
        res["task_accuracy"] = sum(res["tasks"].values()) / len(res["tasks"])
    if args.sample_prompt == "held-out" and batches:
        prompts = [x[:16].tolist() for x in batches[0][:args.n_samples]]
    else:
        prompts = [prompt_ids(args.sample_prompt)] * args.n_samples
    temperature = args.sample_temperature if kind != "cola" else 0.0
    res["sample_temperature"] = temperature
    t1 = time.time()
    samples, passes = make(args.seed, temperature)(prompts, args.sample_len)
    n_tok = sum(len(s) for s in samples)
    res["gen_tokens_per_s"] = n_tok / (time.time() - t1)
    res["passes_per_token"] = passes / max(n_tok, 1)
    if train_ngrams is not None:  # held-out text's own rates, windows of the samples' length, beside them
        windows = TokenData(data.data_dir, args.sample_len)
        held = windows.batch("val", args.n_samples * args.sample_repeats, batch_seed(args.seed + 94, 0, 0), "cpu").tolist()
        res.update({f"heldout_{k}": v for k, v in ngram_metrics(held, train_ngrams).items()})
        quality = lambda first=None, **over: sample_quality(
            lambda seed: make(seed, temperature, **over), prompts, args.sample_len, args.seed, args.sample_repeats,
            train_ngrams, env["judge"], first)
        res.update(quality(first=samples))
        for key, values in (("steps", args.sweep_steps), ("guidance", args.sweep_guidance),
                            ("noise_scale", args.sweep_noise)):
            if values and kind == "cola":
                sweep = [{key: v, **quality(**{key: v})} for v in values]
                res[f"sweep_{key}"] = sweep
                metrics = [m for m in ("judge_ppl", "seen_2gram_rate", "seen_3gram_rate", "distinct_2") if m in sweep[0]]
                plot_sweep(sweep, key, metrics, os.path.join(env["run_dir"], f"sweep_{key}.png"))
    res["samples"] = [enc.decode(p) + " ||| " + enc.decode(s) for p, s in zip(prompts, samples)]
    return res


if __name__ == "__main__":
    main()
