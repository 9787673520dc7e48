"""Bad input, as a new (and careless) user gives it: every row is one script with one bad value, and must end in
one line 'error: ...' on stderr, no traceback, with every checkpoint and data file as it was. Then the cases
that could lose work: a non-finite step never replaces a good checkpoint, two runs never share a folder,
a fresh run never overwrites a checkpoint or another stage's log, a log keeps no step twice after a resume,
--resume continues exactly as configured, plots and prepared folders are replaced whole or not at all, and
Ctrl-C, SIGTERM, SIGHUP and a closed pipe end every script cleanly."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import bench
import eval as ev
import tokendata
import prepare
import sample
import scaling
import train
from checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, bad_input_is_one_line, one_line_error, tree_hashes

TINY = ["--preset", "tiny", "--latent_dim", "8", "--block_size", "4", "--seq_len", "16", "--batch_size", "2",
        "--no-compile", "--dtype", "float32", "--log_interval", "1", "--eval_iters", "1", "--warmup_iters", "2"]
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested deeper than Python's parser recurses
SCRIPTS = {"train": train, "sample": sample, "eval": ev, "bench": bench, "prepare": prepare, "scaling": scaling}


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
    elif how in ("dtype", "eot", "path"):  # hand edits of meta.json: ids read as int16, an EOT outside the
        meta = json.load(open(os.path.join(dst, "meta.json")))  # vocabulary, a shard named by a path elsewhere
        meta.update(dtype="int16") if how == "dtype" else meta.update(eot_id=10**9) if how == "eot" else \
            meta["shards"]["train"][0].update(file=os.path.join(os.path.abspath(src), meta["shards"]["train"][0]["file"]))
        json.dump(meta, open(os.path.join(dst, "meta.json"), "w"))
    elif how == "deep":
        open(os.path.join(dst, "meta.json"), "w").write(DEEP)
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
    # hand edits that keep the old checksum: one flipped exponent bit in a weight; the step; no checksum at all
    flipped = {**ck, "model": {k: v.clone() for k, v in ck["model"].items()}}
    flipped["model"]["dit.inp.weight"].view(-1).view(torch.int32)[0] ^= 1 << 30
    torch.save(flipped, str(tmp / "bitflip.pt"))
    torch.save({**ck, "step": -1000000}, str(tmp / "step_edit.pt"))
    torch.save({k: v for k, v in ck.items() if k != "checksum"}, str(tmp / "no_checksum.pt"))
    torch.save({**ck, "checksum": ck["checksum"].removeprefix("sha256:")}, str(tmp / "old_checksum.pt"))  # pre-12-08
    looped, dag = [1], [0]  # a list inside itself; 24 levels of shared lists (2^24 paths, 25 lists)
    looped.append(looped)
    for _ in range(24):
        dag = [dag, dag]
    torch.save({**ck, "extra": looped}, str(tmp / "looped.pt"))
    torch.save({**ck, "extra": dag}, str(tmp / "dag.pt"))
    m.update({n: str(tmp / f"{n}.pt") for n in ("bitflip", "step_edit", "no_checksum", "old_checksum", "looped", "dag")})
    # config values of the wrong kind, or of a size no machine holds, checksummed as a writer that checks nothing
    for name, field, value in (("float", "width", 64.0), ("zero", "width", 0), ("huge", "width", 10**12),
                               ("null", "width", None), ("text", "width", "abc"), ("wide", "width", 99_999_998),
                               ("deep", "n_layers", 99_999_999)):
        save_checkpoint(str(tmp / f"cfg_{name}.pt"), {**ck, "dit_config": {**ck["dit_config"], field: value}})
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
    (tmp / "text2.txt").write_text(open(os.path.join(ROOT, "data", "shakespeare_tiny.txt"), encoding="utf-8").read()
                                   [20000:30000], encoding="utf-8")  # other text, the run's own tokenizer
    prepare_data(str(tmp / "text2.txt"), str(tmp / "data_text2"), os.path.join(os.path.dirname(data_dir),
                                                                                "tokenizer.json"), seq_len=16)
    m["data_text2"] = str(tmp / "data_text2")
    shutil.copytree(data_dir, tmp / "data_metatok")  # meta.json hand-edited to another tokenizer
    meta = json.load(open(tmp / "data_metatok" / "meta.json"))
    json.dump({**meta, "tokenizer": "gpt2"}, open(tmp / "data_metatok" / "meta.json", "w"))
    m["data_metatok"] = str(tmp / "data_metatok")
    save_checkpoint(str(tmp / "tok_edit.pt"), {**ck, "tokenizer": "gpt2"})  # a checkpoint naming another tokenizer
    m["tok_edit"] = str(tmp / "tok_edit.pt")
    os.makedirs(tmp / "dag_run")
    shutil.copy(tmp / "dag.pt", tmp / "dag_run" / "ckpt.pt")
    m["dag_run"] = str(tmp / "dag_run")
    os.makedirs(tmp / "vae_only")
    shutil.copy(os.path.join(runs["cola"], "vae.pt"), tmp / "vae_only" / "vae.pt")
    m["vae_only"] = str(tmp / "vae_only")
    for how in ("odd", "empty", "half", "meta", "oov", "dtype", "eot", "path", "deep"):
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
train   | --dit_width 99999998                                           | the weights these flags ask for alone need
train   | --vae_layers 99999999                                          | the weights these flags ask for alone need
train   | --seq_len 18                                                   | must be a multiple of block_size
train   | --resume --overwrite                                           | contradict each other
train   | --out_dir {cola} --resume --dit_width 96                       | --dit_width 96 contradicts
train   | --out_dir {cola} --resume --preset cpu                         | --preset cpu contradicts
train   | --out_dir {cola} --resume --latent_dim 4                       | --latent_dim 4 contradicts
train   | --out_dir {cola} --resume --stage joint --vae_lr_ratio 0       | --vae_lr_ratio 0 contradicts
train   | --out_dir {empty_dir} --resume                                 | holds no vae.pt or ckpt.pt to resume
train   | --out_dir {cola} --resume --seed 7                             | --seed 7 contradicts
train   | --out_dir {cola} --resume --batch_size 4                       | --batch_size 4 contradicts
train   | --out_dir {cola} --resume --grad_accum 2                       | --grad_accum 2 contradicts
train   | --out_dir {cola} --resume --fm_batch_mult 2                    | --fm_batch_mult 2 contradicts
train   | --out_dir {cola} --resume --dropout 0.3                        | --dropout 0.3 contradicts
train   | --out_dir {cola} --resume --data_dir {data_text2}              | holds other text than
train   | --out_dir {cola} --resume --main_iters 2                       | --main_iters 2 is not above the step
train   | --out_dir {cola} --resume --stage vae --vae_iters 1            | --vae_iters 1 is not above the step
train   | --out_dir {cola}                                               | add --resume to continue it, --overwrite to replace it
train   | --out_dir {cola} --model ar                                    | holds a cola checkpoint (step
train   | --out_dir {ar} --resume                                        | holds a 'ar' model, expected cola
train   | --out_dir {fresh} --stage joint                                | train stage 1 first
train   | --out_dir {fresh} --data_dir {data_odd}                        | meta.json says
train   | --out_dir {fresh} --data_dir {data_empty}                      | holds 0 bytes
train   | --out_dir {fresh} --data_dir {data_half}                       | truncated or changed
train   | --out_dir {fresh} --data_dir {data_meta}                       | is not a valid meta.json
train   | --out_dir {fresh} --data_dir {data_oov}                        | outside the vocabulary of 265
train   | --out_dir {fresh} --data_dir {data_dtype}                      | is not a valid meta.json
train   | --out_dir {fresh} --data_dir {data_eot}                        | is not a valid meta.json
train   | --out_dir {fresh} --data_dir {data_path}                       | is not a valid meta.json
train   | --out_dir {fresh} --data_dir {data_deep}                       | is not a valid meta.json (JSONDecodeError)
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
eval    | --ckpt {cola}/ckpt.pt --prefix_windows -3                      | argument --prefix_windows: must be >= 0
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
sample  | --ckpt {bitflip}                                               | is corrupt: its contents do not match their checksum
sample  | --ckpt {step_edit}                                             | is corrupt: its contents do not match their checksum
sample  | --ckpt {no_checksum}                                           | has no checksum
sample  | --ckpt {old_checksum}                                          | has no checksum (sha256:)
sample  | --ckpt {looped}                                                | holds a list or dict in two places or inside itself
sample  | --ckpt {dag}                                                   | holds a list or dict in two places or inside itself
sample  | --ckpt {cfg_wide}                                              | the weights its configs ask for alone need
sample  | --ckpt {cfg_deep}                                              | the weights its configs ask for alone need
train   | --out_dir {dag_run}                                            | holds a list or dict in two places
train   | --out_dir {cola} --resume --data_dir {data_other}              | was trained on
train   | --data_dir {data_metatok}                                      | has 50257 ids, not its vocab_size 265
sample  | --ckpt {tok_edit}                                              | not the tokenizer it was trained with
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
    """A --stage all run with flags of its own (tiny sizes, --lr, --dropout 0.1, --no-compile, the step counts),
    stopped inside stage 2 after a validation, then `--resume` alone: it continues stage 2 with the run's own flags
    (compile off), leaves vae.pt as it was, and ends bit-exactly where the uninterrupted run ends. Mutations: taking
    defaults for the flags not repeated (the cpu preset's sizes are refused as a misfit, its step counts re-run
    stage 1); compile not restored; the frozen reference encoder left in train mode (dropout) until the first
    validation, which the resumed run's steps then draw and the uninterrupted run's do not."""
    flags = ["--data_dir", data_dir, *TINY, "--vae_iters", "2", "--main_iters", "4", "--eval_interval", "2", "--lr", "2e-3",
             "--dropout", "0.1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(flags + ["--out_dir", full])
    train.main(flags + ["--out_dir", part, "--stop_after", "3"])
    assert load_checkpoint(os.path.join(part, "ckpt.pt"))["step"] == 3
    vae_before = tree_hashes([part])[os.path.join(part, "vae.pt")]
    train.main(["--out_dir", part, "--resume"])
    assert tree_hashes([part])[os.path.join(part, "vae.pt")] == vae_before
    a, b = (load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (full, part))
    assert a["step"] == b["step"] == 4 and b["args"]["lr"] == 2e-3 and b["args"]["preset"] == "tiny"
    assert b["args"]["compile"] is False and b["args"]["dropout"] == 0.1
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


def test_ctrl_c_is_one_line_and_keeps_a_loadable_checkpoint(tmp_path, data_dir, root):
    """SIGINT (Ctrl-C) during training ends the run with one line; the last checkpoint loads and the folder's lock is
    released. Mutation: without the KeyboardInterrupt handler the run ends in a traceback."""
    import signal
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, os.path.join(root, "train.py"), "--data_dir", data_dir, "--out_dir", str(out),
                             "--stage", "vae", "--vae_iters", "100000", "--eval_interval", "1"] + TINY,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "vae.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    lines = err.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert lines[-1] == "error: interrupted; the last checkpoint is kept (continue with --resume)", err
    assert len([line for line in lines if line.startswith("error: ")]) == 1, err
    assert load_checkpoint(str(out / "vae.pt"))["step"] >= 1 and not (out / "train.lock").exists()


def test_ctrl_c_during_a_save_waits_for_the_whole_file(tmp_path, monkeypatch):
    """A Ctrl-C that arrives while a checkpoint is written takes effect once the file is whole. Mutation: without
    the deferral in save_checkpoint the write stops midway (torch's zip writer then fails as on a full disk)."""
    real_save = torch.save

    def save_interrupted(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, inside the write
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", save_interrupted)
    path = str(tmp_path / "c.pt")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"kind": "vae", "w": torch.ones(3)})
    assert float(load_checkpoint(path)["w"].sum()) == 3.0


