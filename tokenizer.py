"""Tokenizers as tiktoken Encodings (docs/method.md §2): the vendored GPT-2 BPE (offline, hash-checked), cl100k_base
where tiktoken can load it, and any byte-level BPE tokenizer.json (the release's format), read without `tokenizers`."""
import base64
import functools
import hashlib
import os

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from cli import read_json

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
GPT2_BPE_FILE = os.path.join(REPO_DIR, "data", "gpt2.tiktoken")
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


class DataError(ValueError):
    """Bad input data; the message is one line meant for the user."""


def sha256_of(*paths, ends=0):
    """The sha256 of the files' bytes, one after the other; ends=n: of each one's first and last n bytes alone (a
    shard's check: another corpus's shard of the same size differs there, and it costs no more for a large one)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            if ends:
                h.update(f.read(ends))
                f.seek(max(ends, os.path.getsize(path) - ends))
            for chunk in iter(lambda: f.read(1 << 16), b""):
                h.update(chunk)
    return h.hexdigest()


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
    post = read_json(path).get("post_processor") or {}
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
        spec = read_json(path)
        model, specials = spec["model"], {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
        vocab, merges = model["vocab"], model.get("merges", [])
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise TypeError("model.vocab must be an object, model.merges a list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE":
        raise DataError(f"{path}: model type {model.get('type')!r} is not a byte-level BPE")
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    if not pattern or not isinstance(pattern, str):  # tiktoken panics on an empty one
        raise DataError(f"{path}: pre_tokenizer has no (non-empty) Split regex to read")
    to_byte, special_ids = {c: b for b, c in byte_alphabet().items()}, set(specials.values())
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
