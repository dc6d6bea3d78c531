"""What a saved-tensor hook keeps on the device: the tensor detached.

A hook that returned a saved tensor as it is would, for a tensor that is its own node's output, hold that node
through the tensor's ``grad_fn``: a reference cycle through autograd's C++ objects that no ``gc`` collects. On a
QLoRA model with offloading, every step's layer stashes and host copies stayed alive that way.
"""
from __future__ import annotations

import torch


def kept(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a pack hook keeps it on the device (its own unpack hook returns it as it is)."""
    return t.detach()
