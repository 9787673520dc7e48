"""Watching generation (watch.py, sample.py --show_steps / --animate) and train.py's sample at each validation."""
import pytest
import torch

import sample
import train
import watch
from conftest import one_line_error
from decoder import SamplerConfig, generate
from test_generate import EOS, tiny_model
from test_train import TINY
from tokenizer import get_tokenizer

SAMPLER = SamplerConfig(steps=5, guidance=3.0, temperature=0.0, stop_ids=(EOS,), pad_id=EOS)


@pytest.mark.parametrize("prompt", [[5, 6, 7, 8, 9, 10], [5, 6, 7, 8]])
def test_cola_last_step_is_the_decoded_block(prompt):
    """Each block's last Euler step shows exactly the tokens the block decodes to (its estimate x0 = z_t - t v is
    the block itself), and recording the steps leaves generation as it is (the view commits nothing). Mutations:
    x0 taken as z_t (the last step then shows other tokens); the view's decoder pass committing to the cache."""
    model = tiny_model()
    out, frames = watch.cola_view(model, prompt, 12, SAMPLER, torch.Generator().manual_seed(3))
    ref, _ = generate(model, [prompt], 12, SAMPLER, torch.Generator().manual_seed(3))
    assert out == ref[0]
    blocks = [i for i, f in enumerate(frames) if f.label.endswith("decoded")]
    assert len(blocks) == 4 if len(prompt) % 4 else 3
    for i in blocks:
        last_step, decoded = frames[i - 1], frames[i]
        assert last_step.label.endswith(f"step {SAMPLER.steps}/{SAMPLER.steps} t=0.20")
        assert last_step.tokens == decoded.tokens
    assert frames[blocks[0] - SAMPLER.steps].conf != frames[blocks[0] - 1].conf  # each step is read anew
    assert frames[blocks[-1]].tokens[len(prompt) % 4:][:len(out)] == out


def test_show_prints_a_line_per_step(capsys):
    model = tiny_model()
    _, frames = watch.cola_view(model, [5, 6, 7, 8], 4, SAMPLER, torch.Generator().manual_seed(0))
    lines = []
    watch.show(type("Enc", (), {"decode": lambda self, ids: "".join(chr(97 + i % 26) for i in ids)})(), frames,
               lines.append)
    assert len(lines) == SAMPLER.steps + 1
    assert lines[-1].split(" | ")[1] == lines[-2].split(" | ")[1]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, data_dir):
    """A tiny Cola run (both stages), an AR and a LLaDA run, with their training output."""
    root, logs = tmp_path_factory.mktemp("watch"), {}
    for kind in ("cola", "ar", "llada"):
        extra = ["--vae_iters", "2"] if kind == "cola" else ["--lm_layers", "1"]
        train.main(["--model", kind, "--data_dir", data_dir, "--main_iters", "2", "--eval_interval", "2",
                    "--eval_sample", "8", "--out_dir", str(root / kind)] + extra + TINY)
    return root


@pytest.mark.parametrize("kind,picture", [("cola", "gif"), ("ar", "png"), ("llada", "gif")])
def test_show_steps_and_animate_every_kind(three_runs, kind, picture, tmp_path, capsys):
    path = tmp_path / f"steps.{picture}"
    sample.main(["--out_dir", str(three_runs / kind), "--num_samples", "1", "--max_new_tokens", "8", "--steps", "4",
                 "--block_length", "4", "--prompt", "ROMEO:", "--show_steps", "--animate", str(path)])
    text = capsys.readouterr().out
    assert open(path, "rb").read(4) == (b"GIF8" if picture == "gif" else b"\x89PNG")
    marker = {"cola": "block 0 step 4/4", "ar": "token 1 ", "llada": "pass 1 "}[kind]
    assert marker in text
    if kind == "cola":  # the printed last step and the decoded block are the same text
        rows = {ln.split(" | ")[0].strip(): ln.split(" | ", 1)[1] for ln in text.splitlines() if " | " in ln}
        assert rows["block 0 step 4/4 t=0.25"] == rows["block 0 decoded"]


@pytest.mark.parametrize("bad", ["{file}/x.gif", "{tmp}/x.txt"])
def test_a_bad_animation_path_is_one_line_before_any_generation(bad, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: pytest.fail("generation started"))
    line = one_line_error(sample.main, ["--animate", bad.format(file=tmp_path / "file", tmp=tmp_path)], capsys)
    assert "--animate" in line


def test_train_prints_a_sample_at_each_validation(tmp_path, data_dir, capsys):
    """A short sample from "\\n" after each validation line, unless --eval_sample 0; it leaves training as it is."""
    outs = {}
    for n in ("6", "0"):
        train.main(["--model", "ar", "--data_dir", data_dir, "--main_iters", "2", "--eval_interval", "1",
                    "--lm_layers", "1", "--eval_sample", n, "--out_dir", str(tmp_path / n)] + TINY)
        outs[n] = capsys.readouterr().out
    assert outs["6"].count("[ar] sample: ") == 2 and "sample:" not in outs["0"]
    weights = [torch.load(tmp_path / n / "ckpt.pt", weights_only=True)["model"] for n in ("6", "0")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
