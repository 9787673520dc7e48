"""
Checkpoint files: written atomically, read safely.

A checkpoint is a dict of tensors and plain containers (dict, list, str, int, float, bool, None): the
model configs, the weights, the optimizer, every rank's random state, the step and the run's arguments.
It is read with torch.load(weights_only=True), so opening a downloaded checkpoint cannot run code;
anything that needs pickled Python objects is refused with a one-line error.
"""
import os

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def save_checkpoint(path, obj):
    """Write to a temporary file, then rename: a crash never leaves a truncated checkpoint behind, and an
    error while writing leaves the previous checkpoint as it was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    return ckpt


# ----------------------------------------------------------------------------------------------------
# random state as tensors (numpy's Mersenne Twister state is a tuple holding an array)

def rng_state():
    """This process's random streams: torch CPU, numpy, and CUDA when present."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"torch": torch.get_rng_state(),
         "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                   "gauss": float(gauss)}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
