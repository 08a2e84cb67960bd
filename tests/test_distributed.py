"""Under torch.distributed the recorded values are those of the global batch
and model: 2 gloo processes on the CPU against one process on the same global
batch (DDP, FSDP2, unequal per-rank batches), only rank 0 writes, ranks that
record different layouts fail together with a clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _spawn import free_port
from torch import nn

import dynascope
import dynascope.capture.distributed
from dynascope.capture.distributed import (
    LayoutMismatchError,
    RankReducer,
    chan_merge,
    shifted_moments,
    unshifted_moments,
)

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    # the conv output (4 x 16 x 8 x 8 per rank) is large enough for the CPU shifted-sum path of the probe
    return nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 8 * 8, 7),
                         nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 2, 8, 8, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
            for _ in range(STEPS)]


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


class AllKinds(dynascope.Probe):
    """A custom probe with one statistic of every reduction kind, on the last layer's output."""

    name = "all_kinds"

    def setup(self, ctx: dynascope.ProbeContext) -> None:
        super().setup(ctx)
        self._out: list[torch.Tensor] = []
        last = [m for m in ctx.model.modules() if isinstance(m, nn.Linear)][-1]
        self._handle = last.register_forward_hook(lambda m, i, o: self._out.append(o.detach()))

    def collect(self, step: int) -> dynascope.Collected | None:
        if not self._out:
            return None
        x = torch.cat(self._out).double()
        self._out.clear()
        n = torch.full((x.shape[1],), float(x.shape[0]), dtype=torch.float64)
        moments = torch.stack([n, x.mean(0), ((x - x.mean(0)) ** 2).sum(0)], dim=1)
        stats = {"s": dynascope.Stat("sum", x.sum()[None]), "hi": dynascope.Stat("max", x.max()[None]),
                 "lo": dynascope.Stat("min", x.min()[None]), "m": dynascope.Stat("moments", moments),
                 "r": dynascope.Stat("replicated", torch.tensor([float(x.shape[1])], dtype=torch.float64))}
        return dynascope.Collected([("custom.sum", ""), ("custom.max", ""), ("custom.min", ""),
                                    ("custom.var", "col0"), ("custom.width", "")], stats=stats, finish=_custom_finish)

    def close(self) -> None:
        self._handle.remove()


def _custom_finish(r):
    m = r["m"]
    return torch.cat([r["s"], r["hi"], r["lo"], (m[0, 2] / m[0, 0])[None], r["r"]])


FINISHED: list[str] = []
CLIP = 0.05  # the FSDP2 run clips its gradients to this norm


def _spy_finish(module) -> None:
    """Record the first metric of every Collected that goes through checked_finish in ``module``."""
    real = module.checked_finish

    def spy(c, reduced):
        FINISHED.append(c.keys[0][0])
        return real(c, reduced)

    module.checked_finish = spy


