"""Run by tests under torchrun: several training runs in one process group, then per-rank checks.

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_ROOT DATA_DIR [flags shared by every run]

1. stage 1 with accumulation: parameters must be identical on every rank;
2. one AR step of 2 micro-batches per rank (compared by the test with 1 process x 4 micro-batches);
3. a short Cola run through both stages, uninterrupted, and the same run stopped inside stage 2 and resumed.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import train

root, data_dir, shared = sys.argv[1], sys.argv[2], sys.argv[3:]
rank, world, device = train.setup_distributed("cpu")
env = dict(rank=rank, world=world, device=device, master=rank == 0)


def run(name, *flags):
    args = train.get_args(["--data_dir", data_dir, "--out_dir", os.path.join(root, name), *shared, *flags])
    result = train.run_stages(args, env)
    dist.barrier()
    return result


# every rank's live parameters after stage 1 with accumulation (the checkpoint holds rank 0's only)
live = run("vae", "--stage", "vae", "--vae_iters", "3", "--eval_interval", "3", "--grad_accum", "2").model
vec = torch.cat([p.detach().flatten() for p in live.parameters()])
gathered = [torch.zeros_like(vec) for _ in range(world)]
dist.all_gather(gathered, vec)
run("ar", "--model", "ar", "--lm_layers", "1", "--main_iters", "1", "--eval_interval", "1", "--grad_accum", "2")
common = ("--stage", "all", "--vae_iters", "2", "--main_iters", "4", "--eval_interval", "2", "--dropout", "0.1")
run("full", *common)
run("part", *common, "--stage", "vae")
run("part", *common, "--stage", "joint", "--resume", "--stop_after", "1")
run("part", *common, "--stage", "joint", "--resume")
if rank == 0:
    with open(os.path.join(root, "ddp_check.json"), "w") as f:
        json.dump({"world": world, "max_rank_diff": max(float((g - gathered[0]).abs().max()) for g in gathered)}, f)
del live, vec, gathered
from cli import cleanup_distributed
cleanup_distributed()
