"""``sloth-core bench`` on a CPU machine: the no-GPU message, ``compare``, the report views, the environment."""
import builtins
import json

import pytest
import torch

from sloth_core.__main__ import main
from sloth_core.bench import cli, env, report

PROVIDERS = ("sloth_core", "hf_eager", "liger")


def _row(kernel="rms_norm", provider="sloth_core", ms=1.0, tokens=8192, mode="fwd_bwd", **extra):
    return {"kind": "kernel", "kernel": kernel, "model": "llama-3-8b", "tokens": tokens, "mode": mode,
            "provider": provider, "median_ms": ms, "gbps": 3000.0, "pct_of_ceiling": 62.5, "peak_extra_gib": 0.25,
            "speedup_vs": {"hf_eager": 2.0}, **extra}


def _results(rows, gpu="NVIDIA H200", commit="abc"):
    return {"env": {"gpu": gpu, "git_commit": commit, "date": "2026-11-29T00:00:00+00:00"},
            "ceilings": {"hbm_gbps": 4800, "bf16_tflops": 989},
            "rows": rows}


@pytest.fixture
def sample():
    rows = [_row(provider=p, ms=ms) for p, ms in zip(PROVIDERS, (0.5, 1.0, 0.6))]
    rows.append({"kind": "train", "setup": "lora_bf16", "model": "llama-3-8b", "tokens": 8192, "mode": "fwd_bwd",
                 "provider": "sloth_core", "median_ms": 900.0, "tflops": 410.0, "pct_of_ceiling": 41.5,
                 "peak_extra_gib": 20.0, "speedup_vs": {"hf_peft": 1.4}})
    return _results(rows)


# ---------------------------------------------------------------------------------------------- GPU commands


@pytest.mark.parametrize("argv", [["bench", "kernels"], ["bench", "kernels", "--model", "qwen3-8b", "--tokens", "4096"],
                                  ["bench", "train", "--quant", "nf4", "--batch", "2"]])
