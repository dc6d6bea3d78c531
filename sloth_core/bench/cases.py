"""What ``sloth-core bench kernels`` measures: one :class:`Case` per kernel family -- its per-model state, random
inputs, the callables of the providers (``hf_eager``, ``sloth_core``, ``liger``) and its work model -- on the shapes
of real models (:class:`BenchModel`), in bf16; what they share is :mod:`sloth_core.bench.cases_base`, their work
models :mod:`sloth_core.bench.cases_work`, the LoRA cases :mod:`sloth_core.bench.cases_lora`. The runner:
:mod:`sloth_core.bench.kernels`.

Cases (one :class:`Case` subclass each). ``T`` tokens, ``b = 2`` bytes a bf16 element; the work model is the
bytes an ideal implementation reads plus writes (GB/s rows), or the FLOP of the GEMMs (TFLOP/s rows):

* ``rms_norm``, x [T, H]: ``LlamaRMSNorm`` (Gemma-2: ``Gemma2RMSNorm``, ``(1 + w)`` and the product in fp32),
  frozen weight. fwd ``2 T H b + H b`` (read x, write y); fwd_bwd ``5 T H b + 2 H b`` (then read dy and x,
  write dx).
* ``gated_activation``, g, u [T, I]: ``ACT2FN[act](g) * u`` (silu; Gemma-2 gelu_pytorch_tanh).
  fwd ``3 T I b`` (read g, u, write h); fwd_bwd ``8 T I b`` (then read dh, g, u, write dg, du).
* ``rope``, q [B, S, Hq, D], k [B, S, Hk, D] passed as HF passes them (``.transpose(1, 2)`` views), cos/sin
  [1, S, D]: ``apply_rotary_pos_emb``. fwd ``2 T (Hq + Hk) D b + 2 S D b``; fwd_bwd twice that.
* ``cross_entropy``, logits [T, V], int64 labels: Gemma-2's soft-cap 30 in bf16, then ``ForCausalLMLoss``
  (``.float()``, ``F.cross_entropy``, mean). fwd ``T V b + 8 T``; fwd_bwd ``2 T V b + 8 T`` (read the logits once,
  write dlogits once).
* ``fused_linear_cross_entropy``, hidden [T, H], frozen lm_head W [V, H]: ``F.linear(hidden, W)`` then the loss
  above. FLOP fwd ``2 T V H``; fwd_bwd ``4 T V H`` (the logits, then dX = dlogits W).
* ``dequant``, the NF4 gate_proj weight [I, H] (``n = I H``, double-quantized absmax, blocksize 64):
  ``bitsandbytes.functional.dequantize_4bit``; fwd only, no token dimension. ``n/2 + n/64 + 4 ceil(n/16384)
  + n b`` (codes, absmax codes and second-level scales read; the weight written).
* ``lora``, x [T, H]: an HF ``LlamaMLP`` of the model's shape and activation, PEFT LoRA (r = 16, alpha = 16,
  fp32 adapters) on gate/up/down; sloth_core is ``lora_mlp``. FLOP fwd ``6 T H I + 6 T r (H + I)``; fwd_bwd
  ``12 T H I + 18 T r (H + I)`` (frozen base: dX only; adapters: dX, dA, dB).
* ``lora_nf4``: the same on bitsandbytes NF4 bases (the dequantization not counted); runs with ``lora`` when
  bitsandbytes imports and the device is CUDA.

Liger equivalents: ``LigerRMSNorm`` (``in_place=False``, so that the fixed ``grad_output`` is not overwritten),
``LigerSiLUMulFunction`` / ``LigerGELUMulFunction`` (also inside the PEFT MLP for lora, as Liger's
``LigerSwiGLUMLP`` / ``LigerGEGLUMLP`` compute it), ``liger_rotary_pos_emb``, ``LigerCrossEntropyLoss``,
``LigerFusedLinearCrossEntropyLoss``; none for dequant.

RoPE's tokens are sequences of 2048 (``B = T / 2048``) when ``T`` is a multiple of 2048, else one sequence.
``dequant`` has no token dimension (``tokens`` is ``None``). ``fwd`` inputs do not require grad; ``fwd_bwd`` ones
have the activations requiring grad (frozen base weights, trainable LoRA adapters: :meth:`Case.params`).
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

from .cases_base import DTYPE, Case, Unavailable, _labels, _liger_gated, _loss_value, _randn, hf_causal_lm_loss
from .cases_lora import LoraCase, LoraNF4Case
from .cases_work import (NF4_BLOCKSIZE, Work, cross_entropy_bytes, dequant_bytes, gated_activation_bytes,
                         linear_ce_flops, rms_norm_bytes, rope_bytes, seq_len)


class RMSNormCase(Case):
    name = "rms_norm"

    def setup(self, m, device, gen):
        hidden = m.shape.hidden
        if m.norm == "gemma":
            from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

            module, weight = Gemma2RMSNorm(hidden, eps=m.eps), _randn(hidden, gen, device, 0.1)
        else:
            from transformers.models.llama.modeling_llama import LlamaRMSNorm

            module, weight = LlamaRMSNorm(hidden, eps=m.eps), 1.0 + _randn(hidden, gen, device, 0.1)
        module = module.to(device=device, dtype=DTYPE).requires_grad_(False)
        module.weight.data.copy_(weight)
        return module

    def inputs(self, m, tokens, state, device, gen, grad):
        return (_randn((tokens, m.shape.hidden), gen, device).requires_grad_(grad),)

    def hf_eager(self, m, module):
        return module

    def sloth_core(self, m, module):
        from sloth_core.kernels.rms_norm import rms_norm

        offset, cast = (1.0, "gemma") if m.norm == "gemma" else (0.0, "llama")
        return lambda x: rms_norm(x, module.weight, m.eps, offset, cast)

    def liger(self, m, module):
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        gemma = m.norm == "gemma"
        norm = LigerRMSNorm(m.shape.hidden, eps=m.eps, offset=1.0 if gemma else 0.0,
                            casting_mode="gemma" if gemma else "llama", in_place=False)
        norm = norm.to(device=module.weight.device, dtype=DTYPE).requires_grad_(False)
        norm.weight.data.copy_(module.weight)
        return norm

    def work(self, m, tokens, mode):
        return Work("gbps", rms_norm_bytes(tokens, m.shape.hidden, mode))


class GatedActivationCase(Case):
    name = "gated_activation"

    def inputs(self, m, tokens, state, device, gen, grad):
        shape = (tokens, m.shape.intermediate)
        return _randn(shape, gen, device).requires_grad_(grad), _randn(shape, gen, device).requires_grad_(grad)

    def hf_eager(self, m, state):
        from transformers.activations import ACT2FN

        act = ACT2FN[m.hf_act]
        return lambda gate, up: act(gate) * up

    def sloth_core(self, m, state):
        from sloth_core.kernels.gated_activation import gated_activation

        return lambda gate, up: gated_activation(gate, up, m.shape.activation)

    def liger(self, m, state):
        fn = _liger_gated(m)
        return lambda gate, up: fn.apply(gate, up)

    def work(self, m, tokens, mode):
        return Work("gbps", gated_activation_bytes(tokens, m.shape.intermediate, mode))


def _rope_tables(seq: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` [1, seq, head_dim] as ``LlamaRotaryEmbedding`` returns them (fp32, then bf16)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(DTYPE), emb.sin().to(DTYPE)


def _on_transposed(fn: Callable) -> Callable:
    """``fn(q, k, cos, sin)`` on HF's views: q/k stored [B, S, H, D], passed as ``.transpose(1, 2)``."""
    return lambda q, k, cos, sin: fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


