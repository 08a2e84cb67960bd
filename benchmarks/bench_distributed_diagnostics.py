"""What a scheduled diagnostic costs under torch.distributed against one process (gloo processes, CPU).

Issue 21 asks that a diagnostic under DDP or FSDP2 cost about what it costs in one process on the rank's
shard of the probe batch, plus its reductions. This benchmark times the public functions the scheduled
diagnostics call, on an MLP (64-256-256-10, ~85K parameters) and a global probe batch of ``--batch``
examples:

* ``hessian_eigenvalues(k=1)`` (Lanczos: one reduced Hessian-vector product per iteration), also with its
  basis sharded across the ranks (``lanczos.SHARD_BASIS_BYTES = 0``: two small all_reduces and one all_gather
  more per iteration, 1/world of the basis's memory per rank),
* ``gradient_noise_scale(micro_batches=8)`` (one backward per micro-batch, one all_reduce of the summed
  gradients, the norms gathered),
* ``loss_landscape(dims=1, resolution=9)`` (one forward and one all_reduce per point),

first in one process on the global batch and on one rank's shard (``batch / world`` examples, no process
group), then in ``world`` gloo processes: each rank's shard as one process runs it (the diagnostics told there
is no process group: every rank computes at once, so the cores are shared as in the distributed calls), then
under DDP and under FSDP2 (each rank its shard; FSDP2 gathers the whole parameters for the call). The ratios
divide the distributed call by the shard's call in the same processes. One thread per process. Median of
``--repeats`` calls after one warm-up call each.

    python benchmarks/bench_distributed_diagnostics.py --world 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distributed_bytes import free_port  # noqa: E402

import dynascope  # noqa: E402
from dynascope.diagnostics import _dist, lanczos  # noqa: E402
from dynascope.diagnostics.hessian import hessian_eigenvalues  # noqa: E402


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))


def probe_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def sharded_basis(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every Lanczos basis sharded across the ranks (``lanczos.SHARD_BASIS_BYTES = 0``)."""
    def call() -> object:
        with mock.patch.object(lanczos, "SHARD_BASIS_BYTES", 0):
            return fn()
    return call


def calls(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Callable[[], object]]:
    eig = lambda: hessian_eigenvalues(model, F.cross_entropy, batch, k=1)  # noqa: E731
    return {
        "hessian_eigenvalues k=1": eig,
        "the same, basis sharded": sharded_basis(eig),
        "gradient_noise_scale": lambda: dynascope.gradient_noise_scale(model, F.cross_entropy, batch,
                                                                       micro_batches=8),
        "loss_landscape 1D x 9": lambda: dynascope.loss_landscape(model, F.cross_entropy, batch, dims=1,
                                                                  resolution=9, progress=False),
    }


def timed(fns: dict[str, Callable[[], object]], repeats: int, barrier: bool = False) -> dict[str, float]:
    out = {}
    for name, fn in fns.items():
        fn()  # warm-up
        ts = []
        for _ in range(repeats):
            if barrier:
                dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(ts)
    return out


def _worker(rank: int, world: int, port: int, out: str, batch: int, repeats: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    x, y = probe_batch(batch)
    per = batch // world
    shard = (x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
    try:
        flags = torch.zeros(2, dtype=torch.float64)
        res: dict = {"collective": timed({"all_reduce": lambda: dist.all_reduce(flags)}, 50, barrier=True)}
        # the rank's shard as one process would run it, timed here (every rank at once, the same contention
        # for the cores as the distributed calls): the diagnostics see no process group
        with mock.patch.object(_dist, "active", lambda: False):
            res["shard"] = timed(calls(mlp(), shard), repeats, barrier=True)
        ddp = nn.parallel.DistributedDataParallel(mlp())
        res["DDP"] = timed(calls(ddp, shard), repeats, barrier=True)
        from torch.distributed.fsdp import fully_shard

        model = mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        res["FSDP2"] = timed(calls(model, shard), repeats, barrier=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512, help="examples in the global probe batch")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.batch % args.world:
        ap.error(f"--batch {args.batch} is not a multiple of --world {args.world}")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    x, y = probe_batch(args.batch)
    per = args.batch // args.world
    one = timed(calls(mlp(), (x, y)), args.repeats)
    own = timed(calls(mlp(), (x[:per], y[:per])), args.repeats)
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_worker, args=(args.world, free_port(), d, args.batch, args.repeats), nprocs=args.world)
        except mp.ProcessExitedException as exc:  # torch 2.13's gloo aborts a worker at exit now and then
            if "SIGABRT" not in str(exc) or not all(Path(d, f"rank{r}.json").exists() for r in range(args.world)):
                raise
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(args.world)]
    latency = max(r["collective"]["all_reduce"] for r in ranks)
    print(f"torch {torch.__version__}, gloo, {args.world} ranks, {os.cpu_count()} cores, global probe batch "
          f"{args.batch}, ms per call (median of {args.repeats}; the slowest rank); one all_reduce of 2 numbers "
          f"(a checkpoint): {latency:.2f} ms")
    print("| call | one process, global batch | one process, a rank's shard | the shard in every rank at once | "
          "DDP | FSDP2 | DDP / shard at once | FSDP2 / shard at once |\n|---|---|---|---|---|---|---|---|")
    for name in one:
        shard = max(r["shard"][name] for r in ranks)
        ddp = max(r["DDP"][name] for r in ranks)
        fsdp = max(r["FSDP2"][name] for r in ranks)
        print(f"| {name} | {one[name]:.1f} | {own[name]:.1f} | {shard:.1f} | {ddp:.1f} | {fsdp:.1f} | "
              f"{ddp / shard:.2f} | {fsdp / shard:.2f} |")


if __name__ == "__main__":
    main()
