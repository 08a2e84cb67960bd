"""A Hugging Face language model (GPT-2 from a tiny config: tied embeddings, attention, LayerNorm) trained the
way such models are (AdamW, gradient clipping) under DDP and FSDP2 on 2 gloo ranks, each on its half of every
global batch: the scheduled diagnostics (Hessian top eigenvalue, noise scale, Cockpit's gradient tests, the
landscape's line) equal one process on the global batch, and nothing fails."""

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
from _spawn import spawn_reports

import dynascope

transformers = pytest.importorskip("transformers")

WORLD = 2
STEPS = 4
GLOBAL = 8
VOCAB = 64
METRICS = ("hessian.eig", "gns.grad_sq", "gns.trace_cov", "gradtest.norm_test", "gradtest.inner_test",
           "gradtest.ortho_test", "gradtest.gsnr", "gradtest.grad_norm", "landscape.center_loss")


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager", resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: the ranks train as one process
    return transformers.GPT2LMHeadModel(cfg)


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _data() -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (GLOBAL, 12), generator=g) for _ in range(STEPS)], \
        torch.randint(0, VOCAB, (GLOBAL, 12), generator=g)


def _train(model: torch.nn.Module, run_dir: str, lo: int, hi: int) -> list[str]:
    steps, probe_ids = _data()
    probe = (probe_ids[lo:hi, :-1], probe_ids[lo:hi, 1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = [dynascope.Curvature(every=2, batch=probe, loss_fn=_loss, forward=_forward, k=1, trace=False,
                                 layers=False),
             dynascope.NoiseScale(every=2, batch=probe, loss_fn=_loss, forward=_forward, micro_batches=4),
             dynascope.GradientTests(every=2, batch=probe, loss_fn=_loss, forward=_forward, lr=1e-3, tic=False,
                                     hist2d=False),
             dynascope.Landscape(every=2, batch=probe, loss_fn=_loss, forward=_forward, dims=1, resolution=3,
                                 trajectory=False, interpolation=False)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dynascope.probe(model, opt, run_dir, every=2, scheduled=sched) as run:
            for ids in steps:
                loss = _loss(_forward(model, ids[lo:hi, :-1]), ids[lo:hi, 1:])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                run.step(loss=loss.detach())
    return [str(w.message) for w in caught if "failed" in str(w.message)]


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    report: dict = {}
    lo, hi = rank * GLOBAL // WORLD, (rank + 1) * GLOBAL // WORLD
    try:
        report["ddp"] = _train(torch.nn.parallel.DistributedDataParallel(_gpt2()), os.path.join(out, "ddp"), lo, hi)
        from torch.distributed.fsdp import fully_shard

        model = _gpt2()
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        report["fsdp"] = _train(model, os.path.join(out, "fsdp"), lo, hi)
    finally:
        Path(out, f"report{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def _values(run_dir: Path) -> dict[tuple[int, str], float]:
    df = dynascope.load_run(run_dir)._query("SELECT step, metric, value FROM scalars")
    return {(int(s), m): float(v) for s, m, v in zip(df.step, df.metric, df.value.astype(float)) if m in METRICS}


@pytest.mark.slow
def test_gpt2_diagnostics_under_ddp_and_fsdp2_equal_one_process(tmp_path_factory, tmp_path):
    """(slow: 2 processes importing transformers, ~20 s on 2 cores)"""
    out, reports = spawn_reports(_worker, WORLD, lambda: tmp_path_factory.mktemp("dist_hf"), timeout=240)
    assert all(r["ddp"] == [] and r["fsdp"] == [] for r in reports), reports
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _train(_gpt2(), str(tmp_path / "single"), 0, GLOBAL) == []
    ref = _values(tmp_path / "single")
    assert {m for _, m in ref} == set(METRICS) and {s for s, _ in ref} == {0, 2}
    for kind in ("ddp", "fsdp"):
        got = _values(out / kind)
        assert set(got) == set(ref)
        keys = sorted(ref)
        np.testing.assert_allclose([got[k] for k in keys], [ref[k] for k in keys], rtol=1e-5, err_msg=kind)
