"""
Generation speed: model passes per generated token and tokens/s for Cola DLM at several step counts,
beside token-by-token AR decoding (one pass per token). Prints figures; asserts nothing.

    python bench.py                                   # out/ckpt.pt, 8 and 16 steps, an AR of matched size
    python bench.py --ckpt out/ckpt.pt --ar_ckpt out_ar/ckpt.pt --steps 4,8,16 --batch 4

Without --ar_ckpt an untrained AR model of the size train.py matches to this Cola model is timed
(speed does not depend on the weights).
"""
import argparse
import os
import time

import torch

from baselines import TransformerLM, matched_lm_config
from decoder import ar_generate, generate, load_model
from layers import n_params
from prepare import REPO_DIR


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join(REPO_DIR, "out", "ckpt.pt"), help="Cola checkpoint")
    p.add_argument("--ar_ckpt", default=None, help="AR checkpoint (default: untrained, size-matched)")
    p.add_argument("--steps", default="8,16", help="comma list of Euler steps per block")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale (1 skips the unconditional half)")
    p.add_argument("--batch", type=int, default=1, help="samples generated together")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt tokens")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sample")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cola, ck = load_model(args.ckpt, device, ("cola",))
    cola.vae.cfg.max_seq_len = max(cola.vae.cfg.max_seq_len, args.prompt_len + args.new_tokens + 64)
    if args.ar_ckpt:
        ar, _ = load_model(args.ar_ckpt, device, ("ar",))
    else:
        v = cola.vae.cfg  # the size train.py matches: the VAE's width, depth matched to VAE + DiT parameters
        ar = TransformerLM(matched_lm_config("ar", n_params(cola.vae) + n_params(cola.dit), v.vocab_size, v.width,
                                             v.n_heads, v.mlp_hidden, v.max_seq_len))
    ar.cfg.max_seq_len = max(ar.cfg.max_seq_len, args.prompt_len + args.new_tokens + 1)
    ar = ar.to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    prompts = [torch.randint(0, 50000, (args.prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(args.batch)]

    def timed(fn):
        best, res = float("inf"), None
        for _ in range(args.repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best, res

    n_cola = sum(p.numel() for n, p in cola.named_parameters() if not n.startswith("ref_enc"))
    print(f"device {device}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens per sample, "
          f"Cola {n_cola / 1e6:.1f}M params, AR {sum(p.numel() for p in ar.parameters()) / 1e6:.1f}M params")
    print(f"{'model':<22}{'passes/token':>14}{'  (DiT, commit, decoder per block)':<36}{'tok/s':>10}")
    tokens_per_block = cola.vae.cfg.tokens_per_block
    for steps in [int(s) for s in args.steps.split(",")]:
        dt, (outs, st) = timed(lambda: generate(cola, prompts, args.new_tokens, steps, args.guidance, eos_id=-1, generator=g))
        n = sum(len(o) for o in outs)
        passes = st["dit"] + st["dit_commit"] + st["decoder"]
        per_block = f"  ({st['dit'] // st['blocks']}, 1, 1 per {tokens_per_block} tokens)"
        print(f"{'Cola, ' + str(steps) + ' steps':<22}{passes / (n / args.batch):>14.3f}{per_block:<36}{n / dt:>10.1f}")
    n_ar, dt_ar = 0, 0.0
    for p in prompts:  # AR decodes each sample in turn (one pass per token)
        dt, (out, st) = timed(lambda: ar_generate(ar, p, args.new_tokens, eos_id=-1))
        n_ar, dt_ar = n_ar + len(out), dt_ar + dt
    print(f"{'AR (KV cache)':<22}{st['passes'] / len(out):>14.3f}{'  (1 per token)':<36}{n_ar / dt_ar:>10.1f}")


if __name__ == "__main__":
    main()
