"""
Checkpoint files: written atomically, read safely.

A checkpoint is a dict of tensors and plain containers (dict, list, str, int, float, bool, None): the
model configs, the weights, the optimizer, every rank's random state, the step and the run's arguments.
It is read with torch.load(weights_only=True), so opening a downloaded checkpoint cannot run code;
anything that needs pickled Python objects is refused with a one-line error.
"""
import os

import torch

from cli import write_atomic


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def save_checkpoint(path, obj):
    """Write to a temporary file of this process, then rename: a crash never leaves a truncated checkpoint
    behind, an error while writing leaves the previous checkpoint as it was, and two writers never mix."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, lambda f: torch.save(obj, f), mode="wb")


def load_checkpoint(path, kinds=None):
    """The checkpoint dict at `path`; `kinds` (e.g. ("cola",)) lists the model kinds the caller accepts."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "global" in str(e).lower():  # a class or function the safe unpickler will not import
            raise CheckpointError(f"{path} holds pickled Python objects; refusing to load it (a checkpoint may hold "
                                  "only tensors and plain containers)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    if kinds is not None and ckpt["kind"] not in kinds:
        raise CheckpointError(f"{path} holds a '{ckpt['kind']}' model, expected {' or '.join(kinds)}")
    ckpt["path"] = path  # for messages; not saved
    return ckpt


def build(cls, cfg_fields, ckpt):
    """cls(**fields) of a config stored in a checkpoint; fields this code does not know are one line."""
    try:
        return cls(**cfg_fields)
    except TypeError as e:
        raise CheckpointError(f"{ckpt.get('path', 'the checkpoint')}: its {cls.__name__} does not fit this code ({e})") from None


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
