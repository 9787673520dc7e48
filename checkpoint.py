"""
Checkpoint files and training folders: what train.py calls to keep every promise about files. A checkpoint holds
only tensors and plain containers (configs, weights, optimizer, every rank's random state, step, args, a checksum),
is written atomically and read with torch.load(weights_only=True), so opening one cannot run code. A training
folder is claimed before any work (claim_out_dir); load_model reads a checkpoint or a released snapshot.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import sys

import torch

from cli import check_writable_dir, fail, folder_lock, write_atomic
from tokenizer import DataError, get_tokenizer, same_tokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def tensor_digest(obj):
    """sha256 over every tensor in a checkpoint (in key order): one flipped bit in a weight changes it."""
    h = hashlib.sha256()

    def walk(o):
        if torch.is_tensor(o):
            h.update(o.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                if k != "checksum":
                    walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    walk(obj)
    return h.hexdigest()


def save_checkpoint(path, obj):
    """Write to a temporary file of this process, then rename: a crash never leaves a truncated checkpoint
    behind, an error while writing (a full disk) leaves the previous checkpoint as it was, and two writers never
    mix. The checkpoint carries a checksum of its tensors, checked on load."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        write_atomic(path, lambda f: torch.save({**obj, "checksum": tensor_digest(obj)}, f), mode="wb")
    except (OSError, RuntimeError) as e:  # a full disk: OSError, or torch's zip writer failing after it
        raise CheckpointError(f"cannot write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0][:80]}); "
                              f"{'the previous checkpoint is kept' if os.path.exists(path) else 'nothing was saved'}") from None


def save_training_state(path, state, world=1, master=True, if_not_finite="the weights hold NaN or Inf"):
    """A training checkpoint: the state plus every rank's random state (gathered, so that a resume continues every
    stream), written by the master; every rank waits for it (the next stage reads the file on every rank). Weights
    that are not finite (the same on every rank) are not saved: a TrainingError of `if_not_finite`."""
    if not all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()):
        raise TrainingError(f"{if_not_finite}; not saved, {kept(path)} (try a lower --lr)")
    states = [rng_state()] * world
    if world > 1:
        import torch.distributed as dist
        dist.all_gather_object(states, rng_state())
    if master:
        save_checkpoint(path, {**state, "rng": states})
    if world > 1:
        dist.barrier()


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the message is one line meant for the user."""


def kept(path):
    return f"{path} keeps the last good checkpoint" if os.path.exists(path) else f"no checkpoint was written to {path}"


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
    if "checksum" in ckpt and ckpt["checksum"] != tensor_digest(ckpt):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match their checksum")
    if kinds is not None and ckpt["kind"] not in kinds:
        raise CheckpointError(f"{path} holds a '{ckpt['kind']}' model, expected {' or '.join(kinds)}")
    ckpt["path"] = path  # for messages; not saved
    return ckpt


def build(cls, cfg_fields, ckpt):
    """cls(**fields) of a config stored in a checkpoint. Fields this code does not know, or values of the wrong
    type or out of range (a hand-edited 64.0, 0, 1e12, null or "abc") are one line."""
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
        raise CheckpointError(f"{path}: its weights do not fit its config ({lines[1] if len(lines) > 1 else lines[0]})") from None


# ----------------------------------------------------------------------------------------------------
# random state (training draws from torch's generators only)

def rng_state():
    """This process's random streams: torch CPU, and CUDA when present."""
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def resume_training(ckpt, opt, log_path, seed, env):
    """Continue a run from its checkpoint: the optimizer, this rank's random stream (reseeded, with a warning,
    when the world size changed), the log cut at the step -> the step."""
    opt.load_state_dict(ckpt["optimizer"])
    step, states = ckpt["step"], ckpt["rng"]
    same_world = len(states) == env["world"]
    set_rng_state(states[env["rank"]]) if same_world else torch.manual_seed(seed + env["rank"] * 1000 + step)
    if env["master"]:
        print(f"[resume] at step {step} of {ckpt['path']}" + ("" if same_world else
              f"; warning: saved by {len(states)} processes, so the random streams are reseeded"), flush=True)
        trim_log(log_path, step)
    return step


