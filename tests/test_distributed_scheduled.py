"""Scheduled diagnostics under torch.distributed measure the global batch: each of 2 gloo ranks passes its shard of
the probe batch (3 and 5 examples: uneven), and the curvature, landscape, noise scale, calibration, collapse and
plasticity rows equal one process on the 8 examples (DDP, and FSDP2 with uneven parameter shards: 7 rows as 4 +
3, 3 rows as 2 + 1). A diagnostic that fails on one rank only fails on every rank together (inside a collective
and before any), is recorded as ``diagnostic.failed`` and training finishes. Training is bit-identical with and
without dynascope on each rank."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _spawn import fully_shard_linears, spawn_reports
from torch import nn

import dynascope
from dynascope.diagnostics import _dist, lanczos
from dynascope.diagnostics.batchnorm import train_eval_gap
from dynascope.diagnostics.hessian import hessian_eigenvalues, hessian_spectrum

WORLD = 2
STEPS = 4
GLOBAL = 8
PROBE_CUT = 3  # rank 0 holds probe examples [0, 3), rank 1 [3, 8)


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    steps = [(torch.randn(GLOBAL, 5, generator=g), torch.randint(0, 3, (GLOBAL,), generator=g)) for _ in range(STEPS)]
    probe = (torch.randn(GLOBAL, 5, generator=g), torch.randint(0, 3, (GLOBAL,), generator=g))
    return steps, probe


#: probe-batch cuts per world size: uneven shards (3 + 5; 1 + 2 + 2 + 3)
CUTS = {1: [0, GLOBAL], 2: [0, PROBE_CUT, GLOBAL], 4: [0, 1, 3, 5, GLOBAL]}


def _probe_shard(rank: int, world: int = WORLD) -> slice:
    return slice(CUTS[world][rank], CUTS[world][rank + 1])


def _curvature(batch, **kw) -> dynascope.Curvature:
    return dynascope.Curvature(every=2, batch=batch, loss_fn=F.cross_entropy, **kw)


def _hutchinson(batch) -> dynascope.Curvature:
    """The trace by Hutchinson's estimator (the same seeded Rademacher vectors on every rank and in one
    process) and the per-layer sharpness."""
    return _curvature(batch, eigenvalues=False, trace=True, trace_method="hutchinson", trace_samples=6,
                      preconditioned=False, layers=True)


def _landscape(batch) -> dynascope.Landscape:
    return dynascope.Landscape(every=2, batch=batch, loss_fn=F.cross_entropy, resolution=5, span=0.5,
                               trajectory_resolution=5)


def _noise_scale(batch) -> dynascope.NoiseScale:
    """Micro-batches of 8 // 8 = 1 example: each shard (3, 5) is a multiple, so the global batch's split."""
    return dynascope.NoiseScale(every=2, batch=batch, loss_fn=F.cross_entropy, micro_batches=8)


def _gradient_tests(batch) -> list:
    """Cockpit's per-example quantities (TIC from the exact Hessian diagonal), both histograms, and alpha
    between steps 0 and 1, 2 and 3 (on the steps' own batches)."""
    return [dynascope.GradientTests(every=2, batch=batch, loss_fn=F.cross_entropy, lr=0.1),
            dynascope.Alpha(every=2, loss_fn=F.cross_entropy)]


def _ddp_diagnostics(batch) -> list:
    return [_curvature(batch, k=2, trace=True, layers=True, spectrum=True, spectrum_iter=12),
            *_forward_diagnostics(batch), _landscape(batch), _noise_scale(batch)]


def _four_rank_diagnostics(batch) -> list:
    return [_curvature(batch, k=2), dynascope.Calibration(every=2, batch=batch, n_bins=4)]


def _forward_diagnostics(batch) -> list:
    """The scheduled diagnostics that read forward passes: each rank's rows (logits, features, activations)
    combined over ranks."""
    return [dynascope.Calibration(every=2, batch=batch, n_bins=4), dynascope.Collapse(every=2, batch=batch),
            dynascope.Plasticity(every=2, batch=batch, layers=(nn.Tanh, nn.Linear))]


