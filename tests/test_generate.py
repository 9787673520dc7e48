"""Block-wise generation: cache exactness, guidance, repaint, token choice, errors."""
import pytest
import torch

import decoder
import diffusion
from checkpoint import save_checkpoint
from conftest import one_line_error
from decoder import GenerationError, SamplerConfig, choose_tokens, generate
from diffusion import ColaDLM, apply_guidance
from measures import velocity_uncond
from dit import DiTConfig
from layers import block_causal_mask, cola_mask, with_key_padding
from release import release_generate, row_noise
from test_dit import randomize_zero_init
from vae import VAEConfig

V, EOS = 120, 119


def tiny_model(seed=0, patch=1):
    torch.manual_seed(seed)
    vcfg = VAEConfig(vocab_size=V, latent_dim=4, width=32, n_enc_layers=1, n_dec_layers=2, n_heads=2,
                     mlp_hidden=64, block_size=4, patch_size=patch, max_seq_len=64)
    model = ColaDLM(vcfg, DiTConfig(latent_dim=4, width=32, n_layers=2, n_heads=2, block_size=4))
    randomize_zero_init(model.dit)
    with torch.no_grad():  # weights of a trained scale (1/sqrt(fan-in)), so that every token depends on its latent
        for p in model.vae.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
        model.ref_enc.load_state_dict(model.vae.enc.state_dict())
    with torch.no_grad():
        model.latent_shift.copy_(torch.randn(4) * 0.1)
        model.latent_scale.copy_(1 + torch.rand(4))
    return model.eval()


class Uncached:
    """ColaDLM's generation methods recomputed from scratch over the whole history, without KV caches: the
    conditional pass runs [clean history | noisy block] under the training mask rule (cola_mask), the
    unconditional pass is velocity_uncond (each block alone), the decoder sees the whole text. The cached
    methods must give what this gives."""

    def __init__(self, model):
        self.model, self.hist = model, None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_caches(self):
        self.hist = None
        return None, None

    def prefill(self, zn, key_valid, caches):
        self.hist = zn

    def _history(self, z):
        return self.hist if self.hist is not None else z[:, :0]

    def guided_velocity(self, z, t_tok, hist_valid, guidance, cache):
        m = self.model
        hist = self._history(z)
        B, Tc, bs = z.shape[0], hist.shape[1], z.shape[1]
        pos = torch.arange(Tc + bs)
        noisy = pos >= Tc
        mask = with_key_padding(cola_mask(pos // bs, noisy, pos // bs, noisy),
                                torch.cat([hist_valid, torch.ones(B, bs, dtype=torch.bool)], 1))
        v_cond = m.dit(torch.cat([hist, z], 1), torch.cat([torch.zeros(B, Tc), t_tok], 1), pos, mask)[:, Tc:]
        return apply_guidance(v_cond, velocity_uncond(m, z, t_tok), guidance)

    def decode_block(self, z, hist_valid, caches):
        m = self.model
        self.hist = torch.cat([self._history(z), z], 1)
        B, T, bs, vbs = z.shape[0], self.hist.shape[1], z.shape[1], m.vae.cfg.block_size
        pos = torch.arange(T)
        mask = with_key_padding(block_causal_mask(pos // vbs, pos // vbs),
                                torch.cat([hist_valid, torch.ones(B, bs, dtype=torch.bool)], 1))
        return m.vae.decode(m.decoder_input(self.hist), pos, mask)[:, -bs * m.vae.cfg.patch_size:]


def run(model, prompts, seed=0, max_new_tokens=12, budget="tokens", row_seeds=None, noise=None, **kw):
    """generate() with the tests' sampler; budget 'blocks' or row seeds: the release's (release_generate)."""
    sampler = SamplerConfig(**{**dict(steps=4, guidance=3.0, stop_ids=(EOS,), pad_id=EOS), **kw})
    g = torch.Generator().manual_seed(seed)
    if budget == "blocks" or row_seeds is not None:
        return release_generate(model, prompts, max_new_tokens, sampler, row_seeds, g)
    return generate(model, prompts, max_new_tokens, sampler, g, noise)


def capture_latents(monkeypatch):
    """Record every block's final latents (the decoder's inputs) during generate()."""
    seen = []
    real = decoder.choose_tokens

    def spy(logits, *a, **k):
        seen.append(logits.clone())
        return real(logits, *a, **k)
    monkeypatch.setattr(decoder, "choose_tokens", spy)
    return seen


PROMPTS = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], []]  # partial, partial, empty


