"""The authors' released snapshot through this code: the paper preset's names and shapes, a tiny snapshot in the
released layout that loads and generates, one-line refusals of bad snapshots, and the tokenizer.json reader.
(Equality with the authors' own code is checked outside the suite, docs/release.md.)"""
import json
import re
import os

import pytest
import torch
from safetensors.torch import save_file

import release
from checkpoint import CheckpointError
from checkpoint import load_model, stored_sampler
from decoder import SamplerConfig
from release import encode_prompt, release_generate
from diffusion import ColaDLM
from dit import DiTConfig
from conftest import MERGES, SPECIALS, one_line_error, write_tokenizer_json
from tokenizer import DataError, byte_alphabet, get_tokenizer, tokenizer_from_json
from vae import VAEConfig



# ---------------------------------------------------------------------------------------------------- the paper preset

def release_shapes(V=100278, w=1536, ffn=6144, d=16, enc=4, dec=4, tw=2048, layers=24, hidden=8192, rope=96):
    """Every tensor of the released checkpoint (its modeling files, read by hand): name -> shape."""
    vae = {"encoder.wte.weight": (V + 1, w), "encoder.patch_embedder.weight": (w, w, 1),
           "encoder.patch_embedder.bias": (w,), "encoder.final_layer.weight": (2 * d, w),
           "encoder.final_layer.bias": (2 * d,), "decoder.in_layer.weight": (w, d), "decoder.in_layer.bias": (w,),
           "decoder.unpatch_layer.weight": (w, w), "decoder.unpatch_layer.bias": (w,),
           "decoder.final_norm.weight": (w,), "decoder.final_norm.bias": (w,),
           "decoder.final_layer.weight": (V, w), "decoder.final_layer.bias": (V,)}
    block = {"norm_attn.weight": (w,), "norm_attn.bias": (w,), "qkv_proj.weight": (3 * w, w),
             "q_norm.weight": (w,), "q_norm.bias": (w,), "k_norm.weight": (w,), "k_norm.bias": (w,),
             "attn_out_proj.weight": (w, w), "attn_out_proj.bias": (w,), "norm_ffn.weight": (w,),
             "norm_ffn.bias": (w,), "ffn_proj.weight": (ffn, w), "ffn_proj.bias": (ffn,),
             "ffn_out.weight": (w, ffn // 2), "ffn_out.bias": (w,)}
    for part, n in (("encoder", enc), ("decoder", dec)):
        vae.update({f"{part}.blocks.{i}.{k}": s for i in range(n) for k, s in block.items()})
    dit = {"txt_in.proj.weight": (tw, d), "txt_in.proj.bias": (tw,), "emb_in.proj_in.weight": (tw, 256),
           "emb_in.proj_in.bias": (tw,), "emb_in.proj_hid.weight": (tw, tw), "emb_in.proj_hid.bias": (tw,),
           "emb_in.proj_out.weight": (tw, tw), "emb_in.proj_out.bias": (tw,), "txt_out_norm.weight": (tw,),
           "txt_out_norm.bias": (tw,), "txt_out_ada.out_in.1.weight": (2 * tw, tw),
           "txt_out_ada.out_in.1.bias": (2 * tw,), "txt_out.proj.weight": (d, tw), "txt_out.proj.bias": (d,)}
    block = {"msa.proj_qkv.weight": (3 * tw, tw), "msa.proj_out.weight": (tw, tw),
             "msa.norm_q.weight": (128,), "msa.norm_q.bias": (128,), "msa.norm_k.weight": (128,),
             "msa.norm_k.bias": (128,), "mlp.proj_in.weight": (hidden, tw), "mlp.proj_in.bias": (hidden,),
             "mlp.proj_out.weight": (tw, hidden), "mlp.proj_out.bias": (tw,)}
    for ada, rows in (("msa_in", 2 * tw), ("msa_out", tw), ("mlp_in", 2 * tw), ("mlp_out", tw)):
        block.update({f"ada.{ada}.1.weight": (rows, tw), f"ada.{ada}.1.bias": (rows,)})
    dit.update({f"blocks.{i}.{k}": s for i in range(layers) for k, s in block.items()})
    dit.update({f"blocks.{i}.msa.rope.rope.freqs": (rope // 2,) for i in range(layers)})  # a buffer, recomputed here
    return vae, dit


def test_paper_preset_maps_one_to_one_onto_the_release():
    """Each parameter of the paper preset (at the release's vocabulary) is one released tensor of the same shape,
    and every released tensor but the RoPE frequency buffers is one of ours; the totals are the official counts
    (501,871,574 and 1,829,875,728). Mutation: any structural difference (a missing bias, a fused adaLN
    Linear, a 2-Linear timestep MLP, a head without bias) breaks the map."""
    import train
    args = train.get_args(["--preset", "paper"])
    with torch.device("meta"):
        vcfg = train.vae_config(args, 100278)
        model = ColaDLM(vcfg, train.dit_config(args, vcfg), reference=False)
    vae, dit = release_shapes()
    theirs = {**vae, **dit}
    ours = {release.release_name(k): tuple(v.shape) for k, v in model.named_parameters()}
    assert len(ours) == len(list(model.parameters()))  # one released name per parameter
    assert ours == {k: s for k, s in theirs.items() if not release.ROPE_BUFFER.fullmatch(k)}
    assert sum(p.numel() for p in model.vae.parameters()) == 501_871_574
    assert sum(p.numel() for p in model.dit.parameters()) == 1_829_875_728


# ---------------------------------------------------------------------------------------------------- a tiny snapshot

def tiny_release_model(V, vae_block=4, dit_block=8, seed=0):
    torch.manual_seed(seed)
    model = ColaDLM(VAEConfig(vocab_size=V, latent_dim=4, width=32, n_enc_layers=1, n_dec_layers=2, n_heads=2,
                              mlp_hidden=48, block_size=vae_block, max_seq_len=1 << 16),
                    DiTConfig(latent_dim=4, width=32, n_layers=2, n_heads=2, block_size=dit_block, rope_fraction=0.75,
                              adaln_zero=False), reference=False)
    model.decoder_reads_normalized = True
    with torch.no_grad():
        for name, p in model.named_parameters():  # nothing at its init value: every tensor must be loaded
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.dim() > 1 else 0.1) + (p.dim() == 1) * 0.5)
    return model


def write_snapshot(root, model, shift=0.1, scale=1.3, vae_cfg_over=None, dit_cfg_over=None, template=False):
    """A snapshot in the released layout: configs with the release's field names (as save_pretrained writes
    them), safetensors under the release's tensor names, the DiT's RoPE buffers, and a tokenizer.json."""
    os.makedirs(os.path.join(root, "cola_vae"))
    os.makedirs(os.path.join(root, "cola_dit"))
    write_tokenizer_json(os.path.join(root, "tokenizer.json"), template)
    v, d = model.vae.cfg, model.dit.cfg
    vae_cfg = dict(architectures=["ColaTextVAEModel"], model_type="cola_text_vae", vocab_size=v.vocab_size,
                   encoder_num_blocks=v.n_enc_layers, decoder_num_blocks=v.n_dec_layers, dim=v.width,
                   ffn_dim=2 * v.mlp_hidden, latent_dim=v.latent_dim, patch_size=v.patch_size, num_heads=v.n_heads,
                   shared_heads_kv=1, encoder_last_ln=True, layer_norm_type="layer_norm", layer_norm_eps=v.norm_eps,
                   layer_norm_affine=True, post_norm=True, qk_bias=False, qk_norm=True, qk_norm_affine=True,
                   clip_qkv=None, rope_theta=int(v.rope_theta), rope_full_precision=True, bias=True, dropout=0.0,
                   attn_dropout=0.0, act="swiglu", causal=False, block_causal=True, block_size=v.block_size,
                   init_fn="normal", init_std=0.02, init_cutoff_factor=3, use_variation=True, use_emb=True,
                   scaling_factor=scale, shifting_factor=shift, torch_dtype="float32", transformers_version="4.57.1")
    head_dim = d.width // d.n_heads
    dit_cfg = dict(architectures=["ColaDiTModel"], model_type="cola_dit", txt_in_channels=d.latent_dim,
                   txt_out_channels=d.latent_dim, txt_dim=d.width, emb_dim=d.width, heads=d.n_heads,
                   head_dim=head_dim, expand_ratio=(d.mlp_hidden or 4 * d.width) // d.width, num_layers=d.n_layers, norm_eps=d.norm_eps,
                   qk_bias=False, patch_size=1, rope_dim=round(d.rope_fraction * head_dim), block_size=d.block_size,
                   torch_dtype="float32", transformers_version="4.57.1")
    vae_cfg.update(vae_cfg_over or {})
    dit_cfg.update(dit_cfg_over or {})
    for name, cfg in (("cola_vae", vae_cfg), ("cola_dit", dit_cfg)):
        with open(os.path.join(root, name, "config.json"), "w") as f:
            json.dump(cfg, f)
    tensors = {"cola_vae": {}, "cola_dit": {}}
    for k, p in model.named_parameters():
        tensors["cola_vae" if k.startswith("vae.") else "cola_dit"][release.release_name(k)] = p.detach().clone()
    rot = round(d.rope_fraction * head_dim)
    for i in range(d.n_layers):
        tensors["cola_dit"][f"blocks.{i}.msa.rope.rope.freqs"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    for name, t in tensors.items():
        save_file(t, os.path.join(root, name, "model.safetensors"))
    return root


@pytest.fixture
def snapshot(tmp_path):
    V = 256 + len(MERGES) + len(SPECIALS)
    model = tiny_release_model(V)
    return write_snapshot(str(tmp_path / "snap"), model), model


def test_tiny_snapshot_loads_and_generates(snapshot):
    """from_pretrained puts every released tensor where it belongs (the outputs equal the model the snapshot
    was written from), reads the normalisation and block sizes from the configs, and generates. Mutation: a
    wrong name map, the decoder fed denormalised latents, or a config field ignored."""
    path, ref = snapshot
    model, tok = release.from_pretrained(path)
    assert (model.vae.cfg.block_size, model.dit.cfg.block_size) == (4, 8) and model.decoder_reads_normalized
    assert torch.allclose(model.latent_shift, torch.full((4,), 0.1)) and torch.allclose(model.latent_scale, torch.full((4,), 1.3))
    for (k, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), k
    enc = get_tokenizer(tok)
    ids = enc.encode_ordinary("the band and the hand, and then")
    out, stats = release_generate(model, [ids, ids[:3]], 16, SamplerConfig(steps=4, stop_ids=(), pad_id=enc.n_vocab - 2),
                                  generator=torch.Generator().manual_seed(0))
    assert stats["blocks"] == 2 and all(len(o) > 0 for o in out)
    z = torch.randn(1, 8, 4)  # the decoder reads DiT-space latents, as the release's sampler hands them over
    assert torch.allclose(model.vae.decode(model.decoder_input(z)), ref.vae.decode(z), atol=1e-5)


def test_sample_cli_runs_a_snapshot(snapshot, capsys):
    import sample
    path, _ = snapshot
    sample.main(["--init_from", path, "--prompt", "the band", "--num_samples", "1", "--max_new_tokens", "8", "--steps", "2"])
    assert "the release's sampler" in capsys.readouterr().out
    sample.main(["--init_from", path, "--prompt", "the band", "--num_samples", "1", "--max_new_tokens", "8", "--steps", "2",
                 "--dtype", "bfloat16"])  # bf16 weights under autocast
    import re
    assert int(re.search(r"# (\d+) tokens in", capsys.readouterr().out).group(1)) > 0


def test_a_tokenizer_larger_than_the_model_is_refused(snapshot, capsys):
    """A snapshot whose tokenizer.json has more ids (267) than its config's vocabulary (265) would sample ids the
    model has no rows for: one line. Mutation: no size check (the snapshot loads and samples)."""
    import sample
    path, _ = snapshot
    tok = json.load(open(os.path.join(path, "tokenizer.json")))
    tok["added_tokens"] += [{"id": 265 + i, "content": f"<|extra{i}|>", "special": True} for i in range(2)]
    json.dump(tok, open(os.path.join(path, "tokenizer.json"), "w"))
    assert "has 267 ids, more than the model's vocab_size 265" in one_line_error(sample.main, ["--init_from", path], capsys)


def test_load_model_gives_the_release_special_tokens(snapshot):
    path, _ = snapshot
    model, info = load_model(path)
    enc = get_tokenizer(info["tokenizer"])
    V = 256 + len(MERGES)
    sampler = stored_sampler(info, enc.eot_token)
    assert (sampler.stop_ids, sampler.pad_id) == ((V, V + 2), V + 1)  # <|endoftext|> and <|im_end|>; <|pad|>
    assert encode_prompt(info, enc, "a<|endoftext|>") == [ord("a"), enc.encode_single_token("<|endoftext|>")]


def break_snapshot(path, how):
    vae_dir, dit_dir = os.path.join(path, "cola_vae"), os.path.join(path, "cola_dit")
    if how == "missing file":
        os.remove(os.path.join(dit_dir, "model.safetensors"))
    elif how == "missing tokenizer":
        os.remove(os.path.join(path, "tokenizer.json"))
    elif how == "deep config":  # JSON nested deeper than Python's parser recurses
        open(os.path.join(dit_dir, "config.json"), "w").write("[" * 100_000 + "]" * 100_000)
    elif how in ("wrong shape", "unknown key", "missing key"):
        from safetensors.torch import load_file
        t = load_file(os.path.join(vae_dir, "model.safetensors"))
        if how == "wrong shape":
            t["decoder.final_layer.bias"] = torch.zeros(7)
        elif how == "unknown key":
            t["decoder.extra.weight"] = torch.zeros(2)
        else:
            del t["encoder.blocks.0.q_norm.weight"]
        save_file(t, os.path.join(vae_dir, "model.safetensors"))
    else:  # a config value this code does not implement
        cfg_path = os.path.join(vae_dir, "config.json")
        cfg = json.load(open(cfg_path))
        cfg.update({"post norm": {"post_norm": False}, "bad eps": {"layer_norm_eps": "x"},
                    "no vocab": {"vocab_size": None}, "float width": {"dim": 64.0}, "zero width": {"dim": 0},
                    "huge width": {"dim": 10**12}, "text width": {"dim": "abc"}}[how])
        json.dump(cfg, open(cfg_path, "w"))


@pytest.mark.parametrize("how,message", [
    ("missing file", "cola_dit/model.safetensors is missing"),
    ("missing tokenizer", "tokenizer.json is missing"),
    ("deep config", "cola_dit/config.json is not readable JSON (JSONDecodeError)"),
    ("wrong shape", "tensor 'decoder.final_layer.bias' has shape (7,)"),
    ("unknown key", "unknown tensor 'decoder.extra.weight'"),
    ("missing key", "tensor 'encoder.blocks.0.q_norm.weight' is missing"),
    ("post norm", "post_norm = False is not supported"),
    ("bad eps", "layer_norm_eps = 'x' must be a positive number"),
    ("no vocab", "vocab_size = None must be a positive integer"),
    ("float width", "dim = 64.0 must be a positive integer"),
    ("zero width", "dim = 0 must be a positive integer"),
    ("huge width", "dim = 1000000000000 must be a positive integer below 10^7"),
    ("text width", "dim = 'abc' must be a positive integer"),
])
def test_bad_snapshot_one_line(snapshot, capsys, how, message):
    import sample
    path, _ = snapshot
    break_snapshot(path, how)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        release.from_pretrained(path)
    if how in ("missing file", "wrong shape"):  # and the scripts say it in one line
        assert message in one_line_error(sample.main, ["--init_from", path], capsys)


# ---------------------------------------------------------------------------------------------------- tokenizer.json

def test_tokenizer_json_as_tiktoken(tmp_path):
    """Merges apply in rank order, specials map to their ids, any text round-trips, and the post-processor's
    template wraps prompts. Mutation: ids taken from the merge list's order, or the byte alphabet shifted."""
    path = str(tmp_path / "tokenizer.json")
    n = write_tokenizer_json(path, template=True)
    enc = tokenizer_from_json(path)
    chars = byte_alphabet()
    vocab = {chars[b]: b for b in range(256)}
    assert enc.encode_ordinary(" the and") == [256 + 2, 256 + 5]  # 'Ġthe', 'Ġand'
    assert enc.encode_ordinary("the") == [ord("t"), 256 + 1]  # 't', 'he': no merge makes 'the' without 'Ġ'
    text = "Ünïcode\n\n  and\ttabs 123456 — the end"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode_single_token("<|pad|>") == n - 2 and vocab["a"] == ord("a")
    from tokenizer import template_ids
    assert template_ids(path) == ([n - 3], [])


def test_tokenizer_json_refusals(tmp_path):
    path = str(tmp_path / "tokenizer.json")
    write_tokenizer_json(path)
    spec = json.load(open(path))
    spec["model"]["merges"] = spec["model"]["merges"][::-1]  # merges whose results' ids decrease
    json.dump(spec, open(path, "w"))
    with pytest.raises(DataError, match="not in the order of their tokens' ids"):
        tokenizer_from_json(path)
    open(path, "w").write("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        tokenizer_from_json(path)


def test_an_empty_split_regex_is_refused(tmp_path):
    """tiktoken panics (a PanicException, no Exception) on an empty pattern: refused as the file is read.
    Mutation: only a missing pattern refused."""
    path = str(tmp_path / "tokenizer.json")
    write_tokenizer_json(path)
    spec = json.load(open(path))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = ""
    json.dump(spec, open(path, "w"))
    with pytest.raises(DataError, match="no \\(non-empty\\) Split regex"):
        tokenizer_from_json(path)