class RopeCase(Case):
    name = "rope"
    token_dims = {0: (0, 1), 1: (0, 1), 2: (1,), 3: (1,)}  # q, k [B, S, H, D]; cos, sin [1, S, D]

    def inputs(self, m, tokens, state, device, gen, grad):
        s, seq = m.shape, seq_len(tokens)
        batch = tokens // seq
        q = _randn((batch, seq, s.heads, s.head_dim), gen, device).requires_grad_(grad)
        k = _randn((batch, seq, s.kv_heads, s.head_dim), gen, device).requires_grad_(grad)
        return (q, k, *_rope_tables(seq, s.head_dim, m.rope_theta, device))

    def hf_eager(self, m, state):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return _on_transposed(apply_rotary_pos_emb)

    def sloth_core(self, m, state):
        from sloth_core.kernels.rope import apply_rope

        return _on_transposed(apply_rope)

    def liger(self, m, state):
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return _on_transposed(liger_rotary_pos_emb)

    def work(self, m, tokens, mode):
        s = m.shape
        return Work("gbps", rope_bytes(tokens, s.heads, s.kv_heads, s.head_dim, mode))


class CrossEntropyCase(Case):
    name = "cross_entropy"

    def inputs(self, m, tokens, state, device, gen, grad):
        logits = _randn((tokens, m.shape.vocab), gen, device, 2.0).requires_grad_(grad)
        return logits, _labels(tokens, m.shape.vocab, gen, device)

    def hf_eager(self, m, state):
        return lambda logits, labels: hf_causal_lm_loss(logits, labels, m.softcap)

    def sloth_core(self, m, state):
        from sloth_core.kernels.cross_entropy import cross_entropy

        return lambda logits, labels: cross_entropy(logits, labels, softcap=m.softcap)

    def liger(self, m, state):
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        loss = LigerCrossEntropyLoss(ignore_index=-100, softcap=m.softcap)
        return lambda logits, labels: _loss_value(loss(logits, labels))

    def work(self, m, tokens, mode):
        return Work("gbps", cross_entropy_bytes(tokens, m.shape.vocab, mode))