def test_cached_equals_uncached(monkeypatch):
    model = tiny_model()
    logits = capture_latents(monkeypatch)
    out_c, _ = run(model, PROMPTS)
    cached = list(logits)
    logits.clear()
    out_u, _ = run(Uncached(model), PROMPTS)
    assert out_c == out_u
    diff = max(float((a - b).abs().max()) for a, b in zip(cached, logits))
    print(f"largest |cached - uncached| decoder logit difference: {diff:.2e}")
    assert diff < 1e-4


def test_same_seed_same_output():
    model = tiny_model()
    a = run(model, PROMPTS, seed=3, temperature=1.0)[0]
    b = run(model, PROMPTS, seed=3, temperature=1.0)[0]
    c = run(model, PROMPTS, seed=4, temperature=1.0)[0]
    assert a == b and a != c


def test_guidance_one_is_conditional_pass(monkeypatch):
    model = tiny_model()
    calls = []
    real = model.dit.forward

    def spy(z, *a, **k):
        calls.append(z.shape[0])
        return real(z, *a, **k)
    monkeypatch.setattr(model.dit, "forward", spy)
    out1, _ = run(model, PROMPTS, guidance=1.0)
    assert max(calls) == len(PROMPTS)  # no unconditional half was run
    # and it equals combining the cond and uncond halves at scale 1 inside the batched pass
    monkeypatch.setattr(diffusion, "apply_guidance", lambda vc, vu, s: vc)
    calls.clear()
    out3, _ = run(model, PROMPTS, guidance=3.0)
    assert max(calls) == 2 * len(PROMPTS)
    assert out3 == out1


def test_guidance_changes_output():
    model = tiny_model()
    assert run(model, PROMPTS, guidance=1.0)[0] != run(model, PROMPTS, guidance=5.0)[0]


def test_repaint_pins_known_latents(monkeypatch):
    model = tiny_model()
    prompt = [5, 6, 7, 8, 9, 10]  # 1 full block + 2 known latents
    seen = []
    real = model.vae.decode

    def spy(z, *a, **k):
        seen.append(z.clone())
        return real(z, *a, **k)
    monkeypatch.setattr(model.vae, "decode", spy)
    run(model, [prompt], max_new_tokens=2)
    # the partial block is padded with the pad token, which the encoder reads, as the release does
    mu, _ = model.vae.encode(torch.tensor([prompt + [EOS, EOS]]))
    # seen[0] = prefill (block 0), seen[1] = the generated block 1 whose first 2 latents are the prompt's
    assert torch.allclose(seen[1][0, :2], mu[0, 4:6], atol=1e-5)


def test_batch_rows_match_single_runs(monkeypatch):
    """Prompts of different lengths batched together give what each gives alone (left padding by blocks,
    masked padded keys). The noise is made batch-independent so that rows can be compared."""
    model = tiny_model()
    same = lambda k, shape: torch.linspace(-1, 1, shape[1] * shape[2]).reshape(1, shape[1], shape[2]).expand(shape).clone()
    together, _ = run(model, PROMPTS, stop_ids=(), noise=same)
    alone = [run(model, [p], stop_ids=(), noise=same)[0][0] for p in PROMPTS]
    assert together == alone
    assert len(set(map(tuple, together))) == 3  # and the rows do differ


