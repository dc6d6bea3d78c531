"""Shared by the H200 diagnosis and GEMM-shape scripts: the optimized Llama-3-8B-shaped LoRA / QLoRA model, timed
steps, and the CUDA-event median of one call."""
import statistics
import time

import torch


def optimized_model(quant: str, batch: int = 4, seq: int = 2048):
    """``(model, optimizer, ids)``: random Llama-3-8B-shaped model (``quant``: ``none`` or ``nf4``), PEFT LoRA r=16
    on every linear layer, ``sloth_core.optimize(gradient_checkpointing="offload")``, AdamW, one token batch."""
    from peft import LoraConfig, get_peft_model

    import sloth_core
    from sloth_core.bench.train_models import TARGETS, build

    model = build("llama-3-8b", None, quant)
    model.train()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    sloth_core.optimize(model, gradient_checkpointing="offload")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, opt, ids.cuda()


def timed_steps(model, opt, ids, n: int, before=None) -> list[float]:
    """``n`` training steps, each timed (ms) from a synchronized start to a synchronized end; ``before()`` runs
    at the start of each timed step."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        if before is not None:
            before()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def cuda_median_ms(fn, n: int = 20, warmup: int = 3) -> float:
    """Median of ``n`` CUDA-event timings (ms) of ``fn()``, each synchronized, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
