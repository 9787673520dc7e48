"""The authors' released model (docs/release.md): the Hugging Face snapshot of ByteDance-Seed/Cola-DLM (DIR/cola_vae/,
DIR/cola_dit/: config.json + safetensors; tokenizer.json in DIR or DIR/..) read into ColaDLM, anything this code does
not implement refused in one line; the release's sampler over decoder.generate: bf16-rounded DiT inputs
(BF16InputDiT), normalised latents into the decoder, whole blocks all kept (release_generate), per-row noise seeds."""
import math
import os
import re
from dataclasses import replace

import torch
import torch.nn.functional as F
from safetensors import safe_open

from cli import CheckpointError as SnapshotError, read_json
from decoder import SamplerConfig, generate
from diffusion import ColaDLM
from dit import DiT, DiTConfig
from tokenizer import get_tokenizer, template_ids
from vae import VAEConfig


# configs: release key -> the only value this code implements (the release's own defaults)
VAE_FIXED = dict(model_type="cola_text_vae", shared_heads_kv=1, encoder_last_ln=True, layer_norm_type="layer_norm",
                 layer_norm_affine=True, post_norm=True, qk_bias=False, qk_norm=True, qk_norm_affine=True, bias=True,
                 clip_qkv=None, act="swiglu", causal=False, block_causal=True, use_variation=True, use_emb=True)
DIT_FIXED = dict(model_type="cola_dit", qk_bias=False, patch_size=1)
REAL_KEYS = ("rope_theta", "layer_norm_eps", "norm_eps")


def read_config(folder, required, fixed):
    """(config.json of one module, its path), checked against `required` keys and `fixed` values."""
    path = os.path.join(folder, "config.json")
    try:
        cfg = read_json(path)
    except (OSError, ValueError) as e:
        why = "is missing" if isinstance(e, FileNotFoundError) else f"is not readable JSON ({type(e).__name__})"
        raise SnapshotError(f"{path} {why}") from None
    if not isinstance(cfg, dict):
        raise SnapshotError(f"{path} is not a JSON object")
    for key in required:
        if key not in cfg:
            raise SnapshotError(f"{path}: key {key!r} is missing")
        value, real = cfg[key], key in REAL_KEYS  # sizes and counts are integers; eps and theta real numbers
        if not isinstance(value, (int, float) if real else int) or isinstance(value, bool) or not 0 < value < 1e7:
            raise SnapshotError(f"{path}: {key} = {value!r} must be a positive "
                                f"{'number' if real else 'integer below 10^7'}")
    for key, want in fixed.items():
        if key in cfg and cfg[key] != want:
            raise SnapshotError(f"{path}: {key} = {cfg[key]!r} is not supported (this code implements {want!r})")
    return cfg, path


def vae_config(folder):
    """VAEConfig and the latent normalisation (shift, scale) of the release's cola_vae/config.json."""
    c, where = read_config(folder, ("vocab_size encoder_num_blocks decoder_num_blocks dim ffn_dim latent_dim "
                                    "patch_size num_heads block_size rope_theta layer_norm_eps").split(), VAE_FIXED)
    if c["dim"] % c["num_heads"] or c["ffn_dim"] % 2:
        raise SnapshotError(f"{where}: dim must be a multiple of num_heads and ffn_dim even")
    cfg = VAEConfig(vocab_size=c["vocab_size"], latent_dim=c["latent_dim"], width=c["dim"],
                    n_enc_layers=c["encoder_num_blocks"], n_dec_layers=c["decoder_num_blocks"], n_heads=c["num_heads"],
                    mlp_hidden=c["ffn_dim"] // 2, block_size=c["block_size"], patch_size=c["patch_size"],
                    max_seq_len=1 << 16, rope_theta=float(c["rope_theta"]), norm_eps=float(c["layer_norm_eps"]))
    return cfg, float(c.get("shifting_factor", 0.0)), float(c.get("scaling_factor", 1.0))


