"""
The comparison studies, each scored by eval.py against one fixed judge:
- compute levels, the small-scale version of the paper's (docs/method.md §8-9, its RQ4): Cola DLM, AR and
  LLaDA at one size preset, trained on the same data with the same recipe to matched training FLOPs at
  several levels; a markdown table and one figure, scaling.png (four measures vs training FLOPs); the baselines' sample
  metrics use samples drawn at temperature 1 (greedy AR and LLaDA loop), the tasks stay greedy;
- recipe ablations (--ablations FILE): one line per run, `name flags...` for train.py; `base` is the
  default run, and a run without `--stage all` trains stage 2 from base's stage 1 (or from the stage 1 of
  the run a `from=RUN` word names, e.g. another seed's); a markdown table of the
  generation diagnostics and the sample metrics at the paper's sampler and at starting noise 0.5.

    python scaling.py --tasks tasks/comedies.jsonl     # levels 0.25,0.5,1 at the cpu preset, one run at a time
    OMP_NUM_THREADS=1 python scaling.py --jobs 2       # two runs side by side on a 2-core machine
    python scaling.py --device cuda --jobs 12 --train_args=--no-compile   # one GPU, all runs at once
    OMP_NUM_THREADS=1 python scaling.py --ablations ablations.txt --jobs 2 # the README's ablation table

Level 1 is the default Cola run (--vae_iters + --main_iters steps of train.py); level x scales both
stages' steps by x. Each baseline gets the number of steps that matches its Cola run's training FLOPs
(train.py --dry_run reports FLOPs per step by flops.py's convention, on the meta device, before anything
trains). The judge of every run's sample perplexity is --judge (default: an AR model trained once per
corpus by `python train.py --model ar --out_dir out_judge --main_iters 3000`, trained here first if it is
missing). Finished runs are kept: running
the command again skips them (delete --out_root to start over); so does a run directory filled by hand,
e.g. the main command's out/ copied to out_scaling/cola_1 (the same run as level 1).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from cli import Parser, check_writable_dir, dry_run, fail, float_list, positive_int, pyplot, train_dry_run
from prepare import REPO_DIR, DataError, load_meta

MODELS = ("cola", "ar", "llada")
COLUMNS = [  # (header, eval.json key, format)
    ("params", "params", "{:.2f}M"), ("train FLOPs", "train_flops", "{:.2e}"),
    ("bits/token", "bits_per_token", "{:.2f}"), ("next-token acc.", "next_token_acc", "{:.3f}"),
    ("LAMBADA-style", "lambada_style", "{:.1f}"), ("ending choice", "ending_choice", "{:.1f}"),
    ("task files", "user_tasks", "{:.1f}"), ("seen 2-gram", "seen_2gram_rate", "{:.2f}"),
    ("seen 3-gram", "seen_3gram_rate", "{:.2f}"), ("distinct-2", "distinct_2", "{:.2f}"),
    ("judge ppl", "judge_ppl", "{:,.0f}"), ("tok/s", "gen_tokens_per_s", "{:.1f}"),
    ("passes/token", "passes_per_token", "{:.3f}"),
]  # next-token accuracy: Cola's prior with 15 of a block's 16 latents known (eval_prefix_prediction), AR's
# validation accuracy, LLaDA's on masked tokens


def get_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="0.25,0.5,1", help="comma list of compute levels (1 = the default Cola run)")
    p.add_argument("--out_root", default=os.path.join(REPO_DIR, "out_scaling"), help="one run directory per model and level")
    p.add_argument("--judge", default=os.path.join(REPO_DIR, "out_judge", "ckpt.pt"),
                   help="AR checkpoint that judges every run's samples (trained with --judge_iters steps if missing)")
    p.add_argument("--judge_iters", type=positive_int, default=3000, help="steps of the judge, when it has to be trained")
    p.add_argument("--judge_args", default="", help="extra train.py flags of the judge, e.g. --judge_args='--dropout 0.1'")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (passed to train.py and eval.py)")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at a time (1 on a CPU; several fit one GPU)")
    p.add_argument("--train_args", default="", help="extra train.py flags for every run, e.g. --train_args='--no-compile' (note the =)")
    p.add_argument("--eval_args", default="", help="extra eval.py flags for every run, e.g. --eval_args='--builtin_n 64'")
    p.add_argument("--tasks", nargs="*", default=[], help="JSONL task files eval.py scores for every run")
    p.add_argument("--ablations", default=None, help="a file of recipe ablations (name + train.py flags per line)")
    p.add_argument("--table_only", action="store_true",
                   help="train and evaluate nothing: tabulate the runs that have an eval.json, list the others")
    a = p.parse_args(argv)
    try:
        a.levels = sorted(float_list(a.levels))
    except argparse.ArgumentTypeError as e:
        p.error(f"--levels: {e}")
    if a.levels[-1] > 1e6:
        p.error(f"--levels: {a.levels[-1]:g} is more than a million times the default run")
    train_dry_run(["--model", "ar", *a.judge_args.split()])  # a bad train.py or eval.py flag fails now, not after
    dry_run("eval.py", a.eval_args.split())                 # the training
    for f in a.tasks + ([a.ablations] if a.ablations else []):
        if not os.path.isfile(f):
            p.error(f"file {f} not found")
    if not a.table_only:
        check_judge(a.judge)
    if a.ablations and a.out_root == os.path.join(REPO_DIR, "out_scaling"):
        a.out_root = os.path.join(REPO_DIR, "out_ablations")
    return a


def check_judge(judge):
    """The judge is a checkpoint file, or it is trained as ckpt.pt of a folder that holds no other run."""
    if os.path.isfile(judge):
        return
    if os.path.exists(judge) or os.path.basename(judge) != "ckpt.pt":
        fail(f"--judge {judge} is not a checkpoint file (a judge scaling.py trains is named NEW_FOLDER/ckpt.pt)")
    out = os.path.dirname(os.path.abspath(judge))
    others = sorted(set(os.listdir(out)) - {"train.log"}) if os.path.isdir(out) else []
    if others:
        fail(f"--judge {judge} does not exist, and its folder holds {', '.join(others[:3])}: "
             "train the judge into a new folder")
    if os.path.isdir(out):
        check_writable_dir(out, "--judge's folder")


def plan(a):
    """[(model, level, run_dir, train.py argv, planned FLOPs)] with the baselines' steps matched to Cola's."""
    extra = a.train_args.split()
    cola = train_dry_run(extra)
    defaults = {k: cola[k] for k in ("vae_iters", "main_iters")}  # the level scales the steps train.py would take
    lm = {m: train_dry_run(["--model", m, *extra]) for m in ("ar", "llada")}
    runs = []
    for level in a.levels:
        vae_iters, main_iters = max(1, round(defaults["vae_iters"] * level)), max(1, round(defaults["main_iters"] * level))
        flops = cola["vae_flops_per_step"] * vae_iters + cola["joint_flops_per_step"] * main_iters
        tag = f"{level:g}"
        runs.append(("cola", level, os.path.join(a.out_root, f"cola_{tag}"),
                     ["--vae_iters", str(vae_iters), "--main_iters", str(main_iters)], flops))
        for m in ("ar", "llada"):
            steps = max(1, round(flops / lm[m]["flops_per_step"]))
            runs.append((m, level, os.path.join(a.out_root, f"{m}_{tag}"),
                         ["--model", m, "--main_iters", str(steps), "--eval_interval", str(max(1, steps // 4))], flops))
    return runs


ABLATION_EVAL = ["--builtin_n", "0", "--batches", "1", "--fm_batches", "8", "--ll_steps", "2", "--iwae_k", "1",
                 "--steps", "16", "--guidance", "7", "--noise_scale", "1", "--sweep_noise", "1,0.5",
                 "--sample_repeats", "3"]  # the paper's sampler, and starting noise 0.5


def plan_ablations(a):
    """[(name, 'ablation', run_dir, train.py argv, None)] from the ablations file; base first. Every other
    run's argv is base's flags, then its own (argparse: the last one wins), so that a line is one change
    against base whatever train.py's defaults are."""
    runs, a.stage1_from = [], {}
    for words in ablation_lines(a.ablations):
        if words:  # from=RUN: stage 2 starts from that run's stage 1 instead of base's (e.g. another seed's)
            a.stage1_from.update({words[0]: w[5:] for w in words[1:] if w.startswith("from=")})
            flags = [w for w in words[1:] if not w.startswith("from=")]
            runs.append((words[0], "ablation", os.path.join(a.out_root, words[0]), flags, None))
    if not runs or runs[0][0] != "base":
        raise RuntimeError(f"{a.ablations}: the first run must be named base (the shared stage 1)")
    names = [r[0] for r in runs]
    if len(set(names)) < len(names):
        raise RuntimeError(f"{a.ablations}: two runs share the name {next(n for n in names if names.count(n) > 1)}")
    base = runs[0][3]
    if "--stage" in base:
        raise RuntimeError(f"{a.ablations}: base trains both stages; its line must not set --stage")
    return runs[:1] + [(m, lv, d, base + flags, f) for m, lv, d, flags, f in runs[1:]]


