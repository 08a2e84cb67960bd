"""Record a PyTorch Lightning run with a callback: no change to the LightningModule.

    python examples/lightning_callback.py --out lightning_logs_demo

The run lands next to the logger's files (``<trainer.log_dir>/dynascope``);
``dynascope report <that dir>`` draws it.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

try:
    import lightning as L
except ImportError:  # the older package name
    import pytorch_lightning as L

from dynascope.integrations.lightning import DynascopeCallback


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lightning_logs_demo", help="the trainer's default_root_dir")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = x[:, :4].argmax(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    callback = DynascopeCallback(every=4)  # same options as dynascope.probe(...)
    trainer = L.Trainer(max_epochs=args.epochs, default_root_dir=args.out, accelerator="cpu", callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=4)
    trainer.fit(Classifier(), loader)
    print(f"dynascope run -> {trainer.log_dir}/dynascope")


if __name__ == "__main__":
    main()
