"""dynascope on models and training loops it did not write (tiny configs, nothing downloaded).

Each case trains a few steps twice from the same seed, once plain and once under ``dynascope.probe``, and checks:

* training is bit-identical: parameters, buffers, optimizer state (and a GradScaler's state) and the RNG;
* at every recording step, every module that returned a floating tensor (seen by the test's own forward hooks)
  has ``act.*`` rows, and no other module has;
* every parameter that held a gradient at the optimizer step (seen by the test's own step pre-hook) has
  ``grad.norm`` at that step;
* every optimised weight (ndim >= 2) has ``weight.norm``, ``update.*`` and ``lr.effective`` rows at every
  recording step.

Adding a case is one function decorated with ``@case``: it builds the model, the optimizer and a ``train_step``
closure (one full step of the user's loop: forward(s), backward, optimizer step) from a seeded state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.core.names import clean_name, is_container
from dynascope.probes.activations import ACT_METRICS

STEPS = 4
EVERY = 2
RECORDED = [s for s in range(STEPS) if s % EVERY == 0]
UPDATE_METRICS = ("weight.norm", "update.relative", "update.angle", "update.angle_row", "lr.effective")


# ----------------------------------------------------------------------------- the case structure
@dataclass
class Setup:
    """What a case builds: the model, its optimizer, and one step of its training loop.

    ``train_step(step)`` runs forward(s), backward and the optimizer step, and returns the loss (a tensor or a
    float). ``state`` returns extra state to compare bit for bit (e.g. a GradScaler's ``state_dict``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_step: Callable[[int], Any]
    state: Callable[[], dict[str, Any]] = field(default=lambda: {})
    options: dict[str, Any] = field(default_factory=dict)  # extra dynascope.probe keywords


CASES: dict[str, Callable[[], Setup]] = {}
SKIPS: dict[str, str] = {}


def case(fn: Callable[[], Setup] | None = None, *, skip: str | None = None):
    """Register a case (its function name is the case id); ``skip`` gives the reason it cannot run here."""

    def register(f: Callable[[], Setup]) -> Callable[[], Setup]:
        CASES[f.__name__] = f
        if skip:
            SKIPS[f.__name__] = skip
        return f

    return register(fn) if fn is not None else register


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _holds_floating(out: Any) -> bool:
    """True when ``out`` holds a floating tensor anywhere (tensors, tuples, lists, dicts, HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out.is_floating_point() and out.numel() > 0
    if isinstance(out, (tuple, list)):
        return any(_holds_floating(o) for o in out)
    if isinstance(out, dict):
        return any(_holds_floating(o) for o in out.values())
    return False


@dataclass
class Observed:
    """What the test's own hooks saw at the recording steps of the probed run."""

    floating: dict[int, set[str]] = field(default_factory=dict)  # step -> modules that returned a float tensor
    with_grad: dict[int, set[str]] = field(default_factory=dict)  # step -> parameters with .grad at opt.step
    stepped: dict[int, int] = field(default_factory=dict)  # step -> optimizer steps taken


def _snapshot(setup: Setup) -> dict[str, Any]:
    opt_state = setup.optimizer.state_dict()
    return {
        "model": {k: v.detach().clone() for k, v in setup.model.state_dict().items()},
        "opt": {k: {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in s.items()}
                for k, s in opt_state["state"].items()},
        "groups": opt_state["param_groups"],
        "extra": setup.state(),
        "rng": torch.get_rng_state().clone(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
    }


def train(name: str, run_dir=None) -> tuple[dict[str, Any], Setup, Observed]:
    """Build case ``name`` from seed 0 and train STEPS steps, under dynascope when ``run_dir`` is given."""
    _seed(0)
    setup = CASES[name]()
    _seed(1)  # the loop's randomness (dropout, data) starts from the same state in both runs
    obs = Observed()
    if run_dir is None:
        for s in range(STEPS):
            setup.train_step(s)
        return _snapshot(setup), setup, obs
    model = setup.model
    current = {"step": 0}
    names = {id(m): clean_name(n) for n, m in model.named_modules()}
    pnames = {id(p): clean_name(n) for n, p in model.named_parameters()}

    def fwd_hook(mod: nn.Module, inputs: Any, out: Any) -> None:
        if current["step"] in RECORDED and _holds_floating(out):
            obs.floating.setdefault(current["step"], set()).add(names[id(mod)])

    def pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        s = current["step"]
        obs.stepped[s] = obs.stepped.get(s, 0) + 1
        if s in RECORDED:
            obs.with_grad[s] = {pnames[id(p)] for g in opt.param_groups for p in g["params"] if p.grad is not None}

    handles = [m.register_forward_hook(fwd_hook) for n, m in model.named_modules()
               if n and not is_container(m)]  # the root and pure containers are not layers (docs/metrics.md)
    handles.append(setup.optimizer.register_step_pre_hook(pre_step))
    with dynascope.probe(model, setup.optimizer, run_dir, every=EVERY, **setup.options) as run:
        for s in range(STEPS):
            current["step"] = s
            loss = setup.train_step(s)
            run.step(loss=loss)
    for h in handles:
        h.remove()
    return _snapshot(setup), setup, obs


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------- cases
def _batches(n: int, make: Callable[[torch.Generator], Any], seed: int = 2) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [make(g) for _ in range(n)]


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any],
                loss_of: Callable[[nn.Module, Any], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    def step(s: int) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, batches[s])
        loss.backward()
        opt.step()
        return loss.detach()

    return step


@case
def hf_gpt2_tied_two_groups() -> Setup:
    """Hugging Face GPT-2 (tied input/output embeddings), AdamW with a decay and a no-decay group."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    assert model.lm_head.weight is model.transformer.wte.weight
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3)
    batches = _batches(STEPS, lambda g: torch.randint(0, 50, (3, 10), generator=g))
    return Setup(model, opt, _plain_step(model, opt, batches, lambda m, x: m(input_ids=x, labels=x).loss))


@case
def hf_bert_padding_mask() -> Setup:
    """Hugging Face BERT for sequence classification with padded sequences (attention mask, padding_idx row 0)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3, pad_token_id=0)
    model = transformers.BertForSequenceClassification(cfg).train()

    def make(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, 40, (4, 9), generator=g)
        lengths = torch.tensor([9, 6, 4, 2])
        mask = (torch.arange(9)[None] < lengths[:, None]).long()
        return ids * mask, mask, torch.randint(0, 3, (4,), generator=g)

    batches = _batches(STEPS, make)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return Setup(model, opt, _plain_step(
        model, opt, batches, lambda m, b: m(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss))


class _LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True, dropout=0.1)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.head(out)


