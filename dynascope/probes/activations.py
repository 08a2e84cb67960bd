"""Activation statistics per module output (signal propagation).

For an output ``x`` with channel dimension ``c`` (1 for conv/BatchNorm outputs,
the last dimension otherwise), the hook keeps per-channel sufficient
statistics on the device: count ``n``, mean ``mu_c`` and sum of squared
deviations ``M2_c``, merged across calls with Chan et al.'s parallel update.
At the end of the step, with ``var_c = M2_c / n`` (ddof=0):

* ``act.channel_sq_mean`` = mean_c mu_c^2         (Brock et al. 2021, SPP)
* ``act.channel_var``     = mean_c var_c          (Brock et al. 2021, SPP)
* ``act.mean``            = mean_c mu_c
* ``act.var``             = mean_c var_c + mean_c mu_c^2 - (mean_c mu_c)^2
  (the population variance of all entries: equal counts per channel)
* ``act.absmax``          = max |x|
* ``act.zero_frac``       = fraction of exact zeros

Reference: deepmind-research nfnets/base.py ``signal_metrics`` (NHWC there,
so the reduction over N, H, W is over dims (0, 2, 3) in NCHW).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.coverage import CoverageRow
from ..core.names import ModuleFilter, select_modules
from ..core.outputs import first_tensor
from ._fused import DEFER_MAX_ELEMENTS, FusedStatistics, resolve_mode
from .base import Collected, Probe, ProbeContext, Stat

__all__ = ["ActivationProbe", "channel_dim", "ACT_METRICS"]

ACT_METRICS = ("act.mean", "act.var", "act.channel_sq_mean", "act.channel_var", "act.absmax", "act.zero_frac")

_HALF = (torch.float16, torch.bfloat16)
_CHANNEL_FIRST = ("Conv", "BatchNorm", "InstanceNorm", "Pool", "GroupNorm", "Upsample", "PixelShuffle")


def channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    """Channel dimension of ``module``'s output: 1 for conv-like outputs (NCHW,
    NCL), the last dimension otherwise (sequences ``(N, L, D)``, features ``(N, D)``)."""
    if x.ndim >= 4:
        return 1
    if x.ndim == 3 and any(k in type(module).__name__ for k in _CHANNEL_FIRST):
        return 1
    return x.ndim - 1 if x.ndim > 0 else 0


# On CPU, torch.var_mean's Welford reduction is far slower than summations
# (measured at one thread: 218 us against 2.6 us for a plain sum of a 128x64
# output over dim 0; 30 ms against 4 ms for 32x32x32x32 over (0, 2, 3)), so CPU
# outputs above a few thousand entries use sums (float64 up to 32768 entries,
# shifted float32 above); CUDA keeps var_mean (one kernel), and tiny outputs too.
_FAST_COUNT_MIN_NUMEL = 16384  # below, count_nonzero is as fast (8.9 vs 10.2 us at 8192 entries; 27.6 vs 21.0 at 32768)
_SMALL_NUMEL = 2048  # up to here var_mean (one kernel) is the cheapest
_SHIFTED_MIN_NUMEL = 32768  # up to here float64 sums (16 us against 55 us for 128x64), above: shifted float32 sums
#: a larger output is reduced a block at a time on the eager path (temporaries ~1 MB: the ~50M transformer's
#: first recording forward adds 36 MB of peak RSS, against 105 MB with 1M-entry blocks, which the allocator kept)
BLOCK_ELEMENTS = 1 << 18


def _float64_var_mean(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (ddof=0) variance and mean from float64 sums: E[x^2] - E[x]^2
    cancels only at |mean| / std ~ 1e7 in float64. For mid-sized CPU outputs."""
    y = x.to(torch.float64, copy=True)  # a copy also for float64 outputs: square_ must not touch the model's tensor
    m = y.mean(dims)
    return y.square_().mean(dims) - m * m, m


