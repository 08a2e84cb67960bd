"""The diagnostics under torch.distributed (DDP, FSDP2): one process on the global batch, and ranks that
fail together.

Each rank passes ITS shard of the batch; the result is what one process computes on the concatenated
(global) batch, whose loss is the size-weighted mean of the shards' mean losses:

* **Parameters**: DDP replicates them; under FSDP2 each sharded parameter (a ``DTensor``) is gathered
  once per operator (:func:`full`, ``DTensor.full_tensor()``), so every rank holds the same parameter
  vector and the same directions. The landscape and the noise scale run on the model with its sharded
  parameters swapped for whole plain copies for the call (:func:`gathered`). Lanczos, Hutchinson and SLQ
  then run unchanged and identically on every rank: their random vectors come from generators seeded with
  the same seed, their dot products and norms are of replicated vectors.
* **Hessian-vector products**: each rank computes the product of ITS shard's loss, weighted by
  ``n_rank / N`` (``N``: the global number of samples, one all_reduce when the operator is built), and
  :func:`reduce_sum` adds them across ranks: ``sum_r (n_r / N) H_r v = H v`` of the global mean loss,
  also for uneven shards.
* **Forward passes**: the model runs through ``torch.func.functional_call`` on plain tensors; FSDP2's
  forward hooks (which would all-gather and swap in their own parameters) are taken off for that call
  (:func:`plain_forward`) and DDP's wrapper is stepped over (:func:`unwrap`), so neither sees a forward
  it did not start.

**Failing together.** A rank that raises inside a diagnostic must not leave the others waiting in a
collective. Every collective of this module is preceded by a *checkpoint* (:func:`checkpoint`): a
2-number all_reduce ``(failed, finished)``. A rank whose local work raised catches the error and brings
``failed = 1`` to the next checkpoint; if any rank failed, every rank raises :class:`RanksFailed` there,
at the same collective. A rank whose error escaped between checkpoints goes straight to the final
checkpoint of its scheduled runner (``finished = 1``); the others meet it at their next checkpoint, see
``failed > 0`` (or ``finished > 0`` while they are not finished) and raise too; such an agreed failure
skips the final checkpoint (:class:`Agreement` remembers it), so the count of collectives stays equal on
every rank. In one process every function here is a no-op or a plain call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
from torch import nn

from ..core.names import is_wrapped

__all__ = ["Agreement", "RanksFailed", "Slice", "active", "all_sum", "attempt", "checkpoint", "full", "gather_rows",
           "gathered", "on_gathered", "plain_forward", "reduce_sum", "sum_number", "unwrap", "world_size"]

T = TypeVar("T")


def active() -> bool:
    """True inside an initialized process group with more than one rank."""
    d = torch.distributed
    return bool(d.is_available() and d.is_initialized() and d.get_world_size() > 1)


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def _device() -> torch.device:
    """Where the small agreement tensors live: the current GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RanksFailed(RuntimeError):
    """A diagnostic failed on at least one rank; every rank raises this at the same collective.
    ``local`` is this rank's own error (None when another rank failed)."""

    def __init__(self, failed: int, world: int, local: Exception | None) -> None:
        self.failed, self.world, self.local = failed, world, local
        mine = f"here: {type(local).__name__}: {local}" if local is not None else "not on this rank"
        super().__init__(f"the diagnostic failed on {failed} of {world} ranks ({mine})")


class Agreement:
    """One attempt of a diagnostic on every rank (opened by the scheduled runner): ``agreed`` is set once a
    checkpoint inside made every rank raise :class:`RanksFailed`, so the runner's final checkpoint is
    skipped on every rank alike."""

    def __init__(self) -> None:
        self.agreed = False
        self._token: contextvars.Token[Agreement | None] | None = None

    def __enter__(self) -> Agreement:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None

    def finish(self, error: Exception | None) -> Exception | None:
        """The final checkpoint, after the attempt: None when every rank succeeded, else the error to report
        (this rank's own, or :class:`RanksFailed` when only another rank failed). One process: ``error``."""
        if not active() or self.agreed:
            return error
        try:
            checkpoint(error, final=True)
        except RanksFailed as exc:
            return error if error is not None else exc
        return error


_CURRENT: contextvars.ContextVar[Agreement | None] = contextvars.ContextVar("dynascope_agreement", default=None)


def checkpoint(error: Exception | None = None, *, final: bool = False) -> None:
    """All ranks meet (one all_reduce of 2 numbers); raise :class:`RanksFailed` on every rank when any rank
    brings an error, or when ranks disagree on whether the diagnostic has finished. In one process: raise
    ``error`` if given."""
    if not active():
        if error is not None:
            raise error
        return
    d = torch.distributed
    flags = torch.tensor([float(error is not None), float(final)], dtype=torch.float64, device=_device())
    d.all_reduce(flags)
    failed, finished = (int(round(v)) for v in flags.tolist())
    world = d.get_world_size()
    if failed == 0 and finished in (0, world):
        return
    if not final:
        agreement = _CURRENT.get()
        if agreement is not None:
            agreement.agreed = True
    if failed == 0:  # a rank left the diagnostic early (its error escaped between checkpoints)
        failed = world - finished if final else finished
    raise RanksFailed(failed, world, error) from error


