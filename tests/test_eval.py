"""Baselines and eval.py on known answers."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import eval as ev
import measures as ms
import scoring as sc
from baselines import LMConfig, TransformerLM, match_layers
from baselines import ar_generate, llada_generate
from decoder import SamplerConfig
from flops import lm_train_flops


def write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_builtin_tasks():
    text = "\n".join(f"Line number {i} speaks of kings and crowns and horses" for i in range(200))
    t = ms.builtin_tasks(text, n=10)
    assert len(t["lambada_style"]) == 10 and len(t["ending_choice"]) == 10
    for x in t["lambada_style"]:
        assert x["rule"] == "first_word" and x["ground_truth"].isalpha()
    for x in t["ending_choice"]:
        assert x["ground_truth"] in x["choices"] and len(set(x["choices"])) == 2 and x["rule"] == "choice"


def test_ngram_metrics():
    s = sc.ngram_metrics([[1, 2, 3, 4, 1, 2, 3, 4], [5, 5]])
    assert s["distinct_1"] == pytest.approx(5 / 10)
    assert s["repetition_4"] == pytest.approx(1 / 5)  # (1,2,3,4) repeats once among 5 4-grams
    assert s["unigram_entropy_bits"] == pytest.approx(-(4 * 0.2 * math.log2(0.2) + 0.2 * math.log2(0.2)))


def test_seen_ngram_rates_against_a_known_training_text():
    train = [7, 1, 2, 3, 9, 1, 2, 8]
    ng = sc.TrainNgrams(train, vocab_size=10)
    # bigrams of the sample: (1,2) seen, (2,3) seen, (3,1) unseen, (1,2) seen -> 3/4
    # trigrams: (1,2,3) seen, (2,3,1) unseen, (3,1,2) unseen -> 1/3
    m = sc.ngram_metrics([[1, 2, 3, 1, 2]], ng)
    assert m["seen_2gram_rate"] == pytest.approx(3 / 4) and m["seen_3gram_rate"] == pytest.approx(1 / 3)
    assert sc.ngram_metrics([train], ng)["seen_3gram_rate"] == 1.0  # the training text itself


# ---------------------------------------------------------------------------------------------------- likelihood

def test_hutchinson_matches_exact_divergence_of_linear_field():
    torch.manual_seed(0)
    A = torch.randn(6, 6)
    fn = lambda z: z @ A.T  # v = A z, div = tr(A)
    z = torch.randn(1, 6)
    ests = torch.stack([ms.hutchinson_divergence(fn, z, torch.randn(1, 6))[1][0] for _ in range(4000)])
    # unbiased: the mean is within 4 standard errors of tr(A)
    assert abs(float(ests.mean()) - float(torch.trace(A))) < 4 * float(ests.std()) / math.sqrt(4000)
    # a Rademacher probe on a diagonal field is exact
    D = torch.diag(torch.randn(6))
    probe = torch.randint(0, 2, (1, 6)).float() * 2 - 1
    assert torch.allclose(ms.hutchinson_divergence(lambda z: z @ D, z, probe)[1], torch.trace(D).reshape(1))


def test_cnf_log_prior_of_zero_field_is_standard_normal():
    """With a zero velocity (fresh adaLN-Zero DiT) the flow is the identity: log p(z) = log N(z; 0, I)."""
    from test_generate import tiny_model
    from dit import DiT
    model = tiny_model()
    model.dit = DiT(model.dit.cfg)  # zero-initialised output: v = 0
    zn = torch.randn(2, 8, 4)
    lp = ms.cola_log_prior(model, zn, steps=4)
    expected = (-0.5 * (zn.pow(2) + math.log(2 * math.pi))).flatten(1).sum(1)
    assert torch.allclose(lp, expected, atol=1e-5)


def tiny_lm(kind):
    torch.manual_seed(0)
    return TransformerLM(LMConfig(kind=kind, vocab_size=50, width=32, n_layers=2, n_heads=2, mlp_hidden=64,
                                  max_seq_len=64)).eval()


def test_ar_nll_equals_mean_ce():
    m = tiny_lm("ar")
    x = torch.randint(0, 50, (3, 10))
    bos = 49
    inp = torch.cat([torch.full((3, 1), bos), x[:, :-1]], 1)
    manual = 0.0
    for b in range(3):  # token by token, no masks involved: position i sees tokens <= i only
        for i in range(10):
            logits = m.logits(inp[b:b + 1, :i + 1])[0, -1]
            manual += float(F.cross_entropy(logits[None], x[b, i:i + 1]).detach())
    assert ms.ar_bits_per_token(m, x, bos) == pytest.approx(manual / 30 / math.log(2), rel=1e-5)


def test_ar_cache_equals_recompute():
    m = tiny_lm("ar")
    out, st = ar_generate(m, [[1, 2, 3]], 8, eos_id=-1)
    out = out[0]
    ids = [1, 2, 3]
    for _ in range(8):  # greedy without a cache
        ids.append(int(m.logits(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[3:] and st["passes"] == 8


def test_llada_loss_and_sampling():
    m = tiny_lm("llada")
    x = torch.randint(0, 50, (2, 12))
    out = m.llada_loss(x, t=torch.tensor([1.0, 1.0]))  # all masked at t = 1: loss = mean CE
    assert float(out["loss"].detach()) == pytest.approx(float(out["masked_ce"].detach()), rel=1e-4)
    toks, st = llada_generate(m, [[1, 2]], 8, steps=4, block_length=4, eos_id=-1)
    toks = toks[0]
    assert len(toks) == 8 and st["passes"] == 4 and m.cfg.mask_id not in toks


def test_sample_temperature_samples_ar_and_llada_tokens():
    """eval.py's sample generators: temperature 0 is greedy (the same for any seed), temperature 1 draws
    tokens from the model (rounds with different seeds differ)."""
    for kind in ("ar", "llada"):
        m = tiny_lm(kind)
        sampler = SamplerConfig(steps=4, guidance=1.0, stop_ids=(-1,), pad_id=0)
        run = lambda seed, temp: ms.make_generator(kind, m, sampler, seed, temp)([[1, 2]] * 2, 8)[0]
        assert run(0, 0.0) == run(1, 0.0)
        assert run(0, 1.0) != run(1, 1.0) and run(0, 1.0) == run(0, 1.0)


def test_match_layers():
    cfg = LMConfig(vocab_size=50, width=32, n_layers=1, n_heads=2, mlp_hidden=64)
    base = sum(p.numel() for p in TransformerLM(LMConfig(**{**cfg.__dict__, "n_layers": 0})).parameters())
    per = sum(p.numel() for p in TransformerLM(cfg).parameters()) - base
    assert match_layers(base + 5 * per + 3, cfg) == 5


# ---------------------------------------------------------------------------------------------------- eval.py end to end

def test_eval_json_keys(tmp_path, data_dir):
    """Train a tiny Cola and AR for a few steps, run eval.py on both with a user task file."""
    from test_train import TINY
    import train
    common = ["--data_dir", data_dir, "--vae_iters", "2", "--main_iters", "2", "--eval_interval", "2"] + TINY
    train.main(common + ["--out_dir", str(tmp_path / "cola")])
    train.main(common + ["--out_dir", str(tmp_path / "ar"), "--model", "ar", "--lm_layers", "1"])
    task = write(tmp_path, ['{"prompt": "ROMEO:", "answer": "love", "scoring": "first_word"}',
                            '{"prompt": "Pick:", "answer": "yes", "options": ["yes", "no"]}'])
    judge = str(tmp_path / "ar" / "ckpt.pt")
    small = ["--batches", "1", "--batch_size", "2", "--fm_batches", "2", "--ll_steps", "2", "--iwae_k", "2", "--builtin_n", "2",
             "--n_samples", "2", "--sample_len", "8", "--task_max_new", "4", "--steps", "2", "--tasks", task,
             "--prefix_windows", "4"]
    ev.main(["--out_dir", str(tmp_path / "cola"), "--judge", judge, "--sweep_steps", "1,2",
             "--sweep_noise", "1,0.5", "--sample_repeats", "2"] + small)
    saved = json.load(open(tmp_path / "cola" / "eval.json"))
    for k in ("recon_acc", "mask_acc", "logsnr", "recon_acc_vs_t", "fm", "fm_cond", "fm_uncond",
              "fm_cond_per_t_bin", "fm_history_gap", "fm_history_gap_stderr", "bits_per_token", "bits_per_token_elbo", "tasks", "task_accuracy",
              "distinct_2", "repetition_4", "unigram_entropy_bits", "judge_ppl", "gen_tokens_per_s",
              "passes_per_token", "train_flops", "sweep_steps", "seen_2gram_rate", "seen_3gram_rate",
              "train_t_density_per_bin", "prefix_prediction",
              "seen_2gram_rate_se", "sweep_noise_scale", "next_token_acc_point", "next_token_acc_point_no_history"):
        assert k in saved, k
    assert saved["next_token_acc"] == max(saved["prefix_prediction"].items(), key=lambda kv: int(kv[0][6:]))[1]
    assert set(saved["tasks"]) == {"t", "lambada_style", "ending_choice"} and saved["judge"] == judge
    written = [json.loads(line) for line in open(tmp_path / "cola" / "generations" / "t.jsonl")]
    assert [set(w) for w in written] == [{"id", "prompt", "generate", "ground_truth", "choices"}] * 2
    # re-scoring the written generations gives the accuracy eval.py reported
    assert sc.score_file(str(tmp_path / "cola" / "generations" / "t.jsonl"))["accuracy"] == saved["tasks"]["t"]
    assert saved["bits_per_token"] <= saved["bits_per_token_elbo"] + 1e-6  # IWAE is the tighter bound
    for png in ("training_curves.png", "sweep_steps.png"):
        assert (tmp_path / "cola" / png).exists(), png
    res_ar = ev.main(["--out_dir", str(tmp_path / "ar")] + small)
    assert res_ar["kind"] == "ar" and res_ar["bits_per_token"] > 0


def test_eval_bad_task_file_is_one_line(tmp_path, capsys):
    from conftest import one_line_error
    p = write(tmp_path, ['{"prompt": "p", "answer": "a"}', "{broken"])
    assert f"{p}:2: not valid JSON" in one_line_error(ev.main, ["--ckpt", str(tmp_path / "x.pt"), "--tasks", p], capsys)


@pytest.fixture
def dry_run_here(monkeypatch):
    """scaling.py's dry runs of train.py and eval.py in this process (their main(--dry_run), no subprocess): the
    tests of what scaling.py plans need the answers, not the command line (tests/test_errors.py runs that)."""
    import contextlib
    import io
    import scaling
    import train

    def here(script, flags):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            {"train.py": train, "eval.py": ev}[script].main(["--dry_run", *flags])
        return json.loads(out.getvalue().strip().splitlines()[-1]) if out.getvalue().strip() else None
    monkeypatch.setattr(scaling, "dry_run", here)
    monkeypatch.setattr(scaling, "train_dry_run", lambda flags: here("train.py", flags))


def test_scaling_plan_matches_training_flops(data_dir, dry_run_here):
    """scaling.py gives each baseline the steps that match its Cola run's FLOPs (to within one step),
    and a level scales both Cola stages."""
    import scaling
    import train
    a = scaling.get_args(["--levels", "1,0.5", f"--train_args=--data_dir {data_dir}"])
    runs = scaling.plan(a)
    assert [(m, lv) for m, lv, *_ in runs] == [(m, lv) for lv in (0.5, 1.0) for m in ("cola", "ar", "llada")]
    cola = {lv: (flags, flops) for m, lv, _, flags, flops in runs if m == "cola"}
    default = train.get_args(["--data_dir", data_dir])  # level 1 is train.py's default run
    assert cola[0.5][0] == ["--vae_iters", str(round(default.vae_iters / 2)), "--main_iters", str(round(default.main_iters / 2))]
    assert abs(cola[1.0][1] / cola[0.5][1] - 2) < 0.01
    for m, lv, _, flags, flops in runs:
        if m == "cola":
            continue
        args = train.get_args(["--model", m, "--data_dir", data_dir])
        cfg, _ = train.lm_config(args, json.load(open(os.path.join(data_dir, "meta.json")))["vocab_size"])
        with torch.device("meta"):
            per_step = lm_train_flops(TransformerLM(cfg), args.seq_len) * args.batch_size * args.seq_len
        steps = int(flags[flags.index("--main_iters") + 1])
        assert abs(steps * per_step - cola[lv][1]) <= per_step / 2 + 1


def test_ablation_table_only_tabulates_finished_runs(tmp_path, capsys, dry_run_here):
    """--table_only trains nothing: it tabulates the runs with an eval.json, names the missing ones, and the
    table names the judge the runs were scored against."""
    import scaling
    abl = write(tmp_path, ["base", "fast --lr 1e-3", "never --t_uniform"], "abl.txt")
    sample = {"seen_2gram_rate": 0.5, "seen_2gram_rate_se": 0.01, "seen_3gram_rate": 0.1, "seen_3gram_rate_se": 0.02,
              "distinct_2": 0.7, "judge_ppl": 1234.0, "judge_ppl_se": 5.0}
    for name in ("base", "fast"):
        os.makedirs(tmp_path / "runs" / name)
        json.dump({"kind": "cola", "train_flops": 1e13, "fm_cond": 1.0, "fm_uncond": 1.1, "judge": "J.pt",
                   "next_token_acc": 0.25, "sweep_noise_scale": [{"noise_scale": 0.5, **sample}]},
                  open(tmp_path / "runs" / name / "eval.json", "w"))
    scaling.main(["--ablations", abl, "--table_only", "--out_root", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "not yet trained and evaluated: never" in out and "judge: J.pt" in out
    rows = [line for line in out.splitlines() if line.startswith("| base") or line.startswith("| fast")]
    assert len(rows) == 2 and "| 1.000 / 1.100 | 0.250 | - | 0.50 ± 0.01 / 0.10 ± 0.02, 0.70, 1,234 ± 5 |" in rows[1]
    assert not os.path.exists(tmp_path / "runs" / "never")  # nothing trained


def test_ablation_lines_start_from_base_and_name_their_stage1(tmp_path, monkeypatch, dry_run_here):
    """Each ablation line is base's flags plus its own (so a change of train.py's defaults cannot move the
    table), `from=RUN` names the stage 1 a stage-2 run starts from, and base may not set --stage."""
    import scaling
    abl = write(tmp_path, ["base --vae_iters 450 --main_iters 250", "fast --lr 1e-3", "seed2 from=other --seed 2"],
                "abl.txt")
    a = scaling.get_args(["--ablations", abl, "--out_root", str(tmp_path / "runs"), "--table_only"])
    runs = {r[0]: r for r in scaling.plan_ablations(a)}
    assert runs["fast"][3] == ["--vae_iters", "450", "--main_iters", "250", "--lr", "1e-3"]
    assert runs["seed2"][3][-2:] == ["--seed", "2"] and a.stage1_from == {"seed2": "other"}
    copied, called = [], []
    monkeypatch.setattr(scaling.shutil, "copy", lambda src, dst: copied.append(src))
    monkeypatch.setattr(scaling, "run", lambda cmd, *_: called.append(cmd))
    scaling.train_one(a, runs["seed2"])
    assert copied == [os.path.join(str(tmp_path / "runs"), "other", "vae.pt")]
    assert called[0][called[0].index("--stage") + 1] == "joint"
    bad = write(tmp_path, ["base --stage all"], "bad.txt")
    with pytest.raises(RuntimeError, match="must not set --stage"):
        scaling.plan_ablations(scaling.get_args(["--ablations", bad]))


# -------------------------------------------------------------------------------------- the prior's next-token accuracy

def oracle(model, true):
    """Make the model's guided velocity the exact one towards the latents `true` (B, bs, d): v = (z - true) / t."""
    model.guided_velocity = lambda z, t_tok, hist_valid, guidance, cache, hint=None, **kw: (z - true) / t_tok.unsqueeze(-1).clamp(min=1e-6)
    return model