def dit_config(folder, vae_cfg):
    """DiTConfig of the release's cola_dit/config.json, on the VAE's latents."""
    c, where = read_config(folder, ("txt_in_channels txt_out_channels txt_dim emb_dim heads head_dim expand_ratio "
                                    "num_layers norm_eps rope_dim block_size").split(), DIT_FIXED)
    checks = [("txt_in_channels", c["txt_in_channels"] == vae_cfg.latent_dim, "the VAE's latent_dim"),
              ("txt_out_channels", c["txt_out_channels"] == vae_cfg.latent_dim, "the VAE's latent_dim"),
              ("emb_dim", c["emb_dim"] == c["txt_dim"], "txt_dim"),
              ("head_dim", c["heads"] * c["head_dim"] == c["txt_dim"], "txt_dim / heads"),
              ("rope_dim", c["rope_dim"] % 2 == 0 and c["rope_dim"] <= c["head_dim"], "even and <= head_dim"),
              ("block_size", c["block_size"] % vae_cfg.block_size == 0, "a multiple of the VAE's block_size")]
    for key, ok, want in checks:
        if not ok:
            raise SnapshotError(f"{where}: {key} = {c[key]!r} must be {want}")
    return DiTConfig(latent_dim=vae_cfg.latent_dim, width=c["txt_dim"], n_layers=c["num_layers"], n_heads=c["heads"],
                     mlp_hidden=c["expand_ratio"] * c["txt_dim"], block_size=c["block_size"],
                     rope_fraction=c["rope_dim"] / c["head_dim"], norm_eps=float(c["norm_eps"]), adaln_zero=False)


# weights: our parameter names -> the release's (each with .weight and .bias), the *_BLOCK ones in every block
VAE_TOP = {"enc.embed": "encoder.wte", "enc.patch": "encoder.patch_embedder", "enc.to_latent": "encoder.final_layer",
           "dec.from_latent": "decoder.in_layer", "dec.unpatch": "decoder.unpatch_layer",
           "dec.ln_f": "decoder.final_norm", "dec.head": "decoder.final_layer"}
VAE_BLOCK = {"attn.qkv": "qkv_proj", "attn.q_norm": "q_norm", "attn.k_norm": "k_norm", "attn.proj": "attn_out_proj",
             "ln_attn": "norm_attn", "mlp.proj": "ffn_proj", "mlp.out": "ffn_out", "ln_mlp": "norm_ffn"}
DIT_TOP = {"inp": "txt_in.proj", "t_embed.mlp.0": "emb_in.proj_in", "t_embed.mlp.2": "emb_in.proj_hid",
           "t_embed.mlp.4": "emb_in.proj_out", "final.ln": "txt_out_norm", "final.ada": "txt_out_ada.out_in.1",
           "final.out": "txt_out.proj"}
DIT_BLOCK = {"attn.qkv": "msa.proj_qkv", "attn.proj": "msa.proj_out", "attn.q_norm": "msa.norm_q",
             "attn.k_norm": "msa.norm_k", "mlp.0": "mlp.proj_in", "mlp.2": "mlp.proj_out", "ada_attn": "ada.msa_in.1",
             "gate_attn": "ada.msa_out.1", "ada_mlp": "ada.mlp_in.1", "gate_mlp": "ada.mlp_out.1"}
RELEASE_NAMES = (  # (regex over our names, the release's name)
    [(re.escape(f"vae.{a}"), b) for a, b in VAE_TOP.items()]
    + [(rf"vae\.{o}\.blocks\.(\d+)\.{re.escape(a)}", rf"{t}.blocks.\1.{b}")
       for o, t in (("enc", "encoder"), ("dec", "decoder")) for a, b in VAE_BLOCK.items()]
    + [(re.escape(f"dit.{a}"), b) for a, b in DIT_TOP.items()]
    + [(rf"dit\.blocks\.(\d+)\.{re.escape(a)}", rf"blocks.\1.{b}") for a, b in DIT_BLOCK.items()])
ROPE_BUFFER = re.compile(r"blocks\.\d+\.msa\.rope\.rope\.freqs")  # the release's RoPE frequencies, recomputed here


