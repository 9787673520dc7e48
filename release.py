"""
The authors' released model through this repo's code (docs/release.md): its snapshot read into ColaDLM, and
its sampler's semantics as a wrapper over the core loop (decoder.generate). The snapshot is the Hugging Face
download of ByteDance-Seed/Cola-DLM:

    DIR/cola_vae/config.json  + model.safetensors (or shards listed in model.safetensors.index.json)
    DIR/cola_dit/config.json  + model.safetensors
    DIR/tokenizer.json        (or DIR/../tokenizer.json, the release's own hf_models/ layout)

Configs map onto VAEConfig / DiTConfig; a value this code does not implement is refused, naming its key.
Weights map by name, one released tensor per parameter of ours with the same shape (RELEASE_NAMES), read
with the safetensors library; a missing, unknown or misshapen tensor is refused, naming its key.

The release's sampler differs from the core loop in four ways, all here: its DiT reads bf16-rounded inputs
(BF16InputDiT), its decoder reads normalised latents, it generates a budget of whole blocks and keeps every
token of them (release_generate), and its benchmark draws each row's noise from the row's own seed (row_noise).
"""
import json
import math
import os
import re
from dataclasses import replace

import torch
import torch.nn.functional as F

from checkpoint import CheckpointError
from decoder import SamplerConfig, generate
from diffusion import ColaDLM
from dit import DiT, DiTConfig
from tokenizer import get_tokenizer, template_ids
from vae import VAEConfig


class SnapshotError(CheckpointError):
    """A released snapshot this code cannot load; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------------------------
# configs

# release key -> the only value this code implements (the release's own defaults)
VAE_FIXED = dict(model_type="cola_text_vae", shared_heads_kv=1, encoder_last_ln=True, layer_norm_type="layer_norm",
                 layer_norm_affine=True, post_norm=True, qk_bias=False, qk_norm=True, qk_norm_affine=True,
                 clip_qkv=None, bias=True, act="swiglu", causal=False, block_causal=True, use_variation=True,
                 use_emb=True)
DIT_FIXED = dict(model_type="cola_dit", qk_bias=False, patch_size=1)
REAL_KEYS = ("rope_theta", "layer_norm_eps", "norm_eps")


def read_config(folder, required, fixed):
    """config.json of one module, checked: every key in `required` present, every key in `fixed` equal
    to its value when present. Keys neither names are the library's bookkeeping and are ignored."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise SnapshotError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise SnapshotError(f"{path} is not a JSON object")
    for key in required:
        if key not in cfg:
            raise SnapshotError(f"{path}: key {key!r} is missing")
        value, real = cfg[key], key in REAL_KEYS  # sizes and counts are integers; eps and theta real numbers
        if not isinstance(value, (int, float) if real else int) or isinstance(value, bool) or not 0 < value < 1e7:
            raise SnapshotError(f"{path}: {key} = {value!r} must be a positive {'number' if real else 'integer'}"
                                f"{'' if real else ' below 10^7'}")
    for key, want in fixed.items():
        if key in cfg and cfg[key] != want:
            raise SnapshotError(f"{path}: {key} = {cfg[key]!r} is not supported (this code implements {want!r})")
    return cfg


def vae_config(folder):
    """VAEConfig and the latent normalisation (shift, scale) of the release's cola_vae/config.json."""
    c = read_config(folder, ("vocab_size", "encoder_num_blocks", "decoder_num_blocks", "dim", "ffn_dim", "latent_dim",
                             "patch_size", "num_heads", "block_size", "rope_theta", "layer_norm_eps"), VAE_FIXED)
    where = os.path.join(folder, "config.json")
    if c["dim"] % c["num_heads"] or c["ffn_dim"] % 2:
        raise SnapshotError(f"{where}: dim must be a multiple of num_heads and ffn_dim even")
    cfg = VAEConfig(vocab_size=c["vocab_size"], latent_dim=c["latent_dim"], width=c["dim"],
                    n_enc_layers=c["encoder_num_blocks"], n_dec_layers=c["decoder_num_blocks"], n_heads=c["num_heads"],
                    mlp_hidden=c["ffn_dim"] // 2, block_size=c["block_size"], patch_size=c["patch_size"],
                    max_seq_len=1 << 16, rope_theta=float(c["rope_theta"]), norm_eps=float(c["layer_norm_eps"]))
    return cfg, float(c.get("shifting_factor", 0.0)), float(c.get("scaling_factor", 1.0))


def dit_config(folder, vae_cfg):
    """DiTConfig of the release's cola_dit/config.json, on the VAE's latents."""
    c = read_config(folder, ("txt_in_channels", "txt_out_channels", "txt_dim", "emb_dim", "heads", "head_dim",
                             "expand_ratio", "num_layers", "norm_eps", "rope_dim", "block_size"), DIT_FIXED)
    where = os.path.join(folder, "config.json")
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


# ----------------------------------------------------------------------------------------------------
# weights

