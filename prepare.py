"""
Data preparation: UTF-8 text -> token shards (train_00000.bin, ..., val_00000.bin, ...) + meta.json.

    python prepare.py                                         # the embedded default corpus (Shakespeare)
    python prepare.py --input my.txt --out_dir data/my        # one UTF-8 text file
    python prepare.py --input corpus/ --out_dir data/c        # a folder of .txt files (one document each)
    python prepare.py --input docs.jsonl --out_dir data/d     # JSONL, one document per line in a "text" field

The input is streamed: it is read in blocks of at most --block_bytes, cut where the BPE cannot straddle
the cut (before a line that starts with a non-space), tokenized by --workers processes, and written in
shards of at most --shard_tokens tokens, so memory stays bounded whatever the corpus size. Documents are
separated by <|endoftext|>.

Tokens are stored as uint16 when the vocabulary fits, else uint32, as nanoGPT does. The GPT-2 BPE
(docs/method.md §2) loads offline from the vendored data/gpt2.tiktoken after a hash check; cl100k_base
(the paper's tokenizer family) is used only where tiktoken can load it (it needs its own download/cache);
a released model's tokenizer.json works too (tokenizer.py).

TokenData reads the prepared shards for training and evaluation: random windows from memmaps, each
batch a pure function of (seed, index, step), so a run's data position is just its step.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import re
import sys

import numpy as np
import torch
from tqdm import tqdm

from cli import Parser, check_writable_dir, write_json
from tokenizer import DataError, eot_id, get_tokenizer

REPO_DIR = os.path.dirname(os.path.abspath(__file__))  # default paths of every script start here
DEFAULT_DATA_DIR = os.path.join(REPO_DIR, "data", "shakespeare")
DEFAULT_CORPUS = os.path.join(REPO_DIR, "data", "shakespeare_tiny.txt")

def split_tokens(ids, val_fraction, split="chunks", chunk=2048, min_chunk=64):
    """Train/val split. 'chunks': every k-th chunk of `chunk` tokens is held out, so validation text comes
    from the same works as training text (a single-document corpus split at its tail would hold out
    whole plays, with names never seen in training); 'tail': the last val_fraction of the file (nanoGPT)."""
    n = len(ids)
    if split == "tail":
        n_train = n - int(n * val_fraction)
        return ids[:n_train], ids[n_train:]
    every = max(2, round(1 / val_fraction))
    chunk = max(min_chunk, chunk)
    starts = range(0, n, chunk)
    val = np.concatenate([ids[s:s + chunk] for i, s in enumerate(starts) if i % every == every - 1] or [ids[:0]])
    train = np.concatenate([ids[s:s + chunk] for i, s in enumerate(starts) if i % every != every - 1])
    return train, val


# ----------------------------------------------------------------------------------------------------
# streaming: sources -> text pieces -> tokens -> train / val shards

def list_sources(path):
    """[(file, 'text' | 'jsonl')]: one text file, a JSONL file, or every .txt file under a folder."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(".txt"))
        if not files:
            raise DataError(f"folder {path} holds no .txt file")
        return [(f, "text") for f in files]
    if not os.path.exists(path):
        raise DataError(f"input file {path} does not exist")
    return [(path, "jsonl" if path.endswith((".jsonl", ".json")) else "text")]


def check_sources(sources):
    """Every input file can be opened (a folder may hold a broken link or a file we may not read)."""
    for f, _ in sources:
        if not os.path.isfile(f) or not os.access(f, os.R_OK):
            raise DataError(f"input {f} is not a readable file (a broken link?)")
    return sources


# Places where the GPT-2 pre-tokenizer always starts a new piece, so the BPE of two texts cut there equals
# the BPE of the whole: after a lone newline (a non-space before it, a non-space after it); else between a
# non-space and " " + a letter. (Not after "\n\n": cut there, the two newlines would become one piece.)
_CUTS = re.compile(r"(?<=\S\n)(?=\S)"), re.compile(r"(?<=\S)(?= [A-Za-z])")


