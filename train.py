"""
Training for every stage of Cola DLM and for the baselines, nanoGPT style: one file, argparse flags, DDP.

    python train.py --stage vae     # stage 1: Text VAE pretraining (docs/method.md §3)       -> out/vae.pt
    python train.py --stage joint   # stage 2: joint VAE + block-causal DiT, from out/vae.pt  -> out/ckpt.pt
    python train.py                 # --stage all: stage 1 then stage 2
    python train.py --model ar      # a matched baseline (ar or llada)                        -> out/ckpt.pt
    torchrun --standalone --nproc_per_node=8 train.py ...    # DDP: gloo on CPU, nccl on CUDA

The file reads top to bottom: arguments and presets, set-up, stage 1, stage 2, the baselines, then the
one training loop they share. Checkpoints are self-describing (model configs, args, step, optimizer,
every rank's random state) and written atomically; --resume continues a run where it stopped.
"""
import contextlib
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from baselines import LMConfig, TransformerLM
from checkpoint import CheckpointError, build, load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from cli import autocast, check_writable_dir, fail, folder_lock, pick_device, write_atomic
from diffusion import ColaDLM, history_metrics, t_bin_line
from layers import n_params
from prepare import DataError, TokenData, batch_seed
from presets import dit_config, dry_run, get_args, lm_config, vae_config
from vae import TextVAE, VAEConfig

# ----------------------------------------------------------------------------------------------------
# set-up: processes, optimizer, schedule

