"""``sloth-core bench train``: end-to-end LoRA / QLoRA training steps on random-weight models of real shapes.

What is measured, per (model preset, setup) -- one model, built once:

* The model: a causal LM built from the real model's configuration (:data:`PRESETS`) with random weights (no
  download), in bf16 on the GPU (fp32 on the CPU, for tests). ``setup`` ``lora_bf16`` keeps the bf16 base;
  ``qlora_nf4`` swaps the decoder projections for bitsandbytes NF4 double-quant ``Linear4bit`` layers (bf16
  compute) -- what ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` gives.
  ``use_cache`` is off (training).
* LoRA from PEFT: rank ``r``, ``lora_alpha = r``, dropout 0, on q/k/v/o/gate/up/down (:data:`TARGETS`). The LoRA
  weights are saved after ``get_peft_model`` and put back before every provider, so every provider starts from
  the same weights and sees the same batches (random token ids, one batch a step, ``labels = input_ids``).
* Providers, run one after the other on that model (always in this order):

  - ``hf_peft``: Hugging Face gradient checkpointing (``use_reentrant=False``) with input-embedding gradients
    (``enable_input_require_grads``), as in the PEFT/TRL recipes; HF's modules everywhere.
  - ``sloth_core``: HF checkpointing off, ``sloth_core.optimize(model, gradient_checkpointing="offload")``
    (its own decoder-layer checkpointing, layer inputs kept in pinned host memory); ``sloth_core.restore``
    afterwards. ``sloth_checkpointing="on"`` keeps the inputs on the GPU; ``"hf"`` keeps HF's checkpointing
    (as ``hf_peft``) and calls ``optimize`` without the option; ``"offload-attention"``, ``"offload-qkv"``,
    ``"offload-inputs"`` are passed to ``optimize`` as they are (what the layers keep in host memory besides their
    inputs: the attention outputs, the q/k/v projection outputs, neither; ``"offload"`` keeps both).
  - ``liger`` (when ``liger_kernel`` is importable): HF checkpointing as ``hf_peft``, plus Liger-Kernel's
    ``_apply_liger_kernel_to_instance`` on the transformers model (RMSNorm, RoPE, SwiGLU/GeGLU, fused linear
    cross-entropy; its defaults). Liger patches the model instance and the ``modeling_<type>`` module; the module
    globals are put back afterwards, the instance is not restorable -- which is why ``liger`` runs last and the
    model is dropped after it.

* Per provider, ``steps`` steps of forward + backward + ``torch.optim.AdamW`` (lr 1e-4, LoRA parameters only;
  a fresh optimizer per provider). Each step is timed with a wall clock around forward, backward, optimizer step
  and ``zero_grad``, ending in ``torch.cuda.synchronize()``; the model's output (HF's logits with it) stays alive
  through the backward, as ``out = model(...); out.loss.backward()`` keeps it and as the steering side's
  baselines were measured (``anchor_bench.py``). The first ``warmup`` steps (Triton compilation,
  autotuning on first use, allocator growth) are left out of the median. Peak memory is
  ``torch.cuda.max_memory_allocated()`` after a reset at the start of the provider's steps: weights, LoRA
  weights, optimizer states, activations (``None`` on the CPU).

A result row (``kind`` ``"train"``, in :mod:`sloth_core.bench.report`'s schema) per provider: ``median_ms`` (step),
``tokens_per_s`` (``batch * seq`` / median step), ``peak_gib``, the loss of every step (``losses``),
``speedup_vs`` ``{"hf_peft": hf median / this median}``, ``memory_vs_hf`` (this peak / hf peak),
``max_rel_loss_diff`` (the largest ``|loss - hf loss| / |hf loss|`` over the steps); also ``step_ms`` (every step),
``batch``, ``seq``, ``rank``, ``setup_s`` (seconds to apply the provider: ``optimize`` for sloth_core, with its
``replaced`` / ``skipped`` counts). A model that cannot be built, or a provider that fails (out of memory, an
exception), gets rows with ``error`` and no figures; the rest still runs.

Attention: SDPA for every preset but Gemma-2, which uses ``"eager"``: SDPA cannot apply Gemma-2's attention-logit
soft-capping (transformers' SDPA path silently drops it) and Hugging Face recommends eager attention to train
Gemma-2; eager is what a stock transformers Gemma-2 fine-tune runs (without flash-attn installed).

    from sloth_core.bench import train
    results = train.run(["llama-3-8b"], ["none", "nf4"], batch=4, seq=2048, rank=16, steps=10)
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Callable, Iterable, Sequence

import torch

from .args import _known, _sloth_options
from .train_models import (ATTN_IMPLEMENTATION, PRESETS, SETUPS, TARGETS, add_lora, build, make_batches,
                           model_name)

LR = 1e-4
WARMUP = 3
PROVIDERS = ("hf_peft", "sloth_core", "liger")  # the order they run in
# sloth_core's checkpointing modes (optimize's gradient_checkpointing), and "hf": HF's, as hf_peft
SLOTH_CHECKPOINTING = ("offload", "on", "hf", "offload-attention", "offload-qkv", "offload-inputs")


# ---------------------------------------------------------------------------------------------- steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(model, batches: Sequence[torch.Tensor], lr: float = LR, *, warmup: int = WARMUP,
              label: str | None = None) -> dict:
    """Train ``model`` for one step per batch of token ids with a fresh AdamW over the parameters that require
    grad; with ``label``, a progress line per step on stderr (a CPU run takes minutes).

    Returns ``step_s_median`` (median over the steps after ``warmup``), ``peak_GiB`` (CUDA only, else ``None``),
    ``losses`` and ``times`` (every step, seconds)."""
    device = batches[0].device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for ids in batches:
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)  # the whole output lives through the backward, as in the
        out.loss.backward()                      # steering side's anchor_bench.py (HF's logits are in it)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(out.loss.item())
        del out
        if label is not None:
            print(f"  {label}: step {len(times)}/{len(batches)} {times[-1] * 1e3:.0f} ms, loss {losses[-1]:.4f}",
                  file=sys.stderr, flush=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    warm = times[min(warmup, len(times) - 1):]
    return {"step_s_median": statistics.median(warm), "peak_GiB": peak, "losses": losses, "times": times}


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _load_lora_weights(model, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])


# ---------------------------------------------------------------------------------------------- providers
# Each takes the PEFT model, prepares it, and returns (undo, extra row fields).


def _base(model):
    from sloth_core.api import unwrap

    return unwrap(model)


def _hf_checkpointing(model, on: bool) -> None:
    """HF's non-reentrant gradient checkpointing with input-embedding gradients, or neither."""
    base = _base(model)
    if on:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers 5.2x's name; the old one is deprecated
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not getattr(base, "_require_grads_hooks", None):  # transformers 5 enables them above already
            base.enable_input_require_grads()
    else:
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
        base.disable_input_require_grads()


