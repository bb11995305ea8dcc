"""Compressed communication across data-parallel replicas, on CPU with gloo.

    torchrun --nproc_per_node 2 examples/ddp_compressed.py             # DDP + Flora's hook
    torchrun --nproc_per_node 2 examples/ddp_compressed.py --mode acc  # CompressedAccumulator(reduce=True)
    torchrun --nproc_per_node 2 examples/ddp_compressed.py --mode ddp  # plain DDP, for comparison

Each replica trains a small MLP on its own half of every batch; the script prints, on
replica 0, the bytes all-reduced per step (counted, not computed), the loss, and whether
the replicas ended with the same weights."""

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import flora
from flora.distributed import CollectiveCounter, ProjectionState, projection_hook

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=("hook", "acc", "ddp"), default="hook")
p.add_argument("--rank", type=int, default=16, help="rank of the compressed matrices")
p.add_argument("--steps", type=int, default=200)
args = p.parse_args()

dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
me, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same initial weights on every replica
model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
teacher = torch.nn.Linear(64, 10)  # the task: a fixed random linear map, plus noise

tau = 2  # micro-batches per step in --mode acc
if args.mode == "acc":
    # No DDP: the accumulator all-reduces its compressed buffers once per step itself.
    acc = flora.CompressedAccumulator(model, rank=args.rank, tau=tau, seed=0, reduce=True, optimizer=opt)
    forward = model
else:
    forward = nn.parallel.DistributedDataParallel(model)
    if args.mode == "hook":
        forward.register_comm_hook(ProjectionState(rank=args.rank, seed=0), projection_hook)

g = torch.Generator().manual_seed(1234)
counted = []
for step in range(args.steps):
    x = torch.randn(64, 64, generator=g)  # the global batch; this replica takes its share
    y = (teacher(x) + 0.1 * torch.randn(64, 10, generator=g)).argmax(-1).detach()
    xs, ys = x.chunk(world)[me], y.chunk(world)[me]
    counter = CollectiveCounter()
    with counter:
        if args.mode == "acc":
            for xm, ym in zip(xs.chunk(tau), ys.chunk(tau)):
                (F.cross_entropy(forward(xm), ym) / tau).backward()
        else:
            loss = F.cross_entropy(forward(xs), ys)
            loss.backward()
    opt.step()
    opt.zero_grad()
    counted.append((counter.count(), counter.bytes()))

with torch.no_grad():
    xt = torch.randn(2048, 64, generator=torch.Generator().manual_seed(99))
    test_loss = F.cross_entropy(model(xt), teacher(xt).argmax(-1)).item()
flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
hi, lo = flat.clone(), -flat  # largest and (minus) smallest value of each weight across replicas
# The handles are kept until the process ends, as in fused_replicas.py (pytorch/pytorch#190489).
works = [dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True) for t in (hi, lo)]
for w in works:
    w.wait()
same = torch.equal(hi, -lo)
dense = 4 * sum(q.numel() for q in model.parameters())
if me == 0:
    n, b = counted[-1]
    print(f"mode={args.mode} rank={args.rank if args.mode != 'ddp' else '-'} world={world}: "
          f"{n} all-reduce(s), {b} bytes per step ({b / dense:.3f} of the dense gradient's {dense}); "
          f"first step {counted[0][1]} bytes; test loss {test_loss:.4f}; replicas identical: {same}")
works.append(dist.barrier(async_op=True))  # neither process leaves while the other is in a collective
works[-1].wait()
dist.destroy_process_group()
