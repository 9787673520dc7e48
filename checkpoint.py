"""Checkpoint files and training folders: what train.py calls to keep every promise about files. A checkpoint holds
only tensors and plain containers (configs, weights, optimizer, every rank's random state, step, args, a checksum),
is written atomically and read with torch.load(weights_only=True), so opening one cannot run code. A training
folder is claimed before any work (claim_out_dir); load_model reads a checkpoint or a released snapshot."""
import argparse
import contextlib
import hashlib
import math
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from cli import (CheckpointError, check_memory, check_writable_dir, fail, folder_lock, json_loads, one_rank,
                 stop_signals, write_atomic)
from tokenizer import DataError, get_tokenizer, same_tokenizer


def digest(obj):
    """'sha256:' + a sha256 over all a checkpoint holds but its checksum: every key, plain value and type, every
    tensor's dtype, shape and bytes. Each container is walked once (linear time); a list or dict met twice (shared,
    or in itself) is refused."""
    h, seen = hashlib.sha256(), {}  # id -> order of its first visit; None while it is walked
    add = lambda text: h.update(text.encode())

    def walk(o):
        if torch.is_tensor(o):
            add(f"tensor {o.dtype} {tuple(o.shape)}")
            return h.update(o.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        if not isinstance(o, (dict, list, tuple)):
            return add(f"{type(o).__name__} {o!r}")
        if id(o) in seen:  # only a tuple may be shared (the optimizer's betas are): hashed as a reference
            if seen[id(o)] is None or not isinstance(o, tuple):
                raise CheckpointError("holds a list or dict in two places or inside itself: not a checkpoint")
            return add(f"ref {seen[id(o)]}")
        seen[id(o)] = None
        keys = sorted((k for k in o if k != "checksum"), key=repr) if isinstance(o, dict) else range(len(o))
        add(f"{type(o).__name__} {[*keys] if isinstance(o, dict) else len(o)!r}")
        order = len(seen)  # counted before its contents'
        for k in keys:
            walk(o[k])
        seen[id(o)] = order
    try:
        walk(obj)
    except RecursionError:
        raise CheckpointError("is nested too deeply to read") from None
    return "sha256:" + h.hexdigest()


def save_checkpoint(path, obj):
    """Write atomically (a crash or a full disk keeps the last checkpoint; two writers never mix), with a checksum
    load_checkpoint checks; Ctrl-C, SIGTERM, SIGHUP wait for the whole file (torch's zip writer, interrupted, fails)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    main, interrupted = threading.current_thread() is threading.main_thread(), []
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what stops a run as Ctrl-C does (cli.stop_signals)
    previous = {s: signal.signal(s, lambda *_: interrupted.append(1)) for s in stops} if main else {}
    try:
        write_atomic(path, lambda f: torch.save({**obj, "checksum": digest(obj)}, f), mode="wb")
    except (OSError, RuntimeError) as e:  # a full disk: OSError, or torch's zip writer failing after it
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:80]
        left = "the previous checkpoint is kept" if os.path.exists(path) else "nothing was saved"
        raise CheckpointError(f"cannot write {path} ({why}); {left}") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if interrupted:
        raise KeyboardInterrupt


def save_training_state(path, state, world=1, master=True, name="run"):
    """The state plus every rank's random state (a resume continues every stream), written by the master while every
    rank waits (the next stage reads it); weights not finite stop the run (halted)."""
    if not all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()):
        raise halted(name, path, f"the weights hold NaN or Inf at step {state['step']}; not saved")
    states = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    if master:
        save_checkpoint(path, {**state, "rng": states})
    if world > 1:
        dist.barrier()


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the message is one line meant for the user."""


def halted(name, path, what):
    """The one-line TrainingError of run `name` stopping: what happened, and what its checkpoint file `path` holds."""
    held = f"{path} keeps the last good checkpoint" if os.path.exists(path) else f"no checkpoint was written to {path}"
    return TrainingError(f"[{name}] {what}, {held} (try a lower --lr)")


def load_checkpoint(path, kinds=None):
    """The checkpoint dict at `path`; `kinds` (e.g. ("cola",)) lists the model kinds the caller accepts."""
    if not os.path.exists(path):
        stage1 = os.path.join(os.path.dirname(path), "vae.pt")
        hint = f"; {stage1} is a stage-1 VAE: run `python train.py --stage joint`" if os.path.exists(stage1) else ""
        raise CheckpointError(f"checkpoint {path} not found{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "global" in str(e).lower():  # a class or function the safe unpickler will not import
            raise CheckpointError(f"{path} holds pickled Python objects; refusing to load it (a checkpoint may hold "
                                  "only tensors and plain containers)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    if not (isinstance(ckpt.get("checksum"), str) and ckpt["checksum"].startswith("sha256:")):
        raise CheckpointError(f"{path} has no checksum (sha256:): not a checkpoint this project wrote since 2026-12-08")
    try:
        same = ckpt["checksum"] == digest(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{path} {e}") from None
    except ValueError:  # an int too long to print
        same = False
    if not same:
        raise CheckpointError(f"{path} is corrupt: its contents do not match their checksum")
    if not isinstance(ckpt.get("step", 0), int) or ckpt.get("step", 0) < 0:
        raise CheckpointError(f"{path} has step {ckpt['step']!r}, not a step count")
    if kinds is not None and ckpt["kind"] not in kinds:
        raise CheckpointError(f"{path} holds a '{ckpt['kind']}' model, expected {' or '.join(kinds)}")
    ckpt["path"] = path  # for messages; not saved
    return ckpt


def build(cls, cfg_fields, ckpt):
    """cls(**fields) of a config stored in a checkpoint; a value of a wrong type or out of range is one line."""
    import dataclasses
    where = f"{ckpt.get('path', 'the checkpoint')}: its {cls.__name__}"
    if not isinstance(cfg_fields, dict):
        raise CheckpointError(f"{where} is not a dict")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for k, v in cfg_fields.items():
        want = defaults.get(k)
        ok = (k not in defaults or type(v) is type(want) or (isinstance(want, float) and type(v) is int)
              or (isinstance(want, tuple) and isinstance(v, list)))
        if ok and type(v) in (int, float):
            ok = math.isfinite(v) and (0 if want == 0 or isinstance(want, float) and want <= 0 else 1) <= v < 10**8 \
                if type(want) is int else math.isfinite(v)
        if not ok:
            raise CheckpointError(f"{where} has {k} = {v!r}, which this code cannot build")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_fields.items()})
    except TypeError as e:
        raise CheckpointError(f"{where} does not fit this code ({e})") from None


def load_weights(model, state, ckpt):
    """model.load_state_dict(state), refusing in one line weights that do not fit the config or are not finite."""
    path = ckpt.get("path", "the checkpoint")
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or Inf")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{path}: its weights do not fit its config ({(lines[1:] or lines)[0]})") from None


# random state (training draws from torch's generators only)
def rng_state():
    """This process's random streams: torch CPU, and CUDA when present."""
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), **cuda}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def resume_training(ckpt, opt, log_path, seed, env):
    """Resume: the optimizer, this rank's random stream (reseeded if the world size changed), the log cut -> step."""
    opt.load_state_dict(ckpt["optimizer"])
    step, states = ckpt["step"], ckpt["rng"]
    same_world = len(states) == env["world"]
    set_rng_state(states[env["rank"]]) if same_world else torch.manual_seed(seed + env["rank"] * 1000 + step)
    if env["master"]:
        print(f"[resume] at step {step} of {ckpt['path']}" + ("" if same_world else
              f"; warning: saved by {len(states)} processes, so the random streams are reseeded"), flush=True)
        trim_log(log_path, step)
    return step


