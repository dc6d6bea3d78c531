"""Model shapes for pre-tuning, and the kernel launch keys a model's training step produces.

A :class:`ModelShape` comes from a preset name (:data:`PRESETS`) or a Hugging Face ``config.json`` (a file or
a directory holding one; a multimodal config's ``text_config`` is used). :func:`launch_keys` lists the launch
keys -- exactly what the launchers pass to ``config_for`` -- of one step over ``tokens`` tokens:

* ``rms_norm`` on ``[tokens, hidden]`` (the decoder norms), and the per-head ``q_norm`` / ``k_norm`` on
  ``[tokens * heads, head_dim]`` / ``[tokens * kv_heads, head_dim]`` for Qwen3 / Gemma3;
* ``gated_activation`` on ``tokens * intermediate`` elements;
* ``rope`` on ``tokens`` tokens, ``max(heads, kv_heads)`` heads, half the head dim;
* ``fused_linear_cross_entropy`` on ``[tokens, hidden] x [vocab, hidden]``, and ``cross_entropy`` on the
  chunks of logits it walks through (:func:`loss_chunk_keys`, from its chunk size).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..presets import MODEL_CONFIGS, REAL_MODELS

_QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2")
_GELU_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast", "gelu")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    activation: str = "silu"
    qk_norm: bool = False

    def describe(self) -> str:
        return (f"{self.name}: hidden {self.hidden}, intermediate {self.intermediate}, heads {self.heads}/"
                f"{self.kv_heads} x {self.head_dim}, vocab {self.vocab}, {self.activation}"
                f"{', q/k norms' if self.qk_norm else ''}")




def model_shape(spec: str) -> ModelShape:
    """A preset name (case-insensitive), or the path of a ``config.json`` / a directory holding one."""
    name = spec.strip().lower()
    if name in PRESETS:
        return PRESETS[name]
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}) nor a config.json path")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return shape_from_config(config, name=path.parent.name or path.name)


def shape_from_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """The shape of a transformers config dict (``text_config`` of a multimodal one)."""
    if not isinstance(config, dict):
        raise ValueError("config.json does not hold an object")
    text = config.get("text_config")
    cfg = {**config, **text} if isinstance(text, dict) else config
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise ValueError(f"config of {name} lacks {', '.join(missing)}")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    act = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu")
    model_type = str(cfg.get("model_type", ""))
    return ModelShape(
        name=name, hidden=hidden, intermediate=int(cfg["intermediate_size"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
        activation="gelu_tanh" if act in _GELU_ACTIVATIONS else "silu",
        qk_norm=model_type in _QK_NORM_MODEL_TYPES)


# The released models' shapes, from their configs (sloth_core.presets: the one home of them).
PRESETS: dict[str, ModelShape] = {name: shape_from_config(MODEL_CONFIGS[name], name) for name in REAL_MODELS}


def launch_keys(shape: ModelShape, tokens: int, dtype, num_sms: int) -> list[tuple[str, dict]]:
    """``(kernel, launch key)`` of one LoRA training step over ``tokens`` tokens (frozen norms: no dw
    reduction; the loss chunks aside, see :func:`loss_chunk_keys`). ``num_sms``: the GPU's SM count, part of
    the rms_norm launch key."""
    norm = dict(dtype=dtype, dw_reduction=False, interpret=False, num_sms=num_sms)
    keys = [("rms_norm", dict(n_rows=tokens, n_cols=shape.hidden, **norm))]
    if shape.qk_norm:
        for heads in dict.fromkeys((shape.heads, shape.kv_heads)):
            keys.append(("rms_norm", dict(n_rows=tokens * heads, n_cols=shape.head_dim, **norm)))
    keys += [
        ("gated_activation", dict(n=tokens * shape.intermediate, dtype=dtype)),
        ("rope", dict(n_tokens=tokens, n_heads=max(shape.heads, shape.kv_heads), half=shape.head_dim // 2,
                      dtype=dtype)),
        ("fused_linear_cross_entropy", dict(n_tokens=tokens, vocab=shape.vocab, hidden=shape.hidden, dtype=dtype)),
    ]
    return keys


def loss_chunk_keys(shape: ModelShape, tokens: int, chunk_tokens: int, dtype) -> list[tuple[str, dict]]:
    """The ``cross_entropy`` launch keys of the fused loss walking ``tokens`` rows in chunks of ``chunk_tokens``."""
    chunk = max(1, min(chunk_tokens, tokens))
    rows = dict.fromkeys(r for r in (chunk, tokens % chunk) if r)
    return [("cross_entropy", dict(n_rows=r, n_cols=shape.vocab, dtype=dtype)) for r in rows]