class FusedLinearCrossEntropyCase(Case):
    name = "fused_linear_cross_entropy"

    def setup(self, m, device, gen):
        return _randn((m.shape.vocab, m.shape.hidden), gen, device, 2.0 / m.shape.hidden ** 0.5)  # frozen lm_head

    def inputs(self, m, tokens, weight, device, gen, grad):
        hidden = _randn((tokens, m.shape.hidden), gen, device).requires_grad_(grad)
        return hidden, _labels(tokens, m.shape.vocab, gen, device)

    def hf_eager(self, m, weight):
        return lambda hidden, labels: hf_causal_lm_loss(F.linear(hidden, weight), labels, m.softcap)

    def sloth_core(self, m, weight):
        from sloth_core.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        return lambda hidden, labels: fused_linear_cross_entropy(hidden, weight, labels, softcap=m.softcap)

    def liger(self, m, weight):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        kwargs = {} if m.softcap is None else {"softcap": m.softcap}
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, **kwargs)
        return lambda hidden, labels: _loss_value(loss(weight, hidden, labels))

    def work(self, m, tokens, mode):
        return Work("tflops", linear_ce_flops(tokens, m.shape.vocab, m.shape.hidden, mode))


class DequantCase(Case):
    name = "dequant"
    modes = ("fwd",)
    token_free = True
    compile_skip = "bitsandbytes' dequantize_4bit is one opaque op; torch.compile has nothing to fuse"

    def inputs(self, m, tokens, state, device, gen, grad):
        import bitsandbytes.functional as bnbf

        weight = _randn((m.shape.intermediate, m.shape.hidden), gen, device, 0.02)
        packed, quant_state = bnbf.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                                 compress_statistics=True)
        return packed, quant_state

    def hf_eager(self, m, state):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit

    def sloth_core(self, m, state):
        from sloth_core.kernels.dequant import dequantize_4bit

        return dequantize_4bit

    def liger(self, m, state):
        raise Unavailable("Liger-Kernel has no 4-bit dequantization")

    def work(self, m, tokens, mode):
        return Work("gbps", dequant_bytes(m.shape.intermediate * m.shape.hidden))


CASES: dict[str, Case] = {c.name: c for c in (RMSNormCase(), GatedActivationCase(), RopeCase(), CrossEntropyCase(),
                                              FusedLinearCrossEntropyCase(), DequantCase(), LoraCase(),
                                              LoraNF4Case())}


def nf4_available(device: torch.device) -> bool:
    """Whether the NF4 LoRA variant runs: bitsandbytes importable and a CUDA device."""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
