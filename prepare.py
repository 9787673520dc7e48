"""Data preparation: UTF-8 text -> token shards (train_00000.bin, ..., val_00000.bin, ...) + meta.json, which
tokendata.TokenData reads back. Documents are separated by <|endoftext|>; tokens are uint16 if the vocabulary fits.

    python prepare.py                                         # the embedded default corpus (Shakespeare)
    python prepare.py --input my.txt --out_dir data/my        # one UTF-8 text file
    python prepare.py --input corpus/ --out_dir data/c        # a folder of .txt files (one document each)
    python prepare.py --input docs.jsonl --out_dir data/d     # JSONL, one document per line in a "text" field

Memory stays bounded whatever the corpus: the input streams in blocks of --block_bytes cut where the BPE cannot
straddle the cut (else at --block_bytes), tokenized into shards of --shard_tokens tokens. A folder is locked while
written; new shards take new numbers, the rename of meta.json switches to them: whole or not."""
import codecs
import json
import os
import re

import numpy as np
from tqdm import tqdm

from cli import Parser, check_writable_dir, fail, float_in, folder_lock, json_loads, positive_int, script, write_json
from tokendata import DEFAULT_DATA_DIR, SHARD, SHARD_ENDS, load_meta
from tokenizer import REPO_DIR, DataError, get_tokenizer, sha256_of

DEFAULT_CORPUS = os.path.join(REPO_DIR, "data", "shakespeare_tiny.txt")


# splitting and streaming: files -> text pieces -> tokens -> train / val shards
def held_out(at, total, val_fraction, split, chunk):
    """Whether the token at position `at` of `total` is held out: 'chunks', every k-th chunk (validation text from the
    works training reads); 'tail', the last val_fraction (nanoGPT)."""
    if split == "tail":
        return at >= total - int(total * val_fraction)
    every = max(2, round(1 / val_fraction))
    return at // chunk % every == every - 1


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
    """A long document in pieces of about block_chars, cut where the BPE is unaffected (if nowhere, at block_chars:
    memory stays bounded, and only the tokens at that cut may differ)."""
    while len(text) > block_chars:
        cut = last_cut(text[:block_chars], block_chars // 2) or last_cut(text[:block_chars]) or block_chars
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
                        text = json_loads(line.decode("utf-8"))["text"]
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
                cut = cut or (block_bytes if len(text) >= 2 * block_bytes else None)  # none: cut anyway
                if cut:
                    yield text[:cut], new_doc, done
                    text, new_doc = text[cut:], False
                if not raw:
                    break


class Shards:
    """Train and val tokens appended to shards of <= shard_tokens (.<pid>.tmp until close), numbered on from `first`."""

    def __init__(self, out_dir, dtype, shard_tokens, first=0):
        self.out_dir, self.dtype, self.shard_tokens, self.first = out_dir, dtype, shard_tokens, first
        self.shards, self.tmp = {"train": [], "val": []}, f".{os.getpid()}.tmp"

    def write(self, ids, val):
        """Append the ids where the mask `val` holds to the validation split, the others to the training one."""
        ids = np.asarray(ids, dtype=self.dtype)
        for split, part in (("train", ids[~val]), ("val", ids[val])):
            shards = self.shards[split]
            while len(part):
                if not shards or shards[-1]["tokens"] == self.shard_tokens:
                    shards.append({"file": f"{split}_{self.first + len(shards):05d}.bin", "tokens": 0})
                shard, take = shards[-1], part[:self.shard_tokens - shards[-1]["tokens"]]
                with open(os.path.join(self.out_dir, shard["file"] + self.tmp), "ab" if shard["tokens"] else "wb") as f:
                    f.write(take.tobytes())
                shard["tokens"] += len(take)
                part = part[len(take):]

    def close(self, keep):
        """Name every shard (keep), or remove them all, named or not (a failed run)."""
        for s in self.shards["train"] + self.shards["val"]:
            path = os.path.join(self.out_dir, s["file"])
            if keep:
                os.replace(path + self.tmp, path)
                s["ends"] = sha256_of(path, ends=SHARD_ENDS)  # meta.json (self.shards) names what the shard holds
            for p in [path + self.tmp] + ([] if keep else [path]):
                os.remove(p) if os.path.exists(p) else None


def prepare(input_path, out_dir, tokenizer="gpt2", val_fraction=0.1, seq_len=64, split="chunks",
            block_bytes=8 << 20, shard_tokens=1 << 28):
    """Tokenize input_path (a file, a folder of .txt files, or JSONL) into out_dir's shards and meta.json: one block
    split exactly, a larger corpus as it streams (chunks sized from the first piece, 'tail' by bytes)."""
    if split == "chunks" and abs(val_fraction * round(1 / val_fraction) - 1) > 0.01:
        raise DataError(f"--split chunks holds out one chunk in k: --val_fraction must be 1/k (0.5, 0.25, 0.1, ...), "
                        f"got {val_fraction}; or use --split tail")
    files = list_sources(input_path)
    total_bytes = sum(os.path.getsize(f) for f in files)
    enc = get_tokenizer(tokenizer)
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # killed runs' shard temporaries (prepare.py holds the folder's lock)
        os.remove(os.path.join(out_dir, f)) if re.fullmatch(SHARD.pattern + r"\.\d+\.tmp", f) else None
    first = 1 + max((int(m[1]) for f in os.listdir(out_dir) if (m := SHARD.fullmatch(f))), default=-1)
    out, every = Shards(out_dir, dtype, shard_tokens, first), max(2, round(1 / val_fraction))
    small, held, any_text, before, pos, chunk = total_bytes <= block_bytes, [], False, 0, 0, None
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None, leave=False) as bar:
            for text, new_doc, done in read_pieces(files, block_bytes):  # a later document starts with EOT
                ids, any_text = [enc.eot_token] * new_doc + enc.encode_ordinary(text), any_text or bool(text.strip())
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
        meta = dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, eot_id=enc.eot_token, dtype=np.dtype(dtype).name,
                    split=split, train_tokens=int(n_train), val_tokens=int(n_val), chunk=chunk, shards=out.shards,
                    source=os.path.abspath(input_path), source_sha256=sha256_of(*files), val_fraction=val_fraction)
        out.close(keep=True)  # new names: the old meta.json still reads the old shards
        write_json(os.path.join(out_dir, "meta.json"), meta)  # the one rename that switches to the new ones
    except BaseException:
        out.close(keep=False)
        raise
    new = {s["file"] for s in out.shards["train"] + out.shards["val"]}
    for f in os.listdir(out_dir):  # the old shards, now that no meta.json names them
        os.remove(os.path.join(out_dir, f)) if SHARD.fullmatch(f) and f not in new else None
    return meta