def _train(model: nn.Module, opt: torch.optim.Optimizer, run_dir: str | None, scheduled: list, lo: int, hi: int,
           dtype: torch.dtype = torch.float32) -> list[str]:
    """STEPS steps on examples [lo, hi) of each global batch (with dynascope when ``run_dir``); the warnings."""
    steps, _ = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if run_dir is None:
            for x, y in steps:
                loss = F.cross_entropy(model(x[lo:hi].to(dtype)), y[lo:hi])
                opt.zero_grad()
                loss.backward()
                opt.step()
        else:
            with dynascope.probe(model, opt, run_dir, every=1, sentinel=False, probes=("gradients",),
                                 scheduled=scheduled) as run:
                for x, y in steps:
                    loss = F.cross_entropy(model(x[lo:hi].to(dtype)), y[lo:hi])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    run.step(loss=loss.detach(), batch=(x[lo:hi].to(dtype), y[lo:hi]))  # (Alpha's)
    return [str(w.message) for w in caught if "failed at step" in str(w.message)]


def _local_params(model: nn.Module) -> list[list[float]]:
    out = []
    for p in model.parameters():
        t = p.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        out.append(t.reshape(-1).tolist())
    return out


def _bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(7)
    with torch.no_grad():  # running statistics away from the batches' own: a gap to measure
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    return nn.Sequential(nn.Linear(5, 7), bn, nn.Tanh(), nn.Linear(7, 3))


N_PARAMS = 5 * 7 + 7 + 7 * 3 + 3


def _spectrum_nodes(model: nn.Module, probe) -> list[float]:
    """The Lanczos nodes of one SLQ run of 24 products (its basis grows from 16 to 32 rows on the way)."""
    res = hessian_spectrum(model, F.cross_entropy, probe, n_runs=1, n_iter=24)
    return res.nodes[0].tolist()


def _gathered_and_back(model: nn.Module) -> dict:
    """Inside ``_dist.gathered`` the FSDP2 model holds whole plain parameters; on the way out (here: raising)
    the sharded DTensors come back, the very objects the optimizer holds."""
    from torch.distributed.tensor import DTensor

    before = list(model.parameters())
    inside = None
    try:
        with _dist.gathered(model):
            inside = [(type(p) is nn.Parameter, tuple(p.shape)) for p in model.parameters()]
            raise RuntimeError("planted")
    except RuntimeError:
        pass
    after = list(model.parameters())
    return {"inside": inside, "same": all(a is b for a, b in zip(before, after)) and len(before) == len(after),
            "dtensors": all(isinstance(p, DTensor) for p in after)}


def _direct_calls(model: nn.Module, probe) -> dict:
    """The public functions called directly on a model (FSDP2: sharded): the noise scale and a 1D line."""
    gns = dynascope.gradient_noise_scale(model, F.cross_entropy, probe, micro_batches=8)
    line = dynascope.loss_landscape(model, F.cross_entropy, probe, dims=1, resolution=5, span=0.5, progress=False)
    return {"b_simple": gns.b_simple, "grad_sq": gns.grad_sq, "line": line.losses.tolist()}


class FailsOnRankOne(dynascope.Scheduled):
    """Raises on rank 1 only, before any collective; rank 0 goes into a Hessian computation meanwhile."""

    def __init__(self, batch) -> None:
        super().__init__(every=2)
        self.batch = batch

    def run(self, ctx) -> None:
        if dist.get_rank() == 1:
            raise RuntimeError("planted failure on rank 1")
        self.measure(ctx)

    def measure(self, ctx) -> None:
        eig = hessian_eigenvalues(ctx.model, F.cross_entropy, self.batch, k=1)
        ctx.log("custom.eig", float(eig.eigenvalues[0]))


class LineFailsOnRankOne(FailsOnRankOne):
    """Raises on rank 1 before any collective; rank 0 goes into ``loss_landscape``, whose first collectives
    gather FSDP2's parameters."""

    def measure(self, ctx) -> None:
        line = dynascope.loss_landscape(ctx.model, F.cross_entropy, self.batch, dims=1, resolution=3, progress=False)
        ctx.log("custom.line", float(line.losses[1]))


