"""Speed tables, random weights at a preset's sizes (train.py --dry_run's configs). Generation: tokens/s and model
passes per new token, every model batched alike (Cola: guided DiT, commit and decoder passes; AR: one per token, KV
cache; LLaDA: unmasking passes in blocks of 16 tokens). Training: ms per optimizer step, tokens/s, FLOP utilisation
by flops.py's convention and by 6 N (N: non-embedding params).

    python bench.py                                    # generation: Cola (8, 16 steps), AR, LLaDA at batch 1 and 32
    python bench.py --train --preset paper --device cuda --compile --dtype bfloat16   # training: tok/s and MFU
    python bench.py --preset paper --vocab_size 100278 --models cola --batches 1 --new_tokens 16 --cola_steps 16 \
        --repeats 1 --dtype float32   # the released model's size on this machine: tok/s and peak memory"""
import resource
import time

import torch

from baselines import LMConfig, TransformerLM, ar_generate, llada_generate
from cli import Parser, autocast, check_memory, int_list, number_list, pick_device, positive_float, positive_int, \
    train_dry_run
from decoder import SamplerConfig, generate
from diffusion import ColaDLM
from dit import DiTConfig
from flops import joint_train_flops, lm_train_flops, vae_train_flops
from layers import n_params
from vae import VAEConfig

MODELS = ("cola", "ar", "llada")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def preset_config(args, model):
    """train.py --dry_run's config of model at --preset, at --vocab_size (baselines' depth matched at GPT-2's)."""
    cfg = train_dry_run(["--preset", args.preset, "--model", model, "--data_dir", "/nonexistent", "--seq_len",
                         str(args.seq_len)])  # generation widens max_seq_len to its prompts
    cfg["vae_config" if model == "cola" else "lm_config"]["vocab_size"] = args.vocab_size
    return cfg


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls (after one warm-up call) and the last result."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    res, best = fn(), float("inf")
    for _ in range(repeats):
        sync()
        t0, res = time.perf_counter(), fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, res