def last_cut(text, lo=0):
    """Position of the last safe cut in text[lo:] (None if there is none)."""
    for pattern in _CUTS:
        cut = None
        for m in pattern.finditer(text, lo):
            cut = m.start()
        if cut:
            return cut
    return None


def split_document(text, block_chars):
    """A long document in pieces of about block_chars, cut only where the BPE is unaffected."""
    while len(text) > block_chars:
        cut = last_cut(text[:block_chars], block_chars // 2) or last_cut(text[:block_chars])
        if not cut:
            break
        yield text[:cut]
        text = text[cut:]
    yield text


def read_pieces(sources, block_bytes, hasher):
    """Yield (text, starts_a_later_document, input bytes read so far); no more than about 2 x block_bytes of
    text is held at a time, unless a document has no safe cut at all."""
    done, first = 0, True
    for path, kind in sources:
        with open(path, "rb") as f:
            if kind == "jsonl":
                for n, line in enumerate(f, 1):
                    hasher.update(line)
                    done += len(line)
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line.decode("utf-8"))["text"]
                        assert isinstance(text, str)
                    except (ValueError, KeyError, TypeError, AssertionError):
                        raise DataError(f"{path}:{n}: each line must be a JSON object with a string 'text'") from None
                    for i, piece in enumerate(split_document(text, block_bytes)):
                        yield piece, i == 0 and not first, done
                        first = False
                continue
            text, undecoded, at, new_doc = "", b"", 0, not first  # at: the file offset of undecoded[0]
            first = False
            while True:
                raw = f.read(block_bytes)
                hasher.update(raw)
                done += len(raw)
                data = undecoded + raw
                try:
                    text += data.decode("utf-8")
                    undecoded, at = b"", at + len(data)
                except UnicodeDecodeError as e:  # a character split by the read waits for the next one
                    if not raw or e.reason != "unexpected end of data":
                        raise DataError(f"input file {path} is not UTF-8 text (bad byte at offset {at + e.start})") from None
                    text += data[:e.start].decode("utf-8")
                    undecoded, at = data[e.start:], at + e.start
                cut = last_cut(text, len(text) // 2) if raw else len(text)
                if cut:
                    yield text[:cut], new_doc, done
                    text, new_doc = text[cut:], False
                if not raw:
                    break


_WORKER_ENC = None


def _init_worker(tokenizer):
    global _WORKER_ENC
    _WORKER_ENC = get_tokenizer(tokenizer)


def _encode(item):
    text, new_document, done = item
    ids = _WORKER_ENC.encode_ordinary(text)
    return ([_WORKER_ENC.eot_token] + ids if new_document else ids), done, bool(text.strip())


class ShardWriter:
    """Tokens of one split, appended in order, written as shards of at most shard_tokens tokens."""

    def __init__(self, out_dir, split, dtype, shard_tokens):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards, self.file = [], None

    def write(self, ids):
        ids = np.asarray(ids, dtype=self.dtype)
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                self.shards.append({"file": f"{self.split}_{len(self.shards):05d}.bin", "tokens": 0})
                self.file = open(os.path.join(self.out_dir, self.shards[-1]["file"] + ".tmp"), "wb")
            take = ids[:self.shard_tokens - self.shards[-1]["tokens"]]
            self.file.write(take.tobytes())
            self.shards[-1]["tokens"] += len(take)
            ids = ids[len(take):]

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def discard(self):
        """Remove this split's unfinished shards (a failed run leaves no .tmp behind)."""
        self.close()
        for s in self.shards:
            if os.path.exists(path := os.path.join(self.out_dir, s["file"] + ".tmp")):
                os.remove(path)

    @property
    def tokens(self):
        return sum(s["tokens"] for s in self.shards)


def check_counts(input_path, any_text, n_train, n_val, seq_len):
    if not any_text:
        raise DataError(f"input file {input_path} is empty")
    if n_train + n_val < seq_len:
        raise DataError(f"input file {input_path} has {n_train + n_val} tokens, fewer than one training sequence ({seq_len})")
    if n_val < seq_len:
        raise DataError(f"validation split has {n_val} tokens, fewer than one sequence ({seq_len}); "
                        "use a larger file or --val_fraction")
    if n_train < seq_len:
        raise DataError(f"training split has {n_train} tokens, fewer than one sequence ({seq_len})")


def chunk_size(n_tokens, every, min_chunk):
    """2,048-token validation chunks, fewer for a small corpus, so that validation gets about ten."""
    return int(max(min_chunk, min(2048, n_tokens // (every * 10))))


class ChunkRouter:
    """The token stream's chunk i (tokens [i * chunk, (i + 1) * chunk)) goes to validation when
    i % every == every - 1, else to training: split_tokens' rule, applied as tokens arrive."""

    def __init__(self, writers, chunk, every):
        self.writers, self.chunk, self.every, self.pos = writers, chunk, every, 0

    def write(self, ids):
        ids = np.asarray(ids)
        while len(ids):
            take = ids[:self.chunk - self.pos % self.chunk]
            val = (self.pos // self.chunk) % self.every == self.every - 1
            self.writers["val" if val else "train"].write(take)
            self.pos += len(take)
            ids = ids[len(take):]


def prepare(input_path, out_dir, tokenizer="gpt2", val_fraction=0.1, seq_len=64, split="chunks", workers=1,
            block_bytes=8 << 20, shard_tokens=1 << 28):
    """Tokenize input_path (a file, a folder of .txt files, or JSONL) into out_dir's shards and meta.json.
    A corpus of at most one block is split exactly (split_tokens); a larger one is streamed: 'chunks' with
    the chunk size estimated from the first block, 'tail' by input bytes."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    if split == "chunks" and abs(val_fraction * round(1 / val_fraction) - 1) > 0.01:
        raise DataError(f"--split chunks holds out one chunk in k: --val_fraction must be 1/k (0.5, 0.25, 0.1, ...), "
                        f"got {val_fraction}; or use --split tail")
    sources = check_sources(list_sources(input_path))
    total_bytes = sum(os.path.getsize(f) for f, _ in sources)
    enc = get_tokenizer(tokenizer)
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    hasher = hashlib.sha256()
    writers = {s: ShardWriter(out_dir, s, dtype, shard_tokens) for s in ("train", "val")}
    every = max(2, round(1 / val_fraction))
    pool = multiprocessing.Pool(workers, _init_worker, (tokenizer,)) if workers > 1 else None
    _init_worker(tokenizer)
    pieces = read_pieces(sources, block_bytes, hasher)
    small, held, router, any_text, before, chunk = total_bytes <= block_bytes, [], None, False, 0, None
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None, leave=False) as bar:
            for ids, done, has_text in (pool.imap(_encode, pieces) if pool else map(_encode, pieces)):
                any_text |= has_text
                bar.update(done - bar.n)
                if small:  # everything fits in one block: split it exactly below
                    held.extend(ids)
                elif split == "tail":
                    writers["val" if before >= (1 - val_fraction) * total_bytes else "train"].write(ids)
                else:
                    router = router or ChunkRouter(writers, chunk_size(len(ids) * total_bytes / max(done, 1), every,
                                                                       seq_len), every)
                    router.write(ids)
                    chunk = router.chunk
                before = done
        if small and held:
            chunk = chunk_size(len(held), every, seq_len) if split == "chunks" else None
            train_ids, val_ids = split_tokens(np.array(held, dtype=dtype), val_fraction, split, chunk or 2048, seq_len)
            writers["train"].write(train_ids)
            writers["val"].write(val_ids)
        check_counts(input_path, any_text, writers["train"].tokens, writers["val"].tokens, seq_len)
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    finally:
        for w in writers.values():
            w.close()
        if pool:
            pool.close()
    n_train, n_val = writers["train"].tokens, writers["val"].tokens
    for w in writers.values():
        for shard in w.shards:
            os.replace(os.path.join(out_dir, shard["file"] + ".tmp"), os.path.join(out_dir, shard["file"]))
    meta = dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, eot_id=eot_id(enc), dtype=np.dtype(dtype).name, split=split,
                train_tokens=int(n_train), val_tokens=int(n_val), chunk=chunk, shards={s: w.shards for s, w in writers.items()},
                source=os.path.abspath(input_path), source_sha256=hasher.hexdigest(), val_fraction=val_fraction)
    write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def load_meta(data_dir):
    """meta.json of a prepared directory, checked for the fields TokenData reads."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise DataError(f"{path} not found: run `python prepare.py` (or --input FILE --out_dir {data_dir}) first")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        np.dtype(meta["dtype"])
        assert isinstance(meta["vocab_size"], int) and isinstance(meta["tokenizer"], str)
        for split in ("train", "val"):
            assert isinstance(meta[f"{split}_tokens"], int)
            assert all(isinstance(s["file"], str) and isinstance(s["tokens"], int) for s in meta["shards"][split])
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(f"{path} is not a valid meta.json ({type(e).__name__}); prepare the data again") from None
    return meta


def open_shard(data_dir, shard, dtype, vocab_size):
    """A shard as a memmap, checked against meta.json: its size, and every id below the vocabulary."""
    path = os.path.join(data_dir, shard["file"])
    if not os.path.exists(path):
        raise DataError(f"{path} not found: run prepare.py")
    size, want = os.path.getsize(path), shard["tokens"] * dtype.itemsize
    if size != want:
        raise DataError(f"{path} holds {size} bytes, meta.json says {shard['tokens']} tokens ({want} bytes): "
                        "truncated or changed; prepare the data again")
    if size == 0:
        raise DataError(f"{path} is empty; prepare the data again")
    arr = np.memmap(path, dtype=dtype, mode="r")
    top = max(int(arr[i:i + (1 << 24)].max()) for i in range(0, len(arr), 1 << 24))
    if top >= vocab_size:
        raise DataError(f"{path} holds token id {top}, outside the vocabulary of {vocab_size}")
    return arr


class TokenData:
    """Random windows of seq_len tokens from the memmapped shards of a prepared directory. Memory stays
    bounded: shards are memmaps, and a window never crosses a shard boundary. Opening checks every shard
    against meta.json (sizes, token counts, ids below the vocabulary)."""

    def __init__(self, data_dir, seq_len):
        self.meta, self.data_dir = load_meta(data_dir), data_dir
        n_vocab = get_tokenizer(self.meta["tokenizer"]).n_vocab  # a hand-edited tokenizer or vocab_size disagrees
        if n_vocab != self.meta["vocab_size"]:
            raise DataError(f"{data_dir}/meta.json: tokenizer {self.meta['tokenizer']} has {n_vocab} ids, not its "
                            f"vocab_size {self.meta['vocab_size']}; prepare the data again")
        dtype = np.dtype(self.meta["dtype"])
        self.seq_len, self.shards, self.starts = seq_len, {}, {}
        for split in ("train", "val"):
            shards = self.meta["shards"][split]
            if sum(s["tokens"] for s in shards) != self.meta[f"{split}_tokens"]:
                raise DataError(f"{data_dir}/meta.json: the {split} shards do not add up to {split}_tokens")
            arrs = [open_shard(data_dir, s, dtype, self.meta["vocab_size"]) for s in shards]
            counts = [max(0, len(a) - seq_len + 1) for a in arrs]  # window starts per shard
            if sum(counts) == 0:
                raise DataError(f"the {split} split of {data_dir} has no shard of {seq_len} tokens; "
                                "use a smaller --seq_len or more data")
            self.shards[split], self.starts[split] = arrs, np.cumsum(counts)

    def tokens(self, split, limit=None):
        """The first `limit` tokens of a split (all of them by default) as one int64 array."""
        out, n = [], 0
        for a in self.shards[split]:
            take = a[:None if limit is None else max(0, limit - n)]
            out.append(np.asarray(take, dtype=np.int64))
            n += len(take)
        return np.concatenate(out)

    def batch(self, split, batch_size, seed, device):
        """(batch_size, seq_len) int64 token windows; the same seed gives the same windows."""
        cum = self.starts[split]
        g = torch.Generator().manual_seed(seed)
        rows = []
        for s in torch.randint(int(cum[-1]), (batch_size,), generator=g).tolist():
            k = int(np.searchsorted(cum, s, side="right"))  # the shard holding window start s
            s -= int(cum[k - 1]) if k else 0
            rows.append(self.shards[split][k][s:s + self.seq_len].astype(np.int64))
        return torch.from_numpy(np.stack(rows)).to(device, non_blocking=True)


def batch_seed(base, index, step):
    """Seed of the micro-batch `index` of an optimizer step. Under DDP with accumulation the index is
    rank * grad_accum + micro, so 2 processes x 2 micro-batches read what 1 process x 4 reads."""
    return (base * 1_000_003 + step * 104_729 + index) % (2 ** 63)


def same_preparation(a):
    """Whether --out_dir holds this very input (by its hash) prepared with these settings: nothing to redo."""
    h = hashlib.sha256()
    try:
        meta = load_meta(a.out_dir)
        for path, _ in list_sources(a.input):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    except (DataError, OSError):
        return False
    want = dict(source=os.path.abspath(a.input), source_sha256=h.hexdigest(), tokenizer=a.tokenizer, split=a.split,
                val_fraction=a.val_fraction)
    return all(meta.get(k) == v for k, v in want.items())


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_CORPUS,
                   help="a UTF-8 text file, a folder of .txt files, or JSONL with a 'text' field (default: Shakespeare)")
    p.add_argument("--out_dir", default=DEFAULT_DATA_DIR, help="where the shards and meta.json go")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (vendored), cl100k_base, or a released model's tokenizer.json")
    p.add_argument("--val_fraction", type=float, default=0.1, help="fraction of tokens held out")
    p.add_argument("--split", default="chunks", choices=["chunks", "tail"],
                   help="chunks: every k-th 2048-token chunk is validation; tail: the end of the file (nanoGPT)")
    p.add_argument("--min_seq_len", type=int, default=64, help="each split must hold at least one sequence this long")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="tokenizing processes")
    p.add_argument("--block_bytes", type=int, default=8 << 20, help="input read (and held) at a time, in bytes")
    p.add_argument("--shard_tokens", type=int, default=1 << 28, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace the shards and meta.json --out_dir already holds")
    a = p.parse_args(argv)
    if min(a.workers, a.block_bytes, a.min_seq_len) < 1:
        p.error("--workers, --block_bytes and --min_seq_len must be >= 1")
    if a.workers > 4 * (os.cpu_count() or 1):
        p.error(f"--workers {a.workers} is more than 4 per CPU core of this machine ({os.cpu_count()} cores)")
    if a.shard_tokens < max(a.min_seq_len, 1024):
        p.error(f"--shard_tokens must be >= {max(a.min_seq_len, 1024)} (a training window never crosses a shard)")
    check_writable_dir(a.out_dir, "--out_dir")
    held = sorted(f for f in os.listdir(a.out_dir) if f == "meta.json" or re.fullmatch(r"(train|val)_\d{5}\.bin", f))
    if held and not a.overwrite and same_preparation(a):
        return print(f"{a.out_dir} already holds {a.input} prepared the same way; nothing to do")
    if held and not a.overwrite:
        p.error(f"--out_dir {a.out_dir} already holds prepared data ({held[0]}); add --overwrite to replace it")
    try:
        meta = prepare(a.input, a.out_dir, a.tokenizer, a.val_fraction, a.min_seq_len, a.split, a.workers,
                       a.block_bytes, a.shard_tokens)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']}, {meta['dtype']}, {meta['split']} split)")


if __name__ == "__main__":
    main()
