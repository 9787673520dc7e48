"""
Data preparation: UTF-8 text -> token shards (train_00000.bin, ..., val_00000.bin, ...) + meta.json.

    python prepare.py                                         # the embedded default corpus (Shakespeare)
    python prepare.py --input my.txt --out_dir data/my        # one UTF-8 text file
    python prepare.py --input corpus/ --out_dir data/c        # a folder of .txt files (one document each)
    python prepare.py --input docs.jsonl --out_dir data/d     # JSONL, one document per line in a "text" field

The input is streamed (blocks of --block_bytes cut where the BPE cannot straddle the cut, tokenized by
--workers processes, shards of --shard_tokens tokens), so memory stays bounded whatever the corpus size.
Documents are separated by <|endoftext|>; tokens are uint16 when the vocabulary fits, else uint32 (nanoGPT).
TokenData reads the shards back as random windows from memmaps, each batch a pure function of (seed, index, step).
Tokenizers are tiktoken Encodings (docs/method.md §2): the vendored GPT-2 BPE (offline, hash-checked), cl100k_base
where tiktoken can load it, and any byte-level BPE tokenizer.json (the release's format), read without `tokenizers`.
"""
import argparse
import base64
import codecs
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import re

import numpy as np
import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str
from tqdm import tqdm

from cli import Parser, check_writable_dir, fail, float_in, positive_int, write_json

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_DIR = os.path.join(REPO_DIR, "data", "shakespeare")
DEFAULT_CORPUS = os.path.join(REPO_DIR, "data", "shakespeare_tiny.txt")
GPT2_BPE_FILE = os.path.join(REPO_DIR, "data", "gpt2.tiktoken")
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


class DataError(ValueError):
    """Bad input data; the message is one line meant for the user."""


def sha256_of(*paths):
    """The sha256 of the files' bytes, one after the other."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                h.update(chunk)
    return h.hexdigest()


# tokenizers

@functools.lru_cache(maxsize=None)
def get_tokenizer(name="gpt2"):
    """A tiktoken Encoding: gpt2 (from the vendored file, never the network), cl100k_base or a tokenizer.json."""
    if name.endswith(".json"):  # a released model's tokenizer.json
        return tokenizer_from_json(name)
    if name == "gpt2":
        if not os.path.exists(GPT2_BPE_FILE):
            raise DataError(f"tokenizer file {GPT2_BPE_FILE} is missing")
        if sha256_of(GPT2_BPE_FILE) != GPT2_BPE_SHA256:
            raise DataError(f"tokenizer file {GPT2_BPE_FILE} has the wrong sha256 (corrupted?)")
        with open(GPT2_BPE_FILE, "rb") as f:
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    if name == "cl100k_base":
        try:
            return tiktoken.get_encoding("cl100k_base")
        except Exception as e:  # no network and no cache: say so in one line
            raise DataError(f"tokenizer cl100k_base cannot be loaded here ({type(e).__name__}); "
                            "it needs tiktoken's download or a TIKTOKEN_CACHE_DIR holding it") from None
    raise DataError(f"unknown tokenizer {name!r} (choose gpt2, cl100k_base or a tokenizer.json path)")


def same_tokenizer(a, b):
    """Whether two tokenizer names (gpt2, cl100k_base, or a tokenizer.json path) are the same tokenizer."""
    return a == b or all(x.endswith(".json") and os.path.isfile(x) for x in (a, b)) and sha256_of(a) == sha256_of(b)


def byte_alphabet():
    """Byte -> its character in tokenizer.json's byte-level alphabet (printable Latin-1 itself, others chr(256 + n))."""
    own = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    others = iter(range(256, 512))
    return {b: chr(b if b in own else next(others)) for b in range(256)}


def _split_pattern(pre):
    """The pre-tokenizer's regex from a tokenizer.json 'pre_tokenizer' (a Split, or a Sequence holding one)."""
    for p in [pre] + list((pre or {}).get("pretokenizers") or []):
        if p and p.get("type") == "Split" and "Regex" in (p.get("pattern") or {}):
            return p["pattern"]["Regex"]
        if p and p.get("type") == "ByteLevel" and p.get("use_regex"):
            return r50k_pat_str


def template_ids(path):
    """(prefix ids, suffix ids) the tokenizer.json's TemplateProcessing wraps around an encoded text, if any."""
    with open(path, encoding="utf-8") as f:
        post = json.load(f).get("post_processor") or {}
    for p in [post] + list(post.get("processors") or []):
        if p.get("type") == "TemplateProcessing":
            ids = {name: tok["ids"] for name, tok in (p.get("special_tokens") or {}).items()}
            parts = [("A", None) if "Sequence" in item else ("S", ids[item["SpecialToken"]["id"]])
                     for item in p.get("single", [])]
            cut = [k for k, _ in parts].index("A") if ("A", None) in parts else len(parts)
            return ([i for _, v in parts[:cut] for i in v], [i for _, v in parts[cut + 1:] for i in v])
    return [], []