def release_name(name):
    """The released tensor name of one of our parameters ('vae.enc.embed.weight' -> 'encoder.wte.weight')."""
    for ours, theirs in RELEASE_NAMES:
        m = re.fullmatch(ours + r"\.(weight|bias)", name)
        if m:
            return m.expand(theirs + r".\g<%d>" % (m.re.groups))
    raise KeyError(name)


def safetensors_files(folder):
    """{tensor name: file} of a module's safetensors weights, one file or the shards of an index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            weight_map = read_json(index)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SnapshotError(f"{index} is not a readable shard index ({type(e).__name__})") from None
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        raise SnapshotError(f"{path} is missing (nor is there a model.safetensors.index.json)")
    return dict.fromkeys(read_tensor(path), path)


def read_tensor(path, name=None):
    """Tensor `name` of a safetensors file (None: the names of its tensors); a file it cannot read is one line."""
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys()) if name is None else f.get_tensor(name)
    except Exception as e:
        what = " is not a readable safetensors file" if name is None else f": cannot read tensor {name!r}"
        raise SnapshotError(f"{path}{what} ({type(e).__name__})") from None


def load_weights(model, folder, prefix):
    """Copy a module's released tensors into model's parameters named `prefix`..., checking names and shapes, and
    that the DiT's stored RoPE frequencies are the ones this code computes."""
    files = safetensors_files(folder)
    wanted = {release_name(k): p for k, p in model.named_parameters() if k.startswith(prefix)}
    rope = [name for name in files if prefix == "dit." and ROPE_BUFFER.fullmatch(name)]
    for name in files:
        if name not in wanted and name not in rope:
            raise SnapshotError(f"{folder}: unknown tensor {name!r} in the snapshot")
    for theirs, p in wanted.items():
        if theirs not in files:
            raise SnapshotError(f"{folder}: tensor {theirs!r} is missing from the snapshot")
        t = read_tensor(files[theirs], theirs)
        if tuple(t.shape) != tuple(p.shape):
            raise SnapshotError(f"{folder}: tensor {theirs!r} has shape {tuple(t.shape)}, the config makes it "
                                f"{tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.to(p.dtype))
        if not torch.isfinite(p).all():
            raise SnapshotError(f"{folder}: tensor {theirs!r} holds NaN or Inf")
    cfg = model.dit.cfg
    rot = round(cfg.rope_fraction * cfg.width / cfg.n_heads)
    want = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2).float() / rot))
    for name in rope:
        got = read_tensor(files[name], name).float()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=0):
            raise SnapshotError(f"{folder}: {name!r} holds RoPE frequencies other than theta "
                                f"{cfg.rope_theta:g} over {rot} channels")


class BF16InputDiT(DiT):
    """The release's sampler hands its DiT bf16-rounded inputs: z and the network's time 1000 t."""

    def embed(self, z, t):
        return self.inp(z.bfloat16().to(z.dtype)), F.silu(self.t_embed((1000.0 * t.float()).bfloat16().float()))


def from_pretrained(path, dtype=torch.float32):
    """(ColaDLM in eval mode, tokenizer.json) of a snapshot directory, built directly in `dtype` (bfloat16 halves the
    memory: run it under autocast), as nanoGPT's GPT.from_pretrained."""
    if not os.path.isdir(path):
        raise SnapshotError(f"{path} is not a directory (a released snapshot holds cola_vae/ and cola_dit/)")
    vae_dir, dit_dir = os.path.join(path, "cola_vae"), os.path.join(path, "cola_dit")
    for folder in (vae_dir, dit_dir):
        if not os.path.isdir(folder):
            raise SnapshotError(f"{folder} is missing: {path} is not a released Cola DLM snapshot")
    tokenizer = [p for p in (os.path.join(path, "tokenizer.json"), os.path.join(path, os.pardir, "tokenizer.json"))
                 if os.path.exists(p)]
    if not tokenizer:
        raise SnapshotError(f"{os.path.join(path, 'tokenizer.json')} is missing")
    vae_cfg, shift, scale = vae_config(vae_dir)
    if not (math.isfinite(shift) and math.isfinite(scale) and scale != 0):
        raise SnapshotError(f"{vae_dir}/config.json: shifting_factor {shift} / scaling_factor {scale} do not give "
                            "a usable normalisation")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of a 2B model is ever made
    try:
        model = ColaDLM(vae_cfg, dit_config(dit_dir, vae_cfg), reference=False)
    finally:
        torch.set_default_dtype(default)
    model.dit.__class__ = BF16InputDiT  # the same module and weights, with the release's input rounding
    model.decoder_reads_normalized = True
    load_weights(model, vae_dir, "vae.")
    load_weights(model, dit_dir, "dit.")
    model.latent_shift.fill_(shift)  # the release normalises with two scalars: (z - shift) * scale
    model.latent_scale.fill_(scale)
    return model.eval(), os.path.normpath(tokenizer[0])


