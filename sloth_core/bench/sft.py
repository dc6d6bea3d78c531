"""``sloth-core bench train --flow sft``: TRL's ``SFTTrainer`` with its default config, timed step by step, with and
without the one ``sloth_core`` line.

What runs, per (model preset, setup, workload, provider) -- a fresh model every time:

* The model: :func:`sloth_core.bench.train_models.build` -- the preset's causal LM with random weights (seeded: every
  provider starts from the same weights), bf16 on the GPU (fp32 on the CPU, for tests); ``--quant nf4`` (setup
  ``qlora_nf4``) swaps the decoder projections for bitsandbytes NF4 double-quant ``Linear4bit`` layers with bf16
  compute (:func:`~sloth_core.bench.train_models.quantize_nf4`), as ``from_pretrained(quantization_config=...)`` would
  (on the CPU too where bitsandbytes has its CPU backend: a slow smoke test of the QLoRA path).
* Providers -- the plain user script, twice:

  - ``hf_peft``: ``trl.SFTTrainer(model=model, args=SFTConfig(...), train_dataset=data, processing_class=tokenizer,
    peft_config=LoraConfig(r, lora_alpha=r, lora_dropout=0, target_modules=q/k/v/o/gate/up/down))``.
  - ``sloth_core``: the same script with ``sloth_core.optimize(model, gradient_checkpointing="offload")`` on the
    bare model before the trainer is built. The trainer then adds the LoRA layers (bound when it switches
    checkpointing on) and switches HF's checkpointing on, which sloth_core's serves
    (:mod:`sloth_core.checkpointing_takeover`); TRL wraps the model's forward with its fused LM head -- what
    sloth_core made of that is in the row's ``report_patterns`` (``sloth_core.report`` after the run).

  ``SFTConfig`` keeps TRL's defaults -- ``gradient_checkpointing=True``, its loss path (the chunked "fused LM head"
  TRL patches into the model), AdamW, linear schedule, seed 42 (LoRA init and data order: the same for every
  provider) -- but for what a benchmark must set: ``per_device_train_batch_size`` (``--batch``),
  ``gradient_accumulation_steps=1``, ``max_steps``, ``max_length``, ``learning_rate=1e-4``, ``bf16`` (on CUDA
  only), ``logging_steps=1`` (the loss of every step; logging runs after the step's timer stops),
  ``disable_tqdm``, ``report_to="none"``, ``save_strategy="no"``, a temporary ``output_dir``, ``use_cpu`` and
  ``dataloader_pin_memory`` off on the CPU.
* Data: pre-tokenized rows (a ``datasets.Dataset`` with an ``input_ids`` column of random token ids, seeded, the
  same for every provider) -- TRL uses them as they are (no EOS added, ``labels`` = ``input_ids``). TRL still wants
  a ``processing_class`` (it would otherwise fetch the checkpoint's from the Hub): a two-token word-level
  ``PreTrainedTokenizerFast`` made in-process supplies the pad token (id 0; the data uses ids from 2 up).
  Workloads (``--workload``):

  - ``fixed``: every row ``--seq`` tokens (``max_length = seq``), ``--batch`` rows a step;
  - ``varlen``: lengths from a log-normal distribution (median ``--varlen-median`` 300, sigma 1.0) clipped to
    [16, ``--varlen-max`` 4096], seeded, run twice: ``padded`` (SFTConfig's default collator: each batch padded to
    its longest row, ``max_length = varlen-max`` so nothing is cut) and ``padding_free`` (``SFTConfig(
    padding_free=True)``: the batch flattened into one row with ``position_ids`` restarting at each sequence).

  Padding-free with SDPA: TRL 1.15 only *warns* that padding-free is known to work with flash-attention variants
  (TRL 1.16 dropped the warning); neither refuses SDPA. transformers 5.17 / 5.25 see the restarted ``position_ids``
  with no ``attention_mask`` and build a block-diagonal causal mask, so the sequences stay apart under SDPA (the
  CPU test checks that the padded and padding-free runs give the same losses). So ``padding_free=True`` is used as
  is, with SDPA (no ``packing=True`` / ``packing_strategy="bfd"`` fallback needed). TRL refuses ``padding_free``
  without packing when ``max_length`` is set ("max_length is not enforced"), so that run sets ``max_length=None``:
  the rows are already clipped to ``--varlen-max``.
* Timing: a :class:`transformers.TrainerCallback` -- ``torch.cuda.synchronize()`` then a wall clock at
  ``on_step_begin`` and at ``on_step_end``: forward and backward (checkpoint recomputes included), gradient
  clipping, optimizer, scheduler, ``zero_grad``. The batch is fetched, collated and moved to the GPU before
  ``on_step_begin`` (the same for both providers) and is not in the step time; the whole ``trainer.train()`` is in
  ``train_runtime_s``. The first ``--warmup`` steps (Triton compilation, allocator growth) are left out. Tokens
  are counted by wrapping the trainer's data collator: the real tokens of each batch (the rows' lengths: the
  ``attention_mask`` sum when padded, the flattened length when padding-free) and the padded size.
  ``tokens_per_s`` = the real tokens of the warm steps / their summed time (for ``fixed``: ``batch * seq`` / mean
  step); ``median_ms`` is the median warm step. Peak memory is ``torch.cuda.max_memory_allocated()`` after a reset
  at the end of the last warmup step: the steady-state steps with the weights resident (``resident_gib``: what
  was allocated when training began -- weights, LoRA weights; ``None`` on the CPU).

A result row (``kind`` ``"train_sft"``, ``flow`` ``"sft"``; :mod:`sloth_core.bench.report` renders it as any other
kind; ``mode`` is the workload, ``fixed`` / ``varlen_padded`` / ``varlen_padding_free``, so rows stay apart in
``bench compare``) per (setup, model, workload, provider): ``median_ms``, ``tokens_per_s``, ``peak_gib``,
``losses`` (every step, from TRL's log), ``speedup_vs`` ``{"hf_peft": this tokens/s / hf tokens/s}`` (the same
batches: the ratio of warm times), ``memory_vs_hf``, ``max_rel_loss_diff``; ``step_ms``, ``real_tokens`` /
``padded_tokens`` (every step), ``build_s`` (model), ``setup_s`` (``optimize`` + trainer construction),
``train_runtime_s``, ``hf_checkpoint_calls`` (decoder-layer calls through HF's checkpoint function) and
``sloth_checkpoint_calls`` (through sloth_core's), ``sloth_warnings`` (sloth_core's warnings while it was set up and
trained, each once); for ``sloth_core`` also ``report`` / ``report_patterns`` (``sloth_core.report`` rows after the
run by status / by pattern and status) and ``checkpointing`` (its checkpointing rows' details; ``["hf"]`` for
``hf_peft``). A provider that fails gets a row with ``error``; the rest still runs. The JSON is rewritten after
every provider, so a run cut short keeps what it measured.

    python -m sloth_core bench train --flow sft --preset llama-3-8b --quant nf4 none --workload fixed varlen
"""
from __future__ import annotations

