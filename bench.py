"""
Speed figures, printed as tables; asserts nothing. Weights are random (speed does not depend on them),
the sizes are a preset's (train.py --dry_run builds the configs).

    python bench.py                                    # generation: Cola (8, 16 steps), AR, LLaDA at batch 1 and 32
    python bench.py --batches 1,8 --new_tokens 128 --preset cpu
    python bench.py --train --preset paper --device cuda --compile --dtype bfloat16   # training: tok/s and MFU
    python bench.py --preset paper --vocab_size 100278 --models cola --batches 1 --new_tokens 16 --cola_steps 16 \
        --repeats 1 --dtype float32   # the released model's size on this machine: tok/s and peak memory

Generation: tokens/s and model passes per generated token, every model batched the same way (Cola's
guided DiT passes, its commit and decoder passes; AR's one pass per token with a KV cache; LLaDA's
unmasking passes, semi-autoregressive blocks of 16 tokens). Training: milliseconds per optimizer step,
tokens/s, and model FLOP utilisation by two conventions: the repo's (flops.py: matmul weights per
position each network runs on, plus attention) and 6 N (N: all parameters but embeddings).
"""
import argparse
import os
import resource
import time

import torch

from baselines import LMConfig, TransformerLM
from baselines import ar_generate, llada_generate
from cli import Parser, autocast, fail, int_list, nonneg_float, pick_device, positive_float, positive_int, train_dry_run
from decoder import SamplerConfig, generate
from diffusion import ColaDLM
from dit import DiTConfig
from flops import joint_train_flops, lm_train_flops, vae_train_flops
from layers import n_params
from vae import VAEConfig

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def preset_configs(preset, vocab_size, extra=()):
    """The model configs train.py builds for a preset, for Cola, AR and LLaDA (train.py --dry_run), at vocab_size
    (the baselines' depth stays matched at GPT-2's vocabulary)."""
    cfgs = {model: train_dry_run(["--preset", preset, "--model", model, "--data_dir", "/nonexistent", *extra])
            for model in ("cola", "ar", "llada")}
    for cfg in (cfgs["cola"]["vae_config"], cfgs["ar"]["lm_config"], cfgs["llada"]["lm_config"]):
        cfg["vocab_size"] = vocab_size
    return cfgs


def check_memory(need, device, what):
    """Refuse, before any model is built or run, sizes whose `need` bytes alone outgrow the device's memory."""
    mem = torch.cuda.get_device_properties(device).total_memory if device.startswith("cuda") else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > mem:
        fail(f"{what} alone need {need / 2 ** 30:,.0f} GiB, more than the {mem / 2 ** 30:,.0f} GiB of {device}")


def parser_fail(text):
    raise argparse.ArgumentTypeError(f"{text!r} names none of cola, ar, llada")


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls (after one warm-up call) and the last result."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    res = fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        res = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, res


def generation_models(args, cfgs, device):
    """{name: model} of --models, random weights, their weights in --weights' dtype."""
    need = args.prompt_len + args.new_tokens + 64
    dtype, models = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.weights], {}
    torch.set_default_dtype(dtype)  # built in that dtype: no fp32 copy ever exists
    for name in args.models:
        if name == "cola":
            m = ColaDLM(VAEConfig(**{**cfgs["cola"]["vae_config"], "max_seq_len": need + 1024}),
                        DiTConfig(**cfgs["cola"]["dit_config"]), reference=False)
        else:
            m = TransformerLM(LMConfig(**{**cfgs[name]["lm_config"], "max_seq_len": need + 1024}))
        models[name] = m.to(device).eval()
    torch.set_default_dtype(torch.float32)
    return models


