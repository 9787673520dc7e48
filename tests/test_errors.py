"""Bad input, as a new (and careless) user gives it: every row is one script with one bad value, and must end in
one line 'error: ...' on stderr, no traceback, with every checkpoint and data file as it was. Then the cases
that could lose work: a non-finite step never replaces a good checkpoint, two runs never share a folder,
a fresh run never overwrites a checkpoint, a log keeps no step twice after a resume."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import bench
import eval as ev
import prepare
import sample
import train
from checkpoint import load_checkpoint, save_checkpoint
from conftest import bad_input_is_one_line, tree_hashes

TINY = ["--preset", "tiny", "--latent_dim", "8", "--block_size", "4", "--seq_len", "16", "--batch_size", "2",
        "--no-compile", "--dtype", "float32", "--log_interval", "1", "--eval_iters", "1", "--warmup_iters", "2"]
SCRIPTS = {"train": train, "sample": sample, "eval": ev, "bench": bench, "prepare": prepare}


@pytest.fixture(scope="session")
def runs(tmp_path_factory, data_dir):
    """A tiny Cola run (both stages) and a tiny AR run, trained once; the rows below must leave them as they are."""
    root = tmp_path_factory.mktemp("runs")
    train.main(["--data_dir", data_dir, "--out_dir", str(root / "cola"), "--vae_iters", "2", "--main_iters", "2",
                "--eval_interval", "2"] + TINY)
    train.main(["--model", "ar", "--lm_layers", "1", "--data_dir", data_dir, "--out_dir", str(root / "ar"),
                "--main_iters", "1", "--eval_interval", "1"] + TINY)
    return {"cola": str(root / "cola"), "ar": str(root / "ar")}


def corrupt_data(src, dst, how):
    shutil.copytree(src, dst)
    meta = json.load(open(os.path.join(dst, "meta.json")))
    shard = os.path.join(dst, meta["shards"]["train"][0]["file"])
    data = open(shard, "rb").read()
    if how == "odd":
        open(shard, "wb").write(data + b"\x01")
    elif how == "empty":
        open(shard, "wb").write(b"")
    elif how == "half":
        open(shard, "wb").write(data[:len(data) // 2])
    elif how == "meta":
        open(os.path.join(dst, "meta.json"), "w").write('{"dtype": "uint16", "shards": ')
    elif how == "oov":
        ids = np.frombuffer(data, dtype=np.uint16).copy()
        ids[5] = 60000  # the data's vocabulary has 265 ids
        open(shard, "wb").write(ids.tobytes())
    return dst


@pytest.fixture(scope="session")
def mats(tmp_path_factory, runs, data_dir):
    return materials(tmp_path_factory.mktemp("materials"), runs, data_dir)


def materials(tmp, runs, data_dir):
    """Every placeholder a row may name, made once in tmp (the rows must leave them as they are)."""
    m = {"data": data_dir, "cola": runs["cola"], "ar": runs["ar"],
         "unwritable": "/proc/cola_dlm_test", "a_file": str(tmp / "a_file"), "empty_dir": str(tmp / "empty_dir"),
         "nonutf8": str(tmp / "latin1.txt")}
    open(m["a_file"], "w").write("not a folder")
    os.makedirs(m["empty_dir"])
    open(m["nonutf8"], "wb").write("ROMEO: caf\xe9\n".encode("latin-1"))
    ck = load_checkpoint(os.path.join(runs["cola"], "ckpt.pt"))
    del ck["path"]
    nan = {**ck, "model": {k: (v.clone().fill_(float("nan")) if k == "dit.inp.weight" else v) for k, v in ck["model"].items()}}
    save_checkpoint(str(tmp / "nan.pt"), nan)
    save_checkpoint(str(tmp / "misfit.pt"), {**ck, "dit_config": {**ck["dit_config"], "width": 48}})
    ar = load_checkpoint(os.path.join(runs["ar"], "ckpt.pt"))
    del ar["path"]
    save_checkpoint(str(tmp / "judge_cl100k.pt"), {**ar, "tokenizer": "cl100k_base"})
    m.update(nan_ckpt=str(tmp / "nan.pt"), misfit_ckpt=str(tmp / "misfit.pt"), other_judge=str(tmp / "judge_cl100k.pt"))
    # hand edits that keep the checksum: one flipped exponent bit in a weight, and config values of the wrong kind
    flipped = {**ck, "model": {k: v.clone() for k, v in ck["model"].items()}}
    flipped["model"]["dit.inp.weight"].view(-1).view(torch.int32)[0] ^= 1 << 30
    torch.save(flipped, str(tmp / "bitflip.pt"))
    m["bitflip"] = str(tmp / "bitflip.pt")
    for name, value in (("float", 64.0), ("zero", 0), ("huge", 10**12), ("null", None), ("text", "abc")):
        torch.save({**ck, "dit_config": {**ck["dit_config"], "width": value}}, str(tmp / f"cfg_{name}.pt"))
        m[f"cfg_{name}"] = str(tmp / f"cfg_{name}.pt")
    long_task = tmp / "long.jsonl"
    long_task.write_text(json.dumps({"prompt": "word " * 1100, "ground_truth": "x"}) + "\n")
    m["long_task"] = str(long_task)
    # data of another tokenizer with the same vocabulary size (265 ids): a tokenizer.json that differs in one field
    from conftest import write_tokenizer_json
    from prepare import prepare as prepare_data
    other = tmp / "other_tokenizer.json"
    write_tokenizer_json(str(other))
    spec = json.load(open(other))
    spec["truncation"] = {"max_length": 512}
    json.dump(spec, open(other, "w"))
    (tmp / "other.txt").write_text(open(os.path.join(os.path.dirname(__file__), "..", "data", "shakespeare_tiny.txt"),
                                        encoding="utf-8").read()[:20000], encoding="utf-8")
    prepare_data(str(tmp / "other.txt"), str(tmp / "data_other"), tokenizer=str(other), seq_len=16)
    m["data_other"] = str(tmp / "data_other")
    os.makedirs(tmp / "vae_only")
    shutil.copy(os.path.join(runs["cola"], "vae.pt"), tmp / "vae_only" / "vae.pt")
    m["vae_only"] = str(tmp / "vae_only")
    for how in ("odd", "empty", "half", "meta", "oov"):
        m[f"data_{how}"] = corrupt_data(data_dir, str(tmp / f"data_{how}"), how)
    return m


# script | argv ({name}: a placeholder of materials()) | a fragment of the one-line error
CASES = [tuple(part.strip() for part in row.split("|")) for row in """
train   | --out_dir {a_file}                                             | is a file, not a folder
train   | --out_dir {unwritable}                                         | is not writable
train   | --device cuda                                                  | CUDA is not available
train   | --block_size 0                                                 | argument --block_size: must be >= 1, got 0
train   | --eval_interval 0                                              | argument --eval_interval: must be >= 1
train   | --log_interval 0                                               | argument --log_interval: must be >= 1
train   | --eval_iters 0                                                 | argument --eval_iters: must be >= 1
train   | --lr nan                                                       | argument --lr: must be a finite number
train   | --lr -1                                                        | argument --lr: must be a finite number in (0, inf]
train   | --lr inf                                                       | argument --lr: must be a finite number
train   | --out_dir {cola} --resume --lr inf                             | argument --lr: must be a finite number
train   | --beta2 1.5                                                    | argument --beta2: must be a finite number in [0, 1)
train   | --dropout 2                                                    | argument --dropout
train   | --dit_width 0                                                  | argument --dit_width: must be >= 1
train   | --vae_width 0                                                  | argument --vae_width: must be >= 1
train   | --main_iters 0                                                 | argument --main_iters: must be >= 1
train   | --seq_len 18                                                   | must be a multiple of block_size
train   | --resume --overwrite                                           | contradict each other
train   | --out_dir {cola} --resume --dit_width 96                       | --dit_width 96 contradicts
train   | --out_dir {cola} --resume --preset cpu                         | --preset cpu contradicts
train   | --out_dir {cola} --resume --latent_dim 4                       | --latent_dim 4 contradicts
train   | --out_dir {cola} --resume --stage joint --vae_lr_ratio 0       | --vae_lr_ratio 0 contradicts
train   | --out_dir {empty_dir} --resume                                 | holds no vae.pt or ckpt.pt to resume
train   | --out_dir {cola}                                               | add --resume to continue it, --overwrite to replace it
train   | --out_dir {cola} --model ar                                    | holds a cola checkpoint (step
train   | --out_dir {ar} --resume                                        | holds a 'ar' model, expected cola
train   | --out_dir {fresh} --stage joint                                | train stage 1 first
train   | --out_dir {fresh} --data_dir {data_odd}                        | meta.json says
train   | --out_dir {fresh} --data_dir {data_empty}                      | holds 0 bytes
train   | --out_dir {fresh} --data_dir {data_half}                       | truncated or changed
train   | --out_dir {fresh} --data_dir {data_meta}                       | is not a valid meta.json
train   | --out_dir {fresh} --data_dir {data_oov}                        | outside the vocabulary of 265
sample  | --ckpt {cola}/ckpt.pt --steps 0                                | argument --steps: must be >= 1
sample  | --ckpt {cola}/ckpt.pt --guidance nan                           | argument --guidance: must be a finite number
sample  | --ckpt {cola}/ckpt.pt --repetition_penalty nan                 | argument --repetition_penalty
sample  | --ckpt {cola}/ckpt.pt --temperature nan                        | argument --temperature
sample  | --ckpt {cola}/ckpt.pt --noise_scale -1                         | argument --noise_scale: must be a finite number
sample  | --ckpt {cola}/ckpt.pt --top_p 0                                | argument --top_p
sample  | --ckpt {cola}/ckpt.pt --device cuda                            | CUDA is not available
sample  | --ckpt {cola}/ckpt.pt --prompt FILE:{nonutf8}                  | is not UTF-8 text
sample  | --ckpt {nan_ckpt}                                              | tensor dit.inp.weight holds NaN or Inf
sample  | --ckpt {misfit_ckpt}                                           | its weights do not fit its config
sample  | --init_from {empty_dir}                                        | cola_vae is missing
eval    | --ckpt {cola}/ckpt.pt --batches 0                              | argument --batches: must be >= 1
eval    | --ckpt {cola}/ckpt.pt --steps 0                                | argument --steps: must be >= 1
eval    | --ckpt {cola}/ckpt.pt --sample_repeats 0                       | argument --sample_repeats
eval    | --ckpt {cola}/ckpt.pt --diag_windows -3                        | argument --diag_windows: must be >= 0
eval    | --ckpt {cola}/ckpt.pt --sweep_steps a,b                        | is not a comma list of integers
eval    | --ckpt {cola}/ckpt.pt --results {unwritable}/eval.json         | --results
eval    | --ckpt {cola}/ckpt.pt --tasks {nonutf8}                        | is not UTF-8 text
eval    | --score {nonutf8}                                              | is not UTF-8 text
eval    | --score {empty_dir}                                            | is not a file
eval    | --ckpt {cola}/ckpt.pt --tasks {long_task}                      | exceed the model's context of 1024 tokens
eval    | --ckpt {cola}/ckpt.pt --judge {other_judge}                    | uses tokenizer cl100k_base
eval    | --ckpt {nan_ckpt}                                              | holds NaN or Inf
eval    | --ckpt {cola}/ckpt.pt --device cuda                            | CUDA is not available
bench   | --batches 0                                                    | argument --batches
bench   | --new_tokens 0                                                 | argument --new_tokens: must be >= 1
prepare | --shard_tokens 1 --out_dir {fresh}                             | --shard_tokens must be >= 1024
prepare | --out_dir {a_file}                                             | is a file, not a folder
prepare | --input {nonutf8} --out_dir {fresh}                            | is not UTF-8 text
sample  | --ckpt {bitflip}                                               | is corrupt: its tensors do not match their checksum
train   | --out_dir {cola} --resume --data_dir {data_other}              | was trained on
train   | --out_dir {vae_only} --stage joint --data_dir {data_other}     | was trained on
train   | --out_dir {fresh} --resume --seed 99999999999999999999999      | argument --seed: must be <= 4294967295
sample  | --ckpt {cola}/ckpt.pt --noise_scale 1e30                        | argument --noise_scale: must be a finite number in (0, 1000]
sample  | --ckpt {cola}/ckpt.pt --guidance 1e30                           | argument --guidance: must be a finite number in (0, 1000]
sample  | --ckpt {cfg_float}                                             | has width = 64.0, which this code cannot build
sample  | --ckpt {cfg_zero}                                              | has width = 0, which this code cannot build
sample  | --ckpt {cfg_huge}                                              | has width = 1000000000000, which this code cannot build
sample  | --ckpt {cfg_null}                                              | has width = None, which this code cannot build
sample  | --ckpt {cfg_text}                                              | has width = 'abc', which this code cannot build
""".strip().splitlines()]


@pytest.mark.parametrize("script,argv,message", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_is_one_line(script, argv, message, tmp_path, runs, mats, data_dir, capsys):
    m = {**mats, "fresh": str(tmp_path / "fresh")}
    argv = [a.format(**m) for a in argv.split()]
    if script == "train":
        argv = (["--data_dir", data_dir] if "--data_dir" not in argv else []) + \
               (["--out_dir", m["fresh"]] if "--out_dir" not in argv else []) + TINY + argv  # the row's flags win
    bad_input_is_one_line(SCRIPTS[script].main, argv, message, [runs["cola"], runs["ar"], data_dir,
                                                                 os.path.dirname(m["nan_ckpt"])], capsys)
    assert not os.path.exists(m["fresh"]) or not any(f.endswith(".pt") for f in os.listdir(m["fresh"]))


def test_bad_input_from_the_shell(tmp_path, runs, root):
    """The same from a real process: one line, exit status non-zero, no traceback."""
    r = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--ckpt", os.path.join(runs["cola"], "ckpt.pt"),
                        "--steps", "0"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["error: argument --steps: must be >= 1, got 0"]


# ---------------------------------------------------------------------------------------------------- work never lost

def test_resume_alone_continues_the_run_as_configured(tmp_path, data_dir):
    """A --stage all run with flags of its own (tiny sizes, --lr, the step counts), stopped inside stage 2, then
    `--resume` with no other flag but how to run (--no-compile): it continues stage 2 with the run's own flags,
    leaves vae.pt as it was, and ends bit-exactly where the uninterrupted run ends. Mutation: taking defaults for
    the flags not repeated (the cpu preset's sizes are refused as a misfit, its step counts re-run stage 1)."""
    flags = ["--data_dir", data_dir, *TINY, "--vae_iters", "2", "--main_iters", "4", "--eval_interval", "2", "--lr", "2e-3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(flags + ["--out_dir", full])
    train.main(flags + ["--out_dir", part, "--stop_after", "2"])
    assert load_checkpoint(os.path.join(part, "ckpt.pt"))["step"] == 2
    vae_before = tree_hashes([part])[os.path.join(part, "vae.pt")]
    train.main(["--out_dir", part, "--resume", "--no-compile"])
    assert tree_hashes([part])[os.path.join(part, "vae.pt")] == vae_before
    a, b = (load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (full, part))
    assert a["step"] == b["step"] == 4 and b["args"]["lr"] == 2e-3 and b["args"]["preset"] == "tiny"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(part, "log_joint.jsonl"))]
    assert steps == [2, 4]



def test_nonfinite_steps_never_replace_a_good_checkpoint(tmp_path, runs, data_dir, capsys):
    """A resumed run whose step blows the weights up (lr 1e30), and a fresh run whose first step does (lr 1e6 after
    one warm-up step): one line, the good checkpoint untouched, and no checkpoint from the fresh run. Mutation:
    saving without the finiteness checks writes NaN weights (or a NaN validation loss's weights)."""
    out = str(tmp_path / "resumed")
    shutil.copytree(runs["cola"], out)
    before = tree_hashes([out])
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", data_dir, "--out_dir", out, "--resume", "--vae_iters", "2", "--main_iters", "4",
                    "--lr", "1e30", "--eval_interval", "1"] + TINY)
    msg = str(e.value.code)
    assert msg.startswith("error: [joint]") and "nan" in msg.lower() and "ckpt.pt keeps the last good checkpoint" in msg
    assert {k: v for k, v in tree_hashes([out]).items() if "log_" not in k} == \
           {k: v for k, v in before.items() if "log_" not in k}
    fresh = str(tmp_path / "fresh")
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", data_dir, "--out_dir", fresh, "--stage", "vae", "--vae_iters", "3", "--lr", "1e6",
                    "--warmup_iters", "1", "--eval_interval", "1"] + TINY[:-2])
    assert "no checkpoint was written" in str(e.value.code)
    assert not os.path.exists(os.path.join(fresh, "vae.pt"))