# models from checkpoints
def weight_bytes(cfg):
    """fp32 bytes of a config's weights, an upper estimate from its sizes alone (blocks, embeddings and heads)."""
    get = lambda *names: sum(getattr(cfg, n, 0) for n in names)
    w, blocks = cfg.width, get("n_layers", "n_enc_layers", "n_dec_layers")
    return 4 * (blocks * (10 * w * w + 3 * w * (get("mlp_hidden") or 4 * w)) + 2 * w * (get("vocab_size") + 1)
                + w * get("latent_dim", "freq_dim", "max_seq_len"))


def model_from(ckpt):
    """The model a checkpoint dict holds (VAE, Cola DLM or a baseline) with its weights; misfits: CheckpointError."""
    from baselines import LMConfig, TransformerLM
    from diffusion import ColaDLM
    from dit import DiTConfig
    from vae import TextVAE, VAEConfig
    kind, where = ckpt["kind"], ckpt.get("path", "the checkpoint")
    names = {"ar": ["lm"], "llada": ["lm"], "vae": ["vae"]}.get(kind, ["vae", "dit"])
    cfgs = [build({"lm": LMConfig, "vae": VAEConfig, "dit": DiTConfig}[n], ckpt[f"{n}_config"], ckpt) for n in names]
    check_memory(sum(map(weight_bytes, cfgs)), "cpu", f"{where}: the weights its configs ask for")  # before building
    if len(cfgs) > 1 and (cfgs[0].latent_dim != cfgs[1].latent_dim or cfgs[1].block_size % cfgs[0].block_size):
        raise CheckpointError(f"{ckpt.get('path')}: its VAE and DiT configs do not fit together")
    model = {"ar": TransformerLM, "llada": TransformerLM, "vae": TextVAE}.get(kind, ColaDLM)(*cfgs)
    load_weights(model, ckpt["model"], ckpt)
    return model