@script
def main(argv=None):
    p = Parser(description=__doc__)
    add = p.add_argument
    add("--input", default=DEFAULT_CORPUS, help="a UTF-8 text file, a folder of .txt files, or JSONL of 'text' fields")
    add("--out_dir", default=DEFAULT_DATA_DIR, help="where the shards and meta.json go")
    add("--tokenizer", default="gpt2", help="gpt2 (vendored), cl100k_base, or a model's tokenizer.json")
    add("--val_fraction", type=float_in(0, 1, True, True), default=0.1, help="fraction of tokens held out")
    add("--split", default="chunks", choices=["chunks", "tail"],
        help="chunks: every k-th 2048-token chunk is validation; tail: the end of the file (nanoGPT)")
    add("--min_seq_len", type=positive_int, default=64, help="each split must hold one sequence this long")
    add("--block_bytes", type=positive_int, default=8 << 20, help="input bytes read (and held) at a time")
    add("--shard_tokens", type=int, default=1 << 28, help="tokens per shard file")
    add("--overwrite", action="store_true", help="replace the shards and meta.json in --out_dir")
    a = p.parse_args(argv)
    if a.shard_tokens < max(a.min_seq_len, 1024):
        p.error(f"--shard_tokens must be >= {max(a.min_seq_len, 1024)} (a training window never crosses a shard)")
    check_writable_dir(a.out_dir, "--out_dir")
    with folder_lock(a.out_dir, "prepare.lock", "prepare.py"):  # one writer: two at once would mix their shards
        held = sorted(f for f in os.listdir(a.out_dir) if f == "meta.json" or SHARD.fullmatch(f))
        if any(f.endswith(".pt") for f in os.listdir(a.out_dir)):  # a training run's folder is no data folder
            p.error(f"--out_dir {a.out_dir} holds checkpoints (*.pt); prepare the data into a folder of its own")
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
            meta = prepare(a.input, a.out_dir, a.tokenizer, a.val_fraction, a.min_seq_len, a.split, a.block_bytes,
                           a.shard_tokens)
        except DataError as e:
            fail(e)
        except BrokenPipeError:
            raise  # a closed stdout: cli.script ends quietly
        except OSError as e:  # a full disk, say: meta.json was not switched, so the folder holds what it held
            fail(f"cannot write {a.out_dir} ({e.strerror or e}); it holds what it held before")
        print(f"wrote {a.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
              f"({meta['tokenizer']}, {meta['dtype']}, {meta['split']} split)")


if __name__ == "__main__":
    main()
