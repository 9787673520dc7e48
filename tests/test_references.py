"""What the published numbers rest on, each against an independent reference: FLOPs, bits per token, DDP
accumulation and resume, masks against the cached sampler, clipping, bf16, the reference encoder, NaN.
Every test names, in its docstring, a mutation of the code it guards under which it fails."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flops
import measures as ms
import train
from checkpoint import load_checkpoint
from diffusion import ColaDLM, flow_path
from test_generate import tiny_model
from test_train import TINY


# ---------------------------------------------------------------------------------------------------- FLOPs

def manual_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    """Attention as plain matmuls: FlopCounterMode has no formula for SDPA's CPU kernels."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def counted_step_flops(model, tokens, **kw):
    """FLOPs of one forward + backward by torch's FlopCounterMode (matmuls and attention, counted as run)."""
    with FlopCounterMode(display=False) as counter:
        model(tokens, **kw)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("what", ["vae", "joint", "ar", "llada"])
def test_flops_per_token_against_a_counter(what, monkeypatch):
    """train_flops_per_token x tokens is within 10% of FlopCounterMode's count of one training step.
    The conventions differ in two places: the counter sees a forward-only network (the frozen reference
    encoder) exactly and counts no attention there, and it counts the input gradient of a first layer only
    where one is needed. Mutation: dropping the factor 3 of the backward pass, or counting the DiT on L
    instead of 2L - bs latents, breaks the 10%."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", manual_attention)
    torch.manual_seed(0)
    args = train.get_args(["--preset", "tiny", "--seq_len", "64", "--latent_dim", "8", "--block_size", "16"])
    B, L, V = 2, args.seq_len, 2000
    x = torch.randint(0, V, (B, L))
    vcfg = train.vae_config(args, V)
    if what in ("vae", "joint"):
        cola = ColaDLM(vcfg, train.dit_config(args, vcfg))
        if what == "vae":
            counted = counted_step_flops(cola.vae, x)
            convention = flops.vae_train_flops(cola.vae, L) * B * L
        else:
            counted = counted_step_flops(cola, x)
            convention = flops.joint_train_flops(cola, L) * B * L
    else:
        args.model = what
        lm = train.TransformerLM(train.lm_config(args, V)[0])
        counted = counted_step_flops(lm, x)
        convention = flops.lm_train_flops(lm, L) * B * L
    print(f"{what}: counted {counted:.3e}, convention {convention:.3e}, ratio {convention / counted:.3f}")
    assert abs(convention / counted - 1) < 0.10


# ---------------------------------------------------------------------------------------------------- likelihood

@pytest.mark.parametrize("a", [0.0, 0.3])
def test_bits_per_token_closed_form_for_a_linear_field(a):
    """With velocity v = a z, k = 1 and fixed noise, Cola's bound has a closed form: the midpoint rule maps
    z0 to z0 (1 + ah + (ah)^2 / 2)^n, the divergence term is a |probe|^2 (the one fixed probe), and
    log p(x) >= log p(x | z) + log N(z1) + a|probe|^2 + L sum log scale - log q(z | x).
    Mutations: the CNF term with the wrong sign, the normalisation's Jacobian left out, or log q's
    variance term dropped each move the result off the closed form."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    model.velocity_2l = lambda z0n, zt, t_tok: a * zt
    x = torch.randint(0, 100, (2, 8))
    steps, T = 4, x.shape[1]
    elbo, iwae = ms.cola_bits_per_token(model, x, k=1, steps=steps, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order: posterior noise, then the probe
    with torch.no_grad():
        mu, logvar = model.vae.encode(x)
        eps = torch.randn(mu.shape, generator=g)
        probe = torch.randn(mu.shape, generator=g)
        z = mu + (0.5 * logvar).exp() * eps
        log_q = (-0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi))).flatten(1).sum(1)
        log_px = -torch.nn.functional.cross_entropy(model.vae.decode(z).transpose(1, 2), x, reduction="none").sum(1)
        h = 1 / steps
        z1 = model.normalize(z) * (1 + a * h + (a * h) ** 2 / 2) ** steps
        log_p1 = (-0.5 * (z1.pow(2) + math.log(2 * math.pi))).flatten(1).sum(1)
        log_pz = log_p1 + a * probe.pow(2).flatten(1).sum(1) + z.shape[1] * model.latent_scale.log().sum()
        expected = -(log_px + log_pz - log_q).mean() / (T * math.log(2))
    assert elbo == pytest.approx(float(expected), rel=1e-4) and iwae == pytest.approx(elbo, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- DDP

def test_ddp_accumulation_and_resume(tmp_path, data_dir, root):
    """Under torchrun (2 processes, gloo): (1) stage 1 with accumulation leaves identical parameters on both
    ranks; (2) one AR step of 2 processes x 2 micro-batches equals 1 process x the same 4 micro-batches;
    (3) a 2-process run stopped inside stage 2 and resumed ends bit-exactly where the uninterrupted run ends.
    Mutations: no_sync on every micro-batch (no all-reduce) breaks (1) and (2); reseeding the ranks on
    resume instead of restoring their random states breaks (3)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "tests", "ddp_worker.py"), str(tmp_path), data_dir] + TINY
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "ddp_check.json")) == {"world": 2, "max_rank_diff": 0.0}
    # (2) the same 4 micro-batches in one process
    train.main(["--model", "ar", "--lm_layers", "1", "--main_iters", "1", "--eval_interval", "1", "--grad_accum", "4",
                "--data_dir", data_dir, "--out_dir", str(tmp_path / "ar1")] + TINY)
    two, one = (load_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in ("ar", "ar1"))
    for k in one:  # Adam's first step is lr * g / |g|: rounding can flip the sign of a near-zero gradient only
        off = (two[k] - one[k]).abs() > 1e-6
        assert float(off.float().mean()) < 1e-3, k
    # (3) bit-exact resume
    full, part = (load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("full", "part"))
    assert full["step"] == part["step"] == 4
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k


# ---------------------------------------------------------------------------------------------------- masks

def test_training_layout_equals_the_cached_sampling_pass():
    """velocity_2l (the training layout and mask) for block j equals the cached guided pass at scale 1
    after prefilling the blocks before j. Mutation: letting a noisy query see its own block's clean copy,
    or the cached pass skipping the history, breaks the equality."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 16, 4, generator=g)
    t = torch.full((3, 16), 0.6)
    zt = flow_path(z0, torch.randn(z0.shape, generator=g), t)
    full = model.velocity_2l(z0, zt, t)  # (B, L, d)
    for j in range(4):
        caches = model.new_caches()
        valid = torch.ones(3, 4 * j, dtype=torch.bool)
        if j:
            model.prefill(z0[:, :4 * j], valid, caches)
        v = model.guided_velocity(zt[:, 4 * j:4 * j + 4], t[:, :4], valid, 1.0, caches[0])
        assert torch.allclose(v, full[:, 4 * j:4 * j + 4], atol=1e-5), j


# ---------------------------------------------------------------------------------------------------- clipping, reference encoder

@pytest.fixture
def joint_run(tmp_path, data_dir):
    common = ["--data_dir", data_dir, "--out_dir", str(tmp_path), "--vae_iters", "1", "--main_iters", "3",
              "--eval_interval", "3"] + TINY
    train.main(common + ["--stage", "vae"])
    args = train.get_args(common + ["--stage", "joint", "--grad_clip_scope", "network"])
    env = dict(rank=0, world=1, device="cpu", master=True)
    return args, env, train.stage_joint(args, env, train.TokenData(data_dir, args.seq_len))


def test_per_network_clipping_leaves_the_dit_alone(joint_run):
    """A huge VAE gradient is clipped to 1 while the DiT's small gradient stays as it was; under one global
    norm the DiT's would shrink with it. Mutation: building one clip group for both networks."""
    args, env, run = joint_run
    model = run.model
    for p in model.dit.parameters():
        p.grad = torch.full_like(p, 1e-4)
    for p in model.vae.parameters():
        p.grad = torch.full_like(p, 10.0)
    dit_before = [p.grad.clone() for p in model.dit.parameters()]
    norms = train.clip_gradients(run.clip_groups, 1.0)
    assert set(norms) == {"gnorm_dit", "gnorm_vae"} and norms["gnorm_vae"] > 1e3
    assert all(torch.equal(p.grad, b) for p, b in zip(model.dit.parameters(), dit_before))
    assert float(torch.cat([p.grad.flatten() for p in model.vae.parameters()]).norm()) == pytest.approx(1.0, rel=1e-2)


def test_reference_encoder_stays_the_stage1_encoder(joint_run, tmp_path):
    """After joint steps the frozen reference encoder still equals the stage-1 encoder, is in eval mode, and
    the trained encoder has moved. Mutation: handing ref_enc to the optimizer, or a model.train() that turns
    its dropout back on."""
    args, env, run = joint_run
    train.train(run, args, env, train.TokenData(args.data_dir, args.seq_len))
    assert not run.model.ref_enc.training and run.model.training
    stage1 = load_checkpoint(str(tmp_path / "vae.pt"))["model"]
    after = load_checkpoint(str(tmp_path / "ckpt.pt"))["model"]
    for k, v in stage1.items():
        if k.startswith("enc."):
            assert torch.equal(after["ref_" + k], v), k
    assert any(not torch.equal(after["vae." + k], v) for k, v in stage1.items() if k.startswith("enc."))


# ---------------------------------------------------------------------------------------------------- bf16

def test_bf16_joint_step_and_cached_generation(joint_run):
    """Under bf16 autocast one joint step gives a finite loss, and cached generation equals the uncached
    reference within bf16 tolerance. Mutation: a float32-only cast in the cache path (e.g. the cache kept
    in one dtype, the block in another) breaks the equality or raises."""
    from test_generate import Uncached
    args, env, run = joint_run
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run.model(train.TokenData(args.data_dir, args.seq_len).batch("train", 2, 0, "cpu"), *run.loss_args)
    assert torch.isfinite(out["loss"])
    model = tiny_model()
    logits = {}
    import decoder
    real = decoder.choose_tokens
    for name, m in (("cached", model), ("uncached", Uncached(model))):
        seen = []
        decoder.choose_tokens = lambda lg, *a, **k: (seen.append(lg.float()), real(lg, *a, **k))[1]
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                decoder.generate(m, [[5, 6, 7, 8, 9], [1, 2]], 8, decoder.SamplerConfig(steps=3, guidance=3.0, stop_ids=(),
                                 pad_id=119), torch.Generator().manual_seed(0))
        finally:
            decoder.choose_tokens = real
        logits[name] = seen
    for a, b in zip(logits["cached"], logits["uncached"]):
        assert torch.allclose(a, b, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------------- NaN

def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, data_dir, root):
    """A NaN loss (an lr of 1e30 blows the weights up) ends the run with one line naming the step, and the
    last checkpoint is the last good one. Mutation: removing the check (the run goes on and saves NaN weights)."""
    out = tmp_path / "o"
    common = ["--stage", "vae", "--data_dir", data_dir, "--out_dir", str(out), "--vae_iters", "6",
              "--eval_interval", "2"] + TINY
    train.main(common + ["--stop_after", "2"])
    good = load_checkpoint(str(out / "vae.pt"))
    r = subprocess.run([sys.executable, os.path.join(root, "train.py"), *common, "--resume", "--lr", "1e30",
                        "--min_lr", "1e30", "--warmup_iters", "0", "--grad_clip", "0"], capture_output=True, text=True,
                       cwd=root)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and ("loss is nan" in lines[0] or "loss is inf" in lines[0]) and "last good checkpoint" in lines[0], lines
    kept = load_checkpoint(str(out / "vae.pt"))
    assert kept["step"] == good["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