def load_snapshot(path, dtype=torch.float32):
    """(model, the checkpoint-like dict the scripts read: kind, tokenizer, the release's sampler and template)."""
    model, tokenizer = from_pretrained(path, dtype)
    enc = get_tokenizer(tokenizer)
    specials = {name: enc.encode_single_token(name) for name in ("<|pad|>", "<|endoftext|>", "<|im_end|>")
                if name in enc.special_tokens_set}
    if "<|pad|>" not in specials or "<|endoftext|>" not in specials:
        raise SnapshotError(f"{tokenizer} has no <|pad|> or <|endoftext|> special token")
    if enc.n_vocab > model.vae.cfg.vocab_size:
        raise SnapshotError(f"{tokenizer} has {enc.n_vocab} ids, more than the model's vocab_size "
                            f"{model.vae.cfg.vocab_size}: it is not this snapshot's tokenizer")
    # the release pads prompts with <|pad|> and stops at <|endoftext|> or <|im_end|> (OLMo 2: 100277, 100257, 100265)
    sampler = SamplerConfig(stop_ids=tuple(specials[n] for n in ("<|endoftext|>", "<|im_end|>") if n in specials),
                            pad_id=specials["<|pad|>"])
    return model, dict(kind="cola", step=0, args=dict(preset="release"), tokenizer=tokenizer, train_flops=0.0,
                       sampler=vars(sampler), release=True, prompt_template=template_ids(tokenizer))


def encode_prompt(info, enc, text):
    """A snapshot's prompt ids: special tokens read, wrapped in its template (as the release's Tokenizer.encode)."""
    prefix, suffix = info["prompt_template"]
    return prefix + enc.encode(text, allowed_special="all") + suffix


def row_noise(row_seeds, device):
    """generate()'s noise(k, shape) for one seed per row (None without seeds): block k's (B, bs, d), row b's from
    seed row_seeds[b] + k * 10^7 (the release's COLA_INFER_PER_SAMPLE_NOISE_SEED)."""
    seeded = lambda s: torch.Generator(device=device).manual_seed(s)
    return None if row_seeds is None else lambda k, shape: torch.stack(
        [torch.randn(shape[1:], device=device, generator=seeded(s + k * 10_000_000)) for s in row_seeds])


def release_generate(model, prompts, max_new_tokens, sampler, row_seeds=None, generator=None):
    """generate() with the release's budget: ceil(max_new_tokens / tokens per block) blocks counting the prompt's
    share (one if its partial block alone needs more latents), all their new tokens kept, stop tokens included,
    until every row's block has held a stop token. row_seeds: a noise seed per row (row_noise), else `generator`."""
    bs, patch = model.block_size, model.vae.cfg.patch_size
    rem = [len(p) % (bs * patch) for p in prompts]
    short = any(r and max_new_tokens < bs - math.ceil(r / patch) for r in rem)
    n_blocks = 1 if short else max(1, math.ceil(max_new_tokens / (bs * patch)))
    outs, done = [[] for _ in prompts], [False] * len(prompts)

    def keep_all(state):
        for b, row in enumerate(state.decoded.tolist()):
            outs[b] += row[rem[b] if state.k == 0 else 0:]
            done[b] = done[b] or any(t in sampler.stop_ids for t in row)
        return all(done)

    _, stats = generate(model, prompts, n_blocks * bs * patch - max(rem, default=0), replace(sampler, stop_ids=()),
                        generator, row_noise(row_seeds, model.latent_shift.device), keep_all)
    return outs, stats
