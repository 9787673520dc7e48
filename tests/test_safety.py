"""Issue 26: no script writes over a file it did not create in this run unless asked (--overwrite); every check
runs before the work; bad input is one line 'error: ...' on stderr, no traceback, every existing file as it was."""
import json
import os
import shutil
import sys

import pytest

import bench
import eval as ev
import prepare
import scaling
from conftest import ROOT, bad_input_is_one_line, one_line_error
from test_errors import runs, tree_hashes  # noqa: F401 (runs: the shared tiny Cola and AR runs)

SCRIPTS = {"eval": ev, "bench": bench, "prepare": prepare, "scaling": scaling}
SMALL_EVAL = ["--batches", "1", "--batch_size", "2", "--builtin_n", "2", "--n_samples", "2", "--sample_len", "8",
              "--task_max_new", "4", "--sample_repeats", "1", "--diag_windows", "0", "--fm_batches", "2",
              "--ll_steps", "2", "--iwae_k", "1", "--steps", "2"]


def task_line(prompt="ROMEO:", answer="love"):
    return json.dumps({"prompt": prompt, "answer": answer}) + "\n"


@pytest.fixture(scope="session")
def safe(tmp_path_factory, runs, data_dir):  # noqa: F811
    """The rows' materials, made once; every row must leave all of them as they are."""
    t = tmp_path_factory.mktemp("safety")
    m = {"data": data_dir, "cola": runs["cola"], "ar": runs["ar"], "text": str(t / "text.txt"),
         "tiny_text": str(t / "tiny.txt"), "binary": str(t / "binary.bin"),
         "tok": os.path.join(os.path.dirname(data_dir), "tokenizer.json")}
    open(m["text"], "w").write(open(os.path.join(ROOT, "data", "shakespeare_tiny.txt")).read()[:5000])
    open(m["tiny_text"], "w").write("ROMEO: love\n")
    open(m["binary"], "wb").write(bytes(range(256)) * 4)
    m["cola2"] = shutil.copytree(runs["cola"], str(t / "cola2"))  # with a task file among its generations
    os.makedirs(os.path.join(m["cola2"], "generations"), exist_ok=True)
    open(os.path.join(m["cola2"], "generations", "mine.jsonl"), "w").write(task_line())
    m["ar_genfile"] = shutil.copytree(runs["ar"], str(t / "ar_genfile"))  # 'generations' is a file
    open(os.path.join(m["ar_genfile"], "generations"), "w").write("not a folder")
    m["ar_png"] = shutil.copytree(runs["ar"], str(t / "ar_png"), ignore=shutil.ignore_patterns("*.png"))
    os.makedirs(os.path.join(m["ar_png"], "training_curves.png"))  # a folder where eval.py writes its plot
    for sub in ("a", "b"):
        os.makedirs(t / sub)
        open(t / sub / "t.jsonl", "w").write(task_line())
    m["lambada"] = str(t / "lambada_style.jsonl")
    open(m["lambada"], "w").write(task_line())
    m["tasks_a"], m["tasks_b"] = str(t / "a" / "t.jsonl"), str(t / "b" / "t.jsonl")
    m["broken"] = str(tmp_path_factory.mktemp("broken"))  # outside the watched folder: a broken link has no stat
    open(os.path.join(m["broken"], "a.txt"), "w").write("ROMEO: love\n" * 100)
    os.symlink(str(t / "nowhere.txt"), os.path.join(m["broken"], "b.txt"))
    for name, text in (("abl_up", "base\n../x --lr 1\n"), ("abl_two", "base\nx --lr 1\nx --lr 2\n"),
                       ("abl_from", "base\nx from=nope --lr 1\n")):
        m[name] = str(t / f"{name}.txt")
        open(m[name], "w").write(text)
    m["bad_results"], m["bad_meta"] = str(t / "bad_results"), str(t / "bad_meta")
    os.makedirs(t / "bad_results" / "cola_1")
    os.makedirs(t / "bad_meta")
    open(t / "bad_results" / "cola_1" / "eval.json", "w").write("{")
    open(t / "bad_meta" / "meta.json", "w").write("{")
    m["root"] = str(t)
    return m


