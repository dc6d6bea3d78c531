"""Counting Hugging Face's own checkpoint calls (the checkpointing and takeover tests)."""


def count_hf_checkpoints(layers):
    """A one-element list counting the calls of HF's checkpoint function (set on each layer by HF's enable)."""
    calls = [0]
    for layer in layers:
        func = layer._gradient_checkpointing_func

        def counting(*args, func=func, **kwargs):
            calls[0] += 1
            return func(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    return calls
