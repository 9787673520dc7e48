"""The history testbed (testbed.py, measures.eval_testbed): the languages' generator, the byte tokenizer and the
prepared folder, the scorers on hand-made cases, eval.py --testbed end to end, and a tiny AR model that must learn to
close what a held-out prefix leaves open."""
import json
import random
from collections import Counter

import pytest
import torch

import eval as evaluate
import train
from baselines import LMConfig, TransformerLM, ar_generate
from measures import eval_testbed
from scoring import completion_prefixes, open_brackets, score_completion, valid_line
from conftest import bad_input_is_one_line
from tokendata import TokenData
from prepare import prepare
from testbed import dyck_line, write_testbed
from tokenizer import get_tokenizer


def stream(n, seed, pairs="()", **short):
    return "\n" + "".join(dyck_line(random.Random(seed * 100_003 + i), pairs, **short) + "\n" for i in range(n))


@pytest.mark.parametrize("pairs", ["()", "()[]"])
def test_lines_are_balanced_with_the_stated_lengths_and_depth(pairs):
    lines = stream(400, 0, pairs).split("\n")[1:-1]
    assert all(valid_line(x) and len(x) % 2 == 0 and 16 <= len(x) <= 56 for x in lines)
    depth = lambda x: max(len(open_brackets(x[:i])) for i in range(len(x) + 1))
    assert max(map(depth, lines)) == 8 and {len(x) for x in lines} >= {16, 56}  # the bounds are reached
    assert set("".join(lines)) == set(pairs)  # Dyck-2 uses both kinds


def test_scorers_on_hand_made_cases():
    assert valid_line("(()())") and valid_line("([]())")
    assert not any(map(valid_line, ["", "(()", "())(", ")(", "([)]", "(a)", "(\n)"]))
    assert score_completion("((", "))\n((") == (True, 0)     # judged up to the first newline only
    assert score_completion("((", ")\n") == (False, 1)       # one left open
    assert score_completion("((", ")))(\n") == (False, 0)    # balanced in count, but closes one never opened
    assert score_completion("((", ")))\n") == (False, -1)
    assert score_completion("((", "))") == (False, 0)        # no newline: the line never ends
    assert score_completion("[(", ")]\n") == (True, 0) and score_completion("[(", "])\n") == (False, 0)
    assert completion_prefixes("()(\n" + "(" * 20 + ")" * 20 + "\n(())\n", 5, 31) == ["(" * 20 + ")" * 11]


def test_testbed_folder_reads_as_prepared_data(tmp_path):
    lines, tok = write_testbed(str(tmp_path), "dyck2", n_lines=1500, seed=3)
    meta = prepare(lines, str(tmp_path), tokenizer=tok, seq_len=128)
    enc = get_tokenizer(meta["tokenizer"])
    assert meta["vocab_size"] == 257 and meta["eot_id"] == 256 and enc.encode_ordinary("([\n") == [40, 91, 10]
    data = TokenData(str(tmp_path), 128)
    x = data.batch("train", 4, 0, "cpu")  # (4, 128)
    assert x.shape == (4, 128) and int(x.max()) < 256
    val = enc.decode(data.tokens("val").tolist())
    prefixes = completion_prefixes(val, 1000)
    assert len(prefixes) > 20 and all(len(open_brackets(p)) % 2 == 1 for p in prefixes)


def test_eval_testbed_flag_end_to_end(tmp_path, capsys):
    """train.py on the testbed unchanged, then eval.py --testbed: every measure in [0, 1] (the error in brackets),
    with its standard errors, and the JSON written; data with no line of brackets is one line."""
    lines, tok = write_testbed(str(tmp_path / "d"), n_lines=1500)
    prepare(lines, str(tmp_path / "d"), tokenizer=tok, seq_len=128)
    run = str(tmp_path / "ar")
    train.main(["--preset", "tiny", "--model", "ar", "--data_dir", str(tmp_path / "d"), "--out_dir", run,
                "--seq_len", "128", "--main_iters", "2", "--no-compile", "--lm_layers", "1", "--batch_size", "2"])
    res = evaluate.main(["--out_dir", run, "--testbed", "4", "--n_samples", "2", "--sample_len", "24",
                         "--sample_repeats", "2", "--sample_temperature", "1"])
    assert res["prompts"] == 4 and 0 <= res["uncond_valid"] <= 1 and 0 <= res["completion_valid"] <= 1
    assert res["open_left_abs"] >= abs(res["open_left"]) and res["completion_valid_se_seeds"] >= 0
    assert json.load(open(f"{run}/eval.json"))["completion_valid"] == res["completion_valid"]
    (tmp_path / "words.txt").write_text("no brackets here\n" * 400)  # the same tokenizer, other data: one line
    prepare(str(tmp_path / "words.txt"), str(tmp_path / "w"), tokenizer=str(tmp_path / "d" / "tokenizer.json"))
    bad_input_is_one_line(evaluate.main, ["--out_dir", run, "--testbed", "4", "--data_dir", str(tmp_path / "w"),
                                          "--results", str(tmp_path / "r.json")], "no held-out line", [run], capsys)


def test_ar_learns_to_close_what_the_history_left_open():
    """A 2-layer AR model trained for a few seconds on short Dyck-1 lines (16-32 characters, depth <= 4, windows
    starting at a line) closes most held-out 15-character prefixes exactly, far above the best rule that ignores the
    prefix (always closing the most common number of brackets). Mutation: layers.block_causal_mask with == for <=
    (each token attends to itself alone, so the model never reads the history) leaves it at 0."""
    torch.manual_seed(0)
    short = dict(lo=16, hi=32, max_depth=4)
    ids = torch.tensor(list(stream(3000, 1, **short).encode()))
    starts = (ids[:-49] == 10).nonzero()[:, 0]  # windows of 49 tokens from a newline
    model = TransformerLM(LMConfig(vocab_size=257, width=48, n_layers=2, n_heads=2, mlp_hidden=96, max_seq_len=128))
    opt, g = torch.optim.AdamW(model.parameters(), lr=5e-3), torch.Generator().manual_seed(1)
    for step in range(300):
        x = ids[starts[torch.randint(0, len(starts), (32,), generator=g)][:, None] + torch.arange(49)]  # (32, 49)
        opt.zero_grad()
        model(x)["loss"].backward()
        opt.step()
    held = stream(300, 2, **short)
    make = lambda seed: lambda prompts, n: ar_generate(model.eval(), prompts, n, eos_id=256)
    res = eval_testbed(make, lambda t: list(t.encode()), lambda s: bytes(s).decode(errors="replace"), held, 64, 4, 48,
                       0, 1, prefix_len=15)
    prefixes = completion_prefixes(held, 64, 15)
    best_blind = max(Counter(len(open_brackets(p)) for p in prefixes).values()) / len(prefixes)
    assert res["prompts"] == 64 and res["completion_valid"] > best_blind + 0.25, (res["completion_valid"], best_blind)