def fit_vae(model, x, steps=80):
    """A few stage-1 steps on x alone: a VAE that reconstructs x (a random one decodes next to nothing right)."""
    opt = torch.optim.Adam(model.vae.parameters(), lr=1e-2)
    for _ in range(steps):
        model.vae(x, beta=1e-4, lam_mask=0.0)["loss"].backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_prefix_prediction_with_an_oracle_prior_scores_the_true_block():
    """An exact prior lands on the true latents whatever is known, so each accuracy equals that of decoding the
    true latents on the positions not known. Mutation: decoding after a history other than the true one (e.g.
    without the prefill) breaks the equality."""
    from test_generate import tiny_model
    model = tiny_model()
    x = torch.randint(0, 100, (6, 16))
    fit_vae(model, x)  # so that decoding the true latents gets the tokens right
    hist, true = ms.true_block(model, x, 2)
    hit = (ms.decode_after(model, hist, true).argmax(-1) == x[:, 8:12]).float()
    assert hit.mean() > 0.5
    res = ms.eval_prefix_prediction(oracle(model, true), x, 2, steps=4, guidance=3.0,
                                    generator=torch.Generator().manual_seed(0))
    for k in (0, 2, 3):
        assert res[f"known_{k}"] == pytest.approx(float(hit[:, k:].mean()))