def _use_hf_peft(model, checkpointing: bool, sloth_checkpointing: str, sloth_options: dict):
    _hf_checkpointing(model, checkpointing)
    return (lambda: _hf_checkpointing(model, False)), {}


def _use_sloth_core(model, checkpointing: bool, sloth_checkpointing: str, sloth_options: dict):
    import sloth_core
    from sloth_core import checkpointing as sloth_ckpt

    options = dict(sloth_options)
    if sloth_checkpointing == "hf":
        _hf_checkpointing(model, checkpointing)
    else:
        options["gradient_checkpointing"] = sloth_checkpointing

    def undo():
        sloth_core.restore(model)
        _hf_checkpointing(model, False)
        sloth_ckpt.clear_host_pool()  # the pinned buffers of "offload" (sized for this model)

    try:
        sloth_core.optimize(model, **options)
    except BaseException:
        undo()
        raise
    statuses = [r.status for r in sloth_core.report(model)]
    return undo, {"replaced": statuses.count("replaced"), "skipped": statuses.count("skipped")}


def _use_liger(model, checkpointing: bool, sloth_checkpointing: str, sloth_options: dict):
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = _base(model)
    restore_globals = _keep_globals(sys.modules[type(base).__module__], torch.nn.functional)

    def undo():
        restore_globals()
        _hf_checkpointing(model, False)

    _hf_checkpointing(model, checkpointing)
    try:
        _apply_liger_kernel_to_instance(model=base)
    except BaseException:
        undo()
        raise
    return undo, {}


