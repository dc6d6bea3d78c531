"""``sloth-core bench kernels`` on a CPU machine (Triton's interpreter, set by conftest): the runner end to end on
tiny shapes with a ``perf_counter`` timer, the correctness guard, the timing helpers, the CLI entry point and the
summary charts. The cases' work models: ``test_bench_cases.py``."""
import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from sloth_core.bench import cases as C
from sloth_core.bench import cases_base as CB
from sloth_core.bench import args as cli_args
from sloth_core.bench import report, timing
from sloth_core.bench import kernels as K
from sloth_core.bench import kernels_cli as KC
from sloth_core.bench import kernels_correctness as KR
from tests.bench.test_bench_cases import GEMMA, TINY

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CEILINGS = {"hbm_gbps": 100.0, "bf16_tflops": 1.0}
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
SCHEMA = ("kind", "kernel", "model", "tokens", "mode", "provider")


def bench(**kwargs):
    """``kernels.run`` on the tiny shape, one token count, one repetition, no ceiling measurement."""
    args = dict(tokens=[16], providers=["hf_eager", "sloth_core", "liger"], device=DEVICE,
                timer=timing.PerfCounterTimer() if DEVICE.type == "cpu" else None, reps=1, warmup=1,
                shapes={"tiny": TINY}, ceilings=CEILINGS, nf4=False, rotate_bytes=4096, log=None)
    args.update(kwargs)
    return K.run(**args)


@pytest.fixture(scope="module")
def full():
    return bench(nf4=HAS_BNB)


def rows_of(results, **match):
    return [r for r in results["rows"] if all(r.get(k) == v for k, v in match.items())]


# ---------------------------------------------------------------------------------------------- end to end


def test_every_kernel_mode_and_provider_has_a_row(full):
    expected = set(cli_args.KERNELS) | ({"lora_nf4"} if HAS_BNB else set())
    assert {r["kernel"] for r in full["rows"]} == expected
    for kernel in expected:
        modes = {"fwd"} if kernel == "dequant" else {"fwd", "fwd_bwd"}
        got = {(r["mode"], r["provider"]) for r in rows_of(full, kernel=kernel)}
        assert got == {(m, p) for m in modes for p in ("hf_eager", "sloth_core", "liger")}, kernel
    assert all(r["tokens"] is None for r in rows_of(full, kernel="dequant"))
    assert all(r["tokens"] == 16 for r in full["rows"] if r["kernel"] != "dequant")
    assert set(full) >= {"env", "ceilings", "settings", "rows"} and full["ceilings"] == CEILINGS
    json.dumps(full, allow_nan=False)


def test_timed_rows_follow_the_schema(full):
    timed = [r for r in full["rows"] if r.get("median_ms") is not None]
    assert {r["provider"] for r in timed} >= {"hf_eager", "sloth_core"}
    for row in timed:
        assert all(key in row for key in SCHEMA) and row["kind"] == "kernel"
        assert row["median_ms"] > 0 and row["reps"] == 1 and "peak_extra_gib" in row
        unit = "tflops" if row["kernel"] in ("fused_linear_cross_entropy", "lora", "lora_nf4") else "gbps"
        assert row[unit] > 0 and ({"gbps", "tflops"} - {unit}).isdisjoint(row)
        work = C.CASES[row["kernel"]].work(CB.bench_model(TINY), row["tokens"], row["mode"])
        assert row[unit] == pytest.approx(work.rate(row["median_ms"]), rel=2e-3)
        ceiling = CEILINGS["hbm_gbps" if unit == "gbps" else "bf16_tflops"]
        assert row["pct_of_ceiling"] == pytest.approx(100 * row[unit] / ceiling, rel=2e-3)
        if DEVICE.type == "cpu":
            assert row["peak_extra_gib"] is None  # perf_counter timer: no memory statistics


def test_sloth_core_agrees_with_hf_eager(full):
    for row in rows_of(full, provider="sloth_core"):
        assert row.get("median_ms") is not None, row
        assert row["mismatch"] is False and row["max_rel_err"] <= KR.MISMATCH_REL_ERR, row
    assert all("max_rel_err" not in r for r in rows_of(full, provider="hf_eager"))


