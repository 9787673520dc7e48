"""Tokenizer, data preparation, masks, attention, KV cache and the Text VAE."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layers import Attention, KVCache, block_causal_mask, cola_mask, with_key_padding
from tokendata import load_meta
from prepare import held_out, prepare
from tokenizer import DataError, get_tokenizer
from vae import TextVAE, VAEConfig, gaussian_kl, gaussian_kl_std_normal

TINY_VAE = dict(vocab_size=300, latent_dim=8, width=32, n_enc_layers=1, n_dec_layers=1, n_heads=2,
                mlp_hidden=64, block_size=4)


def test_tokenizer_pinned():
    enc = get_tokenizer("gpt2")
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_unknown_tokenizer_is_one_line_error():
    with pytest.raises(DataError, match="unknown tokenizer"):
        get_tokenizer("nope")


# ---------------------------------------------------------------------------------------------------- prepare

def test_prepare_roundtrip(tmp_path):
    src = tmp_path / "a.txt"
    text = "To be, or not to be, that is the question. " * 40
    src.write_text(text, encoding="utf-8")
    meta = prepare(str(src), str(tmp_path / "out"), seq_len=16, split="tail")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    tr = np.fromfile(tmp_path / "out" / "train_00000.bin", dtype=np.uint16)
    va = np.fromfile(tmp_path / "out" / "val_00000.bin", dtype=np.uint16)
    assert len(tr) == meta["train_tokens"] and len(va) == meta["val_tokens"]
    assert get_tokenizer().decode(np.concatenate([tr, va]).tolist()) == text
    assert load_meta(str(tmp_path / "out"))["source_sha256"] == meta["source_sha256"]


def split_tokens(ids, val_fraction, split="chunks", chunk=2048, min_chunk=64):
    """(train, val) of a whole token array by prepare.held_out, the split prepare.py streams."""
    val = held_out(np.arange(len(ids)), len(ids), val_fraction, split, max(min_chunk, chunk))
    return ids[~val], ids[val]


def test_chunk_split_interleaves():
    ids = np.arange(10_000)
    train, val = split_tokens(ids, 0.1, "chunks", chunk=100, min_chunk=10)
    assert len(val) == 1000 and len(train) == 9000
    assert sorted(np.concatenate([train, val]).tolist()) == ids.tolist()
    assert val[:100].tolist() == list(range(900, 1000)) and val[100:200].tolist() == list(range(1900, 2000))
    tr, va = split_tokens(ids, 0.1, "tail")
    assert va.tolist() == list(range(9000, 10000))


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"caf\xe9 au lait " * 50, "not UTF-8"),
    (b"hello there", "fewer than one training sequence"),
])
def test_prepare_errors(tmp_path, content, match):
    src = tmp_path / "in.txt"
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(DataError, match=match):
        prepare(str(src), str(tmp_path / "out"), seq_len=16)


def test_prepare_val_too_small(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("word " * 100)  # 100 tokens: val split of 10 < 16
    for split in ("tail", "chunks"):
        with pytest.raises(DataError, match="validation split"):
            prepare(str(src), str(tmp_path / "out"), seq_len=16, val_fraction=0.1, split=split)


def test_prepare_cli_error_is_one_line(tmp_path, capsys):
    import prepare as prep
    from conftest import one_line_error
    assert one_line_error(prep.main, ["--input", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "o")],
                          capsys) == f"error: input file {tmp_path / 'missing.txt'} does not exist"


# ---------------------------------------------------------------------------------------------------- masks

def test_block_causal_mask_hand_written():
    blk = torch.arange(6) // 2
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(blk, blk), expected)


def test_block_size_one_is_causal():
    blk = torch.arange(7)
    assert torch.equal(block_causal_mask(blk, blk), torch.tril(torch.ones(7, 7, dtype=torch.bool)))


def test_cola_mask_all_clean_is_block_causal():
    blk = torch.arange(8) // 4
    clean = torch.zeros(8, dtype=torch.bool)
    assert torch.equal(cola_mask(blk, clean, blk, clean), block_causal_mask(blk, blk))


def manual_attention(q, k, v, mask):
    att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    att = att.masked_fill(~mask, float("-inf"))
    return torch.softmax(att, -1) @ v


def test_sdpa_with_block_mask_equals_manual():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 5) for _ in range(3))
    blk = torch.arange(8) // 4
    mask = block_causal_mask(blk, blk)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
    assert torch.allclose(got, manual_attention(q, k, v, mask), atol=1e-5)
    # and the mask matters: plain causal attention differs
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(got, causal, atol=1e-3)


def test_key_padding_no_nan():
    blk = torch.arange(4) // 2
    key_valid = torch.tensor([[False, False, True, True]])
    m = with_key_padding(block_causal_mask(blk, blk), key_valid, key_valid)
    q = k = v = torch.randn(1, 1, 4, 3)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.isfinite(out).all()
    assert m[0, 0, 2].tolist() == [False, False, True, True]


# ---------------------------------------------------------------------------------------------------- KV cache

def test_kv_cache_blockwise_equals_full():
    torch.manual_seed(0)
    attn = Attention(16, 2, rope_theta=10000.0).eval()
    x = torch.randn(2, 12, 16)
    bs = 4
    pos = torch.arange(12)
    full = attn(x, pos, block_causal_mask(pos // bs, pos // bs))
    cache = KVCache(1)
    outs = []
    for b in range(3):
        sl = slice(b * bs, (b + 1) * bs)
        outs.append(attn(x[:, sl], pos[sl], None, cache.layers[0], commit=True))
    assert cache.layers[0].k.shape[2] == 12
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


def test_vae_decoder_cache_equals_full():
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(**TINY_VAE)).eval()
    z = torch.randn(2, 12, 8)
    full = vae.decode(z)
    cache = KVCache(1)
    parts = [vae.decode(z[:, i:i + 4], pos=torch.arange(i, i + 4), mask=None if i == 0 else
                        torch.ones(4, i + 4, dtype=torch.bool), cache=cache) for i in range(0, 12, 4)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- VAE

def test_kl_closed_form():
    mu = torch.tensor([[0.5, -1.0]])
    logvar = torch.tensor([[math.log(0.25), 0.0]])
    # KL(N(m, s^2) || N(0,1)) = 0.5 (m^2 + s^2 - 1 - log s^2)
    expected = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25)) + 0.5 * (1.0 + 1.0 - 1 - 0.0)
    assert torch.allclose(gaussian_kl_std_normal(mu, logvar), torch.tensor([expected]))
    # the general KL reduces to it against N(0, I), and is zero against itself
    assert torch.allclose(gaussian_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(mu)),
                          torch.tensor([expected]))
    assert torch.allclose(gaussian_kl(mu, logvar, mu, logvar), torch.zeros(1))


def test_latent_head_mu_layernorm_and_clamp():
    vae = TextVAE(VAEConfig(**TINY_VAE))
    with torch.no_grad():
        vae.enc.to_latent.bias[8:] = -100.0  # push log-variance far below the clamp
    mu, logvar = vae.encode(torch.randint(0, 300, (2, 8)))
    assert torch.allclose(mu.mean(-1), torch.zeros(2, 8), atol=1e-5)
    assert torch.allclose(mu.pow(2).mean(-1), torch.ones(2, 8), atol=1e-2)  # up to LN eps
    assert (logvar >= -30.0).all() and logvar.min() == -30.0


def test_fixed_logsnr():
    vae = TextVAE(VAEConfig(**TINY_VAE, fixed_logsnr=1.5))
    out = vae(torch.randint(0, 300, (2, 8)))
    assert abs(float(out["logsnr"]) - 1.5) < 1e-2  # E[mu^2] = 1 up to LN eps


def test_encoder_is_block_causal():
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(**TINY_VAE)).eval()
    x = torch.randint(0, 300, (1, 12))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 300  # change a token in block 2
    mx, _ = vae.encode(x)
    my, _ = vae.encode(y)
    assert torch.equal(mx[:, :8], my[:, :8])  # blocks 0-1 unchanged
    assert not torch.allclose(mx[:, 8:], my[:, 8:])  # its own block sees it (bidirectional)


def test_vae_overfits_small_batch():
    torch.manual_seed(0)
    vae = TextVAE(VAEConfig(**TINY_VAE))
    x = torch.randint(0, 300, (4, 16))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-2)
    for _ in range(150):
        out = vae(x, beta=1e-3, mask_prob=0.15, lam_mask=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    vae.eval()
    assert float(vae.recon_accuracy(x)) == 1.0
    assert float(out["ce"].detach()) < 0.1


def test_dropout_off_at_eval():
    vae = TextVAE(VAEConfig(**{**TINY_VAE, "dropout": 0.5}))
    x = torch.randint(0, 300, (2, 8))
    vae.eval()
    a, b = vae.decode(vae.encode(x)[0]), vae.decode(vae.encode(x)[0])
    assert torch.equal(a, b)
    vae.train()
    a, b = vae.decode(vae.encode(x)[0]), vae.decode(vae.encode(x)[0])
    assert not torch.equal(a, b)


def test_patch_size_shapes():
    vae = TextVAE(VAEConfig(**{**TINY_VAE, "patch_size": 2}))
    x = torch.randint(0, 300, (2, 16))
    mu, _ = vae.encode(x)
    assert mu.shape == (2, 8, 8)
    assert vae.decode(mu).shape == (2, 16, 300)
    out = vae(x)
    assert torch.isfinite(out["loss"])


# ---------------------------------------------------------------------------------------------------- big corpora

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "data", "shakespeare_tiny.txt")


def test_streamed_prepare_equals_the_whole_file_split(tmp_path):
    """Read in 3 KB blocks into 40K-token shards, the corpus gives exactly the tokens and the split of encoding
    it whole. Mutation: cutting blocks after any newline (then '\n\n' splits into two tokens), or routing chunks
    per block instead of per token position."""
    from tokendata import TokenData
    text = open(SHAKESPEARE, encoding="utf-8").read()[:200_000]
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    meta = prepare(str(tmp_path / "in.txt"), str(tmp_path / "out"), seq_len=64, block_bytes=3000, shard_tokens=40_000)
    assert len(meta["shards"]["train"]) > 1
    data = TokenData(str(tmp_path / "out"), 64)
    train, val = split_tokens(np.array(get_tokenizer().encode_ordinary(text)), 0.1, "chunks", meta["chunk"], 64)
    assert np.array_equal(data.tokens("train"), train) and np.array_equal(data.tokens("val"), val)


def test_folder_and_jsonl_corpora(tmp_path):
    """A folder of .txt files and the same documents as JSONL give the same tokens, documents separated by
    <|endoftext|>; a JSONL line without 'text' is a one-line error naming the line."""
    from tokendata import TokenData
    docs = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 30 for i in range(5)]
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):
        (tmp_path / "folder" / ("sub" if i % 2 else "") / f"{i}.txt").write_text(d, encoding="utf-8")
    prepare(str(tmp_path / "folder"), str(tmp_path / "a"), seq_len=16, split="tail")
    files = sorted(str(p) for p in (tmp_path / "folder").rglob("*.txt"))
    enc = get_tokenizer()
    expected = []
    for f in files:
        expected += ([enc.eot_token] if expected else []) + enc.encode_ordinary(open(f).read())
    data = TokenData(str(tmp_path / "a"), 16)
    assert np.concatenate([data.tokens("train"), data.tokens("val")]).tolist() == expected
    (tmp_path / "ordered.jsonl").write_text("\n".join(json.dumps({"text": open(f).read()}) for f in files) + "\n")
    prepare(str(tmp_path / "ordered.jsonl"), str(tmp_path / "b"), seq_len=16, split="tail")
    data_b = TokenData(str(tmp_path / "b"), 16)
    assert np.concatenate([data_b.tokens("train"), data_b.tokens("val")]).tolist() == expected
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*'text'"):
        prepare(str(tmp_path / "bad.jsonl"), str(tmp_path / "c"), seq_len=16)


def test_prepare_memory_is_bounded_by_the_block(tmp_path):
    """With a 16 KB read limit, the Python allocations' peak does not grow with the corpus: 900 KB of text
    peak like 300 KB, far below the corpus itself. Mutation: reading the whole file at once (f.read()),
    or holding every token until the end."""
    import tracemalloc
    text = open(SHAKESPEARE, encoding="utf-8").read()
    peaks = []
    for n in (300_000, 900_000):
        corpus = tmp_path / f"c{n}.txt"
        corpus.write_text(text[:n], encoding="utf-8")
        tracemalloc.start()
        prepare(str(corpus), str(tmp_path / f"o{n}"), seq_len=64, block_bytes=16_384, shard_tokens=20_000)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0] and peaks[1] < 900_000 / 2, peaks


def test_token_data_windows_span_shards_deterministically(tmp_path):
    """Windows come from every shard, never cross a shard boundary, and depend only on the seed."""
    from tokendata import TokenData
    text = open(SHAKESPEARE, encoding="utf-8").read()[:100_000]
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    prepare(str(tmp_path / "in.txt"), str(tmp_path / "out"), seq_len=16, block_bytes=4000, shard_tokens=3000)
    data = TokenData(str(tmp_path / "out"), 16)
    a, b = data.batch("train", 64, 7, "cpu"), data.batch("train", 64, 7, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, data.batch("train", 64, 8, "cpu"))
    flat = data.tokens("train").tolist()
    shard_of = []
    for k, s in enumerate(data.shards["train"]):
        shard_of += [k] * len(s)
    hits = set()
    for row in a.tolist():  # each window is a contiguous run of one shard
        starts = [i for i in range(len(flat) - 15) if flat[i:i + 16] == row]
        assert any(shard_of[i] == shard_of[i + 15] for i in starts)
        hits.add(shard_of[starts[0]])
    assert len(hits) > 1


def test_no_two_files_import_each_other(root):
    """The repo's modules form no import cycle (imports inside functions count). Mutation: checkpoint.py's
    CheckpointError back in checkpoint.py with release.py importing it (the old circle) fails."""
    import ast
    names = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    graph = {}
    for name in names:
        tree = ast.parse(open(os.path.join(root, name + ".py"), encoding="utf-8").read())
        found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = found & names - {name}

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(c, b, seen + (a,)) for c in graph[a] if c not in seen)
    cycles = sorted(a for a in names if reaches(a, a))
    assert not cycles, f"modules on an import cycle: {cycles}"