def test_a_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path, runs, data_dir, root):
    """A file-size limit stands in for a full disk: the resumed run's save fails with one line, and the old
    checkpoint is as it was, with no temporary file left. Mutation: writing in place (no temporary file and
    rename) leaves a truncated checkpoint."""
    import resource
    out = str(tmp_path / "cola")
    shutil.copytree(runs["cola"], out)
    before = tree_hashes([out])[os.path.join(out, "ckpt.pt")]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # smaller than a checkpoint
    r = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--out_dir", out, "--resume", "--no-compile",
                        "--main_iters", "3"], capture_output=True, text=True, preexec_fn=limit)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "cannot write" in lines[0] and "the previous checkpoint is kept" \
        in lines[0], r.stderr
    assert tree_hashes([out])[os.path.join(out, "ckpt.pt")] == before and load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert not any(f.endswith(".tmp") for f in os.listdir(out))


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
    os.kill(first.pid, signal.SIGSTOP)  # held mid-run, however fast this machine trains
    try:
        with pytest.raises(SystemExit) as e:  # the second run, while the first is live
            train.main(argv)
    finally:
        os.kill(first.pid, signal.SIGCONT)
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
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + DEEP + "\n" + '{"step": 5, "lo')  # a torn line
    open(os.path.join(out, "vae.pt.999999.tmp"), "wb").write(b"a save killed halfway")
    train.main(common + ["--resume"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log_vae.jsonl"))]
    assert steps == [2, 4]
    assert not any(f.endswith(".tmp") for f in os.listdir(out))  # a killed save's temporary file is cleared


def test_a_fresh_or_overwrite_run_starts_new_logs(tmp_path, data_dir):
    """Logs belong to one run: --overwrite (and a fresh run after a failed one) does not append to the old log, and
    a run removes only its own stages' logs: the README's `--stage vae` then `--stage joint` keeps stage 1's log,
    `--stage vae --overwrite` keeps stage 2's, and a user's log_notes.txt and log_old/ stay. Mutations: keeping
    the old log gives steps 1, 2, 1, 2; removing every log_* loses log_vae.jsonl (and log_old/ is a traceback)."""
    out = str(tmp_path / "o")
    common = ["--data_dir", data_dir, "--out_dir", out, "--vae_iters", "2", "--main_iters", "1", "--eval_interval", "1"] + TINY
    train.main(common + ["--stage", "vae"])
    os.makedirs(os.path.join(out, "log_old"))
    open(os.path.join(out, "log_notes.txt"), "w").write("mine")
    train.main(common + ["--stage", "joint"])
    logged = lambda stage: [json.loads(line)["step"] for line in open(os.path.join(out, f"log_{stage}.jsonl"))]
    assert logged("vae") == [1, 2] and logged("joint") == [1]
    train.main(common + ["--stage", "vae", "--overwrite"])
    assert logged("vae") == [1, 2] and logged("joint") == [1]
    assert open(os.path.join(out, "log_notes.txt")).read() == "mine" and os.path.isdir(os.path.join(out, "log_old"))


def test_overwrite_replaces_a_checkpoint_of_another_kind(tmp_path, runs, data_dir):
    """--overwrite is the way past the refusal, whatever kind the folder holds (it must not be read first:
    mutation, loading with the new run's kind, refuses a Cola folder for an AR run)."""
    out = str(tmp_path / "cola")
    shutil.copytree(runs["cola"], out)
    train.main(["--model", "ar", "--lm_layers", "1", "--data_dir", data_dir, "--out_dir", out, "--overwrite",
                "--main_iters", "1", "--eval_interval", "1"] + TINY)
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["kind"] == "ar"


# ---------------------------------------------------------------------------------------------------- the outer scripts
# eval.py, scaling.py, prepare.py and bench.py: no script writes over a file it did not create in this run unless asked
# (--overwrite); every check runs before the work.

SMALL_EVAL = ["--batches", "1", "--batch_size", "2", "--builtin_n", "2", "--n_samples", "2", "--sample_len", "8",
              "--task_max_new", "4", "--sample_repeats", "1", "--prefix_windows", "0", "--fm_batches", "2",
              "--ll_steps", "2", "--iwae_k", "1", "--steps", "2"]


def task_line(prompt="ROMEO:", answer="love"):
    return json.dumps({"prompt": prompt, "answer": answer}) + "\n"


@pytest.fixture(scope="session")
def safe(tmp_path_factory, runs, data_dir):
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
    for name in ("deep.jsonl", "deep_tok.json", "deep_task.jsonl"):  # JSON nested 100,000 deep, wherever it is read
        open(t / name, "w").write(json.dumps({"text": "x", "prompt": "x", "answer": "y", "deep": 0})[:-2] + DEEP + "}\n")
        m[name.split(".")[0]] = str(t / name)
    os.makedirs(t / "deep_results" / "cola_1")
    open(t / "deep_results" / "cola_1" / "eval.json", "w").write('{"kind": ' + DEEP + "}")
    m["deep_results"] = str(t / "deep_results")
    os.makedirs(t / "locked")  # a prepared folder that a live prepare.py (this process stands in) is writing
    open(t / "locked" / "prepare.lock", "w").write(str(os.getpid()))
    m["locked"], m["root"] = str(t / "locked"), str(t)
    return m


# script | argv ({name}: a placeholder of safe(), {fresh}: a new folder) | a fragment of the one-line error
OUTER_CASES = [tuple(part.strip() for part in row.split("|")) for row in """
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
prepare | --input {text} --out_dir {cola} --tokenizer {tok}               | holds checkpoints (*.pt)
prepare | --input {tiny_text} --out_dir {fresh} --tokenizer {tok}         | fewer than one training sequence
prepare | --input {text} --out_dir {fresh} --val_fraction 0.9            | must be 1/k
prepare | --input {broken} --out_dir {fresh}                              | is not a readable file (a broken link?)
bench   | --vocab_size 1000000000000                                      | its embedding and head alone need
bench   | --batches 100000000                                             | AR's keys and values alone need
bench   | --train --batch_size 100000000                                  | AR's keys and values alone need
scaling | --levels 1e300 --judge {ar}/ckpt.pt --out_root {fresh}          | more than a million times
scaling | --table_only --levels 1 --out_root {bad_results}                | is not an eval result (JSONDecodeError)
scaling | --out_root {text} --judge {ar}/ckpt.pt --levels 1               | is a file, not a folder
scaling | --train_args=--data_dir={bad_meta} --judge {ar}/ckpt.pt --out_root {fresh} | is not a valid meta.json
scaling | --ablations {abl_up} --judge {ar}/ckpt.pt --out_root {fresh}    | must be a plain folder name
scaling | --ablations {abl_two} --judge {ar}/ckpt.pt --out_root {fresh}   | two runs share the name x
scaling | --ablations {abl_from} --judge {ar}/ckpt.pt --out_root {fresh}  | from=nope names no run
prepare | --input {text} --out_dir {locked} --tokenizer {tok}             | is being written by another prepare.py
prepare | --input {deep} --out_dir {fresh} --tokenizer {tok}              | not a JSON object with a string 'text'
prepare | --input {text} --out_dir {fresh} --tokenizer {deep_tok}         | is not a readable tokenizer.json
eval    | --score {deep_task}                                             | not valid JSON (nested too deeply)
scaling | --table_only --levels 1 --out_root {deep_results}               | is not an eval result (JSONDecodeError)
eval    | --ckpt {cola}/ckpt.pt --results {deep_results}/cola_1/eval.json | exists and is not an eval result
scaling | --eval_args=--nonsense --judge {ar}/ckpt.pt --out_root {fresh}   | unrecognized arguments: --nonsense
""".strip().splitlines()]


@pytest.mark.parametrize("script,argv,message", OUTER_CASES, ids=[f"{c[0]}:{c[1]}" for c in OUTER_CASES])
def test_outer_scripts_never_lose_a_file(script, argv, message, tmp_path, safe, capsys):
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


def test_prepare_overwrite_replaces_the_folder_whole_or_not_at_all(tmp_path, safe, monkeypatch, capsys):
    """prepare.py --overwrite with other text: stopped at its last moment before meta.json is written (the commit),
    the folder on disk is the old one, whole (what a kill there leaves), and the stop is one line with every file
    as it was; finished, it is the new one, without the old shards. Mutation: new shards under the old names (the
    old meta.json then refuses them as truncated or changed)."""
    out = str(tmp_path / "p")  # (a killed run's shard temporary is cleared by the next run, which holds the lock)
    argv = ["--tokenizer", safe["tok"], "--min_seq_len", "16", "--out_dir", out, "--overwrite"]
    prepare.main(argv + ["--input", safe["text"]])
    old = tokendata.load_meta(out)
    other = tmp_path / "other.txt"
    other.write_text(open(os.path.join(ROOT, "data", "shakespeare_tiny.txt")).read()[20000:30000])
    real_write = prepare.write_json

    def killed_before_commit(path, obj):
        assert tokendata.TokenData(out, 16).meta == old  # the old folder loads, as it was
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "write_json", killed_before_commit)
    bad_input_is_one_line(prepare.main, argv + ["--input", str(other)], "interrupted", [out], capsys)
    monkeypatch.setattr(prepare, "write_json", real_write)
    open(os.path.join(out, "train_00007.bin.999999.tmp"), "wb").write(b"a SIGKILLed run's shard")  # cleared
    prepare.main(argv + ["--input", str(other)])
    new = tokendata.TokenData(out, 16).meta
    assert new["source"] == str(other) and new["train_tokens"] != old["train_tokens"]
    assert sorted(os.listdir(out)) == sorted(["meta.json"] + [s["file"] for k in ("train", "val") for s in new["shards"][k]])


def test_input_without_a_cut_point_is_read_in_bounded_pieces(tmp_path):
    """Text with no place where the BPE allows a cut (NUL bytes, or one endless word) is still read in pieces of at
    most 2 x block_bytes, and nothing is lost. Mutation: waiting for a natural cut holds the whole input."""
    for name, text in (("nul.txt", "\x00" * 50_000), ("word.txt", "x" * 50_000)):
        (tmp_path / name).write_text(text)
        pieces = [p for p, _, _ in prepare.read_pieces([str(tmp_path / name)], 1024)]
        assert "".join(pieces) == text and max(map(len, pieces)) <= 2048
    doc = list(prepare.split_document("y" * 50_000, 1024))
    assert "".join(doc) == "y" * 50_000 and max(map(len, doc)) <= 1024


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


def test_sample_streams_every_block_of_a_cola_run(runs, capsys):
    """sample.py prints what generate() returns for the checkpoint's own sampler, over several blocks. Mutation: an
    on_block hook whose return value (the printing) is taken as 'stop' ends every sample after its first block."""
    from checkpoint import load_model, stored_sampler
    from decoder import generate
    from tokenizer import get_tokenizer
    path = os.path.join(runs["cola"], "ckpt.pt")
    sample.main(["--ckpt", path, "--num_samples", "1", "--max_new_tokens", "12", "--steps", "2", "--prompt", "ROMEO:"])
    printed = capsys.readouterr().out.split("--- sample 0\n")[1].split("\n# ")[0]
    model, info = load_model(path)
    enc = get_tokenizer(info["tokenizer"])
    sampler = stored_sampler(info, enc.eot_token, steps=2, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.1)
    out, stats = generate(model, [enc.encode_ordinary("ROMEO:")], 12, sampler, torch.Generator().manual_seed(1337))
    assert printed == "ROMEO:" + enc.decode(out[0]) and stats["blocks"] > 1


def test_a_failed_plot_keeps_the_earlier_one(tmp_path, monkeypatch):
    """A plot written over an earlier one fails midway (a kill, a full disk): the earlier file is as it was, with no
    temporary file left (every plot goes through cli.save_figure). Mutation: savefig straight to the path tears it."""
    import matplotlib.figure
    from cli import pyplot, save_figure
    plt, path = pyplot(), str(tmp_path / "training_curves.png")
    save_figure(plt, plt.figure(), path)
    before = open(path, "rb").read()

    def torn(self, target, **kw):
        with open(target, "wb") if isinstance(target, str) else contextlib.nullcontext(target) as f:
            f.write(b"half a plot")
        raise OSError("disk full")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn)
    with pytest.raises(OSError):
        save_figure(plt, plt.figure(), path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["training_curves.png"]


# script | the function inside main that the interrupt or the closed pipe hits | argv ({name}: safe() or {fresh})
STOPPED = [("eval", "evaluate", "--ckpt {cola}/ckpt.pt"),
           ("sample", "generate", "--ckpt {cola}/ckpt.pt --num_samples 1 --max_new_tokens 4 --steps 1"),
           ("prepare", "prepare", "--input {text} --out_dir {fresh} --tokenizer {tok}"),
           ("scaling", "plan", "--judge {ar}/ckpt.pt --out_root {fresh} --levels 1"),
           ("train", "run_stages", "--data_dir {data} --out_dir {fresh} --no-compile")]


@pytest.mark.parametrize("script,inner,argv", STOPPED, ids=[s[0] for s in STOPPED])
def test_ctrl_c_and_a_closed_pipe_in_every_script(script, inner, argv, tmp_path, safe, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) anywhere in a script's work is one line, files unchanged; a closed stdout
    (`| head`: BrokenPipeError) ends it quietly, no traceback. Mutation: main without cli.script: a traceback."""
    m = {**safe, "fresh": str(tmp_path / "fresh")}
    argv = [a.format(**m) for a in argv.split()]

    def stop(what):
        def raise_it(*args, **kwargs):
            raise what
        monkeypatch.setattr(SCRIPTS[script], inner, raise_it)
    def main(argv):  # an escaping Ctrl-C would end the whole test session
        try:
            return SCRIPTS[script].main(argv)
        except KeyboardInterrupt:
            raise AssertionError("KeyboardInterrupt escaped main") from None
    stop(KeyboardInterrupt)
    bad_input_is_one_line(main, argv, "interrupted", [m["cola"], m["ar"], m["data"], m["root"]], capsys)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test: a closed pipe sends it to devnull
    stop(BrokenPipeError)
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script].main(argv)
    assert e.value.code == 1 and capsys.readouterr().err == ""
    assert not os.path.exists(os.path.join(m["fresh"], "train.lock"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_training_as_ctrl_c_does(sig, tmp_path, data_dir, monkeypatch, capsys):
    """SIGTERM or SIGHUP during training: one line, the last checkpoint kept and loadable, the lock released, and
    the caller's own handler back afterwards. Mutation: no handler (the signal kills the process: here, the
    test's stand-in handler raises instead)."""
    out = str(tmp_path / "o")

    def not_handled(*_):
        raise AssertionError("the signal reached the default handler")
    previous = signal.signal(sig, not_handled)
    real_lr = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, *a: (os.kill(os.getpid(), sig) if step == 1 else None,
                                                          real_lr(step, *a))[1])
    try:
        line = one_line_error(train.main, ["--data_dir", data_dir, "--out_dir", out, "--stage", "vae", "--vae_iters",
                                           "3", "--eval_interval", "1"] + TINY, capsys)
        assert signal.getsignal(sig) is not_handled
    finally:
        signal.signal(sig, previous)
    assert line == "error: interrupted; the last checkpoint is kept (continue with --resume)"
    assert load_checkpoint(os.path.join(out, "vae.pt"))["step"] == 1 and not os.path.exists(os.path.join(out, "train.lock"))


