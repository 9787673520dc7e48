"""The levers of docs/results.md's testbed that change stage 2 (each off in --preset paper): block sizes drawn
per batch, one t per block, self-conditioning. Each test names the mutation under which it fails."""
import pytest
import torch

import train
from decoder import SamplerConfig, denoise_block, generate, time_grid
from diffusion import LossConfig, draw_block_size, flow_path, rising_t
from test_generate import EOS, V, tiny_model


def test_draw_block_size():
    """No probabilities: the model's block; otherwise 2^i at probs[i]. Mutation: indexing the sizes from 1."""
    assert draw_block_size(16, ()) == 16
    torch.manual_seed(0)
    draws = [draw_block_size(8, (0.5, 0.0, 0.25, 0.25)) for _ in range(2000)]
    assert set(draws) == {1, 4, 8}
    assert abs(draws.count(1) / 2000 - 0.5) < 0.05 and abs(draws.count(8) / 2000 - 0.25) < 0.05


def record_velocity_2l(model):
    """Wrap model.velocity_2l to record the (block_size, t_tok, self_cond) of every call."""
    calls, inner = [], model.velocity_2l

    def wrapped(z0n, zt, t_tok, block_size=None, self_cond=None):
        calls.append((block_size, t_tok.clone(), None if self_cond is None else self_cond.clone()))
        return inner(z0n, zt, t_tok, block_size, self_cond)
    model.velocity_2l = wrapped
    return calls


def test_block_size_probs_and_t_per_block_reach_the_prior():
    """No lever: the model's block and one t per row; a drawn block of 2 reaches the 2L layout, one t per block of
    that size.
    Mutation: the loss keeping model.block_size, or t drawn once per sequence under t_per_block."""
    tokens = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model().train()
    calls = record_velocity_2l(model)
    model(tokens, LossConfig(partial_prob=0.0))
    assert calls[-1][0] == 4 and len(set(calls[-1][1][0].tolist())) == 1
    model(tokens, LossConfig(partial_prob=0.0, block_size_probs=(0, 1, 0), t_per_block=True))
    bs, t_tok, _ = calls[-1]
    assert bs == 2
    blocks = t_tok.view(3, 8, 2)
    assert torch.equal(blocks[..., 0], blocks[..., 1]) and len(set(blocks[0, :, 0].tolist())) == 8


def test_self_cond_training_reads_a_first_estimate_on_half_the_rows():
    """The second pass reads zt - t v of a first pass on some rows and zeros on the others. Mutation: reading the
    noisy latents, or never zeros."""
    model = tiny_model(self_cond=True).train()
    tokens = torch.randint(0, V, (16, 16), generator=torch.Generator().manual_seed(0))
    calls = record_velocity_2l(model)
    torch.manual_seed(0)
    model(tokens, LossConfig(partial_prob=0.0))
    (_, t_first, sc_first), (_, t_second, sc_second) = calls
    assert torch.equal(sc_first, torch.zeros_like(sc_first)) and torch.equal(t_first, t_second)
    zeroed = sc_second.flatten(1).abs().sum(1) == 0  # (B,)
    assert 0 < int(zeroed.sum()) < 16


def test_self_cond_sampler_feeds_the_last_estimate():
    """Each Euler step reads the estimate of z0 the step before made (none at the first), and the cached pass
    with that input equals the training layout's. Mutation: passing z_t, or the estimate of two steps back."""
    model = tiny_model(self_cond=True)
    seen, inner = [], model.guided_velocity
    model.guided_velocity = lambda *a: seen.append(a[5]) or inner(*a)
    estimates = []
    z = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    valid = torch.zeros(2, 0, dtype=torch.bool)
    denoise_block(model, z, time_grid(4), valid, 1.0, model.new_caches()[0], on_step=lambda i, x0: estimates.append(x0))
    assert seen[0] is None and all(torch.equal(s, e) for s, e in zip(seen[1:], estimates[:-1]))
    z0, t = torch.randn(2, 8, 4), torch.full((2, 8), 0.6)
    zt, sc = flow_path(z0, torch.randn(2, 8, 4), t), torch.randn(2, 8, 4)
    full = model.velocity_2l(z0, zt, t, None, sc)
    caches = model.new_caches()
    model.prefill(z0[:, :4], torch.ones(2, 4, dtype=torch.bool), caches)
    v = inner(zt[:, 4:], t[:, 4:], torch.ones(2, 4, dtype=torch.bool), 1.0, caches[0], sc[:, 4:])
    assert torch.allclose(v, full[:, 4:], atol=1e-5)
    out, _ = generate(model, [[1, 2, 3]], 8, SamplerConfig(steps=3, pad_id=EOS))
    assert len(out[0]) == 8


@pytest.mark.parametrize("probs", ["0.5,0.5", "0.2,0.2,0.2,0.2,0.1", "0.5,0.5,0.5,0,0"])
def test_bad_block_size_probs_is_one_line(probs):
    """Mutation: dropping check_args's test of --block_size_probs."""
    with pytest.raises(SystemExit, match="^error: --block_size_probs needs 5 probabilities"):
        train.main(["--block_size_probs", probs, "--dry_run", "--preset", "tiny"])


def test_rising_t_in_training_and_sampling():
    """rising_t: the first latent of a block is cleanest, t in [0, 1], all noise at s = 1 + w and clean at s = 0;
    training excludes latents at t = 0, and the sampler walks each latent from 1 to 0 on its own schedule.
    Mutation: the rise reversed along the block, or the Euler step taken with one dt for the whole block."""
    t = rising_t(torch.tensor([0.0, 0.5, 1.5]), 4, 0.5)  # (3, 4)
    assert torch.equal(t[0], torch.zeros(4)) and torch.equal(t[2], torch.ones(4))
    assert torch.allclose(t[1], torch.tensor([0.0, 1 / 6, 1 / 3, 0.5])) and bool((t[1].diff() >= 0).all())
    model = tiny_model().train()
    calls = record_velocity_2l(model)
    tokens = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, LossConfig(partial_prob=0.0, t_rise=0.5))
    blocks = calls[-1][1].view(3, 4, 4)
    assert bool((blocks.diff(dim=-1) >= 0).all()) and bool((blocks[..., 0] < blocks[..., -1]).any())
    model.eval()
    seen, inner = [], model.guided_velocity
    model.guided_velocity = lambda z, t_tok, *a: seen.append(t_tok[0].clone()) or torch.ones_like(z)
    grid = rising_t(time_grid(8, t_max=1.5), 4, 0.5)  # (9, 4)
    z = denoise_block(model, torch.zeros(1, 4, 4), grid, torch.zeros(1, 0, dtype=torch.bool), 1.0, None)
    assert torch.equal(torch.stack(seen), grid[:-1])
    assert torch.allclose(z[0, :, 0], -(grid[0] - grid[-1]))  # v = 1 everywhere: each latent moved by its own span
