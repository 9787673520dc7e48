"""Training loop: checkpoints, exact resume, DDP with gradient accumulation, flag and data errors."""
import os

import pytest
import torch

import checkpoint
import train
from conftest import one_line_error

TINY = ["--preset", "tiny", "--latent_dim", "8", "--block_size", "4", "--seq_len", "16", "--batch_size", "2",
        "--no-compile", "--dtype", "float32", "--log_interval", "1", "--eval_iters", "1", "--warmup_iters", "2"]


def params(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_checkpoint_atomic_and_self_describing(tmp_path, data_dir):
    out = str(tmp_path / "o")
    train.main(["--stage", "vae", "--data_dir", data_dir, "--out_dir", out, "--vae_iters", "2",
                "--eval_interval", "2"] + TINY)
    ck = torch.load(os.path.join(out, "vae.pt"), weights_only=False)
    assert ck["kind"] == "vae" and ck["step"] == 2 and ck["tokenizer"].endswith("tokenizer.json")
    assert {"vae_config", "args", "optimizer", "rng", "model"} <= set(ck)
    assert not any(f.endswith(".tmp") for f in os.listdir(out))


@pytest.mark.parametrize("stage", ["vae", "all"])
def test_resume_continues_exactly(tmp_path, data_dir, stage):
    common = ["--stage", stage, "--data_dir", data_dir, "--vae_iters", "4", "--main_iters", "4",
              "--eval_interval", "2", "--dropout", "0.1"] + TINY
    torch.set_num_threads(1)
    train.main(common + ["--out_dir", str(tmp_path / "a")])
    name = "vae.pt" if stage == "vae" else "ckpt.pt"
    if stage == "vae":
        train.main(common + ["--out_dir", str(tmp_path / "b"), "--stop_after", "3"])
        assert torch.load(tmp_path / "b" / name, weights_only=False)["step"] == 3
    else:  # stop inside stage 2
        train.main(common + ["--out_dir", str(tmp_path / "b")] + ["--stage", "vae"])
        train.main(common + ["--out_dir", str(tmp_path / "b"), "--resume", "--stop_after", "1"])
        assert torch.load(tmp_path / "b" / name, weights_only=False)["step"] == 1
    train.main(common + ["--out_dir", str(tmp_path / "b"), "--resume"])
    pa, pb = params(tmp_path / "a" / name), params(tmp_path / "b" / name)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_resume_differs_without_rng_restore(tmp_path, data_dir, monkeypatch):
    """The resume test can fail: skipping the RNG restore changes the result (dropout, noise, masks)."""
    common = ["--stage", "vae", "--data_dir", data_dir, "--vae_iters", "4", "--eval_interval", "2",
              "--dropout", "0.1"] + TINY
    train.main(common + ["--out_dir", str(tmp_path / "a")])
    train.main(common + ["--out_dir", str(tmp_path / "b"), "--stop_after", "2"])
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda s: torch.manual_seed(0))
    train.main(common + ["--out_dir", str(tmp_path / "b"), "--resume"])
    pa, pb = params(tmp_path / "a" / "vae.pt"), params(tmp_path / "b" / "vae.pt")
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)


def test_missing_data_is_one_line(tmp_path, capsys):
    line = one_line_error(train.main, ["--data_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o"),
                                       "--no-compile"], capsys)
    assert line == (f"error: {tmp_path / 'nope' / 'meta.json'} not found: run `python prepare.py` (or --input FILE "
                    f"--out_dir {tmp_path / 'nope'}) first")


def test_lr_schedule():
    a = train.get_args(["--lr", "1e-3", "--min_lr", "1e-4", "--warmup_iters", "10"])
    assert train.lr_at(0, a, 100) == pytest.approx(1e-4)
    assert train.lr_at(9, a, 100) == pytest.approx(1e-3)
    assert train.lr_at(100, a, 100) == pytest.approx(1e-4)
    assert train.lr_at(55, a, 100) == pytest.approx(5.5e-4)


def test_paper_preset_parameter_counts():
    from diffusion import ColaDLM
    a = train.get_args(["--preset", "paper"])
    vcfg = train.vae_config(a, 100278)
    dcfg = train.dit_config(a, vcfg)
    with torch.device("meta"):
        model = ColaDLM(vcfg, dcfg)
    n_vae = sum(p.numel() for p in model.vae.parameters())
    n_dit = sum(p.numel() for p in model.dit.parameters())
    print(f"paper preset: VAE {n_vae:,} DiT {n_dit:,}")
    assert (n_vae, n_dit) == (501_871_574, 1_829_875_728)  # the released model's counts (its classes, counted)


def test_sample_cli_runs_every_kind(tmp_path, data_dir, capsys):
    """sample.py reads the kind from the checkpoint: AR streams its KV-cached tokens, LLaDA prints its
    remasking result; both equal a direct call of the generator."""
    import sample
    from baselines import ar_generate, llada_generate
    from tokenizer import get_tokenizer
    for kind in ("ar", "llada"):
        out = tmp_path / kind
        train.main(["--model", kind, "--data_dir", data_dir, "--main_iters", "2", "--eval_interval", "2",
                    "--lm_layers", "1", "--out_dir", str(out)] + TINY)
        capsys.readouterr()
        sample.main(["--out_dir", str(out), "--num_samples", "1", "--max_new_tokens", "6", "--steps", "3",
                     "--block_length", "3", "--prompt", "ROMEO:", "--repetition_penalty", "1.0"])
        text = capsys.readouterr().out
        assert f": {kind}, step 2" in text
        model, ck = sample.load_model(str(out / "ckpt.pt"), "cpu")
        enc = get_tokenizer(ck["tokenizer"])
        p = enc.encode_ordinary("ROMEO:")
        new, _ = (ar_generate(model, [p], 6, eos_id=enc.eot_token) if kind == "ar"
                  else llada_generate(model, [p], 6, steps=3, block_length=3, eos_id=enc.eot_token))
        assert "ROMEO:" + enc.decode(new[0]) in text


class Payload:
    """A class a checkpoint must not be able to make us import and run."""


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, capsys):
    import sample
    from checkpoint import CheckpointError, load_checkpoint
    path = tmp_path / "evil.pt"
    torch.save({"kind": "cola", "model": {}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(str(path))
    assert one_line_error(sample.main, ["--ckpt", str(path)], capsys) == (
        f"error: {path} holds pickled Python objects; refusing to load it (a checkpoint may hold only tensors and "
        "plain containers)")


def test_training_checkpoints_load_safely(tmp_path, data_dir):
    """What train.py writes (configs, optimizer, every rank's random state) loads with weights_only=True."""
    out = str(tmp_path / "o")
    train.main(["--stage", "vae", "--data_dir", data_dir, "--out_dir", out, "--vae_iters", "1", "--eval_interval", "1"] + TINY)
    ck = torch.load(os.path.join(out, "vae.pt"), weights_only=True)
    assert isinstance(ck["rng"], list) and len(ck["rng"]) == 1


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """A save that fails midway (a full disk) is one CheckpointError, and leaves the previous checkpoint intact and
    no temporary file."""
    import checkpoint
    path = str(tmp_path / "c.pt")
    checkpoint.save_checkpoint(path, {"kind": "vae", "step": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(checkpoint.CheckpointError, match="disk full.*the previous checkpoint is kept"):
        checkpoint.save_checkpoint(path, {"kind": "vae", "step": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["c.pt"]