# ----------------------------------------------------------------------------------------------------
# models from checkpoints

def model_from(ckpt):
    """The model a checkpoint dict holds (a stage-1 VAE, Cola DLM or a baseline), built from its configs, with its
    weights; configs or weights that do not fit this code are a one-line CheckpointError."""
    from baselines import LMConfig, TransformerLM
    from diffusion import ColaDLM
    from dit import DiTConfig
    from vae import TextVAE, VAEConfig
    if ckpt["kind"] in ("ar", "llada"):
        model = TransformerLM(build(LMConfig, ckpt["lm_config"], ckpt))
    elif ckpt["kind"] == "vae":
        model = TextVAE(build(VAEConfig, ckpt["vae_config"], ckpt))
    else:
        vae_cfg, dit_cfg = build(VAEConfig, ckpt["vae_config"], ckpt), build(DiTConfig, ckpt["dit_config"], ckpt)
        if vae_cfg.latent_dim != dit_cfg.latent_dim or dit_cfg.block_size % vae_cfg.block_size:
            raise CheckpointError(f"{ckpt.get('path')}: its VAE and DiT configs do not fit together")
        model = ColaDLM(vae_cfg, dit_cfg)
    load_weights(model, ckpt["model"], ckpt)
    return model


def load_model(path, device="cpu", kinds=("cola", "ar", "llada"), dtype=torch.float32):
    """A model from this repo's checkpoint file, or from the authors' released snapshot directory
    (release.load_snapshot) -> (model in eval mode on device, the checkpoint dict: what the scripts read).
    dtype: the weights' dtype (a snapshot's; this repo's checkpoints load as they were trained, in fp32)."""
    if os.path.isdir(path):
        if "cola" not in kinds:
            raise CheckpointError(f"{path} is a released Cola DLM snapshot, expected {' or '.join(kinds)}")
        import release
        model, info = release.load_snapshot(path, dtype)
        return model.to(device), info
    ckpt = load_checkpoint(path, kinds)
    model = model_from(ckpt)
    vocab = (model.vae.cfg if ckpt["kind"] == "cola" else model.cfg).vocab_size
    try:
        n_vocab = get_tokenizer(ckpt["tokenizer"]).n_vocab
    except DataError:  # a tokenizer not on this machine: the script that needs it refuses
        n_vocab = 0
    if n_vocab > vocab:
        raise CheckpointError(f"{path} names tokenizer {ckpt['tokenizer']}, of more ids than the model's {vocab}: not "
                              "the tokenizer it was trained with")
    return model.to(device).eval(), ckpt


def prompt_ids(info, enc, text):
    """A prompt's token ids: plain BPE for this repo's models, the release's template for a snapshot."""
    if not info.get("release"):
        return enc.encode_ordinary(text)
    import release
    return release.encode_prompt(info, enc, text)


def release_sampler(info):
    """release.release_generate for a released snapshot (its budget and semantics), None for this repo's models."""
    if not info.get("release"):
        return None
    import release
    return release.release_generate


def stored_sampler(info, eot_id, **flags):
    """The sampler a checkpoint stores (decoder.SamplerConfig; <|endoftext|> ends rows and pads prompts where it
    stores none), with the flags given that are not None."""
    from decoder import SamplerConfig
    stored = dict(info.get("sampler") or dict(stop_ids=(eot_id,), pad_id=eot_id))
    stored["stop_ids"] = tuple(stored.get("stop_ids", (eot_id,)))
    return build(SamplerConfig, {**stored, **{k: v for k, v in flags.items() if v is not None}}, info)


# ----------------------------------------------------------------------------------------------------
# a training folder, claimed before any work

# flags a resumed run cannot change: the model, the data windows, and which parameters the optimizer holds
RESUME_FIXED = ("model", "preset", "latent_dim", "block_size", "patch_size", "vae_width", "vae_layers", "vae_heads",
                "vae_mlp", "dit_width", "dit_layers", "dit_heads", "dit_mlp", "rope_fraction", "lm_width", "lm_layers",
                "fixed_logsnr", "dit_init", "vae_lr_ratio", "seq_len")