def shifted_var_mean(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (ddof=0) variance and mean over ``dims`` from sums of the data
    shifted by one sample per channel K_c: var = E[(x-K)^2] - E[x-K]^2. The shift
    keeps E[x-K] of the order of the standard deviation, so the difference does
    not cancel the way raw float32 sums of squares do when |mean| >> std
    (measured 1e-6 relative to a float64 reference; tested at mean/std > 100).
    The variance may come out a rounding error below 0; ``collect`` clamps it.
    (Measured on an idle 2-thread CPU, 32x32x32x32 ReLU output: squaring the shifted
    copy in place and two means cost 0.52 ms where ``vector_norm(y, 2, dims)`` costs
    0.67 ms; kept.) An output above BLOCK_ELEMENTS entries whose first dimension is
    reduced is read a block of that dimension at a time (the block sums added in
    float64): the shifted copy stays a few MB, not the size of the output."""
    index = tuple(0 if d in dims else slice(None) for d in range(x.ndim))
    shift = x[index]
    shape = [1 if d in dims else -1 for d in range(x.ndim)]
    k = shift.reshape(shape)
    if x.numel() > BLOCK_ELEMENTS and 0 in dims and x.shape[0] > 1:
        rows = max(1, BLOCK_ELEMENTS // max(x[0].numel(), 1))
        s1 = s2 = None
        for a in range(0, x.shape[0], rows):
            y = x[a:a + rows] - k
            p1 = y.sum(dims, dtype=torch.float64)
            p2 = y.square_().sum(dims, dtype=torch.float64)
            del y
            s1, s2 = (p1, p2) if s1 is None else (s1 + p1, s2 + p2)
        n = x.numel() // shift.numel()
        m = s1 / n
        return (s2 / n - m * m).to(x.dtype), (m + shift.reshape(m.shape)).to(x.dtype)
    y = x - k
    m = y.mean(dims)
    y.square_()
    return y.mean(dims) - m * m, m + shift.reshape(-1)


def _count_nonzero(x: torch.Tensor) -> torch.Tensor:
    """Number of non-zero entries (NaN counts as non-zero, as in ``count_nonzero``).

    On the CPU ``torch.count_nonzero`` is slow: 3.96 ms for a 1M-entry ReLU output
    against 0.67 ms for a float32 sum of |sign(x)| (idle machine, 2 threads; the
    0-"norm" ``vector_norm(x, 0)`` takes 4.49 ms). The float32 sum of ones is exact
    below 2^24 entries per summation block (torch's cascade sum). CPU ``sign`` maps
    NaN to 0, so this count treats NaN as zero; ``finish`` reports the zero fraction
    of an output holding NaN as NaN on every path."""
    if x.device.type != "cpu" or x.numel() <= _FAST_COUNT_MIN_NUMEL:
        return torch.count_nonzero(x)
    flat = x.reshape(-1)
    total = None
    for a in range(0, flat.numel(), BLOCK_ELEMENTS):  # a block at a time: the |sign| copy stays small
        s = flat[a:a + BLOCK_ELEMENTS].sign()
        s.abs_()
        part = s.sum(dtype=torch.float64)
        total = part if total is None else total + part
    return total


def _absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| from one ``aminmax`` (0.29 ms for 1M entries on an idle 2-thread CPU, where the
    inf-norm ``vector_norm(x, inf)`` takes 2.18 ms); NaN when x holds NaN."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi, -lo)


def _eager_statistics(x: torch.Tensor, cdim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (ddof=0) variance and mean, max |x| and the non-zero count of one output, op by op
    (the path before an output's layout is compiled, and where it is not: see ``_fused``)."""
    if x.dtype in _HALF:
        x = x.float()
    if cdim >= 0:
        dims = tuple(d for d in range(x.ndim) if d != cdim)
        numel = x.numel()
        if numel <= _SMALL_NUMEL or x.device.type != "cpu":
            var, mean = torch.var_mean(x, dim=dims, correction=0)
        elif numel <= _SHIFTED_MIN_NUMEL:
            var, mean = _float64_var_mean(x, dims)
        else:
            var, mean = shifted_var_mean(x, dims)
    else:  # a 1-D output: a single "example", each entry a channel
        mean, var = x, torch.zeros_like(x)
    return var, mean, _absmax(x), _count_nonzero(x)


def _keep(states: dict[str, _State], name: str, var: torch.Tensor, mean: torch.Tensor, absmax: torch.Tensor,
          nnz: torch.Tensor, numel: int) -> None:
    """Add one call's statistics to the module's state of the step (Chan's merge; a call with another number
    of channels replaces it)."""
    n = float(numel // max(mean.numel(), 1))
    old = states.get(name)
    if old is None or old.mean.shape != mean.shape:
        states[name] = _State(n, mean, var, absmax, nnz, numel)
    else:
        old.merge(n, mean, var, absmax, nnz, numel)


class _State:
    """Sufficient statistics of one module's outputs in one step. The hook
    stores raw reductions: per-channel mean and (ddof=0) variance, max |x| and
    the non-zero count."""

    __slots__ = ("n", "mean", "var", "absmax", "nnz", "numel")

    def __init__(self, n: float, mean: torch.Tensor, var: torch.Tensor, absmax: torch.Tensor,
                 nnz: torch.Tensor, numel: int) -> None:
        self.n, self.mean, self.var, self.absmax, self.nnz, self.numel = n, mean, var, absmax, nnz, numel

    def merge(self, n: float, mean: torch.Tensor, var: torch.Tensor, absmax: torch.Tensor,
              nnz: torch.Tensor, numel: int) -> None:
        """Chan et al.'s parallel merge of (n, mean, M2) with another call's statistics."""
        na, nb = self.n, n
        tot = na + nb
        delta = mean - self.mean
        self.mean = self.mean + delta * (nb / tot)
        self.var = (self.var * na + var * nb + delta * delta * (na * nb / tot)) / tot
        self.n = tot
        self.absmax = torch.maximum(self.absmax, absmax)
        self.nnz = self.nnz + nnz
        self.numel += numel


class ActivationProbe(Probe):
    """Forward hooks on the selected modules, attached only on recording steps.

    ``fused`` (default: the environment variable ``DYNASCOPE_FUSED``, else ``"auto"``): ``"auto"`` computes
    an output's statistics op by op until that output layout's eager cost reaches the time a compile takes,
    then from one compiled kernel per layout (one read of the output; ``probes/_fused.py``); ``"on"`` compiles
    every layout when first seen; ``"off"`` never compiles. The coverage report says which layouts were fused
    and why any stayed eager."""

    name = "activations"

    def __init__(self, modules: ModuleFilter = None, fused: str | None = None) -> None:
        self.filter = modules
        self.fused = FusedStatistics(resolve_mode(fused))
        self._handles: list[Any] = []
        self._states: dict[str, _State] = {}
        self._order: list[str] = []  # the step's modules in the order of their first call
        self._step_names: set[str] = set()
        self._layouts: dict[Any, dict[str, Any]] = {}
        self._seen: set[str] = set()
        self._skipped: dict[str, str] = {}
        self.on = False
        self._warned_empty = False
        self._collected = False  # a recording step has ended: what was not seen by then is not recorded

    def setup(self, ctx: ProbeContext) -> None:
        super().setup(ctx)
        self.modules = select_modules(ctx.model, self.filter)

    def arm(self) -> None:
        self.on = True
        if self._handles:
            return
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._make_hook(name, module)))

    def disarm(self) -> None:
        # the switch matters under torch.compile: a graph traced with the hooks inlined keeps running them
        # after they are removed, but Dynamo guards on this attribute, so the "off" graph skips them
        self.on = False
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str, module: nn.Module):  # noqa: ANN202
        states = self._states
        order = self._order
        step_names = self._step_names
        cdim_of: dict[int, int] = {}  # output ndim -> channel dimension (-1: a 1-D output), resolved once per module
        fused = self.fused

        skipped = self._skipped
        probe = self

        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            if not probe.on:
                return
            x = output if type(output) is torch.Tensor else first_tensor(output)
            if x is None or not x.is_floating_point():
                if name not in skipped:
                    skipped[name] = ("its output holds no tensor" if x is None
                                     else f"its output is not a floating tensor ({x.dtype})")
                return
            numel = x.numel()
            if numel == 0:
                skipped.setdefault(name, "its output is empty")
                return
            x = x.detach()  # no graph: cheaper than entering torch.no_grad() per call
            cd = cdim_of.get(x.ndim)
            if cd is None:
                cd = cdim_of[x.ndim] = channel_dim(module, x) if x.ndim > 1 else -1
            if name not in step_names:  # first call of this module in the step: its place in the rows
                step_names.add(name)
                order.append(name)
            entry = fused.kernel(x, cd) if cd >= 0 else None
            if entry is not None and numel <= DEFER_MAX_ELEMENTS and fused.hot(entry) \
                    and fused.defer(entry[0], x, name):
                return  # a copy in its layout's buffer, reduced with the others at the end of the step
            var, mean, absmax, nnz = fused.statistics(entry, x, cd, lambda: _eager_statistics(x, cd))
            _keep(states, name, var, mean, absmax, nnz, numel)

        return hook

    def collect(self, step: int) -> Collected | None:
        self._collected = True
        with torch.no_grad():
            blocks = self._blocks()
        self._step_names.clear()
        if not self._states and not blocks:
            if not self._warned_empty and not self._skipped and self.modules:
                self._warned_empty = True
                warnings.warn(f"dynascope: no module output was seen during recording step {step}, so it has no "
                              "activation statistics: no forward pass of the probed model in this step, or a "
                              "forward that does not call module hooks (a graph from torch.export or AOTInductor, "
                              "or a torch.compile graph traced without them). The coverage report lists the "
                              "modules never seen as not recorded. Warned once.", RuntimeWarning, stacklevel=3)
            return None
        singles = [n for n in self._order if n in self._states]
        states = [self._states[n] for n in singles]
        self._states.clear()  # in place: the armed hooks hold this dict
        self._order.clear()
        # the rows: each batched block as it is (one row per module), then the modules reduced in their hooks
        names = [n for b in blocks for n in b[0]] + singles
        self._seen.update(names)
        with torch.no_grad():
            device = (blocks[0][1][1] if blocks else states[0].mean).device
            # float64 over the (few) channel values: act.var = mean var_c + mean mu_c^2 - (mean mu_c)^2
            # cancels in float32 when |mean| >> std (e.g. 0.3477 instead of 0.3445 at mean 200)
            acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            sizes = tuple(size for b in blocks for size in (b[1][1].shape[1],) * len(b[0])) \
                + tuple(s.mean.numel() for s in states)
            counts = tuple(n for b in blocks for n in (float(b[2] // b[1][1].shape[1]),) * len(b[0])) \
                + tuple(s.n for s in states)
            lay = self._layout(sizes, counts, device, acc)
            mus = torch.cat([b[1][1].reshape(-1) for b in blocks] + [s.mean.reshape(-1) for s in states]).to(acc)
            vars_ = torch.cat([b[1][0].reshape(-1) for b in blocks]
                              + [s.var.reshape(-1) for s in states]).to(acc).clamp_min_(0)
            moments = torch.stack([lay["n"], mus, vars_ * lay["n"]], dim=1)
            absmax = torch.cat([b[1][2].to(acc) for b in blocks]
                               + ([torch.stack([s.absmax for s in states]).to(acc)] if states else []))
            nnz = torch.cat([b[1][3].to(acc) for b in blocks]
                            + ([torch.stack([s.nnz.to(acc) for s in states])] if states else []))
            zeros = torch.stack([lay["numel"] - nnz, lay["numel"]], dim=1)
        stats = {"moments": Stat("moments", moments), "absmax": Stat("max", absmax),
                 "zeros": Stat("sum", zeros)}
        keys = [(m, n) for n in names for m in ACT_METRICS]
        return Collected(keys, stats=stats, finish=lay["finish"])

    def _blocks(self) -> list[tuple[list[str], tuple[torch.Tensor, ...], int]]:
        """The step's deferred outputs (:meth:`FusedStatistics.drain`) as whole blocks where each of their
        modules was called once in the step (one row each, nothing to merge); the rows of a module called
        several times, or also reduced in its hook, are merged into its state (Chan) one by one."""
        drained = self.fused.drain()
        states = self._states
        calls = Counter(n for names, _, _ in drained for n in names)
        blocks = []
        for names, stats, numel in drained:
            if all(calls[n] == 1 and n not in states for n in names):
                blocks.append((names, stats, numel))
                continue
            rows = [t.unbind(0) for t in stats]
            for i, name in enumerate(names):
                _keep(states, name, rows[0][i], rows[1][i], rows[2][i], rows[3][i], numel)
        return blocks

    def _layout(self, sizes: tuple[int, ...], counts: tuple[float, ...], device: torch.device,
                acc: torch.dtype) -> dict[str, Any]:
        """Device tables of one layout (channels per module, examples per channel,
        elements per module) and its ``finish``: built once per layout."""
        key = (sizes, counts, device, acc)
        hit = self._layouts.get(key)
        if hit is not None:
            return hit
        n_mod = len(sizes)
        seg = torch.repeat_interleave(torch.arange(n_mod, device=device), torch.tensor(sizes, device=device))
        per_mod = torch.tensor(sizes, dtype=acc, device=device)

        def finish(r: Mapping[str, torch.Tensor]) -> torch.Tensor:
            """The activation formulas (module docstring) from per-channel moments."""
            mom = r["moments"]
            dev = mom.device
            seg_d, per_d = (seg, per_mod) if dev == device else (seg.to(dev), per_mod.to(dev))
            n, mu, m2 = mom.unbind(1)
            var_c = (m2 / n).clamp_min(0)
            sums = torch.zeros(n_mod, 3, device=dev, dtype=mom.dtype)
            sums.index_add_(0, seg_d, torch.stack([mu, mu * mu, var_c], dim=1))
            mean, sq_mean, ch_var = (sums / per_d.to(mom.dtype)[:, None]).unbind(1)
            var = ch_var + sq_mean - mean * mean
            absmax = r["absmax"]
            zeros, numel = r["zeros"].unbind(1)
            # an output holding NaN has an undefined zero fraction (the fast CPU count sees NaN as zero)
            zero_frac = torch.where(torch.isnan(absmax), torch.full_like(absmax, float("nan")), zeros / numel)
            return torch.stack([mean, var, sq_mean, ch_var, absmax.to(mean.dtype), zero_frac.to(mean.dtype)],
                               dim=1).reshape(-1).float()

        numels = [float(c * s) for c, s in zip(counts, sizes)]
        lay = {"n": torch.repeat_interleave(torch.tensor(counts, dtype=acc, device=device),
                                            torch.tensor(sizes, device=device)),
               "numel": torch.tensor(numels, dtype=acc, device=device), "finish": finish}
        if len(self._layouts) > 8:
            self._layouts.clear()
        self._layouts[key] = lay
        return lay

    def coverage(self) -> list[CoverageRow]:
        # before the first recording step ends, the hooked modules count as recorded (nothing revealed yet)
        started = bool(self._seen or self._skipped or self._collected)
        blind = not (self._seen or self._skipped)  # no hook ran at all: every module unseen, whatever its place
        rows = []
        for name, _ in self.modules:
            if name in self._seen or not started:
                rows.append(CoverageRow("module", name, True, "", self.name))
            else:
                reason = self._skipped.get(name, "no output seen in any recording step (no forward pass, or one "
                                           "that does not call module hooks)" if blind else
                                           "not called in the forward pass of any recording step")
                rows.append(CoverageRow("module", name, False, reason, self.name))
        if self.modules:
            rows.append(CoverageRow("metric", "act.*", True, f"statistics: {self.fused.describe()}", self.name))
        return rows

    def close(self) -> None:
        self.disarm()
        self._states.clear()
        self._order.clear()
        self._step_names.clear()
        self.fused.reset()
