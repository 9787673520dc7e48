"""Learnability: each model memorises a repeated passage at a tiny size, and Cola's prior is shown to read its
history. The passage is 64 random symbols, cycled; a window starts at a block boundary of the cycle, so the clean
history fixes the next block exactly while the block alone says nothing about it (every symbol is about equally
frequent). Trained in-process with the real losses (stage 1, then the joint stage-2 loss) for a few hundred steps.

What free generation showed here (docs/results.md): a prior that recovers 99% of a block after its true history
derails within two or three blocks when its history is its own generated latents, though it decodes them to the
right tokens: the generated latents sit 0.5-1.5 (in norm) from the re-encoding of their own tokens, off the
posterior latents the prior was trained to read. Re-encoding each finished block's tokens before it became
history continued the passage without an error (measures.history_drift, since removed; commit 991a67d)."""
import pytest
import torch

import measures as dg
from baselines import LMConfig, TransformerLM, ar_generate
from decoder import SamplerConfig, generate
from diffusion import ColaDLM, LossConfig
from dit import DiTConfig
from vae import VAEConfig

pytestmark = pytest.mark.xdist_group("learning")  # one worker trains the module's Cola model once
P, BS, L, V = 64, 4, 32, 64  # passage length, block size, window length, vocabulary
PASSAGE = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(0))


def windows(n, seed):
    """n windows of the cycled passage, each starting at a block boundary (B, L)."""
    start = torch.randint(0, P // BS, (n,), generator=torch.Generator().manual_seed(seed)) * BS
    return PASSAGE[(start[:, None] + torch.arange(L)) % P]


def fit(params, loss_of, steps, lr=3e-3):
    opt = torch.optim.AdamW(params, lr=lr)
    for i in range(steps):
        loss = loss_of(windows(16, 1000 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the same trajectory on any machine (reductions split across threads round differently), and
    tiny matrices gain nothing from two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cola(one_thread):
    torch.manual_seed(0)
    vcfg = VAEConfig(vocab_size=V, latent_dim=8, width=64, n_enc_layers=1, n_dec_layers=1, n_heads=2, mlp_hidden=128,
                     block_size=BS, max_seq_len=128)
    model = ColaDLM(vcfg, DiTConfig(latent_dim=8, width=96, n_layers=2, n_heads=2, block_size=BS))
    fit(model.vae.parameters(), lambda x: model.vae(x, 1e-4, 0.15, 1.0)["loss"], 80)  # stage 1
    model.init_from_stage1(model.vae.state_dict(), [windows(16, i) for i in range(4)])
    fit(model.parameters(), lambda x: model(x, LossConfig(beta=1e-4))["loss"], 300)  # stage 2, jointly
    return model.eval()


def constant_answer(target):
    return max(float((target == v).float().mean()) for v in target.unique())


@torch.no_grad()
def test_cola_prior_reads_its_history(cola):
    """Block 3 generated from noise after its true clean history (the real sampler, no guidance) is decoded to
    the true tokens far above the constant answer; generated with the history hidden (the unconditional pass)
    it stays near the constant answer. Mutation: a training mask that hides the clean history from the noisy
    blocks (in diffusion.two_l_layout's mask) leaves both near the constant answer."""
    x, j, g = windows(64, 7), 3, torch.Generator().manual_seed(1)
    target = x[:, j * BS:(j + 1) * BS]
    hist, true = dg.true_block(cola, x, j)
    noise = torch.randn(true.shape, generator=g)
    with_history = float((dg.decode_after(cola, hist, dg.denoise_from(cola, hist, noise, 8, 1.0)).argmax(-1)
                          == target).float().mean())
    hidden = float((dg.decode_after(cola, hist, dg.denoise_from(cola, hist[:, :0], noise, 8, 1.0)).argmax(-1)
                    == target).float().mean())
    const = constant_answer(target)
    print(f"block accuracy after the true history {with_history:.3f}, history hidden {hidden:.3f}, constant {const:.3f}")
    assert with_history > 0.8 and with_history > 8 * const
    assert hidden < 3 * const


@torch.no_grad()
def test_cola_free_generation_continues_the_passage(cola):
    """Prompted with the passage's first 16 symbols, the sampler (16 steps, guidance 1) continues it: the first block
    holds; later ones, read from the prior's own generated latents, derail (printed: the level reached, not asserted).
    Mutation: the hidden-history mask above drops every block to chance."""
    cfg, truth = SamplerConfig(steps=16, guidance=1.0, stop_ids=(), repetition_penalty=1.0), PASSAGE[16:48].tolist()
    out, _ = generate(cola, [PASSAGE[:16].tolist()], 32, cfg, torch.Generator().manual_seed(3))
    accuracy = [sum(a == b for a, b in zip(out[0][k:k + BS], truth[k:k + BS])) / BS for k in range(0, 32, BS)]
    print(f"free generation: token accuracy per block {accuracy}")
    assert accuracy[0] >= 0.75


@pytest.mark.parametrize("kind", ["ar", "llada"])
def test_baselines_memorise_the_passage(kind):
    """AR continues the passage exactly from a prompt; LLaDA predicts half-masked windows. Mutation: a causal mask
    that lets AR see the next token makes its loss vanish in training but its greedy continuation fail."""
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(kind=kind, vocab_size=V, width=64, n_layers=2, n_heads=2, mlp_hidden=128, max_seq_len=64))
    fit(model.parameters(), lambda x: model(x)["loss"], 150 if kind == "ar" else 300)
    model.eval()
    with torch.no_grad():
        if kind == "ar":
            out, _ = ar_generate(model, [PASSAGE[:16].tolist()], 16, eos_id=-1)
            acc = sum(a == b for a, b in zip(out[0], PASSAGE[16:32].tolist())) / 16
        else:
            x = windows(32, 9)
            hide = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.5
            pred = model.logits(torch.where(hide, torch.full_like(x, V), x)).argmax(-1)
            acc = float((pred == x)[hide].float().mean())
    print(f"{kind}: accuracy {acc:.3f}")
    assert acc > 0.9