# flags that say how to run this invocation, never restored from the checkpoint
RUN_ONLY = ("resume", "overwrite", "dry_run", "stop_after", "device", "compile", "out_dir", "given")


def stage_files(args):
    """[(checkpoint path, kind)] this invocation writes, in order."""
    if args.model != "cola":
        return [(os.path.join(args.out_dir, "ckpt.pt"), args.model)]
    return ([(os.path.join(args.out_dir, "vae.pt"), "vae")] if args.stage in ("vae", "all") else []) + \
        ([(os.path.join(args.out_dir, "ckpt.pt"), "cola")] if args.stage != "vae" else [])


def restore_run_flags(args, ckpt):
    """--resume: every flag not given again takes the run's own value from its checkpoint; a given flag that
    would change the model or its data is a one-line refusal."""
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
    """Before any work: what the folder holds fits the flags. Without --resume or --overwrite an existing
    checkpoint is never replaced; --resume needs something to resume, of the kind asked for."""
    files = stage_files(args)
    found = [(path, kind) for path, kind in files if os.path.exists(path)]
    if args.resume and not found:
        fail(f"--resume: {args.out_dir} holds no {' or '.join(os.path.basename(p) for p, _ in files)} to resume")
    for path, kind in found:
        if args.resume:
            restore_run_flags(args, load_checkpoint(path, (kind,)))
        elif not args.overwrite:
            held = load_checkpoint(path)
            fail(f"{path} holds a {held['kind']} checkpoint (step {held['step']}); add --resume to continue it, "
                 "--overwrite to replace it, or pick another --out_dir")
    if args.model == "cola" and args.stage == "joint" and not found and \
            not os.path.exists(os.path.join(args.out_dir, "vae.pt")):
        fail(f"--stage joint starts from {os.path.join(args.out_dir, 'vae.pt')}, which does not exist: "
             "train stage 1 first (--stage vae)")
    for name in os.listdir(args.out_dir):
        if name.endswith(".tmp") and name.split(".")[0] in ("vae", "ckpt"):  # temporary files of killed runs
            os.remove(os.path.join(args.out_dir, name))
        if name.startswith("log_") and not args.resume:  # a fresh or --overwrite run starts new logs
            os.remove(os.path.join(args.out_dir, name))


@contextlib.contextmanager
def claim_out_dir(args, world=1, master=True, check_args=lambda args: None):
    """The one call train.py makes before any work. The master checks the folder is writable, holds its lock for
    the run, checks what it holds (check_out_dir), restores a resumed run's flags and runs check_args; every rank
    gets the verdict (one line) or the flags to train with."""
    verdict = [None, vars(args)]
    with contextlib.ExitStack() as held:
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
            import torch.distributed as dist
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            sys.exit(verdict[0])
        yield argparse.Namespace(**verdict[1])


def checkpoint_for(path, kind, data):
    """A checkpoint to build on, trained on data of the same tokenizer as --data_dir's."""
    ckpt = load_checkpoint(path, (kind,))
    if not same_tokenizer(ckpt.get("tokenizer", ""), data.meta["tokenizer"]):
        raise DataError(f"{data.data_dir} is tokenized with {data.meta['tokenizer']}, {path} was trained on "
                        f"{ckpt.get('tokenizer')}; pass the run's own --data_dir")
    return ckpt


def resumable(path, kind, args, data):
    """The checkpoint to continue, or None for a fresh run."""
    return checkpoint_for(path, kind, data) if args.resume and os.path.exists(path) else None


def trim_log(path, step):
    """Drop the log lines after `step`: a run killed between its log line and its checkpoint repeats those steps."""
    if os.path.exists(path):
        lines = []
        for ln in open(path, encoding="utf-8", errors="replace"):
            try:
                lines += [ln] if json.loads(ln)["step"] <= step else []
            except (ValueError, KeyError, TypeError):
                pass  # a line torn by a kill
        write_atomic(path, lambda f: f.writelines(lines))
