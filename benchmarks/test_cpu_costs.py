"""CPU-side costs of sloth_core (pytest-benchmark): what ``optimize`` spends before the first training step.

    python -m pytest benchmarks/test_cpu_costs.py                    # on demand; CI runs tests/ only
    python -m pytest benchmarks/test_cpu_costs.py --benchmark-json=benchmarks/results/cpu_costs.json

* ``test_optimize_32_layer_llama`` -- ``sloth_core.optimize`` on a fresh 32-layer tiny Llama: pattern matching,
  one verification probe per distinct module signature (kernels under Triton's interpreter), binding.
* ``test_pattern_matching_only`` -- every pattern's ``find`` over every module of that model (no verification).
* ``test_verify_one_rms_norm_probe`` -- one ``sloth_core.verify.verify`` call (original, reference and Triton
  replacement, forward and backward) on the model's final RMSNorm.

The models live on the CPU, where the kernels run only under Triton's interpreter, so ``TRITON_INTERPRET=1`` is set
here before anything imports Triton (as tests/conftest.py does on machines without CUDA). Interpreter times are
not GPU kernel times: these numbers are the Python-side overhead plus interpreted probes.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("SLOTH_CORE_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

import sloth_core  # noqa: E402
from sloth_core.registry.architecture import lookup  # noqa: E402
from sloth_core.tiny import tiny_model  # noqa: E402
from sloth_core.verify import verify  # noqa: E402

LAYERS = 32


def _llama():
    return tiny_model("llama", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def arch():
    return lookup("llama")


def test_optimize_32_layer_llama(benchmark):
    model = benchmark.pedantic(sloth_core.optimize, setup=lambda: ((_llama(),), {}), rounds=5, warmup_rounds=1,
                               iterations=1)
    rows = sloth_core.report(model)
    replaced = [r for r in rows if r.status == "replaced"]
    assert len(replaced) == len(rows) and len(replaced) >= 4 * LAYERS, sloth_core.format_report(model)


def test_pattern_matching_only(benchmark, llama, arch):
    modules = [m for _, m in llama.named_modules()]

    def find_all() -> int:
        return sum(use.find(m) is not None for use in arch.patterns for m in modules)

    found = benchmark(find_all)
    assert found >= 4 * LAYERS


def test_verify_one_rms_norm_probe(benchmark, llama, arch):
    use = next(u for u in arch.patterns if u.name == "rms_norm")
    module = llama.model.norm
    matches = use.find(module)
    assert isinstance(matches, list) and matches, matches
    match, pattern = matches[0], use.pattern
    probe = pattern.probe(module, match, torch.Generator().manual_seed(0))

    def verify_once():
        return verify(original=pattern.adapted(pattern.original(module, match)),
                      replacement=pattern.bound(pattern.replacement(match), module),
                      reference=pattern.bound(pattern.reference(match), module), probe=probe)

    assert benchmark(verify_once) is None