import collections
import contextlib
import gc
import statistics
import tempfile
import time
import warnings
from typing import Any, Iterable, Sequence

import torch

from .args import _known, _sloth_options
from .sft_data import VARLEN, WORKLOADS, make_dataset, mode_name, tokenizer, variants, varlen_lengths
from .train import LR, WARMUP
from .train_models import PRESETS, SETUPS, TARGETS, build, model_name

KIND = "train_sft"
PROVIDERS = ("hf_peft", "sloth_core")


# ---------------------------------------------------------------------------------------------- measuring


class CountingCollator:
    """Wraps the trainer's data collator: the real tokens (the rows' lengths) and the padded size of every batch,
    in the order the batches are made (the dataloader may make one ahead of the step that uses it)."""

    def __init__(self, collate):
        self.collate = collate
        self.real: list[int] = []
        self.padded: list[int] = []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.real.append(sum(len(e["input_ids"]) for e in examples))
        self.padded.append(int(batch["input_ids"].numel()))
        return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device: torch.device, warmup: int):
    """A ``TrainerCallback`` timing every step (see the module docstring) and taking the peak memory of the steps
    after the first ``warmup``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.resident = self.peak = None
            self._t = 0.0

        def _reset_peak(self):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            if device.type == "cuda":
                self.resident = torch.cuda.memory_allocated(device) / 2**30
            if warmup == 0:
                self._reset_peak()

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter() - self._t)
            if len(self.times) == warmup:
                self._reset_peak()

        def on_train_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                self.peak = torch.cuda.max_memory_allocated(device) / 2**30

    return StepTimer()


@contextlib.contextmanager
def counting_hf_checkpoints():
    """Count the calls of HF's checkpoint function (``transformers.modeling_utils.checkpoint``, which
    ``gradient_checkpointing_enable`` binds when the trainer switches checkpointing on): yields a one-item list."""
    import transformers.modeling_utils as mu

    original, count = getattr(mu, "checkpoint", None), [0]
    if original is None:  # another transformers layout: not counted
        yield [None]
        return

    def checkpoint(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    mu.checkpoint = checkpoint
    try:
        yield count
    finally:
        mu.checkpoint = original


@contextlib.contextmanager
def _sloth_warnings(out: dict):
    """Collect sloth_core's warnings (each message once, in ``out["sloth_warnings"]``); others are shown as usual."""
    from sloth_core import SlothCoreWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SlothCoreWarning)
            yield
    finally:  # outside the recording: showwarning is the caller's again
        seen = out.setdefault("sloth_warnings", [])
        for w in caught:
            if issubclass(w.category, SlothCoreWarning):
                if str(w.message) not in seen and len(seen) < 20:
                    seen.append(str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def sft_config(output_dir: str, *, device: torch.device, batch: int, steps: int, max_length: int | None,
               padding_free: bool, lr: float):
    """``SFTConfig`` at TRL's defaults but for what a benchmark must set (see the module docstring)."""
    from trl import SFTConfig

    cuda = device.type == "cuda"
    return SFTConfig(output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     max_steps=steps, max_length=max_length, padding_free=padding_free, learning_rate=lr,
                     bf16=cuda, use_cpu=not cuda, dataloader_pin_memory=cuda, logging_steps=1, disable_tqdm=True,
                     report_to="none", save_strategy="no")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(provider: str, preset: str, quant: str, data, *, device: torch.device, dtype: torch.dtype, batch: int,
            steps: int, warmup: int, max_length: int | None, padding_free: bool, rank: int, lr: float, seed: int,
            layers: int | None = None, sloth_options: dict | None = None) -> dict:
    """One provider's run on a fresh model: its figures, or ``error``."""
    out: dict[str, Any] = {}
    try:
        _run_trainer(out, provider, preset, quant, data, device=device, dtype=dtype, batch=batch, steps=steps,
                     warmup=warmup, max_length=max_length, padding_free=padding_free, rank=rank, lr=lr, seed=seed,
                     layers=layers, sloth_options=sloth_options or {})
    except Exception as exc:  # noqa: BLE001 - out of memory, a TRL / kernel error: the other runs still go on
        out["error"] = f"{out.pop('stage', 'train')}: {type(exc).__name__}: {exc}"
    finally:
        _free(device)  # the trainer and the model went with _run_trainer's frame
    out.pop("stage", None)
    return out


def _run_trainer(out: dict, provider, preset, quant, data, *, device, dtype, batch, steps, warmup, max_length,
                 padding_free, rank, lr, seed, layers, sloth_options) -> None:
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    import sloth_core
    from sloth_core import checkpointing as ck

    out["stage"] = "build"
    t = time.perf_counter()
    model = build(preset, layers, quant, device=device, dtype=dtype, seed=seed)
    out["build_s"] = time.perf_counter() - t
    trainer = None
    with tempfile.TemporaryDirectory(prefix="sloth_core_sft_") as tmp:
        try:
            out["stage"] = "setup"
            t = time.perf_counter()
            if provider == "sloth_core":
                with _sloth_warnings(out):
                    sloth_core.optimize(model, gradient_checkpointing="offload", **sloth_options)  # the one line
            timer = _timer(device, min(warmup, steps - 1))  # the steps the figures leave out
            lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS),
                              task_type="CAUSAL_LM")
            config = sft_config(tmp, device=device, batch=batch, steps=steps, max_length=max_length,
                                padding_free=padding_free, lr=lr)
            trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer(),
                                 peft_config=lora, callbacks=[timer])
            for callback in (PrinterCallback, ProgressCallback):  # the log of every step: in the JSON, not printed
                trainer.remove_callback(callback)
            counter = trainer.data_collator = CountingCollator(trainer.data_collator)
            out["setup_s"] = time.perf_counter() - t
            out["stage"] = "train"
            ck.reset_checkpointing_stats()
            with counting_hf_checkpoints() as hf_calls, _sloth_warnings(out):
                result = trainer.train()
            out["stage"] = "results"
            out.update(_figures(timer, counter, trainer.state.log_history, warmup))
            out.update(train_runtime_s=result.metrics.get("train_runtime"), hf_checkpoint_calls=hf_calls[0],
                       sloth_checkpoint_calls=ck.checkpointing_stats().checkpointed_calls)
            if provider == "sloth_core":
                rows = sloth_core.report(trainer.model)  # as it ran: after the trainer's changes
                out["report"] = dict(collections.Counter(r.status for r in rows))
                out["report_patterns"] = dict(collections.Counter(f"{r.pattern}: {r.status}" for r in rows))
                out["checkpointing"] = sorted({r.detail for r in rows if r.pattern == "checkpointing"})
                out["checkpointed_layers"] = sum(r.pattern == "checkpointing" for r in rows)
            else:
                base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
                on = getattr(base, "is_activation_checkpointing", None)  # transformers 5.2x; 5.17's name below
                on = base.is_gradient_checkpointing if on is None else on
                out["checkpointing"] = ["hf" if on else "off"]
        finally:
            if trainer is not None and provider == "sloth_core":
                sloth_core.restore(trainer.model)
                ck.clear_host_pool()  # the pinned buffers of "offload", sized for this model
            del trainer, model


