"""Token batches shared by the model-level tests."""
import torch


def token_batch(device, vocab=128, b=2, s=7, seed=1):
    """``(input_ids, labels)`` of random tokens; the first two labels of row 0 are ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids.to(device), labels.to(device)
