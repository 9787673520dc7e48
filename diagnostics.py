"""
Generation diagnostics for Cola DLM (docs/method.md §6): where block generation breaks. Each runs the real sampler
on held-out windows after their true clean history (eval_sdedit, eval_prefix_prediction, eval_latent_fit,
eval_history_drift); plot_diagnostics draws them.
"""
from dataclasses import replace

import torch

from cli import pyplot
from decoder import denoise_block, encode_normalised, generate
from diffusion import flow_path, time_grid
from scoring import ngram_metrics


def prefilled(model, hist):
    """Fresh caches holding the clean history hist (B, Tc, d) -> (caches, validity of the history)."""
    caches = model.new_caches()
    valid = torch.ones(hist.shape[:2], dtype=torch.bool, device=hist.device)
    if hist.shape[1]:
        model.prefill(hist, valid, caches)
    return caches, valid


def denoise_from(model, hist, start, t0, steps, guidance, pin=None, pin_z=None):
    """The sampler's guided Euler steps for the block after history hist from `start` at t0 to 0, round(steps * t0) of
    them (the sampler's step size); latents in `pin` held at pin_z."""
    caches, valid = prefilled(model, hist)
    grid = time_grid(max(1, round(steps * t0)), start.device, t_max=t0)
    return denoise_block(model, start, grid, valid, guidance, caches[0], pin, pin_z)


def decode_after(model, hist, z):
    """Decoder logits (B, tpb, V) of block z after the clean history hist."""
    caches, valid = prefilled(model, hist)
    return model.decode_and_commit(z, valid, caches)


def reencode(model, tokens):
    """Normalised posterior means of a token window (B, T) -> (B, T / patch, d)."""
    return model.normalize(model.vae.encode(tokens)[0].float())


def true_block(model, x, j):
    """Normalised posterior means of windows x (B, T): the history before block j, and block j."""
    zn, bs = reencode(model, x), model.block_size
    return zn[:, :j * bs], zn[:, j * bs:(j + 1) * bs]


@torch.no_grad()
def eval_sdedit(model, x, j, steps, guidance, generator, t0s=(0.25, 0.5, 0.75, 1.0)):
    """Token accuracy of block j of windows x (B, T) generated after the true history from the true latents noised to t0
    (t0 = 1: from noise), beside that of decoding the noisy start itself."""
    tokens_per_block = model.block_size * model.vae.cfg.patch_size
    target = x[:, j * tokens_per_block:(j + 1) * tokens_per_block]
    hist, true = true_block(model, x, j)
    acc = lambda z: float((decode_after(model, hist, z).argmax(-1) == target).float().mean())
    res = {}
    for t0 in t0s:
        start = flow_path(true, torch.randn(true.shape, device=x.device, generator=generator),
                          torch.tensor(t0, device=x.device))
        res[f"after_dit_{t0}"] = acc(denoise_from(model, hist, start, t0, steps, guidance))
        if t0 < 1:
            res[f"noisy_{t0}"] = acc(start)
    return res


@torch.no_grad()
def eval_prefix_prediction(model, x, j, steps, guidance, generator, known=(0, 8, 15)):
    """Token accuracy of block j generated from noise after the true history with its first k latents known and pinned,
    on the other positions (k = 15: next-token prediction with the whole context)."""
    tokens_per_block, bs = model.block_size * model.vae.cfg.patch_size, model.block_size
    target = x[:, j * tokens_per_block:(j + 1) * tokens_per_block]
    hist, true = true_block(model, x, j)
    res = {}
    for k in known:
        pin = (torch.arange(bs, device=x.device) < k).expand(x.shape[0], bs)
        z = torch.randn(true.shape, device=x.device, generator=generator)
        out = denoise_from(model, hist, z, 1.0, steps, guidance, pin, true)
        hit = decode_after(model, hist, out).argmax(-1) == target
        res[f"known_{k}"] = float(hit[:, k * model.vae.cfg.patch_size:].float().mean())
    return res


@torch.no_grad()
def eval_latent_fit(model, x, j, steps, guidance, generator):
    """The decoder's max probability and entropy on generated latents of block j (true history, from noise) and on
    posterior ones, each latent's distance to the re-encoding of what it decodes to, and between neighbours."""
    hist, true = true_block(model, x, j)
    noise = torch.randn(true.shape, device=x.device, generator=generator)
    res = {}
    for name, z in (("generated", denoise_from(model, hist, noise, 1.0, steps, guidance)), ("posterior", true)):
        p = torch.softmax(decode_after(model, hist, z).float(), -1)  # (B, tpb, V)
        res[f"maxprob_{name}"] = float(p.max(-1).values.mean())
        res[f"entropy_{name}"] = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        decoded = torch.cat([x[:, :j * model.block_size * model.vae.cfg.patch_size], p.argmax(-1)], 1)
        res[f"dist_to_reencoded_{name}"] = float((z - reencode(model, decoded)[:, hist.shape[1]:]).norm(dim=-1).mean())
    res["dist_between_neighbours"] = float((true[:, 1:] - true[:, :-1]).norm(dim=-1).mean())
    return res


