"""Run by tests/test_train.py under torchrun: train a few steps, then compare parameters across ranks."""
import json
import sys

import torch
import torch.distributed as dist

import train

args = train.get_args(sys.argv[1:])
rank, world, device = train.setup_distributed("cpu")
data = train.TokenData(args.data_dir, args.seq_len)
env = dict(rank=rank, world=world, device=device, master=rank == 0)
run = train.stage_vae(args, env, data)
train.train(run, args, env, data)
flat = torch.cat([p.detach().flatten() for p in run.model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
if rank == 0:
    torch.manual_seed(args.seed)
    fresh = torch.cat([p.flatten() for p in train.TextVAE(run.model.cfg).parameters()])
    with open(args.out_dir + "/ddp_check.json", "w") as f:
        json.dump({"world": world, "max_rank_diff": max(float((g - gathered[0]).abs().max()) for g in gathered),
                   "moved_from_init": float((flat - fresh.detach()).abs().max()),
                   "step": torch.load(args.out_dir + "/vae.pt", weights_only=True)["step"]}, f)
# drop the DDP wrapper (it holds the process group) before the group is destroyed; otherwise its
# reducer can be torn down at interpreter exit after the group, which aborts gloo now and then
del run, flat, gathered
train.cleanup_distributed()
