"""Verification judges small outputs too: in bf16 a whole probe output can lie below the elementwise atol (3.2e-2;
a LoRA MLP of a freshly initialized model gives ~1e-2), where an elementwise check alone would pass anything of that
size. The probe's comparisons therefore always apply the relative-norm bound to a tensor that is not all zeros."""
import torch

from sloth_core.registry.pattern import Probe
from sloth_core.tolerances import compare
from sloth_core.verify import verify


def _probe():
    x = (1e-2 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    return Probe(inputs=(x.requires_grad_(),), dtype=torch.bfloat16)


def test_a_small_output_off_by_half_is_refused():
    right = lambda x: x * 0.5  # noqa: E731 - outputs ~5e-3, all below bf16's atol
    wrong = lambda x: x * 0.75  # noqa: E731
    assert compare(wrong(_probe().inputs[0]), right(_probe().inputs[0])) is None  # the elementwise check alone: blind
    failure = verify(right, wrong, right, _probe())
    assert failure is not None and "relative error" in failure.reason, failure


def test_a_small_output_computed_right_passes():
    right = lambda x: x * 0.5  # noqa: E731
    same = lambda x: (x.float() * 0.5).to(x.dtype)  # noqa: E731 - another order of the same computation
    assert verify(right, same, right, _probe()) is None


def test_all_zero_outputs_are_equal_outputs():
    zero = lambda x: x * 0.0  # noqa: E731
    assert verify(zero, zero, zero, _probe()) is None
