"""bf16 LoRA with the Hugging Face Trainer and one sloth_core line: LoRA r=16 on every projection, gradient
accumulation, 8-bit AdamW, HF's activation checkpointing switched on (sloth_core's serves it), and an evaluation
with ``compute_metrics`` (next-token accuracy from the logits). The model is a tiny random Llama built from its
config and the dataset is made in the script: nothing is downloaded (on a CPU the kernels run in Triton's
interpreter: slow, exact).

    python examples/hf_trainer.py                    # with sloth_core
    python examples/hf_trainer.py --no-sloth-core    # the same script without the optimize line
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch


def accuracy(pred) -> dict:
    """Next-token accuracy over the labelled positions."""
    logits, labels = pred.predictions, pred.label_ids
    hits = (logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
    return {"accuracy": float(hits.mean())}


def main(argv: list[str] | None = None) -> tuple[list[float], dict]:
    """Train and evaluate; returns the logged training losses and the evaluation metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-sloth-core", action="store_true", help="leave out the optimize line")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on the CPU (before Triton loads)
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from sloth_core.tiny import tiny_model

    model = tiny_model("qwen3", dtype=torch.bfloat16, device="cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    if not args.no_sloth_core:
        import sloth_core

        sloth_core.optimize(model)  # the one line
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, model.config.vocab_size, (24,), generator=g).tolist() for _ in range(32)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    config = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="sloth_core_trainer_"), max_steps=args.steps,
                               per_device_train_batch_size=2, per_device_eval_batch_size=4,
                               gradient_accumulation_steps=2, gradient_checkpointing=True, optim="adamw_8bit",
                               learning_rate=2e-3, bf16=True, logging_steps=1, report_to=[], save_strategy="no",
                               use_cpu=not cuda, seed=0)
    trainer = Trainer(model=model, args=config, train_dataset=data, eval_dataset=data.select(range(8)),
                      compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    print("losses:", " ".join(f"{x:.4f}" for x in losses), "| eval:", metrics)
    return losses, metrics


if __name__ == "__main__":
    try:
        main()
    finally:  # launched by torchrun / accelerate: leave the process group before exit (a live one can abort it)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
