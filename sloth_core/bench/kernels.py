"""``sloth-core bench kernels``: every kernel family against Hugging Face eager, torch.compile and Liger-Kernel,
on the shapes of real models, in bf16.

Matrix: kernels x models (:data:`~sloth_core.autotune.presets.PRESETS`) x tokens (default 4096, 8192, 16384)
x modes (``fwd``; ``fwd_bwd``) x providers:

* ``sloth_core``    -- our public kernel function;
* ``hf_eager``      -- what transformers / PEFT / bitsandbytes run (the HF module or function, eager);
* ``torch_compile`` -- the ``hf_eager`` callable under ``torch.compile``, compiled once per (kernel, model, mode)
  with the token dimension dynamic (a compile failure is a skipped row with the reason);
* ``liger``         -- Liger-Kernel's equivalent when it is importable (else, or where it has none, skipped).

The cases -- what each kernel's providers compute, its inputs, and its work model: the bytes an ideal
implementation reads plus writes (GB/s rows) or the FLOP of the GEMMs (TFLOP/s rows) -- live in
:mod:`sloth_core.bench.cases`. ``dequant`` has no token dimension (rows carry ``tokens: null``). ``fwd`` runs under
``torch.no_grad()``; ``fwd_bwd`` backpropagates a fixed random ``grad_output``. Timing, memory and ceilings:
:mod:`sloth_core.bench.timing`.

Correctness guard: before timing, every provider's outputs (forward outputs, then the gradients of every input
and trainable parameter) are compared once with ``hf_eager``'s on the same inputs: ``max_rel_err`` is the largest
``||a - b|| / ||b||``; above :data:`.kernels_correctness.MISMATCH_REL_ERR` (bf16 level) the row gets ``mismatch: true``.

Per row: ``median_ms``, ``gbps`` or ``tflops`` (work / median time), ``pct_of_ceiling`` (of the run's
``hbm_gbps`` / ``bf16_tflops``), ``peak_extra_gib``, ``speedup_vs`` ``{other provider: their ms / this ms}``,
``reps``, ``max_rel_err``, ``mismatch``; or ``skipped`` / ``error`` with the reason.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import torch

from sloth_core.autotune.presets import PRESETS, ModelShape

from . import timing
from .cases import CASES, nf4_available
from .cases_base import BenchModel, Case, Unavailable, bench_model
from .cases_work import Work
from .args import KERNELS, MODELS, MODES
from .kernels_correctness import MISMATCH_REL_ERR, _clone, max_rel_err, outputs_and_grads
from .timing import InputSet, Timer

PROVIDERS = ("hf_eager", "sloth_core", "torch_compile", "liger")  # liger last: its losses overwrite their input
DEFAULT_TOKENS = (4096, 8192, 16384)
DEFAULT_REPS = 20
DEFAULT_WARMUP = 2


# ---------------------------------------------------------------------------------------------- providers


def _configure_dynamo() -> None:
    """Room for one graph per (kernel, model, mode) and its recompiles."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)


def _reset_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def build_provider(case: Case, provider: str, m: BenchModel, state: Any, device: torch.device) -> Callable | str:
    """The callable of ``provider`` for ``case``, or the reason it is skipped."""
    try:
        if provider == "torch_compile":
            if case.compile_skip:
                raise Unavailable(case.compile_skip)
            return torch.compile(case.hf_eager(m, state))
        if provider == "liger":
            if importlib.util.find_spec("liger_kernel") is None:
                raise Unavailable("liger-kernel is not installed")
            if device.type != "cuda":
                raise Unavailable("Liger-Kernel needs a CUDA device")
        return getattr(case, provider)(m, state)
    except Unavailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot be built is skipped with the reason
        return f"cannot build: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


# ---------------------------------------------------------------------------------------------- runner


@dataclass
class _Settings:
    device: torch.device
    timer: Timer
    reps: int
    warmup: int
    rotate_bytes: int
    seed: int
    compile_marks: bool
    log: TextIO | None


def _check_names(kind: str, names: Iterable[str] | None, allowed: Sequence[str]) -> list[str]:
    names = list(allowed if names is None else names)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {kind} {', '.join(map(repr, unknown))}; expected some of {', '.join(allowed)}")
    return names


