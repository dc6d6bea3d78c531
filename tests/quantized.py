"""A tiny Llama as bitsandbytes 4-bit (NF4, double quant, bf16 compute), loaded the way users load one:
``from_pretrained(quantization_config=...)`` of a saved random checkpoint. bitsandbytes' 4-bit layers run on the CPU,
so the tests using it run everywhere."""
import warnings

import torch

from sloth_core.tiny import tiny_model


def save_tiny_llama(path):
    """A random tiny Llama checkpoint in bf16 at ``path``. Intermediate size 128: a multiple of the 64-element
    quantization block. bitsandbytes 0.50.2's own CPU 4-bit matmul scales blocks per row and is wrong when a row is
    not a whole number of blocks (96 was); sloth_core's verification then (rightly) refuses to swap the fused MLP,
    since it no longer agrees with the module it replaces."""
    tiny_model("llama", dtype=torch.bfloat16, intermediate_size=128).save_pretrained(path)
    return path


def load_4bit(path, device):
    """The checkpoint at ``path`` loaded in NF4 on ``device``, in training mode (``from_pretrained`` returns eval
    mode)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_use_double_quant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": device})
    return model.train()
