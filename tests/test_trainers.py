"""An optimized model trains under TRL's ``SFTTrainer`` and the HF ``Trainer`` with their default configs, on both
ends of the supported range (CI's constraint sets): the steps run, the losses are finite, the kernels run inside
the trainer's steps (counted at the RoPE kernel's entry), the checkpointing the trainer switches on is
sloth_core's (:mod:`sloth_core.checkpointing_takeover`), and TRL's fused LM head is served by our kernel
(``trl_fused_lm_head``) wherever the ``optimize`` line is, with the plain script's losses."""
import warnings

import pytest
import torch
from packaging.version import Version

import sloth_core
from sloth_core import checkpointing as ck
from sloth_core.registry.patterns import rope as rope_pattern
from sloth_core.tiny import tiny_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
CPU = not torch.cuda.is_available()  # the trainers train where the kernels run: the GPU, else the interpreter
DEVICE = "cpu" if CPU else "cuda"


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
    model = get_peft_model(tiny_model("llama", device=DEVICE),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
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
                         logging_steps=1, save_strategy="no", use_cpu=CPU)
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
                             logging_steps=1, save_strategy="no", use_cpu=CPU, gradient_checkpointing=True)
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


def _count_head_kernel(monkeypatch):
    from sloth_core.registry.patterns import trl_lm_head

    calls = []
    real = trl_lm_head.linear_log_probs
    monkeypatch.setattr(trl_lm_head, "linear_log_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _sft_losses(tmp_path, monkeypatch, where):
    """Two SFTTrainer steps (default config) on a LoRA tiny Llama, ``optimize`` ``where`` ("before" the trainer,
    "after" it, or None: the plain script); the logged losses, the model, the head kernel's calls in training."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", device=DEVICE),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    if where == "before":
        sloth_core.optimize(model)
    args = trl.SFTConfig(output_dir=str(tmp_path / str(where)), max_steps=2, per_device_train_batch_size=2,
                         report_to=[], logging_steps=1, save_strategy="no", use_cpu=CPU)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": _rows()}),
                             processing_class=_tokenizer(128))
    if where == "after":
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            sloth_core.optimize(trainer.model)
        assert not [w for w in seen if "not applied" in str(w.message)], [str(w.message) for w in seen]
    calls = _count_head_kernel(monkeypatch)
    ck.reset_checkpointing_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [(h["loss"], h["entropy"], h["mean_token_accuracy"]) for h in logs], trainer.model, calls


@pytest.mark.skipif(Version(trl.__version__) < Version("1.16") and torch.cuda.device_count() == 0,
                    reason="TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors (see above)")
@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.filterwarnings("ignore")
def test_sft_trainers_fused_head_runs_our_kernel_with_the_plain_scripts_losses(where, tmp_path, monkeypatch):
    """optimize before the trainer (TRL then wraps the forward; the head is bound when the trainer switches
    checkpointing on) or on ``trainer.model`` after it: TRL's fused LM head runs our kernel in the steps, the loss,
    entropy and token accuracy logged are the plain script's, the checkpointing is ours."""
    plain, _, _ = _sft_losses(tmp_path, monkeypatch, None)
    got, model, calls = _sft_losses(tmp_path, monkeypatch, where)
    assert len(calls) >= 2, "the head kernel did not run in the trainer's steps"
    assert len(got) == len(plain) == 2
    rel = 1e-4 if CPU else 2e-2  # on a GPU the trainer computes under bf16 autocast (SFTConfig's default)
    for (loss, ent, acc), (loss0, ent0, acc0) in zip(got, plain):
        assert loss == pytest.approx(loss0, rel=rel) and ent == pytest.approx(ent0, rel=rel)
        assert acc == acc0 or not CPU
    rows = {r.pattern: r.status for r in sloth_core.report(model) if r.module == ""}
    assert rows["trl_fused_lm_head"] == "replaced", rows
    _assert_our_checkpointing_served_hf(model)


@pytest.mark.skipif(Version(trl.__version__) < Version("1.16") and torch.cuda.device_count() == 0,
                    reason="TRL < 1.16 runs its own chunked log-prob Triton kernel on CPU tensors (see above)")
@pytest.mark.filterwarnings("ignore")
def test_optimize_before_sft_trainer_with_peft_config_gets_the_lora_kernels(tmp_path, monkeypatch):
    """optimize on the bare model, then SFTTrainer(peft_config=...) adds the adapters: they are bound when the
    trainer switches checkpointing on, before the first step."""
    from peft import LoraConfig

    model = sloth_core.optimize(tiny_model("llama", device=DEVICE))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                         logging_steps=1, save_strategy="no", use_cpu=CPU)
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