def tokenizer_from_json(path):
    """A byte-level BPE tokenizer.json as a tiktoken Encoding (vocabulary ids as mergeable ranks, added tokens
    special): the same tokenizer when the merges' results have increasing ids (as OLMo 2's), which is checked."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model, specials = spec["model"], {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
        vocab, merges = model["vocab"], model.get("merges", [])
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise TypeError("model.vocab must be an object, model.merges a list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE":
        raise DataError(f"{path}: model type {model.get('type')!r} is not a byte-level BPE")
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        raise DataError(f"{path}: pre_tokenizer has no Split regex to read")
    to_byte = {c: b for b, c in byte_alphabet().items()}
    special_ids = set(specials.values())
    try:
        ranks = {bytes(to_byte[c] for c in tok): int(i) for tok, i in vocab.items() if int(i) not in special_ids}
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: vocabulary entry with {e} is not a byte-level token with an integer id") from None
    if len(set(ranks.values())) != len(ranks) or any(bytes([b]) not in ranks for b in range(256)):
        raise DataError(f"{path}: the vocabulary must hold every single byte once")
    try:
        merged = [int(vocab["".join(m.split(" ") if isinstance(m, str) else m)]) for m in merges]
    except (KeyError, ValueError, TypeError):
        merged = [1, 0]  # a merge that is no pair of vocabulary strings: refused below
    if any(a >= b for a, b in zip(merged, merged[1:])):
        raise DataError(f"{path}: the merges are not in the order of their tokens' ids, so tiktoken cannot "
                        "reproduce this BPE")
    try:
        return tiktoken.Encoding(name=os.path.basename(path), pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
    except Exception as e:  # a pattern the regex engine rejects, say
        raise DataError(f"{path}: tiktoken cannot build this tokenizer ({type(e).__name__}: {e})") from None


# splitting and streaming: files -> text pieces -> tokens -> train / val shards

def held_out(at, total, val_fraction, split, chunk):
    """Which tokens are validation ones, by position `at` in a stream of `total`: 'chunks', every k-th chunk, so
    that validation text comes from the works training reads; 'tail', the last val_fraction (nanoGPT)."""
    if split == "tail":
        return at >= total - int(total * val_fraction)
    every = max(2, round(1 / val_fraction))
    return at // chunk % every == every - 1


def split_tokens(ids, val_fraction, split="chunks", chunk=2048, min_chunk=64):
    """(train, val) of a whole token array (held_out)."""
    val = held_out(np.arange(len(ids)), len(ids), val_fraction, split, max(min_chunk, chunk))
    return ids[~val], ids[val]


def chunk_size(n_tokens, every, min_chunk):
    """2,048-token validation chunks, fewer for a small corpus, so that validation gets about ten."""
    return int(max(min_chunk, min(2048, n_tokens // (every * 10))))


def list_sources(path):
    """The input's files: one text or JSONL file, or every .txt file under a folder; each must be readable."""
    if not os.path.isdir(path):
        files = [path]
    elif not (files := sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))):
        raise DataError(f"folder {path} holds no .txt file")
    for f in files:
        if not os.path.lexists(f):
            raise DataError(f"input file {f} does not exist")
        if not os.path.isfile(f) or not os.access(f, os.R_OK):  # a broken link, or a file we may not read
            raise DataError(f"input {f} is not a readable file (a broken link?)")
    return files


# Places where the GPT-2 pre-tokenizer always starts a new piece, so the BPE of two texts cut there equals
# the BPE of the whole: after a lone newline (a non-space before it, a non-space after it); else between a
# non-space and " " + a letter. (Not after "\n\n": cut there, the two newlines would become one piece.)
_CUTS = re.compile(r"(?<=\S\n)(?=\S)"), re.compile(r"(?<=\S)(?= [A-Za-z])")


def last_cut(text, lo=0):
    """Position of the last safe cut in text[lo:] (None if there is none)."""
    for pattern in _CUTS:
        if cut := max((m.start() for m in pattern.finditer(text, lo)), default=None):
            return cut