def test_scaling_stops_its_children_when_stopped(tmp_path):
    """Ctrl-C (or SIGTERM, which stops it the same way) while scaling.py waits on runs in parallel: every child
    process stops too, at once. Mutation: without in_parallel's terminate the pool waits the children out (30 s)."""
    import argparse
    import threading
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    t0 = time.time()
    threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # Ctrl-C while both sleep
    with pytest.raises(KeyboardInterrupt):
        scaling.in_parallel(argparse.Namespace(jobs=2), lambda i: scaling.run(sleeper, str(tmp_path / f"{i}.log"), "-"),
                            [0, 1])
    assert time.time() - t0 < 15 and not scaling.CHILDREN


# issue 33's smaller cases: each one line (or the right answer), every file as it was

@pytest.mark.parametrize("argv,message", [
    (["--steps", "100000000"], "steps = 100000000, which this code cannot build"),
    (["--top_k", "100000000"], "top_k = 100000000, which this code cannot build"),
    (["--prompt", "FILE:/dev/zero"], "holds more than 1 MiB")])
def test_sample_refuses_a_sampler_or_prompt_it_cannot_use(argv, message, runs, capsys):
    """Mutation: the sampler built outside sample.py's error handler (a traceback); /dev/zero read whole."""
    bad_input_is_one_line(sample.main, ["--out_dir", runs["cola"], "--num_samples", "1"] + argv, message,
                          [runs["cola"]], capsys)