def bench_generation(args, cfgs, device):
    """Tokens/s and passes per token of --models at each batch size, the weights built in --weights' dtype."""
    torch.set_default_dtype({"fp32": torch.float32, "bf16": torch.bfloat16}[args.weights])  # no fp32 copy ever exists
    ctx = {"max_seq_len": args.prompt_len + args.new_tokens + 1088}
    models = {m: (ColaDLM(VAEConfig(**{**cfgs[m]["vae_config"], **ctx}), DiTConfig(**cfgs[m]["dit_config"]),
                          reference=False) if m == "cola" else
                  TransformerLM(LMConfig(**{**cfgs[m]["lm_config"], **ctx}))).to(device).eval() for m in args.models}
    torch.set_default_dtype(torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    print(f"device {device}, weights {args.weights}, autocast {args.dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens per sample; params: "
          + ", ".join(f"{k} {n_params(m) / 1e6:.1f}M" for k, m in models.items()))
    print("| model | batch | passes / token | tok/s |\n|---|---|---|---|")
    for batch in args.batches:
        prompts = [torch.randint(0, 50000, (args.prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(batch)]
        cola = lambda s: generate(models["cola"], prompts, args.new_tokens,
                                  SamplerConfig(steps=s, guidance=args.guidance, stop_ids=()), g)
        runs = [("cola", f"Cola, {s} steps", s, lambda s=s: cola(s)) for s in args.cola_steps]
        runs += [("ar", "AR (KV cache)", 0, lambda: ar_generate(models["ar"], prompts, args.new_tokens, eos_id=-1)),
                 ("llada", "LLaDA, 16 steps / 16 tokens", 0, lambda: llada_generate(
                     models["llada"], prompts, args.new_tokens, steps=args.new_tokens, block_length=16, eos_id=-1))]
        for name, label, steps, fn in (r for r in runs if r[0] in models):
            with torch.no_grad(), autocast(device, args.dtype):
                dt, (outs, st) = timed(fn, device, args.repeats)
            n = sum(len(o) for o in outs)
            passes = st["passes"] if "passes" in st else st["blocks"] * (steps + 2)  # Cola: steps + commit + decoder
            print(f"| {label} | {batch} | {passes / (n / batch):.3f} | {n / dt:,.1f} |", flush=True)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"peak memory ({'GPU' if device.startswith('cuda') else 'process RSS'}): {peak / 2 ** 30:.2f} GiB")


def bench_training(args, cfgs, device):
    """One optimizer step of each stage, the baselines too, at --batch_size x --seq_len tokens."""
    vcfg, dcfg = VAEConfig(**cfgs["cola"]["vae_config"]), DiTConfig(**cfgs["cola"]["dit_config"])
    B, L = args.batch_size, args.seq_len
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 0.0)
    print(f"device {device} ({gpu}), {args.dtype}, compile {args.compile}, {B} x {L} tokens per step, "
          f"peak {peak or '?'} TFLOP/s")
    print("| stage | params | ms / step | tok/s | TFLOP/s (repo) | MFU (repo) | TFLOP/s (6N) | MFU (6N) |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in ("vae", "joint", "ar", "llada"):
        torch.manual_seed(0)
        if stage in ("vae", "joint"):
            cola = ColaDLM(vcfg, dcfg)
            model = cola.vae if stage == "vae" else cola
            fpt = vae_train_flops(cola.vae, L) if stage == "vae" else joint_train_flops(cola, L)
            dense = n_params(cola.vae) - cola.vae.enc.embed.weight.numel() + n_params(cola.dit) * (stage == "joint")
        else:
            model = TransformerLM(LMConfig(**cfgs[stage]["lm_config"]))
            fpt, dense = lm_train_flops(model, L), n_params(model) - model.embed.weight.numel()
        model = model.to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                fused=device.startswith("cuda"))
        fwd = torch.compile(model) if args.compile else model
        x = torch.randint(0, vcfg.vocab_size, (B, L), device=device)

        def step():
            with autocast(device, args.dtype):
                loss = fwd(x)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(2):  # compile and warm up
            step()
        dt, _ = timed(step, device, args.repeats)
        repo, six_n = fpt * B * L / dt / 1e12, 6 * dense * B * L / dt / 1e12
        mfu = lambda f: f"{100 * f / peak:.1f}%" if peak else "-"
        print(f"| {stage} | {n_params(model) / 1e6:.1f}M | {dt * 1000:.1f} | {B * L / dt:,.0f} | {repo:.2f} | "
              f"{mfu(repo)} | {six_n:.2f} | {mfu(six_n)} |", flush=True)


def main(argv=None):
    p = Parser(description=__doc__)
    arg = p.add_argument
    arg("--train", action="store_true", help="time training steps instead of generation")
    arg("--preset", default="cpu", choices=["tiny", "cpu", "paper"], help="train.py size preset")
    arg("--vocab_size", type=positive_int, default=50257, help="vocabulary (the paper's: 100278)")
    arg("--batches", type=int_list, default=[1, 32], help="generation: comma list of batch sizes")
    arg("--models", type=number_list(str, "names", MODELS.__contains__, "names among cola, ar, llada"),
        default=list(MODELS), help="generation: comma list of cola, ar, llada")
    arg("--cola_steps", type=int_list, default=[8, 16], help="generation: Cola's Euler steps per block")
    arg("--weights", default="fp32", choices=["fp32", "bf16"], help="generation: the weights' dtype")
    arg("--guidance", type=positive_float, default=7.0, help="generation: Cola's guidance (1: no unconditional half)")
    arg("--prompt_len", type=positive_int, default=16, help="generation: prompt tokens")
    arg("--new_tokens", type=positive_int, default=64, help="generation: tokens per sample")
    arg("--batch_size", type=positive_int, default=8, help="training: sequences per step")
    arg("--seq_len", type=positive_int, default=512, help="training: tokens per sequence")
    arg("--compile", action="store_true", help="training: torch.compile the models")
    arg("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    arg("--repeats", type=positive_int, default=3, help="timed repetitions (best is reported)")
    arg("--device", default="auto", help="auto, cpu, cuda")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    check_memory(8 * args.vocab_size * {"tiny": 64, "cpu": 128, "paper": 1536}[args.preset], device,
                 f"--vocab_size {args.vocab_size}: its embedding and head")
    lm = preset_config(args, "ar")["lm_config"]  # checked before the other models' configs are built
    tokens = args.batch_size * args.seq_len if args.train else max(args.batches) * (args.prompt_len + args.new_tokens)
    check_memory(8 * tokens * lm["n_layers"] * lm["width"], device, f"{tokens:,} tokens at once: AR's keys and values")
    cfgs = {m: preset_config(args, m) for m in (MODELS if args.train else args.models)}
    (bench_training if args.train else bench_generation)(args, cfgs, device)


if __name__ == "__main__":
    main()
