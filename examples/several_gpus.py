"""LoRA on several GPUs: the Hugging Face Trainer, one sloth_core line, PyTorch's own engines. The same script runs on
one process or on N, launched by ``torchrun`` or ``accelerate launch``; the Trainer wraps the model in DDP (default)
or FSDP2 (``--fsdp``) after the ``optimize`` line; HF's activation checkpointing is on (sloth_core's serves it, in
each rank: on GPUs its layer inputs go to that rank's pinned host memory). The global batch is fixed
(``--global-batch``): each of N ranks gets ``global / N`` rows a step, so N ranks train the same model as one
process does. A tiny random Llama and an in-script dataset: nothing is downloaded (on a CPU: the gloo backend,
kernels in Triton's interpreter, float32; on GPUs: NCCL, bf16).

    torchrun --nproc-per-node 2 examples/several_gpus.py
    accelerate launch --multi_gpu --num_processes 2 examples/several_gpus.py   # CPUs too: the script picks gloo
    torchrun --nproc-per-node 2 examples/several_gpus.py --fsdp           # FSDP2 (GPUs): each rank holds 1/N
    python examples/several_gpus.py                                       # one process, same global batch

accelerate applies FSDP on accelerators only: on CPUs ``--fsdp`` is refused here (the Trainer would run DDP
instead); ``tests/test_distributed.py`` runs FSDP2's ``fully_shard`` on CPU ranks directly. The line printed at the
end names the engine that wrapped the model. ``kill -USR1 <pid>`` of a rank prints its Python stacks (where a rank
waits, if a run hangs).
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import tempfile

import torch


def main(argv: list[str] | None = None) -> list[float]:
    """Train; returns the logged losses (the mean over every rank's rows)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4, help="rows a step over all ranks")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--no-sloth-core", action="store_true", help="leave out the optimize line")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on the CPU (before Triton loads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fsdp and not cuda:
        parser.error("--fsdp needs GPUs: accelerate (under the Trainer) runs DDP on CPUs")
    if args.global_batch % world:
        parser.error(f"--global-batch {args.global_batch} does not split over {world} ranks")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from sloth_core.tiny import tiny_model

    # every rank builds the same model (same seed); DDP / FSDP2 start from rank 0's parameters anyway
    model = tiny_model("llama", dtype=torch.bfloat16 if cuda else torch.float32, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    if not args.no_sloth_core:
        import sloth_core

        sloth_core.optimize(model)  # the one line: before the Trainer wraps the model in DDP / FSDP2
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, model.config.vocab_size, (16,), generator=g).tolist() for _ in range(64)]
    fsdp = {}
    if args.fsdp:  # FSDP2: each decoder layer and the root sharded; the lm_head is gathered with the root
        fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    config = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="sloth_core_ranks_"), max_steps=args.steps,
                               per_device_train_batch_size=args.global_batch // world, learning_rate=1e-3,
                               gradient_checkpointing=True, bf16=cuda, logging_steps=1, report_to=[],
                               save_strategy="no", use_cpu=not cuda, seed=0, data_seed=0,
                               ddp_backend="gloo" if world > 1 and not cuda else None, **fsdp)
    trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": rows,
                                                                                 "labels": rows}))
    trainer.train()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        print(f"world {world}, engine {type(trainer.model_wrapped).__name__}, losses:",
              " ".join(f"{x:.6f}" for x in losses), flush=True)
    return losses


if __name__ == "__main__":
    try:
        main()
    finally:  # launched by torchrun / accelerate: leave the process group before exit (a live one can abort it)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
