"""QLoRA with TRL's SFTTrainer and one sloth_core line: a 4-bit NF4 (double-quantized) base loaded with
``from_pretrained``, LoRA r=16 on every projection, 8-bit AdamW, gradient accumulation, SFTConfig's defaults
otherwise (its activation checkpointing included: sloth_core's serves it). The checkpoint is a tiny random Llama
written next to the run and the dataset is made in the script, so nothing is downloaded and it runs anywhere (on a
CPU through Triton's interpreter: slow, exact).

    python examples/sft_trainer.py                   # with sloth_core
    python examples/sft_trainer.py --no-sloth-core   # the same script without the optimize line

For a real run, point ``--model`` at a checkpoint and bring your dataset. Offline, ``use_kernels=False`` keeps
transformers 5.2x from fetching hub kernels while loading.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch


def tokenizer(vocab_size: int):
    """A word-level tokenizer over ``t0`` ... ``t{n-1}`` (stands in for the checkpoint's)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def main(argv: list[str] | None = None) -> list[float]:
    """Train; returns the logged losses."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint (default: a tiny random Llama made here)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-sloth-core", action="store_true", help="leave out the optimize line")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on the CPU (before Triton loads)
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    path = args.model
    if path is None:
        from sloth_core.tiny import tiny_model

        path = tempfile.mkdtemp(prefix="sloth_core_example_")
        tiny_model("llama", dtype=torch.bfloat16, intermediate_size=128).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": "cuda" if cuda else "cpu"}, use_kernels=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    if not args.no_sloth_core:
        import sloth_core

        sloth_core.optimize(model)  # the one line
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    data = Dataset.from_dict({"input_ids": [torch.randint(2, vocab, (24,), generator=g).tolist() for _ in range(32)]})
    config = SFTConfig(output_dir=tempfile.mkdtemp(prefix="sloth_core_sft_"), max_steps=args.steps,
                       per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="adamw_8bit",
                       learning_rate=2e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=not cuda,
                       seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer(vocab))
    trainer.train()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    print("losses:", " ".join(f"{x:.4f}" for x in losses))
    return losses


if __name__ == "__main__":
    try:
        main()
    finally:  # launched by torchrun / accelerate: leave the process group before exit (a live one can abort it)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
