"""``save_merged``: a LoRA (or QLoRA) model written as a plain 16-bit checkpoint that ``from_pretrained`` loads.

Each LoRA layer's base weight is dequantized (bitsandbytes NF4 / FP4 4-bit or LLM.int8 8-bit; a 16/32-bit base as
it is), its active adapters' ``scale * B @ A`` added in float32, and the sum cast to ``dtype``. Quantized layers
without an adapter are dequantized, every other parameter and persistent buffer is cast to ``dtype`` (floating
ones) or kept. PEFT's ``modules_to_save`` copies (a trained ``lm_head``) are written under the module's own name.
The names are the transformers model's, so ``AutoModelForCausalLM.from_pretrained(path)`` loads it without PEFT,
bitsandbytes or sloth_core.

Streaming: the tensors are made one module at a time and written out in shards of at most ``max_shard_bytes``
(``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``; one file, ``model.safetensors``, when
it fits), so the memory on top of the model stays near one shard. Atomic: everything is written into a hidden
folder beside ``path`` and renamed into place at the end; a failed (or killed) write leaves nothing under ``path``
(and an existing ``path`` is replaced only with ``overwrite=True``). The config loses its ``quantization_config``
and records ``dtype``; a ``tokenizer`` given is saved beside.

Not supported (a clear error naming the module): DoRA adapters and LoRA variants other than plain LoRA, and
adapters already merged into a quantized base.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .registry.patterns.lora_settings import is_lora_layer

SHARD_BYTES = 2 * 1024 ** 3


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight of ``layer`` (a bitsandbytes 4-bit / 8-bit linear, or a plain one) as a float32 tensor."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        from .kernels.dequant import dequantize_4bit
        from .kernels.dequant_plan import dequantize_weight

        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU inference repacks the weight in place (AVX512-BF16 layout) on its first eval call:
            # undone on copies, the layer keeps its packing
            import bitsandbytes.functional as bnbf

            data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
            return dequantize_4bit(data, state).float()
        return dequantize_weight(layer).float()
    if kind == "Int8Params":
        from .kernels.dequant_int8 import dequantize_int8

        return dequantize_int8(layer)
    return weight.detach().float()


def _merged_weight(path: str, module: nn.Module) -> torch.Tensor:
    """The LoRA layer's base weight with its active adapters added, float32."""
    base = module.get_base_layer()
    merged = _dequantized(base)
    if getattr(module, "merged", False):
        if type(base.weight).__name__ in ("Params4bit", "Int8Params"):
            raise ValueError(f"save_merged: {path}: its adapters were merged into the quantized base already "
                             f"(rounded to 4/8 bits); call unmerge_adapter() first")
        return merged
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise ValueError(f"save_merged: {path}: DoRA adapter {name!r} is not supported")
        if getattr(module, "lora_variant", {}).get(name) is not None:
            raise ValueError(f"save_merged: {path}: adapter {name!r} is a LoRA variant "
                             f"({type(module.lora_variant[name]).__name__}), not supported")
        merged += module.get_delta_weight(name).float().to(merged.device)
    return merged


def _active_copy(module: nn.Module) -> nn.Module:
    """The module a PEFT ``ModulesToSaveWrapper`` runs: its active trained copy, else the original."""
    active = [a for a in getattr(module, "active_adapters", []) if a in module.modules_to_save]
    if active and not getattr(module, "disable_adapters", False):
        return module.modules_to_save[active[0]]
    return module.original_module


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in module._parameters.items():
        if p is not None:
            yield name, p
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield name, b


def _tensors(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the plain checkpoint, module by module: merged / dequantized weights (float32, new
    tensors) and the model's own parameters and buffers (themselves)."""
    def walk(prefix: str, module: nn.Module):
        if type(module).__name__ == "ModulesToSaveWrapper":
            yield from walk(prefix, _active_copy(module))
            return
        if is_lora_layer(module):
            yield f"{prefix}weight", _merged_weight(prefix.rstrip("."), module)
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                yield f"{prefix}bias", bias
            return
        if type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params"):
            yield f"{prefix}weight", _dequantized(module)
            for name, t in _own_tensors(module):
                if name != "weight":
                    yield prefix + name, t
            return
        for name, t in _own_tensors(module):
            yield prefix + name, t
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(f"{prefix}{name}.", child)

    yield from walk("", root)


def _config(model: nn.Module, dtype: torch.dtype):
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if attr in config.__dict__:
            delattr(config, attr)
    config.dtype = dtype
    return config


class _Shards:
    """Tensors written in files of at most ``limit`` bytes, numbered as they fill; renamed when the count is known."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, str(self.folder / f"part-{len(self.files):05d}"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.folder / "part-00000", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"part-{i:05d}", self.folder / final)
            weight_map.update({name: final for name in names})
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def save_merged(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, tokenizer=None,
                overwrite: bool = False, max_shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Write ``model`` (a PEFT LoRA model, optimized or not, on a 16-bit, NF4, FP4 or 8-bit base) as a merged
    ``dtype`` checkpoint at ``path`` (see the module docstring); returns the path."""
    from .api import unwrap

    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"save_merged(dtype={dtype}): expected torch.bfloat16, torch.float16 or torch.float32")
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"save_merged: {target} exists; pass overwrite=True to replace it")
    base = unwrap(model)
    if not callable(getattr(base, "save_pretrained", None)):
        raise TypeError(f"save_merged(model): expected a transformers model (or a PEFT model around one), got "
                        f"{type(base).__name__}")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        shards, own = _Shards(work, max_shard_bytes), {id(t) for t in (*base.parameters(), *base.buffers())}
        seen = set()
        from tqdm.auto import tqdm

        with torch.no_grad(), tqdm(desc="save_merged", unit="tensor", disable=not progress) as bar:
            for name, tensor in _tensors(base):
                if id(tensor) in own:  # the model's own tensor: a tied one (lm_head = embed_tokens) goes once,
                    if id(tensor) in seen:  # from_pretrained ties it again
                        continue
                    seen.add(id(tensor))
                tensor = tensor.detach()
                out = tensor.to(dtype) if tensor.is_floating_point() else tensor
                shards.add(name, out.cpu())
                bar.update(1)
        shards.finish()
        _config(base, dtype).save_pretrained(work)
        generation = getattr(base, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(work)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
        _put_in_place(work, target, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _put_in_place(work: Path, target: Path, overwrite: bool) -> None:
    """Rename ``work`` to ``target``. A concurrent writer that put its folder there first wins: the rename onto its
    (non-empty) folder fails, and this call raises ``FileExistsError`` naming the race."""
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"save_merged: {target} appeared while writing; pass overwrite=True to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.replace(target, old / "previous")
        except FileNotFoundError:  # another writer moved it away first
            pass
    else:
        old = None
    try:
        os.replace(work, target)
    except OSError as exc:
        if not target.exists():
            if old is not None and (old / "previous").exists():
                os.replace(old / "previous", target)  # put the previous checkpoint back
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise FileExistsError(f"save_merged: another writer put {target} in place while this one was writing; "
                              f"its checkpoint is kept") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
