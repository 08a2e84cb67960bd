"""One pass per activation: every statistic of a module output from one compiled kernel.

The eager path reads an output three to five times (a shifted copy, its square, ``aminmax``, a non-zero
count). :func:`output_statistics` computes the same quantities (per-channel mean and ddof=0 variance from
float64 sums of the data shifted by one sample per channel, max |x|, the non-zero count) in a form that
inductor fuses into one loop over the output (one C++ loop on the CPU, one Triton kernel on the GPU).

:class:`FusedStatistics` compiles it once per output layout (shape, strides, dtype, device, channel
dimension) with ``make_fx`` + inductor's ``compile_fx``: a compiled kernel without Dynamo's guards and
wrappers costs ~12 us a call where ``torch.compile`` costs ~39 us (measured: 128x64 output, 2 threads), which
decides whether small outputs gain at all. Compiling takes ~0.7-2 s per layout (the first one also imports
inductor, ~150 MB of host memory), so ``mode="auto"`` compiles a layout only once the eager statistics of
that layout have cost as much time as a compile does (ski rental: never more than twice the better of the two
choices); short runs and the test suite stay eager. Any failure to compile or to run a kernel leaves that
layout on the eager path for the rest of the run (the reason is kept for the coverage report); training is
never stopped by it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FusedStatistics", "output_statistics", "FUSED_MODES"]

FUSED_MODES = ("auto", "on", "off")
FIRST_BUDGET_S = 2.0  # eager seconds a layout may cost before the first compile (which also imports inductor)
MIN_BUDGET_S = 0.25  # later layouts: the last compile's measured time, at least this
MAX_KERNELS = 32  # layouts compiled per probe at most (a run with ever-changing shapes stays eager beyond)


def output_statistics(x: torch.Tensor, cdim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (ddof=0) variance and mean over every dimension but ``cdim``, max |x| and the number of
    non-zero entries (NaN counts as non-zero), as float32, float32, float32 and int64 tensors.

    Sums are float64 over the data shifted by its first sample per channel K_c: var = E[(x-K)^2] - E[x-K]^2
    does not cancel at |mean| >> std. Written for the compiler (one read of ``x`` once fused); eager, it is the
    reference the compiled kernels are tested against."""
    shape = x.shape
    a = math.prod(shape[:cdim])
    c = shape[cdim]
    b = math.prod(shape[cdim + 1:])
    x3 = x.reshape(a, c, b)
    k = x3[0:1, :, 0:1].to(torch.float64)
    y = x3.to(torch.float64) - k
    n = a * b
    m = y.sum((0, 2)) / n
    var = (y * y).sum((0, 2)) / n - m * m
    mean = m + k.reshape(c)
    absmax = x3.abs().amax().to(torch.float32)
    nnz = (x3 != 0).sum()
    return var.to(torch.float32), mean.to(torch.float32), absmax, nnz


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _compile(x: torch.Tensor, cdim: int) -> Callable[[torch.Tensor], Any]:
    """A kernel of :func:`output_statistics` for ``x``'s exact layout (inductor checks sizes and strides of
    every call's input)."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    example = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        graph = make_fx(lambda t: output_statistics(t, cdim), tracing_mode="fake")(example)
        return compile_fx(graph, [example])


_KERNELS: dict[tuple, Callable[[torch.Tensor], Any]] = {}  # process-wide: a later run reuses what an earlier compiled


class _Layout:
    __slots__ = ("kernel", "spent", "failed")

    def __init__(self) -> None:
        self.kernel: Callable[[torch.Tensor], Any] | None = None
        self.spent = 0.0  # eager seconds so far
        self.failed = ""  # why this layout stays eager


class FusedStatistics:
    """Compiled statistics kernels of one probe, one per output layout (see the module docstring).

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

    def kernel(self, x: torch.Tensor, cdim: int) -> tuple[tuple, _Layout] | None:
        """The layout entry of ``x`` when statistics may be fused or timed for it; None on the eager path
        for good (mode off, a tensor subclass, a layout that failed)."""
        if self.mode == "off" or type(x) is not torch.Tensor:
            return None
        key = (x.shape, x.stride(), x.dtype, x.device, cdim)
        lay = self.layouts.get(key)
        if lay is None:
            if len(self.layouts) >= 4 * MAX_KERNELS:
                return None
            lay = self.layouts[key] = _Layout()
            lay.kernel = _KERNELS.get(key)  # compiled by an earlier run of this process: no budget to spend
            if lay.kernel is not None:
                self.compiled += 1
        return (key, lay) if not lay.failed else None

    def run(self, entry: tuple[tuple, _Layout], x: torch.Tensor, cdim: int):  # noqa: ANN201
        """Statistics from the layout's kernel, compiling it first when the budget is spent; None when
        the caller should compute them eagerly (and add their seconds to the layout's ``spent``)."""
        key, lay = entry
        if lay.kernel is None:
            if lay.spent < self.budget or self.compiled >= MAX_KERNELS or torch.compiler.is_compiling():
                return None
            t0 = time.perf_counter()
            try:
                lay.kernel = _compile(x, cdim)
            except Exception as e:  # noqa: BLE001 - any failure: this layout stays eager, training goes on
                lay.failed = "compile failed: " + _one_line(e)
                self.failures.append(lay.failed)
                return None
            dt = time.perf_counter() - t0
            if len(_KERNELS) < 8 * MAX_KERNELS:
                _KERNELS[key] = lay.kernel
            self.compiled += 1
            self.compile_seconds += dt
            if self.mode == "auto":
                self.budget = max(MIN_BUDGET_S, dt)
        try:
            return lay.kernel(x)
        except Exception as e:  # noqa: BLE001
            lay.kernel = None
            lay.failed = "kernel failed: " + _one_line(e)
            self.failures.append(lay.failed)
            return None

    def describe(self) -> str:
        """One line for the coverage report."""
        if self.mode == "off":
            return "eager (fused statistics off)"
        text = (f"{self.compiled} output layout(s) fused into one compiled kernel each "
                f"({self.compile_seconds:.1f} s compiling)" if self.compiled else "eager (no layout compiled yet)")
        if self.failures:
            text += f"; {len(self.failures)} layout(s) kept eager: {self.failures[0]}"
        return text