def _figures(timer, counter: CountingCollator, log_history: list, warmup: int) -> dict:
    times = timer.times
    n = len(times)
    real, padded = counter.real[:n], counter.padded[:n]
    skip = min(warmup, n - 1)
    warm_t, warm_tokens = times[skip:], real[skip:]
    losses = [float(h["loss"]) for h in log_history if "loss" in h and "train_runtime" not in h]
    return {"median_ms": statistics.median(warm_t) * 1e3, "tokens_per_s": sum(warm_tokens) / sum(warm_t),
            "peak_gib": timer.peak, "resident_gib": timer.resident, "losses": losses,
            "step_ms": [x * 1e3 for x in times], "real_tokens": real, "padded_tokens": padded,
            "warm_steps": n - skip}


# ---------------------------------------------------------------------------------------------- rows


def _row(model: str, quant: str, workload: str, padding: str, provider: str, *, batch: int, seq: int | None,
         rank: int, m: dict, base: dict | None) -> dict:
    row = {"kind": KIND, "flow": "sft", "setup": SETUPS[quant], "model": model,
           "tokens": batch * seq if workload == "fixed" else None, "mode": mode_name(workload, padding),
           "workload": workload, "padding": padding, "provider": provider, "batch": batch, "seq": seq, "rank": rank}
    if "error" in m:
        return {**row, **{k: v for k, v in m.items() if k in ("error", "build_s", "setup_s", "sloth_warnings")}}
    row.update(m)
    row.update(speedup_vs={}, memory_vs_hf=None, max_rel_loss_diff=None)
    if base is not None and "error" not in base:
        row["speedup_vs"] = {"hf_peft": m["tokens_per_s"] / base["tokens_per_s"]}
        if m["peak_gib"] is not None and base["peak_gib"]:
            row["memory_vs_hf"] = m["peak_gib"] / base["peak_gib"]
        diffs = [abs(a - b) / (abs(b) or 1.0) for a, b in zip(m["losses"], base["losses"])]
        row["max_rel_loss_diff"] = max(diffs, default=None)
    return row


