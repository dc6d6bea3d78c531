"""An optimized model trains under TRL's ``SFTTrainer`` and the HF ``Trainer`` with their default configs, on both
ends of the supported range (CI's constraint sets): the steps run, the losses are finite, the kernels run inside
the trainer's steps (counted at the RoPE kernel's entry), and the checkpointing the trainer switches on is
sloth_core's (:mod:`sloth_core.checkpointing_takeover`). TRL's fused LM head still bypasses the fused loss."""
import pytest
import torch
from packaging.version import Version

import sloth_core
from sloth_core import checkpointing as ck
from sloth_core.registry.patterns import rope as rope_pattern
from sloth_core.tiny import tiny_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _tokenizer(vocab_size):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def _optimized_lora_model(monkeypatch):
    """A LoRA-wrapped optimized tiny Llama, and the list the RoPE kernel appends to on each call."""
    from peft import LoraConfig, get_peft_model

    calls = []
    monkeypatch.setattr(rope_pattern, "apply_rope", lambda *a: calls.append(1) or rope_pattern.rope_reference(*a))
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    sloth_core.optimize(model)
    assert not sloth_core.missing_patterns(model)
    return model, calls


def _rows(n=8, s=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 128, (s,), generator=g).tolist() for _ in range(n)]


def _assert_trained(trainer, out, calls):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(float(x))) for x in losses), losses
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert calls, "the RoPE kernel never ran inside the trainer's steps"


def _assert_our_checkpointing_served_hf(model):
    """The trainer switched HF's checkpointing on: sloth_core's ran instead ("offload", optimize got no mode)."""
    assert ck.checkpointing_stats().checkpointed_calls > 0
    rows = [r for r in sloth_core.report(model) if r.pattern == "checkpointing"]
    assert rows and all(r.detail.startswith("mode=offload, serving Hugging Face's") for r in rows), rows


@pytest.mark.skipif(Version(trl.__version__) < Version("1.16") and torch.cuda.device_count() == 0,
                    reason="TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors, which fails under "
                           "Triton's interpreter on triton 3.6 (TRL's kernel, not sloth_core's)")
@pytest.mark.filterwarnings("ignore")
def test_sft_trainer_default_config_runs_the_kernels(tmp_path, monkeypatch):
    model, calls = _optimized_lora_model(monkeypatch)
    data = datasets.Dataset.from_dict({"input_ids": _rows()})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                         logging_steps=1, save_strategy="no", use_cpu=True)
    assert args.gradient_checkpointing  # TRL's default
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(128))
    ck.reset_checkpointing_stats()
    _assert_trained(trainer, trainer.train(), calls)
    _assert_our_checkpointing_served_hf(model)


@pytest.mark.filterwarnings("ignore")
def test_hf_trainer_default_config_runs_the_kernels(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    model, calls = _optimized_lora_model(monkeypatch)
    rows = _rows()
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, gradient_checkpointing=True)
    seen = []

    def metrics(pred):  # evaluate with compute_metrics gets the logits (gradients are off there)
        seen.append(pred.predictions.shape)
        return {"n": float(pred.predictions.shape[0])}

    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=metrics)
    ck.reset_checkpointing_stats()
    _assert_trained(trainer, trainer.train(), calls)
    _assert_our_checkpointing_served_hf(model)
    result = trainer.evaluate()
    assert seen == [(8, 12, 128)] and result["eval_n"] == 8.0 and torch.isfinite(torch.tensor(result["eval_loss"]))


@pytest.mark.skipif(Version(trl.__version__) < Version("1.16") and torch.cuda.device_count() == 0,
                    reason="TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors (see above)")
@pytest.mark.filterwarnings("ignore")
def test_optimize_after_the_sft_trainer_is_built_leaves_its_fused_head(tmp_path, monkeypatch):
    """TRL replaces the model's forward with its fused LM head; optimize(trainer.model) afterwards leaves that
    forward to TRL (and says so) instead of replacing it: training runs, the other kernels too."""
    from peft import LoraConfig, get_peft_model

    calls = []
    monkeypatch.setattr(rope_pattern, "apply_rope", lambda *a: calls.append(1) or rope_pattern.rope_reference(*a))
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    data = datasets.Dataset.from_dict({"input_ids": _rows()})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                         logging_steps=1, save_strategy="no", use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(128))
    with pytest.warns(sloth_core.SlothCoreWarning, match="causal_lm_loss: not applied to <root>: its forward was "
                                                         "replaced on this instance by "
                                                         r"add_fused_lm_head.<locals>._fused_forward \(trl/"):
        sloth_core.optimize(trainer.model)
    ck.reset_checkpointing_stats()
    _assert_trained(trainer, trainer.train(), calls)
    _assert_our_checkpointing_served_hf(trainer.model)


@pytest.mark.skipif(Version(trl.__version__) < Version("1.16") and torch.cuda.device_count() == 0,
                    reason="TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors (see above)")
@pytest.mark.filterwarnings("ignore")
def test_the_report_says_when_the_sft_trainer_overrides_the_fused_loss(tmp_path, monkeypatch):
    """optimize before the trainer: TRL then wraps the forward the fused loss set with its fused LM head, and the
    report says so instead of "replaced"."""
    model, _ = _optimized_lora_model(monkeypatch)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": _rows()}),
                   processing_class=_tokenizer(128))
    [row] = [r for r in sloth_core.report(model) if r.pattern == "causal_lm_loss"]
    assert row.status == "overridden" and "_fused_forward (trl/" in row.detail, row


@pytest.mark.skipif(Version(trl.__version__) < Version("1.16") and torch.cuda.device_count() == 0,
                    reason="TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors (see above)")
@pytest.mark.filterwarnings("ignore")
def test_optimize_before_sft_trainer_with_peft_config_gets_the_lora_kernels(tmp_path, monkeypatch):
    """optimize on the bare model, then SFTTrainer(peft_config=...) adds the adapters: they are bound when the
    trainer switches checkpointing on, before the first step."""
    from peft import LoraConfig

    model = sloth_core.optimize(tiny_model("llama"))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                         logging_steps=1, save_strategy="no", use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": _rows()}),
                             processing_class=_tokenizer(128),
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    calls = []
    monkeypatch.setattr(rope_pattern, "apply_rope", lambda *a: calls.append(1) or rope_pattern.rope_reference(*a))
    ck.reset_checkpointing_stats()
    _assert_trained(trainer, trainer.train(), calls)
    statuses = {(r.pattern, r.status) for r in sloth_core.report(trainer.model)}
    assert {("lora_linear", "replaced"), ("lora_mlp", "replaced")} <= statuses
    _assert_our_checkpointing_served_hf(trainer.model)
