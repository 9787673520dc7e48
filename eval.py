"""Evaluate one checkpoint (Cola DLM, AR or LLaDA) and write <run>/eval.json plus PNG plots.

    python eval.py                                    # out/ckpt.pt on the held-out split it was trained on
    python eval.py --out_dir out_ar --tasks tasks/comedies.jsonl
    python eval.py --judge out_judge/ckpt.pt --sweep_steps 8,16,32 --sweep_guidance 1,3,7
    python eval.py --out_dir runs/ar --testbed 128     # the history testbed's measures only (testbed.py)
    python eval.py --score eval_output/mmlu.jsonl ...  # score existing generations; no model needed
    python eval.py --init_from hf/Cola-DLM --tasks eval_output/lambada.jsonl   # the released model (-> out_release)

Cola DLM's own measures (measures.py, docs/method.md §3-§7): the VAE, the prior's use of its history, likelihood
through its CNF, the prior's next-token accuracy. Every kind: bits per token, tasks by the paper's rules (generations
in its task schema), samples (seen n-gram rates, distinct-n, judge perplexity, speed); a snapshot: tasks, samples."""
import json
from dataclasses import replace
import os
import time

import torch

from checkpoint import CheckpointError, load_model, log_row, prompt_ids, stored_sampler
from cli import Parser, check_writable_dir, check_writable_file, fail, float_list, int_at_least, int_list, \
    nonneg_float, nonneg_int, pick_device, positive_float, positive_int, readable_file, script, write_json, json_loads
from decoder import GenerationError
from measures import (builtin_tasks, eval_history_gap, eval_likelihood, eval_prefix_prediction, eval_testbed,
                      eval_vae, make_generator, plot_lines, run_tasks, sample_quality)
from tokendata import TokenData, batch_seed
from tokenizer import REPO_DIR, DataError, get_tokenizer, same_tokenizer
from scoring import TaskError, TrainNgrams, completion_prefixes, ngram_metrics, read_tasks, score_file


def training_curves(run_dir, keys=("loss", "recon_acc", "fm", "fm_cond", "fm_uncond", "logsnr", "acc")):
    """{stage: {key: [(step, value), ...]}} of the run's training logs, read before any measure runs."""
    curves = {}
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith("log_") and name.endswith(".jsonl") and os.path.isfile(path):
            rows = [r for r in map(log_row, open(path, encoding="utf-8", errors="replace")) if r]
            curve = lambda k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if rows:
                curves[name[4:-6]] = {k: curve(k) for k in keys}
    return curves


def get_args(argv=None):
    p = Parser(description=__doc__)
    arg = p.add_argument
    arg("--out_dir", help="run folder of ckpt.pt (default: out); with --init_from, where results go (out_release)")
    arg("--ckpt", help="checkpoint path (overrides --out_dir)")
    arg("--init_from", metavar="DIR", help="the authors' released snapshot instead of a checkpoint")
    arg("--score", nargs="+", type=readable_file, metavar="FILE", help="score task files' generations, no model needed")
    arg("--data_dir", help="prepared data (default: the one the run trained on)")
    arg("--results", help="JSON output path (default: <run dir>/eval.json)")
    arg("--batches", type=positive_int, default=4, help="held-out batches for losses and likelihood")
    arg("--batch_size", type=positive_int, default=8, help="sequences per held-out batch")
    arg("--fm_batches", type=positive_int, default=32, help="held-out batches for the FM history comparison (Cola)")
    arg("--ll_steps", type=positive_int, default=16, help="midpoint steps of Cola's CNF likelihood solve")
    arg("--iwae_k", type=positive_int, default=2, help="posterior samples per sequence for Cola's bounds")
    arg("--prefix_windows", type=nonneg_int, default=512, help="held-out windows, Cola's next-token accuracy (0: skip)")
    arg("--tasks", nargs="*", type=readable_file, default=[], help="JSONL task files to generate answers for, scored")
    arg("--testbed", type=nonneg_int, default=0, help="held-out prompts: the testbed's measures only (testbed.py)")
    arg("--builtin_n", type=nonneg_int, default=32, help="examples per built-in task (0: skip them)")
    arg("--task_max_new", type=positive_int, default=32, help="new tokens per task answer (paper: <= 32)")
    arg("--task_batch", type=positive_int, default=32, help="task items generated together (release: 20)")
    arg("--item_noise_seed", type=nonneg_int, help="Cola: each task item's noise from seed N + id * 1000 (release: 66)")
    arg("--n_samples", type=positive_int, default=8, help="samples per round for the sample metrics and speed")
    arg("--sample_len", type=positive_int, default=96, help="new tokens per sample")
    arg("--sample_temperature", type=nonneg_float, default=0.0, help="AR, LLaDA: the samples' temperature (0: greedy)")
    arg("--judge", type=readable_file, help="AR checkpoint that scores sample perplexity (name it in every comparison)")
    # the sampler (default: the one the checkpoint stores, decoder.SamplerConfig)
    arg("--steps", type=positive_int, help="Euler steps per block (Cola) / LLaDA steps (paper 16)")
    arg("--guidance", type=positive_float, help="guidance scale (Cola; paper 7)")
    arg("--noise_scale", type=positive_float, help="Cola: std of each block's starting noise (paper 1)")
    arg("--sweep_steps", type=int_list, help="comma list of step counts to sweep (Cola)")
    arg("--sweep_guidance", type=float_list, help="comma list of guidance scales to sweep (Cola)")
    arg("--sweep_noise", type=float_list, help="comma list of starting-noise scales to sweep (Cola)")
    arg("--sample_repeats", type=positive_int, default=3, help="rounds of --n_samples samples (different noise)")
    arg("--device", default="auto", help="auto, cpu, cuda")
    arg("--seed", type=int_at_least(0, 2**32 - 1), default=0, help="random seed")
    arg("--dry_run", action="store_true", help="check the flags and exit (scaling.py checks its --eval_args)")
    return p.parse_args(argv)