def test_an_empty_or_torn_lock_is_stale(tmp_path, data_dir):
    """A train.lock left empty (a kill between creating and writing it) names no live run: the next run takes it
    over. Mutation: reading it as pid 0, which os.kill accepts (our own process group), blocks the folder forever."""
    out = tmp_path / "o"
    os.makedirs(out)
    (out / "train.lock").write_text("")
    train.main(["--data_dir", data_dir, "--out_dir", str(out), "--stage", "vae", "--vae_iters", "1", "--eval_interval", "1"]
               + TINY)
    assert load_checkpoint(str(out / "vae.pt"))["step"] == 1 and not (out / "train.lock").exists()


def test_two_runs_never_share_a_folder(tmp_path, data_dir, root, capsys):
    """A second training into a folder a live run is writing refuses in one line; the first finishes with a
    loadable checkpoint. Mutation: no lock lets both write (the second then races the first's files)."""
    out = str(tmp_path / "o")
    argv = ["--data_dir", data_dir, "--out_dir", out, "--stage", "vae", "--vae_iters", "30", "--eval_interval", "30"] + TINY
    first = subprocess.Popen([sys.executable, os.path.join(root, "train.py")] + argv, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if os.path.exists(os.path.join(out, "train.lock")):
            break
        time.sleep(0.05)
    with pytest.raises(SystemExit) as e:  # the second run, while the first trains
        train.main(argv)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    lines = (capsys.readouterr().err + str(e.value.code)).strip().splitlines()
    assert len(lines) == 1 and "is being written by another training run" in lines[0]
    assert load_checkpoint(os.path.join(out, "vae.pt"))["step"] == 30
    assert not os.path.exists(os.path.join(out, "train.lock"))


def test_resume_keeps_each_logged_step_once(tmp_path, data_dir):
    """A run killed after its log line but before its checkpoint logs those steps again on resume: the log is
    trimmed to the checkpoint's step first (a line torn by the kill is dropped, not a traceback), and temporary
    files of killed saves are cleared. Mutation: appending without the trim repeats step 4."""
    out = str(tmp_path / "o")
    common = ["--data_dir", data_dir, "--out_dir", out, "--stage", "vae", "--vae_iters", "4", "--eval_interval", "2"] + TINY
    train.main(common + ["--stop_after", "2"])
    with open(os.path.join(out, "log_vae.jsonl"), "a") as f:  # the line of a step whose checkpoint never came
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')  # and a line torn by the kill
    open(os.path.join(out, "vae.pt.999999.tmp"), "wb").write(b"a save killed halfway")
    train.main(common + ["--resume"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log_vae.jsonl"))]
    assert steps == [2, 4]
    assert not any(f.endswith(".tmp") for f in os.listdir(out))  # a killed save's temporary file is cleared


def test_a_fresh_or_overwrite_run_starts_new_logs(tmp_path, data_dir):
    """Logs belong to one run: --overwrite (and a fresh run after a failed one) does not append to the old log.
    Mutation: keeping the old log gives steps 1, 2, 1, 2."""
    out = str(tmp_path / "o")
    common = ["--data_dir", data_dir, "--out_dir", out, "--stage", "vae", "--vae_iters", "2", "--eval_interval", "1"] + TINY
    train.main(common)
    train.main(common + ["--overwrite"])
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log_vae.jsonl"))] == [1, 2]


def test_overwrite_replaces_a_checkpoint_of_another_kind(tmp_path, runs, data_dir):
    """--overwrite is the way past the refusal, whatever kind the folder holds (it must not be read first:
    mutation, loading with the new run's kind, refuses a Cola folder for an AR run)."""
    out = str(tmp_path / "cola")
    shutil.copytree(runs["cola"], out)
    train.main(["--model", "ar", "--lm_layers", "1", "--data_dir", data_dir, "--out_dir", out, "--overwrite",
                "--main_iters", "1", "--eval_interval", "1"] + TINY)
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["kind"] == "ar"