# (ours, the release's): regexes over parameter names, {i} a block index; every parameter of ours has one
VAE_BLOCK = [(r"attn\.qkv", "qkv_proj"), (r"attn\.q_norm", "q_norm"), (r"attn\.k_norm", "k_norm"),
             (r"attn\.proj", "attn_out_proj"), (r"ln_attn", "norm_attn"), (r"mlp\.proj", "ffn_proj"),
             (r"mlp\.out", "ffn_out"), (r"ln_mlp", "norm_ffn")]
RELEASE_NAMES = (
    [(r"vae\.enc\.embed", "encoder.wte"), (r"vae\.enc\.patch", "encoder.patch_embedder"),
     (r"vae\.enc\.to_latent", "encoder.final_layer"), (r"vae\.dec\.from_latent", "decoder.in_layer"),
     (r"vae\.dec\.unpatch", "decoder.unpatch_layer"), (r"vae\.dec\.ln_f", "decoder.final_norm"),
     (r"vae\.dec\.head", "decoder.final_layer")]
    + [(rf"vae\.{ours_part}\.blocks\.(\d+)\.{a}", rf"{theirs_part}.blocks.\1.{b}")
       for ours_part, theirs_part in (("enc", "encoder"), ("dec", "decoder")) for a, b in VAE_BLOCK]
    + [(r"dit\.inp", "txt_in.proj"), (r"dit\.t_embed\.mlp\.0", "emb_in.proj_in"), (r"dit\.t_embed\.mlp\.2", "emb_in.proj_hid"),
       (r"dit\.t_embed\.mlp\.4", "emb_in.proj_out"), (r"dit\.final\.ln", "txt_out_norm"),
       (r"dit\.final\.ada", "txt_out_ada.out_in.1"), (r"dit\.final\.out", "txt_out.proj")]
    + [(rf"dit\.blocks\.(\d+)\.{a}", rf"blocks.\1.{b}") for a, b in (
        (r"attn\.qkv", "msa.proj_qkv"), (r"attn\.proj", "msa.proj_out"), (r"attn\.q_norm", "msa.norm_q"),
        (r"attn\.k_norm", "msa.norm_k"), (r"mlp\.0", "mlp.proj_in"), (r"mlp\.2", "mlp.proj_out"),
        (r"ada_attn", "ada.msa_in.1"), (r"gate_attn", "ada.msa_out.1"), (r"ada_mlp", "ada.mlp_in.1"),
        (r"gate_mlp", "ada.mlp_out.1"))])
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
    from safetensors import safe_open
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SnapshotError(f"{index} is not a readable shard index ({type(e).__name__})") from None
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        raise SnapshotError(f"{path} is missing (nor is there a model.safetensors.index.json)")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: path for k in f.keys()}
    except Exception as e:
        raise SnapshotError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None


def load_weights(model, folder, prefix):
    """Copy a module's released tensors into model's parameters named `prefix`..., checking names and shapes."""
    from safetensors import safe_open
    files = safetensors_files(folder)
    params = {k: p for k, p in model.named_parameters() if k.startswith(prefix)}
    wanted = {release_name(k): k for k in params}
    for name in files:
        if name not in wanted and not (prefix == "dit." and ROPE_BUFFER.fullmatch(name)):
            raise SnapshotError(f"{folder}: unknown tensor {name!r} in the snapshot")
    for theirs, ours in wanted.items():
        if theirs not in files:
            raise SnapshotError(f"{folder}: tensor {theirs!r} is missing from the snapshot")
        try:
            with safe_open(files[theirs], framework="pt") as f:
                t = f.get_tensor(theirs)
        except Exception as e:
            raise SnapshotError(f"{files[theirs]}: cannot read tensor {theirs!r} ({type(e).__name__})") from None
        if tuple(t.shape) != tuple(params[ours].shape):
            raise SnapshotError(f"{folder}: tensor {theirs!r} has shape {tuple(t.shape)}, the config makes it "
                                f"{tuple(params[ours].shape)}")
        with torch.no_grad():
            params[ours].copy_(t.to(params[ours].dtype))
        if not torch.isfinite(params[ours]).all():
            raise SnapshotError(f"{folder}: tensor {theirs!r} holds NaN or Inf")


def snapshot_folders(path):
    """(cola_vae folder, cola_dit folder, tokenizer.json) of a snapshot directory."""
    if not os.path.isdir(path):
        raise SnapshotError(f"{path} is not a directory (a released snapshot holds cola_vae/ and cola_dit/)")
    folders = [os.path.join(path, "cola_vae"), os.path.join(path, "cola_dit")]
    for folder in folders:
        if not os.path.isdir(folder):
            raise SnapshotError(f"{folder} is missing: {path} is not a released Cola DLM snapshot")
    tokenizer = [p for p in (os.path.join(path, "tokenizer.json"), os.path.join(path, os.pardir, "tokenizer.json"))
                 if os.path.exists(p)]
    if not tokenizer:
        raise SnapshotError(f"{os.path.join(path, 'tokenizer.json')} is missing")
    return folders[0], folders[1], os.path.normpath(tokenizer[0])