def _keep_globals(*modules) -> Callable[[], None]:
    """Snapshot the attributes of ``modules``; the returned function puts back any that were reassigned (Liger
    replaces e.g. ``modeling_llama.apply_rotary_pos_emb``, which would leak into the next model built)."""
    saved = [(m, dict(vars(m))) for m in modules]

    def restore():
        for module, attrs in saved:
            for name, value in attrs.items():
                if vars(module).get(name) is not value:
                    setattr(module, name, value)

    return restore


_USE = {"hf_peft": _use_hf_peft, "sloth_core": _use_sloth_core, "liger": _use_liger}


def available_providers() -> list[str]:
    """The providers that can run here (``liger`` only when ``liger_kernel`` is importable)."""
    import importlib.util

    return [p for p in PROVIDERS if p != "liger" or importlib.util.find_spec("liger_kernel") is not None]


def _measure(provider: str, model, batches, *, lr: float, warmup: int, checkpointing: bool,
             sloth_checkpointing: str, sloth_options: dict | None = None) -> dict:
    """Prepare ``model`` for ``provider``, run the steps, undo; ``error`` instead of figures when it fails."""
    device = batches[0].device
    t = time.perf_counter()
    try:
        undo, extra = _USE[provider](model, checkpointing, sloth_checkpointing, sloth_options or {})
    except Exception as exc:  # noqa: BLE001 - one failing provider must not lose the others' results
        return {"error": f"setup: {type(exc).__name__}: {exc}"}
    extra["setup_s"] = time.perf_counter() - t
    try:
        return {**run_steps(model, batches, lr=lr, warmup=warmup, label=provider), **extra}
    except Exception as exc:  # noqa: BLE001 - out of memory, a kernel error, ...
        return {"error": f"{type(exc).__name__}: {exc}", **extra}
    finally:
        model.zero_grad(set_to_none=True)
        undo()
        _free(device)


# ---------------------------------------------------------------------------------------------- rows


def _rel_diffs(losses: Sequence[float], reference: Sequence[float]) -> list[float]:
    return [abs(a - b) / (abs(b) or 1.0) for a, b in zip(losses, reference)]


def _rows(model: str, quant: str, batch: int, seq: int, rank: int, measured: dict[str, dict]) -> list[dict]:
    tokens = batch * seq
    base = measured.get("hf_peft")
    base = base if base and "error" not in base else None
    rows = []
    for provider, m in measured.items():
        row = {"kind": "train", "setup": SETUPS[quant], "model": model, "tokens": tokens, "mode": "fwd_bwd",
               "provider": provider, "batch": batch, "seq": seq, "rank": rank}
        if "error" in m:
            rows.append({**row, "error": m["error"]})
            continue
        step_s, peak = m["step_s_median"], m["peak_GiB"]
        row.update(median_ms=step_s * 1e3, tokens_per_s=tokens / step_s, peak_gib=peak, losses=m["losses"],
                   step_ms=[t * 1e3 for t in m["times"]], speedup_vs={}, memory_vs_hf=None, max_rel_loss_diff=None)
        if base is not None:
            row["speedup_vs"] = {"hf_peft": base["step_s_median"] / step_s}
            if peak is not None and base["peak_GiB"]:
                row["memory_vs_hf"] = peak / base["peak_GiB"]
            row["max_rel_loss_diff"] = max(_rel_diffs(m["losses"], base["losses"]), default=None)
        row.update({k: m[k] for k in ("setup_s", "replaced", "skipped") if k in m})
        rows.append(row)
    return rows