def split_document(text, block_chars):
    """A long document in pieces of about block_chars, cut only where the BPE is unaffected."""
    while len(text) > block_chars:
        cut = last_cut(text[:block_chars], block_chars // 2) or last_cut(text[:block_chars])
        if not cut:
            break
        yield text[:cut]
        text = text[cut:]
    yield text


def read_pieces(files, block_bytes):
    """(text, starts_a_later_document, input bytes read so far); about 2 x block_bytes of text held at most."""
    done, docs = 0, 0
    for n, path in enumerate(files):
        with open(path, "rb") as f:
            if path.endswith((".jsonl", ".json")):
                for line_no, line in enumerate(f, 1):
                    done += len(line)
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line.decode("utf-8"))["text"]
                        assert isinstance(text, str)
                    except (ValueError, KeyError, TypeError, AssertionError):
                        raise DataError(f"{path}:{line_no}: not a JSON object with a string 'text'") from None
                    docs += 1
                    for i, piece in enumerate(split_document(text, block_bytes)):
                        yield piece, i == 0 and docs > 1, done
                continue
            decoder, text, new_doc = codecs.getincrementaldecoder("utf-8")(), "", n > 0
            while True:
                pending, raw = len(decoder.getstate()[0]), f.read(block_bytes)  # a character split by a read waits
                done += len(raw)
                try:
                    text += decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    offset = f.tell() - len(raw) - pending + e.start
                    raise DataError(f"input file {path} is not UTF-8 text (bad byte at offset {offset})") from None
                cut = last_cut(text, len(text) // 2) if raw else len(text)
                if cut:
                    yield text[:cut], new_doc, done
                    text, new_doc = text[cut:], False
                if not raw:
                    break


def encode_piece(tokenizer, piece):
    """(ids, bytes read, whether it holds text) of a read_pieces piece; a later document starts with EOT."""
    text, new_document, done = piece
    enc = get_tokenizer(tokenizer)  # loaded once per process
    return ([enc.eot_token] if new_document else []) + enc.encode_ordinary(text), done, bool(text.strip())


class Shards:
    """The train and val tokens, appended in order to shards of at most shard_tokens tokens (.tmp until close)."""

    def __init__(self, out_dir, dtype, shard_tokens):
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.shards = {"train": [], "val": []}

    def write(self, ids, val):
        """Append the ids where the mask `val` holds to the validation split, the others to the training one."""
        ids = np.asarray(ids, dtype=self.dtype)
        for split, part in (("train", ids[~val]), ("val", ids[val])):
            shards = self.shards[split]
            while len(part):
                if not shards or shards[-1]["tokens"] == self.shard_tokens:
                    shards.append({"file": f"{split}_{len(shards):05d}.bin", "tokens": 0})
                shard, take = shards[-1], part[:self.shard_tokens - shards[-1]["tokens"]]
                with open(os.path.join(self.out_dir, shard["file"] + ".tmp"), "ab" if shard["tokens"] else "wb") as f:
                    f.write(take.tobytes())
                shard["tokens"] += len(take)
                part = part[len(take):]

    def close(self, keep):
        """Name every shard (keep), or remove them all (a failed run)."""
        for s in self.shards["train"] + self.shards["val"]:
            tmp = os.path.join(self.out_dir, s["file"] + ".tmp")
            if keep:
                os.replace(tmp, tmp.removesuffix(".tmp"))
            elif os.path.exists(tmp):
                os.remove(tmp)


def prepare(input_path, out_dir, tokenizer="gpt2", val_fraction=0.1, seq_len=64, split="chunks", workers=1,
            block_bytes=8 << 20, shard_tokens=1 << 28):
    """Tokenize input_path (a file, a folder of .txt files, or JSONL) into out_dir's shards and meta.json. A corpus
    of one block is split exactly; a larger one as it streams (chunks sized from the first piece, 'tail' by bytes)."""
    if split == "chunks" and abs(val_fraction * round(1 / val_fraction) - 1) > 0.01:
        raise DataError(f"--split chunks holds out one chunk in k: --val_fraction must be 1/k (0.5, 0.25, 0.1, ...), "
                        f"got {val_fraction}; or use --split tail")
    files = list_sources(input_path)
    total_bytes = sum(os.path.getsize(f) for f in files)
    enc = get_tokenizer(tokenizer)
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    out, every = Shards(out_dir, dtype, shard_tokens), max(2, round(1 / val_fraction))
    encode, pieces = functools.partial(encode_piece, tokenizer), read_pieces(files, block_bytes)
    small, held, any_text, before, pos, chunk = total_bytes <= block_bytes, [], False, 0, 0, None
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None, leave=False) as bar, \
                (multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
            for ids, done, has_text in (pool.imap if pool else map)(encode, pieces):
                any_text |= has_text
                bar.update(done - bar.n)
                if small:  # everything fits in one block: split it exactly below
                    held += ids
                    continue
                if split == "chunks":
                    chunk = chunk or chunk_size(len(ids) * total_bytes / max(done, 1), every, seq_len)
                out.write(ids, held_out(np.full(len(ids), before) if split == "tail" else pos + np.arange(len(ids)),
                                        total_bytes, val_fraction, split, chunk))  # 'tail' by input bytes
                pos, before = pos + len(ids), done
        if small:
            chunk = chunk_size(len(held), every, seq_len) if split == "chunks" else None
            out.write(held, held_out(np.arange(len(held)), len(held), val_fraction, split, chunk))
        n_train, n_val = (sum(s["tokens"] for s in out.shards[k]) for k in ("train", "val"))
        if not any_text:
            raise DataError(f"input file {input_path} is empty")
        if n_train + n_val < seq_len:
            raise DataError(f"input file {input_path} has {n_train + n_val} tokens, fewer than one training "
                            f"sequence ({seq_len})")
        for name, n in (("validation", n_val), ("training", n_train)):
            if n < seq_len:
                raise DataError(f"{name} split has {n} tokens, fewer than one sequence ({seq_len}); "
                                "use a larger file or another --val_fraction")
    except BaseException:
        out.close(keep=False)
        raise
    out.close(keep=True)
    meta = dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, eot_id=enc.eot_token, dtype=np.dtype(dtype).name,
                split=split, train_tokens=int(n_train), val_tokens=int(n_val), chunk=chunk, shards=out.shards,
                source=os.path.abspath(input_path), source_sha256=sha256_of(*files), val_fraction=val_fraction)
    write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


