"""The data of ``sloth-core bench train --flow sft``: pre-tokenized rows of random token ids, of one length or of
log-normal lengths, the two-token tokenizer TRL wants, and the (workload, padding) runs."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

WORKLOADS = ("fixed", "varlen")
VARLEN = dict(median=300, sigma=1.0, min=16, max=4096)
PAD_ID, EOS_ID = 0, 1  # the tokenizer's; the data uses ids from 2 up


def varlen_lengths(n: int, *, median: int = VARLEN["median"], sigma: float = VARLEN["sigma"],
                   low: int = VARLEN["min"], high: int = VARLEN["max"], seed: int = 0) -> list[int]:
    """``n`` sequence lengths from a log-normal distribution of ``median`` and ``sigma``, rounded, clipped to
    [``low``, ``high``] (seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return x.round().clamp(low, high).long().tolist()


def make_dataset(vocab_size: int, lengths: Sequence[int], seed: int = 1):
    """A pre-tokenized ``datasets.Dataset``: one row of random token ids (in [2, vocab)) per length."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": [torch.randint(2, vocab_size, (n,), generator=g).tolist()
                                            for n in lengths]})


def tokenizer():
    """The ``processing_class`` TRL needs: a word-level tokenizer of two tokens (pad 0, eos 1); the data is
    pre-tokenized, so it supplies only the pad token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def variants(workloads: Iterable[str]) -> list[tuple[str, str]]:
    """(workload, padding) runs: ``fixed`` is padded (there is no padding), ``varlen`` runs both ways."""
    out = []
    for w in workloads:
        out += [(w, "padded")] if w == "fixed" else [(w, "padded"), (w, "padding_free")]
    return out


def mode_name(workload: str, padding: str) -> str:
    """The row's ``mode``: ``fixed``, ``varlen_padded``, ``varlen_padding_free``."""
    return workload if workload == "fixed" else f"{workload}_{padding}"
