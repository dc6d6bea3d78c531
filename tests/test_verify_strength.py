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


def test_a_wrong_lora_a_gradient_is_refused_even_with_b_at_its_zero_init(monkeypatch, device):
    """PEFT starts ``B`` at zero, which makes the gradient of ``A`` zero for every implementation: the LoRA probes
    give an all-zero ``B`` a random stand-in while they run (and give the model its own back), so a kernel whose
    ``dA`` is wrong is refused at ``optimize`` instead of training ``A`` wrongly from the first step on."""
    import warnings

    from peft import LoraConfig, get_peft_model

    import sloth_core
    from sloth_core.kernels import lora_linear as lora_linear_module
    from sloth_core.tiny import tiny_model

    model = get_peft_model(tiny_model("llama", device=device), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    assert not any(p.any() for n, p in model.named_parameters() if "lora_B" in n)  # PEFT's zero init
    own_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    function = lora_linear_module._LoRALinearFunction
    backward = function.backward

    def wrong_da(ctx, dy):
        dx, dA, dB, *rest = backward(ctx, dy)
        return (dx, None if dA is None else 1.5 * dA, dB, *rest)

    monkeypatch.setattr(function, "backward", staticmethod(wrong_da))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth_core.optimize(model, exclude="lora_qkv")
    rows = [r for r in sloth_core.report(model) if r.pattern == "lora_linear"]
    assert rows and all(r.status == "skipped" and "gradient" in r.detail for r in rows), rows
    assert all(torch.equal(p, own_b[n]) for n, p in model.named_parameters() if "lora_B" in n)