def _clipped(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the FSDP2 run clips (all but the last bias, which it keeps out of FSDP)."""
    last = list(model.modules())[-1]
    return [p for p in model.parameters() if p is not last.bias]


def _train(model: nn.Module, opt_kind: str, run_dir: str, lo: int = 0, hi: int = GLOBAL_BATCH,
           after_backward=None, clip: float | None = None) -> dict:
    opt = _optimizer(opt_kind, model)
    FINISHED.clear()
    # sentinel=False: the sentinel is off under torch.distributed, so the one-process reference leaves it out too
    with dynascope.probe(model, opt, run_dir, every=1, flush_every=2, all_params=True, sentinel=False,
                         probes=("activations", "gradients", "updates", "spectral", "distance", AllKinds())) as run:
        for x, y in _data():
            loss = ((model(x[lo:hi]) - y[lo:hi]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            if after_backward is not None:
                after_backward()
            if clip is not None:  # the loop clips (under FSDP2 clip_grad_norm_'s norm is a DTensor)
                torch.nn.utils.clip_grad_norm_(_clipped(model), clip)
            opt.step()
            run.step(loss=loss.detach())
        counts = {"collectives": run.reducer.collectives if run.reducer else 0}
    counts["collectives_after_close"] = run.reducer.collectives if run.reducer else 0
    counts["bytes_per_flush"] = run.reducer.bytes_per_flush if run.reducer else 0
    counts["finished"] = sorted(set(FINISHED))
    return counts


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    _spy_finish(dynascope.capture.distributed)
    report: dict = {}
    per = GLOBAL_BATCH // WORLD
    try:
        # DDP: gradients averaged by DDP (replicated, taken once), activations merged
        ddp = nn.parallel.DistributedDataParallel(_model())
        report["ddp"] = _train(ddp, "sgd", os.path.join(out, "ddp", f"rank{rank}"), rank * per, (rank + 1) * per)

        # FSDP2: parameters and gradients sharded on dim 0 (uneven shards: 7 and 3 rows); the last
        # bias is left out of FSDP and averaged by hand, so it is replicated: it must count once
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            report["fsdp"] = "fully_shard not available"
        else:
            m = _model()
            for layer in list(m)[:-1]:
                if isinstance(layer, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                    fully_shard(layer)
            bias = m[-1].bias
            fully_shard(m, ignored_params={bias})

            def average_bias_grad() -> None:
                dist.all_reduce(bias.grad)
                bias.grad /= WORLD

            report["fsdp"] = _train(m, "adam", os.path.join(out, "fsdp", f"rank{rank}"), rank * per,
                                    (rank + 1) * per, after_backward=average_bias_grad, clip=CLIP)
            report["fsdp_bias_sharded"] = dynascope.capture.distributed.is_sharded(bias)

        # unequal batches (3 and 5 examples): activation moments still merge exactly
        m = _model()
        lo, hi = (0, 3) if rank == 0 else (3, GLOBAL_BATCH)
        with dynascope.probe(m, None, os.path.join(out, "unequal", f"rank{rank}"), every=1,
                             probes=("activations",)) as run:
            for x, _ in _data()[:2]:
                m(x[lo:hi])
                run.step()

        # ranks that buffer different scalars fail together at the flush instead of hanging
        m = _model()
        try:
            with dynascope.probe(m, None, os.path.join(out, "mismatch", f"rank{rank}"), every=1,
                                 probes=("activations",)) as run:
                m(_data()[0][0][:2])
                run.step(loss=torch.tensor(1.0), **({"extra": torch.tensor(2.0)} if rank == 1 else {}))
            report["mismatch"] = "no error"
        except LayoutMismatchError as exc:
            report["mismatch"] = str(exc)
    finally:
        Path(out, f"report{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    # the port is free when chosen but another process can take it before gloo binds it: one retry on a new
    # port (a real failure fails twice, and the second attempt's error is raised)
    # torch 2.13's gloo aborts a worker at exit now and then (SIGABRT after its work is done): once every
    # worker wrote its report, such a teardown abort is not a failure; anything else is retried on a fresh
    # port (a chosen free port can be taken before gloo binds it), 3 tries, and a real failure fails all three
    for attempt in range(3):
        out = tmp_path_factory.mktemp("dist")
        try:
            mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
            break
        except Exception as exc:  # noqa: BLE001 - torch raises ProcessRaisedException / ProcessExitedException
            if all((out / f"report{r}.json").exists() for r in range(WORLD)) and "Traceback" not in str(exc):
                print(f"a worker aborted at teardown after writing its report: {exc!r}"[:2000])
                break
            if attempt == 2:
                raise
            print(f"distributed workers failed, retrying on a new port: {exc!r}"[:2000])
    reports = [json.loads((out / f"report{r}.json").read_text()) for r in range(WORLD)]
    return out, reports


def _rows(run_dir: Path) -> dict[tuple[int, str, str], float]:
    df = dynascope.load_run(run_dir)._query("SELECT step, metric, layer, value FROM scalars")
    return {(int(s), m, la): float(v) for s, m, la, v in zip(df.step, df.metric, df.layer, df.value.astype(float))}


def _assert_same(ref: dict, got: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(ref) == set(got), (sorted(set(ref) ^ set(got)))[:10]
    keys = sorted(ref)
    a = np.array([ref[k] for k in keys])
    b = np.array([got[k] for k in keys])
    close = np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    bad = [(k, ref[k], got[k]) for k, ok in zip(keys, close) if not ok]
    assert not bad, bad[:10]


def test_ddp_run_equals_global_batch_on_one_process(spawned, tmp_path):
    out, reports = spawned
    _train(_model(), "sgd", str(tmp_path / "single"))
    ref = _rows(tmp_path / "single")
    got = _rows(out / "ddp" / "rank0")
    metrics = {m for _, m, _ in ref}
    assert {"act.channel_var", "act.zero_frac", "grad.norm", "grad.global_norm", "grad.weight_cos_rowmax",
            "weight.norm", "update.angle", "update.angle_row", "lr.effective", "loss"} <= metrics
    _assert_same(ref, got)
    assert {"custom.sum", "custom.max", "custom.min", "custom.var", "custom.width"} <= metrics
    assert not (out / "ddp" / "rank1").exists(), "only rank 0 writes"
    # 2 flushes (after 2 recording steps, at close), each: a layout check, the shifts of the moments, one
    # all_reduce of the sums and one of the maxima
    assert reports[0]["ddp"]["collectives"] == 4 and reports[0]["ddp"]["collectives_after_close"] == 8


def test_one_process_and_ranks_go_through_the_same_finish(spawned, tmp_path, monkeypatch):
    """Every built-in probe and a custom one turn statistics into values through their one finish(),
    in one process (the local statistics) and on 2 ranks (the reduced statistics)."""
    out, reports = spawned
    import dynascope.probes.base as base

    FINISHED.clear()
    real = base.checked_finish
    monkeypatch.setattr(base, "checked_finish", lambda c, r: FINISHED.append(c.keys[0][0]) or real(c, r))
    _train(_model(), "sgd", str(tmp_path / "single"))
    want = {"act.mean", "grad.norm", "weight.norm", "weight.distance_init", "custom.sum"}
    assert set(FINISHED) == want
    assert set(reports[0]["ddp"]["finished"]) == want and set(reports[1]["ddp"]["finished"]) == want
    # the payload a rank moves per flush is its own statistics, the same on every rank (not world x payload)
    assert reports[0]["ddp"]["bytes_per_flush"] == reports[1]["ddp"]["bytes_per_flush"] > 0


def test_fsdp2_sharded_run_equals_global_batch_on_one_process(spawned, tmp_path):
    out, reports = spawned
    if isinstance(reports[0]["fsdp"], str):
        pytest.skip(reports[0]["fsdp"])
    _train(_model(), "adam", str(tmp_path / "single"), clip=CLIP)
    ref = _rows(tmp_path / "single")
    clip = [v for (s, m, la), v in ref.items() if m == "grad.clip_coef"]
    assert clip and min(clip) < 1.0  # the clipping clipped (the gradients read before it)
    assert reports[0]["fsdp_bias_sharded"] is False  # the replicated one counts once
    _assert_same(ref, _rows(out / "fsdp" / "rank0"))
    assert not (out / "fsdp" / "rank1").exists()
    assert reports[0]["fsdp"]["collectives_after_close"] == 8


def test_activation_moments_merge_exactly_with_unequal_batches(spawned, tmp_path):
    out, _ = spawned
    m = _model()
    with dynascope.probe(m, None, tmp_path / "single", every=1, probes=("activations",), sentinel=False) as run:
        for x, _ in _data()[:2]:
            m(x)
            run.step()
    _assert_same(_rows(tmp_path / "single"), _rows(out / "unequal" / "rank0"))


def test_ranks_with_different_layouts_fail_together(spawned):
    _, reports = spawned
    for r in reports:
        assert "ranks recorded different statistics" in r["mismatch"]


def test_chan_merge_matches_pooled_moments():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 10 for n in (1, 4, 7)]
    stats = torch.stack([torch.stack([torch.full((5,), float(p.shape[0]), dtype=torch.float64), p.mean(0),
                                      ((p - p.mean(0)) ** 2).sum(0)], dim=1) for p in parts])
    merged = chan_merge(stats)
    pooled = torch.cat(parts)
    torch.testing.assert_close(merged[:, 0], torch.full((5,), 12.0, dtype=torch.float64))
    torch.testing.assert_close(merged[:, 1], pooled.mean(0))
    torch.testing.assert_close(merged[:, 2], ((pooled - pooled.mean(0)) ** 2).sum(0))
    # a rank that saw nothing (n = 0) changes nothing
    empty = torch.zeros(1, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(chan_merge(torch.cat([stats, empty])), merged)


def test_single_process_needs_no_reducer(tmp_path):
    with pytest.raises(RuntimeError, match="process group"):
        RankReducer()
    m = _model()
    with dynascope.probe(m, None, tmp_path / "r", every=1) as run:
        assert run.reducer is None


def test_shifted_moments_sum_to_the_pooled_moments_without_cancellation():
    """The all-reduce form of Chan's merge: rows shifted by a common K add up; at |mean| / std = 1e6 the
    merged variance keeps 1e-6 relative accuracy (raw sums of squares would lose every digit)."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 4, generator=g, dtype=torch.float64) * 1e-3 + 1e3 for n in (3, 5, 8)]
    stats = torch.stack([torch.stack([torch.full((4,), float(p.shape[0]), dtype=torch.float64), p.mean(0),
                                      ((p - p.mean(0)) ** 2).sum(0)], dim=1) for p in parts])
    shift = stats[0, :, 1].clone()
    merged = unshifted_moments(sum(shifted_moments(s, shift) for s in stats), shift)
    torch.testing.assert_close(merged, chan_merge(stats), rtol=1e-6, atol=0)
    pooled = torch.cat(parts)
    torch.testing.assert_close(merged[:, 2], ((pooled - pooled.mean(0)) ** 2).sum(0), rtol=1e-6, atol=0)