def run(kernels: Iterable[str] | None = None, models: Iterable[str] | None = None,
        modes: Iterable[str] | None = None, tokens: Iterable[int] | None = None,
        providers: Iterable[str] | None = None, *, device: torch.device | str, timer: Timer | None = None,
        reps: int = DEFAULT_REPS, warmup: int = DEFAULT_WARMUP,
        shapes: Mapping[str, ModelShape | BenchModel] | None = None, ceilings: Mapping[str, Any] | None = None,
        nf4: bool | None = None, rotate_bytes: int = timing.ROTATE_BYTES, seed: int = 0,
        log: TextIO | None = sys.stderr) -> dict:
    """Run the benchmark matrix; returns the results dict (``env``, ``ceilings``, ``settings``, ``rows``).

    ``None`` filters mean everything (``tokens``: :data:`DEFAULT_TOKENS`). ``shapes`` replaces the model table
    (name -> :class:`ModelShape` or :class:`BenchModel`; tests pass tiny ones). ``timer``: default
    :class:`~sloth_core.bench.timing.CudaTimer` on CUDA, ``perf_counter`` elsewhere. ``reps``: at most that many
    timed repetitions (at least 5, or ``reps`` if smaller, when a call is slow). ``ceilings``: measured when
    not given. ``nf4``: run ``lora_nf4`` with ``lora`` (default: when bitsandbytes and CUDA are there).
    Progress lines go to ``log``."""
    from sloth_core.autotune import tuning_mode

    from .env import environment

    device = torch.device(device)
    table = {name: bench_model(s) for name, s in (shapes or {n: PRESETS[n] for n in MODELS}).items()}
    kernels = _check_names("kernel", kernels, (*KERNELS, "lora_nf4"))
    models = _check_names("model", models, tuple(table))
    modes = _check_names("mode", modes, MODES)
    providers = _check_names("provider", providers, PROVIDERS)
    providers = [p for p in PROVIDERS if p in providers]  # canonical order: hf_eager first, liger last
    token_list = [int(t) for t in (tokens or DEFAULT_TOKENS)]
    if any(t < 1 for t in token_list):
        raise ValueError(f"tokens must be positive: {token_list}")
    if nf4 is None:
        nf4 = nf4_available(device)
    names = [k for k in kernels if k != "lora_nf4"]
    if nf4 and ("lora" in kernels or "lora_nf4" in kernels):
        names.append("lora_nf4")
    timer = timer or timing.default_timer(device)
    compile_on = "torch_compile" in providers
    if compile_on:
        _configure_dynamo()
    settings = _Settings(device, timer, max(1, reps), max(0, warmup), rotate_bytes, seed, compile_on, log)
    if ceilings is None:
        _log(settings, "measuring ceilings (1 GiB device copy, 8192^3 bf16 matmul)")
        ceilings = timing.measure_ceilings(device, timer)
    _log(settings, f"ceilings: {dict(ceilings)}")
    started = time.perf_counter()
    rows: list[dict] = []
    for name in names:
        for model in models:
            rows += _run_group(CASES[name], table[model], modes, token_list, providers, settings, ceilings)
    _log(settings, f"{len(rows)} rows in {time.perf_counter() - started:.0f} s")
    return {"env": environment(), "ceilings": dict(ceilings),
            "settings": {"kernels": names, "models": models, "modes": modes, "tokens": token_list,
                         "providers": providers, "dtype": "bfloat16", "max_reps": settings.reps,
                         "warmup": settings.warmup, "rotate_bytes": rotate_bytes,
                         "mismatch_rel_err": MISMATCH_REL_ERR, "device": str(device),
                         "sloth_core_autotune": tuning_mode()},
            "rows": rows}


def _log(settings: _Settings, line: str) -> None:
    if settings.log is not None:
        print(f"bench kernels: {line}", file=settings.log, flush=True)