def attempt(fn: Callable[[], T]) -> T:
    """``fn()`` on this rank, then a checkpoint: a local error is raised on every rank together."""
    if not active():
        return fn()
    try:
        out = fn()
    except RanksFailed:
        raise  # already agreed at a checkpoint inside fn, on every rank
    except Exception as exc:  # noqa: BLE001 - brought to the checkpoint, raised there on every rank
        checkpoint(exc)
        raise  # pragma: no cover - checkpoint raised
    checkpoint()
    return out


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``t`` (one all_reduce on the collective's device, the result on ``t``'s), with no
    checkpoint: for callers whose every rank reaches it (:func:`reduce_sum` is the checkpointed one). One
    process: ``t``."""
    if not active():
        return t
    summed = t.to(_device(), copy=True)  # NCCL reduces on the GPU: a CPU count travels there and back
    torch.distributed.all_reduce(summed)
    return summed.to(t.device)


def reduce_sum(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The sum over ranks of this rank's ``fn()`` (a tensor of the same shape and dtype on every rank), after a
    checkpoint: a rank whose ``fn`` raised never leaves the others in the all_reduce."""
    return all_sum(attempt(fn))


def sum_number(x: float) -> float:
    """The sum over ranks of this rank's number ``x`` (a sample count, a byte count), after a checkpoint; one
    process: ``x``."""
    return float(reduce_sum(lambda: torch.tensor([float(x)], dtype=torch.float64))[0])


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's rows from every rank, concatenated in rank order: the global batch's (logits, features,
    targets of each rank's shard; the rows may differ in number, not in shape otherwise). After a checkpoint;
    one all_gather of the row counts and one per tensor, padded to the longest shard. One process: as given.
    The bytes moved are the global batch's rows: a probe batch is small."""
    if not active():
        return tensors
    rows = {int(t.shape[0]) for t in tensors}
    checkpoint(ValueError(f"gather_rows: tensors of {sorted(rows)} rows") if len(rows) > 1 else None)
    d = torch.distributed
    world = d.get_world_size()
    dev = _device()
    n = torch.tensor([tensors[0].shape[0] if tensors else 0], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(n) for _ in range(world)]
    d.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    out = []
    for t in tensors:
        padded = t.new_zeros((longest, *t.shape[1:]), device=dev)
        padded[: t.shape[0]] = t.to(dev)
        parts = [torch.empty_like(padded) for _ in range(world)]
        d.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:k] for p, k in zip(parts, sizes)]).to(t.device))
    return tuple(out)


