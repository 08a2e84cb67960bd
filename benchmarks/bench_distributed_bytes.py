"""Bytes each rank moves per flush against the world size (gloo processes on the CPU).

Each rank trains the same small model on its shard of the batch with the default
probes at every=1 and flushes; the reducer counts the payload bytes this rank
passes to collectives at the flush (``RankReducer.bytes_per_flush``). With
all-reduce collectives that is one rank's statistics, whatever the world size;
the all_gather scheme of dynascope 0.1 received world x payload per rank, which
the table prints beside it (and extrapolates to 1,024 ranks).

Usage::

    python benchmarks/bench_distributed_bytes.py --worlds 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynascope  # noqa: E402


def small_model() -> nn.Module:
    """The conv + LayerNorm model both distributed benchmarks train (bench_distributed_sentinel imports it)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))


def _worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = nn.parallel.DistributedDataParallel(small_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(rank)
        with dynascope.probe(model, opt, os.path.join(out, f"rank{rank}"), every=1, flush_every=steps) as run:
            for _ in range(steps):
                x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.step(loss=loss.detach())
            flushed = run.reducer.bytes_per_flush  # the flush at the last step (flush_every=steps)
            collectives = run.reducer.collectives
        Path(out, f"r{rank}.json").write_text(json.dumps({"bytes": flushed, "collectives": collectives}))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=5, help="recorded steps per flush")
    args = ap.parse_args()
    print(f"torch {torch.__version__}; {args.steps} recorded steps per flush, default probes, every=1")
    print(f"{'world':>6s} {'bytes/rank/flush (all_reduce)':>30s} {'all_gather scheme (world x payload)':>38s}")
    first = None
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as out:
            for attempt in range(3):  # gloo can abort a worker at teardown (see DEVELOPERS notes): retry
                try:
                    mp.spawn(_worker, args=(world, free_port(), out, args.steps), nprocs=world, join=True)
                    break
                except Exception as exc:  # noqa: BLE001
                    if attempt == 2 or not all(Path(out, f"r{r}.json").exists() for r in range(world)):
                        if attempt == 2:
                            raise
                        print(f"retrying world {world}: {exc!r}"[:300])
                        continue
                    break
            got = [json.loads(Path(out, f"r{r}.json").read_text()) for r in range(world)]
        b = got[0]["bytes"]
        assert all(g["bytes"] == b for g in got), got
        first = first or b
        print(f"{world:6d} {b:30,d} {world * b:38,d}")
    print(f"{1024:6d} {first:30,d} {1024 * first:38,d}   (on paper: the all-reduce payload does not grow)")


if __name__ == "__main__":
    main()
