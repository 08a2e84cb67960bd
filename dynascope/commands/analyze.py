"""``dynascope analyze``: run diagnostics over saved checkpoints into a run directory.

::

    dynascope analyze CKPT_DIR_OR_FILES... --model pkg.module:factory
        [--data pkg.module:factory] [--loss cross_entropy|mse|pkg.module:fn]
        [--hessian] [--trace] [--landscape] [--interpolate] [--plasticity] [--scores el2n grand]
        -o RUN_DIR [--report report.html] [--trust-checkpoint] [--strict]

Writes the same run format as a live probe (step = the checkpoint's step), so
every report works on it. Data-free diagnostics always run (``weight.norm``,
``weight.magnitude``, ``weight.stable_rank``, ``weight.alpha``,
``weight.sigma_max``, ``weight.angle_prev``, artifact ``weight.spectrum``);
with ``--data``: ``loss`` (and ``accuracy`` for cross-entropy), and the
optional curvature, landscape and plasticity diagnostics. An interrupted
analysis resumes: checkpoints already recorded (same path, size and mtime,
mark ``checkpoint``) are skipped. See docs/analyze.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import pkgutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError, describe, one_line
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    NotACheckpointError,
    find_checkpoints,
    load_checkpoint,
    match_state_dict,
)

__all__ = ["add_arguments", "run", "analyze", "AnalyzeOptions", "import_object"]

CACHE_BYTES = 512 * 2**20  # keep loaded checkpoints in memory between the step scan and the analysis below this


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT_DIR_OR_FILES",
                        help="checkpoint files, or directories of them (.pt .pth .bin .ckpt .safetensors, "
                             "Hugging Face model folders)")
    parser.add_argument("--model", required=True, metavar="pkg.module:factory",
                        help="callable returning the nn.Module the checkpoints belong to (also path/file.py:factory)")
    parser.add_argument("--data", metavar="pkg.module:factory",
                        help="callable returning an evaluation batch: an (inputs, targets) pair or an iterable "
                             "of pairs")
    parser.add_argument("--loss", default="cross_entropy", metavar="cross_entropy|mse|pkg.module:fn",
                        help="loss_fn(outputs, targets) -> scalar (default cross_entropy: of a tensor output; "
                             "a model output's .loss when it has one; a causal LM's next-token loss on the "
                             "input ids)")
    parser.add_argument("--hessian", action="store_true", help="top Hessian eigenvalues (needs --data)")
    parser.add_argument("--hessian-k", type=int, default=1, metavar="K", help="how many top eigenvalues (default 1)")
    parser.add_argument("--trace", action="store_true", help="Hutchinson estimate of the Hessian trace (needs --data)")
    parser.add_argument("--trace-samples", type=int, default=100, metavar="N",
                        help="Rademacher vectors for --trace (default 100)")
    parser.add_argument("--resolution", type=int, default=21, metavar="N",
                        help="points of the --landscape / --interpolate curves (default 21)")
    parser.add_argument("--landscape", action="store_true",
                        help="1D filter-normalised loss curve around each checkpoint, and the PCA plane of the "
                             "checkpoint trajectory (needs --data)")
    parser.add_argument("--interpolate", action="store_true",
                        help="loss on the line between consecutive checkpoints (needs --data)")
    parser.add_argument("--plasticity", action="store_true",
                        help="dead / dormant units, effective rank and srank of activation outputs (needs --data)")
    parser.add_argument("--plasticity-layers", nargs="+", metavar="PATTERN",
                        help="module names or fnmatch patterns whose outputs --plasticity measures "
                             "(default: every activation module such as nn.ReLU)")
    parser.add_argument("--scores", nargs="+", choices=("el2n", "grand"), metavar="el2n|grand",
                        help="per-example difficulty scores on --data (Paul et al. 2021): their quantiles per "
                             "checkpoint and every example's score as an artifact")
    parser.add_argument("-o", "--out", required=True, metavar="RUN_DIR", help="run directory to write (or resume)")
    parser.add_argument("--report", metavar="report.html", help="also write the HTML report of the run")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full unpickling of checkpoints that hold Python objects (can execute code "
                             "from the file: only for files you trust)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad checkpoint instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="start RUN_DIR afresh instead of resuming it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions and probe vectors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- importing user code -----------------------------------------------------------------------------

def import_object(spec: str, what: str) -> Any:
    """``pkg.module:attr`` or ``path/to/file.py:attr`` -> the object (UserError otherwise)."""
    if ":" not in spec:
        raise UserError(f"{what} {spec!r} must look like pkg.module:factory (or path/to/file.py:factory)")
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise UserError(f"{what} {spec!r} must look like pkg.module:factory (or path/to/file.py:factory)")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UserError(f"{what} {spec!r}: file {mod_name!r} does not exist")
            name = f"_dynascope_user_{abs(hash(str(path.resolve())))}"
            if name not in sys.modules:
                s = importlib.util.spec_from_file_location(name, path)
                assert s is not None and s.loader is not None
                module = importlib.util.module_from_spec(s)
                sys.modules[name] = module
                try:
                    s.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
            target = f"{name}:{attr}"
        else:
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
            name, target = mod_name, spec
        return pkgutil.resolve_name(target)
    except UserError:
        raise
    except AttributeError as exc:
        if name in sys.modules:  # the module imported; the attribute path is wrong
            raise UserError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}") from exc
        raise UserError(f"cannot import {mod_name!r} for {what} ({describe(exc)})") from exc
    except ValueError as exc:
        if not str(exc).startswith("invalid format"):  # raised by the module's own code while importing
            raise UserError(f"cannot import {mod_name!r} for {what} (ValueError: {one_line(exc)})") from exc
        raise UserError(f"{what} {spec!r} must look like pkg.module:factory (or path/to/file.py:factory)") from exc
    except Exception as exc:
        raise UserError(f"cannot import {mod_name!r} for {what} ({describe(exc)})") from exc


def _make_model(spec: str) -> nn.Module:
    factory = import_object(spec, "--model")
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise UserError(f"--model {spec!r} is not callable (a {type(factory).__name__})")
    try:
        model = factory()
    except Exception as exc:
        raise UserError(f"--model factory {spec!r} raised {type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"--model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _make_loss(spec: str) -> Callable[[Any, Any], torch.Tensor]:
    from ..diagnostics._batch import default_loss

    if spec in ("cross_entropy", "ce"):
        return default_loss
    if spec == "mse":
        return F.mse_loss
    fn = import_object(spec, "--loss")
    if not callable(fn):
        raise UserError(f"--loss {spec!r} is not callable")
    return fn


def _make_data(spec: str, model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor]) -> list[tuple[Any, Any]]:
    from ..diagnostics._batch import as_pairs, default_forward

    factory = import_object(spec, "--data")
    try:
        data = factory() if callable(factory) and not isinstance(factory, (tuple, list, torch.Tensor)) else factory
    except Exception as exc:
        raise UserError(f"--data factory {spec!r} raised {type(exc).__name__}: {one_line(exc)}") from exc
    try:
        pairs = _default_targets(as_pairs(data), loss_fn)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--data {spec!r}: {one_line(exc)}") from exc
    inputs, targets = pairs[0]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                out = default_forward(model, inputs)
                loss = loss_fn(out, targets)
            finally:
                model.train(was)
    except Exception as exc:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise UserError(f"--data {spec!r} does not fit the model (inputs {shape}): "
                        f"{type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = getattr(loss, "shape", type(loss).__name__)
        raise UserError(f"--loss returned {got}, not a scalar, on --data {spec!r}")
    return pairs


def _default_targets(pairs: list[tuple[Any, Any]], loss_fn: Any) -> list[tuple[Any, Any]]:
    """With the default loss, a pair without targets gets the input ids (a causal LM's next-token targets)."""
    from ..diagnostics._batch import default_loss, lm_targets

    if loss_fn is not default_loss:
        return pairs
    return [(x, lm_targets(x) if y is None else y) for x, y in pairs]


# -- the analysis ------------------------------------------------------------------------------------

@dataclass
class AnalyzeOptions:
    hessian: bool = False
    hessian_k: int = 1
    trace: bool = False
    trace_samples: int = 100
    resolution: int = 21
    landscape: bool = False
    interpolate: bool = False
    plasticity: bool = False
    plasticity_layers: list[str] | None = None
    scores: list[str] | None = None
    trust: bool = False
    strict: bool = False
    seed: int = 0
    progress: bool | None = None


@dataclass
class _Entry:
    path: Path
    step: int | None
    source: str
    key: dict[str, Any]
    ckpt: Checkpoint | None = None
    error: str | None = None


def _file_key(path: Path) -> dict[str, Any]:
    """Identity of a checkpoint for resuming: resolved path, size and mtime (of the weight file)."""
    target = path
    if path.is_dir():
        files = [f for f in path.iterdir() if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        mtime = max((f.stat().st_mtime_ns for f in files), default=path.stat().st_mtime_ns)
    else:
        size = target.stat().st_size
        mtime = target.stat().st_mtime_ns
    return {"path": str(path.resolve()), "size": int(size), "mtime_ns": int(mtime)}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("path", "size", "mtime_ns"))


def _progress_enabled(progress: bool | None) -> bool:
    """A progress bar: ``progress`` when given, else when stderr is a terminal."""
    if progress is not None:
        return progress
    return sys.stderr.isatty()


def _progress_lines(progress: bool | None) -> bool:
    """Progress lines (one per checkpoint and diagnostic, with its time): by default when stderr is not a
    terminal (piped, a log file, a batch job), where a bar would print nothing useful."""
    return progress is None and not sys.stderr.isatty()


class _Progress:
    """The tqdm bar (``bar``), or one line per checkpoint and diagnostic when stderr is not a terminal
    (``lines``): ``dynascope analyze: checkpoint 3/9 (step 200): hessian 2.1 s``. Each
    ``set_postfix_str("step S: what")`` starts timing ``what`` and prints the one before it."""

    def __init__(self, total: int, bar: bool, lines: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="analyze", unit="diag", disable=not bar, file=sys.stderr)
        self.lines = lines
        self.where = ""
        self.what: str | None = None
        self.t0 = 0.0

    @property
    def n(self) -> int:
        return self.bar.n

    def checkpoint(self, index: int, count: int, step: int | None) -> None:
        self.flush()
        self.where = f"checkpoint {index}/{count} (step {step})"

    def set_postfix_str(self, text: str) -> None:
        self.flush()
        self.bar.set_postfix_str(text)
        self.what, self.t0 = text.split(": ", 1)[-1], time.monotonic()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def flush(self) -> None:
        if self.lines and self.what is not None:
            where = f"{self.where}: " if self.where else ""
            _log(f"{where}{self.what} {time.monotonic() - self.t0:.1f} s")
            sys.stderr.flush()
        self.what = None

    def close(self) -> None:
        self.flush()
        self.bar.close()


def _log(msg: str) -> None:
    print(f"dynascope analyze: {msg}", file=sys.stderr)


def analyze(
    paths: list[str | Path],
    model: nn.Module,
    out: str | Path,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    data: list[tuple[Any, Any]] | None = None,
    options: AnalyzeOptions | None = None,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Analyze checkpoints into run directory ``out``; returns a summary dict.

    Raises UserError for input that stops the whole analysis (and, with
    ``options.strict``, for the first bad checkpoint).
    """
    from ..diagnostics._batch import default_loss
    from ..store import RunData, RunExistsError, RunStore, RunStoreError, now_iso

    opts = options or AnalyzeOptions()
    if data is not None and loss_fn is None:
        loss_fn = default_loss
    if data is not None:
        data = _default_targets(data, loss_fn)
    needs_data = [f for f in ("hessian", "trace", "landscape", "interpolate", "plasticity", "scores")
                  if getattr(opts, f)]
    if needs_data and data is None:
        raise UserError(f"--{needs_data[0]} needs --data (an evaluation batch)")
    if opts.hessian_k < 1:
        raise UserError(f"--hessian-k must be >= 1, got {opts.hessian_k}")
    if opts.trace_samples < 2:
        raise UserError(f"--trace-samples must be >= 2, got {opts.trace_samples}")
    if opts.resolution < 3:
        raise UserError(f"--resolution must be >= 3, got {opts.resolution}")
    if opts.plasticity:
        from ..diagnostics.plasticity import select_modules

        try:
            select_modules(model, opts.plasticity_layers)
        except ValueError as exc:
            hint = "" if opts.plasticity_layers else " (with --plasticity-layers)"
            raise UserError(f"--plasticity: {one_line(exc)}".replace("pass layers=", f"name layers{hint}")) from exc
    try:
        files = find_checkpoints(paths)
    except NotACheckpointError as exc:
        raise UserError(str(exc)) from exc
    model.eval()

    out = Path(out)
    prior_source = None
    if (out / "dynascope.sqlite").exists() and not overwrite:
        try:
            prior = RunData(out)
        except RunStoreError as exc:
            raise UserError(f"{exc} (pass --overwrite to start {str(out)!r} afresh)") from None
        prior_source = prior.meta.get("source")
        if prior_source != "analyze":
            raise UserError(f"{str(out)!r} holds a run that was not written by dynascope analyze "
                            f"(source {prior_source!r}); choose another -o or pass --overwrite")
        done_marks = [m for m in prior.marks("checkpoint")["value"] if isinstance(m, dict)]
        written_steps = {int(s) for s in prior.steps()}
    else:
        done_marks, written_steps = [], set()
    try:
        store = RunStore(out, mode="overwrite" if overwrite else ("resume" if done_marks or prior_source else "new"))
    except (RunExistsError, NotADirectoryError, RunStoreError) as exc:
        raise UserError(str(exc).replace("pass overwrite=True", "pass --overwrite")) from exc

    try:
        return _analyze_into(store, files, model, loss_fn, data, opts, done_marks, written_steps, argv, now_iso)
    finally:
        store.close()


def _scan(files: list[Path], opts: AnalyzeOptions, done_marks: list[dict[str, Any]], progress: bool
          ) -> tuple[list[_Entry], list[_Entry]]:
    """Find each checkpoint's step (loading the new ones); returns (entries, bad)."""
    from tqdm import tqdm  # tqdm.auto warns in a notebook without ipywidgets, even when disabled

    entries: list[_Entry] = []
    bad: list[_Entry] = []
    cached = 0
    for path in tqdm(files, desc="reading checkpoints", unit="ckpt", disable=not progress, file=sys.stderr,
                     leave=False):
        key = _file_key(path)
        prev = next((m for m in done_marks if _same(m, key)), None)
        if prev is not None:
            entries.append(_Entry(path, int(prev["step"]), str(prev.get("step_source", "")), key))
            continue
        try:
            ck = load_checkpoint(path, trust=opts.trust)
        except CheckpointError as exc:
            if opts.strict:
                raise UserError(str(exc)) from exc
            bad.append(_Entry(path, None, "", key, error=str(exc)))
            continue
        size = sum(v.numel() * v.element_size() for v in ck.state_dict.values())
        keep = cached + size <= CACHE_BYTES
        cached += size if keep else 0
        entries.append(_Entry(path, ck.step, ck.step_source, key, ck if keep else None))
    new = [e for e in entries if e.ckpt is not None or not any(_same(m, e.key) for m in done_marks)]
    if any(e.step is None for e in new):
        # No step in some new file or its name: number the new checkpoints in modification-time order,
        # after the steps already recorded (0, 1, 2... for a fresh analysis).
        start = max((int(m["step"]) for m in done_marks), default=-1) + 1
        order = sorted(new, key=lambda e: (e.key["mtime_ns"], str(e.path)))
        for i, e in enumerate(order):
            e.step, e.source = start + i, "modification-time order (no step in the files or their names)"
    entries.sort(key=lambda e: (e.step, str(e.path)))
    unique: list[_Entry] = []
    for e in entries:
        if unique and unique[-1].step == e.step:
            msg = f"{str(e.path)!r} has the same step {e.step} as {str(unique[-1].path)!r}"
            if opts.strict:
                raise UserError(msg)
            bad.append(_Entry(e.path, e.step, e.source, e.key, error=msg))
            continue
        unique.append(e)
    return unique, bad


def _analyze_into(store: Any, files: list[Path], model: nn.Module, loss_fn: Any, data: Any, opts: AnalyzeOptions,
                  done_marks: list[dict[str, Any]], written_steps: set[int], argv: list[str] | None,
                  now_iso: Callable[[], str]) -> dict[str, Any]:
    progress = _progress_enabled(opts.progress)
    lines = _progress_lines(opts.progress)
    entries, bad = _scan(files, opts, done_marks, progress)
    todo = [e for e in entries if not any(_same(m, e.key) for m in done_marks)]
    todo_ids = {id(e) for e in todo}
    n_params = sum(p.numel() for p in model.parameters())
    diagnostics = ["weights"] + [f for f in ("hessian", "trace", "landscape", "interpolate", "plasticity",
                                             "scores") if getattr(opts, f)]
    meta = {
        "name": store.path.name,
        "source": "analyze",
        "model": {"class": type(model).__name__, "n_parameters": n_params,
                  "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "summary": repr(model)[:20000]},
        "optimizer": None,
        "modules": [n for n, _ in model.named_modules()],
        "parameters": [n for n, _ in model.named_parameters()],
        # the figures label the evaluation mode "BN eval" only for a model that has BatchNorm
        "batchnorm": [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
        "torch_version": torch.__version__,
        "diagnostics": diagnostics,
        "checkpoints": [{"path": str(e.path), "step": e.step, "step_source": e.source} for e in entries],
        "skipped": [{"path": str(b.path), "error": b.error} for b in bad],
        "argv": (argv or sys.argv)[:40],
        "status": "running",
        "updated": now_iso(),
    }
    if data is not None:
        from ..diagnostics._batch import batch_size

        meta["data"] = {"n_batches": len(data), "n_samples": int(sum(batch_size(x) for x, _ in data))}
    store.write_meta(meta)

    scheduled = _scheduled(loss_fn, data, opts)
    summary_rows: list[dict[str, Any]] = []
    prev_sd: dict[str, torch.Tensor] | None = None
    prev_step: int | None = None
    prev_path: Path | None = None
    analyzed = 0
    status = "interrupted"
    bar = _Progress(len(todo) * len(diagnostics), progress, lines)
    n_todo = 0
    try:
        for e in entries:
            if id(e) not in todo_ids:
                prev_sd, prev_step = None, e.step  # reloaded lazily if the next one needs it
                prev_path = e.path
                continue
            if prev_sd is None and prev_path is not None:
                try:
                    prev_sd = _load_matched(prev_path, model, opts.trust)
                except CheckpointError:
                    prev_sd = None
            start = bar.n
            n_todo += 1
            bar.checkpoint(n_todo, len(todo), e.step)
            try:
                bar.set_postfix_str(f"step {e.step}: loading")
                ck = e.ckpt or load_checkpoint(e.path, trust=opts.trust)
                try:
                    sd, stripped = match_state_dict(ck.state_dict, model)
                except CheckpointError as exc:
                    raise CheckpointError(f"{str(e.path)!r}: {exc}") from None
                model.load_state_dict(sd)
                e.ckpt = None  # free the cache
                rows, row_summary = _diagnose(store, model, e.step, sd, prev_sd, prev_step, loss_fn, data, opts,
                                              bar, progress, scheduled)
            except (CheckpointError, ValueError, RuntimeError) as exc:
                msg = str(exc) if isinstance(exc, CheckpointError) else \
                    f"{str(e.path)!r}: {type(exc).__name__}: {one_line(exc)}"
                if opts.strict:
                    raise UserError(msg) from exc
                bad.append(_Entry(e.path, e.step, e.source, e.key, error=msg))
                bar.update(start + len(diagnostics) - bar.n)
                continue
            if e.step in written_steps:
                # an interrupted attempt (or an older version of this file) left rows at this step: replace them
                store.delete_step(e.step, mark_key="checkpoint")
            store.write_scalars(rows)
            store.mark(e.step, "checkpoint", {**e.key, "step": e.step, "step_source": e.source,
                                              "container": ck.container, "stripped": stripped})
            analyzed += 1
            row_summary.update(step=e.step, name=e.path.name)
            summary_rows.append(row_summary)
            prev_sd, prev_step, prev_path = {k: v.detach().clone() for k, v in sd.items()}, e.step, e.path
        if scheduled.landscape is not None and opts.landscape:
            bar.flush()
            bar.where = "all checkpoints"
            bar.set_postfix_str("all: trajectory plane")
            _trajectory(store, model, entries, bad, scheduled.landscape, opts)
        status = "finished"
    except BaseException:
        status = "interrupted"
        raise
    finally:
        bar.close()
        store.write_meta({"status": status, "updated": now_iso(),
                          "skipped": [{"path": str(b.path), "error": b.error} for b in bad]})
    return {"analyzed": analyzed, "skipped": [(str(b.path), b.error) for b in bad],
            "already": len(entries) - len(todo), "rows": summary_rows, "entries": entries}


def _load_matched(path: Path, model: nn.Module, trust: bool) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(path, trust=trust)
    sd, _ = match_state_dict(ck.state_dict, model)
    return sd


def _diagnose(store: Any, model: nn.Module, step: int, sd: dict[str, torch.Tensor],
              prev_sd: dict[str, torch.Tensor] | None, prev_step: int | None, loss_fn: Any, data: Any,
              opts: AnalyzeOptions, bar: Any, progress: bool, scheduled: _Scheduled | None = None
              ) -> tuple[list[tuple[int, str, str, float]], dict]:
    from ..diagnostics.plasticity import weight_magnitude
    from ..diagnostics.weights import angular_change, weight_norms, weight_spectra

    rows: list[tuple[int, str, str, float]] = []
    summary: dict[str, Any] = {}

    def add(metric: str, value: float, layer: str = "") -> None:
        rows.append((step, metric, layer, float(value)))

    # data-free
    bar.set_postfix_str(f"step {step}: weights")
    norms = weight_norms(model)
    for k, v in norms.items():
        add("weight.norm", v, k)
    if not (opts.plasticity and data is not None):  # else Plasticity records it, as in a live run
        for k, v in weight_magnitude(model).items():
            add("weight.magnitude", v, k)
    spectra = weight_spectra(model)
    arrays: dict[str, np.ndarray] = {}
    for k, s in spectra.items():
        add("weight.stable_rank", s.stable_rank, k)
        add("weight.alpha", s.alpha, k)
        add("weight.sigma_max", float(s.singular_values[0]) if s.singular_values.size else math.nan, k)
        arrays[k] = s.singular_values
    if arrays:
        store.write_artifact("weight.spectrum", step, arrays,
                             {"what": "singular values of W.flatten(1) per weight, descending",
                              "alpha": {k: s.alpha for k, s in spectra.items()},
                              "xmin": {k: s.xmin for k, s in spectra.items()}})
    if prev_sd is not None:
        params = {n for n, _ in model.named_parameters()}
        angles = angular_change({k: v for k, v in prev_sd.items() if k in params},
                                {k: v for k, v in sd.items() if k in params})
        for k, v in angles.items():
            add("weight.angle_prev", v, k)
        summary["angle_prev"] = angles.get("", math.nan)
    summary["weight_norm"] = math.sqrt(sum(v * v for v in norms.values()))
    finite_sr = [s.stable_rank for s in spectra.values() if math.isfinite(s.stable_rank)]
    finite_alpha = [s.alpha for s in spectra.values() if math.isfinite(s.alpha)]
    summary["stable_rank"] = float(np.mean(finite_sr)) if finite_sr else math.nan
    summary["alpha"] = float(np.median(finite_alpha)) if finite_alpha else math.nan
    bar.update(1)
    if data is None:
        return rows, summary
    bar.set_postfix_str(f"step {step}: loss")

    # loss on the data (mean over samples, batches weighted by size)
    from ..diagnostics._batch import batch_size, default_forward, default_loss

    total = correct = 0.0
    n = 0
    with torch.no_grad():
        for x, y in data:
            o = default_forward(model, x)
            b = batch_size(x)
            total += float(loss_fn(o, y)) * b
            n += b
            if loss_fn in (F.cross_entropy, default_loss) and isinstance(o, torch.Tensor) and o.ndim == 2 \
                    and isinstance(y, torch.Tensor) and y.ndim == 1 and not y.is_floating_point():
                correct += float((o.argmax(1) == y).sum())
            else:
                correct = math.nan
    add("loss", total / n)
    summary["loss"] = total / n
    if math.isfinite(correct):
        add("accuracy", correct / n)
        summary["accuracy"] = correct / n

    if scheduled is None:
        scheduled = _scheduled(loss_fn, data, opts)
    step_rows = _run_scheduled(store, model, step, scheduled, prev_sd, prev_step, opts, bar)
    rows += step_rows
    eig1 = [v for _, m, lay, v in step_rows if m == "hessian.eig" and lay == "1"]
    if eig1:
        summary["lambda_max"] = eig1[0]
    trace = [v for _, m, _, v in step_rows if m == "hessian.trace"]
    if trace:
        summary["trace"] = trace[0]
    dead = [v for _, m, _, v in step_rows if m == "plasticity.dead"]
    if dead:
        summary["dead"] = float(np.mean(dead))
    if opts.scores:
        _scores(store, model, step, loss_fn, data, opts.scores, add, summary, bar, progress)
        bar.update(1)
    return rows, summary


@dataclass
class _Scheduled:
    """The live run's scheduled diagnostics, configured from the analyze flags."""

    curvature: Any = None
    landscape: Any = None
    plasticity: Any = None


def _scheduled(loss_fn: Any, data: Any, opts: AnalyzeOptions) -> _Scheduled:
    """One Curvature / Landscape / Plasticity per analysis, the classes a live run
    uses, so each metric has one name, one tolerance and one code path."""
    out = _Scheduled()
    if data is None:
        return out
    if opts.hessian or opts.trace:
        from ..probes.curvature import Curvature

        out.curvature = Curvature(every=1, batch=data, loss_fn=loss_fn, k=opts.hessian_k, eigenvalues=opts.hessian,
                                  trace=opts.trace, trace_samples=opts.trace_samples, seed=opts.seed)
    if opts.landscape or opts.interpolate:
        from ..probes.landscape import Landscape

        # surfaces at every checkpoint with --landscape (at no step otherwise); the snapshots are the
        # checkpoints themselves (set per checkpoint below), so keep_checkpoints only has to hold two
        out.landscape = Landscape(every=1 if opts.landscape else None, at=None if opts.landscape else (),
                                  batch=data, loss_fn=loss_fn, resolution=opts.resolution, dims=1, seed=opts.seed,
                                  keep_checkpoints=2, checkpoint_every=1, trajectory=opts.landscape,
                                  interpolation="consecutive" if opts.interpolate else False)
    if opts.plasticity:
        from ..probes.plasticity import Plasticity

        out.plasticity = Plasticity(every=1, batch=data[0], layers=opts.plasticity_layers)
    return out


def _context(store: Any, model: nn.Module, step: int, rows: list[tuple[int, str, str, float]],
             final: bool = False) -> Any:
    from ..probes.scheduled import ScheduledContext

    def log_fn(metric: str, value: float, layer: str) -> None:
        rows.append((step, metric, layer, float(value)))

    def artifact_fn(name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        store.write_artifact(name, step, arrays, meta)

    return ScheduledContext(model, None, step, final, log_fn, artifact_fn)


def _run_scheduled(store: Any, model: nn.Module, step: int, scheduled: _Scheduled,
                   prev_sd: dict[str, torch.Tensor] | None, prev_step: int | None, opts: AnalyzeOptions,
                   bar: Any) -> list[tuple[int, str, str, float]]:
    """Run the scheduled diagnostics on the checkpoint loaded in ``model``, as a live run does at a due step."""
    from ..probes.scheduled import run_guarded

    rows: list[tuple[int, str, str, float]] = []
    ctx = _context(store, model, step, rows)
    if scheduled.curvature is not None:
        bar.set_postfix_str(f"step {step}: " + " and ".join(n for n in ("hessian", "trace") if getattr(opts, n)))
        run_guarded(scheduled.curvature, ctx)
        bar.update(int(opts.hessian) + int(opts.trace))
    if scheduled.landscape is not None:
        bar.set_postfix_str(f"step {step}: landscape")
        # the previous checkpoint (reloaded from its file when resuming) is the snapshot to interpolate from
        scheduled.landscape.snapshots = [] if prev_sd is None or prev_step is None else [
            (int(prev_step), {k: v.detach().to("cpu", copy=True) for k, v in prev_sd.items()})]
        run_guarded(scheduled.landscape, ctx)
        scheduled.landscape.snapshots = []
        bar.update(int(opts.landscape) + int(opts.interpolate))
    if scheduled.plasticity is not None:
        bar.set_postfix_str(f"step {step}: plasticity")
        try:
            run_guarded(scheduled.plasticity, ctx)
        except ValueError as exc:
            raise ValueError(f"--plasticity: {one_line(exc)}") from exc
        bar.update(1)
    return rows


def _scores(store: Any, model: nn.Module, step: int, loss_fn: Any, data: Any, kinds: list[str], add: Any,
            summary: dict[str, Any], bar: Any, progress: bool) -> None:
    """``scores.<kind>`` quantiles (layers q10, q50, q90, mean) and the per-example scores as an artifact."""
    from ..diagnostics.scores import example_scores

    for kind in dict.fromkeys(kinds):
        bar.set_postfix_str(f"step {step}: {kind}")
        try:
            res = example_scores(model, loss_fn, data, kind, progress=progress)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--scores {kind}: {one_line(exc)}") from exc
        for name, value in res.summary().items():
            add(f"scores.{kind}", value, name)
        store.write_artifact(f"scores.{kind}", step, {"scores": res.scores},
                             {"kind": kind, "n": len(res), "what": "one score per --data example, in data order"})
        summary[kind] = res.summary()["q50"]


def _trajectory(store: Any, model: nn.Module, entries: list[_Entry], bad: list[_Entry], landscape: Any,
                opts: AnalyzeOptions) -> None:
    """PCA plane of the checkpoint trajectory (Li et al. 2018), when there are >= 3 checkpoints: the live
    Landscape's close, with the checkpoints as its snapshots."""
    from ..probes.scheduled import run_guarded

    bad_paths = {str(b.path) for b in bad}
    good = [e for e in entries if str(e.path) not in bad_paths]
    if len(good) < 3:
        return
    n_params = sum(p.numel() for p in model.parameters())
    if n_params * len(good) > 2e8:
        _log(f"trajectory plane skipped: {len(good)} checkpoints x {n_params} parameters is too large to hold")
        return
    states = []
    for e in good:
        try:
            states.append(_load_matched(e.path, model, opts.trust))
        except CheckpointError:
            return
    model.load_state_dict(states[-1])
    last = int(good[-1].step)  # type: ignore[arg-type]
    landscape.snapshots = [(int(e.step), st) for e, st in zip(good[:-1], states[:-1])]  # type: ignore[arg-type]
    rows: list[tuple[int, str, str, float]] = []
    try:
        run_guarded(landscape, _context(store, model, last, rows, final=True), close=True)
    finally:
        landscape.snapshots = []
    if any(m == "landscape.trajectory_skipped" for _, m, _, _ in rows):
        _log("trajectory plane skipped: the checkpoints span no plane (weights that never moved?)")
    if rows:
        store.write_scalars(rows)


# -- the command --------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _summary_table(rows: list[dict[str, Any]]) -> str:
    cols = ["step", "name", "loss", "accuracy", "weight_norm", "angle_prev", "stable_rank", "alpha", "lambda_max",
            "trace", "dead", "el2n", "grand"]
    cols = [c for c in cols if any(c in r for r in rows)]
    table = [[c for c in cols]] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table)


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    for p in args.checkpoints:
        if not Path(p).exists():
            raise UserError(f"checkpoint path {p!r} does not exist")
    model = _make_model(args.model)
    loss_fn = _make_loss(args.loss)
    data = _make_data(args.data, model, loss_fn) if args.data else None
    opts = AnalyzeOptions(hessian=args.hessian, hessian_k=args.hessian_k, trace=args.trace,
                          trace_samples=args.trace_samples, resolution=args.resolution, landscape=args.landscape,
                          interpolate=args.interpolate, plasticity=args.plasticity,
                          plasticity_layers=args.plasticity_layers, scores=args.scores, trust=args.trust_checkpoint,
                          strict=args.strict, seed=args.seed, progress=False if args.no_progress else None)
    result = analyze(args.checkpoints, model, args.out, loss_fn=loss_fn, data=data, options=opts,
                     overwrite=args.overwrite, argv=sys.argv)
    entries = result["entries"]
    if result["analyzed"] == 0 and result["already"] == 0:
        skipped = result["skipped"]
        if len(skipped) == 1:
            raise UserError(skipped[0][1])
        raise UserError(f"no checkpoint could be analyzed: {len(skipped)} bad"
                        + (f" (first: {skipped[0][1]})" if skipped else ""))
    if result["rows"]:
        print(_summary_table(result["rows"]))
    sources = sorted({e.source for e in entries})
    print(f"{result['analyzed']} checkpoint(s) analyzed, {result['already']} already recorded, "
          f"{len(result['skipped'])} skipped; steps from: {', '.join(sources) or '-'}; "
          f"run: {args.out} ({time.monotonic() - t0:.1f}s)")
    for path, err in result["skipped"]:
        print(f"  skipped {path}: {err}")
    if args.report:
        try:
            from .. import report as make_report  # type: ignore[attr-defined]
        except ImportError as exc:
            raise UserError("--report: dynascope.report is not available in this installation; "
                            f"run `dynascope report {args.out}` instead") from exc
        from ..store import load_run

        make_report([load_run(args.out)], args.report)
        print(f"report: {args.report}")
    return 0
