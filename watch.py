"""Watch a model generate (sample.py --show_steps / --animate; docs/method.md §6): Cola's blocks turning from noise
into text over the Euler steps, next to AR writing token by token and LLaDA unmasking in its confidence order.
Each view is a list of Frames: the text after one step of the sampler, each position with the model's probability of
its token. Cola's is the decoder's reading of the step's clean-block estimate x0 = z_t - t v (decoder.StepState)
against the cached history, uncommitted; the last step's is the decoded block itself (at temperature 0). Frames print
as lines (show) or become an animated GIF or a still PNG (draw)."""
import os
from dataclasses import dataclass

import torch

from baselines import lm_generate
from cli import pyplot, save_figure
from decoder import choose_tokens, generate

ROW = 16  # positions per drawn row: one Cola block of 16 latents at patch 1


@dataclass
class Frame:
    label: str                      # which step of which block, for the text line and the picture's title
    tokens: list                    # the generated tokens shown, one per position (None: masked / not yet written)
    conf: list                      # per position, the model's probability of its token (0 where None)
    start: int                      # where the row this step changed starts (Cola: the block being denoised)


def cola_view(model, prompt, max_new_tokens, sampler, generator):
    """generate() on one prompt, a Frame after every Euler step and every finished block; rows are blocks, the first
    showing the prompt's own tokens of its partial block (probability 1) before the new ones."""
    tpb = model.block_size * model.vae.cfg.patch_size
    n_given = len(prompt) % tpb
    frames, done = [], list(prompt[len(prompt) - n_given:])  # the tokens of the finished blocks

    def on_step(s):
        logits = model.decode_block(s.x0, s.hist_valid, s.caches, commit=False)[:1]  # (1, tpb, V): nothing committed
        toks = choose_tokens(logits, s.seen[:1], 0.0, repetition_penalty=sampler.repetition_penalty)[0]  # (tpb,)
        conf = torch.softmax(logits[0].float(), -1).gather(1, toks[:, None])[:, 0]  # (tpb,)
        skip = n_given if s.k == 0 else 0  # the prompt's positions show the prompt
        frames.append(Frame(f"block {s.k} step {s.i + 1}/{sampler.steps} t={float(s.t.max()):.2f}",
                            done + toks[skip:].tolist(), [1.0] * len(done) + conf[skip:].tolist(), s.k * tpb))

    def on_block(s):
        done.extend(s.decoded[0, n_given if s.k == 0 else 0:].tolist())
        frames.append(Frame(f"block {s.k} decoded", list(done), frames[-1].conf[:len(done)], s.k * tpb))

    out, _ = generate(model, [prompt], max_new_tokens, sampler, generator, on_block=on_block, on_step=on_step)
    return out[0], frames