# script | argv ({name}: a placeholder of safe(), {fresh}: a new folder) | a fragment of the one-line error
CASES = [tuple(part.strip() for part in row.split("|")) for row in """
scaling | --judge {cola}/judge.pt --out_root {fresh}                      | is not a checkpoint file
scaling | --judge {cola} --out_root {fresh}                               | is not a checkpoint file
scaling | --judge {data}/ckpt.pt --out_root {fresh}                       | train the judge into a new folder
scaling | --levels inf --judge {ar}/ckpt.pt --out_root {fresh}            | --levels: 'inf' must list finite numbers
scaling | --levels nan --judge {ar}/ckpt.pt --out_root {fresh}            | --levels: 'nan' must list finite numbers
scaling | --ablations {binary} --judge {ar}/ckpt.pt --out_root {fresh}    | cannot be read as UTF-8 text
eval    | --ckpt {cola}/ckpt.pt --results {cola}/ckpt.pt                  | exists and is not an eval result
eval    | --ckpt {cola}/ckpt.pt --results {data}/meta.json                | exists and is not an eval result
eval    | --ckpt {cola2}/ckpt.pt --tasks {cola2}/generations/mine.jsonl   | is where its generations go
eval    | --ckpt {cola}/ckpt.pt --tasks {tasks_a} {tasks_b}               | share the name t
eval    | --ckpt {cola}/ckpt.pt --tasks {lambada}                         | has the name of a built-in task
eval    | --ckpt {ar_genfile}/ckpt.pt                                     | is a file, not a folder
eval    | --ckpt {ar_png}/ckpt.pt                                         | is a folder, where eval.py writes a file
eval    | --ckpt {cola}/ckpt.pt --seed 99999999999999999999               | argument --seed: must be <= 4294967295
prepare | --input {text} --out_dir {data} --tokenizer {tok}               | already holds prepared data
prepare | --input {tiny_text} --out_dir {fresh} --tokenizer {tok}         | fewer than one training sequence
prepare | --input {text} --out_dir {fresh} --val_fraction 0.9            | must be 1/k
prepare | --input {broken} --out_dir {fresh}                              | is not a readable file (a broken link?)
bench   | --vocab_size 1000000000000                                      | its embedding and head alone need
bench   | --batches 100000000                                             | AR's keys and values alone need
bench   | --train --batch_size 100000000 --preset tiny                    | AR's keys and values alone need
scaling | --levels 1e300 --judge {ar}/ckpt.pt --out_root {fresh}          | more than a million times
scaling | --table_only --levels 1 --out_root {bad_results}                | is not an eval result (JSONDecodeError)
scaling | --out_root {text} --judge {ar}/ckpt.pt --levels 1               | is a file, not a folder
scaling | --train_args=--data_dir={bad_meta} --judge {ar}/ckpt.pt         | is not a valid meta.json
scaling | --ablations {abl_up} --judge {ar}/ckpt.pt --out_root {fresh}    | must be a plain folder name
scaling | --ablations {abl_two} --judge {ar}/ckpt.pt --out_root {fresh}   | two runs share the name x
scaling | --ablations {abl_from} --judge {ar}/ckpt.pt --out_root {fresh}  | from=nope names no run
prepare | --input {text} --out_dir {fresh} --workers 100000                | more than 4 per CPU core
scaling | --eval_args=--nonsense --judge {ar}/ckpt.pt --out_root {fresh}   | unrecognized arguments: --nonsense
""".strip().splitlines()]