def _worker(rank: int, port: int, out: str, world: int = WORLD) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    report: dict = {}
    per = GLOBAL // world
    lo, hi = rank * per, (rank + 1) * per  # the training shards (equal: DDP averages ranks with equal weight)
    _, (px, py) = _data()
    probe = (px[_probe_shard(rank, world)], py[_probe_shard(rank, world)])
    try:
        # DDP (SGD + momentum): top-2, trace, per-layer sharpness of the global probe batch
        ddp = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        report["ddp_warnings"] = _train(ddp, opt, os.path.join(out, "ddp", f"rank{rank}"),
                                        _ddp_diagnostics(probe) if world == 2 else _four_rank_diagnostics(probe),
                                        lo, hi)
        report["ddp_params"] = _local_params(ddp)
        if world != 2:
            return
        plain = nn.parallel.DistributedDataParallel(_mlp())
        _train(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9), None, [], lo, hi)
        report["ddp_plain_params"] = _local_params(plain)

        # FSDP2 (Adam): the call, which raised "mixed torch.Tensor and DTensor" and stopped training;
        # here every Lanczos basis is sharded by coordinates across the ranks (DDP above: the default for small
        # models, every rank the whole basis)
        lanczos.SHARD_BASIS_BYTES = 0
        m = fully_shard_linears(_mlp())
        report["fsdp_warnings"] = _train(m, torch.optim.Adam(m.parameters(), lr=0.01),
                                         os.path.join(out, "fsdp", f"rank{rank}"),
                                         [_curvature(probe, k=2, spectrum=True, spectrum_iter=12), _hutchinson(probe),
                                          *_forward_diagnostics(probe), _landscape(probe), _noise_scale(probe)],
                                         lo, hi)
        report["fsdp_params"] = _local_params(m)
        report["fsdp_shard_rows"] = [int(p.to_local().shape[0]) for p in m.parameters()]
        report["fsdp_direct"] = _direct_calls(m, probe)
        eig = hessian_eigenvalues(m, F.cross_entropy, probe, k=2, return_eigenvectors=True)
        report["fsdp_eigenvectors"] = [[v[k].reshape(-1).tolist() for k in sorted(v)] for v in eig.eigenvectors]
        # a basis that outgrows the limit on the way (16 rows whole, then 32 rows sharded)
        lanczos.SHARD_BASIS_BYTES = 16 * N_PARAMS * 8
        report["fsdp_switch"] = _spectrum_nodes(m, probe)
        lanczos.SHARD_BASIS_BYTES = 64 * 2**20
        report["gathered"] = _gathered_and_back(m)
        assert _local_params(m) == report["fsdp_params"]  # the calls leave the shards as they were
        plain = fully_shard_linears(_mlp())
        _train(plain, torch.optim.Adam(plain.parameters(), lr=0.01), None, [], lo, hi)
        report["fsdp_plain_params"] = _local_params(plain)

        # failures on rank 1 only: inside the Hessian-vector products (rank 0 is in the same collective),
        # and before any collective (rank 0 is in a Hessian computation); each runs twice (steps 0 and 2)
        def loss_fails_on_rank_one(out_: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if rank == 1:
                raise RuntimeError("planted loss failure on rank 1")
            return F.cross_entropy(out_, y)

        # Cockpit's quantities in float64 (they divide by per-coordinate variances, where float32 rounding of the
        # differently summed ranks shows at 1e-5): DDP and FSDP2
        probe64 = (probe[0].double(), probe[1])
        m = nn.parallel.DistributedDataParallel(_mlp(torch.float64))
        report["gt_ddp_warnings"] = _train(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                           os.path.join(out, "gt_ddp", f"rank{rank}"), _gradient_tests(probe64),
                                           lo, hi, torch.float64)
        m = fully_shard_linears(_mlp(torch.float64))
        report["gt_fsdp_warnings"] = _train(m, torch.optim.Adam(m.parameters(), lr=0.01),
                                            os.path.join(out, "gt_fsdp", f"rank{rank}"), _gradient_tests(probe64),
                                            lo, hi, torch.float64)

        # FSDP2 under a MixedPrecisionPolicy (bf16 compute): Calibration's forward leaves the root's parameters
        # unsharded in bf16; the diagnostics after it still gather the float32 shards
        from torch.distributed.fsdp import MixedPrecisionPolicy
        torch.manual_seed(0)  # a LayerNorm the root shards itself: its parameters stay unsharded after a forward
        m = fully_shard_linears(nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)),
                                mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        report["fsdp_mp_warnings"] = _train(m, torch.optim.Adam(m.parameters(), lr=0.01),
                                            os.path.join(out, "fsdp_mp", f"rank{rank}"),
                                            [dynascope.Calibration(every=2, batch=probe, n_bins=4), _noise_scale(probe),
                                             *_gradient_tests(probe)], lo, hi)

        # BatchNorm's train/eval gap, called directly on fresh BatchNorm models (DDP, FSDP2)
        report["bn_gap"] = {kind: list(train_eval_gap(wrap(_bn_mlp()), F.cross_entropy, probe).rows())
                            for kind, wrap in (("ddp", nn.parallel.DistributedDataParallel),
                                               ("fsdp", fully_shard_linears))}

        # FSDP2: rank 1 alone fails before the landscape gathers the parameters: rank 0, at the gather's
        # checkpoint, fails with it instead of waiting in an all-gather
        m = fully_shard_linears(_mlp())
        report["fsdp_fail_warnings"] = _train(m, torch.optim.Adam(m.parameters(), lr=0.01),
                                              os.path.join(out, "fsdp_fail", f"rank{rank}"),
                                              [LineFailsOnRankOne(probe)], lo, hi)
        report["fsdp_fail_params"] = _local_params(m)

        m = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        fails = [dynascope.Curvature(every=2, batch=probe, loss_fn=loss_fails_on_rank_one, k=1),
                 FailsOnRankOne(probe), _curvature(probe, k=1)]
        report["fail_warnings"] = _train(m, opt, os.path.join(out, "fail", f"rank{rank}"), fails, lo, hi)
        report["fail_params"] = _local_params(m)
    finally:
        Path(out, f"report{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def _worker4(rank: int, port: int, out: str) -> None:
    _worker(rank, port, out, 4)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return spawn_reports(_worker, WORLD, lambda: tmp_path_factory.mktemp("dist_sched"), timeout=150)


def _rows(run_dir: Path, prefix: str | tuple[str, ...] = "") -> dict[tuple[int, str, str], float]:
    df = dynascope.load_run(run_dir)._query("SELECT step, metric, layer, value FROM scalars")
    return {(int(s), m, la): float(v) for s, m, la, v in zip(df.step, df.metric, df.layer, df.value.astype(float))
            if m.startswith(prefix)}


def _single(tmp_path: Path, make_opt, scheduled_of_probe, prefix: str | tuple[str, ...] = "hessian.",
            dtype: torch.dtype = torch.float32) -> dict:
    """One process on the global batches and the global probe batch."""
    _, (px, py) = _data()
    m = _mlp(dtype)
    _train(m, make_opt(m), str(tmp_path), scheduled_of_probe((px.to(dtype), py)), 0, GLOBAL, dtype)
    return _rows(tmp_path, prefix)


FORWARD_METRICS = ("calibration.", "collapse.", "plasticity.", "weight.magnitude")


def _forward_rows(rows: dict) -> dict:
    return {k: v for k, v in rows.items() if k[1].startswith(FORWARD_METRICS)}


def _assert_close(ref: dict, got: dict, rtol: float) -> None:
    assert ref and set(ref) == set(got), sorted(set(ref) ^ set(got))[:10]
    bad = [(k, ref[k], got[k]) for k in sorted(ref)
           if not np.isclose(ref[k], got[k], rtol=rtol, atol=1e-12 * max(1.0, abs(ref[k])))]
    assert not bad, bad[:10]
    worst = max(abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref)
    print(f"{len(ref)} rows, {len({m for _, m, _ in ref})} metrics: max relative difference {worst:.1e}")


def test_ddp_curvature_equals_one_process_on_the_global_batch(spawned, tmp_path):
    out, reports = spawned
    ref = _single(tmp_path / "single", lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                  lambda probe: _ddp_diagnostics(probe)[:1])
    got = _rows(out / "ddp" / "rank0", "hessian.")
    assert {m for _, m, _ in ref} >= {"hessian.eig", "hessian.trace", "hessian.layer_eig", "hessian.threshold"}
    assert {s for s, _, _ in ref} == {0, 2}
    # rank 0's own shard (3 examples) gives another Hessian: the comparison can tell the global batch from it
    _, (px, py) = _data()
    shard0 = hessian_eigenvalues(_mlp(), F.cross_entropy, (px[:PROBE_CUT], py[:PROBE_CUT]), k=1).eigenvalues[0]
    assert abs(shard0 - ref[(0, "hessian.eig", "1")]) > 1e-3 * abs(ref[(0, "hessian.eig", "1")])
    _assert_close(ref, got, rtol=1e-5)
    # the spectral density's Lanczos nodes and weights (SLQ from the same Rademacher start vectors)
    for step in (0, 2):
        want, _ = dynascope.load_run(tmp_path / "single").load_artifact("hessian.spectrum", step=step)
        have, _ = dynascope.load_run(out / "ddp" / "rank0").load_artifact("hessian.spectrum", step=step)
        np.testing.assert_allclose(have["nodes"], want["nodes"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(have["weights"], want["weights"], rtol=1e-4, atol=1e-7)
    assert not (out / "ddp" / "rank1").exists()
    assert reports[0]["ddp_warnings"] == reports[1]["ddp_warnings"] == []


#: each spawned run's optimizer, rebuilt for the one-process reference
OPTIMIZERS = {"ddp": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
              "fsdp": lambda m: torch.optim.Adam(m.parameters(), lr=0.01)}


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_noise_scale_equals_one_process_on_the_global_batch(spawned, tmp_path, kind):
    out, _ = spawned
    ref = _single(tmp_path, OPTIMIZERS[kind], lambda p: [_noise_scale(p)], prefix="gns.")
    assert {m for _, m, _ in ref} >= {"gns.grad_sq", "gns.trace_cov", "gns.simple_stderr", "gns.batch_size"}
    assert ref[(0, "gns.batch_size", "")] == GLOBAL
    _assert_close(ref, _rows(out / kind / "rank0", "gns."), rtol=1e-6)


def test_gathered_swaps_whole_plain_parameters_in_and_the_shards_back_out(spawned):
    _, reports = spawned
    for r in reports:
        assert r["gathered"]["inside"] == [[True, [7, 5]], [True, [7]], [True, [3, 7]], [True, [3]]]
        assert r["gathered"]["same"] and r["gathered"]["dtensors"]


def test_fsdp2_eigenvectors_from_a_basis_sharded_across_ranks_equal_one_process(spawned):
    """``hessian_eigenvalues(return_eigenvectors=True)`` with each rank holding half the Lanczos basis: the
    eigenvectors (rebuilt from the ranks' parts) equal one process's up to sign."""
    _, reports = spawned
    m = _mlp()
    _train(m, OPTIMIZERS["fsdp"](m), None, [], 0, GLOBAL)
    eig = hessian_eigenvalues(m, F.cross_entropy, _data()[1], k=2, return_eigenvectors=True)
    want = [np.concatenate([v[k].reshape(-1).numpy() for k in sorted(v)]) for v in eig.eigenvectors]
    for r in reports:
        got = [np.concatenate([np.asarray(t) for t in v]) for v in r["fsdp_eigenvectors"]]
        for a, b in zip(got, want):
            np.testing.assert_allclose(a * np.sign(a @ b), b, rtol=1e-4, atol=1e-5)


def test_a_lanczos_basis_sharded_when_it_outgrows_the_limit_gives_one_process_nodes(spawned):
    _, reports = spawned
    m = _mlp()
    assert sum(p.numel() for p in m.parameters()) == N_PARAMS
    _train(m, OPTIMIZERS["fsdp"](m), None, [], 0, GLOBAL)
    want = _spectrum_nodes(m, _data()[1])
    for r in reports:
        np.testing.assert_allclose(r["fsdp_switch"], want, rtol=1e-6, atol=1e-8)


def test_fsdp2_direct_calls_of_noise_scale_and_landscape_equal_one_process(spawned):
    """``gradient_noise_scale`` and ``loss_landscape`` called on the sharded model after training: one process's
    values on the global probe batch at the trained weights (the one-process run trains the same steps)."""
    _, reports = spawned
    m = _mlp()
    _train(m, OPTIMIZERS["fsdp"](m), None, [], 0, GLOBAL)
    want = _direct_calls(m, _data()[1])
    for r in reports:
        got = r["fsdp_direct"]
        np.testing.assert_allclose([got["b_simple"], got["grad_sq"]], [want["b_simple"], want["grad_sq"]], rtol=1e-5)
        np.testing.assert_allclose(got["line"], want["line"], rtol=1e-6)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_gradient_tests_and_alpha_equal_one_process_on_the_global_batch(spawned, tmp_path, kind):
    """GSNR, the norm, inner-product and orthogonality tests, CABS, EB, TIC and both histograms of the 8
    examples, from ranks holding 3 and 5 of them: the per-example rows gathered, the dot products taken with
    the global mean gradient, the second moments, Hessian diagonals and counts combined; alpha from the steps'
    own batches (4 + 4 examples), the per-example losses and projections gathered."""
    out, reports = spawned
    assert all(r[f"gt_{kind}_warnings"] == [] for r in reports)
    ref = _single(tmp_path, OPTIMIZERS[kind], _gradient_tests, prefix=("gradtest.", "step.alpha"),
                  dtype=torch.float64)
    assert {m for _, m, _ in ref} >= {"gradtest.gsnr", "gradtest.norm_test", "gradtest.inner_test",
                                      "gradtest.ortho_test", "gradtest.cabs", "gradtest.eb", "gradtest.tic_diag",
                                      "gradtest.tic_trace", "step.alpha", "step.alpha_t"}
    assert ref[(0, "gradtest.batch_size", "")] == GLOBAL and {s for s, m, _ in ref if m == "step.alpha"} == {0, 2}
    _assert_close(ref, _rows(out / f"gt_{kind}" / "rank0", ("gradtest.", "step.alpha")), rtol=1e-6)
    single, ranked = dynascope.load_run(tmp_path), dynascope.load_run(out / f"gt_{kind}" / "rank0")
    for name in ("gradtest.hist1d", "gradtest.hist2d"):
        for step in (0, 2):
            want, _ = single.load_artifact(name, step=step)
            have, _ = ranked.load_artifact(name, step=step)
            np.testing.assert_array_equal(have["counts"], want["counts"])


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_landscape_equals_one_process_on_the_global_batch(spawned, tmp_path, kind):
    """The surface, the trajectory plane (from the weights kept at every step: FSDP2's whole parameters) and
    the loss at the centre, rank 0's run against one process."""
    out, _ = spawned
    _single(tmp_path, OPTIMIZERS[kind], lambda p: [_landscape(p)])
    single, ranked = dynascope.load_run(tmp_path), dynascope.load_run(out / kind / "rank0")
    _assert_close(_rows(tmp_path, "landscape."), _rows(out / kind / "rank0", "landscape."), rtol=1e-6)
    names = set(single.artifacts()["name"])
    assert {"landscape.surface", "landscape.trajectory"} <= names, names
    for name in names:
        for step in single.artifacts(name)["step"]:
            want, _ = single.load_artifact(name, step=int(step))
            have, _ = ranked.load_artifact(name, step=int(step))
            assert set(want) == set(have)
            for key in want:
                if want[key].dtype.kind == "f":
                    np.testing.assert_allclose(have[key], want[key], rtol=1e-6, atol=1e-9, err_msg=f"{name} {key}")


def _check_forward_diagnostics(run_dir: Path, tmp_path: Path, make_opt) -> None:
    ref = _forward_rows(_single(tmp_path, make_opt, _forward_diagnostics, prefix=""))
    got = _forward_rows(_rows(run_dir))
    metrics = {m for _, m, _ in ref}
    assert {"calibration.ece", "calibration.nll", "collapse.nc1", "plasticity.erank", "plasticity.dormant",
            "weight.magnitude"} <= metrics, metrics
    assert {la for _, m, la in ref if m == "plasticity.erank"} == {"0", "1", "2"}  # the module's own names
    _assert_close(ref, got, rtol=1e-6)
    # the reliability diagram: the global batch's 8 examples in its bins
    art, _ = dynascope.load_run(run_dir).load_artifact("calibration.reliability", step=2)
    assert int(np.sum(art["count"])) == GLOBAL


def test_ddp_forward_diagnostics_equal_one_process_on_the_global_batch(spawned, tmp_path):
    out, _ = spawned
    _check_forward_diagnostics(out / "ddp" / "rank0", tmp_path / "single",
                               lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))


def test_fsdp2_forward_diagnostics_equal_one_process_on_the_global_batch(spawned, tmp_path):
    out, _ = spawned
    _check_forward_diagnostics(out / "fsdp" / "rank0", tmp_path / "single",
                               lambda m: torch.optim.Adam(m.parameters(), lr=0.01))


def test_fsdp2_curvature_records_the_global_batch_instead_of_stopping_training(spawned, tmp_path):
    out, reports = spawned
    assert reports[0]["fsdp_shard_rows"] == [4, 4, 2, 2] and reports[1]["fsdp_shard_rows"] == [3, 3, 1, 1]
    ref = _single(tmp_path / "single", lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
                  lambda probe: [_curvature(probe, k=2, spectrum=True, spectrum_iter=12), _hutchinson(probe)])
    got = _rows(out / "fsdp" / "rank0", "hessian.")
    for step in (0, 2):  # the spectral density from a basis sharded across the ranks
        want, _ = dynascope.load_run(tmp_path / "single").load_artifact("hessian.spectrum", step=step)
        have, _ = dynascope.load_run(out / "fsdp" / "rank0").load_artifact("hessian.spectrum", step=step)
        np.testing.assert_allclose(have["nodes"], want["nodes"], rtol=1e-5, atol=1e-7)
    assert {la for _, m, la in ref if m == "hessian.trace_estimator"} == {"hutchinson"}
    # Adam: the preconditioned sharpness too, from the optimizer's sharded second moments (from step 2 on)
    assert {m for _, m, _ in ref} >= {"hessian.eig", "hessian.precond_eig", "hessian.trace", "hessian.layer_eig"}
    _assert_close(ref, got, rtol=1e-5)
    # every diagnostic of the FSDP2 run (landscape and noise scale included) ran: nothing failed, no warning
    assert all(r["fsdp_warnings"] == [] for r in reports), [r["fsdp_warnings"] for r in reports]
    assert not any(m == "diagnostic.failed" for (_, m, _) in _rows(out / "fsdp" / "rank0"))


@pytest.mark.slow
def test_four_ranks_ddp_curvature_and_calibration_equal_one_process(tmp_path_factory, tmp_path):
    """4 gloo processes, probe shards of 1, 2, 2 and 3 examples (slow: 4 processes start on 2 cores, ~40 s)."""
    out, reports = spawn_reports(_worker4, 4, lambda: tmp_path_factory.mktemp("dist_sched4"), timeout=150)
    want = _single(tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                   _four_rank_diagnostics, prefix="")
    got = _rows(out / "ddp" / "rank0")
    keep = ("hessian.", "calibration.")
    assert {m for _, m, _ in want} >= {"hessian.eig", "calibration.ece"}
    _assert_close({k: v for k, v in want.items() if k[1].startswith(keep)},
                  {k: v for k, v in got.items() if k[1].startswith(keep)}, rtol=1e-5)
    assert all(r["ddp_warnings"] == [] for r in reports)


def test_training_is_bit_identical_with_and_without_dynascope_on_each_rank(spawned):
    _, reports = spawned
    for r in reports:
        assert r["ddp_params"] == r["ddp_plain_params"]
        assert r["fsdp_params"] == r["fsdp_plain_params"]
        assert r["fail_params"] == r["ddp_plain_params"]  # failing diagnostics change nothing either


def test_a_diagnostic_failing_on_one_rank_fails_on_every_rank_and_training_goes_on(spawned, tmp_path):
    out, reports = spawned
    for r in reports:  # each failing diagnostic, at steps 0 and 2, warned on both ranks
        assert len(r["fail_warnings"]) == 4, r["fail_warnings"]
        assert sum("Curvature failed" in w for w in r["fail_warnings"]) == 2
        assert sum("FailsOnRankOne failed" in w for w in r["fail_warnings"]) == 2
    assert any("planted loss failure on rank 1" in w for w in reports[1]["fail_warnings"])
    assert any("failed on 1 of 2 ranks" in w for w in reports[0]["fail_warnings"])
    rows = _rows(out / "fail" / "rank0")
    failed = {(s, la) for (s, m, la) in rows if m == "diagnostic.failed"}
    assert failed == {(0, "Curvature"), (2, "Curvature"), (0, "FailsOnRankOne"), (2, "FailsOnRankOne")}
    assert not any(m == "custom.eig" for _, m, _ in rows)
    # the healthy Curvature after the failing ones still ran on every due step, on the global batch
    ref = _single(tmp_path / "single", lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                  lambda probe: [_curvature(probe, k=1)])
    _assert_close({k: v for k, v in ref.items() if k[1] == "hessian.eig"},
                  {k: v for (k, v) in rows.items() if k[1] == "hessian.eig"}, rtol=1e-5)


def test_fsdp2_a_rank_failing_before_the_parameter_gather_fails_every_rank(spawned):
    out, reports = spawned
    for r in reports:
        assert len(r["fsdp_fail_warnings"]) == 2, r["fsdp_fail_warnings"]
        assert all("LineFailsOnRankOne failed" in w for w in r["fsdp_fail_warnings"])
        assert r["fsdp_fail_params"] == r["fsdp_plain_params"]  # training went on, unchanged
    assert "planted failure on rank 1" in reports[1]["fsdp_fail_warnings"][0]
    assert "failed on 1 of 2 ranks" in reports[0]["fsdp_fail_warnings"][0]
    rows = _rows(out / "fsdp_fail" / "rank0")
    assert {(s, la) for (s, m, la) in rows if m == "diagnostic.failed"} == {(0, "LineFailsOnRankOne"),
                                                                            (2, "LineFailsOnRankOne")}
    assert not any(m == "custom.line" for _, m, _ in rows)


def test_fsdp2_mixed_precision_diagnostics_run_after_a_forward_only_diagnostic(spawned):
    out, reports = spawned
    assert all(r["fsdp_mp_warnings"] == [] for r in reports), [r["fsdp_mp_warnings"] for r in reports]
    metrics = dynascope.load_run(out / "fsdp_mp" / "rank0").metrics()
    assert {"calibration.ece", "gns.grad_sq", "gradtest.norm_test", "step.alpha"} <= set(metrics)
    assert "diagnostic.failed" not in metrics


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_bn_train_eval_gap_is_the_global_batch_s_with_each_rank_s_own_statistics(spawned, kind):
    """The eval-mode loss of the 8 probe examples (one process's), the batch-statistics loss as DDP trains
    without SyncBatchNorm: each rank's shard (3, 5 examples) normalised with its own statistics, the losses
    averaged over all 8 examples."""
    _, reports = spawned
    _, (px, py) = _data()
    whole = train_eval_gap(_bn_mlp(), F.cross_entropy, (px, py))
    shards = [train_eval_gap(_bn_mlp(), F.cross_entropy, (px[_probe_shard(r)], py[_probe_shard(r)]))
              for r in range(WORLD)]
    train = sum(g.train_loss * len(px[_probe_shard(r)]) for r, g in enumerate(shards)) / GLOBAL
    assert abs(train - whole.train_loss) > 1e-4  # per-shard statistics are not the global batch's
    for r in reports:
        got = {m: v for m, v, _ in r["bn_gap"][kind]}
        np.testing.assert_allclose([got["bn.eval_loss"], got["bn.train_loss"], got["bn.train_eval_gap"]],
                                   [whole.eval_loss, train, whole.eval_loss - train], rtol=1e-6)


def test_one_process_agreement_is_the_plain_call():
    """Without a process group the checkpoints cost nothing and raise the local error as it is."""
    assert not _dist.active()
    _dist.checkpoint()
    with pytest.raises(ValueError, match="local"):
        _dist.checkpoint(ValueError("local"))
    assert _dist.reduce_sum(lambda: torch.ones(2)).tolist() == [1.0, 1.0]
    with _dist.Agreement() as a:
        pass
    err = KeyError("x")
    assert a.finish(None) is None and a.finish(err) is err
    x, y = torch.ones(3, 2), torch.arange(3)
    gx, gy = _dist.gather_rows(x, y)
    assert gx is x and gy is y
    m = _mlp()
    with _dist.gathered(m) as same:  # plain parameters: nothing to gather or swap
        assert same is m and [p is q for p, q in zip(m.parameters(), _mlp().parameters())] == [False] * 4
    assert _dist.unwrap(m) is m
