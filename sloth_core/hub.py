"""sloth_core's kernels under the names of transformers' hub-kernel layers (the ``kernels`` library's
``kernelize``), so that a user who turns those layers on gets the same kernels as ``optimize`` does.

    from sloth_core import hub
    hub.kernelize(model)                                  # kernels.kernelize with sloth_core's mapping alone
    with kernels.use_kernel_mapping(hub.kernel_mapping(), inherit_mapping=False):
        kernels.kernelize(model, mode=Mode.TRAINING, device="cuda")   # the same, by hand

The mapping names a local repository (``kernels.LocalLayerRepository``) in this package, ``hub_layers/``, whose
layers check each module's code before running a kernel (:mod:`sloth_core.hub_layers.layers`). Mapped names (the
names transformers 5.2x declares): :data:`LAYERS`. transformers exposes no gated-activation name (its ``SiLU`` is
the activation alone, which sloth_core has no kernel for) and no name on Gemma's RMSNorm (``1 + w``).
"""
from __future__ import annotations

from pathlib import Path

#: The local repository ``kernels`` loads (``metadata.json``, ``__init__.py``, ``layers.py``).
REPO_PATH = Path(__file__).resolve().parent / "hub_layers"

#: transformers' hub-kernel name -> the layer of :data:`REPO_PATH` that serves it.
LAYERS = {"RMSNorm": "RMSNorm", "rotary_pos_emb": "RotaryPosEmb"}


def kernel_mapping(device: str = "cuda") -> dict:
    """The mapping for ``kernels.register_kernel_mapping`` / ``kernels.use_kernel_mapping``: each name of
    :data:`LAYERS` on ``device`` (a ``kernels`` device type: ``"cuda"``; ``"cpu"`` runs the kernels under Triton's
    interpreter when ``TRITON_INTERPRET=1``, their PyTorch references otherwise), for training and inference.
    Under ``torch.compile`` modes ``kernelize`` keeps the modules' own forwards (the layers do not claim it)."""
    from kernels import LocalLayerRepository, Mode

    return {name: {device: {mode: LocalLayerRepository(repo_path=REPO_PATH, layer_name=layer)
                            for mode in (Mode.TRAINING, Mode.INFERENCE)}}
            for name, layer in LAYERS.items()}


def kernelize(model, mode=None, device: str | None = None):
    """``kernels.kernelize(model, ...)`` with sloth_core's mapping and no other (``inherit_mapping=False``: a name
    sloth_core does not map keeps, or gets back, its module's own forward). ``mode`` defaults to
    ``Mode.TRAINING`` for a model in training mode, else ``Mode.INFERENCE``; ``device`` to the type of the model's
    first parameter. Returns the model."""
    import kernels

    if mode is None:
        mode = kernels.Mode.TRAINING if model.training else kernels.Mode.INFERENCE
    if device is None:
        device = next(model.parameters()).device.type
    with kernels.use_kernel_mapping(kernel_mapping(device), inherit_mapping=False):
        return kernels.kernelize(model, mode=mode, device=device)
