"""The ``lora`` / ``lora_nf4`` cases of ``sloth-core bench kernels``: a PEFT LoRA gated MLP on bf16 or NF4 bases
against sloth_core's ``lora_mlp`` (the other cases: :mod:`sloth_core.bench.cases`)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .cases_base import DTYPE, BenchModel, Case, Unavailable, _liger_gated, _randn
from .cases_work import NF4_BLOCKSIZE, Work, lora_mlp_flops

LORA_RANK = 16
LORA_ALPHA = 16


class _Holder(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp


def _linear4bit(weight: torch.Tensor, device: torch.device) -> nn.Module:
    """A bitsandbytes NF4 (double-quantized) ``Linear4bit`` holding ``weight`` (quantized on the move)."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=DTYPE, quant_type="nf4",
                              compress_statistics=True, device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                     blocksize=NF4_BLOCKSIZE, module=layer)
    return layer.to(device)


def peft_mlp(m: BenchModel, device: torch.device, gen: torch.Generator, quant: str | None = None) -> nn.Module:
    """An HF ``LlamaMLP`` of ``m``'s shape and activation, bf16 (or NF4) frozen bases, with PEFT LoRA (r=16,
    alpha=16, fp32 adapters, B randomized so that the adapter contributes) on gate/up/down."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    s = m.shape
    config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, hidden_act=m.hf_act, mlp_bias=False)
    with torch.device("meta"):  # every parameter is replaced below
        mlp = LlamaMLP(config)
    for name, (i, o) in {"gate_proj": (s.hidden, s.intermediate), "up_proj": (s.hidden, s.intermediate),
                         "down_proj": (s.intermediate, s.hidden)}.items():
        weight = _randn((o, i), gen, device, i ** -0.5)
        if quant is None:
            layer = nn.Linear(i, o, bias=False, device="meta")
            layer.weight = nn.Parameter(weight, requires_grad=False)
        else:
            layer = _linear4bit(weight, device)
        setattr(mlp, name, layer)
    holder = _Holder(mlp)
    if quant is not None:
        holder.is_loaded_in_4bit = True  # PEFT then wraps Linear4bit bases with its bnb LoRA layer
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                        target_modules=["gate_proj", "up_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(holder, config)
    with torch.no_grad():
        for layer in mlp.modules():
            if isinstance(layer, LoraLayer) and "default" in layer.lora_B:
                lora_B = layer.lora_B["default"].weight  # PEFT starts B at 0: the adapter would do nothing
                std = 0.5 / (layer.scaling["default"] * lora_B.shape[1] ** 0.5)
                lora_B.copy_(_randn(lora_B.shape, gen, device, std, dtype=lora_B.dtype))
    return mlp


class LoraCase(Case):
    name = "lora"
    quant: str | None = None

    def setup(self, m, device, gen):
        return peft_mlp(m, device, gen, self.quant)

    def params(self, mlp):
        return [p for p in mlp.parameters() if p.requires_grad]

    def inputs(self, m, tokens, mlp, device, gen, grad):
        return (_randn((tokens, m.shape.hidden), gen, device).requires_grad_(grad),)

    def hf_eager(self, m, mlp):
        return mlp

    def sloth_core(self, m, mlp):
        from sloth_core.kernels.lora_mlp import lora_mlp
        from sloth_core.kernels.lora_peft import lora_spec

        specs = [lora_spec(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")]
        for spec in specs:
            if isinstance(spec, str):
                raise Unavailable(f"lora_spec: {spec}")
        return lambda x: lora_mlp(x, *specs, m.shape.activation)

    def liger(self, m, mlp):
        fn = _liger_gated(m)  # LigerSwiGLUMLP / LigerGEGLUMLP's forward, on the PEFT projections
        return lambda x: mlp.down_proj(fn.apply(mlp.gate_proj(x), mlp.up_proj(x)))

    def work(self, m, tokens, mode):
        s = m.shape
        return Work("tflops", lora_mlp_flops(tokens, s.hidden, s.intermediate, LORA_RANK, mode))


class LoraNF4Case(LoraCase):
    name = "lora_nf4"
    quant = "nf4"