def test_row_seeds_make_each_row_batch_independent():
    """With one noise seed per row (the release's per-sample seeding), a row generates the same tokens in any
    batch; its block k draws from seed + k * 10^7. Mutation: drawing the batch's noise from one generator."""
    model = tiny_model()
    together, _ = run(model, PROMPTS, stop_ids=(), row_seeds=[11, 22, 33])
    alone = [run(model, [p], stop_ids=(), row_seeds=[s])[0][0] for p, s in zip(PROMPTS, [11, 22, 33])]
    assert together == alone and len(set(map(tuple, together))) == 3
    first = row_noise([11], "cpu")(1, (1, 4, 4))
    assert torch.equal(first[0], torch.randn(4, 4, generator=torch.Generator().manual_seed(11 + 10_000_000)))
    import zlib
    from measures import item_seed
    assert item_seed(66, 5) == 5066 and item_seed(66, "q7") == 66 + (zlib.crc32(b"q7") & 0xFFFFFFFF) * 1000


def test_empty_prompt_and_max_new_tokens():
    model = tiny_model()
    out, stats = run(model, [[]], max_new_tokens=7, stop_ids=())
    assert len(out[0]) == 7
    assert stats["blocks"] == 2


def test_patch_size_two_generates():
    model = tiny_model(patch=2)
    out, stats = run(model, [[3, 4, 5], [7]], max_new_tokens=9, stop_ids=())
    assert [len(o) for o in out] == [9, 9]


def test_prompt_too_long():
    model = tiny_model()
    with pytest.raises(GenerationError, match="exceed the model's context"):
        run(model, [[1] * 65])
    with pytest.raises(GenerationError, match="exceed the model's context"):
        run(model, [[1] * 60], max_new_tokens=10)


def test_stops_at_eos():
    model = tiny_model()
    with torch.no_grad():
        model.vae.dec.head.weight.zero_()
    model.vae.dec.head.bias = torch.nn.Parameter(torch.zeros(V))
    with torch.no_grad():
        model.vae.dec.head.bias[EOS] = 10.0  # every position predicts EOS
    out, stats = run(model, [[1, 2]], max_new_tokens=40)
    assert out == [[]] and stats["blocks"] == 1
    # the release's budget keeps every token of the block, and stops once every row holds a stop token
    out, stats = run(model, [[1, 2]], max_new_tokens=40, budget="blocks")
    assert out == [[EOS, EOS]] and stats["blocks"] == 1


def test_release_block_budget():
    """budget='blocks' (the release): ceil(max_new_tokens / 4) blocks whose first includes the prompt's share,
    one block when the partial prompt block alone needs more latents than max_new_tokens, every token kept.
    Mutation: counting the budget in new tokens (as 'tokens' does) changes the lengths."""
    model = tiny_model()
    for prompt, max_new, length in (([], 7, 8), ([5, 6, 7, 8, 9, 10], 4, 2), ([5, 6, 7, 8, 9, 10], 8, 6),
                                    ([5, 6, 7, 8, 9], 2, 3), ([5, 6, 7, 8, 9], 3, 3)):
        out, _ = run(model, [prompt], max_new_tokens=max_new, stop_ids=(), budget="blocks")
        assert len(out[0]) == length, (prompt, max_new)


def test_nonfinite_latents_are_refused(monkeypatch):
    """A velocity that overflows (a huge guidance or noise scale) is a GenerationError naming the block, not
    all-zero tokens. Mutation: no finiteness check (generate returns tokens decoded from NaN)."""
    model = tiny_model()
    monkeypatch.setattr(model, "guided_velocity", lambda z, *a: torch.full_like(z, float("inf")))
    with pytest.raises(GenerationError, match="block 0's latents are not finite"):
        run(model, [[1, 2]])


