"""Safe checkpoint loading for ``dynascope analyze``.

* Files load with ``torch.load(..., weights_only=True)`` (tensors, containers
  and primitive types only; no code runs) or, for ``.safetensors``, with the
  optional ``safetensors`` package. Unpickling arbitrary objects, which can
  execute code from the file, happens only with ``trust=True``.
* The state dict is found in the usual containers: a bare state dict, or under
  ``state_dict`` (PyTorch Lightning ``.ckpt``), ``model_state_dict``, ``model``,
  ``module``, ``net``; a Hugging Face directory with ``model.safetensors`` or
  ``pytorch_model.bin`` (sharded ones through their ``*.index.json``).
* :func:`match_state_dict` strips ``module.`` (DataParallel / DDP),
  ``_orig_mod.`` (``torch.compile``) and Lightning's ``model.`` prefixes when
  that makes the keys match the model, and lists the first mismatches otherwise.
* The step comes from the file (``step``, ``global_step``, ``epoch`` keys, or a
  Hugging Face ``trainer_state.json``), else from digits in its name; the caller
  falls back to modification-time order. ``Checkpoint.step_source`` says which.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "NotACheckpointError",
    "UnsafeCheckpointError",
    "KeyMismatchError",
    "CHECKPOINT_SUFFIXES",
    "find_checkpoints",
    "load_checkpoint",
    "extract_state_dict",
    "match_state_dict",
    "step_from_name",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar", ".pkl")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
STEP_KEYS = ("step", "global_step", "epoch")
PREFIXES = ("module.", "_orig_mod.", "model.")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line that names the file."""


class NotACheckpointError(CheckpointError):
    """The file is missing, corrupt, or holds no state dict."""


class UnsafeCheckpointError(CheckpointError):
    """Reading the file needs full unpickling, which can run code from it."""


class KeyMismatchError(CheckpointError):
    """The state dict's keys or shapes do not match the model."""


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    step: int | None
    step_source: str          # e.g. "file key 'global_step'", "file name", "" when unknown
    container: str            # where the state dict was found: "bare", "state_dict", ...
    trusted: bool = False     # loaded with full unpickling (trust=True)
    info: dict[str, Any] = field(default_factory=dict)


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in HF_WEIGHT_FILES)