def bench_generation(args, cfgs, device):
    models = generation_models(args, cfgs, device)
    amp = autocast(device, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    print(f"device {device}, weights {args.weights}, autocast {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} "
          f"new tokens per sample; params: " + ", ".join(f"{k} {n_params(m) / 1e6:.1f}M" for k, m in models.items()))
    print("| model | batch | passes / token | tok/s |\n|---|---|---|---|")
    for batch in args.batches:
        prompts = [torch.randint(0, 50000, (args.prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(batch)]
        runs = []
        if "cola" in models:
            runs += [(f"Cola, {s} steps", lambda s=s: generate(models["cola"], prompts, args.new_tokens, SamplerConfig(
                steps=s, guidance=args.guidance, stop_ids=()), g)) for s in args.cola_steps]
        if "ar" in models:
            runs += [("AR (KV cache)", lambda: ar_generate(models["ar"], prompts, args.new_tokens, eos_id=-1))]
        if "llada" in models:
            runs += [("LLaDA, 16 steps / 16 tokens", lambda: llada_generate(
                models["llada"], prompts, args.new_tokens, steps=args.new_tokens, block_length=16, eos_id=-1))]
        for name, fn in runs:
            with torch.no_grad(), amp:
                dt, (outs, st) = timed(fn, device, args.repeats)
            n = sum(len(o) for o in outs)
            passes = st["passes"] if "passes" in st else st["blocks"] * (int(name.split()[1]) + 2)
            print(f"| {name} | {batch} | {passes / (n / batch):.3f} | {n / dt:,.1f} |", flush=True)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"peak memory ({'GPU' if device.startswith('cuda') else 'process RSS'}): {peak / 2 ** 30:.2f} GiB")


def bench_training(args, cfgs, device):
    """One optimizer step of each stage, the baselines too, at --batch_size x --seq_len tokens."""
    vcfg, dcfg = VAEConfig(**cfgs["cola"]["vae_config"]), DiTConfig(**cfgs["cola"]["dit_config"])
    B, L = args.batch_size, args.seq_len
    amp = autocast(device, args.dtype)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.startswith("cuda")
                                     and k in torch.cuda.get_device_name()), 0.0)
    print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), {args.dtype}, "
          f"compile {args.compile}, {B} x {L} tokens per step, peak {peak or '?'} TFLOP/s")
    print("| stage | params | ms / step | tok/s | TFLOP/s (repo) | MFU (repo) | TFLOP/s (6N) | MFU (6N) |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in ("vae", "joint", "ar", "llada"):
        torch.manual_seed(0)
        if stage in ("vae", "joint"):
            cola = ColaDLM(vcfg, dcfg)
            model = cola.vae if stage == "vae" else cola
            fpt = vae_train_flops(cola.vae, L) if stage == "vae" else joint_train_flops(cola, L)
            dense = n_params(cola.vae) - cola.vae.enc.embed.weight.numel() + (n_params(cola.dit) if stage == "joint" else 0)
        else:
            model = TransformerLM(LMConfig(**cfgs[stage]["lm_config"]))
            fpt, dense = lm_train_flops(model, L), n_params(model) - model.embed.weight.numel()
        model = model.to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                fused=device.startswith("cuda"))
        fwd = torch.compile(model) if args.compile else model
        x = torch.randint(0, vcfg.vocab_size, (B, L), device=device)

        def step():
            with amp:
                loss = fwd(x)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(2):  # compile and warm up
            step()
        dt, _ = timed(step, device, args.repeats)
        tokens = B * L
        repo, six_n = fpt * tokens / dt / 1e12, 6 * dense * tokens / dt / 1e12
        mfu = lambda f: f"{100 * f / peak:.1f}%" if peak else "-"
        print(f"| {stage} | {n_params(model) / 1e6:.1f}M | {dt * 1000:.1f} | {tokens / dt:,.0f} | {repo:.2f} | {mfu(repo)} | "
              f"{six_n:.2f} | {mfu(six_n)} |", flush=True)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="time training steps instead of generation")
    p.add_argument("--preset", default="cpu", choices=["tiny", "cpu", "paper"], help="train.py size preset")
    p.add_argument("--vocab_size", type=positive_int, default=50257, help="vocabulary (the paper's: 100278)")
    p.add_argument("--batches", type=int_list, default=[1, 32], help="generation: comma list of batch sizes")
    p.add_argument("--models", type=lambda s: [m for m in s.split(",") if m in ("cola", "ar", "llada")] or
                   parser_fail(s), default=["cola", "ar", "llada"], help="generation: comma list of cola, ar, llada")
    p.add_argument("--cola_steps", type=int_list, default=[8, 16], help="generation: Cola's Euler steps per block")
    p.add_argument("--weights", default="fp32", choices=["fp32", "bf16"], help="generation: the weights' dtype")
    p.add_argument("--guidance", type=positive_float, default=7.0, help="generation: Cola's guidance (1 skips the unconditional half)")
    p.add_argument("--prompt_len", type=positive_int, default=16, help="generation: prompt tokens")
    p.add_argument("--new_tokens", type=positive_int, default=64, help="generation: tokens per sample")
    p.add_argument("--batch_size", type=positive_int, default=8, help="training: sequences per step")
    p.add_argument("--seq_len", type=positive_int, default=512, help="training: tokens per sequence")
    p.add_argument("--compile", action="store_true", help="training: torch.compile the models")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--peak_tflops", type=nonneg_float, default=0.0, help="the device's peak for MFU (default: known GPUs)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    check_memory(8 * args.vocab_size * {"tiny": 64, "cpu": 128, "paper": 1536}[args.preset], device,
                 f"--vocab_size {args.vocab_size}: its embedding and head")
    cfgs = preset_configs(args.preset, args.vocab_size, ["--seq_len", str(args.seq_len)] if args.train else [])
    lm = cfgs["ar"]["lm_config"]
    tokens = args.batch_size * args.seq_len if args.train else max(args.batches) * (args.prompt_len + args.new_tokens)
    check_memory(8 * tokens * lm["n_layers"] * lm["width"], device, f"{tokens:,} tokens at once: AR's keys and values")
    (bench_training if args.train else bench_generation)(args, cfgs, device)


if __name__ == "__main__":
    main()