class Slice:
    """The coordinates ``[lo, hi)`` of a length-``n`` vector this rank holds of a basis sharded by coordinates:
    all of them in one process (or when ``shard`` is False), else a ``1 / world`` part (``torch.chunk``'s
    split; the last ranks may hold fewer or none). :meth:`coeffs` and :meth:`full` are the basis's two
    reductions over coordinates, each after a checkpoint."""

    def __init__(self, n: int, shard: bool = True) -> None:
        self.n = int(n)
        self.sharded = bool(shard) and active()
        if self.sharded:
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            self.size = -(-self.n // world)  # ceil
            self.lo, self.hi = min(rank * self.size, self.n), min((rank + 1) * self.size, self.n)
        else:
            self.size, self.lo, self.hi = self.n, 0, self.n

    def coeffs(self, basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``B @ v`` of the whole basis ``B`` (rows: basis vectors) and vector ``v``, from this rank's columns
        ``basis`` and entries ``w``: partial products summed over ranks."""
        if not self.sharded:
            return basis @ w
        return reduce_sum(lambda: basis @ w)

    def full(self, part: torch.Tensor) -> torch.Tensor:
        """The whole vector from every rank's ``part`` (its entries ``[lo, hi)``, in rank order:
        :func:`gather_rows` of the entries)."""
        if not self.sharded:
            return part
        return gather_rows(part)[0]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: an all-gather of FSDP2's shards), detached; any
    other tensor detached. Called in the same order on every rank."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return t.detach()
    if isinstance(t, DTensor):
        return t.detach().full_tensor()
    return t.detach()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (the diagnostics call it directly:
    the wrapper's forward would sync buffers and arm its reducer for a backward that never comes) and inside
    ``torch.compile``'s ``OptimizedModule`` (its compiled backward has no double backward, and its donated
    buffers refuse ``create_graph``: the diagnostics run the eager module, whose parameters are the same
    tensors), in any nesting."""
    while True:
        inner = getattr(model, "module" if is_wrapped(model) else "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _fsdp_sharded(model: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """(module, parameter name, sharded DTensor) of every parameter FSDP2 manages in ``model`` (shared ones under
    each of their modules), from FSDP2's per-module state (torch 2.6 to 2.13: ``_fsdp_param_groups`` or
    ``_fsdp_param_group``, each ``fsdp_params`` with ``sharded_param`` and ``_module_info``)."""
    out: list[tuple[nn.Module, str, Any]] = []
    for m in _fsdp_modules(model):
        state = m._get_fsdp_state()  # type: ignore[operator]
        groups = list(getattr(state, "_fsdp_param_groups", None) or [])
        if not groups and getattr(state, "_fsdp_param_group", None) is not None:
            groups = [state._fsdp_param_group]
        for group in groups:
            for fp in group.fsdp_params:
                info = fp._module_info
                out.append((info.module, info.param_name, fp.sharded_param))
                out += [(sm, sn, fp.sharded_param) for sm, sn in zip(info.shared_modules, info.shared_param_names)]
    return out


@contextlib.contextmanager
def plain_forward(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without FSDP2's forward hooks (restored on exit, in their order, also when the body raises).

    FSDP2 all-gathers its parameters in a forward pre-hook and swaps its own unsharded tensors into the
    modules, which would replace the plain tensors ``functional_call`` puts there ("got mixed torch.Tensor
    and DTensor"). The diagnostics pass every parameter and buffer themselves, so the hooks have nothing to
    do. The hooks are found by the handles FSDP2 keeps on its per-module state (torch 2.6 to 2.13)."""
    saved: list[tuple[dict[int, Any], dict[int, Any]]] = []
    for m in _fsdp_modules(model):
        state = m._get_fsdp_state()  # type: ignore[operator]
        ids: set[int] = set()
        for handle in (getattr(state, "_pre_forward_hook_handle", None),
                       getattr(state, "_post_forward_hook_handle", None)):
            for h in getattr(handle, "handles", (handle,)):
                if h is not None and hasattr(h, "id"):
                    ids.add(h.id)
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            if ids & set(hooks):
                saved.append((hooks, dict(hooks)))
                for i in ids & set(hooks):
                    del hooks[i]
    try:
        yield
    finally:
        for hooks, before in saved:
            hooks.clear()
            hooks.update(before)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as one process holds it, for the duration of a diagnostic: under FSDP2 every sharded
    parameter (a ``DTensor``) is swapped on its module for a plain ``nn.Parameter`` holding the whole tensor
    (``full_tensor()``, an all-gather per parameter in module order, the same on every rank; a parameter
    shared by several modules gathered once) and FSDP2's forward hooks are taken off (:func:`plain_forward`),
    so the diagnostic's own code (in-place moves of the weights, ``state_dict()``, ``torch.autograd.grad``)
    runs unchanged on replicated tensors. On exit the sharded parameters are put back, also when the body
    raises; what the body wrote into the plain copies is dropped (training's shards are never touched).
    Without sharded parameters: ``model`` as it is, nothing swapped. Memory: one unsharded copy of the
    parameters per rank while the body runs.

    FSDP2 keeps its own record of whether a module is sharded (not the module's attribute), so its
    state-dict hooks leave the plain copies in place; gradients never reach FSDP2's reduce-scatter (its
    backward hooks are registered by the forward hooks that are off)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        yield model
        return
    swaps: list[tuple[nn.Module, str, Any]] = []
    copies: dict[int, nn.Parameter] = {}
    # (module, name, the sharded DTensor): FSDP2's own record of each parameter (whatever the module holds now:
    # a forward without backward leaves the root's parameters unsharded, in a MixedPrecisionPolicy's compute
    # dtype), then any other DTensor parameter
    sharded = _fsdp_sharded(model)
    seen = {(id(m), name) for m, name, _ in sharded}
    sharded += [(m, name, p) for m in model.modules() for name, p in m._parameters.items()
                if isinstance(p, DTensor) and (id(m), name) not in seen]
    if sharded and active():
        checkpoint()  # the gathers are collectives: a rank that failed before them fails every rank here
    try:
        for m, name, p in sharded:
            plain = copies.get(id(p))
            if plain is None:
                plain = copies[id(p)] = nn.Parameter(full(p), requires_grad=p.requires_grad)
            swaps.append((m, name, m._parameters[name]))
            m._parameters[name] = plain
        if not swaps:
            yield model
            return
        with plain_forward(model):
            yield model
    finally:
        for m, name, p in reversed(swaps):
            m._parameters[name] = p


F = TypeVar("F", bound=Callable[..., Any])


def on_gathered(fn: F) -> F:
    """``fn(model, ...)`` run inside :func:`gathered` (``model``, its first argument, with FSDP2's sharded
    parameters whole and plain for the call): a public diagnostic function written for plain tensors works
    under FSDP2 unchanged."""

    @functools.wraps(fn)
    def call(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with gathered(model):
            return fn(model, *args, **kwargs)

    return cast(F, call)
