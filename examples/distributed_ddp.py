"""Record a DistributedDataParallel run: the statistics are those of the global
batch, and only rank 0 writes the run directory.

Run with torchrun (any backend; NCCL on GPUs)::

    torchrun --nproc-per-node 2 examples/distributed_ddp.py --out runs/ddp

or, on a CPU-only machine, let the script start 2 gloo processes itself::

    python examples/distributed_ddp.py --out runs/ddp
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dynascope


def train(out: str, steps: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if dist.get_backend() == "nccl" else None
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)  # each rank draws its own part of the global batch
    with dynascope.probe(model, opt, out, every=5, overwrite=True) as run:
        for _ in range(steps):
            x = torch.randn(32, 16, generator=g).to(device)
            y = (x[:, :4] > 0).float()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss.detach())  # averaged over the ranks at the flush
    if rank == 0:
        print(f"{world} ranks, {steps} steps -> {out}")


def _spawned(rank: int, world: int, port: int, out: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train(out, steps)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ddp")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--world", type=int, default=2, help="processes to start when not run by torchrun")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            train(args.out, args.steps)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world, port, args.out, args.steps), nprocs=args.world)


if __name__ == "__main__":
    main()