def setup_distributed(device):
    """Returns (rank, world, device). Works with or without torchrun."""
    device = pick_device(device)
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def cleanup_distributed():
    gc.collect()  # free DDP wrappers first: a reducer torn down after its process group can abort gloo at exit
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def lr_at(step, args, max_iters):
    """Linear warm-up to --lr, then cosine decay to --min_lr at max_iters."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    frac = min(1.0, (step - args.warmup_iters) / max(1, max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (args.lr - args.min_lr)


def make_optimizer(param_groups, args, device):
    """AdamW (0.9, --beta2); weight decay on matrices only. param_groups: [(params, lr_scale)]."""
    groups = []
    for params, lr_scale in param_groups:
        params = [p for p in params if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay,
                    "lr_scale": lr_scale}, {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0,
                                            "lr_scale": lr_scale}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=str(device).startswith("cuda"))


def vocab_lr_groups(module, scale, vocab_mult):
    """[(params, lr scale)]: embeddings and output heads get vocab_mult x (a rare token's rows learn rarely)."""
    vocab = [m.weight for name, m in module.named_modules() if isinstance(m, torch.nn.Embedding) or name[-4:] == "head"]
    ids = {id(p) for p in vocab}
    return [([p for p in module.parameters() if id(p) not in ids], scale), (vocab, scale * vocab_mult)]


@dataclass
class Run:
    """What a stage hands the training loop."""
    name: str                      # log prefix and log file: vae, joint, ar, llada
    model: torch.nn.Module         # the raw model; its forward(tokens, **loss_kwargs) returns {'loss', ...}
    param_groups: list             # [(params, lr scale)]
    loss_kwargs: dict
    max_iters: int
    ckpt_path: str
    ckpt_fields: dict              # kind, configs and anything else the checkpoint must hold
    flops_per_token: float         # training FLOPs per token of data (layers.py's convention)
    flops_before: float = 0.0      # FLOPs of earlier stages (stage 1 for stage 2)
    micro_batch: int = 0           # sequences per micro-batch (0: --batch_size)
    clip_groups: dict = field(default_factory=dict)  # {log suffix: params} clipped separately; empty: one norm
    resume_from: dict = None       # the checkpoint to continue
    validate: object = None        # validate(x) -> {metric: value} on one validation batch (no grad)
    report: object = None          # report(metrics) -> extra lines to print after the validation line


# ----------------------------------------------------------------------------------------------------
# stage 1: the Text VAE (docs/method.md §3)

def stage_vae(args, env, data):
    path = os.path.join(args.out_dir, "vae.pt")
    ckpt = load_checkpoint(path, ("vae",)) if args.resume and os.path.exists(path) else None
    cfg = build(VAEConfig, ckpt["vae_config"], ckpt) if ckpt else vae_config(args, data.meta["vocab_size"])
    torch.manual_seed(args.seed)  # the same init on every rank
    model = TextVAE(cfg)
    if ckpt:
        load_weights(model, ckpt["model"], ckpt)
    if env["master"]:
        print(f"[vae] {n_params(model) / 1e6:.2f}M parameters, config {asdict(cfg)}", flush=True)
    loss_kwargs = {k: getattr(args, k) for k in ("beta", "mask_prob", "lam_mask")}

    def validate(x):
        out = model(x, **loss_kwargs)
        out["recon_acc"] = model.recon_accuracy(x)
        return {k: out[k] for k in ("loss", "ce", "kl", "mask_acc", "recon_acc", "logsnr")}

    return Run("vae", model, vocab_lr_groups(model, 1.0, args.embed_lr_mult), loss_kwargs, args.vae_iters, path,
               dict(kind="vae", vae_config=asdict(cfg)), model.train_flops_per_token(args.seq_len, args.lam_mask),
               resume_from=ckpt, validate=validate)


# ----------------------------------------------------------------------------------------------------
# stage 2: the VAE and the block-causal DiT prior, jointly (docs/method.md §4, §5)

JOINT_LOSS_ARGS = ("beta", "mask_prob", "lam_mask", "lam_vae", "lam_fm", "lam_ref", "t_loc", "t_scale", "t_uniform",
                   "partial_prob", "detach_zt")  # ColaDLM.forward's

def stage_joint(args, env, data):
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, ("cola",)) if args.resume and os.path.exists(path) else None
    if ckpt:
        model = ColaDLM.from_checkpoint(ckpt)
        stage1_flops = ckpt["stage1_flops"]
    else:
        vae_ckpt = load_checkpoint(os.path.join(args.out_dir, "vae.pt"), ("vae",))
        vae_cfg = build(VAEConfig, vae_ckpt["vae_config"], vae_ckpt)
        torch.manual_seed(args.seed)  # the same DiT init on every rank
        model = ColaDLM(vae_cfg, dit_config(args, vae_cfg)).to(env["device"])
        model.init_from_stage1(vae_ckpt["model"], [data.batch("train", args.batch_size, batch_seed(args.seed + 2, i, 0),
                                                              env["device"]) for i in range(args.stats_batches)])
        stage1_flops = vae_ckpt["train_flops"]
    if env["master"]:
        print(f"[joint] VAE {n_params(model.vae) / 1e6:.2f}M + DiT {n_params(model.dit) / 1e6:.2f}M parameters; DiT "
              f"config {asdict(model.dit.cfg)}; latent scale {[round(v, 2) for v in model.latent_scale.tolist()]}")
    frozen = args.vae_lr_ratio == 0 and args.lam_vae == 0 and args.lam_ref == 0  # no VAE work at all
    if args.vae_lr_ratio == 0:
        model.vae.requires_grad_(False)  # Joint x0: the VAE stays at stage 1
    # the VAE trains at exactly the DiT's lr times --vae_lr_ratio (the paper's "Joint x1"); stage 1's
    # vocabulary-matrix multiplier is not applied: it lets the latents drift from q_ref
    groups = [(model.dit.parameters(), 1.0), (model.vae.parameters(), args.vae_lr_ratio)]
    loss_kwargs = {k: getattr(args, k) for k in JOINT_LOSS_ARGS}
    loss_kwargs["decode_rows"] = args.batch_size if args.fm_batch_mult > 1 else 0
    clip_groups = ({"_dit": list(model.dit.parameters()), "_vae": list(model.vae.parameters())}
                   if args.grad_clip_scope == "network" else {})

    def validate(x):
        out = model(x, **loss_kwargs)
        out["recon_acc"] = model.vae.recon_accuracy(x)
        res = {k: out[k] for k in ("loss", "ce", "mask_acc", "recon_acc", "fm", "ref_kl", "logsnr")}
        # the prior with and without its clean history on the same noise, uniform t (every bin gets samples)
        return {**res, **history_metrics(*model.fm_eval(x, t_uniform=True))}

    report = lambda val: ["val FM per t-bin (with history | without): " + t_bin_line(val)]

    return Run("joint", model, groups, loss_kwargs, args.main_iters, path,
               dict(kind="cola", vae_config=asdict(model.vae.cfg), dit_config=asdict(model.dit.cfg),
                    stage1_flops=stage1_flops),
               model.train_flops_per_token(args.seq_len, 1 / args.fm_batch_mult, args.lam_mask, frozen), stage1_flops,
               micro_batch=args.batch_size * args.fm_batch_mult, clip_groups=clip_groups, resume_from=ckpt,
               validate=validate, report=report)


