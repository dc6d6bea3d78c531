"""The work models of ``sloth-core bench kernels`` (:mod:`sloth_core.bench.cases` derives them): the bytes an ideal
implementation of each kernel reads plus writes, or the FLOP of its GEMMs."""
from __future__ import annotations

import math
from dataclasses import dataclass

B = 2  # bytes of a bf16 element
SEQ_LEN = 2048
NF4_BLOCKSIZE = 64


@dataclass(frozen=True)
class Work:
    """What one call must do: ``amount`` bytes (``unit="gbps"``) or FLOP (``unit="tflops"``)."""

    unit: str
    amount: float

    def rate(self, ms: float) -> float:
        """GB/s or TFLOP/s at ``ms`` a call."""
        return self.amount / ms / (1e6 if self.unit == "gbps" else 1e9)


def seq_len(tokens: int) -> int:
    return SEQ_LEN if tokens % SEQ_LEN == 0 else tokens


def rms_norm_bytes(tokens: int, hidden: int, mode: str) -> int:
    return (2 * tokens * hidden + hidden) * B if mode == "fwd" else (5 * tokens * hidden + 2 * hidden) * B


def gated_activation_bytes(tokens: int, inter: int, mode: str) -> int:
    return (3 if mode == "fwd" else 8) * tokens * inter * B


def rope_bytes(tokens: int, heads: int, kv_heads: int, head_dim: int, mode: str) -> int:
    one_pass = 2 * tokens * (heads + kv_heads) * head_dim * B + 2 * seq_len(tokens) * head_dim * B
    return one_pass if mode == "fwd" else 2 * one_pass


def cross_entropy_bytes(tokens: int, vocab: int, mode: str) -> int:
    return (1 if mode == "fwd" else 2) * tokens * vocab * B + 8 * tokens


def dequant_bytes(n: int, blocksize: int = NF4_BLOCKSIZE, blocksize2: int = 256) -> int:
    blocks = math.ceil(n / blocksize)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / blocksize2) + n * B


def linear_ce_flops(tokens: int, vocab: int, hidden: int, mode: str) -> int:
    return (2 if mode == "fwd" else 4) * tokens * vocab * hidden


def lora_mlp_flops(tokens: int, hidden: int, inter: int, rank: int, mode: str) -> int:
    if mode == "fwd":
        return 6 * tokens * hidden * inter + 6 * tokens * rank * (hidden + inter)
    return 12 * tokens * hidden * inter + 18 * tokens * rank * (hidden + inter)
