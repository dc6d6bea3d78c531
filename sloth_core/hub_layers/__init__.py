"""sloth_core's kernels as a local repository of the ``kernels`` library (``LocalLayerRepository``): this folder is
the build variant (``metadata.json``, a universal Python backend) and its ``layers`` the classes whose ``forward``
``kernels.kernelize`` puts on transformers' hub-kernel layers. :mod:`sloth_core.hub` builds the mapping.

``kernels`` imports this file under the id in ``metadata.json``; it hands over the package's own ``layers`` module,
so the classes are the same objects however they are reached."""
from sloth_core.hub_layers import layers

__all__ = ["layers"]
