"""tests/interpreter_rounding.py: under Triton's interpreter the tests' float32 -> bfloat16 casts round to nearest
even, bit for bit as torch (and a GPU) round, in a kernel too; on the pinned Tritons the patch is in place (a Triton
without the function it patches would silently widen the CPU's bf16 bounds: this test says so instead)."""
import torch
import triton
import triton.language as tl

from tests import interpreter_rounding
from tests.marks import interpreter_only


def _values() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.exp(torch.randn(4096, generator=gen) * 8)
    halfway = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 3.3895e38, 1e-40, -0.0])
    return torch.cat([x, halfway, torch.tensor([float("inf"), -float("inf")])])


def test_bits_round_to_nearest_even_as_torch_does():
    x = _values()
    bits = torch.from_numpy(interpreter_rounding._float32_to_bfloat16_bits(x.numpy()).view("int16"))
    assert torch.equal(bits, x.to(torch.bfloat16).view(torch.int16))
    assert interpreter_rounding._float32_to_bfloat16_bits(x.numpy()[:1].reshape(())).shape == ()  # a scalar stays one
    nan = interpreter_rounding._float32_to_bfloat16_bits(torch.tensor([float("nan")]).numpy())
    assert torch.isnan(torch.from_numpy(nan.view("int16")).view(torch.bfloat16)).all()


@triton.jit
def _cast_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.bfloat16), mask=mask)


@interpreter_only
def test_a_kernels_cast_rounds_under_the_interpreter():
    assert interpreter_rounding.rounds(), "the interpreter still truncates float32 -> bfloat16 here"
    x = _values()
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