def test_a_tiny_temperature_is_greedy_not_nan():
    """--temperature 1e-300 samples the top token (the temperature floored at 1e-6). Mutation: dividing by it,
    0 in float32, makes the logits inf and NaN, and torch.multinomial raises."""
    from decoder import choose_tokens
    logits = torch.randn(2, 5, 50) * 10
    assert torch.equal(choose_tokens(logits, temperature=1e-300, generator=torch.Generator().manual_seed(0)),
                       logits.argmax(-1))


def test_odd_task_fields_are_one_line_or_scored(tmp_path, capsys):
    """A `scoring` that is a list is a TaskError line; an id that is no finite integer still gets a noise seed
    (its crc32) and a 60,000-word answer is scored in linear time by the same rule. Mutations: `scoring in
    RULE_OF_SCORING` with a list (TypeError), int(float('inf')) (OverflowError)."""
    import measures as ms
    import scoring as sc
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "answer": "a", "scoring": ["exact"]}) + "\n")
    with pytest.raises(sc.TaskError, match="'scoring' must be"):
        sc.read_tasks(str(bad))
    assert ms.item_seed(66, float("inf")) == ms.item_seed(66, "inf") != ms.item_seed(66, 3) == 66 + 3000
    long = "word " * 60_000
    assert sc.score(long, {"ground_truth": long, "rule": "exact"}) == 1.0
    assert sc.score(long, {"ground_truth": long + " more", "rule": "exact"}) == 0.0
    assert sc.score(long, {"ground_truth": "b", "choices": ["a " * 3, "b"], "rule": "choice"}) == 0.0
    for a, b in (("the blue sea", "the blue sea!"), ("abc", "abd"), ("x", "")):  # the floor changes no verdict
        assert (sc.similarity(a, b, 0.9) >= 0.9) == (sc.similarity(a, b) >= 0.9)


