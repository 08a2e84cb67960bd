"""One pass per activation: every statistic of a module output from one compiled kernel.

The eager path reads an output three to five times (a shifted copy, its square, ``aminmax``, a non-zero
count). :func:`output_statistics` computes the same quantities (per-channel mean and ddof=0 variance from
float64 sums of the data shifted by one sample per channel, max |x|, the non-zero count) in a form that
inductor fuses into one loop over the output (one C++ loop on the CPU; Triton on the GPU, a path no test
here runs: no GPU was lent to the sessions that built it).

:class:`FusedStatistics` compiles it once per output layout (shape, strides, dtype, device, channel
dimension) with ``make_fx`` + inductor's ``compile_fx``: a compiled kernel without Dynamo's guards and
wrappers costs ~12 us a call where ``torch.compile`` costs ~39 us (measured: 128x64 output, 2 threads), which
decides whether small outputs gain at all. Compiling takes ~0.7-2 s per layout (the first one also imports
inductor, ~150 MB of host memory), so ``mode="auto"`` compiles a layout only once the eager statistics of
that layout have cost as much time as a compile does (ski rental: never more than twice the better of the two
choices); short runs and the test suite stay eager. Any failure to compile or to run a kernel leaves that
layout on the eager path for the rest of the run (the reason is kept for the coverage report); training is
never stopped by it.

Small outputs (:data:`DEFER_MAX_ELEMENTS`) of a hot layout are not reduced one by one: the hook copies each
into a row of a per-layout buffer and :meth:`FusedStatistics.drain` reduces a step's rows with one batched
kernel (:func:`batched_statistics`): the hook's cost falls from ~23 us to ~8 us a module on the 40-block model.
The same machinery gives the sentinel the update norms of Adam/AdamW from their state in one read of m, v and
w per parameter (:func:`adam_update_sq_norms`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

__all__ = ["FusedKernels", "FusedStatistics", "output_statistics", "batched_statistics", "adam_update_sq_norms",
           "FUSED_MODES"]

FUSED_MODES = ("auto", "on", "off")
FIRST_BUDGET_S = 2.0  # eager seconds a layout may cost before the first compile (which also imports inductor)
MIN_BUDGET_S = 0.25  # later layouts: the last compile's measured time, at least this
DEFER_MAX_ELEMENTS = 1 << 16  # outputs up to this size are copied into a per-layout buffer and reduced batched
DEFER_MAX_BYTES = 64 << 20  # the buffers of one probe at most
MAX_KERNELS = 32  # layouts compiled per probe at most (a run with ever-changing shapes stays eager beyond)


def output_statistics(x: torch.Tensor, cdim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (ddof=0) variance and mean over every dimension but ``cdim``, max |x| and the number of
    non-zero entries (NaN counts as non-zero), as float32, float32, float32 and int64 tensors: the one-row case
    of :func:`batched_statistics`. Written for the compiler (one read of ``x`` once fused); eager, it is the
    reference the compiled kernels are tested against."""
    var, mean, absmax, nnz = batched_statistics(x.unsqueeze(0), cdim)
    return var[0], mean[0], absmax[0], nnz[0]


