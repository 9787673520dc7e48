"""Reading a prepared data folder (prepare.py writes it): meta.json and every shard checked when opened, TokenData's
random windows from memmaps, each batch a pure function of (seed, index, step)."""
import os
import re

import numpy as np
import torch

from cli import read_json
from tokenizer import REPO_DIR, DataError, get_tokenizer, sha256_of

DEFAULT_DATA_DIR = os.path.join(REPO_DIR, "data", "shakespeare")
SHARD = re.compile(r"(?:train|val)_(\d{5,})\.bin")  # a shard's file name, numbered on from the folder's last one
SHARD_ENDS = 2 ** 16  # meta.json's "ends" of a shard: the sha256 of its first and last SHARD_ENDS bytes (prepare.py)


def load_meta(data_dir):
    """meta.json of a prepared directory, checked for the fields TokenData reads."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise DataError(f"{path} not found: run `python prepare.py` (or --input FILE --out_dir {data_dir}) first")
    try:
        meta = read_json(path)
        assert meta["dtype"] in ("uint16", "uint32") and isinstance(meta["tokenizer"], str)  # what prepare writes
        assert type(meta["vocab_size"]) is type(meta["eot_id"]) is int and 0 <= meta["eot_id"] < meta["vocab_size"]
        for split in ("train", "val"):
            shards = meta["shards"][split]  # a shard is a file of this folder, named as prepare names it
            assert all(isinstance(s["file"], str) and SHARD.fullmatch(s["file"]) and isinstance(s["tokens"], int)
                       for s in shards)
            assert sum(s["tokens"] for s in shards) == meta[f"{split}_tokens"]  # the shards add up to the count
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(f"{path} is not a valid meta.json ({type(e).__name__}); prepare the data again") from None
    return meta


def open_shard(data_dir, shard, dtype, vocab_size):
    """A shard as a memmap, checked against meta.json: its size, every id below the vocabulary, its ends' hash."""
    path = os.path.join(data_dir, shard["file"])
    if not os.path.exists(path):
        raise DataError(f"{path} not found: run prepare.py")
    size, want = os.path.getsize(path), shard["tokens"] * dtype.itemsize
    if size != want or size == 0:
        raise DataError(f"{path} holds {size} bytes, meta.json says {shard['tokens']} tokens ({want} bytes): "
                        "truncated or changed; prepare the data again")
    arr = np.memmap(path, dtype=dtype, mode="r")
    top = max(int(arr[i:i + (1 << 24)].max()) for i in range(0, len(arr), 1 << 24))
    if top >= vocab_size:
        raise DataError(f"{path} holds token id {top}, outside the vocabulary of {vocab_size}")
    if "ends" in shard and shard["ends"] != sha256_of(path, ends=SHARD_ENDS):  # none in folders before 2026-12-08
        raise DataError(f"{path} is not the shard meta.json describes (its contents differ); prepare the data again")
    return arr


class TokenData:
    """Random seq_len windows, never across a shard, from a prepared folder's memmapped shards (checked on opening)."""

    def __init__(self, data_dir, seq_len):
        self.meta, self.data_dir, self.seq_len = load_meta(data_dir), data_dir, seq_len
        self.shards, self.starts, vocab = {}, {}, self.meta["vocab_size"]
        if (n_vocab := get_tokenizer(self.meta["tokenizer"]).n_vocab) != vocab:  # an edited tokenizer or vocab_size
            raise DataError(f"{data_dir}/meta.json: tokenizer {self.meta['tokenizer']} has {n_vocab} ids, not its "
                            f"vocab_size {vocab}; prepare the data again")
        for split in ("train", "val"):
            arrs = [open_shard(data_dir, s, np.dtype(self.meta["dtype"]), vocab) for s in self.meta["shards"][split]]
            counts = [max(0, len(a) - seq_len + 1) for a in arrs]  # window starts per shard
            if sum(counts) == 0:
                raise DataError(f"the {split} split of {data_dir} has no shard of {seq_len} tokens; "
                                "use a smaller --seq_len or more data")
            self.shards[split], self.starts[split] = arrs, np.cumsum(counts)

    def tokens(self, split, limit=None):
        """The first `limit` tokens of a split (all of them by default) as one int64 array."""
        out = []
        for a in self.shards[split]:
            out.append(np.asarray(a[:None if limit is None else max(0, limit - sum(map(len, out)))], dtype=np.int64))
        return np.concatenate(out)

    def batch(self, split, batch_size, seed, device):
        """(batch_size, seq_len) int64 token windows; the same seed gives the same windows."""
        cum = self.starts[split]
        starts = torch.randint(int(cum[-1]), (batch_size,), generator=torch.Generator().manual_seed(seed)).numpy()
        shards = np.searchsorted(cum, starts, side="right")  # the shard holding each window start
        offsets = starts - np.concatenate([[0], cum])[shards]
        rows = [self.shards[split][k][o:o + self.seq_len] for k, o in zip(shards, offsets)]
        return torch.from_numpy(np.stack(rows).astype(np.int64)).to(device, non_blocking=True)


def batch_seed(base, index, step):
    """Seed of the micro-batch `index` of an optimizer step. Under DDP with accumulation the index is
    rank * grad_accum + micro, so 2 processes x 2 micro-batches read what 1 process x 4 reads."""
    return (base * 1_000_003 + step * 104_729 + index) % (2 ** 63)