# reading: meta.json and the shards, checked, as random windows

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
            shards = meta["shards"][split]
            assert all(isinstance(s["file"], str) and isinstance(s["tokens"], int) for s in shards)
            assert sum(s["tokens"] for s in shards) == meta[f"{split}_tokens"]  # the shards add up to the count
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(f"{path} is not a valid meta.json ({type(e).__name__}); prepare the data again") from None
    return meta


def open_shard(data_dir, shard, dtype, vocab_size):
    """A shard as a memmap, checked against meta.json: its size, and every id below the vocabulary."""
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
    return arr


class TokenData:
    """Random seq_len windows, never across a shard, from a prepared folder's memmapped shards (checked on opening)."""

    def __init__(self, data_dir, seq_len):
        self.meta, self.data_dir, self.seq_len = load_meta(data_dir), data_dir, seq_len
        self.shards, self.starts, vocab = {}, {}, self.meta["vocab_size"]
        n_vocab = get_tokenizer(self.meta["tokenizer"]).n_vocab  # a hand-edited tokenizer or vocab_size disagrees
        if n_vocab != vocab:
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


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_CORPUS,
                   help="a UTF-8 text file, a folder of .txt files or JSONL of 'text' fields (default: Shakespeare)")
    p.add_argument("--out_dir", default=DEFAULT_DATA_DIR, help="where the shards and meta.json go")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (vendored), cl100k_base, or a model's tokenizer.json")
    p.add_argument("--val_fraction", type=float_in(0, 1, True, True), default=0.1, help="fraction of tokens held out")
    p.add_argument("--split", default="chunks", choices=["chunks", "tail"],
                   help="chunks: every k-th 2048-token chunk is validation; tail: the end of the file (nanoGPT)")
    p.add_argument("--min_seq_len", type=positive_int, default=64, help="each split must hold one sequence this long")
    p.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizing processes")
    p.add_argument("--block_bytes", type=positive_int, default=8 << 20, help="input bytes read (and held) at a time")
    p.add_argument("--shard_tokens", type=int, default=1 << 28, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace the shards and meta.json in --out_dir")
    a = p.parse_args(argv)
    if a.workers > 4 * (os.cpu_count() or 1):
        p.error(f"--workers {a.workers} is more than 4 per CPU core of this machine ({os.cpu_count()} cores)")
    if a.shard_tokens < max(a.min_seq_len, 1024):
        p.error(f"--shard_tokens must be >= {max(a.min_seq_len, 1024)} (a training window never crosses a shard)")
    check_writable_dir(a.out_dir, "--out_dir")
    held = sorted(f for f in os.listdir(a.out_dir) if f == "meta.json" or re.fullmatch(r"(train|val)_\d{5}\.bin", f))
    if held and not a.overwrite:
        try:  # this very input (by its hash) prepared with these settings: nothing to redo
            want = dict(source=os.path.abspath(a.input), source_sha256=sha256_of(*list_sources(a.input)),
                        tokenizer=a.tokenizer, split=a.split, val_fraction=a.val_fraction)
            if want.items() <= load_meta(a.out_dir).items():
                return print(f"{a.out_dir} already holds {a.input} prepared the same way; nothing to do")
        except (DataError, OSError):
            pass
        p.error(f"--out_dir {a.out_dir} already holds prepared data ({held[0]}); add --overwrite to replace it")
    try:
        meta = prepare(a.input, a.out_dir, a.tokenizer, a.val_fraction, a.min_seq_len, a.split, a.workers,
                       a.block_bytes, a.shard_tokens)
    except DataError as e:
        fail(e)
    print(f"wrote {a.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']}, {meta['dtype']}, {meta['split']} split)")


if __name__ == "__main__":
    main()
