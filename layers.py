"""
Shared transformer pieces for the VAE, the DiT and the baselines (docs/method.md §3, §4, §8): every attention pattern
(drawn in docs/method.md §4; True = may attend, fed to SDPA as a bool mask with is_causal=False), RoPE in the
release's two layouts, attention with QK LayerNorm, SwiGLU, and a KV cache that keeps only committed blocks.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# every attention pattern of the method (pure functions; docs/method.md §4 prints them)
def block_causal_mask(q_block, k_block):
    """(..., Tq, Tk) bool: a query in block i sees keys in blocks <= i. Inputs are block ids (..., T).
    Block size 1 is plain causal attention (the AR baseline)."""
    return k_block.unsqueeze(-2) <= q_block.unsqueeze(-1)


def cola_mask(q_block, q_noisy, k_block, k_noisy):
    """The mixed clean/noisy rule: a clean query in block i sees clean keys in blocks <= i; a noisy query
    in block j sees clean keys in blocks < j and the noisy keys of block j only; clean queries never see
    noisy keys."""
    qb, kb = q_block.unsqueeze(-1), k_block.unsqueeze(-2)
    qn, kn = q_noisy.unsqueeze(-1), k_noisy.unsqueeze(-2)
    clean_key = ~kn & torch.where(qn, kb < qb, kb <= qb)
    noisy_key = kn & qn & (kb == qb)
    return clean_key | noisy_key


def two_l_mask(L, block_size, device="cpu"):
    """The DiT's training sequence [clean 0..L-bs-1 | noisy 0..L-1] (the "2L" layout of BD3-LM) -> its mask
    (2L - bs, 2L - bs), cola_mask, and its positions (2L - bs,): a noisy latent shares its clean twin's. The last
    clean block is left out: no noisy block reads it."""
    Lc = L - block_size
    pos = torch.cat([torch.arange(Lc), torch.arange(L)]).to(device)
    noisy = torch.cat([torch.zeros(Lc, dtype=torch.bool), torch.ones(L, dtype=torch.bool)]).to(device)
    return cola_mask(pos // block_size, noisy, pos // block_size, noisy), pos


def with_key_padding(mask, key_valid, query_valid=None):
    """AND a (B, Tk) key-validity into a (Tq, Tk) or (B, Tq, Tk) mask -> (B, 1, Tq, Tk). Invalid queries keep
    their rule: a fully masked row makes SDPA return NaN, which would leak into valid rows."""
    keep = key_valid.unsqueeze(-2)  # (B, 1, Tk)
    if query_valid is not None:
        keep = keep | ~query_valid.unsqueeze(-1)  # (B, Tq, Tk)
    return (mask & keep).unsqueeze(1)


def prefix_mask(valid, block_size):
    """(B, 1, T, T) block-causal mask over a left-padded prompt whose real latents are `valid` (B, T)."""
    blk = torch.arange(valid.shape[1], device=valid.device) // block_size
    return with_key_padding(block_causal_mask(blk, blk), valid, valid)


def cached_block_masks(hist_valid, block_size):
    """Sampling: a noisy block's rows of cola_mask over [cached history (real where hist_valid (B, Tc)) | itself]
    -> (cond, uncond), each (B, 1, bs, Tc + bs); the unconditional pass sees its own block only."""
    B = hist_valid.shape[0]
    own = torch.ones(B, block_size, dtype=torch.bool, device=hist_valid.device)
    cond = torch.cat([hist_valid, own], 1)[:, None, None, :].expand(B, 1, block_size, -1)
    uncond = torch.cat([torch.zeros_like(hist_valid), own], 1)[:, None, None, :].expand(B, 1, block_size, -1)
    return cond, uncond


def cached_causal_mask(key_valid, n_new, block_size):
    """(B, 1, n_new, Tk) mask of the last n_new positions over all Tk = Tc + n_new keys, block-causal with
    `block_size` (the decoder's own, which may be finer than the DiT's) and hiding invalid keys."""
    Tk = key_valid.shape[1]
    pos = torch.arange(Tk, device=key_valid.device)
    rule = block_causal_mask(pos[Tk - n_new:] // block_size, pos // block_size)  # (n_new, Tk)
    return (rule & key_valid.unsqueeze(1)).unsqueeze(1)


class Rotary(nn.Module):
    """RoPE on the first `rot_dim` channels of each head; pair i turns by pos * theta^(-2i/rot_dim). Pairs are
    (i, i + rot_dim/2) ("half-split") or (2i, 2i + 1) ("interleaved"). Interleaved channels are first reordered
    to half-split places, q and k alike, so q.k is unchanged and the faster contiguous form serves both."""

    def __init__(self, head_dim, theta=10000.0, fraction=1.0, interleaved=False):
        super().__init__()
        rot_dim = int(head_dim * fraction) // 2 * 2
        self.rot_dim, self.interleaved = rot_dim, interleaved
        inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / max(rot_dim, 1)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        order = torch.cat([torch.arange(0, rot_dim, 2), torch.arange(1, rot_dim, 2), torch.arange(rot_dim, head_dim)])
        self.register_buffer("order", order, persistent=False)  # interleaved pairs -> half-split places

    def forward(self, x, pos):
        """x (B, H, T, hd); pos (T,) or (B, T) integer positions. Interleaved: the output's channels are in
        self.order (apply to q and k alike)."""
        if self.rot_dim == 0:
            return x
        if self.interleaved:
            x = x[..., self.order]
        ang = pos.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (T, r/2) or (B, T, r/2)
        if ang.dim() == 3:
            ang = ang.unsqueeze(1)  # (B, 1, T, r/2)
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., :self.rot_dim].float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, x[..., self.rot_dim:]], dim=-1)


class LayerKV:
    """Keys/values of the committed blocks for one attention layer."""

    def __init__(self):
        self.k = None  # (B, H, Tc, hd)
        self.v = None

    def extend(self, k, v, commit):
        """Return cached+new keys/values; store them only if `commit` (noisy blocks are never stored)."""
        if self.k is not None:
            ck, cv = self.k, self.v
            if ck.shape[0] != k.shape[0]:  # cond+uncond batched pass: both halves read the same cache
                reps = k.shape[0] // ck.shape[0]
                ck, cv = ck.repeat(reps, 1, 1, 1), cv.repeat(reps, 1, 1, 1)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        if commit:
            self.k, self.v = k, v
        return k, v


class KVCache:
    """One LayerKV per layer."""

    def __init__(self, n_layers):
        self.layers = [LayerKV() for _ in range(n_layers)]


class Attention(nn.Module):
    """Multi-head attention through SDPA with a bool mask, RoPE, and QK LayerNorm per 'head' or over the 'width'."""

    def __init__(self, width, n_heads, rope_theta=10000.0, rope_fraction=1.0, qk_norm="head", eps=1e-5,
                 out_bias=False, interleaved=False, dropout=0.0):
        super().__init__()
        assert width % n_heads == 0, "width must be divisible by n_heads"
        self.n_heads, self.head_dim, self.qk_norm = n_heads, width // n_heads, qk_norm
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=out_bias)
        norm_dim = {"head": self.head_dim, "width": width}.get(qk_norm)
        self.q_norm = nn.LayerNorm(norm_dim, eps=eps) if norm_dim else nn.Identity()
        self.k_norm = nn.LayerNorm(norm_dim, eps=eps) if norm_dim else nn.Identity()
        self.rope = Rotary(self.head_dim, rope_theta, rope_fraction, interleaved)
        self.dropout = dropout

    def forward(self, x, pos, mask, cache=None, commit=False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # 3 x (B, T, C)
        if self.qk_norm == "width":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (a.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for a in (q, k, v))  # (B, H, T, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, pos), self.rope(k, pos)
        if cache is not None:
            k, v = cache.extend(k, v, commit)  # (B, H, Tc+T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """proj -> [value | gate] -> silu(gate) * value -> out (the release's VAE order)."""

    def __init__(self, width, hidden, dropout=0.0, bias=False):
        super().__init__()
        self.proj = nn.Linear(width, 2 * hidden, bias=bias)
        self.out = nn.Linear(hidden, width, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.drop(self.out(F.silu(gate) * value))


def init_weights(module, std=0.02):
    """GPT-2 style init: N(0, 0.02) for Linear/Embedding, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def n_params(module):
    return sum(p.numel() for p in module.parameters())