def lm_view(kind, model, prompt, max_new_tokens, sampler, generator, steps=32, block_length=None):
    """AR on one prompt, a Frame after every token, or LLaDA, a Frame after every unmasking pass (masked: None)."""
    frames, toks, conf = [], [], []

    def on_token(new, probs):  # AR
        if new[0] is not None:
            toks.append(new[0])
            conf.append(float(probs[0]))
            frames.append(Frame(f"token {len(toks)}", list(toks), list(conf), (len(toks) - 1) // ROW * ROW))

    def on_step(x, probs):  # LLaDA
        shown = [None if t == model.cfg.mask_id else t for t in x[0].tolist()]
        before = frames[-1].tokens if frames else [None] * len(shown)
        first = next((i for i, (t, f) in enumerate(zip(shown, before)) if t != f), 0)  # the first position unmasked
        frames.append(Frame(f"pass {len(frames) + 1}", shown, probs[0].tolist(), first // ROW * ROW))

    out, _ = lm_generate(kind, model, [prompt], max_new_tokens, sampler, generator, steps, block_length, on_token,
                         on_step)
    return out[0], frames


def run(kind, model, prompt, sampler, generator, enc, args, i, title):
    """sample.py's --show_steps (print every frame) and --animate (draw sample 0's) -> sample i's new tokens."""
    new, frames = (cola_view(model, prompt, args.max_new_tokens, sampler, generator) if kind == "cola" else
                   lm_view(kind, model, prompt, args.max_new_tokens, sampler, generator, args.steps or 32,
                           args.block_length or None))
    if args.show_steps:
        print()
        show(enc, frames)
        print(f"--- sample {i}\n{enc.decode(prompt)}", end="")
    if args.animate and i == 0:
        draw(enc, frames, args.animate, title)
    return new


def cell_text(enc, tok):
    """A token as a visible string: newlines as ↵, tabs as ⇥, other control characters and nothing yet as '·'."""
    text = "·" if tok is None else enc.decode([tok]).replace("\n", "↵").replace("\t", "⇥")
    return "".join(c if c.isprintable() else "·" for c in text)


def show(enc, frames, out=print):
    """Print each frame as `label | text` from the row it changed on (Cola: the block being denoised); masked: '_'."""
    width = max(len(f.label) for f in frames) if frames else 0
    for f in frames:
        out(f"{f.label:<{width}} | " + "".join(cell_text(enc, t) if t is not None else "_" for t in f.tokens[f.start:]))


def draw_grid(ax, enc, tokens, conf, row_labels=None):
    """Positions as cells in rows of ROW, each with its token, coloured by the model's probability."""
    cmap, n_rows = pyplot().get_cmap("viridis"), max(1, -(-len(tokens) // ROW))
    ax.set_xlim(0, ROW)
    ax.set_ylim(n_rows, 0)
    ax.axis("off")
    for i, (tok, p) in enumerate(zip(tokens, conf)):
        r, c = divmod(i, ROW)
        ax.add_patch(pyplot().Rectangle((c, r), 0.96, 0.92, color="0.9" if tok is None else cmap(p)))
        ax.text(c + 0.48, r + 0.46, cell_text(enc, tok)[:7], ha="center", va="center", fontsize=6,
                color="black" if tok is None or p > 0.5 else "white")
    for r, label in enumerate(row_labels or []):
        ax.text(-0.2, r + 0.46, label, ha="right", va="center", fontsize=6)


def draw(enc, frames, path, title="", fps=4):
    """An animated GIF of the frames (path *.gif), or a still PNG whose rows are the row each of the first 40 frames
    changed, top to bottom (Cola: every step of the first blocks)."""
    plt = pyplot()
    if path.endswith(".png"):
        shown = frames[:40]
        rows = [(f.tokens[f.start:f.start + ROW] + [None] * ROW)[:ROW] for f in shown]
        confs = [(f.conf[f.start:f.start + ROW] + [0.0] * ROW)[:ROW] for f in shown]
        fig, ax = plt.subplots(figsize=(12, 0.9 + 0.22 * len(rows)))
        draw_grid(ax, enc, sum(rows, []), sum(confs, []), [f.label for f in shown])
        ax.set_title(f"{title}\ncolour: the model's probability of each token (dark: low, yellow: high)", fontsize=9)
        return save_figure(plt, fig, path)
    from matplotlib.animation import FuncAnimation, PillowWriter
    n_rows = max(-(-len(f.tokens) // ROW) for f in frames)
    fig, ax = plt.subplots(figsize=(12, 0.9 + 0.35 * n_rows))

    def render(i):
        ax.clear()
        draw_grid(ax, enc, frames[i].tokens, frames[i].conf)
        ax.set_ylim(n_rows, 0)
        ax.set_title(f"{title}  {frames[i].label}", fontsize=9)

    tmp = f"{path}.{os.getpid()}.tmp.gif"  # written whole, then renamed: an earlier file is never torn
    try:
        FuncAnimation(fig, render, frames=len(frames)).save(tmp, writer=PillowWriter(fps=fps))
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