def batched_statistics(xb: torch.Tensor, cdim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """:func:`output_statistics` of each of ``xb``'s rows (``xb[g]`` an output, channel dimension ``cdim`` of
    the output): per-row, per-channel variance and mean (G, C), max |x| (G,) and non-zero count (G,).

    Sums are float64 over the data shifted by each row's first sample per channel K_c:
    var = E[(x-K)^2] - E[x-K]^2 does not cancel at |mean| >> std."""
    shape = xb.shape
    g = shape[0]
    a = math.prod(shape[1:cdim + 1])
    c = shape[cdim + 1]
    b = math.prod(shape[cdim + 2:])
    x4 = xb.reshape(g, a, c, b)
    k = x4[:, 0:1, :, 0:1].to(torch.float64)
    y = x4.to(torch.float64) - k
    n = a * b
    m = y.sum((1, 3)) / n
    var = (y * y).sum((1, 3)) / n - m * m
    mean = m + k.reshape(g, c)
    absmax = x4.abs().amax((1, 2, 3)).to(torch.float32)
    nnz = (x4 != 0).sum((1, 2, 3))
    return var.to(torch.float32), mean.to(torch.float32), absmax, nnz


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def compile_for(fn: Callable[..., Any], *like: torch.Tensor) -> Callable[..., Any]:
    """``fn`` compiled by inductor for inputs of exactly the layouts of ``like`` (inductor checks sizes and
    strides of every call's inputs): traced with ``make_fx`` on fake tensors, then ``compile_fx``."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.inference_mode(False):
        examples = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in like]
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(like[0].device.type, enabled=False):
        graph = make_fx(fn, tracing_mode="fake")(*examples)
        return compile_fx(graph, examples)


def _compile_statistics(fn: Callable[[torch.Tensor, int], Any], x: torch.Tensor, cdim: int
                        ) -> Callable[[torch.Tensor], Any]:
    """A kernel of ``fn`` (:func:`output_statistics` or :func:`batched_statistics`) for ``x``'s exact layout."""
    return compile_for(lambda t: fn(t, cdim), x)


def adam_update_sq_norm(v: torch.Tensor, m: torch.Tensor, w: torch.Tensor, c: torch.Tensor, eps: float,
                        wd: float) -> torch.Tensor:
    """||u + lr wd w||^2 (float64, 0-dim) with u = (lr / bc1) m / (sqrt(v) / bc2 + eps), the step Adam took
    (``wd`` = 0) or AdamW's before its division by 1 - lr wd (``dynascope.probes._steps``); ``c`` holds
    (bc2, lr / bc1, lr). The step in the state's precision (float32: the optimizer's own arithmetic; a
    float64 square root costs 3x more on the CPU), its squares summed in float64. Written for the compiler:
    one read of v, m and w once fused."""
    dt = torch.promote_types(v.dtype, torch.float32)
    c = c.to(dt)
    u = m.to(dt) * c[1] / (v.to(dt).sqrt() / c[0] + eps)
    if wd:
        u = u + (c[2] * wd) * w.to(dt)
    u = u.to(torch.float64)
    return (u * u).sum()


def adam_update_sq_norms(kernels: FusedKernels, group_key: tuple, vs: list[torch.Tensor], ms: list[torch.Tensor],
                         ws: list[torch.Tensor], c: torch.Tensor, eps: float, wd: float) -> torch.Tensor | None:
    """Squared norms (float64, one per parameter) of the steps of Adam/AdamW from one compiled kernel per
    parameter layout (``c``: (3, n), column k for parameter k), or None when the caller should compute them
    eagerly (and add the seconds to the group's ``spent``): the group ``group_key`` (ids: never shared
    across runs) waits for its budget as one layout."""
    lay = kernels.layout(group_key, shared=False)
    if lay is None:
        return None

    def keys() -> list[tuple]:
        return [("adam", v.shape, v.stride(), m.stride(), w.stride(), v.dtype, m.dtype, w.dtype, v.device,
                 c[:, k].stride(), c.dtype, eps, wd) for k, (v, m, w) in enumerate(zip(vs, ms, ws))]

    if lay.kernel is None and lay.spent < kernels.budget and all(k in _KERNELS for k in keys()):
        lay.spent = kernels.budget  # an earlier run of this process compiled every layout: nothing to pay

    def build() -> Callable[..., Any]:
        per: list[Callable[..., Any]] = []
        for k, (key, v, m, w) in enumerate(zip(keys(), vs, ms, ws)):
            kern = _KERNELS.get(key)
            if kern is None:
                kern = compile_for(lambda a, b, x, y: adam_update_sq_norm(a, b, x, y, eps, wd), v, m, w, c[:, k])
                if len(_KERNELS) < 8 * MAX_KERNELS:
                    _KERNELS[key] = kern
            per.append(kern)

        def run(vs_: list[torch.Tensor], ms_: list[torch.Tensor], ws_: list[torch.Tensor],
                c_: torch.Tensor) -> torch.Tensor:
            return torch.stack([f(v, m, w, c_[:, k]) for k, (f, v, m, w) in enumerate(zip(per, vs_, ms_, ws_))])

        return run

    return kernels.call(group_key, lay, build, vs, ms, ws, c, shared=False)


_KERNELS: dict[tuple, Callable[[torch.Tensor], Any]] = {}  # process-wide: a later run reuses what an earlier compiled
_HOT: set[tuple] = set()  # output layouts found worth compiling in this process


class _Layout:
    __slots__ = ("kernel", "spent", "failed")

    def __init__(self) -> None:
        self.kernel: Callable[[torch.Tensor], Any] | None = None
        self.spent = 0.0  # eager seconds so far
        self.failed = ""  # why this layout stays eager


def resolve_mode(fused: str | None) -> str:
    """``fused`` as given, else the environment variable ``DYNASCOPE_FUSED``, else ``"auto"``."""
    if fused is not None:
        return fused
    mode = os.environ.get("DYNASCOPE_FUSED", "auto")
    if mode not in FUSED_MODES:
        raise ValueError(f"DYNASCOPE_FUSED must be one of {', '.join(FUSED_MODES)}, got {mode!r}")
    return mode


class FusedKernels:
    """Compiled kernels of one instrument, one per layout key, compiled by ski rental (module docstring).

    ``mode``: ``"auto"`` compiles a layout once its eager cost reaches a compile's; ``"on"`` compiles every
    layout when first seen (tests, long runs); ``"off"`` never compiles."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in FUSED_MODES:
            raise ValueError(f"fused must be one of {', '.join(map(repr, FUSED_MODES))}, got {mode!r}")
        self.mode = mode
        self.budget = 0.0 if mode == "on" else FIRST_BUDGET_S
        self.layouts: dict[tuple, _Layout] = {}
        self.compiled = 0
        self.compile_seconds = 0.0
        self.failures: list[str] = []

    def layout(self, key: tuple, shared: bool = True) -> _Layout | None:
        """The entry of ``key`` (created on first sight; with ``shared`` a kernel an earlier run of this process
        compiled for the key is used at once); None on the eager path for good (mode off, a failed layout, too
        many layouts)."""
        if self.mode == "off":
            return None
        lay = self.layouts.get(key)
        if lay is None:
            if len(self.layouts) >= 4 * MAX_KERNELS:
                return None
            lay = self.layouts[key] = _Layout()
            lay.kernel = _KERNELS.get(key) if shared else None
            if lay.kernel is not None:
                self.compiled += 1
        return None if lay.failed else lay

    def call(self, key: tuple, lay: _Layout, build: Callable[[], Callable[..., Any]], *args: Any,
             shared: bool = True) -> Any:
        """The layout's kernel applied to ``args``, built first by ``build()`` when the layout's eager seconds
        (``lay.spent``, added by the caller) have reached the budget; None when the caller should compute
        eagerly (before that, inside a traced region, or after a failure)."""
        if lay.kernel is None and shared and key in _KERNELS:  # compiled meanwhile by another instrument
            lay.kernel = _KERNELS[key]
            self.compiled += 1
        if lay.kernel is None:
            if lay.spent < self.budget or self.compiled >= MAX_KERNELS or torch.compiler.is_compiling():
                return None
            t0 = time.perf_counter()
            try:
                lay.kernel = build()
            except Exception as e:  # noqa: BLE001 - any failure: this layout stays eager, training goes on
                lay.failed = "compile failed: " + _one_line(e)
                self.failures.append(lay.failed)
                return None
            dt = time.perf_counter() - t0
            if shared and len(_KERNELS) < 8 * MAX_KERNELS:
                _KERNELS[key] = lay.kernel
            self.compiled += 1
            self.compile_seconds += dt
            if self.mode == "auto":
                self.budget = max(MIN_BUDGET_S, dt)
        try:
            return lay.kernel(*args)
        except Exception as e:  # noqa: BLE001
            lay.kernel = None
            lay.failed = "kernel failed: " + _one_line(e)
            self.failures.append(lay.failed)
            return None

    what = "layout(s) fused into one compiled kernel each"

    def describe(self) -> str:
        """One line for the coverage report."""
        if self.mode == "off":
            return "eager (fused kernels off)"
        text = (f"{self.compiled} {self.what} ({self.compile_seconds:.1f} s compiling)" if self.compiled
                else "eager (no layout compiled yet)")
        if self.failures:
            text += f"; {len(self.failures)} layout(s) kept eager: {self.failures[0]}"
        return text


class _Batch:
    """Copies of a step's small outputs of one layout, stacked as they come (one row each), reduced at the end
    of the step by one batched kernel."""

    __slots__ = ("data", "count", "names", "cdim", "failed")

    def __init__(self, cdim: int) -> None:
        self.data: torch.Tensor | None = None
        self.count = 0
        self.names: list[str] = []
        self.cdim = cdim
        self.failed = False


class FusedStatistics(FusedKernels):
    """The activation probe's kernels: one per output layout (shape, strides, dtype, device, channel dim).

    A hot layout (its eager cost has reached a compile's) of a small output (at most DEFER_MAX_ELEMENTS
    entries) is not reduced in the hook: the hook copies the output into a row of a per-layout buffer
    (:meth:`defer`, one small copy), and :meth:`drain` reduces every row of the step with one batched kernel
    per layout (:func:`batched_statistics`). The copy is taken at the hook, so an output changed in place later
    in the forward (``ReLU(inplace=True)``, ``out += identity``) is measured as the module returned it. Larger
    outputs get one kernel per call (:meth:`run`)."""

    what = "output layout(s) fused into one compiled kernel each"

    def __init__(self, mode: str = "auto") -> None:
        super().__init__(mode)
        self.batches: dict[tuple, _Batch] = {}
        self.buffer_bytes = 0

    def hot(self, entry: tuple[tuple, _Layout]) -> bool:
        """Whether statistics of this layout are worth compiling: its kernel exists, its budget is spent, or
        an earlier run of this process found it so (its kernels are compiled)."""
        key, lay = entry
        if lay.kernel is not None or key in _HOT:
            return True
        if lay.spent >= self.budget and self.compiled < MAX_KERNELS:
            _HOT.add(key)
            return True
        return False

    def defer(self, key: tuple, x: torch.Tensor, name: str) -> bool:
        """Copy ``x`` into the next row of its layout's buffer (False: not deferred, reduce it now)."""
        b = self.batches.get(key)
        if b is None:
            b = self.batches[key] = _Batch(key[4])
        if b.failed:
            return False
        data = b.data
        if data is None or b.count == data.shape[0]:
            rows = 4 if data is None else 2 * data.shape[0]
            nbytes = rows * x.numel() * x.element_size()
            old = 0 if data is None else data.numel() * data.element_size()
            if self.buffer_bytes - old + nbytes > DEFER_MAX_BYTES:
                return False
            with torch.inference_mode(False):  # a normal tensor even when created in an inference-mode forward
                grown = torch.empty((rows, *x.shape), dtype=x.dtype, device=x.device)
                if data is not None:
                    grown[:b.count].copy_(data[:b.count])
            b.data = data = grown
            self.buffer_bytes += nbytes - old
        try:
            data[b.count].copy_(x)
        except RuntimeError:  # whatever the context refuses: this output reduced in its hook instead
            return False
        b.names.append(name)
        b.count += 1
        return True

    def drain(self) -> list[tuple[list[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], int]]:
        """Per layout with deferred outputs this step: the module names of its rows (in call order), their
        statistics as tensors with one row each (variance and mean (G, C), max |x| and non-zero count (G,)),
        and the entries of one output; the buffers are kept for the next step."""
        out: list[tuple[list[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], int]] = []
        for b in self.batches.values():
            if not b.count:
                continue
            data, cdim, count = b.data, b.cdim, b.count
            assert data is not None
            key = ("batch", tuple(data.shape), data.dtype, data.device, cdim)
            lay = self.layout(key)
            got = None
            if lay is not None:
                lay.spent = max(lay.spent, self.budget)  # a hot layout: compiled at once
                got = self.call(key, lay, partial(_compile_statistics, batched_statistics, data, cdim), data)
            if got is None:  # the stale rows past ``count`` are not read
                b.failed = True  # from the next call on, this layout is reduced in the hook
                got = batched_statistics(data[:count], cdim)
            elif count < data.shape[0]:
                got = tuple(t[:count] for t in got)
            out.append((b.names, got, data[0].numel()))
            b.count = 0
            b.names = []
        return out

    def reset(self) -> None:
        """Forget what the step deferred (a step that ends without collecting) and release the buffers."""
        self.batches.clear()
        self.buffer_bytes = 0

    def kernel(self, x: torch.Tensor, cdim: int) -> tuple[tuple, _Layout] | None:
        """The layout entry of ``x`` when statistics may be fused or timed for it; None on the eager path
        (mode off, a tensor subclass, a layout that failed, a hook Dynamo is tracing: its graph keeps the eager
        operations)."""
        if self.mode == "off" or type(x) is not torch.Tensor or torch.compiler.is_compiling():
            return None
        key = (x.shape, x.stride(), x.dtype, x.device, cdim)
        lay = self.layout(key)
        return None if lay is None else (key, lay)

    def run(self, entry: tuple[tuple, _Layout], x: torch.Tensor, cdim: int):  # noqa: ANN201
        """Statistics from the layout's kernel, compiling it first when the budget is spent; None when
        the caller should compute them eagerly (and add their seconds to the layout's ``spent``)."""
        key, lay = entry
        return self.call(key, lay, partial(_compile_statistics, output_statistics, x, cdim), x)

    def statistics(self, entry: tuple[tuple, _Layout] | None, x: torch.Tensor, cdim: int,
                   eager: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The layout's kernel's (variance, mean, max |x|, non-zero count) of ``x``, or ``eager()``'s (variance
        and mean first) where there is no kernel yet, its seconds added to the layout's budget."""
        out = self.run(entry, x, cdim) if entry is not None else None
        if out is not None:
            return out
        if entry is None:
            return eager()
        t0 = time.perf_counter()
        out = eager()
        entry[1].spent += time.perf_counter() - t0
        return out
