"""
Data preparation: any UTF-8 text file -> train.bin / val.bin token files + meta.json.

    python prepare.py                                   # the embedded default corpus (Shakespeare)
    python prepare.py --input my.txt --out_dir data/my  # any UTF-8 text file

Tokens are stored as uint16 when the vocabulary fits, else uint32, as nanoGPT does. The GPT-2 BPE
(docs/method.md §2) loads offline from the vendored data/gpt2.tiktoken after a hash check; cl100k_base
(the paper's tokenizer family) is used only where tiktoken can load it (it needs its own download/cache).

TokenData reads the prepared files for training and evaluation: random windows from a memmap, each
batch a pure function of (seed, index, step), so a run's data position is just its step.
"""
import argparse
import base64
import hashlib
import json
import os
import sys

import numpy as np
import torch

REPO_DIR = os.path.dirname(os.path.abspath(__file__))  # default paths of every script start here
DEFAULT_DATA_DIR = os.path.join(REPO_DIR, "data", "shakespeare")
DEFAULT_CORPUS = os.path.join(REPO_DIR, "data", "shakespeare_tiny.txt")
GPT2_BPE_FILE = os.path.join(REPO_DIR, "data", "gpt2.tiktoken")
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = "<|endoftext|>"


class DataError(ValueError):
    """Bad input data; the message is one line meant for the user."""


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ENCODERS = {}


