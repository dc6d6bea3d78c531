"""The built-in demo: optimize a tiny random model, print the report and the parity check; on a GPU also time a
training step (forward + backward) of a mid-sized model against the unoptimized one."""
from __future__ import annotations

import copy
import time

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out


def parity(ref, model, ids) -> list[tuple[str, float]]:
    from .tolerances import rel_err

    a, b = _step(ref, ids), _step(model, ids)
    with torch.no_grad():  # with labels the fused loss returns no logits; without them they come back as before
        logits_a, logits_b = ref(input_ids=ids).logits, model(input_ids=ids).logits
    rows = [("logits", rel_err(logits_b, logits_a)), ("loss", rel_err(b.loss, a.loss))]
    ga = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    rows.append(("gradients (worst)", max(rel_err(gb[n], ga[n]) for n in ga)))
    return rows


def _time_step(model, ids, reps=10) -> float:
    for _ in range(3):
        _step(model, ids)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _step(model, ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def run_demo(model_type: str, dtype_name: str | None, device: str) -> int:
    from tabulate import tabulate

    import sloth_core

    from .tiny import tiny_model
    from .tolerances import tolerance

    dtype = _DTYPES[dtype_name or ("bf16" if device == "cuda" else "fp32")]
    ref = tiny_model(model_type, dtype=dtype, device=device)
    model = sloth_core.optimize(copy.deepcopy(ref), verbose=True)
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), device=device)
    rows = parity(ref, model, ids)
    bound = tolerance(dtype).rel_norm * 8
    ok = all(err <= bound for _, err in rows)
    print(f"\nparity vs the unoptimized model ({dtype}, {device}; relative error, bound {bound:.1e}):")
    print(tabulate([(k, f"{v:.2e}") for k, v in rows], headers=("quantity", "rel. error"), tablefmt="github"))
    if device == "cuda":
        ref = tiny_model(model_type, dtype=dtype, device=device, hidden_size=2048, intermediate_size=5632,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_hidden_layers=4,
                         vocab_size=32000)
        ref.config._attn_implementation = "sdpa"
        model = sloth_core.optimize(copy.deepcopy(ref))
        ids = torch.randint(0, 32000, (4, 1024), device=device)
        t0, t1 = _time_step(ref, ids), _time_step(model, ids)
        print(f"\ntraining step, {model_type} 4 layers x 2048 hidden, batch 4 x 1024, {dtype} "
              f"(median of 10 warm steps):")
        print(tabulate([("HF eager", f"{t0 * 1e3:.1f}", "1.00x"), ("sloth_core", f"{t1 * 1e3:.1f}", f"{t0 / t1:.2f}x")],
                       headers=("model", "ms/step", "speedup"), tablefmt="github"))
    lost = sloth_core.missing_patterns(model)
    if lost:
        print(f"\ncoverage: {len(lost)} pattern(s) the {model_type} declaration expects were not applied:")
        for m in lost:
            print("  " + m.line())
    else:
        print("\ncoverage: every pattern the declaration expects was applied")
    verdict = "\nPARITY OK" if ok else "\nPARITY FAILED"
    print(verdict + (f", COVERAGE INCOMPLETE ({len(lost)} missing)" if lost else ""))
    return 0 if ok and not lost else 1