@script
def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        return None
    try:
        if args.score:
            scores, n = [score_file(path) for path in args.score], len(args.score)
            mean = {"task": "average", "n_tasks": n, "accuracy": sum(sc["accuracy"] for sc in scores) / n}
            for sc in scores + [mean] * (n > 1):  # the paper's average: the mean of the per-task accuracies
                print(json.dumps({**sc, "accuracy": round(sc["accuracy"], 2)}))
            return scores
        return evaluate(args)
    except (DataError, CheckpointError, TaskError, GenerationError) as e:
        fail(e)


def setup(args):
    """Everything evaluate() needs, every input checked before any measure runs."""
    device = pick_device(args.device)
    out_dir = args.out_dir or os.path.join(REPO_DIR, "out_release" if args.init_from else "out")
    path = args.init_from or args.ckpt or os.path.join(out_dir, "ckpt.pt")
    run_dir = out_dir if args.init_from else os.path.dirname(os.path.abspath(path))
    out_path = check_results(args.results or os.path.join(run_dir, "eval.json"))
    tasks, files = read_task_files(args.tasks, run_dir)
    model, info = load_model(path, device)
    enc, tok = get_tokenizer(info["tokenizer"]), info["tokenizer"]
    judge, jinfo = load_model(args.judge, device, kinds=("ar",)) if args.judge else (None, None)
    if judge is not None and not same_tokenizer(jinfo["tokenizer"], tok):
        raise DataError(f"--judge {args.judge} uses tokenizer {jinfo['tokenizer']}, the model {tok}")
    data_dir = args.data_dir or info["args"].get("data_dir")
    data = TokenData(data_dir, info["args"].get("seq_len", 64)) if data_dir else None
    if args.testbed and data is None:
        raise DataError("--testbed needs the run's prepared data (--data_dir)")
    if data is not None and not same_tokenizer(data.meta["tokenizer"], tok):
        raise DataError(f"{data_dir} was prepared with tokenizer {data.meta['tokenizer']}, the model uses {tok}")
    context = (model.vae.cfg if info["kind"] == "cola" else model.cfg).max_seq_len
    for name, items in tasks.items():
        for t in items:
            n = len(prompt_ids(info, enc, t["prompt"]))
            if n + args.task_max_new > context:
                raise TaskError(f"task {name} item {t['id']}: prompt of {n} tokens + --task_max_new "
                                f"{args.task_max_new} exceed the model's context of {context} tokens")
    clash = [files[name] for name in ("lambada_style", "ending_choice") if name in files]
    if clash and args.builtin_n and data is not None:
        raise TaskError(f"task file {clash[0]} has the name of a built-in task; rename it or pass --builtin_n 0")
    sampler = stored_sampler(info, enc.eot_token, steps=args.steps, guidance=args.guidance,
                             noise_scale=args.noise_scale, repetition_penalty=1.1)
    args.steps, args.guidance = sampler.steps, sampler.guidance
    return dict(sampler=sampler, device=device, path=path, run_dir=run_dir, out_path=out_path, tasks=tasks,
                model=model, info=info, enc=enc, judge=judge, data=data, curves=training_curves(run_dir))