def get_tokenizer(name="gpt2"):
    """A tiktoken Encoding. 'gpt2' is built from the vendored BPE file, so it never touches the network."""
    import tiktoken
    if name in _ENCODERS:
        return _ENCODERS[name]
    if name == "gpt2":
        if not os.path.exists(GPT2_BPE_FILE):
            raise DataError(f"tokenizer file {GPT2_BPE_FILE} is missing")
        if sha256_of(GPT2_BPE_FILE) != GPT2_BPE_SHA256:
            raise DataError(f"tokenizer file {GPT2_BPE_FILE} has the wrong sha256 (corrupted?)")
        from tiktoken_ext.openai_public import r50k_pat_str
        ranks = {}
        with open(GPT2_BPE_FILE, "rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    elif name == "cl100k_base":
        try:
            enc = tiktoken.get_encoding("cl100k_base")
        except Exception as e:  # no network and no cache: say so in one line
            raise DataError(f"tokenizer cl100k_base cannot be loaded here ({type(e).__name__}); "
                            "it needs tiktoken's download or a TIKTOKEN_CACHE_DIR holding it") from None
    else:
        raise DataError(f"unknown tokenizer {name!r} (choose gpt2 or cl100k_base)")
    _ENCODERS[name] = enc
    return enc


def eot_id(enc):
    """The <|endoftext|> id: EOS and pad (docs/method.md §2)."""
    return enc.eot_token


def split_tokens(ids, val_fraction, split="chunks", chunk=2048, min_chunk=64):
    """Train/val split. 'chunks': every k-th chunk of `chunk` tokens is held out, so validation text comes
    from the same works as training text (a single-document corpus split at its tail would hold out
    whole plays, with names never seen in training); 'tail': the last val_fraction of the file (nanoGPT)."""
    n = len(ids)
    if split == "tail":
        n_train = n - int(n * val_fraction)
        return ids[:n_train], ids[n_train:]
    every = max(2, round(1 / val_fraction))
    chunk = max(min_chunk, min(chunk, n // (every * 10)))  # small files still get ~10 validation chunks
    starts = range(0, n, chunk)
    val = np.concatenate([ids[s:s + chunk] for i, s in enumerate(starts) if i % every == every - 1] or [ids[:0]])
    train = np.concatenate([ids[s:s + chunk] for i, s in enumerate(starts) if i % every != every - 1])
    return train, val


def prepare(input_path, out_dir, tokenizer="gpt2", val_fraction=0.1, seq_len=64, split="chunks"):
    """Tokenize input_path into out_dir/{train,val}.bin and meta.json. Returns the meta dict."""
    if not os.path.exists(input_path):
        raise DataError(f"input file {input_path} does not exist")
    with open(input_path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"input file {input_path} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"input file {input_path} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    enc = get_tokenizer(tokenizer)
    ids = enc.encode_ordinary(text)
    n = len(ids)
    # windows are seq_len tokens; each split needs one full window
    if n < seq_len:
        raise DataError(f"input file {input_path} has {n} tokens, fewer than one training sequence ({seq_len})")
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    train_ids, val_ids = split_tokens(np.array(ids, dtype=dtype), val_fraction, split, min_chunk=seq_len)
    n_train, n_val = len(train_ids), len(val_ids)
    if n_val < seq_len:
        raise DataError(f"validation split has {n_val} tokens, fewer than one sequence ({seq_len}); "
                        "use a larger file or --val_fraction")
    if n_train < seq_len:
        raise DataError(f"training split has {n_train} tokens, fewer than one sequence ({seq_len})")
    os.makedirs(out_dir, exist_ok=True)
    for name, part in (("train", train_ids), ("val", val_ids)):
        tmp = os.path.join(out_dir, f"{name}.bin.tmp")
        part.tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, f"{name}.bin"))
    meta = dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, eot_id=eot_id(enc), dtype=np.dtype(dtype).name, split=split,
                train_tokens=int(n_train), val_tokens=int(n_val), source=os.path.abspath(input_path),
                source_sha256=hashlib.sha256(raw).hexdigest())
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    return meta


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise DataError(f"{path} not found: run `python prepare.py` (or --input FILE --out_dir {data_dir}) first")
    with open(path) as f:
        return json.load(f)


class TokenData:
    """Random windows of seq_len tokens from the memmapped train.bin / val.bin of a prepared directory."""

    def __init__(self, data_dir, seq_len):
        self.meta = load_meta(data_dir)
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(data_dir, f"{split}.bin")
            if not os.path.exists(path):
                raise DataError(f"{path} not found: run prepare.py")
            arr = np.memmap(path, dtype=dtype, mode="r")
            if len(arr) < seq_len:
                raise DataError(f"{path} has {len(arr)} tokens, fewer than one sequence ({seq_len}); "
                                "use a smaller --seq_len or more data")
            self.splits[split] = arr
        self.seq_len = seq_len

    def batch(self, split, batch_size, seed, device):
        """(batch_size, seq_len) int64 token windows; the same seed gives the same windows."""
        arr = self.splits[split]
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(arr) - self.seq_len + 1, (batch_size,), generator=g).tolist()
        x = torch.from_numpy(np.stack([arr[s:s + self.seq_len].astype(np.int64) for s in starts]))
        return x.to(device, non_blocking=True)


def batch_seed(base, index, step):
    """Seed of the micro-batch `index` of an optimizer step. Under DDP with accumulation the index is
    rank * grad_accum + micro, so 2 processes x 2 micro-batches read what 1 process x 4 reads."""
    return (base * 1_000_003 + step * 104_729 + index) % (2 ** 63)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_CORPUS, help="UTF-8 text file to tokenize (default: embedded Shakespeare)")
    p.add_argument("--out_dir", default=DEFAULT_DATA_DIR, help="where train.bin/val.bin/meta.json go")
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "cl100k_base"], help="tiktoken encoding")
    p.add_argument("--val_fraction", type=float, default=0.1, help="fraction of tokens held out")
    p.add_argument("--split", default="chunks", choices=["chunks", "tail"],
                   help="chunks: every k-th 2048-token chunk is validation; tail: the end of the file (nanoGPT)")
    p.add_argument("--min_seq_len", type=int, default=64, help="each split must hold at least one sequence this long")
    a = p.parse_args(argv)
    try:
        meta = prepare(a.input, a.out_dir, a.tokenizer, a.val_fraction, a.min_seq_len, a.split)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']}, {meta['dtype']}, {meta['split']} split)")


if __name__ == "__main__":
    main()