def check_stage1(a, runs):
    """Each stage 1 a from= names is a run of the file or a finished stage 1 under --out_root."""
    for src in set(a.stage1_from.values()) - {r[0] for r in runs}:
        if not os.path.isfile(os.path.join(a.out_root, src, "vae.pt")):
            raise RuntimeError(f"{a.ablations}: from={src} names no run of the file and no {a.out_root}/{src}/vae.pt")


def ablation_lines(path):
    """The words of each line of an ablations file (comments dropped); a run's name is a plain folder name."""
    try:
        lines = [line.split("#")[0].split() for line in open(path, encoding="utf-8")]
    except (OSError, UnicodeDecodeError) as e:
        raise RuntimeError(f"{path} cannot be read as UTF-8 text ({e.__class__.__name__})") from None
    for words in lines:
        if words and not re.fullmatch(r"[\w-][\w.-]*", words[0]):
            raise RuntimeError(f"{path}: run name {words[0]!r} must be a plain folder name")
    return [w for w in lines if w]


def ablation_table(rows):
    """One line per run: the diagnostics, then the sample metrics (mean over rounds) at noise 1 and 0.5."""
    head = ("| run | flags | train FLOPs | FM with / without history | block accuracy from t0 = 0.5 / 0.75 / 1 "
            "| next token, 15 known | seen 2-gram / 3-gram, distinct-2, judge ppl (noise 1) | the same, noise 0.5 |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    pm = lambda s, k, f: f"{s[k]:{f}} ± {s.get(k + '_se', 0.0):{f}}"
    for r in rows:
        sd, sweep = r.get("sdedit", {}), {s["noise_scale"]: s for s in r.get("sweep_noise_scale", [])}
        cell = lambda s: (f"{pm(s, 'seen_2gram_rate', '.2f')} / {pm(s, 'seen_3gram_rate', '.2f')}, "
                          f"{s['distinct_2']:.2f}, {pm(s, 'judge_ppl', ',.0f')}") if s else "-"
        lines.append(f"| {r['name']} | `{' '.join(r['flags']) or '(defaults)'}` | {r['train_flops']:.2e} | "
                     f"{r['fm_cond']:.3f} / {r['fm_uncond']:.3f} | {sd.get('after_dit_0.5', 0):.3f} / "
                     f"{sd.get('after_dit_0.75', 0):.3f} / {sd.get('after_dit_1.0', 0):.3f} | "
                     f"{r.get('prefix_prediction', {}).get('known_15', 0):.3f} | {cell(sweep.get(1.0))} | "
                     f"{cell(sweep.get(0.5))} |")
    return "\n".join(lines)


def heldout_line(rows):
    """Held-out text's own seen n-gram rates and distinct-2, windows of the samples' length (eval.json)."""
    r = next((r for r in rows if "heldout_seen_2gram_rate" in r), None)
    return "" if r is None else (f"\nheld-out text: seen 2-gram {r['heldout_seen_2gram_rate']:.2f}, seen 3-gram "
                                 f"{r['heldout_seen_3gram_rate']:.2f}, distinct-2 {r['heldout_distinct_2']:.2f}")


def samples_section(rows):
    """The first sample of every run, as eval.json holds it (prompt ||| continuation)."""
    name = {"cola": "Cola DLM", "ar": "AR", "llada": "LLaDA"}
    return "\n\n" + "\n\n".join(f"{name[r['kind']]}, level {r['level']:g}:\n```\n{r['samples'][0]}\n```"
                                  for r in rows if r.get("samples"))


def judges_line(rows):
    """The judge checkpoint(s) the rows' eval.json name: every comparison names its judge."""
    return "\n\njudge: " + ", ".join(sorted({str(r.get("judge")) for r in rows}))


def load_result(run_dir):
    """A run's eval.json, or one line saying that it is not an eval result."""
    path = os.path.join(run_dir, "eval.json")
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        assert isinstance(res, dict)
    except (OSError, ValueError, AssertionError) as e:
        fail(f"{path} is not an eval result ({type(e).__name__}); delete it to evaluate the run again")
    return res


def run(cmd, log_path):
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR)
    if rc:
        tail = open(log_path).read().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {rc}); see {log_path}: {tail[0]}")


