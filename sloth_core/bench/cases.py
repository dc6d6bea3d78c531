"""What ``sloth-core bench kernels`` measures: one :class:`Case` per kernel family -- its per-model state, random
inputs, the callables of the providers (``hf_eager``, ``sloth_core``, ``liger``) and its work model -- on the shapes
of real models (:class:`BenchModel`), in bf16. The runner, the correctness guard and the CLI:
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
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sloth_core.autotune.presets import ModelShape

from .args import MODES

DTYPE = torch.bfloat16
B = 2  # bytes of a bf16 element
SEQ_LEN = 2048
LORA_RANK = 16
LORA_ALPHA = 16
NF4_BLOCKSIZE = 64


class Unavailable(Exception):
    """A provider that does not exist for this case (the message is the reason)."""


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class BenchModel:
    """A model shape plus what the kernels need beyond it: the RMSNorm flavour and the final-logit soft-cap."""

    shape: ModelShape
    norm: str = "llama"  # "gemma": Gemma2RMSNorm, (1 + w) and the product in fp32
    softcap: float | None = None
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def name(self) -> str:
        return self.shape.name

    @property
    def hf_act(self) -> str:
        """The ``hidden_act`` of HF configs for the shape's activation."""
        return "gelu_pytorch_tanh" if self.shape.activation == "gelu_tanh" else "silu"


def bench_model(spec: ModelShape | BenchModel) -> BenchModel:
    """A :class:`BenchModel`; a plain shape named ``gemma*`` gets Gemma's norm, ``gemma-2*`` also soft-cap 30."""
    if isinstance(spec, BenchModel):
        return spec
    gemma = spec.name.startswith("gemma")
    return BenchModel(spec, norm="gemma" if gemma else "llama",
                      softcap=30.0 if spec.name.startswith("gemma-2") else None)


# ---------------------------------------------------------------------------------------------- work models


@dataclass(frozen=True)
class Work:
    """What one call must do: ``amount`` bytes (``unit="gbps"``) or FLOP (``unit="tflops"``)."""

    unit: str
    amount: float

    def rate(self, ms: float) -> float:
        """GB/s or TFLOP/s at ``ms`` a call."""
        return self.amount / ms / (1e6 if self.unit == "gbps" else 1e9)


def seq_len(tokens: int) -> int:
    return SEQ_LEN if tokens % SEQ_LEN == 0 else tokens


def rms_norm_bytes(tokens: int, hidden: int, mode: str) -> int:
    return (2 * tokens * hidden + hidden) * B if mode == "fwd" else (5 * tokens * hidden + 2 * hidden) * B


def gated_activation_bytes(tokens: int, inter: int, mode: str) -> int:
    return (3 if mode == "fwd" else 8) * tokens * inter * B


def rope_bytes(tokens: int, heads: int, kv_heads: int, head_dim: int, mode: str) -> int:
    one_pass = 2 * tokens * (heads + kv_heads) * head_dim * B + 2 * seq_len(tokens) * head_dim * B
    return one_pass if mode == "fwd" else 2 * one_pass


def cross_entropy_bytes(tokens: int, vocab: int, mode: str) -> int:
    return (1 if mode == "fwd" else 2) * tokens * vocab * B + 8 * tokens


def dequant_bytes(n: int, blocksize: int = NF4_BLOCKSIZE, blocksize2: int = 256) -> int:
    blocks = math.ceil(n / blocksize)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / blocksize2) + n * B


def linear_ce_flops(tokens: int, vocab: int, hidden: int, mode: str) -> int:
    return (2 if mode == "fwd" else 4) * tokens * vocab * hidden


def lora_mlp_flops(tokens: int, hidden: int, inter: int, rank: int, mode: str) -> int:
    if mode == "fwd":
        return 6 * tokens * hidden * inter + 6 * tokens * rank * (hidden + inter)
    return 12 * tokens * hidden * inter + 18 * tokens * rank * (hidden + inter)


# ---------------------------------------------------------------------------------------------- helpers


def _randn(shape, gen: torch.Generator, device: torch.device, std: float = 1.0, dtype=DTYPE) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)


def _labels(tokens: int, vocab: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab, (tokens,), generator=gen, device=device)


def _loss_value(out: Any) -> torch.Tensor:
    """The loss tensor of a Liger loss (a tensor, a tuple, or an output object with ``.loss``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.loss


def hf_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2's final-logit soft-capping in the logits dtype (``Gemma2ForCausalLM.forward``), then HF's
    ``ForCausalLMLoss`` on already-shifted labels (``.float()``, ``F.cross_entropy``, mean)."""
    if softcap is not None:
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - older transformers
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)
    return ForCausalLMLoss(logits, None, logits.shape[-1], shift_labels=labels)


def _liger_ops(*names: str) -> tuple:
    """Liger-Kernel's autograd functions (``liger_kernel.ops``, or their modules in older versions)."""
    try:
        import liger_kernel.ops as ops

        return tuple(getattr(ops, n) for n in names)
    except (ImportError, AttributeError):
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        found = {"LigerGELUMulFunction": LigerGELUMulFunction, "LigerSiLUMulFunction": LigerSiLUMulFunction}
        return tuple(found[n] for n in names)


def _liger_gated(m: BenchModel):
    name = "LigerSiLUMulFunction" if m.shape.activation == "silu" else "LigerGELUMulFunction"
    return _liger_ops(name)[0]


# ---------------------------------------------------------------------------------------------- cases


class Case:
    """One kernel: its per-(kernel, model) state, an input set maker, the providers and the work model."""

    name = ""
    modes: tuple[str, ...] = MODES
    token_free = False  # no token dimension (dequant): one row per (model, provider)
    #: Argument position -> its token dimensions (marked dynamic for torch.compile); None: dim 0 of every tensor.
    token_dims: Mapping[int, tuple[int, ...]] | None = None
    compile_skip: str | None = None  # why torch.compile is not run for this case

    def setup(self, m: BenchModel, device: torch.device, gen: torch.Generator) -> Any:
        """Per (kernel, model) state shared by every token count: modules, weights."""
        return None

    def inputs(self, m: BenchModel, tokens: int | None, state: Any, device: torch.device,
               gen: torch.Generator, grad: bool) -> tuple:
        """One random input set (activations ``requires_grad=grad``)."""
        raise NotImplementedError

    def params(self, state: Any) -> list[torch.Tensor]:
        """Trainable parameters (their gradients are compared and reset like the inputs')."""
        return []

    def hf_eager(self, m: BenchModel, state: Any) -> Callable:
        raise NotImplementedError

    def sloth_core(self, m: BenchModel, state: Any) -> Callable:
        raise NotImplementedError

    def liger(self, m: BenchModel, state: Any) -> Callable:
        raise Unavailable("Liger-Kernel has no equivalent")

    def work(self, m: BenchModel, tokens: int | None, mode: str) -> Work:
        raise NotImplementedError


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


CASES: dict[str, Case] = {c.name: c for c in (RMSNormCase(), GatedActivationCase(), RopeCase(), CrossEntropyCase(),
                                              FusedLinearCrossEntropyCase(), DequantCase(), LoraCase(),
                                              LoraNF4Case())}


def nf4_available(device: torch.device) -> bool:
    """Whether the NF4 LoRA variant runs: bitsandbytes importable and a CUDA device."""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
