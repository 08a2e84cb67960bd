"""Record a Hugging Face Trainer run with a callback: no change to the training code.

    HF_HUB_OFFLINE=1 python examples/hf_trainer_callback.py --out hf_demo

A 2-layer GPT-2 of width 32 built from a config (nothing is downloaded) learns
a toy sequence task; the run lands in ``<output_dir>/dynascope``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from dynascope.integrations.transformers import DynascopeCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="hf_demo", help="the Trainer's output_dir")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # toy task: count upwards modulo 64 from a random start
    starts = torch.randint(0, 64, (256, 1))
    ids = (starts + torch.arange(32)) % 64
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
                                 learning_rate=3e-3, logging_steps=5, save_strategy="no", report_to="none",
                                 use_cpu=True, disable_tqdm=True)
    callback = DynascopeCallback(every=5, overwrite=True)  # same options as dynascope.probe(...)
    Trainer(model=model, args=training, train_dataset=dataset, callbacks=[callback]).train()
    print(f"dynascope run -> {args.out}/dynascope")


if __name__ == "__main__":
    main()