def load_model(path, device="cpu", kinds=("cola", "ar", "llada"), dtype=torch.float32):
    """(model in eval mode on device, checkpoint dict) of this repo's checkpoint file (fp32, as trained) or the
    authors' released snapshot directory (release.load_snapshot, in `dtype`)."""
    if os.path.isdir(path):
        if "cola" not in kinds:
            raise CheckpointError(f"{path} is a released Cola DLM snapshot, expected {' or '.join(kinds)}")
        import release
        model, info = release.load_snapshot(path, dtype)
        return model.to(device), info
    model = model_from(ckpt := load_checkpoint(path, kinds))
    vocab = (model.vae.cfg if ckpt["kind"] == "cola" else model.cfg).vocab_size
    with contextlib.suppress(DataError):  # a tokenizer not on this machine: the script that needs it refuses
        if get_tokenizer(ckpt["tokenizer"]).n_vocab > vocab:
            raise CheckpointError(f"{path} names tokenizer {ckpt['tokenizer']}, of more ids than the model's {vocab}: "
                                  "not the tokenizer it was trained with")
    return model.to(device).eval(), ckpt


def prompt_ids(info, enc, text):
    """A prompt's token ids: plain BPE for this repo's models, the release's template for a snapshot."""
    import release
    return release.encode_prompt(info, enc, text) if info.get("release") else enc.encode_ordinary(text)


def release_sampler(info):
    """release.release_generate for a released snapshot (its budget and semantics), None for this repo's models."""
    import release
    return release.release_generate if info.get("release") else None


def stored_sampler(info, eot_id, **flags):
    """The decoder.SamplerConfig a checkpoint stores (default: <|endoftext|> stops and pads), with flags not None."""
    from decoder import SamplerConfig
    stored = {"stop_ids": (eot_id,), **(info.get("sampler") or dict(pad_id=eot_id))}  # build: a list as a tuple
    return build(SamplerConfig, {**stored, **{k: v for k, v in flags.items() if v is not None}}, info)


# a training folder, claimed before any work
# flags a resumed run cannot change: the model, the data windows, and which parameters the optimizer holds
RESUME_FIXED = ("model", "preset", "latent_dim", "block_size", "patch_size", "vae_width", "vae_layers", "vae_heads",
                "vae_mlp", "dit_width", "dit_layers", "dit_heads", "dit_mlp", "rope_fraction", "lm_width", "lm_layers",
                "fixed_logsnr", "dit_init", "vae_lr_ratio", "seq_len", "dropout", "seed", "batch_size", "grad_accum",
                "fm_batch_mult")
# flags that say how to run this invocation, never restored from the checkpoint
RUN_ONLY = ("resume", "overwrite", "dry_run", "stop_after", "device", "out_dir", "given")


def stage_files(args):
    """[(checkpoint path, kind)] this invocation writes, in order."""
    kinds = [args.model] if args.model != "cola" else {"vae": ["vae"], "all": ["vae", "cola"]}.get(args.stage, ["cola"])
    return [(os.path.join(args.out_dir, "vae.pt" if kind == "vae" else "ckpt.pt"), kind) for kind in kinds]


def stage_log(kind):
    """The log file of the stage that writes a checkpoint of `kind` (train.py's Run names: vae, joint, ar, llada)."""
    return f"log_{ {'cola': 'joint'}.get(kind, kind)}.jsonl"


def restore_run_flags(args, ckpt):
    """--resume: flags not given again take the saved values; one that would change the model or data is refused."""
    show = lambda v: f"{v:g}" if isinstance(v, float) else v
    saved, given = ckpt["args"], set(args.given)
    for flag in RESUME_FIXED:
        if flag in given and flag in saved and getattr(args, flag) != saved[flag]:
            fail(f"--{flag} {show(getattr(args, flag))} contradicts {ckpt['path']}, trained with "
                 f"{show(saved[flag])}; drop the flag to resume")
    for flag, value in saved.items():
        if flag not in given and flag not in RUN_ONLY and hasattr(args, flag):
            setattr(args, flag, value)


