"""
The small-scale version of the paper's comparison (SPEC §8-9, RQ4): Cola DLM, AR and LLaDA at one size
preset, trained on the same data with the same recipe to matched training FLOPs at several compute
levels, each scored by eval.py. Writes a markdown table and scaling plots (metric vs training FLOPs).

    python scaling.py --tasks tasks/comedies.jsonl     # levels 0.25,0.5,1 at the cpu preset, one run at a time
    OMP_NUM_THREADS=1 python scaling.py --jobs 2       # two runs side by side on a 2-core machine
    python scaling.py --device cuda --jobs 12 --train_args=--no-compile   # one GPU, all runs at once

Level 1 is the default Cola run (--vae_iters + --main_iters steps of train.py); level x scales both
stages' steps by x. Each baseline gets the number of steps that matches its Cola run's training FLOPs
(train.train_flops_per_token's convention, computed on the meta device before anything trains). The
largest level's AR model is the judge of every run's sample perplexity. Finished runs are kept: running
the command again skips them (delete --out_root to start over); so does a run directory filled by hand,
e.g. the main command's out/ copied to out_scaling/cola_1 (the same run as level 1).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import train
from baselines import TransformerLM
from diffusion import ColaDLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("cola", "ar", "llada")
COLUMNS = [  # (header, eval.json key, format)
    ("params", "params", "{:.2f}M"), ("train FLOPs", "train_flops", "{:.2e}"),
    ("bits/token", "bits_per_token", "{:.2f}"), ("LAMBADA-style", "lambada_style", "{:.3f}"),
    ("ending choice", "ending_choice", "{:.3f}"), ("task files", "user_tasks", "{:.3f}"),
    ("distinct-2", "distinct_2", "{:.3f}"),
    ("4-gram rep.", "repetition_4", "{:.3f}"), ("unigram entropy", "unigram_entropy_bits", "{:.2f}"),
    ("judge ppl", "judge_ppl", "{:.1f}"), ("tok/s", "gen_tokens_per_s", "{:.1f}"),
    ("passes/token", "passes_per_token", "{:.3f}"),
]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="0.25,0.5,1", help="comma list of compute levels (1 = the default Cola run)")
    p.add_argument("--out_root", default=os.path.join(HERE, "out_scaling"), help="one run directory per model and level")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (passed to train.py and eval.py)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (1 on a CPU; several fit one GPU)")
    p.add_argument("--train_args", default="", help="extra train.py flags for every run, e.g. --train_args='--no-compile' (note the =)")
    p.add_argument("--eval_args", default="", help="extra eval.py flags for every run, e.g. --eval_args='--builtin_n 64'")
    p.add_argument("--tasks", nargs="*", default=[], help="JSONL task files eval.py scores for every run")
    a = p.parse_args(argv)
    try:
        a.levels = sorted(float(x) for x in a.levels.split(","))
    except ValueError:
        p.error(f"--levels must be a comma list of numbers, got {a.levels!r}")
    if not a.levels or min(a.levels) <= 0:
        p.error("--levels must be positive")
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    for f in a.tasks:
        if not os.path.exists(f):
            p.error(f"task file {f} not found")
    return a


def plan(a):
    """[(model, level, run_dir, train.py argv)] with the baselines' steps matched to Cola's FLOPs."""
    base = train.get_args(a.train_args.split())
    meta = json.load(open(os.path.join(base.data_dir, "meta.json")))
    vocab = meta["vocab_size"]
    vcfg = train.vae_config_from_args(base, vocab)
    lm_cfgs = {m: train.lm_config_from_args(train.get_args(["--model", m, *a.train_args.split()]), vocab)[0]
               for m in ("ar", "llada")}
    with torch.device("meta"):
        cola = ColaDLM(vcfg, train.dit_config_from_args(base, vcfg))
        lm = {m: TransformerLM(cfg) for m, cfg in lm_cfgs.items()}
    tokens = base.batch_size * base.seq_len * base.grad_accum
    f_vae = train.train_flops_per_token("cola", cola.vae, base.seq_len, "vae") * tokens
    f_joint = train.train_flops_per_token("cola", cola, base.seq_len, "joint", 1 / base.fm_batch_mult) * tokens * base.fm_batch_mult
    runs = []
    for level in a.levels:
        vae_iters, main_iters = max(1, round(base.vae_iters * level)), max(1, round(base.main_iters * level))
        flops = f_vae * vae_iters + f_joint * main_iters
        tag = f"{level:g}"
        runs.append(("cola", level, os.path.join(a.out_root, f"cola_{tag}"),
                     ["--vae_iters", str(vae_iters), "--main_iters", str(main_iters)], flops))
        for m in ("ar", "llada"):
            steps = max(1, round(flops / (train.train_flops_per_token(m, lm[m], base.seq_len) * tokens)))
            runs.append((m, level, os.path.join(a.out_root, f"{m}_{tag}"),
                         ["--model", m, "--main_iters", str(steps), "--eval_interval", str(max(1, steps // 4))], flops))
    return runs


def run(cmd, log_path):
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
    if rc:
        tail = open(log_path).read().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {rc}); see {log_path}: {tail[0]}")


def train_one(a, r):
    model, level, run_dir, flags, _ = r
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        return
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    # the level's flags come last: they win over the same flags in --train_args
    run([sys.executable, "train.py", *a.train_args.split(), "--out_dir", run_dir, "--device", a.device, *flags],
        os.path.join(run_dir, "train.log"))
    print(f"[scaling] trained {model} level {level:g} in {time.time() - t0:.0f} s", flush=True)


def eval_one(a, r, judge):
    model, level, run_dir, _, _ = r
    if os.path.exists(os.path.join(run_dir, "eval.json")):
        return
    cmd = [sys.executable, "eval.py", "--out_dir", run_dir, "--device", a.device, "--judge", judge, *a.eval_args.split()]
    if a.tasks:
        cmd += ["--tasks", *a.tasks]
    t0 = time.time()
    run(cmd, os.path.join(run_dir, "eval.log"))
    print(f"[scaling] evaluated {model} level {level:g} in {time.time() - t0:.0f} s", flush=True)


def table(rows):
    head = "| model | level | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        vals = []
        for _, key, fmt in COLUMNS:
            v = r.get(key, r.get("tasks", {}).get(key))
            if key == "params" and v is not None:
                v = v / 1e6
            if isinstance(v, float):
                v += 0.0  # no "-0.00"
            vals.append(fmt.format(v) if v is not None else "-")
        name = {"cola": "Cola DLM", "ar": "AR", "llada": "LLaDA"}[r["kind"]]
        lines.append(f"| {name} | {r['level']:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None):
    a = get_args(argv)
    from eval import plot_scaling
    try:
        runs = plan(a)
    except FileNotFoundError as e:
        sys.exit(f"error: {e.filename} not found (run prepare.py first)")
    os.makedirs(a.out_root, exist_ok=True)
    for m, level, run_dir, flags, flops in runs:
        print(f"[scaling] {m:5s} level {level:g}: {' '.join(flags)} (planned {flops:.3e} training FLOPs)", flush=True)
    try:
        with ThreadPoolExecutor(a.jobs) as ex:
            list(ex.map(lambda r: train_one(a, r), runs))
        judge = os.path.join(a.out_root, f"ar_{max(a.levels):g}", "ckpt.pt")
        with ThreadPoolExecutor(a.jobs) as ex:
            list(ex.map(lambda r: eval_one(a, r, judge), runs))
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    rows = []
    for m, level, run_dir, _, _ in runs:
        res = json.load(open(os.path.join(run_dir, "eval.json")))
        user = [v for k, v in res.get("tasks", {}).items() if k not in ("lambada_style", "ending_choice")]
        rows.append({**res, "level": level, **res.get("tasks", {}),
                     "user_tasks": sum(user) / len(user) if user else None})
    md = table(rows)
    with open(os.path.join(a.out_root, "table.md"), "w") as f:
        f.write(md + "\n")
    json.dump(rows, open(os.path.join(a.out_root, "results.json"), "w"), indent=1, default=str)
    for metric in ("bits_per_token", "task_accuracy", "judge_ppl"):
        print("wrote", plot_scaling(rows, metric, os.path.join(a.out_root, f"scaling_{metric}.png")))
    print(md)


if __name__ == "__main__":
    main()
