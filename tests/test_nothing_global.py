"""Nothing process-wide: optimizing a model, training it (offloading checkpointing, attention routing included) and
restoring it (on the CPU with the whole offload path: ``offload_on_cpu``) leaves ``torch.nn.functional``, the
transformers modules and the model classes as they were."""
import sys

import pytest
import torch

import sloth_core
from tests.batches import token_batch
from tests.sdpa_lora import offload_on_cpu, sdpa_lora_model  # noqa: F401 (a fixture)


def _snapshot() -> dict:
    """Every attribute of torch.nn.functional, of each loaded transformers module and of the classes they define,
    by identity."""
    modules = {"torch.nn.functional": torch.nn.functional}
    modules.update({n: m for n, m in list(sys.modules.items()) if n.startswith("transformers.") and m is not None})
    snap = {}
    for name, module in modules.items():
        for attr, value in list(vars(module).items()):
            snap[(name, attr)] = id(value)
            if isinstance(value, type) and getattr(value, "__module__", None) == name:
                for cattr, cvalue in list(vars(value).items()):
                    snap[(name, attr, cattr)] = id(cvalue)
    return snap


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_optimize_train_restore_leaves_every_global_as_it_was(model_type, device, offload_on_cpu):
    model = sdpa_lora_model(model_type, device)
    ids, labels = token_batch(device)
    model(input_ids=ids, labels=labels)  # whatever transformers imports lazily on a first call is loaded now
    before = _snapshot()
    sloth_core.optimize(model, gradient_checkpointing="offload")
    model(input_ids=ids, labels=labels).loss.backward()
    during = _snapshot()
    sloth_core.restore(model)
    after = _snapshot()
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, changed[:10]
    assert not sorted(k for k in before if during.get(k) != before[k])  # nothing patched between calls either
