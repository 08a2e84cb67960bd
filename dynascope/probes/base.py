"""The probe protocol: how a stateful collector plugs into a session.

A probe is armed before the forward pass of a step that records and disarmed
after it, so steps that do not record pay nothing (no hooks attached). At the
end of a recording step ``collect`` returns the step's statistics as ONE
device tensor with a key per entry; the session keeps it on the device until a
flush moves everything to the host in one transfer (architecture invariant 2).

Write your own probe by subclassing :class:`Probe`::

    class WeightMax(Probe):
        name = "weight_max"
        def collect(self, step):
            ps = [p for p in self.session.model.parameters()]
            return Collected([("weight.absmax", "")], torch.stack([p.detach().abs().max() for p in ps]).max()[None])

and pass it as ``dynascope.probe(model, opt, probes=("activations", WeightMax()))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..distributed import Reducible
    from ..session import Session

__all__ = ["Probe", "Collected", "Row"]

Row = tuple[str, str, float]  # metric, layer, value


@dataclass
class Collected:
    """One recording step's output of a probe.

    ``keys[i]`` is the ``(metric, layer)`` of ``values[i]`` (a 1-D device
    tensor). ``post``, if given, runs on the host at flush time with the
    transferred values (``{(metric, layer): float}``) and returns extra rows
    computed from them and host-side data (e.g. learning rates), so no extra
    host-device transfer is needed.
    """

    keys: list[tuple[str, str]]
    values: torch.Tensor
    post: Callable[[Mapping[tuple[str, str], float]], list[Row]] | None = None
    # under torch.distributed: statistics to combine across ranks at the flush,
    # whose finish() gives the values (``values`` is then ignored); see dynascope.distributed
    reduce: Reducible | None = None


class Probe:
    """Base class of probes. Override what you need; every method is optional
    except ``collect``."""

    name: str = "probe"
    session: Session

    def setup(self, session: Session) -> None:
        """Called once when the session starts; ``session.model``,
        ``session.optimizer`` and ``session.module_names`` are available."""
        self.session = session

    def arm(self) -> None:
        """Attach hooks before a recording step's forward pass."""

    def disarm(self) -> None:
        """Remove the hooks attached by ``arm``."""

    def collect(self, step: int) -> Collected | None:
        """Return this step's statistics, or None when there is nothing."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything (hooks, references); also called on exceptions."""
        self.disarm()
