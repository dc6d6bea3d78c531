"""The public entry points: :func:`optimize`, :func:`restore`, :func:`report`."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable

from torch import nn

from . import architectures  # noqa: F401  (declares the built-in architectures)
from . import binding, bound_by_others, fallback
from .checkpointing import MODES as CHECKPOINTING_MODES
from .checkpointing import checkpointed_layers, checkpointed_modes, disable_checkpointing, enable_checkpointing
from .checkpointing_takeover import install as serve_hf_checkpointing
from .checkpointing_takeover import serving_hf
from .compiled import compiled_reason
from .coverage import missing
from .inference_mode import MODE_ATTR as INFERENCE_MODE_ATTR
from .distributed import sharded_parameters
from .registry.architecture import Architecture, generic_architecture, lookup
from .registry.patterns import ALL_PATTERNS, OPT_IN_PATTERNS
from .reporting import ReportRow, format_table, summary
from .rewriter import rewrite
from .warning import SlothCoreWarning

STATE_ATTR = "_sloth_core_state"


_OPTIONS = {
    "verbose": False,     # print the report as a table
    "verify": "auto",     # "auto": once per signature for declared architectures; "always": every module
    "patterns": None,     # only these pattern names (default: all of the architecture's)
    "exclude": (),        # pattern names to leave alone
    "opt_in": (),         # patterns no architecture applies by default (OPT_IN_PATTERNS), by name
    "return_logits": False,  # with labels, the fused loss returns no logits unless this is True
    "gradient_checkpointing": None,  # None: leave as is; False/"off", True/"on", "offload" and its variants
}
_PATTERNS = {p.name: p for p in ALL_PATTERNS + OPT_IN_PATTERNS}
# optimize's values -> sloth_core.checkpointing's modes
_CHECKPOINTING = {None: None, False: "off", True: "on", **{m: m for m in CHECKPOINTING_MODES}}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


def model_type(model: nn.Module) -> str | None:
    cfg = getattr(unwrap(model), "config", None)
    return getattr(cfg, "model_type", None)


def _options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"sloth_core.optimize() got unknown option(s) {unknown}; known: {sorted(_OPTIONS)}")
    opts = {**_OPTIONS, **options}
    if opts["verify"] not in ("auto", "always"):
        raise ValueError(f"sloth_core.optimize(verify={opts['verify']!r}): expected 'auto' or 'always'")
    if opts["gradient_checkpointing"] not in _CHECKPOINTING:
        raise ValueError(f"sloth_core.optimize(gradient_checkpointing={opts['gradient_checkpointing']!r}): expected "
                         f"None, False, True, or one of {[m for m in _CHECKPOINTING if isinstance(m, str)]}")
    for key in ("patterns", "exclude", "opt_in"):
        v = opts[key]
        if isinstance(v, str):
            opts[key] = (v,)
    known = {p.name for p in OPT_IN_PATTERNS}
    unknown = sorted(set(opts["opt_in"]) - known)
    if unknown:
        raise ValueError(f"sloth_core.optimize(opt_in=...): unknown opt-in pattern(s) {unknown}; "
                         f"known: {sorted(known)}")
    return opts


def optimize(model: nn.Module, **options: Any) -> nn.Module:
    """Swap the modules of ``model`` that match its architecture's patterns for verified Triton kernels.

    In place; returns the same object. Works on a ``PreTrainedModel`` and on a PEFT ``PeftModel`` (before or after
    ``get_peft_model``), 16-bit or bitsandbytes-quantized. A second call binds only what is new (e.g. LoRA layers
    PEFT added since); when there is nothing new it changes nothing and says so.

    Options: ``verbose`` (print the report), ``verify`` (``"auto"`` | ``"always"``), ``patterns`` (names to apply),
    ``exclude`` (names to leave alone), ``return_logits`` (with labels, the fused causal-LM loss skips the logits
    unless this is True), ``gradient_checkpointing`` (``None`` leaves the model's as is; ``"on"``/``True``;
    ``"offload"``: the layer inputs go to pinned CPU memory, and so do the attention and q/k/v projection outputs
    instead of being recomputed; ``"offload-attention"`` / ``"offload-qkv"``: the inputs and that one;
    ``"offload-inputs"``: the inputs alone; ``"off"``/``False``; stored per model, in the layers; ours checkpoints in
    eval mode too, unlike HF's), ``opt_in`` (names of patterns no architecture applies by default, e.g. ``"lora_qkv"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sloth_core.optimize(model): expected a torch.nn.Module, got {type(model).__name__}")
    opts = _options(options)
    compiled = compiled_reason(model)
    if compiled is not None:
        warnings.warn(f"sloth_core.optimize: {compiled}; sloth_core's kernels are verified on eager forwards, not "
                      f"as torch.compile traces them, so nothing was replaced and the model runs as before. Call "
                      f"sloth_core.optimize(model) on the model first, then torch.compile(model)",
                      SlothCoreWarning, stacklevel=2)
        return model
    base = unwrap(model)
    sharded = sharded_parameters(base)
    if sharded:  # each probe would fail on the shards, with a DTensor error per pattern
        warnings.warn(f"sloth_core.optimize: nothing was bound: the model's parameters are DTensor shards "
                      f"({sharded[0]} and {len(sharded) - 1} more: FSDP2 fully_shard or tensor parallelism). Call "
                      f"sloth_core.optimize(model) before fully_shard / accelerator.prepare: FSDP2 gathers each "
                      f"module's parameters whole inside its forward, where the kernels run", SlothCoreWarning,
                      stacklevel=2)
        return model
    state = base.__dict__.get(STATE_ATTR)
    mtype = model_type(model)
    arch = lookup(mtype) or generic_architecture()
    if opts["opt_in"]:
        arch = dataclasses.replace(arch, patterns=arch.patterns + tuple(
            p.using() for p in OPT_IN_PATTERNS if p.name in opts["opt_in"]))
    if opts["return_logits"]:
        arch = dataclasses.replace(arch, patterns=tuple(
            u.with_params(return_logits=True) if u.name == "causal_lm_loss" else u for u in arch.patterns))
    bound_before = {(path, r.pattern) for path, m in base.named_modules() for r in binding.records(m)}
    rows = rewrite(base, arch,
                   only=set(opts["patterns"]) if opts["patterns"] is not None else None,
                   exclude=set(opts["exclude"]),
                   verify_every=opts["verify"] == "always")
    facts = arch.layer if arch.declared else None
    changed = _apply_checkpointing(base, _CHECKPOINTING[opts["gradient_checkpointing"]],
                                   facts.mlp_output_unused if facts else None,
                                   facts.attention_output_unused if facts else None)
    unchanged = False
    replay = {k: v for k, v in options.items() if k not in ("verbose", "gradient_checkpointing")}
    if state is not None:
        state["options"] = {**state.get("options", {}), **replay}
        new = {(r.module, r.pattern): r for r in rows}  # a module verified again replaces its row
        old = {(r.module, r.pattern): r for r in state["rows"]}
        # changed: a new row, or one bound again (its binding was lost: a pickled model, ...)
        rows = [r for key, r in new.items()
                if old.get(key) != r or (r.status == "replaced" and key not in bound_before)]
        state["rows"][:] = [r for key, r in old.items() if key not in new] + list(new.values())
        unchanged = not any(r.status == "replaced" for r in rows) and not changed
        if unchanged:
            warnings.warn(f"sloth_core.optimize: {type(base).__name__} is already optimized "
                          f"({summary(state['rows'])}); nothing changed", SlothCoreWarning, stacklevel=2)
    else:
        base.__dict__[STATE_ATTR] = {"rows": rows, "architecture": arch.name, "model_type": mtype, "options": replay}
        if not any(r.status == "replaced" for r in rows) and not changed:
            warnings.warn(f"sloth_core.optimize: nothing was replaced in {type(base).__name__} (model_type={mtype!r}, "
                          f"architecture {arch.name!r}; {summary(rows)}); the model runs as before",
                          SlothCoreWarning, stacklevel=2)
    if arch.declared and not unchanged:
        _warn_missing(base, mtype, arch, opts)
    if opts["verbose"] and (rows or changed):
        print(f"sloth_core: {type(base).__name__} (model_type={mtype!r}, architecture {arch.name!r})")
        print(format_table(report(base)))
        print(summary(report(base)))
    return model


def bind_new(model: nn.Module) -> None:
    """Bind what ``optimize`` would bind now that was not there then -- the LoRA layers a trainer added with
    ``peft_config`` after the user's ``optimize`` line -- with the options ``optimize`` was given; quiet when
    nothing is new. Runs when HF's checkpointing is switched on (:mod:`sloth_core.checkpointing_takeover`), which
    trainers do after wrapping the model."""
    base = unwrap(model)
    state = base.__dict__.get(STATE_ATTR)
    if state is None:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is already optimized.*nothing changed", category=SlothCoreWarning)
        optimize(base, **state.get("options", {}))


def _warn_missing(base: nn.Module, mtype: str | None, arch: Architecture, opts: dict[str, Any]) -> None:
    """One warning naming each pattern the architecture's declaration expects that the model did not get."""
    wanted = set(arch.pattern_names())
    if opts["patterns"] is not None:
        wanted &= set(opts["patterns"])
    excluded = set(opts["exclude"])
    wanted -= {n for group in arch.expects if excluded & set(group) for n in group}  # excluding one excludes its group
    state = base.__dict__[STATE_ATTR]
    state["missing"] = lost = missing(arch, state["rows"], wanted)
    if lost:
        lines = "\n".join("  " + m.line() for m in lost)
        warnings.warn(f"sloth_core.optimize: {type(base).__name__} (model_type={mtype!r}) runs without "
                      f"{len(lost)} pattern(s) its architecture {arch.name!r} declares; those parts run at Hugging "
                      f"Face's speed (sloth_core.report(model) has every reason in full):\n{lines}",
                      SlothCoreWarning, stacklevel=3)


def _apply_checkpointing(model: nn.Module, mode: str | None, mlp_output_unused=None,
                         attention_output_unused=None) -> bool:
    """Set our decoder-layer checkpointing to ``mode`` (None: leave it), and let ours serve HF's checkpointing
    whenever it is switched on (:mod:`sloth_core.checkpointing_takeover`); whether anything changed.
    ``mlp_output_unused`` / ``attention_output_unused``: the architecture's :class:`LayerFacts` methods (declared
    ones only)."""
    changed = False
    if mode == "off":
        changed = bool(checkpointed_layers(model))
        disable_checkpointing(model)
    elif mode is not None:
        enable_checkpointing(model, mode, mlp_output_unused, attention_output_unused)
        changed = True
    return serve_hf_checkpointing(model, mode, mlp_output_unused, attention_output_unused, bind_new) or changed


def _checkpointing_rows(model: nn.Module) -> list[ReportRow]:
    """A row per checkpointed layer, as installed now (a trainer may have switched HF's on since optimize)."""
    why = ", serving Hugging Face's checkpointing (switched on for this model)" if serving_hf(model) else ""
    return [ReportRow(path, "checkpointing", f"torch:checkpoint({mode})", "replaced", f"mode={mode}{why}")
            for path, mode in checkpointed_modes(model)]


def restore(model: nn.Module) -> nn.Module:
    """Put every original forward back; outputs are then bit-identical to a never-optimized model."""
    base = unwrap(model)
    binding.uninstall_all(model)
    if base is not model:
        binding.uninstall_all(base)
    fallback.clear_all(model)
    base.__dict__.pop(STATE_ATTR, None)
    for module in base.modules():  # for_inference's mode goes with the bindings that read it
        module.__dict__.pop(INFERENCE_MODE_ATTR, None)
    return model


def report(model: nn.Module) -> list[ReportRow]:
    """Rows of what ``optimize`` replaced (module path, pattern, kernel) and what it skipped, with the reason, as
    it runs now (:func:`_as_running`: ``superseded``, ``fallback``, ``overridden``); the checkpointing rows as it
    runs now."""
    base = unwrap(model)
    state = base.__dict__.get(STATE_ATTR)
    if not state:
        return []
    modules = dict(base.named_modules())
    return [_as_running(r, modules.get(r.module)) for r in state["rows"]] + _checkpointing_rows(base)


def _as_running(row: ReportRow, module: nn.Module | None) -> ReportRow:
    """``row`` as its replacement runs now: ``superseded`` where a pattern that supersedes it took its module over
    since (``undone`` where nothing did), ``fallback`` where it runs the original because its module changed since
    verification, ``overridden`` where something else replaced it after optimize."""
    if row.status != "replaced" or module is None:
        return row
    if not binding.is_bound(module, row.pattern):
        by = [r.pattern for r in binding.records(module)
              if row.pattern in getattr(_PATTERNS.get(r.pattern), "supersedes", ())]
        return dataclasses.replace(row, status="superseded" if by else "undone",
                                   detail=f"by {by[0]}" if by else "no longer bound (restored, or lost in a pickle "
                                                                   "/ torch.save round trip: optimize(model) binds "
                                                                   "it again)")
    why = fallback.fallback_reason(module, row.pattern)
    if why is not None:
        return dataclasses.replace(row, status="fallback", detail=why)
    other = bound_by_others.replaced_since(module, row.pattern)
    if other is not None:
        return dataclasses.replace(row, status="overridden", detail=f"replaced after optimize by {other}: this "
                                                                   f"kernel does not run where that answers")
    return row


def missing_patterns(model: nn.Module) -> list:
    """The patterns the model's declared architecture expects that the last ``optimize`` left unapplied
    (:class:`sloth_core.coverage.Missing`: pattern, module, reason); empty for undeclared architectures."""
    state = unwrap(model).__dict__.get(STATE_ATTR)
    return list(state.get("missing", ())) if state else []


def is_optimized(model: nn.Module) -> bool:
    """Whether ``optimize`` ran on ``model`` and what it bound is in place (not after a pickle / ``torch.save``
    round trip, which keeps the record but not the kernels: ``optimize`` again binds them)."""
    base = unwrap(model)
    state = base.__dict__.get(STATE_ATTR)
    if state is None:
        return False
    return binding.any_bound(base) or not any(r.status == "replaced" for r in state["rows"])


def format_report(model_or_rows: nn.Module | Iterable[ReportRow]) -> str:
    rows = report(model_or_rows) if isinstance(model_or_rows, nn.Module) else list(model_or_rows)
    return format_table(rows)
