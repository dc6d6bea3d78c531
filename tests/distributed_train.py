"""One training run of a tiny optimized LoRA / QLoRA model, single-process or as one rank of a gloo group.

The same functions build the model, the data and the steps for both sides, so the distributed test
(``tests/test_distributed.py``) compares a run on ``W`` ranks, each with ``B / W`` rows of every global batch of
``B`` rows, against the single-process run on the whole batch: the same function, so the same losses and parameters
within the dtype's rounding.

As a rank (``python -m tests.distributed_train OUT CASE:ENGINE ...``, with ``RANK``, ``WORLD_SIZE`` and
``SLOTH_CORE_TEST_STORE`` -- a ``FileStore`` path -- in the environment) it writes ``OUT/CASE_ENGINE_R.pt`` for each
run: the global loss of every step (the mean of the ranks' equal-sized shares), every trainable parameter in full
(FSDP2's shards gathered), and ``sloth_core.report`` rows. ``SIGUSR1`` prints every thread's Python stack to stderr:
the test sends it to ranks that are still running at its deadline.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import signal
import sys

CASES = {  # name -> (dtype, base): fp32 for tight equality, bf16 and NF4 bases as users train them
    "lora_fp32": ("float32", "plain"),
    "lora_bf16": ("bfloat16", "plain"),
    "qlora_nf4": ("bfloat16", "nf4"),
}
STEPS, BATCH, SEQ = 2, 6, 8  # BATCH splits evenly over 1, 2 and 3 ranks


def build(case: str, optimize: bool = True):
    """The tiny Llama with LoRA on every projection (NF4 bases for ``qlora_nf4``) and its ``optimize`` line."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import sloth_core
    from sloth_core.tiny import tiny_model

    dtype, base = CASES[case]
    dtype = getattr(torch, dtype)
    # 4-bit blocks of 64 along the input features: every in_features a multiple of 64 (bitsandbytes' CPU kernels)
    model = tiny_model("llama", dtype=dtype, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if base == "nf4":
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, nn.Linear):
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                              quant_type="nf4", compress_statistics=True)
                        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True)
                        setattr(parent, name, q.to("cpu"))
        model.is_loaded_in_4bit = True
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 would leave A without a gradient in the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.1).to(p.dtype))
    if optimize:
        sloth_core.optimize(model)
    return model


def batches():
    """``STEPS`` global batches of ``BATCH`` x ``SEQ`` token ids (labels = inputs: every rank's share has the same
    number of counted tokens, so the mean of the ranks' mean losses is the global mean loss)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def train(model, rank: int = 0, world: int = 1, step_model=None) -> list:
    """AdamW steps on this rank's rows of each global batch; returns the local losses. ``step_model`` is what the
    forward runs through (the DDP wrapper), ``model`` what owns the parameters."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    share = BATCH // world
    losses = []
    for x in batches():
        x = x[rank * share:(rank + 1) * share]
        loss = (step_model or model)(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().float())
    return losses


def trainable(model) -> dict:
    """Every trainable parameter in full, by its name without the engines' wrapper prefixes."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("module.", "").replace("_fsdp_wrapped_module.", "")] = full.detach().float().clone()
    return out


def _shard(model, head: bool = False) -> None:
    """FSDP2 as its documentation applies it: each decoder layer (``head``: and the ``lm_head`` on its own), then
    the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    if head:
        fully_shard(model.base_model.model.lm_head)
    fully_shard(model)


def _run(case: str, engine: str, rank: int, world: int) -> dict:
    """One run. Engines: ``ddp``, ``fsdp2``; ``fsdp2_head`` (the ``lm_head`` sharded on its own) and
    ``fsdp2_late`` (``optimize`` after ``fully_shard``) show what sloth_core does where it cannot serve. Records the
    SlothCoreWarnings and an exception's text instead of raising it."""
    import warnings

    import torch
    import torch.distributed as dist

    import sloth_core

    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sloth_core.SlothCoreWarning)
        try:
            model = build(case, optimize=engine != "fsdp2_late")
            if engine == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                losses = train(model, rank, world, step_model=DistributedDataParallel(model))
            elif engine in ("fsdp2", "fsdp2_head", "fsdp2_late"):
                _shard(model, head=engine == "fsdp2_head")
                if engine == "fsdp2_late":
                    sloth_core.optimize(model)
                losses = train(model, rank, world)
            else:
                raise ValueError(f"engine {engine!r}: expected ddp, fsdp2, fsdp2_head or fsdp2_late")
            losses = torch.stack(losses)
            dist.all_reduce(losses)
            result = {"losses": (losses / world).tolist(), "params": trainable(model),
                      "report": [(r.module, r.pattern, r.status) for r in sloth_core.report(model)]}
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
    return {**result, "warnings": [str(w.message) for w in caught if issubclass(w.category,
                                                                              sloth_core.SlothCoreWarning)]}


def main(out: str, *runs: str) -> None:
    """Each of ``runs`` (``CASE:ENGINE``) in turn, in one process group (one start-up for all of them)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # a collective waits at most 90 s for a missing rank: an error with its traceback, not a silent wait
    dist.init_process_group("gloo", store=dist.FileStore(os.environ["SLOTH_CORE_TEST_STORE"], world),
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        for name in runs:
            torch.save(_run(*name.split(":"), rank, world), os.path.join(out, f"{name.replace(':', '_')}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":  # as the test process rounds its reference run's bf16 casts
        from tests import interpreter_rounding

        interpreter_rounding.install()
    main(*sys.argv[1:])