def test_item_noise_seed_reaches_this_repos_cola(runs):
    """--item_noise_seed gives each row its own noise for this repo's checkpoints too: the same seed, the same
    text whatever the batch; other seeds, other text. Mutation: make_generator ignoring row_seeds."""
    import measures as ms
    from checkpoint import load_model, stored_sampler
    model, info = load_model(os.path.join(runs["cola"], "ckpt.pt"))
    sampler = stored_sampler(info, 262, temperature=0.0)
    gen = ms.make_generator("cola", model, sampler, 0)
    alone, _ = gen([[5, 6]], 8, [66])
    pair, _ = gen([[7, 8, 9], [5, 6]], 8, [1, 66])
    other = [gen([[5, 6]], 8, [s])[0][0] for s in (1, 2, 3)]
    assert pair[1] == alone[0] and any(o != alone[0] for o in other)


def test_locks_name_their_process(tmp_path, data_dir, capsys):
    """A lock naming a live pid that is another process (pid 1 with another start time, as after a restart) is
    stale; one naming this very process is held; a folder in the lock's place is one line. Mutation: the pid
    alone (pid 1 lives: the folder is blocked forever)."""
    from cli import folder_lock, process_tag
    out = tmp_path / "o"
    os.makedirs(out)
    (out / "train.lock").write_text("1 0")
    with folder_lock(str(out)):
        assert (out / "train.lock").read_text() == process_tag(os.getpid())
        with pytest.raises(SystemExit, match="being written by another"):
            with folder_lock(str(out)):
                pass
    assert not (out / "train.lock").exists() and os.listdir(out) == []
    os.makedirs(out / "train.lock")
    bad_input_is_one_line(train.main, ["--data_dir", data_dir, "--out_dir", str(out)] + TINY, "is not a lock file",
                          [str(out)], capsys)


