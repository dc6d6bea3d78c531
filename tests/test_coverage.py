"""Loud when a declared pattern does not apply: ``optimize`` warns once, one readable line per missing pattern
(pattern, module, reason; never a nested exception repr), ``missing_patterns`` lists them, the report keeps the
full text, and ``demo`` fails. A model that gets everything warns nothing."""
import warnings

import pytest
import torch

import sloth_core
from sloth_core import __main__ as cli
from sloth_core.registry.patterns import causal_lm_loss as loss_pattern
from sloth_core.registry.patterns import rope as rope_pattern
from sloth_core.tiny import TINY_MODEL_TYPES, tiny_model


def _optimize_recording(model, **options):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sloth_core.optimize(model, **options)
    return [str(w.message) for w in seen if issubclass(w.category, sloth_core.SlothCoreWarning)]


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_every_declared_pattern_applies_and_nothing_is_said(model_type, device):
    model = tiny_model(model_type, device=device)
    assert _optimize_recording(model) == []
    assert sloth_core.missing_patterns(model) == []


def test_a_failing_kernel_is_named_in_one_readable_line(device, monkeypatch):
    def broken(*args):
        raise ValueError("mask has unsupported dtype")

    monkeypatch.setattr(rope_pattern, "apply_rope", broken)
    model = tiny_model("llama", device=device)
    said = _optimize_recording(model)
    assert len(said) == 1
    lines = said[0].splitlines()
    assert "1 pattern(s)" in lines[0]
    assert lines[1].strip() == ("rope: not applied to model.layers.0.self_attn and 1 more: not verified: probe "
                                "failed on the replacement: ValueError: mask has unsupported dtype")
    [lost] = sloth_core.missing_patterns(model)
    assert (lost.pattern, lost.module, lost.count) == ("rope", "model.layers.0.self_attn", 2)
    rows = [r for r in sloth_core.report(model) if r.pattern == "rope"]
    assert rows and all(r.status == "skipped" and "mask has unsupported dtype" in r.error for r in rows)


def test_a_nested_interpreter_error_is_unwrapped(device):
    """Triton's interpreter raises ``InterpreterError(repr(inner))`` from the inner error, in layers."""
    def broken(*args, **kwargs):
        try:
            try:
                raise TypeError("cannot convert [1.0] to a float")
            except TypeError as e:
                raise RuntimeError(repr(e)) from e
        except RuntimeError as e:
            raise RuntimeError(repr(e)) from e

    pattern = loss_pattern.CAUSAL_LM_LOSS  # frozen: set back below
    object.__setattr__(pattern, "replacement", loss_pattern._forward_with(broken))
    try:
        said = _optimize_recording(tiny_model("qwen3", device=device))
    finally:
        object.__setattr__(pattern, "replacement", loss_pattern._forward_with(loss_pattern.fused_linear_cross_entropy))
    assert "causal_lm_loss: not applied to <root>: not verified: probe failed on the replacement: TypeError: " \
           "cannot convert [1.0] to a float" in said[0]
    assert "RuntimeError(" not in said[0]


def test_a_pattern_that_matches_nothing_is_named(device):
    # as when a release's attention stops calling apply_rotary_pos_emb by that name (ROPE is frozen: set it back)
    object.__setattr__(rope_pattern.ROPE, "find", lambda module, params: None)
    try:
        said = _optimize_recording(tiny_model("mistral", device=device))
    finally:
        object.__setattr__(rope_pattern.ROPE, "find", rope_pattern.find)
    assert "rope: not applied (no module of the model matched it)" in said[0]


def test_excluded_patterns_are_not_expected(device):
    model = tiny_model("gemma", device=device)
    assert _optimize_recording(model, exclude=("rope", "causal_lm_loss")) == []


def test_demo_fails_on_missing_coverage(monkeypatch, capsys):
    monkeypatch.setattr(rope_pattern, "apply_rope", lambda *a: (_ for _ in ()).throw(ValueError("no")))
    with pytest.warns(sloth_core.SlothCoreWarning, match="rope"):
        rc = cli.main(["demo", "--model", "llama"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "PARITY OK, COVERAGE INCOMPLETE (1 missing)" in out
    assert "rope: not applied to model.layers.0.self_attn" in out


def test_demo_passes_with_full_coverage(capsys):
    assert cli.main(["demo", "--model", "llama"]) == 0
    assert "coverage: every pattern the declaration expects was applied" in capsys.readouterr().out