@case
def lstm() -> Setup:
    """nn.LSTM (two layers, inter-layer dropout): its output is a tuple (output, (h, c))."""
    model = _LSTMTagger().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(STEPS, lambda g: (torch.randint(0, 20, (3, 7), generator=g),
                                         torch.randint(0, 5, (3, 7), generator=g)))
    return Setup(model, opt, _plain_step(
        model, opt, batches, lambda m, b: F.cross_entropy(m(b[0]).reshape(-1, 5), b[1].reshape(-1))))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x), src_key_padding_mask=pad).mean(1))


@case
def transformer_encoder() -> Setup:
    """nn.TransformerEncoder with a key padding mask (nn.MultiheadAttention returns (out, None))."""
    model = _Encoder().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pad = torch.zeros(4, 8, dtype=torch.bool)
    pad[1, 6:] = pad[3, 3:] = True
    batches = _batches(STEPS, lambda g: (torch.randn(4, 8, 6, generator=g), torch.randint(0, 3, (4,), generator=g)))
    return Setup(model, opt, _plain_step(model, opt, batches, lambda m, b: F.cross_entropy(m(b[0], pad), b[1])))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 4))


def _images(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


@case
def bf16_autocast() -> Setup:
    """CPU bf16 autocast: conv and linear outputs are bfloat16, the loss float32."""
    model = _cnn().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batches = _batches(STEPS, _images)

    def loss_of(m: nn.Module, b: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(b[0])
        assert out.dtype == torch.bfloat16
        return F.cross_entropy(out.float(), b[1])

    return Setup(model, opt, _plain_step(model, opt, batches, loss_of))


def _cpu_grad_scaler() -> str | None:
    try:
        torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(1, 1) @ torch.ones(1, 1)
    except (RuntimeError, AttributeError, TypeError) as exc:
        return f"GradScaler / float16 autocast on CPU not supported by torch {torch.__version__}: {exc}"
    return None


@case(skip=_cpu_grad_scaler())
def grad_scaler_fp16() -> Setup:
    """float16 autocast with torch.amp.GradScaler on the CPU: gradients are read after the scaler unscales them."""
    model = _cnn().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    batches = _batches(STEPS, _images)

    def step(s: int) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(batches[s][0]).float(), batches[s][1])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    return Setup(model, opt, step, state=lambda: {"scaler": scaler.state_dict()})


@case
def gradient_accumulation() -> Setup:
    """Three micro-batches per optimizer step; the loop zeroes gradients after the step."""
    model = _cnn().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    micro = _batches(3 * STEPS, _images)

    def step(s: int) -> torch.Tensor:
        total = torch.zeros(())
        for k in range(3):
            x, y = micro[3 * s + k]
            loss = F.cross_entropy(model(x), y) / 3
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return Setup(model, opt, step)


class _CheckpointedMLP(nn.Module):
    """Residual blocks wrapped by torch's checkpoint_wrapper (recomputed in backward, names gain a segment)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        self.inp = nn.Linear(10, 16)
        self.blocks = nn.ModuleList(
            checkpoint_wrapper(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1),
                                             nn.Linear(32, 16)))
            for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


@case
def activation_checkpointing() -> Setup:
    """Activation checkpointing (non-reentrant, dropout inside): the recomputation must not change training."""
    model = _CheckpointedMLP().train()
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _batches(STEPS, lambda g: (torch.randn(5, 10, generator=g), torch.randint(0, 3, (5,), generator=g)))
    return Setup(model, opt, _plain_step(model, opt, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1])))


# ----------------------------------------------------------------------------- the test
@pytest.mark.parametrize("name", sorted(CASES))
def test_real_model(tmp_path, name):
    if name in SKIPS:
        pytest.skip(SKIPS[name])
    plain, _, _ = train(name)
    probed, setup, obs = train(name, tmp_path / "run")
    _assert_same(probed, plain, name)

    data = dynascope.load_run(tmp_path / "run")
    assert list(data.scalars("loss")["step"]) == list(range(STEPS))
    rows = {(int(s), m, lay) for m in data.metrics() for s, lay in data.scalars(m)[["step", "layer"]].itertuples(
        index=False)}
    weights = {clean_name(n) for g in setup.optimizer.param_groups for p in g["params"]
               for n, q in setup.model.named_parameters() if q is p and p.ndim >= 2}
    assert weights
    for s in RECORDED:
        assert obs.stepped.get(s) == 1, f"step {s}: the loop did not step the optimizer once"
        act = {lay for (t, m, lay) in rows if t == s and m == "act.mean"}
        assert act == obs.floating[s], (f"step {s}: act rows for {sorted(act - obs.floating[s])} not seen, "
                                        f"missing for {sorted(obs.floating[s] - act)}")
        for lay in act:
            assert all((s, m, lay) in rows for m in ACT_METRICS), (s, lay)
        missing = {n for n in obs.with_grad[s] if (s, "grad.norm", n) not in rows}
        assert not missing, f"step {s}: no grad.norm for {sorted(missing)}"
        assert (s, "grad.global_norm", "") in rows
        for m in UPDATE_METRICS:
            missing = {w for w in weights if (s, m, w) not in rows}
            assert not missing, f"step {s}: no {m} for {sorted(missing)}"
    # nothing recorded between recording steps, and no value is NaN where a weight moved
    assert {t for (t, m, _) in rows if m.startswith(("act.", "grad.", "update."))} == set(RECORDED)
    upd = data.scalars("update.angle_row")
    assert np.isfinite(upd["value"].to_numpy()).all(), upd[~np.isfinite(upd["value"])]
    assert all(math.isfinite(v) for v in data.scalars("grad.global_norm")["value"])