def check_results(path):
    """--results names a new file or a previous eval result (recognised by its content), nothing else."""
    check_writable_file(path, "--results")
    try:
        with open(path, "rb") as f:  # only a file that starts like a JSON object is read whole
            old = json_loads(f.read()) if f.peek(1)[:1] == b"{" else None
    except (OSError, ValueError):
        old = None
    if os.path.exists(path) and not (isinstance(old, dict) and {"kind", "ckpt", "step", "params"} <= old.keys()):
        fail(f"--results {path} exists and is not an eval result; name a new file")
    return path


def read_task_files(paths, run_dir):
    """{name: tasks}, {name: file} of the task files (one per name, none its own generations would replace); the run
    folder and its generations folder checked writable, with no folder where eval.py writes a file."""
    tasks, files, gen_dir = {}, {}, os.path.join(run_dir, "generations")
    for f in paths:
        name, items = read_tasks(f)
        if name in files:
            raise TaskError(f"task files {files[name]} and {f} share the name {name}; rename one")
        out = os.path.join(gen_dir, f"{name}.jsonl")
        if os.path.exists(out) and os.path.samefile(f, out):
            raise TaskError(f"task file {f} is where its generations go; move it out of {gen_dir}")
        tasks[name], files[name] = items, f
    check_writable_dir(run_dir, "run folder")
    if os.path.exists(gen_dir):
        check_writable_dir(gen_dir, "generations folder")
    plots = ["training_curves.png", "sweep_steps.png", "sweep_guidance.png", "sweep_noise_scale.png"]
    for f in plots + [f"generations/{name}.jsonl" for name in [*tasks, "lambada_style", "ending_choice"]]:
        if os.path.isdir(os.path.join(run_dir, f)):
            fail(f"{os.path.join(run_dir, f)} is a folder, where eval.py writes a file")
    return tasks, files


@torch.no_grad()  # every measure is inference; the CNF divergence turns gradients on locally
def evaluate(args):
    env = setup(args)
    model, info, data, device, run_dir = env["model"], env["info"], env["data"], env["device"], env["run_dir"]
    kind, targs = info["kind"], info["args"]
    torch.manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    res = {"kind": kind, "ckpt": env["path"], "step": info["step"], "train_flops": info.get("train_flops", 0.0),
           "params": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ref_enc")),
           "judge": args.judge, "guidance": args.guidance, "steps": args.steps}
    if args.testbed:  # the held-out lines' prefixes, the sampler as the flags set it (AR, LLaDA: --sample_temperature)
        make = lambda seed: make_generator(kind, model, env["sampler"], seed, args.sample_temperature)
        if not completion_prefixes(val := env["enc"].decode(data.tokens("val", limit=200_000).tolist()), 1):
            raise DataError(f"--testbed: {data.data_dir} holds no held-out line of brackets (not a testbed.py folder?)")
        res.update(eval_testbed(make, lambda text: prompt_ids(info, env["enc"], text), env["enc"].decode, val,
                                args.testbed, args.n_samples, args.sample_len, args.seed, args.sample_repeats))
        write_json(env["out_path"], res)
        return print(json.dumps(res, indent=1)) or res
    train_ngrams = TrainNgrams.of(data) if data is not None else None
    if data is not None:
        batches = [data.batch("val", args.batch_size, batch_seed(args.seed + 99, i, 0), device)
                   for i in range(args.batches)]
        res.update(seq_len=data.seq_len, heldout_tokens=args.batches * args.batch_size * data.seq_len)
        t0 = time.time()
        if kind == "cola":
            res.update(eval_vae(model, batches, targs.get("beta", 1e-3), targs.get("mask_prob", 0.15), g))
            res.update(eval_history_gap(model, data, args.fm_batches, args.batch_size, args.seed, g, targs))
        res.update(eval_likelihood(model, kind, batches, env["sampler"].stop_ids[0], g, args.iwae_k, args.ll_steps))
        if kind == "cola" and args.prefix_windows:  # the prior's next-token accuracy
            xp = data.batch("val", args.prefix_windows, batch_seed(args.seed + 95, 0, 0), device)
            j = min(47, xp.shape[1] - 1) // (model.block_size * model.vae.cfg.patch_size)  # token 47's block
            res["prefix_prediction"] = eval_prefix_prediction(model, xp, j, args.steps, args.guidance, g)
            k = model.block_size - 1  # next-token prediction: the block's other latents known
            res.update(prefix_windows=args.prefix_windows, next_token_acc=res["prefix_prediction"][f"known_{k}"])
            for name, guidance in (("next_token_acc_point", 1.0), ("next_token_acc_point_no_history", 0.0)):  # 0: v_u
                res[name] = eval_prefix_prediction(model, xp, j, args.steps, guidance, g, (k,), 0.0)[f"known_{k}"]
        print(f"[eval] held-out measures: {time.time() - t0:.1f} s", flush=True)
    res.update(generation(args, env, train_ngrams))
    if env["curves"]:
        plot_lines([(c, dict(title=stage, xlabel="step")) for stage, c in env["curves"].items()],
                   os.path.join(run_dir, "training_curves.png"))
    write_json(env["out_path"], res)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                      if isinstance(v, (int, float)) or k == "tasks"}))
    for s in res["samples"][:3]:
        print("sample:", repr(s))
    print(f"wrote {env['out_path']}")
    return res