def test_scaling_trains_a_level_once_and_one_run_per_root(tmp_path, capsys):
    """--levels 0.01,1e-2 plans one folder per model; a second scaling.py on a held --out_root is one line.
    Mutation: the levels as given (two runs into one folder)."""
    from cli import folder_lock
    a = scaling.get_args(["--levels", "0.01,1e-2", "--out_root", str(tmp_path)])
    assert len(a.levels) == 1
    with folder_lock(str(tmp_path), "scaling.lock", "scaling run"):
        bad_input_is_one_line(scaling.main, ["--out_root", str(tmp_path), "--table_only"], "another scaling run",
                              [str(tmp_path)], capsys)


def test_resume_with_a_log_it_cannot_append_to_is_one_line(tmp_path, runs, data_dir, capsys):
    """A log_joint.jsonl that is a folder: --resume stops in one line before any work. Mutation: the check gone
    (a traceback when trim_log opens it)."""
    out = str(tmp_path / "cola")
    shutil.copytree(runs["cola"], out)
    os.remove(os.path.join(out, "log_joint.jsonl"))
    os.makedirs(os.path.join(out, "log_joint.jsonl"))
    bad_input_is_one_line(train.main, ["--data_dir", data_dir, "--out_dir", out, "--resume", "--main_iters", "9"]
                          + TINY, "cannot append to", [out], capsys)