def history_drift(model, drift, reencode_history=False):
    """An on_block hook of decoder.generate recording how far each block's latents sit from the re-encoded text;
    with reencode_history, the caches are refilled from it: later blocks read re-encoded latents as history."""
    def hook(s):
        zr = encode_normalised(model, s.tokens, s.hist_valid)  # (B, N, d)
        drift.append(float((zr[:, -model.block_size:] - s.z).norm(dim=-1).mean()))
        if reencode_history:
            fresh = model.new_caches()
            model.prefill(zr, s.hist_valid, fresh)
            for cache, new in zip(s.caches, fresh):
                cache.layers[:] = new.layers
    return hook


def eval_history_drift(model, prompts, n_tokens, sampler, generator, train_ngrams):
    """n-gram metrics and drift per block of free generation with generated and with re-encoded history."""
    res = {}
    for name, flag in (("generated", False), ("reencoded", True)):
        drift = []
        outs, _ = generate(model, prompts, n_tokens, replace(sampler, stop_ids=()), generator,
                           on_block=history_drift(model, drift, flag))
        res[f"{name}_history"] = {**ngram_metrics(outs, train_ngrams), "drift_per_block": drift}
    return res


def save_figure(plt, fig, path):
    """Write the figure to path and free it -> path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_diagnostics(res, path):
    """The diagnostics' five panels (SDEdit, FM per t-bin, latent fit, drift, known prefix) drawn to path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(23, 3.6))
    sd = res.get("sdedit", {})
    t0s = sorted(float(k.split("_")[-1]) for k in sd if k.startswith("after_dit_"))
    noisy = [t for t in t0s if f"noisy_{t}" in sd]
    axes[0].plot(t0s, [sd[f"after_dit_{t}"] for t in t0s], marker="o", label="after the DiT")
    axes[0].plot(noisy, [sd[f"noisy_{t}"] for t in noisy], marker="s", label="decoding the noisy start")
    axes[0].set(xlabel="t0 (1 = from noise)", ylabel="token accuracy of the block")
    if "fm_cond_per_t_bin" in res:
        n = len(res["fm_cond_per_t_bin"])
        centers = [(i + 0.5) / n for i in range(n)]
        axes[1].plot(centers, res["fm_cond_per_t_bin"], marker="o", label="FM loss, with history")
        axes[1].plot(centers, res["fm_uncond_per_t_bin"], marker="s", label="FM loss, without")
        axes[1].set(xlabel="t")
        ax2 = axes[1].twinx()
        ax2.bar(centers, res["train_t_density_per_bin"], width=0.8 / n, alpha=0.25, color="gray")
        ax2.set(ylabel="training share of t (bars)")
    fit = res.get("latent_fit", {})
    if fit:
        names = ["maxprob", "entropy", "dist_to_reencoded"]
        for i, (src, color) in enumerate((("posterior", "tab:orange"), ("generated", "tab:blue"))):
            axes[2].bar([j + 0.4 * i for j in range(3)], [fit[f"{n}_{src}"] for n in names], width=0.4,
                        color=color, label=f"{src} latents")
        axes[2].axhline(fit["dist_between_neighbours"], color="gray", ls="--", lw=1, label="distance between tokens")
        axes[2].set_xticks([j + 0.2 for j in range(3)], ["max prob", "entropy", "|z - re-encoded|"])
        axes[2].set_title("the decoder on the block's latents", fontsize=9)
    for name, r in res.get("history_drift", {}).items():
        axes[3].plot(r["drift_per_block"], marker="o", label=name)
    axes[3].set(xlabel="generated block", ylabel="|generated latent - re-encoded|")
    for ax in axes[:4]:
        ax.legend(fontsize=7)
    pp = res.get("prefix_prediction", {})
    ks = sorted(int(k.split("_")[1]) for k in pp)
    axes[4].bar([str(k) for k in ks], [pp[f"known_{k}"] for k in ks], color="tab:blue")
    axes[4].set(xlabel="known latents of the block (true history before it)",
                ylabel="token accuracy, the other positions")
    return save_figure(plt, fig, path)