def train_one(a, r):
    model, level, run_dir, flags, _ = r
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        return
    os.makedirs(run_dir, exist_ok=True)
    if level == "ablation":
        full = "--stage all" in " ".join(flags)
        if model == "base" or full:
            flags = flags if full else ["--stage", "all", *flags]
        else:  # stage 2 from the base run's stage 1
            stage1 = getattr(a, "stage1_from", {}).get(model, "base")
            shutil.copy(os.path.join(a.out_root, stage1, "vae.pt"), os.path.join(run_dir, "vae.pt"))
            flags = ["--stage", "joint", *flags]
    t0 = time.time()
    # the level's flags come last: they win over the same flags in --train_args; a run left unfinished
    # (no ckpt.pt) starts again from scratch
    run([sys.executable, "train.py", *a.train_args.split(), "--out_dir", run_dir, "--device", a.device, "--overwrite",
         *flags],
        os.path.join(run_dir, "train.log"))
    print(f"[scaling] trained {model} ({level}) in {time.time() - t0:.0f} s", flush=True)


def eval_one(a, r, judge):
    model, level, run_dir, _, _ = r
    if os.path.exists(os.path.join(run_dir, "eval.json")):
        return
    cmd = [sys.executable, "eval.py", "--out_dir", run_dir, "--device", a.device, "--judge", judge,
           *(ABLATION_EVAL if level == "ablation" else []),
           *(["--sample_temperature", "1"] if model in ("ar", "llada") else []),  # samples drawn, not greedy
           *a.eval_args.split()]
    if a.tasks:
        cmd += ["--tasks", *a.tasks]
    t0 = time.time()
    run(cmd, os.path.join(run_dir, "eval.log"))
    print(f"[scaling] evaluated {model} ({level}) in {time.time() - t0:.0f} s", flush=True)