def test_prefix_prediction_pins_the_known_latents(monkeypatch):
    """With a velocity that pulls every latent to zero, the known prefix is still decoded from the true
    latents, and only the other positions are scored. Mutation: not pinning the prefix, or scoring the
    whole block."""
    from test_generate import tiny_model
    model = tiny_model()
    model.guided_velocity = lambda z, t_tok, hist_valid, guidance, cache, hint=None, **kw: z / t_tok.unsqueeze(-1).clamp(min=1e-6)
    decoded = []
    real = ms.decode_after
    monkeypatch.setattr(ms, "decode_after", lambda m, hist, z: (decoded.append(z.clone()), real(m, hist, z))[1])
    x = torch.randint(0, 100, (5, 16))
    hist, true = ms.true_block(model, x, 2)
    res = ms.eval_prefix_prediction(model, x, 2, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0),
                                    known=(0, 3))
    z = decoded[1]  # the known = 3 run: 3 true latents, then what the sampler made of the rest (zeros)
    assert torch.allclose(z[:, :3], true[:, :3]) and z[:, 3:].abs().max() < 1e-5
    expected = (real(model, hist, z).argmax(-1)[:, 3:] == x[:, 11:12]).float().mean()
    assert res["known_3"] == pytest.approx(float(expected))
    # the default prefixes follow the block size (4 here): none pins the whole block (a NaN accuracy)
    res = ms.eval_prefix_prediction(model, x, 2, steps=2, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert set(res) == {"known_0", "known_2", "known_3"} and all(math.isfinite(v) for v in res.values())
    # noise_scale 0: the ODE starts at the origin (a constant velocity moves every row alike; mutation: noise ignored)
    model.guided_velocity = lambda z, t_tok, *a, **kw: torch.ones_like(z)
    decoded.clear()
    ms.eval_prefix_prediction(model, x, 2, 4, 1.0, torch.Generator().manual_seed(0), known=(1,), noise_scale=0.0)
    assert torch.allclose(decoded[0][:, 1:], torch.full_like(decoded[0][:, 1:], -1.0))


def test_training_t_density_matches_the_sampler():
    from diffusion import sample_t
    dens = ms.training_t_density(10, 1.0, 1.0, False)
    assert sum(dens) == pytest.approx(1.0)
    t = sample_t(200_000, 1.0, 1.0, generator=torch.Generator().manual_seed(0))
    hist = torch.histc(t, bins=10, min=0, max=1) / len(t)
    assert torch.allclose(hist, torch.tensor(dens), atol=0.005)
    assert ms.training_t_density(4, 0, 1, True) == [0.25] * 4