def test_choose_tokens():
    logits = torch.tensor([[[1.0, 3.0, 2.0, -1.0]]])
    assert choose_tokens(logits).tolist() == [[1]]
    seen = torch.tensor([[False, True, False, False]])
    # 3.0 / 2 = 1.5 < 2.0: the penalty moves greedy to token 2
    assert choose_tokens(logits, seen, repetition_penalty=2.0).tolist() == [[2]]
    # a negative logit is multiplied: -2 * 2 = -4 < -3 moves greedy to token 1
    negative = torch.tensor([[[-2.0, -3.0]]])
    assert choose_tokens(negative, torch.tensor([[True, False]]), repetition_penalty=2.0).tolist() == [[1]]
    g = torch.Generator().manual_seed(0)
    many = torch.cat([choose_tokens(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(many.flatten().tolist()) == {1, 2}
    many = torch.cat([choose_tokens(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(50)])
    assert set(many.flatten().tolist()) == {1}  # token 1 alone holds > 50% of the mass


def test_sample_cli_errors(tmp_path, capsys):
    import sample
    assert one_line_error(sample.main, ["--ckpt", str(tmp_path / "none.pt")], capsys) == \
        f"error: checkpoint {tmp_path / 'none.pt'} not found"
    save_checkpoint(str(tmp_path / "vae.pt"), {"kind": "vae"})
    assert "holds a 'vae' model" in one_line_error(sample.main, ["--ckpt", str(tmp_path / "vae.pt")], capsys)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in one_line_error(sample.main, ["--ckpt", str(tmp_path / "junk.pt")], capsys)


def test_eos_mid_block_rows_stop_at_different_blocks(monkeypatch):
    """Rows stop at their own EOS, mid-block and in different blocks; a stopped row gets nothing more and
    the loop ends when every row has stopped. Mutation: stopping all rows at the first EOS, or keeping
    the tokens after a row's EOS."""
    model = tiny_model()
    plan = {0: [[1, 2, EOS, 4], [5, 6, 7, 8]], 1: [[9, 9, 9, 9], [10, EOS, 11, 12]], 2: [[13] * 4, [14] * 4]}
    calls = []

    def fake_choose(logits, *a, **k):
        calls.append(1)
        return torch.tensor(plan[len(calls) - 1])
    monkeypatch.setattr(decoder, "choose_tokens", fake_choose)
    out, stats = run(model, [[], []], max_new_tokens=40)
    assert out == [[1, 2], [5, 6, 7, 8, 10]]
    assert stats["blocks"] == 2
    calls.clear()  # the release's budget: every row keeps its tokens until all rows have stopped
    out, stats = run(model, [[], []], max_new_tokens=40, budget="blocks")
    assert out == [[1, 2, EOS, 4, 9, 9, 9, 9], [5, 6, 7, 8, 10, EOS, 11, 12]]
    assert stats["blocks"] == 2


def test_guided_euler_step_with_a_stubbed_dit(monkeypatch):
    """With a DiT whose conditional rows return c and unconditional rows u (constants), every Euler step
    is exactly z - dt * (u + s (c - u)); a row with no history yet is not guided (z - dt * c), as in the
    release. Mutation: guidance applied to part of the prediction, the halves swapped, or guidance on a row
    without history."""
    model = tiny_model()
    c, u, s, steps = 0.7, -0.2, 3.0, 4

    def stub(z, t, pos, mask, cache=None, commit=False):
        if commit:
            return torch.zeros_like(z)
        B = z.shape[0] // 2
        return torch.cat([torch.full_like(z[:B], c), torch.full_like(z[B:], u)])
    monkeypatch.setattr(model.dit, "forward", stub)
    start = torch.randn(2, 4, 4)
    seen = []
    real = model.decode_block
    monkeypatch.setattr(model, "decode_block", lambda z, *a, **k: (seen.append(z.clone()), real(z, *a, **k))[1])
    run(model, [[1, 2, 3, 4], []], max_new_tokens=4, steps=steps, guidance=s, stop_ids=(), noise=lambda k, shape: start.clone())
    # dt sums to 1 over the uniform grid
    assert torch.allclose(seen[0][0], start[0] - 1.0 * (u + s * (c - u)), atol=1e-6)
    assert torch.allclose(seen[0][1], start[1] - 1.0 * c, atol=1e-6)


def test_patch_size_two_cached_equals_uncached(monkeypatch):
    """Mutation: a cache that stores latents per token instead of per patch."""
    model = tiny_model(patch=2)
    logits = capture_latents(monkeypatch)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [7]]
    out_c, _ = run(model, prompts, max_new_tokens=20, stop_ids=())
    cached = list(logits)
    logits.clear()
    out_u, _ = run(Uncached(model), prompts, max_new_tokens=20, stop_ids=())
    assert out_c == out_u
    assert max(float((a - b).abs().max()) for a, b in zip(cached, logits)) < 1e-4
