"""The testbed's lever that changes stage 2 and its sampler (docs/results.md, the history testbed; off in --preset
paper): t rising along each prior block. The mutation each test guards against is named in its docstring."""
import torch

import train
from decoder import denoise_block, time_grid
from diffusion import LossConfig, rising_t
from test_generate import V, tiny_model
from test_train import TINY
from tokendata import TokenData


def test_rising_t():
    """The first latent of a block is the cleanest, t in [0, 1], all noise at s = 1 + w, clean at s = 0.
    Mutation: the rise reversed along the block, or no clamp."""
    t = rising_t(torch.tensor([0.0, 0.5, 1.5]), 4, 0.5)  # (3, 4)
    assert torch.equal(t[0], torch.zeros(4)) and torch.equal(t[2], torch.ones(4))
    assert torch.allclose(t[1], torch.tensor([0.0, 1 / 6, 1 / 3, 0.5]))


def test_rising_t_in_training():
    """The prior trains on t rising along every block, and latents at t = 0 are out of the loss; without the
    lever one t per row. Mutation: t_rise ignored, or latents at t = 0 kept in the loss."""
    model = tiny_model().train()
    seen, inner = [], model.velocity_2l
    model.velocity_2l = lambda z0n, zt, t_tok: seen.append(t_tok.clone()) or inner(z0n, zt, t_tok)
    tokens = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, LossConfig(partial_prob=0.0))
    assert all(len(set(row.tolist())) == 1 for row in seen[-1])
    torch.manual_seed(0)
    out = model(tokens, LossConfig(partial_prob=0.0, t_rise=2.0))
    blocks = seen[-1].view(3, 4, 4)
    assert bool((blocks.diff(dim=-1) >= 0).all()) and bool((blocks[..., 0] < blocks[..., -1]).any())
    zero = seen[-1] == 0  # (B, L)
    assert bool(zero.any())
    model.velocity_2l = lambda z0n, zt, t_tok: torch.where((t_tok == 0).unsqueeze(-1), 1e6, inner(z0n, zt, t_tok))
    torch.manual_seed(0)
    assert torch.allclose(model(tokens, LossConfig(partial_prob=0.0, t_rise=2.0))["fm"], out["fm"])


def test_rising_t_in_the_sampler():
    """Each latent walks from t = 1 to 0 on its own schedule, the model seeing that per-latent t. Mutation: one
    dt for the whole block, or the block's grid read as one t."""
    model = tiny_model()
    seen = []
    model.guided_velocity = lambda z, t_tok, *a: seen.append(t_tok[0].clone()) or torch.ones_like(z)
    grid = rising_t(time_grid(8, t_max=1.5), 4, 0.5)  # (9, 4)
    z = denoise_block(model, torch.zeros(1, 4, 4), grid, torch.zeros(1, 0, dtype=torch.bool), 1.0, None)
    assert torch.equal(torch.stack(seen), grid[:-1])
    assert torch.allclose(z[0, :, 0], -(grid[0] - grid[-1]))  # v = 1: each latent moved by its own span of t


def test_the_stage_trains_and_stores_the_same_rise(tmp_path, data_dir):
    """--t_rise reaches both the loss and the sampler the checkpoint stores (sample.py and eval.py read that one).
    Mutation: train.py leaving t_rise out of the stored SamplerConfig."""
    common = ["--data_dir", data_dir, "--out_dir", str(tmp_path), "--vae_iters", "1", "--eval_interval", "1"] + TINY
    train.main(common + ["--stage", "vae", "--eval_sample", "0"])
    args = train.get_args(common + ["--stage", "joint", "--t_rise", "1.5"])
    run = train.stage_joint(args, dict(rank=0, world=1, device="cpu", master=True), TokenData(data_dir, args.seq_len))
    assert run.loss_args[0].t_rise == 1.5 and run.ckpt_fields["sampler"]["t_rise"] == 1.5