def _run_group(case: Case, m: BenchModel, modes: Sequence[str], token_list: Sequence[int],
               providers: Sequence[str], settings: _Settings, ceilings: Mapping[str, Any]) -> list[dict]:
    """Every (mode, tokens) of one kernel on one model; the state and the compiled callable are shared."""
    modes = [mode for mode in case.modes if mode in modes]
    if not modes:
        return []
    token_list = [None] if case.token_free else list(token_list)
    device = settings.device
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    rows: list[dict] = []
    try:
        state = case.setup(m, device, gen)
    except Exception as exc:  # noqa: BLE001 - e.g. bitsandbytes missing: every row says why
        why = f"setup failed: {_reason(exc)}"
        for mode in modes:
            for tokens in token_list:
                rows += [_skipped(_base_row(case, m, tokens, mode, p), why, settings) for p in providers]
        return rows
    built = {p: build_provider(case, p, m, state, device) for p in dict.fromkeys(("hf_eager", *providers))}
    try:
        for mode in modes:
            failed: dict[str, str] = {}
            for tokens in token_list:
                rows += _run_case(case, m, tokens, mode, state, built, providers, failed, settings, ceilings)
                timing.free_memory(device)
    finally:
        del state, built
        if settings.compile_marks:
            _reset_dynamo()
        timing.free_memory(device)
    return rows


def _base_row(case: Case, m: BenchModel, tokens: int | None, mode: str, provider: str) -> dict:
    return {"kind": "kernel", "kernel": case.name, "model": m.name, "tokens": tokens, "mode": mode,
            "provider": provider}


def _skipped(row: dict, why: str, settings: _Settings, key: str = "skipped") -> dict:
    row[key] = why
    _progress(row, settings)
    return row


def _mark_dynamic(case: Case, inputs: InputSet) -> None:
    """Mark the arguments' token dimensions dynamic, so that one graph serves every token count."""
    import torch._dynamo

    for i, a in enumerate(inputs.args):
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            continue
        for dim in (0,) if case.token_dims is None else case.token_dims.get(i, ()):
            torch._dynamo.maybe_mark_dynamic(a, dim)


def _make_sets(case: Case, m: BenchModel, tokens: int | None, mode: str, state: Any,
               settings: _Settings) -> list[InputSet]:
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed + 1 + (tokens or 0))
    grad = mode == "fwd_bwd"
    sets = [InputSet(case.inputs(m, tokens, state, settings.device, gen, grad))]
    count = timing.sets_needed(sets[0].nbytes(), settings.rotate_bytes)
    sets += [InputSet(case.inputs(m, tokens, state, settings.device, gen, grad)) for _ in range(count - 1)]
    return sets


def _grad_outputs(sets: list[InputSet], fns: Sequence[Callable], settings: _Settings) -> None:
    """Give every set a fixed random ``grad_output`` for each output (shapes from one forward)."""
    probe, last_error = None, None
    for fn in fns:
        try:
            probe = timing.run_once(fn, _clone(sets[0]), "fwd")
            break
        except Exception as exc:  # noqa: BLE001 - try the next provider for the output shapes
            last_error = exc
    if probe is None:
        raise RuntimeError(f"no provider ran a forward to shape grad_output ({_reason(last_error)})")
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed + 7)
    for s in sets:
        s.grads = tuple(torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in probe)


def _run_case(case: Case, m: BenchModel, tokens: int | None, mode: str, state: Any, built: Mapping[str, Any],
              providers: Sequence[str], failed: dict[str, str], settings: _Settings,
              ceilings: Mapping[str, Any]) -> list[dict]:
    """Every provider on one (kernel, model, tokens, mode): correctness vs hf_eager, memory, time."""
    rows = [_base_row(case, m, tokens, mode, p) for p in providers]
    runnable = [p for p in built if callable(built[p])]
    params = case.params(state)
    try:
        sets = _make_sets(case, m, tokens, mode, state, settings)
        if mode == "fwd_bwd":
            _grad_outputs(sets, [built[p] for p in runnable if p != "torch_compile"] or
                          [built[p] for p in runnable], settings)
        if settings.compile_marks:
            for s in sets:
                _mark_dynamic(case, s)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the inputs
        return [_skipped(row, f"inputs: {_reason(exc)}", settings, "error") for row in rows]
    reference = _reference(case, built.get("hf_eager"), sets[0], mode, params, settings)
    work = case.work(m, tokens, mode)
    for row in rows:
        _measure(row, case, built[row["provider"]], sets, mode, params, reference, work, failed, settings,
                 ceilings)
    del sets, reference
    _speedups(rows)
    return rows


