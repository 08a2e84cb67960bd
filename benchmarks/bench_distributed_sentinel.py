"""Bytes the sentinel's per-step collective moves on each rank against the world size (gloo processes, CPU).

Each rank trains the same small model on its shard with the sentinel on (DDP and FSDP2), recording and
flushing only at the first step; ``torch.distributed.all_reduce`` is wrapped to count the calls and payload
bytes each rank passes to collectives during the steps after it, so what is counted is the sentinel's row alone
(one all_reduce of ``2 + 2 x modules`` float32 numbers per step), measured, not computed from the formula. With
an all-reduce the payload per rank is the row whatever the world size; the bytes each rank sends and receives
on the wire depend on the backend's algorithm (ring: about 2 x payload). The step times (sentinel on, then off,
the same session otherwise) are rough: processes share the machine's cores.

Usage::

    python benchmarks/bench_distributed_sentinel.py --worlds 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_distributed_bytes import free_port, small_model  # noqa: E402

import dynascope  # noqa: E402


def _worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    counted = {"calls": 0, "bytes": 0, "on": False}
    plain = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
        if counted["on"]:
            counted["calls"] += 1
            counted["bytes"] += tensor.numel() * tensor.element_size()
        return plain(tensor, *args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    report: dict = {}
    try:
        # lag: None = the default (0 on the CPU: the row is waited for at its own step), 1: read a step late
        for kind, sentinel, lag in (("ddp", False, None), ("ddp", True, None), ("ddp", True, 1),
                                    ("fsdp2", False, None), ("fsdp2", True, None), ("fsdp2", True, 1)):
            if kind == "ddp":
                model = nn.parallel.DistributedDataParallel(small_model())
            else:
                from torch.distributed.fsdp import fully_shard

                model = small_model()
                for layer in model:
                    if any(True for _ in layer.parameters()):
                        fully_shard(layer)
                fully_shard(model)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(rank)
            with dynascope.probe(model, opt, os.path.join(out, f"{kind}{sentinel}{lag}", f"rank{rank}"), every=10 ** 9,
                                 flush_every=10 ** 9, sentinel=sentinel) as run:
                if lag is not None and run.sentinel is not None:
                    run.sentinel.lag = lag
                t0 = 0.0
                for step in range(steps + 1):
                    if step == 1:  # after the recording (and flushing) first step: the sentinel alone
                        counted.update(calls=0, bytes=0, on=True)
                        t0 = time.perf_counter()
                    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    run.step(loss=loss.detach())
                counted["on"] = False
                elapsed = time.perf_counter() - t0
                row = run.sentinel.width if run.sentinel is not None else 0
            # DDP's own gradient all-reduce goes through its reducer (not dist.all_reduce): not counted
            if sentinel and lag is not None:
                report[f"{kind}_lag{lag}"] = 1e3 * elapsed / steps
            elif sentinel:
                report[kind] = {"calls": counted["calls"] / steps, "bytes": counted["bytes"] / steps, "row": row,
                                "step_ms": 1e3 * elapsed / steps}
            else:
                report[f"{kind}_off"] = 1e3 * elapsed / steps
        Path(out, f"r{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=20, help="steps counted (after the first)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}; gloo on the CPU; {args.steps} steps counted per run")
    print(f"{'world':>6s} {'run':>6s} {'row (numbers)':>14s} {'all_reduce calls/step':>22s} "
          f"{'payload bytes/rank/step':>24s} {'ms/step, sentinel on / off':>27s} {'on, read a step late':>21s}")
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as out:
            for attempt in range(3):  # torch 2.13's gloo can abort a worker at teardown: retry
                try:
                    mp.spawn(_worker, args=(world, free_port(), out, args.steps), nprocs=world, join=True)
                    break
                except Exception as exc:  # noqa: BLE001
                    if all(Path(out, f"r{r}.json").exists() for r in range(world)):
                        break
                    if attempt == 2:
                        raise
                    print(f"retrying world {world}: {exc!r}"[:300])
            got = [json.loads(Path(out, f"r{r}.json").read_text()) for r in range(world)]
        for kind in ("ddp", "fsdp2"):
            r = got[0][kind]
            assert all(g[kind]["bytes"] == r["bytes"] for g in got), got
            off = got[0][f"{kind}_off"]
            print(f"{world:6d} {kind:>6s} {r['row']:14d} {r['calls']:22.2f} {r['bytes']:24,.0f} "
                  f"{r['step_ms']:14.1f} / {off:.1f} {got[0][f'{kind}_lag1']:21.1f}")


if __name__ == "__main__":
    main()