def find_checkpoints(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories into checkpoint paths.

    A file is taken as given. A Hugging Face model directory is one checkpoint.
    Any other directory contributes its files with a checkpoint suffix
    (``.pt .pth .bin .ckpt .safetensors .tar .pkl``) and its Hugging Face
    subdirectories (e.g. ``checkpoint-500/``). Raises NotACheckpointError for a
    missing path or a directory without checkpoints.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise NotACheckpointError(f"{str(p)!r} does not exist")
        if p.is_file():
            out.append(p)
        elif _is_hf_dir(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(
                c for c in p.iterdir()
                if (c.is_file() and c.name.endswith(CHECKPOINT_SUFFIXES) and not c.name.startswith("."))
                or _is_hf_dir(c)
            )
            if not found:
                raise NotACheckpointError(
                    f"no checkpoints in directory {str(p)!r} (looked for {', '.join(CHECKPOINT_SUFFIXES)} files "
                    "and Hugging Face model folders)"
                )
            out.extend(found)
    seen: set[Path] = set()
    unique = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return unique


def _first_line(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception, at most ~120 characters."""
    text = str(exc).strip().splitlines()
    head = text[0].split(". ")[0].rstrip(".") if text else ""
    if len(head) > 120:
        head = head[:117] + "..."
    return f"{type(exc).__name__}: {head}".rstrip(": ")


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4"
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if trust:
            raise NotACheckpointError(f"{str(path)!r} could not be unpickled ({_first_line(exc)})") from exc
        g = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", msg)
        if g:
            raise UnsafeCheckpointError(
                f"{str(path)!r} contains a pickled Python object ({g.group(1)}) that weights_only loading refuses; "
                "reading it would unpickle code from the file, which can execute anything: pass "
                "--trust-checkpoint (trust=True) only if you trust where the file came from"
            ) from exc
        op = re.search(r"Unsupported operand (\d+)", msg)
        if op:
            raise UnsafeCheckpointError(
                f"{str(path)!r} is not a weights-only torch.save file (pickle opcode {op.group(1)} is refused: a "
                "plain pickle, or a corrupt file); reading it would need full unpickling, which can execute code: "
                "pass --trust-checkpoint (trust=True) only if you trust where the file came from"
            ) from exc
        raise NotACheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint ({_first_line(exc)})") from exc
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, AttributeError, ImportError,
            ModuleNotFoundError, TypeError, IndexError) as exc:
        if isinstance(exc, OSError) and not path.exists():
            raise NotACheckpointError(f"{str(path)!r} does not exist") from exc
        raise NotACheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint or is corrupt ({_first_line(exc)})"
        ) from exc


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file and the optional package 'safetensors' is not installed: "
            "pip install safetensors (or dynascope[safetensors])"
        ) from exc
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, meta
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise NotACheckpointError(f"{str(path)!r} is not a valid safetensors file ({_first_line(exc)})") from exc


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    if not all(isinstance(k, str) for k in obj):
        return False
    values = list(obj.values())
    tensors = sum(isinstance(v, torch.Tensor) for v in values)
    # allow the odd non-tensor entry (e.g. ``_extra_state``), but mostly tensors
    return tensors > 0 and tensors >= 0.9 * len(values)


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in a loaded checkpoint; returns it and where it was.

    Looks at the object itself, then (recursively, two levels) under
    ``state_dict``, ``model_state_dict``, ``model``, ``module``, ``net``,
    ``network``; an ``nn.Module`` (only possible with ``trust=True``) gives
    its ``state_dict()``. Raises NotACheckpointError listing the keys found.
    """
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), "module object"
    if _is_state_dict(obj):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, "bare"
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if key in obj:
                sub = obj[key]
                if isinstance(sub, nn.Module):
                    return dict(sub.state_dict()), key
                if _is_state_dict(sub):
                    return {k: v for k, v in sub.items() if isinstance(v, torch.Tensor)}, key
                if isinstance(sub, Mapping):
                    for key2 in CONTAINER_KEYS:
                        if key2 in sub and _is_state_dict(sub[key2]):
                            return {k: v for k, v in sub[key2].items() if isinstance(v, torch.Tensor)}, f"{key}.{key2}"
        keys = [str(k) for k in obj.keys()][:10]
        raise NotACheckpointError(
            f"no state dict found (looked at the top level and under {', '.join(CONTAINER_KEYS)}); "
            f"top-level keys: {keys}"
        )
    raise NotACheckpointError(f"no state dict found: the file holds a {type(obj).__name__}, not a mapping of tensors")


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        return int(v.item())
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    return None


def _step_from_container(obj: Any) -> tuple[int | None, str]:
    if isinstance(obj, Mapping):
        for key in STEP_KEYS:
            if key in obj:
                s = _as_int(obj[key])
                if s is not None:
                    return s, f"file key {key!r}"
    return None, ""


def step_from_name(path: str | Path) -> int | None:
    """Step from a checkpoint's name: ``step=N`` / ``step_N`` / ``global_stepN``
    first, then ``checkpoint-N``, then the last run of digits in the name (for
    standard file names inside a folder, e.g. ``checkpoint-500/pytorch_model.bin``,
    the folder's name)."""
    p = Path(path)
    names = [p.name.split(".")[0] if p.is_file() or p.suffix else p.name]
    if p.name in HF_WEIGHT_FILES or p.name in ("model.pt", "model.pth", "model.ckpt", "last.ckpt"):
        names.append(p.parent.name)
    for name in names:
        for pattern in (r"(?:global_step|step)[=_-]?(\d+)", r"checkpoint[-_](\d+)", r"(\d+)(?!.*\d)"):
            m = re.search(pattern, name)
            if m:
                return int(m.group(1))
    return None


def _hf_trainer_step(directory: Path) -> int | None:
    f = directory / "trainer_state.json"
    if f.is_file():
        try:
            return _as_int(json.loads(f.read_text()).get("global_step"))
        except (OSError, ValueError, AttributeError):
            return None
    return None


def load_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """Load one checkpoint file or Hugging Face directory on the CPU.

    ``trust=False`` (default) never unpickles arbitrary objects: a file that
    needs it raises UnsafeCheckpointError saying why. Raises
    NotACheckpointError for missing, corrupt or state-dict-less files.
    """
    p = Path(path)
    if not p.exists():
        raise NotACheckpointError(f"{str(p)!r} does not exist")
    info: dict[str, Any] = {}
    step: int | None = None
    step_source = ""
    if p.is_dir():
        if not _is_hf_dir(p):
            raise NotACheckpointError(f"{str(p)!r} is a directory without {' or '.join(HF_WEIGHT_FILES[:2])}")
        sd: dict[str, torch.Tensor] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = p / index_name
            if index.is_file() and not (p / index_name.replace(".index.json", "")).is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (ValueError, KeyError, TypeError) as exc:
                    raise NotACheckpointError(
                        f"{str(index)!r} is not a valid shard index ({_first_line(exc)})") from exc
                for shard in shards:
                    sub = load_checkpoint(p / shard, trust=trust)
                    sd.update(sub.state_dict)
                container = f"sharded ({len(shards)} files)"
                break
        else:
            weights = p / "model.safetensors" if (p / "model.safetensors").is_file() else p / "pytorch_model.bin"
            sub = load_checkpoint(weights, trust=trust)
            sd, container = sub.state_dict, f"{weights.name}:{sub.container}"
            step, step_source = (sub.step, sub.step_source) if sub.step_source.startswith("file key") else (None, "")
        if step is None:
            step = _hf_trainer_step(p)
            step_source = "trainer_state.json 'global_step'" if step is not None else ""
    elif p.name.endswith(".safetensors"):
        sd, meta = _load_safetensors(p)
        container = "safetensors"
        info["metadata"] = meta
        step, step_source = _step_from_container(meta)
        if step_source:
            step_source = step_source.replace("file key", "safetensors metadata")
    else:
        if p.stat().st_size == 0:
            raise NotACheckpointError(f"{str(p)!r} is empty")
        with open(p, "rb") as fh:
            head = fh.read(4)
        # torch.save writes a zip archive ("PK\x03\x04"); legacy torch.save and pickle protocol >= 2 start with 0x80
        if not (head.startswith(b"PK") or head.startswith(b"\x80")):
            raise NotACheckpointError(
                f"{str(p)!r} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; "
                f"starts with {head!r})")
        obj = _torch_load(p, trust)
        try:
            sd, container = extract_state_dict(obj)
        except NotACheckpointError as exc:
            raise NotACheckpointError(f"{str(p)!r}: {exc}") from None
        step, step_source = _step_from_container(obj)
        if not step_source and isinstance(obj, Mapping) and isinstance(obj.get(container), Mapping):
            step, step_source = _step_from_container(obj[container])
        if isinstance(obj, Mapping):
            info["keys"] = [str(k) for k in obj.keys()][:20]
    if not sd:
        raise NotACheckpointError(f"{str(p)!r} holds an empty state dict")
    if step is None:
        step = step_from_name(p)
        step_source = "file name" if step is not None else ""
    return Checkpoint(p, sd, step, step_source, container, trust, info)


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def match_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, strict: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename ``state_dict``'s keys to the model's and check the shapes.

    Strips ``module.``, ``_orig_mod.`` and ``model.`` prefixes (in any order,
    repeatedly) where doing so increases the number of keys the model knows.
    Returns the renamed dict and the prefixes stripped. With ``strict``, raises
    KeyMismatchError listing the first missing / unexpected keys and shape
    mismatches.
    """
    target = model.state_dict()
    want = set(target)
    # try every sequence of up to three prefix strips; keep the one that matches most keys (fewest strips on ties)
    frontier: list[tuple[dict[str, torch.Tensor], list[str]]] = [(dict(state_dict), [])]
    best_sd, stripped = frontier[0]
    best_hits = len(want & set(best_sd))
    for _ in range(3):
        nxt = []
        for cand, steps in frontier:
            for prefix in PREFIXES:
                if any(k.startswith(prefix) for k in cand):
                    new = _strip(cand, prefix)
                    nxt.append((new, steps + [prefix]))
                    hits = len(want & set(new))
                    if hits > best_hits:
                        best_sd, stripped, best_hits = new, steps + [prefix], hits
        frontier = nxt
        if best_hits == len(want) or not frontier:
            break
    sd = best_sd
    if strict:
        missing = [k for k in target if k not in sd]
        unexpected = [k for k in sd if k not in want]
        shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in target if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} (first: {', '.join(missing[:4])})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} (first: {', '.join(unexpected[:4])})")
            if shapes:
                parts.append(f"shape mismatch {len(shapes)} (first: {'; '.join(shapes[:3])})")
            raise KeyMismatchError("state dict does not match the model: " + "; ".join(parts))
    return sd, stripped