PANELS = [("next_token_acc", "next-token accuracy", False), ("judge_ppl", "judge perplexity", True),
          ("seen_3gram_rate", "seen 3-gram rate", False), ("distinct_2", "distinct-2", False)]


def plot_scaling(rows, path):
    """The ladder's measures vs training FLOPs, one panel per measure, one series per model kind."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (metric, label, log_y) in zip(axes, PANELS):
        for kind in sorted({r["kind"] for r in rows}):
            pts = sorted((r["train_flops"], r[metric]) for r in rows if r["kind"] == kind and r.get(metric) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log" if log_y else "linear")
        ax.set_xlabel("training FLOPs")
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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


def train_and_evaluate(a, runs):
    train_one(a, runs[0])  # the ablations' base run first: the others start from its stage 1
    with ThreadPoolExecutor(a.jobs) as ex:
        list(ex.map(lambda r: train_one(a, r), runs[1:]))
    judge = a.judge
    if not os.path.exists(judge):
        print(f"[scaling] training the judge {judge} ({a.judge_iters} AR steps)", flush=True)
        out = os.path.dirname(os.path.abspath(judge))
        os.makedirs(out, exist_ok=True)
        run([sys.executable, "train.py", *a.train_args.split(), "--model", "ar", "--out_dir", out,
             "--main_iters", str(a.judge_iters), "--eval_interval", str(a.judge_iters), "--device", a.device,
             *a.judge_args.split()],
            os.path.join(out, "train.log"))
    with ThreadPoolExecutor(a.jobs) as ex:
        list(ex.map(lambda r: eval_one(a, r, judge), runs))


def main(argv=None):
    a = get_args(argv)
    try:
        runs = plan_ablations(a) if a.ablations else plan(a)
        if a.ablations and not a.table_only:
            check_stage1(a, runs)
    except (RuntimeError, DataError) as e:
        sys.exit(f"error: {e}")
    if a.table_only:
        done = [r for r in runs if os.path.exists(os.path.join(r[2], "eval.json"))]
        missing = [r[0] if a.ablations else f"{r[0]}_{r[1]:g}" for r in runs if r not in done]
        runs = done
        if missing:
            print(f"[scaling] not yet trained and evaluated: {', '.join(missing)}", flush=True)
        if not runs:
            sys.exit("error: no run has an eval.json yet")
    check_writable_dir(a.out_root, "--out_root")
    results = {r[2]: load_result(r[2]) for r in runs if os.path.exists(os.path.join(r[2], "eval.json"))}  # checked first
    for m, level, run_dir, flags, flops in runs:
        print(f"[scaling] {m} ({level}): {' '.join(flags)}" + (f" (planned {flops:.3e} training FLOPs)" if flops else ""),
              flush=True)
    if not a.table_only:
        try:
            train_and_evaluate(a, runs)
        except RuntimeError as e:
            sys.exit(f"error: {e}")
    if a.ablations:
        n_base = len(runs[0][3]) if runs[0][0] == "base" else 0
        rows = [{**load_result(r[2]), "name": r[0],
                 "flags": r[3] if r[0] == "base" else r[3][n_base:]} for r in runs]  # each line's own change
        md = ablation_table(rows) + judges_line(rows)
        with open(os.path.join(a.out_root, "table.md"), "w") as f:
            f.write(md + "\n")
        print(md)
        return
    rows = []
    for m, level, run_dir, _, _ in runs:
        res = results.get(run_dir) or load_result(run_dir)
        user = [v for k, v in res.get("tasks", {}).items() if k not in ("lambada_style", "ending_choice")]
        acc = res.get("prefix_prediction", {}).get("known_15") if m == "cola" else res.get("val_acc")
        rows.append({**res, "level": level, **res.get("tasks", {}), "next_token_acc": acc,
                     "user_tasks": sum(user) / len(user) if user else None})
    md = table(rows) + judges_line(rows) + heldout_line(rows) + samples_section(rows)
    with open(os.path.join(a.out_root, "table.md"), "w") as f:
        f.write(md + "\n")
    json.dump(rows, open(os.path.join(a.out_root, "results.json"), "w"), indent=1, default=str)
    print("wrote", plot_scaling(rows, os.path.join(a.out_root, "scaling.png")))
    print(md)


if __name__ == "__main__":
    main()