def generation(args, env, train_ngrams):
    """Tasks, samples and speed, and the sampler sweeps (Cola)."""
    model, info, enc, data, kind = env["model"], env["info"], env["enc"], env["data"], env["info"]["kind"]
    make = lambda seed, temperature=0.0, **over: make_generator(
        kind, model, replace(env["sampler"], **over), seed, temperature, info.get("release", False))
    gen, tasks, gen_dir = make(args.seed), dict(env["tasks"]), os.path.join(env["run_dir"], "generations")
    if args.builtin_n and data is not None:
        tasks.update(builtin_tasks(enc.decode(data.tokens("val", limit=200_000).tolist()), args.builtin_n, args.seed))
    os.makedirs(gen_dir, exist_ok=True)
    ids = lambda text: prompt_ids(info, enc, text)
    noise_seed = args.item_noise_seed if kind == "cola" else None
    res = {"tasks": {name: run_tasks(gen, enc, ids, name, ts, args.task_max_new, args.task_batch,
                                     os.path.join(gen_dir, f"{name}.jsonl"), noise_seed) for name, ts in tasks.items()}}
    if res["tasks"]:
        res["task_accuracy"] = sum(res["tasks"].values()) / len(res["tasks"])
    prompts = [ids("\n")] * args.n_samples
    res["sample_temperature"] = temperature = args.sample_temperature if kind != "cola" else 0.0
    t1 = time.time()
    samples, passes = make(args.seed, temperature)(prompts, args.sample_len)
    n_tok = sum(len(s) for s in samples)
    res.update(gen_tokens_per_s=n_tok / (time.time() - t1), passes_per_token=passes / max(n_tok, 1))
    if train_ngrams is not None:  # held-out text's own rates, windows of the samples' length, beside them
        windows = TokenData(data.data_dir, args.sample_len)
        held = windows.batch("val", args.n_samples * args.sample_repeats, batch_seed(args.seed + 94, 0, 0), "cpu")
        res.update({f"heldout_{k}": v for k, v in ngram_metrics(held.tolist(), train_ngrams).items()})
        quality = lambda first=None, **over: sample_quality(
            lambda seed: make(seed, temperature, **over), prompts, args.sample_len, args.seed, args.sample_repeats,
            train_ngrams, env["judge"], first)
        res.update(quality(first=samples))
        for key, values in (("steps", args.sweep_steps), ("guidance", args.sweep_guidance),
                            ("noise_scale", args.sweep_noise)):
            if values and kind == "cola":
                res[f"sweep_{key}"] = sweep = [{key: v, **quality(**{key: v})} for v in values]
                metrics = [m for m in ("judge_ppl", "seen_2gram_rate", "seen_3gram_rate", "distinct_2") if m in res]
                plot_lines([({m: [(r[key], r[m]) for r in sweep]}, dict(xlabel=key, ylabel=m)) for m in metrics],
                           os.path.join(env["run_dir"], f"sweep_{key}.png"))
    res["samples"] = [enc.decode(p) + " ||| " + enc.decode(s) for p, s in zip(prompts, samples)]
    return res


if __name__ == "__main__":
    main()