# ----------------------------------------------------------------------------------------------------
# the baselines: AR and LLaDA (docs/method.md §8)

def stage_lm(args, env, data):
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, (args.model,)) if args.resume and os.path.exists(path) else None
    cfg, target = (build(LMConfig, ckpt["lm_config"], ckpt), None) if ckpt else lm_config(args, data.meta["vocab_size"])
    torch.manual_seed(args.seed)
    model = TransformerLM(cfg)
    if ckpt:
        load_weights(model, ckpt["model"], ckpt)
    elif env["master"]:
        print(f"[{args.model}] {n_params(model) / 1e6:.2f}M parameters ({cfg.n_layers} layers x {cfg.width}) "
              f"matched to Cola's {target / 1e6:.2f}M (VAE + DiT)", flush=True)

    def validate(x):
        return {k: v for k, v in model(x).items() if k in ("loss", "acc")}

    return Run(args.model, model, [(model.parameters(), 1.0)], {}, args.main_iters, path,
               dict(kind=args.model, lm_config=asdict(cfg)), model.train_flops_per_token(args.seq_len),
               resume_from=ckpt, validate=validate)


# ----------------------------------------------------------------------------------------------------
# the training loop every stage shares

class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the message is one line meant for the user."""


def kept(path):
    return f"{path} keeps the last good checkpoint" if os.path.exists(path) else f"no checkpoint was written to {path}"


def trim_log(path, step):
    """Drop the log lines after `step`: a run killed between its log line and its checkpoint repeats those steps."""
    if os.path.exists(path):
        lines = [ln for ln in open(path) if ln.strip() and json.loads(ln)["step"] <= step]
        write_atomic(path, lambda f: f.writelines(lines))


def clip_gradients(groups, max_norm):
    """Clip each group {log suffix: params} to max_norm on its own -> {'gnorm<suffix>': norm before clipping}."""
    return {"gnorm" + k: torch.nn.utils.clip_grad_norm_(params, max_norm) for k, params in groups.items()}


def all_reduce_mean(metrics, env):
    keys = sorted(metrics)
    t = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=env["device"]) for k in keys])
    if env["world"] > 1:
        dist.all_reduce(t)
    return {k: float(v) / env["world"] for k, v in zip(keys, t)}


def train(run, args, env, data):
    """Optimise run.model for run.max_iters steps. Returns False if --stop_after ended it early."""
    device, rank, world, master = env["device"], env["rank"], env["world"], env["master"]
    model = run.model.to(device)
    opt = make_optimizer(run.param_groups, args, device)
    step = 0
    if run.resume_from:
        opt.load_state_dict(run.resume_from["optimizer"])
        step = run.resume_from["step"]
        states = run.resume_from["rng"]  # every rank continues its own random stream
        set_rng_state(states[rank]) if len(states) == world else torch.manual_seed(args.seed + rank * 1000 + step)
        if master:
            print(f"[{run.name}] resumed at step {step}" + ("" if len(states) == world else
                  f"; warning: saved by {len(states)} processes, so the random streams are reseeded"), flush=True)
            trim_log(os.path.join(args.out_dir, f"log_{run.name}.jsonl"), step)
    else:
        torch.manual_seed(args.seed + rank * 1000)  # different noise on every rank
    fwd = torch.compile(model) if args.compile else model
    if world > 1:
        fwd = DDP(fwd, device_ids=[torch.device(device).index] if str(device).startswith("cuda") else None)
    amp = autocast(device, args.dtype)
    micro_batch = run.micro_batch or args.batch_size
    tokens_per_step = micro_batch * args.seq_len * args.grad_accum * world
    flops = lambda: run.flops_before + step * tokens_per_step * run.flops_per_token

    def save():
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # the same on every rank (DDP)
            raise TrainingError(f"[{run.name}] the weights hold NaN or Inf at step {step}; not saved, "
                                f"{kept(run.ckpt_path)} (try a lower --lr)")
        states = [rng_state()] * world
        if world > 1:  # every rank's random state, so that a resume continues every stream
            dist.all_gather_object(states, rng_state())
        if master:
            save_checkpoint(run.ckpt_path, dict(**run.ckpt_fields, model=model.state_dict(), step=step,
                                                optimizer=opt.state_dict(), rng=states, args=vars(args),
                                                data_position=dict(step=step, seed=args.seed),
                                                tokenizer=data.meta["tokenizer"], train_flops=flops()))
        if world > 1:
            dist.barrier()  # the next stage reads this file on every rank

    def validate():
        """Metrics averaged over the validation batches and ranks, with fixed noise: comparable between
        evaluations, and the training random stream is left as it was."""
        model.eval()
        sums, rng_devices = {}, [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), amp:
            torch.manual_seed(args.seed + 7)
            for i in range(args.eval_iters):
                x = data.batch("val", args.batch_size, batch_seed(args.seed + 1, rank * args.eval_iters + i, 0), device)
                for k, v in run.validate(x).items():
                    sums[k] = sums.get(k, 0.0) + float(v) / args.eval_iters
        model.train()
        return {**all_reduce_mean(sums, env), "train_flops": flops()}

    t0, start, acc, n, steps_here = time.time(), time.time(), {}, 0, 0
    while step < run.max_iters:
        if args.stop_after and steps_here == args.stop_after:
            save()
            if master:
                print(f"[{run.name}] stopped at step {step} (--stop_after); continue with --resume", flush=True)
            return False
        lr = lr_at(step, args, run.max_iters)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        sums = {}
        for micro in range(args.grad_accum):
            x = data.batch("train", micro_batch, batch_seed(args.seed, rank * args.grad_accum + micro, step), device)
            last = micro == args.grad_accum - 1  # gradients are all-reduced on the last micro-batch only
            with (fwd.no_sync() if world > 1 and not last else contextlib.nullcontext()), amp:
                out = fwd(x, **run.loss_kwargs)
            (out["loss"] / args.grad_accum).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / args.grad_accum
        # a NaN or Inf loss stops every rank before the step: the weights and the last checkpoint stay good
        if not math.isfinite(all_reduce_mean({"loss": sums["loss"]}, env)["loss"]):
            raise TrainingError(f"[{run.name}] loss is {float(sums['loss'])} at step {step}; stopped, "
                                f"{kept(run.ckpt_path)} (try a lower --lr)")
        if args.grad_clip > 0:
            sums.update(clip_gradients(run.clip_groups or {"": list(model.parameters())}, args.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, steps_here, n = step + 1, steps_here + 1, n + 1
        acc = {k: acc.get(k, 0.0) + v for k, v in sums.items()}
        if step % args.log_interval == 0 or step == run.max_iters:
            m = all_reduce_mean({k: v / n for k, v in acc.items()}, env)
            dt = (time.time() - t0) / n
            if master:
                print(f"[{run.name}] step {step}/{run.max_iters} " + " ".join(f"{k} {v:.4f}" for k, v in m.items()) +
                      f" lr {lr:.2e} {dt * 1000:.0f} ms/step {tokens_per_step / dt:,.0f} tok/s", flush=True)
            t0, acc, n = time.time(), {}, 0
        if step % args.eval_interval == 0 or step == run.max_iters:
            val = validate()
            if not math.isfinite(val["loss"]):
                raise TrainingError(f"[{run.name}] validation loss is {val['loss']} at step {step}; not saved, "
                                    f"{kept(run.ckpt_path)} (try a lower --lr)")
            if master:
                line = {k: v for k, v in val.items() if not k.startswith("bin_")}
                print(f"[{run.name}] val step {step} " + " ".join(f"{k} {v:.4g}" for k, v in line.items()) +
                      f" | {time.time() - start:.0f} s into this run", flush=True)
                for extra in (run.report(val) if run.report else []):
                    print(f"[{run.name}] {extra}", flush=True)
                with open(os.path.join(args.out_dir, f"log_{run.name}.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, **val}) + "\n")
            save()
            t0 = time.time()
    return True


# ----------------------------------------------------------------------------------------------------
# what a run may write, checked before it trains

RESUME_FIXED = ("model", "preset", "latent_dim", "block_size", "patch_size", "vae_width", "vae_layers", "dit_width",
                "dit_layers", "rope_fraction", "lm_width", "lm_layers", "fixed_logsnr", "dit_init", "self_cond",
                "vae_lr_ratio", "seq_len")  # flags a resumed run cannot change (the
# model, the data windows, and which parameters the optimizer holds)


def stage_files(args):
    """[(checkpoint file, kind)] this invocation writes, in order."""
    if args.model != "cola":
        return [("ckpt.pt", args.model)]
    return ([("vae.pt", "vae")] if args.stage in ("vae", "all") else []) + ([("ckpt.pt", "cola")] if args.stage != "vae" else [])


def preflight(args):
    """Before any work: the folder is writable, and what it holds fits the flags. Without --resume or
    --overwrite an existing checkpoint is never replaced; --resume needs something to resume, of the kind
    asked for, trained with the same model flags (those given again must agree)."""
    check_writable_dir(args.out_dir, "--out_dir")
    files = [(os.path.join(args.out_dir, f), kind) for f, kind in stage_files(args)]
    found = [(path, kind) for path, kind in files if os.path.exists(path)]
    for path, kind in found:
        if args.overwrite:  # replaced whatever it holds, even a file that is no checkpoint
            continue
        if not args.resume:
            held = load_checkpoint(path)
            fail(f"{path} holds a {held['kind']} checkpoint (step {held['step']}); add --resume to continue it, "
                 "--overwrite to replace it, or pick another --out_dir")
        ckpt = load_checkpoint(path, (kind,))
        show = lambda v: f"{v:g}" if isinstance(v, float) else v
        for flag in RESUME_FIXED:
            if flag in args.given and getattr(args, flag) != ckpt["args"].get(flag):
                fail(f"--{flag} {show(getattr(args, flag))} contradicts {path}, trained with "
                     f"{show(ckpt['args'].get(flag))}; drop the flag to resume")
    if args.resume and not found:
        fail(f"--resume: {args.out_dir} holds no {' or '.join(os.path.basename(p) for p, _ in files)} to resume")
    needs_vae = args.model == "cola" and args.stage == "joint" and not found
    if needs_vae and not os.path.exists(os.path.join(args.out_dir, "vae.pt")):
        fail(f"--stage joint starts from {os.path.join(args.out_dir, 'vae.pt')}, which does not exist: "
             "train stage 1 first (--stage vae)")
    for stale in os.listdir(args.out_dir):  # temporary files of killed runs (the lock is ours)
        if stale.endswith(".tmp") and stale.split(".")[0] in ("vae", "ckpt"):
            os.remove(os.path.join(args.out_dir, stale))


def run_stages(args, env):
    """Train what the flags ask for: a baseline, or Cola's stage 1 and/or stage 2. Returns the last Run."""
    if args.dry_run:  # the data's vocabulary if it is prepared, else GPT-2's
        meta = os.path.join(args.data_dir, "meta.json")
        vocab = json.load(open(meta))["vocab_size"] if os.path.exists(meta) else 50257
        if env["master"]:
            print(json.dumps(dry_run(args, vocab)))
        return None
    data = TokenData(args.data_dir, args.seq_len)
    if env["master"]:
        os.makedirs(args.out_dir, exist_ok=True)
    if args.model != "cola":
        runs = [stage_lm]
    else:
        runs = ([stage_vae] if args.stage in ("vae", "all") else []) + ([stage_joint] if args.stage != "vae" else [])
    for make in runs:
        run = make(args, env, data)
        if not train(run, args, env, data):  # --stop_after ended it: the next stage waits for --resume
            break
    return run


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    env = dict(rank=rank, world=world, device=device, master=rank == 0)
    with contextlib.ExitStack() as held:
        try:
            if not args.dry_run:  # the master checks the folder and holds it; every rank learns the verdict
                verdict = [None]
                if env["master"]:
                    try:
                        check_writable_dir(args.out_dir, "--out_dir")
                        held.enter_context(folder_lock(args.out_dir))
                        preflight(args)
                    except SystemExit as e:
                        verdict = [str(e.code)]
                    except CheckpointError as e:
                        verdict = [f"error: {e}"]
                if world > 1:
                    dist.broadcast_object_list(verdict, src=0)
                if verdict[0]:
                    sys.exit(verdict[0])
            run_stages(args, env)
        except (DataError, CheckpointError, TrainingError) as e:
            sys.exit(f"error: {e}")
        finally:
            cleanup_distributed()


if __name__ == "__main__":
    main()
