"""An FSDP2 run on 2 ranks with the sentinel, an injected fault, its forensics, curvature and noise scale.

Each rank trains its half of every global batch on a model sharded with ``fully_shard``. At step ``--fault``
the last layer's weight is multiplied by 50: every rank's sentinel holds the same row (the squared norms of
the shards summed across ranks), so every rank sees the loss spike at the same step and records the same burst;
each rank writes its shards of the snapshot before it, rank 0 the event, the Hessian's top eigenvalue and the
gradient noise scale of the global probe batch; then it prints the events and the forensics ranking of the
first one.

Run with torchrun (NCCL on GPUs)::

    torchrun --nproc-per-node 2 examples/distributed_fsdp_sentinel.py --out runs/fsdp

or, on a CPU-only machine, let the script start 2 gloo processes itself::

    python examples/distributed_fsdp_sentinel.py --out runs/fsdp
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.analysis.forensics import forensics, run_events


def _batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same on every rank: each takes its half)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4] > 0).long()


def train(out: str, steps: int, fault: int) -> None:
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if dist.get_backend() == "nccl" else None
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    px, py = _batch(-1)
    part = slice(rank * len(px) // world, (rank + 1) * len(px) // world)
    # every rank passes its shard of the probe batch: the Hessian is the global batch's
    probe = (px[part].to(device), py[part].to(device))
    curvature = dynascope.Curvature(every=20, batch=probe, loss_fn=F.cross_entropy, k=1, trace=False)
    noise = dynascope.NoiseScale(every=20, batch=probe, loss_fn=F.cross_entropy, micro_batches=8)
    with dynascope.probe(model, opt, out, every=10, overwrite=True, curvature=curvature, scheduled=[noise],
                         snapshot_every=10, sentinel=dynascope.Sentinel(burst=5)) as run:
        for step in range(steps):
            if step == fault:
                with torch.no_grad():
                    model[4].weight.mul_(50.0)  # the fault: a local operation on each rank's shard
            x, y = _batch(step)
            x, y = x[part].to(device), y[part].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss.detach())
        print(f"rank {rank} saw the events {[(e.step, e.kind) for e in run.sentinel.events]}", flush=True)
    if rank == 0:
        events = run_events(out)
        print(f"{world} ranks, {steps} steps -> {out}")
        print(events[["step", "kind", "value"]].to_string(index=False))
        first = int(events["step"].min())
        print(f"forensics of step {first}:")
        print(forensics(out, first)[["module", "metric", "first_step", "ratio"]].head(5).to_string(index=False))
        eig = dynascope.load_run(out).scalars("hessian.eig")
        print(f"hessian.eig of the global probe batch: {eig[['step', 'value']].to_dict('records')}")
        gns = dynascope.load_run(out).scalars("gns.simple")
        print(f"gns.simple of the global probe batch: {gns[['step', 'value']].to_dict('records')}")
        print(f"snapshots: {list(dynascope.snapshots(out)['step'])}", flush=True)
    dist.barrier()  # no rank leaves (and tears the process group down) before rank 0 has printed


def _spawned(rank: int, world: int, port: int, out: str, steps: int, fault: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        train(out, steps, fault)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fsdp")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--fault", type=int, default=30, help="the step whose last-layer weight is multiplied by 50")
    parser.add_argument("--world", type=int, default=2, help="processes to start when not run by torchrun")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            train(args.out, args.steps, args.fault)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world, port, args.out, args.steps, args.fault), nprocs=args.world)


if __name__ == "__main__":
    main()
