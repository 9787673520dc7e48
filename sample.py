"""
Sample from a trained model: Cola DLM, or the AR / LLaDA baselines. Needs no model flags: the
checkpoint carries its kind and configuration.

    python sample.py                                  # out/ckpt.pt, the default prompt
    python sample.py --prompt "ROMEO:" --num_samples 3 --steps 8 --guidance 3
    python sample.py --prompt FILE:prompt.txt --ckpt out/ckpt.pt
    python sample.py --out_dir out_ar                 # AR: token by token with a KV cache
    python sample.py --out_dir out_llada --steps 32 --block_length 16   # LLaDA, semi-autoregressive blocks

Cola DLM decodes block by block (docs/method.md §6) and each block is printed as soon as it is decoded; AR prints
each token; LLaDA unmasks the most confident positions over --steps passes (low-confidence remasking,
docs/method.md §8) and prints the result.
"""
import argparse
import contextlib
import os
import sys
import time

import torch

from checkpoint import CheckpointError
from decoder import MODEL_KINDS, GenerationError, ar_generate, generate, llada_generate, load_model
from prepare import REPO_DIR, DataError, TokenData, get_tokenizer
from presets import sampler_settings
from scoring import TrainNgrams, ngram_metrics


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.join(REPO_DIR, "out"), help="directory holding ckpt.pt")
    p.add_argument("--ckpt", default=None, help="checkpoint path (overrides --out_dir)")
    p.add_argument("--prompt", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=8, help="number of samples")
    p.add_argument("--max_new_tokens", type=int, default=96, help="tokens to generate per sample")
    p.add_argument("--steps", type=int, default=None,
                   help="Cola: Euler steps per block; LLaDA: unmasking passes (default: the checkpoint preset's sampler; paper 16)")
    p.add_argument("--guidance", type=float, default=None, help="Cola: guidance scale, 1 = off (default: preset; paper 7)")
    p.add_argument("--noise_scale", type=float, default=None,
                   help="Cola: std of each block's starting noise (default: preset; paper 1)")
    p.add_argument("--eta", type=float, default=None, help="Cola: share of fresh noise per step (default: preset; paper 0)")
    p.add_argument("--block_length", type=int, default=0,
                   help="LLaDA: semi-autoregressive block length in tokens (0 = one block of --max_new_tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="Cola, AR: keep the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="Cola, AR: nucleus sampling mass (1 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.1, help="Cola, AR: CTRL-style penalty (1 = off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="Cola: torch.compile the DiT and the decoder")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1 or (args.steps or 1) < 1 or args.block_length < 0:
        p.error("--num_samples, --max_new_tokens and --steps must be >= 1, --block_length >= 0")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.repetition_penalty <= 0:
        p.error("need --temperature >= 0, 0 < --top_p <= 1 and --repetition_penalty > 0")
    return args


def read_prompt(prompt):
    if prompt.startswith("FILE:"):
        path = prompt[5:]
        if not os.path.exists(path):
            raise DataError(f"prompt file {path} not found")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return prompt


def main(argv=None):
    args = get_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    try:
        if not args.ckpt and not os.path.exists(path) and os.path.exists(os.path.join(args.out_dir, "vae.pt")):
            raise DataError(f"{path} not found; {args.out_dir}/vae.pt is a stage-1 VAE, which cannot generate: "
                            "run `python train.py --stage joint` first")
        model, ckpt = load_model(path, device, MODEL_KINDS)
        enc = get_tokenizer(ckpt["tokenizer"])
        prompt_ids = enc.encode_ordinary(read_prompt(args.prompt))
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    kind = ckpt["kind"]
    if args.compile and kind == "cola":
        model.dit = torch.compile(model.dit, dynamic=True)
        model.vae.dec = torch.compile(model.vae.dec, dynamic=True)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    amp = torch.autocast(dev_type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
    g = torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    for k, v in sampler_settings(ckpt["args"].get("preset", "paper")).items():  # unset flags: the preset's sampler
        if getattr(args, k) is None:
            setattr(args, k, v)
    how = {"cola": f"steps {args.steps}, guidance {args.guidance}, noise scale {args.noise_scale}, eta {args.eta}",
           "ar": "KV cache",
           "llada": f"steps {args.steps}, block length {args.block_length or args.max_new_tokens}"}[kind]
    print(f"# {path}: {kind}, step {ckpt['step']}, {how}, prompt {len(prompt_ids)} tokens", flush=True)
    total_tokens, total_time, samples = 0, 0.0, []
    for i in range(args.num_samples):
        print(f"--- sample {i}\n{enc.decode(prompt_ids)}", end="", flush=True)

        def show(k, new):
            sys.stdout.write(enc.decode(new[0]))
            sys.stdout.flush()

        t0 = time.time()
        try:
            with amp:
                if kind == "cola":
                    out, _ = generate(model, [prompt_ids], args.max_new_tokens, args.steps, args.guidance,
                                      args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                                      eos_id=enc.eot_token, pad_id=enc.eot_token, generator=g, on_block=show,
                                      noise_scale=args.noise_scale, eta=args.eta)
                elif kind == "ar":
                    out, _ = ar_generate(model, [prompt_ids], args.max_new_tokens, args.temperature, args.top_k,
                                         args.top_p, args.repetition_penalty, eos_id=enc.eot_token, generator=g,
                                         on_token=lambda toks: show(0, [[toks[0]] if toks[0] is not None else []]))
                else:
                    out, _ = llada_generate(model, [prompt_ids], args.max_new_tokens, args.steps,
                                            args.block_length or None, args.temperature, eos_id=enc.eot_token,
                                            generator=g)
                    show(0, out)
        except GenerationError as e:
            sys.exit(f"\nerror: {e}")
        total_time += time.time() - t0
        total_tokens += len(out[0])
        samples.append(out[0])
        print()
    print(f"# {total_tokens} tokens in {total_time:.2f} s ({total_tokens / max(total_time, 1e-9):.1f} tok/s)")
    try:  # judge-free quality of the samples against the training split (scoring.py), if the data is here
        data = TokenData(ckpt["args"]["data_dir"], 1)
        m = ngram_metrics(samples, TrainNgrams(data.tokens("train", limit=50_000_000), data.meta["vocab_size"]))
        print(f"# seen 2-gram rate {m['seen_2gram_rate']:.3f}, seen 3-gram rate {m['seen_3gram_rate']:.3f}, "
              f"distinct-2 {m['distinct_2']:.3f} (token n-grams of the samples found in the training split)")
    except DataError:
        pass


if __name__ == "__main__":
    main()