def _reference(case: Case, fn: Any, inputs: InputSet, mode: str, params, settings: _Settings) -> list | str:
    """hf_eager's outputs and gradients on a copy of the first set, or why there are none."""
    if not callable(fn):
        return f"hf_eager unavailable: {fn}"
    check = _clone(inputs)
    if settings.compile_marks:
        _mark_dynamic(case, check)
    try:
        return outputs_and_grads(fn, check, mode, params)
    except Exception as exc:  # noqa: BLE001 - no reference: the other rows carry no max_rel_err
        return f"hf_eager failed: {_reason(exc)}"


def _measure(row: dict, case: Case, fn: Any, sets: list[InputSet], mode: str, params, reference: list | str,
             work: Work, failed: dict[str, str], settings: _Settings, ceilings: Mapping[str, Any]) -> None:
    provider = row["provider"]
    if not callable(fn):
        _skipped(row, fn, settings)
        return
    if provider in failed:
        _skipped(row, f"failed at an earlier token count: {failed[provider]}", settings)
        return
    try:
        if provider != "hf_eager" and isinstance(reference, list):
            check = _clone(sets[0])
            if settings.compile_marks:
                _mark_dynamic(case, check)
            err = max_rel_err(outputs_and_grads(fn, check, mode, params), reference)
            del check
            row["max_rel_err"] = float(f"{err:.3g}") if math.isfinite(err) else str(err)
            row["mismatch"] = not err <= MISMATCH_REL_ERR
        row["peak_extra_gib"] = _round(timing.peak_extra_gib(fn, sets[0], mode, settings.timer, params))
        result = timing.time_call(fn, sets, mode, settings.timer, warmup=settings.warmup, reps=settings.reps,
                                  params=params)
    except Exception as exc:  # noqa: BLE001 - one failing provider must not end the run
        why = _reason(exc)
        if not isinstance(exc, torch.cuda.OutOfMemoryError):
            failed[provider] = why
        for key in ("max_rel_err", "mismatch", "peak_extra_gib"):
            row.pop(key, None)
        if provider == "torch_compile":
            _skipped(row, f"torch.compile failed: {why}", settings)
        else:
            _skipped(row, why, settings, "error")
        timing.free_memory(settings.device)
        return
    rate = work.rate(result.median_ms)
    ceiling = ceilings.get("hbm_gbps" if work.unit == "gbps" else "bf16_tflops")
    row.update({"median_ms": _round(result.median_ms), work.unit: _round(rate),
                "pct_of_ceiling": _round(100.0 * rate / ceiling) if ceiling else None, "reps": result.reps})
    _progress(row, settings)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def _speedups(rows: list[dict]) -> None:
    timed = {r["provider"]: r["median_ms"] for r in rows if r.get("median_ms")}
    for row in rows:
        if row.get("median_ms"):
            row["speedup_vs"] = {p: _round(ms / row["median_ms"]) for p, ms in timed.items() if p != row["provider"]}


def _progress(row: dict, settings: _Settings) -> None:
    what = f"{row['kernel']} {row['model']} {row['tokens'] if row['tokens'] is not None else '-'} {row['mode']} " \
           f"{row['provider']}"
    if row.get("median_ms") is not None:
        rate = f"{row['gbps']:.0f} GB/s" if "gbps" in row else f"{row['tflops']:.1f} TFLOP/s"
        extra = f", rel err {row['max_rel_err']}" if "max_rel_err" in row else ""
        flag = "  MISMATCH" if row.get("mismatch") else ""
        _log(settings, f"{what}: {row['median_ms']:.4g} ms, {rate}, peak +{row.get('peak_extra_gib')} GiB, "
                       f"{row['reps']} reps{extra}{flag}")
    else:
        _log(settings, f"{what}: {'error' if 'error' in row else 'skipped'}: {row.get('error') or row.get('skipped')}")
