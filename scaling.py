"""The comparison studies, each scored by eval.py against one fixed judge (--judge: an AR model trained once per
corpus, `train.py --model ar --out_dir out_judge --main_iters 3000`; trained here first if missing):
- compute levels (docs/method.md §8-9, RQ4, at small scale): Cola DLM, AR and LLaDA at one preset and recipe at
  matched training FLOPs (train.py --dry_run): level x scales the default Cola run's steps by x, each baseline gets
  the steps that match (its samples at temperature 1, tasks greedy); a markdown table and scaling.png;
- recipe ablations (--ablations FILE): lines `name flags...` for train.py, `base` the default run; a run without
  `--stage all` trains stage 2 from base's stage 1 (or from=RUN's); a table of the prior's use of its history and
  the sample metrics at the paper's sampler and at starting noise 0.5.
A run that has its ckpt.pt / eval.json is not trained / evaluated again (e.g. out/ copied to out_scaling/cola_1).

    python scaling.py --tasks tasks/comedies.jsonl     # levels 0.25,0.5,1 at the cpu preset, one run at a time
    OMP_NUM_THREADS=1 python scaling.py --ablations ablations.txt --jobs 2   # two runs at a time on 2 cores
    python scaling.py --device cuda --jobs 12 --train_args=--no-compile     # one GPU, all runs at once"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from cli import (Parser, check_writable_dir, die_with_parent, dry_run, fail, float_list, folder_lock, positive_int,
                 read_json, readable_file, script, train_dry_run, write_atomic, write_json)
from measures import plot_lines
from tokenizer import REPO_DIR, DataError

NAMES = {"cola": "Cola DLM", "ar": "AR", "llada": "LLaDA"}
COLUMNS = [  # (header, eval.json key, format); next-token acc.: Cola's prior, bs - 1 latents known; baselines' val_acc
    ("params", "params", "{:.2f}M"), ("train FLOPs", "train_flops", "{:.2e}"),
    ("bits/token", "bits_per_token", "{:.2f}"), ("next-token acc.", "next_token_acc", "{:.3f}"),
    ("LAMBADA-style", "lambada_style", "{:.1f}"), ("ending choice", "ending_choice", "{:.1f}"),
    ("task files", "user_tasks", "{:.1f}"), ("seen 2-gram", "seen_2gram_rate", "{:.2f}"),
    ("seen 3-gram", "seen_3gram_rate", "{:.2f}"), ("distinct-2", "distinct_2", "{:.2f}"),
    ("judge ppl", "judge_ppl", "{:,.0f}"), ("tok/s", "gen_tokens_per_s", "{:.1f}"),
    ("passes/token", "passes_per_token", "{:.3f}")]
PANELS = [("next_token_acc", "next-token accuracy", "linear"), ("judge_ppl", "judge perplexity", "log"),
          ("seen_3gram_rate", "seen 3-gram rate", "linear"), ("distinct_2", "distinct-2", "linear")]
ABLATION_EVAL = ("--builtin_n 0 --batches 1 --fm_batches 8 --ll_steps 2 --iwae_k 1 --steps 16 --guidance 7 "
                 "--noise_scale 1 --sweep_noise 1,0.5 --sample_repeats 3").split()  # the paper's sampler; noise 0.5 too


def get_args(argv=None):
    p = Parser(description=__doc__)
    arg = p.add_argument
    arg("--levels", type=float_list, default="0.25,0.5,1", help="comma list of levels (1: the default Cola run)")
    arg("--out_root", help="one run folder per model and level (default out_scaling; out_ablations)")
    arg("--judge", default=os.path.join(REPO_DIR, "out_judge", "ckpt.pt"),
        help="AR checkpoint that judges every run's samples (trained with --judge_iters steps if missing)")
    arg("--judge_iters", type=positive_int, default=3000, help="steps of the judge, if it is trained")
    arg("--device", default="auto", help="auto, cpu, cuda (passed to train.py and eval.py)")
    arg("--jobs", type=positive_int, default=1, help="runs at a time (1 on a CPU; several fit one GPU)")
    arg("--train_args", default="", help="extra train.py flags of every run, e.g. --train_args=--no-compile")
    arg("--eval_args", default="", help="extra eval.py flags of every run, e.g. --eval_args='--builtin_n 64'")
    arg("--tasks", nargs="*", type=readable_file, default=[], help="JSONL task files eval.py scores for every run")
    arg("--ablations", type=readable_file, help="a file of recipe ablations (name + train.py flags per line)")
    arg("--table_only", action="store_true", help="train nothing: tabulate the runs with an eval.json, list the others")
    a = p.parse_args(argv)
    a.levels = sorted({float(f"{v:g}") for v in a.levels})  # 0.01 and 1e-2 name one folder: trained once
    if a.levels[-1] > 1e6:
        p.error(f"--levels: {a.levels[-1]:g} is more than a million times the default run")
    dry_run("eval.py", a.eval_args.split())  # a bad eval.py flag fails now, not after the training
    if not a.table_only:
        check_judge(a.judge)
    a.out_root = a.out_root or os.path.join(REPO_DIR, "out_ablations" if a.ablations else "out_scaling")
    return a


def check_judge(judge):
    """The judge is a checkpoint file, or it is trained as ckpt.pt of a folder that holds no other run."""
    if os.path.isfile(judge):
        return
    if os.path.exists(judge) or os.path.basename(judge) != "ckpt.pt":
        fail(f"--judge {judge} is not a checkpoint file (a judge scaling.py trains is named NEW_FOLDER/ckpt.pt)")
    if os.path.isdir(out := os.path.dirname(os.path.abspath(judge))):
        if others := sorted(set(os.listdir(out)) - {"train.log"}):
            fail(f"--judge {judge} does not exist, and its folder holds {', '.join(others[:3])}: "
                 "train the judge into a new folder")
        check_writable_dir(out, "--judge's folder")


def plan(a):
    """[(model, level, run_dir, train.py argv, planned FLOPs)], baselines' steps matched (--table_only: dirs only)."""
    if a.table_only:
        return [(m, level, os.path.join(a.out_root, f"{m}_{level:g}"), [], None) for level in a.levels for m in NAMES]
    cola, *lms = (train_dry_run(["--model", m, *a.train_args.split()]) for m in NAMES)
    runs = []
    for level in a.levels:  # the level scales the steps train.py would take
        vae_iters, main_iters = (max(1, round(cola[k] * level)) for k in ("vae_iters", "main_iters"))
        flops = cola["vae_flops_per_step"] * vae_iters + cola["joint_flops_per_step"] * main_iters
        runs.append(("cola", level, os.path.join(a.out_root, f"cola_{level:g}"),
                     ["--vae_iters", str(vae_iters), "--main_iters", str(main_iters)], flops))
        for m, lm in zip(("ar", "llada"), lms):
            steps = max(1, round(flops / lm["flops_per_step"]))
            runs.append((m, level, os.path.join(a.out_root, f"{m}_{level:g}"),
                         ["--model", m, "--main_iters", str(steps), "--eval_interval", str(max(1, steps // 4))], flops))
    return runs


def plan_ablations(a):
    """[(name, 'ablation', run_dir, train.py argv, None)] of the ablations file, base first; every other run's argv
    is base's flags, then its own (the last wins): one change against base. from=RUN: stage 2 from RUN's stage 1."""
    try:
        with open(a.ablations, encoding="utf-8") as f:
            lines = [words for words in (line.split("#")[0].split() for line in f) if words]
    except (OSError, UnicodeDecodeError) as e:
        raise RuntimeError(f"{a.ablations} cannot be read as UTF-8 text ({e.__class__.__name__})") from None
    names = [words[0] for words in lines]
    if bad := [name for name in names if not re.fullmatch(r"[\w-][\w.-]*", name)]:
        raise RuntimeError(f"{a.ablations}: run name {bad[0]!r} must be a plain folder name")
    if names[:1] != ["base"]:
        raise RuntimeError(f"{a.ablations}: the first run must be named base (the shared stage 1)")
    if len(set(names)) < len(names):
        raise RuntimeError(f"{a.ablations}: two runs share the name {next(n for n in names if names.count(n) > 1)}")
    a.stage1_from = {words[0]: w[5:] for words in lines for w in words[1:] if w.startswith("from=")}
    flags = [[w for w in words[1:] if not w.startswith("from=")] for words in lines]
    if "--stage" in flags[0]:
        raise RuntimeError(f"{a.ablations}: base trains both stages; its line must not set --stage")
    for src in () if a.table_only else set(a.stage1_from.values()) - set(names):  # a from= stage 1 must exist
        if not os.path.isfile(os.path.join(a.out_root, src, "vae.pt")):
            raise RuntimeError(f"{a.ablations}: from={src} names no run of the file and no {a.out_root}/{src}/vae.pt")
    return [(n, "ablation", os.path.join(a.out_root, n), f if n == "base" else flags[0] + f, None)
            for n, f in zip(names, flags)]


def ablation_table(rows):
    """One line per run: the prior's use of its history, then the sample metrics (mean over rounds) at noise 1, 0.5."""
    lines = ["| run | flags | train FLOPs | FM with / without history | next token, the rest known | seen 2-gram / "
             "3-gram, distinct-2, judge ppl (noise 1) | the same, noise 0.5 |", "|---|---|---|---|---|---|---|"]
    pm = lambda s, k, f: f"{s[k]:{f}} ± {s.get(k + '_se', 0.0):{f}}"
    cell = lambda s: (f"{pm(s, 'seen_2gram_rate', '.2f')} / {pm(s, 'seen_3gram_rate', '.2f')}, "
                      f"{s['distinct_2']:.2f}, {pm(s, 'judge_ppl', ',.0f')}") if s else "-"
    for r in rows:
        sweep = {s["noise_scale"]: s for s in r.get("sweep_noise_scale", [])}
        lines.append(f"| {r['name']} | `{' '.join(r['flags']) or '(defaults)'}` | {r['train_flops']:.2e} | "
                     f"{r['fm_cond']:.3f} / {r['fm_uncond']:.3f} | {r.get('next_token_acc') or 0:.3f} | "
                     f"{cell(sweep.get(1.0))} | {cell(sweep.get(0.5))} |")
    return "\n".join(lines) + judges_line(rows)


def judges_line(rows):
    """The judge checkpoint(s) the rows' eval.json name: every comparison names its judge."""
    return "\n\njudge: " + ", ".join(sorted({str(r.get("judge")) for r in rows}))


def table(rows):
    """The ladder's table, its judge, held-out text's seen n-grams and distinct-2, each run's first sample."""
    lines = ["| model | level | " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        vals = [r.get(key) for _, key, _ in COLUMNS]  # each row holds its tasks' accuracies (run_all)
        vals[0] = vals[0] / 1e6 if vals[0] is not None else None  # params in millions
        vals = [fmt.format(v + 0.0 if isinstance(v, float) else v) if v is not None else "-"  # + 0.0: no "-0.00"
                for v, (_, _, fmt) in zip(vals, COLUMNS)]
        lines.append(f"| {NAMES[r['kind']]} | {r['level']:g} | " + " | ".join(vals) + " |")
    h = next((r for r in rows if "heldout_seen_2gram_rate" in r), None)
    held = "" if h is None else (f"\nheld-out text: seen 2-gram {h['heldout_seen_2gram_rate']:.2f}, seen 3-gram "
                                 f"{h['heldout_seen_3gram_rate']:.2f}, distinct-2 {h['heldout_distinct_2']:.2f}")
    return "\n".join(lines) + judges_line(rows) + held + "".join(
        f"\n\n{NAMES[r['kind']]}, level {r['level']:g}:\n```\n{r['samples'][0]}\n```" for r in rows if r.get("samples"))


def plot_scaling(rows, path):
    """The ladder's measures vs training FLOPs, one panel per measure, one series per model kind."""
    series = lambda m: {k: sorted((r["train_flops"], r[m]) for r in rows if r["kind"] == k and r.get(m) is not None)
                        for k in sorted({r["kind"] for r in rows})}
    return plot_lines([(series(m), dict(title=label, xlabel="training FLOPs", xscale="log", yscale=y_scale))
                       for m, label, y_scale in PANELS], path)


def load_result(run_dir):
    """A run's eval.json, or one line saying that it is not an eval result."""
    path = os.path.join(run_dir, "eval.json")
    try:
        res = read_json(path)
        assert isinstance(res, dict)
    except (OSError, ValueError, AssertionError) as e:
        fail(f"{path} is not an eval result ({type(e).__name__}); delete it to evaluate the run again")
    return res


CHILDREN = set()  # the train.py and eval.py processes running now: they stop when scaling.py stops


def run(cmd, log_path, what):
    """cmd with its output in log_path; a failure is one line naming the log."""
    t0 = time.time()
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR,
                                                      preexec_fn=die_with_parent) as p:  # even a SIGKILL stops it
        CHILDREN.add(p)
        try:
            rc = p.wait()
        finally:
            CHILDREN.discard(p)
            if p.poll() is None:  # interrupted: the child stops as Ctrl-C stops it (train.py keeps its checkpoint)
                p.terminate()
    if rc:
        tail = open(log_path).read().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {rc}); see {log_path}: {tail[0]}")
    print(f"[scaling] {what} in {time.time() - t0:.0f} s", flush=True)


def train_one(a, r):
    """Train a run unless it has a ckpt.pt (an unfinished run starts again from scratch)."""
    model, level, run_dir, flags, _ = r
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        return
    os.makedirs(run_dir, exist_ok=True)
    if level == "ablation" and "--stage all" not in " ".join(flags):
        if model == "base":
            flags = ["--stage", "all", *flags]
        else:  # stage 2 from base's (or from=RUN's) stage 1
            src = os.path.join(a.out_root, a.stage1_from.get(model, "base"), "vae.pt")
            shutil.copy(src, os.path.join(run_dir, "vae.pt"))
            flags = ["--stage", "joint", *flags]
    # the run's own flags come last: they win over the same flags in --train_args
    run([sys.executable, "train.py", *a.train_args.split(), "--out_dir", run_dir, "--device", a.device, "--overwrite",
         *flags], os.path.join(run_dir, "train.log"), f"trained {model} ({level})")


def eval_one(a, r):
    """Evaluate a run against the judge unless it has an eval.json."""
    model, level, run_dir, _, _ = r
    if not os.path.exists(os.path.join(run_dir, "eval.json")):
        run([sys.executable, "eval.py", "--out_dir", run_dir, "--device", a.device, "--judge", a.judge,
             *(ABLATION_EVAL if level == "ablation" else []),
             *(["--sample_temperature", "1"] if model in ("ar", "llada") else []),  # samples drawn, not greedy
             *a.eval_args.split(), *(["--tasks", *a.tasks] if a.tasks else [])],
            os.path.join(run_dir, "eval.log"), f"evaluated {model} ({level})")


def train_and_evaluate(a, runs):
    for m, level, run_dir, flags, flops in runs:
        planned = f" (planned {flops:.3e} training FLOPs)" if flops else ""
        print(f"[scaling] {m} ({level}): {' '.join(flags)}{planned}", flush=True)
    train_one(a, runs[0])  # the ablations' base run first: the others start from its stage 1
    in_parallel(a, lambda r: train_one(a, r), runs[1:])
    if not os.path.exists(a.judge):  # trained into its own new folder (check_judge)
        train_one(a, ("the judge", f"{a.judge_iters} AR steps", os.path.dirname(os.path.abspath(a.judge)),
                      ["--model", "ar", "--main_iters", str(a.judge_iters), "--eval_interval", str(a.judge_iters)],
                      None))
    in_parallel(a, lambda r: eval_one(a, r), runs)


def in_parallel(a, job, runs):
    """job(r) for every run, --jobs at a time; an interrupt (Ctrl-C, SIGTERM) stops every child process first."""
    with ThreadPoolExecutor(a.jobs) as ex:
        try:
            list(ex.map(job, runs))
        except BaseException:
            for p in list(CHILDREN):
                p.terminate()
            raise


@script
def main(argv=None):
    a = get_args(argv)
    check_writable_dir(a.out_root, "--out_root")
    with folder_lock(a.out_root, "scaling.lock", "scaling run"):  # two on one --out_root would mix their logs
        run_all(a)


def run_all(a):
    """Plan, train and evaluate what is missing, then the table, results.json and the figure."""
    try:
        runs = plan_ablations(a) if a.ablations else plan(a)
        n_base = len(runs[0][3])  # ablations: base's flags lead every run's
        done = lambda r: os.path.exists(os.path.join(r[2], "eval.json"))
        if a.table_only:
            if missing := [r[0] if a.ablations else f"{r[0]}_{r[1]:g}" for r in runs if not done(r)]:
                print(f"[scaling] not yet trained and evaluated: {', '.join(missing)}", flush=True)
            runs = [r for r in runs if done(r)] or fail("no run has an eval.json yet")
        for r in filter(done, runs):  # a broken eval.json stops the command before any training
            load_result(r[2])
        if not a.table_only:
            train_and_evaluate(a, runs)
    except (RuntimeError, DataError) as e:
        fail(e)
    rows = []
    for m, level, run_dir, flags, _ in runs:
        res = load_result(run_dir)
        if a.ablations:  # each line's own change
            rows.append({**res, "name": m, "flags": flags if m == "base" else flags[n_base:]})
            continue
        user = [v for k, v in res.get("tasks", {}).items() if k not in ("lambada_style", "ending_choice")]
        acc = res.get("next_token_acc" if m == "cola" else "val_acc")  # none: not measured (--prefix_windows 0)
        rows.append({**res, "level": level, **res.get("tasks", {}), "next_token_acc": acc,
                     "user_tasks": sum(user) / len(user) if user else None})
    md = (ablation_table if a.ablations else table)(rows)
    write_atomic(os.path.join(a.out_root, "table.md"), lambda f: f.write(md + "\n"))
    if not a.ablations:
        write_json(os.path.join(a.out_root, "results.json"), rows, indent=1)
        print("wrote", plot_scaling(rows, os.path.join(a.out_root, "scaling.png")))
    print(md)


if __name__ == "__main__":
    main()
