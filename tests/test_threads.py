"""Several threads running optimized models at once. Under Triton's interpreter (the CPU test machines) each launch
swaps ``triton.language``'s functions process-wide and keeps the program id in one shared object, so launches from
several threads must not interleave (``sloth_core.kernels._runtime.launch`` serializes them there); on a GPU the
launches are independent. Either way each thread gets the numbers it would get alone."""
import threading
import warnings

import torch

import sloth_core
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close

THREADS = 4


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_four_threads_each_get_their_own_models_numbers(device):
    ids = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    refs = [_loss_and_grads(tiny_model("llama", seed=i, device=device), ids) for i in range(THREADS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sloth_core.SlothCoreWarning)
        models = [sloth_core.optimize(tiny_model("llama", seed=i, device=device)) for i in range(THREADS)]
    results, errors = [None] * THREADS, []
    start = threading.Barrier(THREADS)

    def work(i):
        try:
            start.wait()
            for _ in range(2):
                results[i] = _loss_and_grads(models[i], ids)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the thread
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(results, refs)):
        assert_close(f"thread {i} loss", loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert_close(f"thread {i} {name}.grad", grads[name], ref_grads[name])
