"""``sloth-core tune``: pre-tune the kernels a model's training step uses; show or clear the tuning cache.

    sloth-core tune --model llama-3-8b --seq 2048 4096 [--batch 1] [--dtype bf16] [--kernels rms_norm rope]
    sloth-core tune --model /path/to/config.json --seq 8192
    sloth-core tune --show                  the cache as a table
    sloth-core tune --clear                 empty it

Models: the presets llama-3-8b, gemma-2-9b, qwen3-8b, mistral-7b, or a Hugging Face config.json (or the
directory holding it). For each sequence length, the launch keys of a LoRA step over batch x seq tokens are
tuned on the current GPU (keys already in the cache are kept unless --retune) and the winners stored in the
cache (``$SLOTH_CORE_CACHE_DIR`` or ``~/.cache/sloth_core``), where later processes find them.
"""
from __future__ import annotations

import argparse
import os
import sys

TUNABLE_KERNELS = ("rms_norm", "gated_activation", "rope", "fused_linear_cross_entropy", "cross_entropy")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``tune`` sub-command to an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser("tune", help="pre-tune the kernels a model uses; show or clear the tuning cache",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None,
                   help="preset (llama-3-8b, gemma-2-9b, qwen3-8b, mistral-7b) or a config.json path")
    p.add_argument("--seq", type=int, nargs="+", default=[2048], metavar="LEN",
                   help="sequence lengths to tune for (default: 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences a step (default: 1)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="bf16", help="model dtype (default: bf16)")
    p.add_argument("--kernels", nargs="+", choices=TUNABLE_KERNELS, default=None, metavar="KERNEL",
                   help=f"only these ({', '.join(TUNABLE_KERNELS)}; default: all)")
    p.add_argument("--retune", action="store_true", help="tune again the keys already in the cache")
    p.add_argument("--show", action="store_true", help="print the cache as a table")
    p.add_argument("--clear", action="store_true", help="empty the cache (before tuning, with --model)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $SLOTH_CORE_CACHE_DIR or "
                                                     "~/.cache/sloth_core)")
    return p


def run_tune(args: argparse.Namespace) -> int:
    """Run ``sloth-core tune``; returns the exit status."""
    if args.cache_dir:
        from sloth_core.autotune.cache import DIR_ENV_VAR

        os.environ[DIR_ENV_VAR] = str(args.cache_dir)
    from sloth_core.autotune.cache import TuningCache

    cache = TuningCache()
    if args.clear:
        print(f"cleared {cache.clear()} tuned entries from {cache.path}")
    if args.show:
        print(format_cache(cache))
    if args.model is None:
        if args.show or args.clear:
            return 0
        print("sloth-core tune: give --model (a preset or a config.json path), or --show / --clear",
              file=sys.stderr)
        return 2
    if args.batch < 1 or any(s < 1 for s in args.seq):
        print("sloth-core tune: --batch and --seq must be positive", file=sys.stderr)
        return 2
    from sloth_core.autotune.presets import model_shape

    try:
        shape = model_shape(args.model)
    except ValueError as exc:
        print(f"sloth-core tune: {exc}", file=sys.stderr)
        return 2
    why = _no_gpu_reason()
    if why is not None:
        print(f"sloth-core tune: {why}; tuning times the kernels on the GPU it tunes for", file=sys.stderr)
        return 2  # as sloth-core bench: the command cannot run here
    return _tune_model(shape, args)


# ---------------------------------------------------------------------------------------------- tuning


def _no_gpu_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU found"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set (kernels run in the interpreter, nothing can be timed)"
    return None


def _tune_model(shape, args: argparse.Namespace) -> int:
    import torch

    from sloth_core import autotune
    from sloth_core.autotune import runtime
    from sloth_core.autotune.presets import launch_keys, loss_chunk_keys
    from sloth_core.autotune.space import load_builtin_spaces

    load_builtin_spaces()

    dtype = getattr(torch, _DTYPES[args.dtype])
    wanted = set(args.kernels or TUNABLE_KERNELS)
    num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    token_counts = list(dict.fromkeys(args.batch * s for s in args.seq))
    env = runtime.current_environment()
    print(f"{shape.describe()}\ntokens a step: {', '.join(map(str, token_counts))} ({args.dtype}); "
          f"GPU: {env.gpu}; cache: {runtime.default_cache().path}")
    previous_mode = autotune.tuning_mode()
    autotune.set_tuning("cache")  # launches inside the tuner (and below) never start a tuning of their own
    try:
        plan = [(k, key) for t in token_counts for k, key in launch_keys(shape, t, dtype, num_sms) if k in wanted]
        rows = _tune_all(plan, env, args.retune, "tuning")
        if "cross_entropy" in wanted:  # the chunks the fused loss walks through, at its (now tuned) chunk size
            autotune.reset()
            plan = [k for t in token_counts for k in loss_chunk_keys(shape, t, _loss_chunk(shape, t, dtype), dtype)]
            rows += _tune_all(plan, env, args.retune, "tuning loss chunks")
    finally:
        autotune.set_tuning(previous_mode)
        autotune.reset()
    print(_table(["kernel", "key", "config", "heuristic ms", "tuned ms", "speedup", "tuning s", "status"], rows))
    return 1 if any(r[-1].startswith("failed") for r in rows) else 0


def _loss_chunk(shape, tokens: int, dtype) -> int:
    from sloth_core.autotune import config_for

    return config_for("fused_linear_cross_entropy", n_tokens=tokens, vocab=shape.vocab, hidden=shape.hidden,
                      dtype=dtype)["chunk_tokens"]


def _tune_all(plan: list[tuple[str, dict]], env, retune: bool, title: str) -> list[list]:
    """Tune every distinct bucket of ``plan`` (a progress bar on stderr); one table row each."""
    from sloth_core.autotune import get_space, runtime, tuner
    from sloth_core.autotune.space import format_key

    buckets = {}
    for kernel, key in plan:
        bucket = get_space(kernel).bucket(key)
        buckets.setdefault((kernel, format_key(bucket)), bucket)
    cache, rows = runtime.default_cache(), []
    bar = _progress(len(buckets), title)
    try:
        for (kernel, key_str), bucket in buckets.items():
            bar.set_postfix_str(f"{kernel} {key_str}")
            rows.append(_tune_one(kernel, bucket, key_str, env, cache, retune, tuner))
            bar.update(1)
    finally:
        bar.close()
    return rows


def _tune_one(kernel: str, bucket: dict, key_str: str, env, cache, retune: bool, tuner) -> list:
    from sloth_core.autotune import get_space

    spec = get_space(kernel)
    entry = cache.lookup(env.key, kernel, key_str)
    if entry is not None and not retune and spec.accepts(entry["config"], bucket) is None:
        return _row(kernel, key_str, entry, "cached")
    if not spec.should_tune(bucket):
        return [kernel, key_str, _format_config(spec.heuristic(bucket)), "", "", "", "", "heuristic (small)"]
    try:
        result = tuner.tune(kernel, bucket)
    except Exception as exc:  # noqa: BLE001 - report, go on with the next key
        return [kernel, key_str, "", "", "", "", "", f"failed: {type(exc).__name__}: {exc}"[:160]]
    entry = result.entry()
    status = f"tuned ({len(result.discarded)}/{len(result.trials)} discarded)"
    try:
        cache.store(env, kernel, key_str, entry)
    except OSError as exc:
        status = f"failed to store: {exc}"
    return _row(kernel, key_str, entry, status)


class _TextBar:
    """A minimal stand-in for tqdm: one line a step on stderr."""

    def __init__(self, total: int, title: str):
        self.total, self.done, self.title, self.text = total, 0, title, ""

    def set_postfix_str(self, text: str) -> None:
        self.text = text

    def update(self, n: int = 1) -> None:
        self.done += n
        width = 24
        filled = width * self.done // max(1, self.total)
        print(f"{self.title} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.text}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, title: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, title)
    return tqdm(total=total, desc=title, unit="key", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- tables


def _format_config(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _ms(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _row(kernel: str, key: str, entry: dict, status: str) -> list:
    ms, base = entry.get("ms"), entry.get("heuristic_ms")
    speedup = f"x{base / ms:.2f}" if base and ms else ""
    tuning = entry.get("tuning_s")
    return [kernel, key, _format_config(entry["config"]), _ms(base), _ms(ms), speedup,
            "" if tuning is None else f"{tuning:.1f}", status]


def _table(headers: list[str], rows: list[list]) -> str:
    try:
        from tabulate import tabulate
    except ImportError:  # pragma: no cover - tabulate is a dependency
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [headers, *rows]]
        return "\n".join(lines)
    return tabulate(rows, headers=headers, tablefmt="simple")


def format_cache(cache) -> str:
    """The cache as tables, one per environment (GPU, Triton, sloth_core)."""
    entries = cache.entries()
    lines = [f"tuning cache: {cache.path} ({len(entries)} entries)"]
    by_env: dict[str, list] = {}
    for e in entries:
        by_env.setdefault(e["environment"], []).append(e)
    for env_key, group in sorted(by_env.items()):
        rows = [_row(e["kernel"], e["key"], e, e.get("tuned_at") or "") for e in
                sorted(group, key=lambda e: (e["kernel"], e["key"]))]
        lines += ["", env_key,
                  _table(["kernel", "key", "config", "heuristic ms", "tuned ms", "speedup", "tuning s", "tuned at"],
                         rows)]
    return "\n".join(lines)