def test_prepare_on_a_full_disk_is_one_line_and_keeps_the_folder(tmp_path, root, safe):
    """A file-size limit stands in for a full disk: prepare.py --overwrite stops in one line, the old folder loads
    as it was. Mutation: OSError not caught in prepare.main (a traceback)."""
    import resource
    out = str(tmp_path / "prep")
    shutil.copytree(safe["data"], out)
    before, old = tree_hashes([out]), tokendata.load_meta(out)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    r = subprocess.run([sys.executable, os.path.join(root, "prepare.py"), "--input", old["source"], "--out_dir", out,
                        "--overwrite", "--tokenizer", old["tokenizer"]], capture_output=True, text=True,
                       preexec_fn=limit)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "cannot write" in lines[0], r.stderr
    assert tokendata.load_meta(out) == old and tree_hashes([out]) == before


def test_a_shard_of_the_same_size_from_other_text_is_refused(tmp_path, safe):
    """meta.json names each shard's contents (the hash of its first and last MiB): a shard swapped for another of
    the same size is refused when the folder opens. Mutation: checking the size alone accepts it."""
    out = str(tmp_path / "prep")
    shutil.copytree(safe["data"], out)
    meta = tokendata.load_meta(out)
    assert all("ends" in s for s in meta["shards"]["train"])
    path = os.path.join(out, meta["shards"]["train"][0]["file"])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[2:] + raw[:2])  # the same ids in another order: same size, same vocabulary
    with pytest.raises(tokendata.DataError, match="is not the shard meta.json describes"):
        tokendata.TokenData(out, 16)