def run(presets: Iterable[str] | str = ("llama-3-8b",), quants: Iterable[str] | str = ("nf4", "none"),
        workloads: Iterable[str] | str = WORKLOADS, *, batch: int = 4, seq: int = 2048, rank: int = 16,
        steps: int = 10, varlen_steps: int | None = None, warmup: int = WARMUP, providers: Iterable[str] | None = None,
        device="cuda", dtype: torch.dtype | None = None, layers: int | None = None,
        varlen_median: int = VARLEN["median"], varlen_max: int = VARLEN["max"], opt_in: Sequence[str] = (),
        exclude: Sequence[str] = (), lr: float = LR, seed: int = 0, checkpoint=None) -> dict:
    """Every (preset, quant, workload) with every provider; a results dict (``env``, ``settings``, ``rows``).
    ``checkpoint``: called with the results so far after every provider (the CLI writes the JSON)."""
    from .env import environment

    presets = _known(presets, PRESETS, "preset")
    quants = _known(quants, SETUPS, "quant")
    workloads = _known(workloads, WORKLOADS, "workload")
    providers = [p for p in PROVIDERS if p in _known(providers or PROVIDERS, PROVIDERS, "provider")]
    sloth_options = _sloth_options(opt_in, exclude)
    varlen_steps = varlen_steps or steps
    if min(batch, seq, rank, steps, varlen_steps, varlen_median) < 1 or warmup < 0:
        raise ValueError("batch, seq, rank, steps, varlen_steps, varlen_median must be positive and warmup >= 0")
    if not VARLEN["min"] <= varlen_median <= varlen_max:
        raise ValueError(f"need {VARLEN['min']} <= varlen_median <= varlen_max (got {varlen_median}, {varlen_max})")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = dict(flow="sft", presets=presets, quants=quants, workloads=workloads, providers=providers,
                    batch=batch, seq=seq, rank=rank, lora_alpha=rank, lora_dropout=0.0, targets=TARGETS, steps=steps,
                    varlen_steps=varlen_steps, warmup=warmup, lr=lr, layers=layers,
                    dtype=str(dtype).replace("torch.", ""), device=str(device), opt_in=list(opt_in),
                    exclude=list(exclude), sloth_checkpointing="offload",
                    varlen=dict(VARLEN, median=varlen_median, max=varlen_max),
                    tokens_per_s="real tokens of the warm steps / their summed time",
                    **{dist: _version(dist) for dist in ("trl", "datasets", "accelerate", "pyarrow")})
    results = {"env": environment(), "settings": settings, "rows": []}
    for preset in presets:
        vocab = PRESETS[preset]["vocab_size"]
        for quant in quants:
            for workload, padding in variants(workloads):
                n_steps = steps if workload == "fixed" else varlen_steps
                if workload == "fixed":
                    lengths, max_length = [seq] * (batch * n_steps), seq
                else:
                    lengths = varlen_lengths(batch * n_steps, median=varlen_median, high=varlen_max, seed=seed)
                    max_length = None if padding == "padding_free" else varlen_max
                data = make_dataset(vocab, lengths, seed + 1)
                measured: dict[str, dict] = {}
                for provider in providers:
                    measured[provider] = measure(
                        provider, preset, quant, data, device=device, dtype=dtype, batch=batch, steps=n_steps,
                        warmup=warmup, max_length=max_length, padding_free=padding == "padding_free", rank=rank,
                        lr=lr, seed=seed, layers=layers, sloth_options=sloth_options)
                    results["rows"].append(_row(model_name(preset, layers), quant, workload, padding, provider,
                                                batch=batch, seq=seq if workload == "fixed" else varlen_max,
                                                rank=rank, m=measured[provider], base=measured.get("hf_peft")))
                    if checkpoint is not None:
                        checkpoint(results)
    return results


def _version(dist: str) -> str:
    from .env import library_version

    return library_version(dist, dist)
