"""The testbed's levers (docs/results.md, the history testbed; off in --preset paper): t rising along each prior
block, in stage 2 and its sampler, and the stochastic sampler (eta). The mutation each test guards against is named
in its docstring."""
import torch

import train
from decoder import SamplerConfig, denoise_block, generate, time_grid
from diffusion import LossConfig, flow_path, rising_t, sampler_step, velocity_target
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


def test_the_stochastic_step_keeps_the_flow_paths_marginals():
    """eta = 0 is the Euler step; with the exact velocity of data z0 = 0, z_t = t eps stays t' times a standard
    normal after an eta step, and new noise has entered. Mutation: sqrt(1 - eta^2) as 1 - eta, or the fresh noise
    left out."""
    z0, eps, noise = torch.zeros(20000, 4), torch.randn(20000, 4), torch.randn(20000, 4)
    t, t_next = torch.tensor(0.8), torch.tensor(0.5)
    zt, v = flow_path(z0, eps, t), velocity_target(z0, eps)
    assert torch.equal(sampler_step(zt, v, t, t_next), zt - (t - t_next) * v)
    z = sampler_step(zt, v, t, t_next, 0.7, noise) / t_next
    corr = float(torch.corrcoef(torch.stack([z[:, 0], eps[:, 0]]))[0, 1])  # sqrt(1 - 0.49) = 0.71
    assert abs(float(z.std()) - 1) < 0.02 and 0.68 < corr < 0.75
    assert torch.allclose(sampler_step(zt, v, t, torch.tensor(0.0), 0.7, noise), z0)  # the last step lands on data


def test_the_stochastic_sampler_in_denoise_block():
    """eta > 0 draws new noise at each step from the generator, pinned latents stay pinned, eta = 0 draws none.
    Mutation: eta not passed down, or noise added to pinned latents."""
    model = tiny_model()
    model.guided_velocity = lambda z, t_tok, *a: torch.ones_like(z)
    grid, hist = time_grid(4), torch.zeros(2, 0, dtype=torch.bool)
    pin, pin_z = torch.tensor([[True, False, False, False]] * 2), torch.full((2, 4, 4), 3.0)
    start = torch.randn(2, 4, 4)
    g = torch.Generator().manual_seed(0)
    ode = denoise_block(model, start, grid, hist, 1.0, None, pin, pin_z, generator=g)
    assert g.initial_seed() == 0 and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    sde = denoise_block(model, start, grid, hist, 1.0, None, pin, pin_z, eta=0.5, generator=g)
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    assert torch.equal(sde[:, 0], pin_z[:, 0]) and torch.equal(ode[:, 0], pin_z[:, 0])
    assert not torch.allclose(sde[:, 1:], ode[:, 1:])


def test_generate_passes_eta_down():
    """generate's blocks differ with eta > 0 at the same seed, and eta = 0 is the stored ODE sampler. Mutation:
    SamplerConfig.eta not handed to denoise_block."""
    model, blocks = tiny_model(), {}
    for eta in (0.0, 0.0, 0.5):
        got = blocks.setdefault(eta, [])
        generate(model, [[1, 2, 3]], 8, SamplerConfig(steps=3, eta=eta, stop_ids=(), pad_id=0), torch.Generator().manual_seed(0),
                 on_block=lambda s: got.append(s.z.clone()))
    assert len(blocks[0.0]) == 6 and torch.equal(blocks[0.0][0], blocks[0.0][3])
    assert not torch.allclose(blocks[0.5][0], blocks[0.0][0])