def test_under_torchrun_one_failure_is_one_line(tmp_path, data_dir, capsys, monkeypatch):
    """Rank 1 of a torchrun job stops on bad input with a bare status and no line (rank 0 prints the one line).
    Mutation: every rank printing its own 'error:' line."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train, "setup_distributed", lambda device: (1, 1, "cpu"))  # rank 1, without a process group
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o")] + TINY)
    assert e.value.code == 1 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    one_line_error(train.main, ["--data_dir", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o")] + TINY,
                   capsys)


def test_a_full_output_and_an_ascii_terminal(runs, root):
    """sample.py > /dev/full is one line; an emoji prompt on an ASCII terminal is printed escaped. Mutations:
    stop_signals without its ENOSPC case, or without backslashreplace (tracebacks)."""
    argv = [sys.executable, os.path.join(root, "sample.py"), "--out_dir", runs["ar"], "--num_samples", "1",
            "--max_new_tokens", "2"]
    with open("/dev/full", "w") as full:
        r = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: cannot write (No space left on device: a full disk, or output sent to /dev/full)"], r.stderr
    r = subprocess.run(argv + ["--prompt", "ROMEO 🙂"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "ROMEO \\U0001f642" in r.stdout and "Traceback" not in r.stderr, r.stderr


def test_scaling_children_die_with_a_killed_scaling(tmp_path, root):
    """SIGKILL to scaling.py (no handler can run) still stops the train.py it started: the child asked the kernel
    for SIGTERM at its parent's death (cli.die_with_parent). Mutation: Popen without preexec_fn (it sleeps on)."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", f"import scaling; scaling.run([{sys.executable!r}, '-c', "
                               f"{child!r}], {str(tmp_path / 'log')!r}, 'child')"], cwd=root)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the child outlived its killed parent")


def test_a_stage_killed_in_its_first_save_logs_each_step_once(tmp_path, data_dir):
    """Stage 2 killed while writing its first checkpoint leaves a log line and no ckpt.pt: --resume starts the stage
    afresh, and its log with it. Mutation: keeping that stage's log on --resume logs step 2 twice."""
    out = str(tmp_path / "o")
    common = ["--data_dir", data_dir, "--out_dir", out, "--vae_iters", "2", "--main_iters", "2", "--eval_interval", "2"]
    train.main(common + TINY)  # --stage all
    os.remove(os.path.join(out, "ckpt.pt"))  # as if killed in its first save: the log line is there, the file not
    train.main(common + ["--resume"] + TINY)
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log_joint.jsonl"))] == [2]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log_vae.jsonl"))] == [2]
