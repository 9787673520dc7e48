"""The history testbed: synthetic languages whose every line is fixed by its own history, byte-tokenized and prepared
for train.py unchanged (docs/results.md, the history testbed: the AR run below, 1.55e13 FLOPs, closes 0.98 of the
held-out prefixes in 5-7 minutes on 2 cores at one thread; the Cola run, the cpu preset, spends the same FLOPs).

    python testbed.py --out_dir data/dyck1                     # Dyck-1: balanced ( ), one line per sequence
    python testbed.py --out_dir data/dyck2 --language dyck2    # Dyck-2: ( ) and [ ], closed in the order opened
    python train.py --data_dir data/dyck1 --seq_len 128 --model ar --lm_layers 2 --main_iters 2400 --out_dir runs/ar
    python train.py --data_dir data/dyck1 --seq_len 128 --batch_size 4 --vae_iters 150 --main_iters 166 --out_dir runs/c
    python eval.py --out_dir runs/ar --testbed 128             # unconditional and completion validity, brackets left

Each line has a random even length in [16, 56] and depth at most 8. The tokenizer.json written beside the shards is
byte-level: ids 0-255 the bytes, 256 <|endoftext|>, no merges. Prepared with prepare.py's default chunked split, so
the validation split's lines, which training never reads, give eval.py its completion prompts."""
import json
import os
import random
import subprocess
import sys

from cli import Parser, check_writable_dir, fail, positive_int, script
from tokenizer import REPO_DIR, byte_alphabet

KINDS = {"dyck1": "()", "dyck2": "()[]"}  # the language's bracket pairs, opener then closer


def dyck_line(rng, pairs="()", lo=16, hi=56, max_depth=8):
    """One balanced line, a random even length in [lo, hi], depth <= max_depth: open (any kind) or close, even odds."""
    n, out, stack = rng.randrange(lo // 2, hi // 2 + 1) * 2, [], []
    for i in range(n):
        can_open = len(stack) < max_depth and len(stack) + 1 <= n - i - 1  # room left to close it
        if can_open and (not stack or rng.random() < 0.5):
            stack.append(pairs[2 * rng.randrange(len(pairs) // 2)])
            out.append(stack[-1])
        else:
            out.append(pairs[pairs.index(stack.pop()) + 1])
    return "".join(out)


def write_testbed(out_dir, language="dyck1", n_lines=50_000, seed=0):
    """lines.txt and the byte-level tokenizer.json in out_dir -> their paths, for prepare.py to make shards beside."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    with open(lines := os.path.join(out_dir, "lines.txt"), "w", encoding="utf-8") as f:
        f.write("\n" + "".join(dyck_line(rng, KINDS[language]) + "\n" for _ in range(n_lines)))
    spec = {"version": "1.0", "added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True}],
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[^\n]+|\n"}, "behavior": "Isolated"},
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {c: b for b, c in byte_alphabet().items()}, "merges": []}}
    with open(tok := os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return lines, tok


@script
def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out_dir", required=True, help="where lines.txt, tokenizer.json and the shards go")
    p.add_argument("--language", default="dyck1", choices=list(KINDS), help="which language")
    p.add_argument("--lines", type=positive_int, default=50_000, help="lines to write (about 36 bytes each)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    a = p.parse_args(argv)
    check_writable_dir(a.out_dir, "--out_dir")
    if os.path.exists(os.path.join(a.out_dir, "meta.json")):
        fail(f"--out_dir {a.out_dir} already holds prepared data; name a new folder")
    lines, tok = write_testbed(os.path.abspath(a.out_dir), a.language, a.lines, a.seed)
    # prepared by prepare.py's own command line (no script imports another): its lock, its checks, its one line
    sys.exit(subprocess.run([sys.executable, os.path.join(REPO_DIR, "prepare.py"), "--input", lines, "--out_dir",
                             a.out_dir, "--tokenizer", tok, "--min_seq_len", "128"]).returncode)


if __name__ == "__main__":
    main()
