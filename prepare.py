"""
Data preparation: any UTF-8 text file -> train.bin / val.bin token files + meta.json.

    python prepare.py                                   # the embedded default corpus (Shakespeare)
    python prepare.py --input my.txt --out_dir data/my  # any UTF-8 text file

Tokens are stored as uint16 when the vocabulary fits, else uint32, as nanoGPT does. The GPT-2 BPE
(SPEC §2) loads offline from the vendored data/gpt2.tiktoken after a hash check; cl100k_base (the
paper's tokenizer family) is used only where tiktoken can load it (it needs its own download/cache).
"""
import argparse
import base64
import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CORPUS = os.path.join(HERE, "data", "shakespeare_tiny.txt")
GPT2_BPE_FILE = os.path.join(HERE, "data", "gpt2.tiktoken")
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
    """The <|endoftext|> id: EOS and pad (SPEC §2)."""
    return enc.eot_token


def prepare(input_path, out_dir, tokenizer="gpt2", val_fraction=0.1, seq_len=64):
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
    # windows are seq_len tokens; a split needs one full window (nanoGPT's get_batch needs seq_len + 0)
    if n < seq_len:
        raise DataError(f"input file {input_path} has {n} tokens, fewer than one training sequence ({seq_len})")
    n_val = int(n * val_fraction)
    n_train = n - n_val
    if n_val < seq_len:
        raise DataError(f"validation split has {n_val} tokens, fewer than one sequence ({seq_len}); "
                        "use a larger file or --val_fraction")
    if n_train < seq_len:
        raise DataError(f"training split has {n_train} tokens, fewer than one sequence ({seq_len})")
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    arr = np.array(ids, dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", arr[:n_train]), ("val", arr[n_train:])):
        tmp = os.path.join(out_dir, f"{split}.bin.tmp")
        part.tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, f"{split}.bin"))
    meta = dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, eot_id=eot_id(enc), dtype=np.dtype(dtype).name,
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_CORPUS, help="UTF-8 text file to tokenize (default: embedded Shakespeare)")
    p.add_argument("--out_dir", default=os.path.join(HERE, "data", "shakespeare"), help="where train.bin/val.bin/meta.json go")
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "cl100k_base"], help="tiktoken encoding")
    p.add_argument("--val_fraction", type=float, default=0.1, help="fraction of tokens (the end of the file) held out")
    p.add_argument("--min_seq_len", type=int, default=64, help="each split must hold at least one sequence this long")
    a = p.parse_args(argv)
    try:
        meta = prepare(a.input, a.out_dir, a.tokenizer, a.val_fraction, a.min_seq_len)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']}, {meta['dtype']})")


if __name__ == "__main__":
    main()
