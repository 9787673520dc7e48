"""
The training recipe and the size presets train.py starts from (as nanoGPT's config/ files). Every flag
left unset takes the preset's value, then the paper's recipe; each deviation from the paper's recipe
is measured in the README ("What each deviation buys").
"""

# The paper's recipe (docs/method.md §5); a preset may override it where its scale calls for it.
RECIPE = dict(beta=1e-3, beta2=0.95, embed_lr_mult=1.0, lr=1.5e-4, min_lr=1e-5, warmup_iters=5000,
              grad_clip_scope="global", fm_batch_mult=1, decoder_noise=0.0, lam_x0_ce=0.0, lam_token_aux=0.0)

# Size presets. 'cpu' is the laptop default; 'paper' is the paper's configuration (docs/method.md §3, §4, §10).
PRESETS = {
    "tiny": dict(vae=dict(width=64, n_enc_layers=1, n_dec_layers=1, n_heads=2, mlp_hidden=128),
                 dit=dict(width=64, n_layers=2, n_heads=2),
                 recipe=dict(lr=3e-3, min_lr=3e-4, warmup_iters=50)),
    # a few hundred steps over ~0.3M tokens; each deviation from RECIPE is measured in the README
    "cpu": dict(vae=dict(width=128, n_enc_layers=2, n_dec_layers=2, n_heads=4, mlp_hidden=384),
                dit=dict(width=192, n_layers=4, n_heads=4),
                recipe=dict(beta=1e-4, beta2=0.999, embed_lr_mult=10.0, lr=3e-3, min_lr=3e-4, warmup_iters=50,
                            fm_batch_mult=4, grad_clip_scope="network"),
                # each block starts from N(0, 0.5^2 I): a lower-temperature draw from a weak prior (README:
                # seen 3-gram rate x3, judge perplexity / 6 at this budget); samples of exactly the length asked
                # for, cut at <|endoftext|>; the DiT's inputs in fp32
                sampler=dict(noise_scale=0.5, budget="tokens", round_bf16=False)),
    # the released model's sizes (docs/release.md); its vocabulary (100,278) comes from the data
    "paper": dict(vae=dict(width=1536, n_enc_layers=4, n_dec_layers=4, n_heads=12, mlp_hidden=3072),
                  dit=dict(width=2048, n_layers=24, n_heads=16, mlp_hidden=8192, rope_fraction=0.75)),
}


# The sampler (docs/method.md §6, docs/release.md): the release's settings, which released snapshots use;
# a preset's "sampler" entry overrides them. budget 'blocks': ceil(max_new_tokens / 16) blocks and every token
# of them (decoder.n_blocks_to_generate); round_bf16: the DiT's inputs rounded to bfloat16.
SAMPLER = dict(steps=16, guidance=7.0, noise_scale=1.0, eta=0.0, budget="blocks", round_bf16=True)


def sampler_settings(preset):
    """The sampler settings for checkpoints trained at this preset (sample.py and eval.py's defaults)."""
    return {**SAMPLER, **PRESETS.get(preset, {}).get("sampler", {})}