def check_out_dir(args):
    """Before any work: an existing checkpoint is never replaced without --resume or --overwrite; --resume needs one."""
    files = stage_files(args)
    found = [(path, kind) for path, kind in files if os.path.exists(path)]
    if args.resume and not found:
        fail(f"--resume: {args.out_dir} holds no {' or '.join(os.path.basename(p) for p, _ in files)} to resume")
    for path, kind in found:
        if args.resume:
            restore_run_flags(args, ckpt := load_checkpoint(path, (kind,)))
            flag = "vae_iters" if kind == "vae" else "main_iters"
            if flag in args.given and (path, kind) == files[-1] and getattr(args, flag) <= ckpt["step"]:
                fail(f"--{flag} {getattr(args, flag)} is not above the step of {path} ({ckpt['step']}): "
                     "nothing left to train; give more steps")
        elif not args.overwrite:
            held = load_checkpoint(path)
            fail(f"{path} holds a {held['kind']} checkpoint (step {held['step']}); add --resume to continue it, "
                 "--overwrite to replace it, or pick another --out_dir")
    sizes = [argparse.Namespace(width=getattr(args, f"{n}_width"), mlp_hidden=getattr(args, f"{n}_mlp"),
                                n_layers=getattr(args, f"{n}_layers") * (1 + (n == "vae"))) for n in ("vae", "dit")]
    check_memory(sum(map(weight_bytes, sizes)), "cpu", "the weights these flags ask for")  # before anything is built
    vae = os.path.join(args.out_dir, "vae.pt")
    if args.model == "cola" and args.stage == "joint" and not found and not os.path.exists(vae):
        fail(f"--stage joint starts from {vae}, which does not exist: train stage 1 first (--stage vae)")
    stale = [n for n in os.listdir(args.out_dir) if n.endswith(".tmp") and n.startswith(("vae.", "ckpt."))]
    # killed saves' temporary files, and the log of each stage that starts afresh: nothing else is removed
    stale += [stage_log(kind) for path, kind in files if not (args.resume and os.path.exists(path))]
    for path in (os.path.join(args.out_dir, n) for n in stale):
        os.remove(path) if os.path.isfile(path) else None
    for path, kind in found if args.resume else []:  # a log the run cannot append to: one line now, not at its end
        log = os.path.join(args.out_dir, stage_log(kind))
        try:
            open(log, "a").close()
        except OSError as e:
            fail(f"cannot append to {log} ({e.strerror}); move it away to resume")


@contextlib.contextmanager
def claim_out_dir(args, world=1, master=True, check_args=lambda args: None):
    """train.py's first call: the master checks the folder and the flags; every rank gets its verdict or the flags."""
    verdict = [None, vars(args)]
    with contextlib.ExitStack() as held:
        held.enter_context(stop_signals())  # SIGTERM and SIGHUP stop the run as Ctrl-C does
        if master:
            try:
                check_writable_dir(args.out_dir, "--out_dir")
                held.enter_context(folder_lock(args.out_dir))
                check_out_dir(args)
                check_args(args)
            except SystemExit as e:
                verdict[0] = str(e.code)
            except CheckpointError as e:
                verdict[0] = f"error: {e}"
        if world > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            sys.exit(one_rank(verdict[0]))
        yield argparse.Namespace(**verdict[1])


def checkpoint_for(path, kind, data):
    """A checkpoint to build on, trained on data of the same tokenizer as --data_dir's."""
    ckpt = load_checkpoint(path, (kind,))
    if not same_tokenizer(ckpt.get("tokenizer", ""), data.meta["tokenizer"]):
        raise DataError(f"{data.data_dir} is tokenized with {data.meta['tokenizer']}, {path} was trained on "
                        f"{ckpt.get('tokenizer')}; pass the run's own --data_dir")
    return ckpt


def resumable(path, kind, args, data):
    """The checkpoint to continue (trained on this very text, by its hash), or None for a fresh run."""
    ckpt = checkpoint_for(path, kind, data) if args.resume and os.path.exists(path) else None
    if ckpt and ckpt.get("data_sha256") not in (None, data.meta.get("source_sha256")):
        raise DataError(f"{data.data_dir} holds other text than {path} was trained on (its source_sha256 differs); "
                        "pass the run's own --data_dir, prepared from its own text")
    return ckpt


def log_row(line):
    """A training log line as a dict with a numeric step, else None (a run killed mid-write leaves a torn line)."""
    try:
        row = json_loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) else None


def trim_log(path, step):
    """Drop torn log lines and those after `step`: a run killed between a log line and its checkpoint repeats them."""
    if os.path.exists(path):
        lines = [ln for ln in open(path, encoding="utf-8", errors="replace")
                 if (row := log_row(ln)) and row["step"] <= step]
        write_atomic(path, lambda f: f.writelines(lines))