def check_rope_buffer(folder, cfg):
    """The release stores its DiT's RoPE frequencies; they must be the ones this code computes."""
    from safetensors import safe_open
    files = safetensors_files(folder)
    rot = round(cfg.rope_fraction * cfg.width / cfg.n_heads)
    want = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2).float() / rot))
    for name, path in files.items():
        if ROPE_BUFFER.fullmatch(name):
            with safe_open(path, framework="pt") as f:
                got = f.get_tensor(name).float()
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=0):
                raise SnapshotError(f"{folder}: {name!r} holds RoPE frequencies other than theta "
                                    f"{cfg.rope_theta:g} over {rot} channels")


def latent_norm_ok(shift, scale):
    return math.isfinite(shift) and math.isfinite(scale) and scale != 0


# ----------------------------------------------------------------------------------------------------
# the released model

class BF16InputDiT(DiT):
    """The release's sampler hands its DiT bf16-rounded inputs: z and the network's time 1000 t."""

    def embed(self, z, t):
        return self.inp(z.bfloat16().to(z.dtype)), F.silu(self.t_embed((1000.0 * t.float()).bfloat16().float()))


def from_pretrained(path, dtype=torch.float32):
    """ColaDLM with the released weights of a snapshot directory, built directly in `dtype` (bfloat16 halves the
    memory: run it under autocast), as nanoGPT's GPT.from_pretrained. Returns (model in eval mode, tokenizer.json)."""
    vae_dir, dit_dir, tokenizer = snapshot_folders(path)
    vae_cfg, shift, scale = vae_config(vae_dir)
    if not latent_norm_ok(shift, scale):
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
    check_rope_buffer(dit_dir, model.dit.cfg)
    model.latent_shift.fill_(shift)  # the release normalises with two scalars: (z - shift) * scale
    model.latent_scale.fill_(scale)
    return model.eval(), tokenizer


def load_snapshot(path, dtype=torch.float32):
    """(model, what the scripts read about a model: kind, step, preset, tokenizer, the sampler, and the
    release's special tokens and prompt template)."""
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
    stops = tuple(specials[n] for n in ("<|endoftext|>", "<|im_end|>") if n in specials)
    sampler = SamplerConfig(stop_ids=stops, pad_id=specials["<|pad|>"])
    return model, dict(kind="cola", step=0, args=dict(preset="release"), tokenizer=tokenizer, train_flops=0.0,
                       sampler=vars(sampler), release=True, prompt_template=template_ids(tokenizer))


def encode_prompt(info, enc, text):
    """Token ids of a prompt: a snapshot's tokenizer reads special tokens in the text and wraps it in its
    post-processor's template, as the release's Tokenizer.encode does; this repo's models get plain BPE."""
    if "prompt_template" not in info:
        return enc.encode_ordinary(text)
    prefix, suffix = info["prompt_template"]
    return prefix + enc.encode(text, allowed_special="all") + suffix


# ----------------------------------------------------------------------------------------------------
# the release's sampler, over the core loop

def row_noise(shape, device, row_seeds, k):
    """Block k's starting noise with one seed per row, row_seeds[b] + k * 10^7: a row gets the same noise
    whatever batch it runs in (the release's COLA_INFER_PER_SAMPLE_NOISE_SEED scheme). shape (B, bs, d)."""
    return torch.stack([torch.randn(shape[1:], device=device,
                                    generator=torch.Generator(device=device).manual_seed(s + k * 10_000_000))
                        for s in row_seeds])


def release_block_count(max_new_tokens, rem, block_size, patch):
    """ceil(max_new_tokens / tokens per block) blocks, the first one's prompt share included, and a single block
    when the prompt's partial block alone needs more latents than that budget. rem: per row, the tokens of its
    prompt's partial last block."""
    if any(r and max_new_tokens < block_size - math.ceil(r / patch) for r in rem):
        return 1
    return max(1, math.ceil(max_new_tokens / (block_size * patch)))


def release_generate(model, prompts, max_new_tokens, cfg, row_seeds=None, generator=None):
    """generate() with the release's budget: release_block_count blocks, every token of them kept (stop tokens
    and what follows included, the prompt's own tokens left out), until every row's block has held a stop
    token. row_seeds: one noise seed per row (row_noise); else every row draws from `generator`."""
    bs, patch = model.block_size, model.vae.cfg.patch_size
    rem = [len(p) % (bs * patch) for p in prompts]
    n_blocks = release_block_count(max_new_tokens, rem, bs, patch)
    outs, done = [[] for _ in prompts], [False] * len(prompts)

    def keep_all(state):
        for b, row in enumerate(state.decoded.tolist()):
            outs[b] += row[rem[b] if state.k == 0 else 0:]
            done[b] = done[b] or any(t in cfg.stop_ids for t in row)
        return all(done)

    noise = None if row_seeds is None else (lambda k, shape: row_noise(shape, model.latent_shift.device, row_seeds, k))
    _, stats = generate(model, prompts, n_blocks * bs * patch - max(rem, default=0), replace(cfg, stop_ids=()),
                        generator, noise, keep_all)
    return outs, stats
