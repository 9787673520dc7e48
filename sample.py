"""
Sample from a trained model, Cola DLM or a baseline: the checkpoint carries its kind, configs and sampler.
    python sample.py                                  # out/ckpt.pt, prompt "\n"
    python sample.py --prompt "ROMEO:" --num_samples 3 --steps 8 --guidance 3
    python sample.py --show_steps --animate out/denoise.gif   # every Euler step, as text and as a picture
    python sample.py --out_dir out_ar                 # AR (KV cache); LLaDA: --steps 32 --block_length 16
    python sample.py --init_from hf/Cola-DLM --prompt "Question: ... Answer:"   # the authors' released 2B model
Cola prints each block as it is decoded (decoder.generate); a released snapshot samples as the release does.
"""
import os
import sys
import time

import torch

from baselines import lm_generate
from checkpoint import CheckpointError, load_model, prompt_ids, release_sampler, stored_sampler
from cli import (Parser, autocast, float_in, int_at_least, nonneg_float, nonneg_int, output_file, pick_device,
                 positive_float, positive_int, read_prompt, script, unit_float)
from decoder import GenerationError, generate
from tokenizer import REPO_DIR, DataError, get_tokenizer
from scoring import seen_ngrams_line
import watch


def get_args(argv=None):
    p = Parser(description=__doc__)
    add = p.add_argument
    add("--out_dir", default=os.path.join(REPO_DIR, "out"), help="directory holding ckpt.pt")
    add("--ckpt", help="checkpoint path (overrides --out_dir)")
    add("--init_from", metavar="DIR", help="the authors' released snapshot (cola_vae/, cola_dit/, tokenizer.json)")
    add("--prompt", default="\n", help="prompt text, or FILE:path to read it from a file")
    add("--num_samples", type=positive_int, default=8, help="number of samples")
    add("--max_new_tokens", type=positive_int, default=96, help="tokens to generate per sample")
    # the sampler: unset flags take the checkpoint's (decoder.SamplerConfig)
    add("--steps", type=positive_int, help="Cola: Euler steps per block; LLaDA: unmasking passes")
    add("--guidance", type=float_in(0.0, 1e3, low_open=True), help="Cola: guidance scale, 1 = off")
    add("--noise_scale", type=float_in(0.0, 1e3, low_open=True), help="Cola: std of each block's starting noise")
    add("--eta", type=unit_float, help="Cola: > 0 a stochastic sampler, this share of each step's noise drawn afresh")
    add("--block_length", type=nonneg_int, default=0, help="LLaDA: semi-autoregressive block length (0: all at once)")
    add("--temperature", type=nonneg_float, help="0 = greedy (stored: 0)")
    add("--top_k", type=nonneg_int, help="Cola, AR: keep the k most likely tokens, 0 = all (stored: 0)")
    add("--top_p", type=float_in(0.0, 1.0, low_open=True), help="Cola, AR: nucleus mass, 1 = off (stored: 1)")
    add("--repetition_penalty", type=positive_float, help="Cola, AR: CTRL-style penalty, 1 = off (stored: 1.1)")
    add("--seed", type=int_at_least(0, 2**32 - 1), default=1337, help="random seed")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast (bf16: a snapshot's weights too)")
    add("--compile", action="store_true", help="Cola: torch.compile the DiT and the decoder")
    add("--show_steps", action="store_true", help="print every step: Cola's Euler steps, AR's tokens, LLaDA's passes")
    add("--animate", type=output_file("--animate", ".gif", ".png"), metavar="PATH",
        help="draw the first sample's steps: an animation (.gif) or a still (.png)")
    return p.parse_args(argv)


@script
def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    path = args.init_from or args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    try:
        text = read_prompt(args.prompt)
        model, info = load_model(path, device, dtype=getattr(torch, args.dtype))
        enc = get_tokenizer(info["tokenizer"])
        prompt = prompt_ids(info, enc, text)
        flags = ("steps", "guidance", "noise_scale", "eta", "temperature", "top_k", "top_p", "repetition_penalty")
        sampler = stored_sampler(info, enc.eot_token, **{k: getattr(args, k) for k in flags})
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    kind = info["kind"]
    if args.compile and kind == "cola":
        model.dit = torch.compile(model.dit, dynamic=True)
        model.vae.dec = torch.compile(model.vae.dec, dynamic=True)
    g = torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    how = {"cola": f"steps {sampler.steps}, guidance {sampler.guidance}, noise {sampler.noise_scale}, eta {sampler.eta}"
                   + (", the release's sampler" if info.get("release") else ""), "ar": "KV cache",
           "llada": f"steps {args.steps or 32}, block length {args.block_length or args.max_new_tokens}"}[kind]
    print(f"# {path}: {kind}, step {info['step']}, {how}, prompt {len(prompt)} tokens", flush=True)
    show = lambda tokens: print(enc.decode(tokens), end="", flush=True)
    total_tokens, total_time, samples = 0, 0.0, []
    for i in range(args.num_samples):
        print(f"--- sample {i}\n{enc.decode(prompt)}", end="", flush=True)
        t0 = time.time()
        try:
            with autocast(device, args.dtype):
                if args.show_steps or args.animate and i == 0:  # every step of the sampler (watch.py)
                    out = [watch.run(kind, model, prompt, sampler, g, enc, args, i, f"{kind}: {how}")]
                    show(out[0])
                elif kind == "cola" and release_sampler(info):
                    out, _ = release_sampler(info)(model, [prompt], args.max_new_tokens, sampler, generator=g)
                    show(out[0])
                elif kind == "cola":  # each block printed as soon as it is decoded
                    out, _ = generate(model, [prompt], args.max_new_tokens, sampler, g,
                                      on_block=lambda s: show(s.kept[0]))
                else:  # AR streams its tokens, LLaDA's come at the end
                    stream = lambda new, _: show([t for t in new if t is not None])
                    out, _ = lm_generate(kind, model, [prompt], args.max_new_tokens, sampler, g, args.steps or 32,
                                         args.block_length or None, stream)
                    show(out[0] if kind == "llada" else [])
        except GenerationError as e:
            sys.exit(f"\nerror: {e}")
        total_time, total_tokens = total_time + time.time() - t0, total_tokens + len(out[0])
        samples.append(out[0])
        print()
    print(f"# {total_tokens} tokens in {total_time:.2f} s ({total_tokens / max(total_time, 1e-9):.1f} tok/s)")
    if "data_dir" in info["args"]:  # judge-free quality against the training split, if the data is here
        print(seen_ngrams_line(samples, info["args"]["data_dir"]))


if __name__ == "__main__":
    main()
