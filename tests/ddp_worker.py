"""Run by tests/test_train.py under torchrun: train a few steps, then compare parameters across ranks."""
import json
import sys

import torch
import torch.distributed as dist

import train

a = train.get_args(sys.argv[1:])
rank, world, local, device = train.setup_distributed("cpu")
data = train.TokenData(a.data_dir, a.seq_len)
trainer = train.train_vae(a, dict(rank=rank, world=world, device=device), data)
flat = torch.cat([p.detach().flatten() for p in trainer.raw.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
if rank == 0:
    torch.manual_seed(a.seed)
    fresh = torch.cat([p.flatten() for p in train.TextVAE(trainer.raw.cfg).parameters()])
    with open(a.out_dir + "/ddp_check.json", "w") as f:
        json.dump({"world": world, "max_rank_diff": max(float((g - gathered[0]).abs().max()) for g in gathered),
                   "moved_from_init": float((flat - fresh.detach()).abs().max()), "step": trainer.step}, f)
# drop the DDP wrapper (it holds the process group) before the group is destroyed; otherwise its
# reducer can be torn down at interpreter exit after the group, which aborts gloo now and then
del trainer, flat, gathered
train.cleanup_distributed()
