"""Spawning gloo workers for the distributed tests, with the retries torch 2.13's gloo needs.

The rule of tests/test_distributed.py's fixture, as one function: torch 2.13's gloo aborts a worker at exit
now and then (SIGABRT after its work is done); once every worker wrote its report such a teardown abort is
not a failure. Anything else is retried on a fresh port (a chosen free port can be taken before gloo binds
it), 3 tries, and a real failure fails all three. ``timeout`` bounds each try: workers left waiting in a
collective (a deadlock) are killed and the test fails at once (not retried) instead of hanging the suite.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch import nn


def fully_shard_linears(model: nn.Sequential, **options: Any) -> nn.Module:
    """FSDP2 on each Linear layer of ``model`` and on the model itself (inside an initialised process group),
    with ``fully_shard``'s ``options`` (e.g. ``mp_policy``)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(ctx: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed workers still running after {timeout:.0f} s (a deadlock?)")


def spawn_reports(worker: Callable[..., None], world: int, make_dir: Callable[[], Path], *args: Any,
                  timeout: float = 150.0, tries: int = 3) -> tuple[Path, list[dict]]:
    """Run ``worker(rank, port, out_dir, *args)`` on ``world`` processes; each writes ``report{rank}.json`` in
    ``out_dir``. Returns the directory and the reports (rank order)."""
    for attempt in range(tries):
        out = make_dir()
        try:
            ctx = mp.start_processes(worker, args=(free_port(), str(out), *args), nprocs=world, join=False,
                                     start_method="spawn")
            _join(ctx, timeout)
            break
        except Exception as exc:  # noqa: BLE001 - ProcessRaisedException / ProcessExitedException / TimeoutError
            done = all((out / f"report{r}.json").exists() for r in range(world))
            if done and "Traceback" not in str(exc):
                print(f"a worker aborted (or hung) at teardown after writing its report: {exc!r}"[:2000])
                break
            if attempt == tries - 1 or isinstance(exc, TimeoutError):
                raise  # a deadlock is not a flaky port: no retry
            print(f"distributed workers failed, retrying on a new port: {exc!r}"[:2000])
    return out, [json.loads((out / f"report{r}.json").read_text()) for r in range(world)]