def test_speedups_are_the_ratios_of_the_medians(full):
    checked = 0
    for row in full["rows"]:
        if row.get("median_ms") is None:
            assert "speedup_vs" not in row
            continue
        others = [r for r in rows_of(full, kernel=row["kernel"], tokens=row["tokens"], mode=row["mode"])
                  if r["provider"] != row["provider"] and r.get("median_ms")]
        assert set(row["speedup_vs"]) == {r["provider"] for r in others}
        for other in others:
            assert row["speedup_vs"][other["provider"]] == pytest.approx(other["median_ms"] / row["median_ms"],
                                                                         rel=2e-3)
            checked += 1
    assert checked


def test_skipped_rows_carry_a_reason(full):
    untimed = [r for r in full["rows"] if r.get("median_ms") is None]
    assert untimed and all(r.get("skipped") or r.get("error") for r in untimed)
    errors = [(r["kernel"], r["mode"], r["provider"], r["error"]) for r in full["rows"] if r.get("error")]
    assert not errors, errors
    if not HAS_LIGER:
        assert {r["skipped"] for r in rows_of(full, provider="liger")} == {"liger-kernel is not installed"}
    elif not torch.cuda.is_available():  # Liger's kernels are CUDA's
        assert {r["skipped"] for r in rows_of(full, provider="liger")} == {"Liger-Kernel needs a CUDA device"}
    else:
        assert rows_of(full, provider="liger", kernel="dequant")[0]["skipped"].startswith("Liger-Kernel has no")


def test_report_of_a_run(full, tmp_path):
    paths = report.write_all(full, tmp_path, "kernels_test")
    assert report.read_json(paths["json"])["rows"] == full["rows"]
    table = report.terminal_table(full)
    assert len(table.splitlines()) == 2 + len(full["rows"])
    if not HAS_LIGER:
        assert "skipped: liger-kernel is not installed" in table
    assert "## Kernels" in paths["markdown"].read_text()


def test_gemma_flavour_agrees_with_hf_eager():
    results = bench(kernels=["rms_norm", "gated_activation", "cross_entropy"], modes=["fwd_bwd"],
                    providers=["hf_eager", "sloth_core"], shapes={"gemma-2-tiny": GEMMA})
    ours = rows_of(results, provider="sloth_core")
    assert len(ours) == 3 and all(r["mismatch"] is False for r in ours), ours


# ---------------------------------------------------------------------------------------------- correctness guard


def _forward_wrong(self, m, module):
    return lambda x: module(x) * 1.1


def _gradient_wrong(self, m, module):
    return lambda x: module(x.detach()) + 0.0 * x  # right output, zero input gradient


@pytest.mark.parametrize("wrong, mismatched_modes", [(_forward_wrong, {"fwd", "fwd_bwd"}),
                                                     (_gradient_wrong, {"fwd_bwd"})])
def test_a_wrong_provider_is_flagged(wrong, mismatched_modes, monkeypatch):
    monkeypatch.setattr(C.RMSNormCase, "sloth_core", wrong)
    results = bench(kernels=["rms_norm"], providers=["hf_eager", "sloth_core"])
    rows = {r["mode"]: r for r in rows_of(results, provider="sloth_core")}
    assert {mode for mode, r in rows.items() if r["mismatch"]} == mismatched_modes
    for mode in mismatched_modes:
        assert rows[mode]["max_rel_err"] > KR.MISMATCH_REL_ERR and rows[mode]["median_ms"] > 0
    assert "MISMATCH (rel err" in report.terminal_table(results)


def test_rel_err_helpers():
    a = torch.tensor([1.0, 2.0, 2.0])
    assert KR.rel_err(a, a) == 0.0
    assert KR.rel_err(a * 1.5, a) == pytest.approx(0.5)
    assert KR.rel_err(a[:2], a) == math.inf
    assert KR.rel_err(torch.tensor([3.0, 4.0]), torch.zeros(2)) == pytest.approx(5.0)  # zero reference: absolute
    assert math.isnan(KR.max_rel_err([a, torch.tensor([float("nan")])], [a, torch.tensor([1.0])]))
    assert KR.max_rel_err([a], [a, a]) == math.inf
    assert KR.max_rel_err([None, a], [None, a]) == 0.0 and KR.max_rel_err([None], [a]) == math.inf