def run(presets: Iterable[str] | str, quants: Iterable[str] | str = ("none", "nf4"), *, batch: int = 4,
        seq: int = 2048, rank: int = 16, steps: int = 10, providers: Iterable[str] | None = None, device="cuda",
        dtype: torch.dtype | None = None, warmup: int = WARMUP, layers: int | None = None,
        checkpointing: bool = True, sloth_checkpointing: str = "offload", opt_in: Sequence[str] = (),
        exclude: Sequence[str] = (), lr: float = LR,
        seed: int = 0) -> dict:
    """Measure every (preset, quant) with every provider; a results dict (``env``, ``settings``, ``rows``).

    ``quants``: ``"none"`` (setup ``lora_bf16``) and/or ``"nf4"`` (``qlora_nf4``). ``providers``: default
    :func:`available_providers`; they always run in the order of :data:`PROVIDERS`. ``dtype``: default bf16 on
    CUDA, fp32 elsewhere. ``layers`` overrides the number of decoder layers. ``checkpointing``: HF's checkpointing
    for ``hf_peft`` / ``liger``; ``sloth_checkpointing``: ``"offload"`` / ``"on"`` (sloth_core's own, passed to
    ``optimize``) or ``"hf"`` (as ``hf_peft``). ``opt_in`` / ``exclude``: pattern names passed to
    ``optimize`` (patterns in no default list to apply too / default patterns to leave out)."""
    from .env import environment

    presets = _known(presets, PRESETS, "preset")
    quants = _known(quants, SETUPS, "quant")
    available = available_providers()
    wanted = _known(providers if providers is not None else available, PROVIDERS, "provider")
    missing = [p for p in wanted if p not in available]
    if missing:
        raise ValueError(f"provider(s) {', '.join(missing)} not available here (liger needs liger_kernel)")
    _known(sloth_checkpointing, SLOTH_CHECKPOINTING, "sloth_checkpointing")
    sloth_options = _sloth_options(opt_in, exclude)
    if min(batch, seq, rank, steps) < 1 or warmup < 0:
        raise ValueError(f"batch, seq, rank, steps must be positive and warmup >= 0 (got batch={batch}, seq={seq}, "
                         f"rank={rank}, steps={steps}, warmup={warmup})")
    wanted = [p for p in PROVIDERS if p in wanted]
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    for preset in presets:
        for quant in quants:
            rows += _run_case(preset, quant, wanted, batch=batch, seq=seq, rank=rank, steps=steps, device=device,
                              dtype=dtype, warmup=warmup, layers=layers, checkpointing=checkpointing,
                              sloth_checkpointing=sloth_checkpointing, sloth_options=sloth_options, lr=lr,
                              seed=seed)
    settings = dict(presets=presets, quants=quants, providers=wanted, batch=batch, seq=seq, rank=rank,
                    lora_alpha=rank, lora_dropout=0.0, targets=TARGETS, steps=steps, warmup=warmup, lr=lr,
                    layers=layers, dtype=str(dtype).replace("torch.", ""), device=str(device),
                    checkpointing=checkpointing, sloth_checkpointing=sloth_checkpointing, opt_in=list(opt_in),
                    exclude=list(exclude),
                    attention={p: ATTN_IMPLEMENTATION.get(p, "sdpa") for p in presets})
    return {"env": environment(), "settings": settings, "rows": rows}


def _run_case(preset: str, quant: str, providers: list[str], *, batch, seq, rank, steps, device, dtype, warmup,
              layers, checkpointing, sloth_checkpointing, sloth_options, lr, seed) -> list[dict]:
    name = model_name(preset, layers)
    model = error = None
    try:
        model = add_lora(build(preset, layers, quant, device=device, dtype=dtype, seed=seed), rank, seed)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the other presets still run
        error = f"build: {type(exc).__name__}: {exc}"
    if model is None:
        _free(device)  # outside the handler: the traceback no longer holds the half-built model
        return _rows(name, quant, batch, seq, rank, {p: {"error": error} for p in providers})
    try:
        lora0 = _lora_weights(model)
        batches = make_batches(model.config.vocab_size, steps, batch, seq, device, seed + 1)
        measured = {}
        for provider in providers:
            _load_lora_weights(model, lora0)
            measured[provider] = _measure(provider, model, batches, lr=lr, warmup=warmup,
                                          checkpointing=checkpointing, sloth_checkpointing=sloth_checkpointing,
                                          sloth_options=sloth_options)
    finally:
        del model
        _free(device)
    return _rows(name, quant, batch, seq, rank, measured)
