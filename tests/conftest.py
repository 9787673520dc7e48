import json
import os

import pytest
import torch

from prepare import prepare
from tokenizer import byte_alphabet

CL100K = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
          r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tests' models are tiny: one thread is as fast as two on a quiet machine and several times faster on a busy
# one; the scripts the tests start inherit it
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def root():
    return ROOT


def one_line_error(main, argv, capsys):
    """Run a script's main(argv) in this process, expecting it to stop with one line on stderr -> that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    lines = (capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """20,000 characters of Shakespeare, prepared with a small byte-level tokenizer.json (265 ids): tiny models
    on it spend their time in the model, not in a 50,257-wide vocabulary head."""
    d = tmp_path_factory.mktemp("data")
    src = d / "text.txt"
    src.write_text(open(os.path.join(os.path.dirname(__file__), "..", "data", "shakespeare_tiny.txt"),
                        encoding="utf-8").read()[:20000], encoding="utf-8")
    write_tokenizer_json(str(d / "tokenizer.json"))
    prepare(str(src), str(d / "prep"), tokenizer=str(d / "tokenizer.json"), seq_len=16)
    return str(d / "prep")


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("n", "d"), ("Ġa", "nd")]
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_end|>"]


def write_tokenizer_json(path, template=False):
    """A byte-level BPE in the Hugging Face format, laid out as OLMo 2's: ids 0..255 the bytes, then merges,
    then the special tokens; a cl100k-style Split regex before a ByteLevel step."""
    chars = byte_alphabet()
    vocab = {chars[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    added = [{"id": len(vocab) + i, "content": t, "special": True} for i, t in enumerate(SPECIALS)]
    spec = {"version": "1.0", "added_tokens": added,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CL100K}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in MERGES]}}
    if template:
        eot = added[0]["id"]
        spec["post_processor"] = {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eot], "tokens": ["<|endoftext|>"]}}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return len(vocab) + len(added)



def bad_input_is_one_line(main, argv, message, watched, capsys):
    """main(argv) stops with exactly one line 'error: ...' holding `message`, no traceback, and every file under
    the `watched` folders as it was (tree_hashes)."""
    before = tree_hashes(watched)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
    lines = err.strip().splitlines()
    assert e.value.code not in (0, None)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert tree_hashes(watched) == before  # nothing already written was touched


def tree_hashes(paths):
    """Size, modification time and inode of every file under the given folders (checkpoints, shards,
    meta.json, logs): a file written, replaced or removed changes its entry."""
    out = {}
    for top in paths:
        for d, _, files in os.walk(top):
            for f in files:
                st = os.stat(os.path.join(d, f))
                out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out