# ---------------------------------------------------------------------------------------------- failures


def test_compile_failure_is_a_skipped_row(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("inductor exploded\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    results = bench(kernels=["rms_norm"], modes=["fwd"], tokens=[8, 16], providers=["hf_eager", "torch_compile"])
    first, second = rows_of(results, provider="torch_compile")
    assert first["skipped"] == "torch.compile failed: RuntimeError: inductor exploded"
    assert second["skipped"].startswith("failed at an earlier token count: RuntimeError")
    assert all("median_ms" not in r for r in (first, second))
    assert all(r["median_ms"] > 0 for r in rows_of(results, provider="hf_eager"))


def test_compile_skip_reason_for_dequant():
    assert "opaque" in K.build_provider(C.CASES["dequant"], "torch_compile", CB.bench_model(TINY), None, DEVICE)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown kernel 'softmax'"):
        bench(kernels=["softmax"])
    with pytest.raises(ValueError, match="unknown provider"):
        bench(providers=["unsloth"])
    with pytest.raises(ValueError, match="unknown model 'llama-3-8b'"):
        bench(models=["llama-3-8b"])  # the tiny table replaces the presets


# ---------------------------------------------------------------------------------------------- timing


def test_sets_and_reps():
    mib = 1024 * 1024
    assert timing.sets_needed(64 * mib) == 2 and timing.sets_needed(200 * mib) == 2
    assert timing.sets_needed(10 * mib) == 13 and timing.sets_needed(1) == timing.MAX_SETS
    assert timing.reps_for(1.0, 20) == 20 and timing.reps_for(100.0, 20) == 5 and timing.reps_for(100.0, 3) == 3
    assert timing.reps_for(25.0, 20) == 10


def test_time_call_rotates_sets_and_resets_gradients():
    sets = [timing.InputSet((torch.randn(4, requires_grad=True),), (torch.ones(4),)) for _ in range(3)]
    seen = []

    def fn(x):
        assert x.grad is None  # reset before every repetition
        seen.append(next(i for i, s in enumerate(sets) if s.args[0] is x))
        return x * 2

    result = timing.time_call(fn, sets, "fwd_bwd", timing.PerfCounterTimer(), warmup=2, reps=4)
    assert result.reps == 4 and len(result.times_ms) == 4 and result.median_ms > 0
    assert seen == [0, 1, 0, 1, 2, 0]  # two warm-up repetitions, then four timed, each on the next set
    assert all(s.args[0].grad is None for s in sets)


def test_run_once_modes():
    x = torch.randn(3, requires_grad=True)
    out = timing.run_once(lambda t: t * 3, timing.InputSet((x,), (torch.ones(3),)), "fwd")
    assert not out[0].requires_grad and x.grad is None
    timing.run_once(lambda t: (t * 3, t.sum()), timing.InputSet((x,), (torch.ones(3), torch.tensor(2.0))), "fwd_bwd")
    assert torch.equal(x.grad, torch.full((3,), 5.0))


def test_perf_counter_timer_measures_no_memory():
    calls = []
    assert timing.PerfCounterTimer().peak_extra_gib(lambda: calls.append(1)) is None and calls == [1]


def test_measure_ceilings_small():
    ceilings = timing.measure_ceilings("cpu", timing.PerfCounterTimer(), copy_bytes=1 << 20, matmul_n=64, reps=2)
    assert ceilings["hbm_gbps"] > 0 and ceilings["bf16_tflops"] > 0 and "1 GiB" not in ceilings["method"]


@pytest.mark.cuda
def test_cuda_timer_and_peak_memory():
    timer = timing.CudaTimer("cuda")
    assert all(t >= 0 for t in timer.time_ms(lambda i: torch.ones(1 << 20, device="cuda").sum(), 3))
    gib = timer.peak_extra_gib(lambda: torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda"))
    assert gib == pytest.approx(0.25, abs=0.01)


# ---------------------------------------------------------------------------------------------- CLI


def parse(argv):
    parser = argparse.ArgumentParser()
    KC.add_arguments(parser)
    return parser.parse_args(argv)


def test_add_arguments_defaults_and_choices():
    args = parse([])
    assert (args.kernel, args.model, args.mode, args.tokens, args.provider) == (None,) * 5
    assert (args.reps, args.out, args.name) == (K.DEFAULT_REPS, Path("benchmarks/results"), None)
    args = parse(["--kernel", "lora", "rope", "--provider", "liger", "--tokens", "128", "--reps", "3"])
    assert args.kernel == ["lora", "rope"] and args.provider == ["liger"] and args.tokens == [128] and args.reps == 3
    for bad in (["--kernel", "softmax"], ["--provider", "unsloth"], ["--reps", "0"], ["--mode", "bwd"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_main_writes_every_output(monkeypatch, tmp_path, capsys):
    canned = {"env": {"gpu": "NVIDIA H200"}, "ceilings": CEILINGS,
              "rows": [{"kind": "kernel", "kernel": "rope", "model": "llama-3-8b", "tokens": 4096, "mode": "fwd",
                        "provider": "sloth_core", "median_ms": 0.1, "gbps": 2000.0}]}
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(KC, "run", lambda *a, **kw: calls.append((a, kw)) or canned)
    args = parse(["--kernel", "rope", "--out", str(tmp_path), "--name", "stem", "--reps", "7"])
    assert KC.main(args) == 0
    (a, kw), = calls
    assert a[0] == ["rope"] and kw["reps"] == 7 and kw["device"].type == "cuda"
    out = capsys.readouterr().out
    assert "sloth_core" in out and f"wrote {tmp_path / 'stem.json'}" in out and "stem.md" in out
    assert report.read_json(tmp_path / "stem.json") == canned


def test_default_stem_names_the_gpu_and_date(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 (SXM)")
    assert KC.gpu_slug() == "nvidia-h200-sxm"
    assert KC.default_stem().startswith("kernels_nvidia-h200-sxm_20") and len(KC.default_stem()) == 32


# ---------------------------------------------------------------------------------------------- charts


def test_summary_charts(tmp_path):
    pytest.importorskip("matplotlib")

    def row(kernel, provider, ms, gib, speedup):
        return {"kind": "kernel", "kernel": kernel, "model": "llama-3-8b", "tokens": 8192, "mode": "fwd_bwd",
                "provider": provider, "median_ms": ms, "peak_extra_gib": gib, "speedup_vs": speedup}

    rows = [row("rms_norm", "hf_eager", 2.0, 1.0, {"sloth_core": 0.5}), row("rms_norm", "sloth_core", 1.0, 0.5,
                                                                            {"hf_eager": 2.0}),
            row("rope", "hf_eager", 2.0, 1.0, {}), row("rope", "liger", 1.5, 0.7, {"hf_eager": 1.33}),
            {"kind": "train", "setup": "lora_bf16", "model": "llama-3-8b", "provider": "hf_peft",
             "tokens_per_s": 6400.0, "peak_gib": 31.3},
            {"kind": "train", "setup": "lora_bf16", "model": "llama-3-8b", "provider": "sloth_core",
             "tokens_per_s": 9000.0, "peak_gib": 18.0}]
    paths = report.summary_charts({"rows": rows}, tmp_path)
    assert sorted(p.name for p in paths) == ["kernel_rms_norm_fwd_bwd_memory.png", "kernel_rope_fwd_bwd_memory.png",
                                             "speedup_vs_hf_eager_fwd_bwd.png", "train_steps.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert report.summary_charts({"rows": []}, tmp_path / "none") == []


def test_torch_compile_compiles_once_per_kernel_model_and_mode():
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    results = bench(kernels=["rope"], tokens=[8, 16, 32], providers=["hf_eager", "torch_compile"])
    assert counters["stats"]["unique_graphs"] - before == 2  # fwd and fwd_bwd; the token counts share a graph
    compiled = rows_of(results, provider="torch_compile")
    assert len(compiled) == 6 and all(r["median_ms"] > 0 and r["mismatch"] is False for r in compiled), compiled
