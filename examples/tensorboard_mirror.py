"""Mirror dynascope's scalars into TensorBoard while training, beside your own.

    python examples/tensorboard_mirror.py --out runs/tb_demo --logdir tb_logs
    tensorboard --logdir tb_logs

A finished run can be exported afterwards as well:
``dynascope export runs/tb_demo --tensorboard tb_logs/export``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import dynascope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tb_demo", help="dynascope run directory")
    parser.add_argument("--logdir", default="tb_logs", help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = SummaryWriter(args.logdir)  # your own writer: dynascope adds its tags to it
    with dynascope.probe(model, opt, args.out, every=10, overwrite=True, tensorboard=writer) as run:
        for step in range(args.steps):
            x = torch.randn(32, 16)
            loss = nn.functional.cross_entropy(model(x), x[:, :4].argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            writer.add_scalar("my/loss", loss.item(), step)  # the user's own curve
            run.step(loss=loss.detach())
    writer.close()
    print(f"run -> {args.out}; TensorBoard -> {args.logdir}")


if __name__ == "__main__":
    main()