@pytest.mark.parametrize("script,argv,message", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_is_one_line(script, argv, message, tmp_path, safe, capsys):
    m = {**safe, "fresh": str(tmp_path / "fresh")}
    argv = [a.format(**m) for a in argv.split()]
    bad_input_is_one_line(SCRIPTS[script].main, argv, message, [m["cola"], m["ar"], m["data"], m["root"]], capsys)
    assert not [f for f in tree_hashes([m["fresh"]]) if f.endswith(".tmp")]  # a failed run leaves no temporary file


def eval_copy(tmp_path, run, *extra):
    out = shutil.copytree(run, str(tmp_path / "run"))
    ev.main(["--out_dir", out] + SMALL_EVAL + list(extra))
    return json.load(open(os.path.join(out, "eval.json")))


@pytest.mark.parametrize("text", ["the same line of text here\n" * 400, "春眠不覺曉處處聞啼鳥夜來風雨聲花落知多少\n" * 60])
def test_eval_finishes_on_odd_corpora(text, tmp_path, runs, data_dir):  # noqa: F811
    """A corpus of one repeated line (the ending task's distractor loop never ended) and a CJK corpus (no
    spaces: the cloze's word draw raised): eval.py finishes and writes eval.json."""
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    prepare.prepare(str(tmp_path / "c.txt"), str(tmp_path / "prep"), os.path.join(os.path.dirname(data_dir), "tokenizer.json"),
                    seq_len=16)
    assert eval_copy(tmp_path, runs["ar"], "--data_dir", str(tmp_path / "prep"))["kind"] == "ar"


def test_torn_log_line_is_skipped(tmp_path, runs):  # noqa: F811
    """A run killed mid-write leaves a torn last log line: eval.py still writes eval.json (it failed after
    every measure). Mutation: json.loads of every line raises."""
    run = shutil.copytree(runs["ar"], str(tmp_path / "src"))
    log = next(f for f in os.listdir(run) if f.startswith("log_"))
    open(os.path.join(run, log), "a").write('{"step": 9, "lo')
    assert eval_copy(tmp_path, run)["kind"] == "ar"
    assert os.path.exists(tmp_path / "run" / "training_curves.png")


def test_snapshot_results_default_apart_from_out(monkeypatch, tmp_path):
    """--init_from without --out_dir: the results go to out_release, never over out/eval.json of one's own run."""
    seen = []
    monkeypatch.setattr(ev, "check_results", lambda path: seen.append(path) or sys.exit(3))
    with pytest.raises(SystemExit):
        ev.main(["--init_from", str(tmp_path)])
    assert seen == [os.path.join(ROOT, "out_release", "eval.json")]


def test_prepare_overwrite_replaces(tmp_path, safe, data_dir):
    """--overwrite is the way past the refusal; a fresh folder needs none, and the same input prepared the same
    way again is left as it is (the README's first command may run twice)."""
    argv = ["--input", safe["text"], "--out_dir", str(tmp_path / "p"), "--tokenizer", safe["tok"], "--min_seq_len", "16"]
    prepare.main(argv)
    before = tree_hashes([str(tmp_path / "p")])
    prepare.main(argv)
    assert tree_hashes([str(tmp_path / "p")]) == before
    prepare.main(argv + ["--overwrite"])
    assert tree_hashes([str(tmp_path / "p")]) != before


def test_ablations_file_still_plans():
    a = scaling.get_args(["--ablations", os.path.join(ROOT, "ablations.txt"), "--table_only"])
    assert scaling.plan_ablations(a)[0][0] == "base"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_one_line(tmp_path, runs, capsys):  # noqa: F811
    run = shutil.copytree(runs["ar"], str(tmp_path / "ro"))
    os.chmod(run, 0o555)
    try:
        assert "is not writable" in one_line_error(ev.main, ["--ckpt", os.path.join(run, "ckpt.pt"), "--results",
                                                             str(tmp_path / "r.json")], capsys)
    finally:
        os.chmod(run, 0o755)