def test_gpu_commands_without_cuda_print_one_line_and_exit_2(argv, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    captured = capsys.readouterr()
    expected = f"sloth-core bench: needs a CUDA GPU; none found (torch {torch.__version__}, CUDA unavailable)"
    assert captured.err.strip() == expected
    assert captured.out == ""


@pytest.mark.parametrize("command", ["kernels", "train"])
def test_gpu_commands_with_cuda_run_their_runner(command, monkeypatch):
    from sloth_core.bench import kernels_cli, train_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    called = []
    for module in (kernels_cli, train_cli):
        monkeypatch.setattr(module, "main", lambda args, m=module.__name__: called.append((m, args)) or 0)
    assert cli.run_bench(cli_args(["bench", command])) == 0
    assert [m for m, _ in called] == [f"sloth_core.bench.{command}_cli"]
    assert called[0][1].bench_command == command


def cli_args(argv):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_parser_choices_and_defaults():
    args = cli_args(["bench", "kernels", "--kernel", "rope", "rms_norm", "--mode", "fwd", "--tokens", "1", "8192"])
    assert args.kernel == ["rope", "rms_norm"] and args.mode == ["fwd"] and args.tokens == [1, 8192]
    args = cli_args(["bench", "train"])
    assert (args.preset, args.quant, args.batch, args.seq, args.rank) == (["llama-3-8b"], ["none", "nf4"], 4, 2048, 16)
    for bad in (["bench", "kernels", "--model", "gpt2"], ["bench", "kernels", "--mode", "bwd"],
                ["bench", "kernels", "--tokens", "0"], ["bench", "train", "--quant", "int8"], ["bench"]):
        with pytest.raises(SystemExit) as exc:
            cli_args(bad)
        assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------- compare


def test_compare_two_files(tmp_path, capsys):
    old = _results([_row(ms=1.0), _row(provider="hf_eager", ms=2.0), _row(kernel="rope", ms=0.3)], commit="aaa")
    new = _results([_row(ms=0.5), _row(provider="hf_eager", ms=2.0), _row(kernel="rms_norm", tokens=4096, ms=0.2)],
                   commit="bbb")
    a, b = report.write_json(old, tmp_path / "a.json"), report.write_json(new, tmp_path / "b.json")
    assert main(["bench", "compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    faster = [ln for ln in lines if " sloth_core " in ln and "8192" in ln and "rms_norm" in ln]
    assert len(faster) == 1 and faster[0].split()[-3:] == ["1", "0.5", "0.500"]
    same = [ln for ln in lines if " hf_eager " in ln]
    assert same[0].split()[-3:] == ["2", "2", "1.000"]
    assert any("rope" in ln and ln.rstrip().endswith("only in A") for ln in lines)
    assert any("4096" in ln and ln.rstrip().endswith("only in B") for ln in lines)
    assert "git_commit: aaa -> bbb" in out and "date" not in out.split("geometric")[0]
    assert "2 rows in both; geometric mean of new/old: 0.707" in out


def test_compare_matches_on_every_key_field():
    base = _row()
    variants = [dict(base, kind="train"), dict(base, kernel="rope"), dict(base, model="qwen3-8b"),
                dict(base, tokens=1), dict(base, mode="fwd"), dict(base, provider="liger")]
    text = report.compare(_results([base]), _results(variants))
    assert "no rows in both runs" in text and text.count("only in B") == len(variants)


@pytest.mark.parametrize("content, message", [(None, "cannot read"), ("{not json", "not JSON"),
                                              ('{"env": {}}', "not a sloth-core bench results file")])
def test_compare_bad_file_is_one_line_exit_2(content, message, tmp_path, capsys):
    good = report.write_json(_results([_row()]), tmp_path / "good.json")
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["bench", "compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- report views


def test_json_round_trip(sample, tmp_path):
    path = report.write_json(sample, tmp_path / "sub" / "results.json")
    assert report.read_json(path) == sample
    assert json.loads(path.read_text()) == sample


def test_terminal_table_lists_every_row(sample):
    text = report.terminal_table(sample)
    for provider in PROVIDERS:
        assert provider in text
    assert "3000 GB/s" in text and "410.0 TFLOP/s" in text and "lora_bf16" in text and "hf_eager x2.00" in text
    assert len(text.splitlines()) == 2 + len(sample["rows"])
    assert report.terminal_table({"rows": []}) == "(no results)"


def test_markdown_report_has_env_and_a_table_per_kind(sample):
    md = report.markdown_report(sample)
    lines = md.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| kind"))
    assert "| provider" in lines[header] and set(lines[header + 1]) <= set("|-: ")
    assert "## Environment" in md and "NVIDIA H200" in md and "## Ceilings" in md and "hbm_gbps" in md
    assert "## Kernels" in md and "## Training" in md
    for provider in PROVIDERS:
        assert f"| {provider}" in md


def test_png_charts_without_matplotlib_writes_nothing(sample, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert report.png_charts(sample, tmp_path / "charts") == []
    assert "matplotlib is not importable" in capsys.readouterr().err
    assert not (tmp_path / "charts").exists()


def test_png_charts_with_matplotlib(sample, tmp_path):
    pytest.importorskip("matplotlib")
    paths = report.png_charts(sample, tmp_path)
    assert sorted(p.name for p in paths) == ["kernel_rms_norm_fwd_bwd.png", "train_lora_bf16_fwd_bwd.png"]
    assert all(p.stat().st_size > 0 for p in paths)


# ---------------------------------------------------------------------------------------------- environment


def test_environment_keys():
    info = env.environment()
    expected = {"gpu", "driver", "cuda", "torch", "triton", "transformers", "peft", "bitsandbytes", "liger_kernel",
                "sloth_core", "python", "platform", "git_commit", "git_dirty", "command", "date"}
    assert expected <= set(info)
    assert info["torch"] == torch.__version__.split("+")[0] or info["torch"] == torch.__version__
    assert all(isinstance(v, str) and v for v in info.values())
    json.dumps(info)


def test_environment_missing_library_and_failed_git(monkeypatch):
    assert env.library_version("no-such-dist", "no_such_module_xyz") == env.MISSING
    monkeypatch.setattr(env, "_REPO", env._REPO / "no_such_dir_for_git")
    assert env.git_commit() == env.UNKNOWN and env.git_dirty() == env.UNKNOWN
