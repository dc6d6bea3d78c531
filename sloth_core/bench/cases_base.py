"""What every kernel case of ``sloth-core bench kernels`` builds on (:mod:`sloth_core.bench.cases`): the model
shape it runs at (:class:`BenchModel`), the :class:`Case` interface, random inputs, HF's causal-LM loss and
Liger-Kernel's gated-activation functions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from sloth_core.autotune.presets import ModelShape

from .args import MODES
from .cases_work import Work

DTYPE = torch.bfloat16


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
