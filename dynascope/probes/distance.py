"""Distance from initialisation (opt-in probe ``"distance"``; Hoffer, Hubara
and Soudry 2017, Train longer, generalize better: ||w_t - w_0|| grows like
log t, a "random walk on a random potential").

Recorded at the end of every recording step ``t`` (after that step's update):

* ``weight.distance_init`` (layer = parameter name) = ||w - w_0||_F per tracked
  weight tensor (ndim >= 2, or every trainable parameter with ``all_params``);
* ``weight.distance_init`` (layer ``""``) = sqrt(sum over tracked tensors of
  ||w - w_0||^2), the distance of the whole network.

``w_0`` is the weights when the probe starts (before step 0's update). It is
saved once in the run directory (``distance_init.pt``, loaded with
``weights_only=True``), so a resumed run (``resume=True``) keeps measuring from
the true initialisation; if that file is missing or its shapes do not match,
the weights at resume are ``w_0`` and the run metadata says so
(``coverage.distance.origin``).

Under torch.distributed each rank adds the squared differences it counts (FSDP2: its shards; DDP: rank 0 the
replicated weights) and the flush's reducer sums them before the square roots: the whole network's
distances. Under FSDP2 ``distance_init.pt`` is not written (rank 0 holds only its shards).

Memory: one persistent copy of the tracked weights on their device (the same
size as the tracked parameters), plus a transient copy of them on recording
steps (the differences, by ``torch._foreach_sub``, freed after the
``torch._foreach_norm``), and the same size once on disk.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..core.coverage import CoverageRow
from ._groups import ParamLayout
from .base import Collected, Probe, ProbeContext, Stat

__all__ = ["DistanceProbe", "INIT_FILE"]

INIT_FILE = "distance_init.pt"
_HALF = (torch.float16, torch.bfloat16)


class DistanceProbe(Probe):
    """||w_t - w_0|| per tracked tensor and for the whole network."""

    name = "distance"

    def __init__(self, all_params: bool = False, save_init: bool = True) -> None:
        self.all_params = all_params
        self.save_init = save_init
        self.tracked: list[tuple[str, torch.nn.Parameter]] = []
        self.init: list[torch.Tensor] = []
        self.origin = "start"

    def setup(self, ctx: ProbeContext) -> None:
        super().setup(ctx)
        self.tracked = [(n, p) for n, p in ctx.param_names
                        if p.requires_grad and (p.ndim >= 2 or self.all_params)]
        # under torch.distributed each rank sums the squared differences it counts (FSDP2: its shards; DDP:
        # rank 0 the replicated weights), the reducer adds the ranks' sums, the square roots come after
        self._layout = ParamLayout([p for _, p in self.tracked], ctx.rank)
        device = self.tracked[0][1].device if self.tracked else torch.device("cpu")
        self._weight = torch.tensor([1.0 if c else 0.0 for c in self._layout.contributes], dtype=torch.float64,
                                    device=device)  # made once on the weights' device: no copy per step
        path = os.path.join(ctx.run_dir, INIT_FILE) if ctx.run_dir else None
        resumed = ctx.resumed  # the writing rank's: its rows are the recorded ones
        loaded = self._load(path) if resumed and path else None
        if loaded is not None:
            self.init = loaded
            self.origin = "saved initial weights (distance_init.pt)"
        else:
            self.init = [w.clone() for w in self._layout.local([p.detach() for _, p in self.tracked])]
            self.origin = "weights at resume (no matching distance_init.pt)" if resumed else "weights at start"
            if resumed:
                warnings.warn(f"dynascope: distance probe resumed without a matching {INIT_FILE} in the run "
                              "directory; weight.distance_init is measured from the weights at resume",
                              RuntimeWarning, stacklevel=2)
            if self._layout.any_sharded:  # rank 0 holds only its shards: a resumed run measures from there
                self.origin += " (FSDP2: not saved for resuming)"
            elif ctx.writer and path and self.save_init:
                try:
                    tmp = path + ".tmp"
                    torch.save({n: w.detach().cpu() for (n, _), w in zip(self.tracked, self.init)}, tmp)
                    os.replace(tmp, path)
                except OSError as exc:  # a storage fault never stops training: resuming then measures from there
                    warnings.warn(f"dynascope: distance probe could not save {INIT_FILE} ({exc}); a resumed run "
                                  "will measure from the weights at resume", RuntimeWarning, stacklevel=2)
        self.init_copy_bytes = sum(w.numel() * w.element_size() for w in self.init)

    def coverage(self) -> list[CoverageRow]:
        return [CoverageRow("metric", "weight.distance_init", True,
                            f"measured from the {self.origin}; {len(self.tracked)} tensors, "
                            f"{self.init_copy_bytes} bytes held for w_0", self.name)]

    def _load(self, path: str) -> list[torch.Tensor] | None:
        if not os.path.exists(path):
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged file: fall back to the weights at resume (and say so)
            return None
        out = []
        for name, p in self.tracked:
            w = saved.get(name) if isinstance(saved, dict) else None
            if not isinstance(w, torch.Tensor) or w.shape != p.shape:
                return None
            out.append(w.to(device=p.device, dtype=p.dtype))
        return out

    def collect(self, step: int) -> Collected | None:
        if not self.tracked:
            return None
        params = self._layout.local([p.detach() for _, p in self.tracked])
        init = self.init
        with torch.no_grad():
            if any(p.dtype in _HALF for p in params):  # differences of half weights in float32
                params = [p.float() for p in params]
                init = [w.float() for w in init]
            diffs = torch._foreach_sub(params, init)
            sq = torch.stack([n.double() for n in torch._foreach_norm(diffs)]).square()
            del diffs
            sq = sq * self._weight
            sums = torch.cat([sq, sq.sum()[None]])
        keys = [("weight.distance_init", n) for n, _ in self.tracked] + [("weight.distance_init", "")]
        return Collected(keys, stats={"sq": Stat("sum", sums)}, finish=lambda r: r["sq"].sqrt())

    def close(self) -> None:
        self.init = []
