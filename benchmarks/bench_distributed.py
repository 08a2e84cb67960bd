"""Cost of recording a DDP run: 2 gloo processes on the CPU, 2 threads in all.

Side by side in the same processes (median of ``--repeats``):

* step time of a DDP training loop without dynascope, and with
  ``dynascope.probe(every=10)`` (default probes; session start and close
  outside the timing, no flush within 100 steps: the flush is timed apart);
* one flush of 20 buffered recording steps: the cross-rank flush (layout
  header + one all_gather of the stacked payload + merge) against the
  single-process flush of the same buffers (one copy to the host), the
  SQLite write included in both.

    python benchmarks/bench_distributed.py
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dynascope


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 256), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers)


def loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int, run: object | None) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(64, 64, generator=g)
        loss = nn.functional.cross_entropy(model(x), x[:, :10].argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if run is not None:
            run.step(loss=loss.detach())


def buffered_flush(model: nn.Module, out: str, steps: int = 20) -> float:
    """Seconds of one flush holding ``steps`` recording steps (every=1)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dynascope.probe(model, opt, out, every=1, flush_every=10**9, overwrite=True) as run:
        loop(model, opt, steps, run)
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        run.flush()
        return time.perf_counter() - t


def worker(rank: int, port: int, repeats: int, steps: int, tmp: str) -> None:
    torch.set_num_threads(1)  # 2 processes x 1 thread = the 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    base, probed, flush = [], [], []
    for r in range(repeats):
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        dist.barrier()
        t = time.perf_counter()
        loop(model, opt, steps, None)
        dist.barrier()
        base.append((time.perf_counter() - t) / steps)
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        with dynascope.probe(model, opt, os.path.join(tmp, f"ddp{r}"), every=10, overwrite=True) as run:
            dist.barrier()
            t = time.perf_counter()
            loop(model, opt, steps, run)  # flushes every 200 steps: --steps 100 times the steps, not the flush
            dist.barrier()
            probed.append((time.perf_counter() - t) / steps)
        flush.append(buffered_flush(nn.parallel.DistributedDataParallel(make_model()), os.path.join(tmp, "f")))
    if rank == 0:
        b, p, f = statistics.median(base), statistics.median(probed), statistics.median(flush)
        print(f"DDP step, 2 ranks:         {b * 1e3:8.2f} ms without, {p * 1e3:8.2f} ms with probe(every=10)"
              f"  ratio {p / b:.3f}")
        print(f"flush of 20 steps, 2 ranks: {f * 1e3:8.2f} ms")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(2)
        single = [buffered_flush(make_model(), os.path.join(tmp, "single")) for _ in range(args.repeats)]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(port, args.repeats, args.steps, tmp), nprocs=2)
        print(f"flush of 20 steps, 1 process: {statistics.median(single) * 1e3:8.2f} ms (same model and buffers)")


if __name__ == "__main__":
    main()
