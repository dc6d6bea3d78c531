"""Test-suite setup.

* On a machine without CUDA, kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` is set here,
  before anything imports Triton or defines a ``@triton.jit`` function.
* Kernel outputs are NaN-poisoned (``SLOTH_CORE_POISON=1``): an element a kernel forgets to write fails.
* Hypothesis profiles: ``ci`` (few examples, the default), ``dev``, ``thorough`` (``HYPOTHESIS_PROFILE=thorough``).
* Under the interpreter, float32 -> bfloat16 casts round to nearest even as on a GPU, instead of the
  interpreter's truncation (``tests/interpreter_rounding.py``).
* ``@pytest.mark.cuda`` marks tests that need a CUDA GPU; they are skipped elsewhere.
* ``USE_HUB_KERNELS=NO``: the test machines have no network, and transformers 5.2x's ``from_pretrained`` would
  fetch hub kernels (``kernels-community/rotary``, ...) on a GPU -- what an offline user sets too. The attention
  instances keep their hub-kernel slots, which the rope tests go through.
"""
import os

try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SLOTH_CORE_POISON"] = "1"
os.environ.setdefault("USE_HUB_KERNELS", "NO")
# Kernel tests force their launch parameters; no tuning on first use or cached winners behind their back
# (tests/autotune/ sets its own cache and mode).
os.environ.setdefault("SLOTH_CORE_AUTOTUNE", "0")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               derandomize=False, print_blob=True)
# CI draws the same examples on every run (a landing must not depend on a fresh random draw); dev, thorough explore
settings.register_profile("ci", max_examples=6, **{**_common, "derandomize": True})
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from sloth_core.kernels import _runtime  # noqa: E402

_runtime.set_poison(True)
if not _HAS_CUDA:  # the interpreter rounds float32 -> bfloat16 as a GPU does (tests/interpreter_rounding.py)
    from tests import interpreter_rounding  # noqa: E402

    interpreter_rounding.install()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernels are tested on: CUDA when present, else the CPU under the interpreter."""
    return _torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _keep_triton_interpret():
    """CLI tests that fake a machine without CUDA run ``sloth_core``'s ``main()``, which sets
    ``TRITON_INTERPRET=1`` for its process; restore the variable after every test, so that on a GPU machine the
    later tests do not run their kernels in the interpreter."""
    value = os.environ.get("TRITON_INTERPRET")
    yield
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
