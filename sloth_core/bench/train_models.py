"""The models and data of ``sloth-core bench train`` (and ``--flow sft``): a preset's causal LM with random weights
(:data:`PRESETS`), its NF4 quantization, the PEFT LoRA on :data:`TARGETS`, the random token batches."""
from __future__ import annotations

import torch

from ..presets import MODEL_CONFIGS
from .args import _known

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = {"none": "lora_bf16", "nf4": "qlora_nf4"}  # --quant value -> setup name in the rows

PRESETS = MODEL_CONFIGS  # the models the benchmark builds (sloth_core.presets)
ATTN_IMPLEMENTATION = {"gemma-2-9b": "eager"}  # see sloth_core.bench.train's docstring; others: "sdpa"


def preset_config(preset: str, layers: int | None = None):
    """The transformers config of ``preset`` (``layers`` overrides the number of decoder layers); nothing is
    allocated."""
    from transformers import AutoConfig

    _known(preset, PRESETS, "preset")
    kw = dict(PRESETS[preset])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    cfg.use_cache = False
    return cfg


def build(preset: str, layers: int | None = None, quant: str = "none", *, device="cuda",
          dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """``preset``'s causal LM with random weights (seeded), on ``device`` in ``dtype``, in training mode; ``quant``
    ``"nf4"`` quantizes the decoder projections (:func:`quantize_nf4`)."""
    from transformers import AutoModelForCausalLM

    _known(quant, SETUPS, "quant")
    cfg = preset_config(preset, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                 attn_implementation=ATTN_IMPLEMENTATION.get(preset, "sdpa"))
    if quant == "nf4":
        quantize_nf4(model, device)
    return model.train()


def _replace_projections(model, quantized) -> None:
    """Each decoder projection in :data:`TARGETS` (an ``nn.Linear``) replaced by ``quantized(lin)``."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                lin = getattr(parent, name, None)
                if isinstance(lin, torch.nn.Linear):
                    setattr(parent, name, quantized(lin))
                    del lin
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _frozen_bias(q, lin):
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
    return q


def quantize_nf4(model, device="cuda") -> None:
    """Replace the decoder's projections by bitsandbytes NF4 double-quant ``Linear4bit`` layers (bf16 compute), as
    ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True))`` would, without a save/load round trip of a random checkpoint."""
    import bitsandbytes as bnb

    def nf4(lin):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")._quantize(device)
        return _frozen_bias(q, lin)

    _replace_projections(model, nf4)
    model.is_loaded_in_4bit = True  # as from_pretrained sets it: PEFT then wraps the layers with its bnb LoRA class


def quantize_int8(model, threshold: float = 6.0) -> None:
    """Replace the decoder's projections by bitsandbytes LLM.int8 ``Linear8bitLt`` layers (on the GPU), as
    ``load_in_8bit=True`` builds them (``llm_int8_threshold`` 6 by default)."""
    import bitsandbytes as bnb

    def int8(lin):
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=threshold, device="meta")
        q.weight = bnb.nn.Int8Params(lin.weight.data.to(torch.float16), requires_grad=False,
                                     has_fp16_weights=False).cuda()
        return _frozen_bias(q, lin)

    _replace_projections(model, int8)
    model.is_loaded_in_8bit = True


def add_lora(model, rank: int = 16, seed: int = 0):
    """``get_peft_model`` with LoRA ``r = lora_alpha = rank``, dropout 0, on :data:`TARGETS` (seeded init)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def make_batches(vocab_size: int, steps: int, batch: int, seq: int, device="cuda", seed: int = 1) -> list:
    """``steps`` batches of random token ids ``[batch, seq]`` (the same for every provider)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch, seq), generator=g).to(device) for _ in range(steps)]


def model_name(preset: str, layers: int | None = None) -> str:
    """The ``model`` of a row: the preset, marked when its number of layers was overridden."""
    return preset if not layers else f"{preset}-{layers}l"
