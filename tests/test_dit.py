"""The block-causal DiT, the flow-matching functions and the joint stage-2 loss."""
import math

import torch

from diffusion import (ColaDLM, LossConfig, apply_guidance, flow_path, fm_loss, latent_stats,
                       partial_known_prefix, sample_t, sampler_step, time_grid, two_l_layout, velocity_target)
from measures import velocity_uncond
from dit import DiT, DiTConfig
from layers import KVCache, two_l_mask
from vae import VAEConfig

TINY_DIT = dict(latent_dim=4, width=32, n_layers=2, n_heads=2, block_size=2)


def randomize_zero_init(dit):
    """adaLN-Zero makes a fresh DiT the zero map; give it random modulation so perturbation tests mean something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return dit


def test_two_l_mask_hand_written():
    # L = 8, block size 2: clean c0..c5 (3 blocks), noisy n0..n7 (4 blocks)
    rows = [
        # c0 c1 c2 c3 c4 c5 | n0 n1 n2 n3 n4 n5 n6 n7
        "11000000000000",  # c0 block 0
        "11000000000000",  # c1
        "11110000000000",  # c2 block 1
        "11110000000000",  # c3
        "11111100000000",  # c4 block 2
        "11111100000000",  # c5
        "00000011000000",  # n0 block 0: no clean history, own block
        "00000011000000",  # n1
        "11000000110000",  # n2 block 1: clean block 0 + own block
        "11000000110000",  # n3
        "11110000001100",  # n4 block 2: clean blocks 0-1 + own
        "11110000001100",  # n5
        "11111100000011",  # n6 block 3: clean blocks 0-2 + own
        "11111100000011",  # n7
    ]
    expected = torch.tensor([[c == "1" for c in r] for r in rows])
    assert torch.equal(two_l_mask(8, 2)[0], expected)


def make_2l_inputs(B=2, L=8, d=4, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(B, L, d, generator=g)
    zt = torch.randn(B, L, d, generator=g)
    t = torch.rand(B, L, generator=g)
    return z0, zt, t


def run_2l(dit, z0, zt, t):
    seq, tt, pos, mask = two_l_layout(z0, zt, t, dit.cfg.block_size)
    return dit(seq, tt, pos, mask)


def test_mask_rule_by_perturbation():
    torch.manual_seed(0)
    dit = randomize_zero_init(DiT(DiTConfig(**TINY_DIT))).eval()
    z0, zt, t = make_2l_inputs()
    base = run_2l(dit, z0, zt, t)  # (B, 14, d): 6 clean then 8 noisy
    Lc = 6
    # changing noisy block 1 changes only noisy block 1's output
    zt2 = zt.clone()
    zt2[:, 2:4] += 1.0
    out = run_2l(dit, z0, zt2, t)
    changed = (out - base).abs().amax((0, 2)) > 1e-6  # per position
    assert changed[Lc + 2:Lc + 4].all()
    assert not changed[:Lc + 2].any() and not changed[Lc + 4:].any()
    # noisy inputs never change clean outputs (covered above) and a later clean block never changes an
    # earlier block's output: perturb clean block 1 (positions 2-3)
    z02 = z0.clone()
    z02[:, 2:4] += 1.0
    out = run_2l(dit, z02, zt, t)
    changed = (out - base).abs().amax((0, 2)) > 1e-6
    assert not changed[:2].any()  # clean block 0
    assert changed[2:Lc].all()  # clean blocks 1-2 see it
    assert not changed[Lc:Lc + 4].any()  # noisy blocks 0-1 do not
    assert changed[Lc + 4:].all()  # noisy blocks 2-3 do


def test_zero_init_blocks_are_identity():
    dit = DiT(DiTConfig(**TINY_DIT))
    x = torch.randn(2, 6, 32)
    c = torch.randn(2, 6, 32)
    pos = torch.arange(6)
    mask = torch.ones(6, 6, dtype=torch.bool)
    for blk in dit.blocks:
        assert torch.equal(blk(x, c, pos, mask), x)
    z, t = torch.randn(2, 6, 4), torch.rand(2, 6)
    assert torch.equal(dit(z, t, pos, mask), torch.zeros(2, 6, 4))


def test_dit_kv_cache_equals_full():
    torch.manual_seed(0)
    dit = randomize_zero_init(DiT(DiTConfig(**TINY_DIT))).eval()
    z, pos = torch.randn(2, 6, 4), torch.arange(6)
    t = torch.zeros(2, 6)
    blk = pos // 2
    full = dit(z, t, pos, (blk.unsqueeze(0) <= blk.unsqueeze(1)))
    cache = KVCache(dit.cfg.n_layers)
    parts = [dit(z[:, i:i + 2], t[:, i:i + 2], pos[i:i + 2], None, cache, commit=True) for i in (0, 2, 4)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_fm_loss_zero_for_exact_velocity():
    z0, eps = torch.randn(3, 8, 4), torch.randn(3, 8, 4)
    v = velocity_target(z0, eps)
    assert fm_loss(v, v) == 0
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[:, -2:] = False
    noisy = v.clone()
    noisy[:, -2:] += 5.0  # errors only at invalid positions are ignored
    assert fm_loss(noisy, v, valid) == 0
    assert fm_loss(noisy, v) > 0


def test_flow_path_endpoints_and_velocity():
    z0, eps = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    assert torch.equal(flow_path(z0, eps, torch.zeros(2)), z0)
    assert torch.equal(flow_path(z0, eps, torch.ones(2)), eps)
    t, h = torch.full((2,), 0.3), 1e-3
    fd = (flow_path(z0, eps, t + h) - flow_path(z0, eps, t)) / h
    assert torch.allclose(fd, velocity_target(z0, eps), atol=1e-2)


def test_euler_with_exact_velocity_lands_on_target():
    z0, eps = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    grid = time_grid(5)
    z = eps.clone()
    for i in range(5):
        z = sampler_step(z, velocity_target(z0, eps), grid[i], grid[i + 1])
    assert torch.allclose(z, z0, atol=1e-5)


def test_apply_guidance():
    vc, vu = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(apply_guidance(vc, vu, 1.0), vc)
    assert torch.equal(apply_guidance(vc, vu, 0.0), vu)
    assert torch.allclose(apply_guidance(vc, vu, 3.0), vu + 3 * (vc - vu))


def test_sample_t_moments():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, loc=1.0, scale=1.0, generator=g)
    u = torch.logit(t.double())
    assert abs(float(u.mean()) - 1.0) < 0.02 and abs(float(u.std()) - 1.0) < 0.02
    assert float(t.mean()) > 0.6  # loc 1 leans towards noise
    tu = sample_t(200_000, uniform=True, generator=g)
    assert abs(float(tu.mean()) - 0.5) < 0.01 and abs(float(tu.var()) - 1 / 12) < 0.005


def test_partial_known_prefix():
    g = torch.Generator().manual_seed(0)
    known = partial_known_prefix(4000, 8, 4, 0.5, generator=g).reshape(4000, 2, 4)
    frac_blocks = known.any(-1).float().mean()
    assert abs(float(frac_blocks) - 0.5) < 0.03
    # a prefix: never a known latent after an unknown one, and never the whole block
    assert not (known[..., 1:] & ~known[..., :-1]).any()
    assert not known.all(-1).any()


def test_latent_stats_normalise():
    mu = torch.randn(1000, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([1.0, -1.0, 0.0, 2.0])
    logvar = torch.full((1000, 4), math.log(0.25))
    shift, scale = latent_stats(mu, logvar)
    z = mu + 0.5 * torch.randn(1000, 4)
    zn = (z - shift) * scale
    assert torch.allclose(zn.mean(0), torch.zeros(4), atol=0.15)
    assert torch.allclose(zn.std(0), torch.ones(4), atol=0.1)


def tiny_cola():
    vcfg = VAEConfig(vocab_size=200, latent_dim=4, width=32, n_enc_layers=1, n_dec_layers=1, n_heads=2,
                     mlp_hidden=64, block_size=2, max_seq_len=64)
    return ColaDLM(vcfg, DiTConfig(**TINY_DIT))


def test_joint_gradients_reach_encoder_only_through_zt():
    torch.manual_seed(0)
    model = tiny_cola()
    randomize_zero_init(model.dit)
    x = torch.randint(0, 200, (2, 8))
    kw = dict(lam_vae=0.0, lam_ref=0.0, lam_mask=0.0, partial_prob=0.0)  # FM loss alone
    torch.manual_seed(1)
    model(x, LossConfig(**kw))["loss"].backward()
    enc_grad = model.vae.enc.to_latent.weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0  # through z_t
    assert model.vae.dec.head.weight.grad is None or model.vae.dec.head.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in model.ref_enc.parameters())
    # with z_t detached, no gradient reaches the encoder: the history and the target are detached too
    model.zero_grad(set_to_none=True)
    z0 = torch.randn(2, 8, 4, requires_grad=True)
    t = torch.rand(2, 8)
    fm_loss(model.velocity_2l(z0, flow_path(z0, torch.randn_like(z0), t).detach(), t), velocity_target(z0.detach(), z0.detach())).backward()
    assert z0.grad is None


def test_two_l_layout_detaches_history():
    z0 = torch.randn(1, 4, 2, requires_grad=True)
    zt = torch.randn(1, 4, 2, requires_grad=True)
    seq, t, pos, mask = two_l_layout(z0, zt, torch.rand(1, 4), 2)
    seq.sum().backward()
    assert z0.grad is None and zt.grad is not None
    assert pos.tolist() == [0, 1, 0, 1, 2, 3] and t[0, :2].tolist() == [0.0, 0.0]


def test_joint_loss_runs_and_ref_kl_starts_at_zero():
    torch.manual_seed(0)
    model = tiny_cola()
    model.ref_enc.load_state_dict(model.vae.enc.state_dict())
    out = model(torch.randint(0, 200, (2, 8)), LossConfig())
    assert float(out["ref_kl"].detach()) < 1e-6
    for k in ("loss", "ce", "fm", "neg_entropy", "mask_ce", "logsnr"):
        assert torch.isfinite(out[k]), k


def test_prior_learns_to_read_its_history():
    """Latents where every block repeats the one before: with its clean history the prior can predict a
    noisy block exactly, without it only up to a Gaussian guess. A mask or position bug that hides the
    history (or shows the wrong block) leaves the two losses equal."""
    torch.manual_seed(0)
    vcfg = VAEConfig(vocab_size=16, latent_dim=4, width=32, n_enc_layers=1, n_dec_layers=1, n_heads=2,
                     mlp_hidden=64, block_size=4, max_seq_len=64)
    model = ColaDLM(vcfg, DiTConfig(latent_dim=4, width=64, n_layers=2, n_heads=2, block_size=4))
    opt = torch.optim.Adam(model.dit.parameters(), lr=3e-3)

    def batch(B):
        first = torch.randn(B, 1, 4, 4)  # (B, 1, bs, d): block 0, repeated 4 times
        z0 = first.expand(B, 4, 4, 4).reshape(B, 16, 4)  # (B, L, d)
        eps, t = torch.randn_like(z0), 0.3 + 0.7 * torch.rand(B, 1).expand(B, 16)  # t in [0.3, 1]: noisy
        return z0, flow_path(z0, eps, t), t, velocity_target(z0, eps)

    for _ in range(120):
        z0, zt, t, v = batch(16)
        loss = fm_loss(model.velocity_2l(z0, zt, t), v)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z0, zt, t, v = batch(256)
        per_block = lambda pred: (pred - v).pow(2).reshape(256, 4, -1).mean((0, 2))  # (n_blocks,)
        cond, uncond = per_block(model.velocity_2l(z0, zt, t)), per_block(velocity_uncond(model, zt, t))
    assert torch.allclose(cond[0], uncond[0], atol=1e-5)  # block 0 has no history: the passes agree
    assert (cond[1:] < 0.5 * uncond[1:]).all(), (cond, uncond)


def test_fm_batch_mult_limits_the_decoder_terms():
    """fm_batch_mult: the decoder terms come from the first 1/fm_batch_mult of the rows only; the FM term uses every row."""
    torch.manual_seed(0)
    model = tiny_cola()
    model.ref_enc.load_state_dict(model.vae.enc.state_dict())
    x = torch.cat([torch.randint(0, 100, (2, 8)), torch.randint(100, 200, (2, 8))])  # disjoint vocabularies
    kw = dict(partial_prob=0.0, lam_mask=0.0)
    torch.manual_seed(3)
    full = model(x[:2], LossConfig(**kw))
    torch.manual_seed(3)
    part = model(x, LossConfig(fm_batch_mult=2, **kw))
    assert torch.allclose(full["ce"], part["ce"])  # same rows, same posterior draw
    # the FM term sees all 4 rows: it differs from the 2-row value (different batch)
    assert not torch.allclose(full["fm"], part["fm"])
    part["loss"].backward()
    # rows 2..3 reach the encoder (through z_t and the entropy), not the decoder
    assert model.vae.enc.embed.weight.grad[x[2:].flatten()].abs().sum() > 0


def test_frozen_vae_runs_no_decoder():
    """Without VAE terms (lam_vae = lam_ref = 0) stage 2 trains the prior alone: the decoder and the reference
    encoder never run, and the FM term is what remains. Mutation: still computing the decoder terms."""
    torch.manual_seed(0)
    model = tiny_cola()
    randomize_zero_init(model.dit)
    model.vae.requires_grad_(False)
    calls = []
    model.vae.dec.register_forward_hook(lambda *a: calls.append("dec"))
    model.ref_enc.register_forward_hook(lambda *a: calls.append("ref"))
    out = model(torch.randint(0, 200, (2, 8)), LossConfig(lam_vae=0.0, lam_ref=0.0))
    out["loss"].backward()
    assert calls == [] and torch.allclose(out["loss"], out["fm"])
    assert model.dit.inp.weight.grad is not None


def test_frozen_vae_with_patches():
    """The frozen-VAE path with 2 tokens per latent: the latents are L / 2 long (a placeholder of L rows
    once broke the concatenation)."""
    vcfg = VAEConfig(vocab_size=200, latent_dim=4, width=32, n_enc_layers=1, n_dec_layers=1, n_heads=2,
                     mlp_hidden=64, block_size=2, patch_size=2, max_seq_len=64)
    model = ColaDLM(vcfg, DiTConfig(**TINY_DIT))
    out = model(torch.randint(0, 200, (2, 8)), LossConfig(lam_vae=0.0, lam_ref=0.0))
    assert torch.isfinite(out["loss"]) and torch.allclose(out["loss"], out["fm"])
