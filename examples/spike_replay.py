"""A loss spike, its forensics, and a replay of the steps before it with every probe on.

    python examples/spike_replay.py --out runs/spike

Trains a small MLP on the bundled digits while recording only every 50 steps, with the always-on
sentinel and ``snapshot_every=25``. At step ``--fault`` one layer's learning rate is raised 100x for
three steps. The sentinel sees the spike, writes the window before it at full resolution and the
snapshot taken before it; the script prints the events and the forensics table, then restores the
snapshot into a fresh model and optimizer and replays the steps up to the spike with ``every=1``
into ``<out>-replay``, checking that the replayed losses equal the original ones.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import dynascope
from dynascope.datasets import load_digits

X, Y = load_digits()


def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step, a function of the step alone: a replay feeds the same batches."""
    g = torch.Generator().manual_seed(step)
    i = torch.randint(0, len(X), (64,), generator=g)
    return X[i], Y[i]


def make() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    groups = [{"params": list(m.parameters()), "name": n} for n, m in model.named_children()
              if len(list(m.parameters()))]
    return model, torch.optim.SGD(groups, lr=0.05, momentum=0.9)


def train(model, opt, run, steps, fault: int, layer: str) -> list[float]:
    losses = []
    for step in steps:
        for g in opt.param_groups:  # the injected fault: one layer's learning rate x100 for three steps
            g["lr"] = 0.05 * (100 if g["name"] == layer and fault <= step < fault + 3 else 1)
        x, y = batch_at(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.step(loss=loss)
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/spike", help="run directory (the replay goes to <out>-replay)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--fault", type=int, default=None, help="first faulty step (default: 2/3 of --steps)")
    parser.add_argument("--layer", default="2", help="the faulty layer: 0, 2 or 4")
    args = parser.parse_args()
    fault = args.fault if args.fault is not None else 2 * args.steps // 3
    if not 30 <= fault < args.steps - 3:
        parser.error(f"--fault must be in [30, --steps - 3), got {fault}")
    torch.manual_seed(0)
    model, opt = make()
    with dynascope.probe(model, opt, args.out, every=50, overwrite=True, snapshot_every=25) as run:
        losses = train(model, opt, run, range(args.steps), fault, args.layer)

    recorded = dynascope.load_run(args.out)
    events = recorded.events()
    print(events[["step", "kind", "value", "threshold"]].to_string(index=False))
    if events.empty:
        print("no event: nothing to replay")
        return
    event = int(events["step"].iloc[0])
    print(f"\nforensics of step {event} (the modules that moved first):")
    table = recorded.forensics(event).head(5)
    print(table[["module", "metric", "first_step", "ratio", "lead"]].to_string(index=False))

    snap = recorded.snapshot()
    print(f"\nsnapshot of step {snap.step} ({snap.nbytes / 1e6:.2f} MB), written for the {snap.meta['event']} "
          f"at step {snap.meta['event_step']}; replaying steps {snap.step}-{event + 2} with every=1")
    torch.manual_seed(123)  # a fresh model: restore() puts the snapshot's weights, optimizer state and RNGs back
    fresh, fresh_opt = make()
    start = snap.restore(fresh, fresh_opt)
    with dynascope.probe(fresh, fresh_opt, args.out + "-replay", every=1, overwrite=True) as replay:
        again = train(fresh, fresh_opt, replay, range(start, event + 3), fault, args.layer)
    same = again == losses[start:event + 3]
    print(f"replayed losses equal the original ones: {same}")
    if not same:
        raise SystemExit("the replay diverged from the original run")


if __name__ == "__main__":
    main()
