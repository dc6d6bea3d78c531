"""Bad and unusual inputs (issue 20, item 5): one test per row of the README's bad-input table. An optimized model
answers each of them as the unoptimized model does -- the same numbers, the same NaN / inf, or an error -- and a
refusal of its own names the input and what is allowed."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import sloth_core
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(model_type="llama", dtype=torch.float32, **overrides):
    """``(reference, optimized copy)`` of one tiny model."""
    ref = tiny_model(model_type, dtype=dtype, device=DEVICE, **overrides)
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sloth_core.SlothCoreWarning)
        sloth_core.optimize(model)
    return ref, model


def _ids(b=2, s=7, vocab=128, seed=0):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _outcome(model, **inputs):
    """``("ok", logits, loss, grads)`` or ``("error", type)``."""
    model.zero_grad(set_to_none=True)
    try:
        out = model(**inputs)
        if out.loss is not None and out.loss.requires_grad:
            out.loss.backward()
        logits = out.logits
        if logits is None:
            with torch.no_grad():
                logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    except Exception as exc:  # noqa: BLE001 - compared with the reference's outcome
        return ("error", type(exc))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return ("ok", logits.detach(), None if out.loss is None else out.loss.detach(), grads)


def _assert_same(got, want, dtype=torch.float32):
    assert got[0] == want[0], (got, want)
    if got[0] == "error":
        return
    for name, g, w in (("logits", got[1], want[1]), ("loss", got[2], want[2]),
                       *((f"grad {n}", got[3].get(n), w_) for n, w_ in want[3].items())):
        if w is None:
            assert g is None, name
            continue
        assert g is not None, name
        nan, inf = torch.isnan(w), torch.isinf(w)
        assert torch.equal(torch.isnan(g), nan), f"{name}: NaN not where the reference has it"
        assert torch.equal(torch.isinf(g), inf) and torch.equal(g[inf], w[inf]), f"{name}: inf differs"
        finite = ~(nan | inf)
        if finite.any():
            assert_close(name, g[finite], w[finite], dtype, scale=8)


def test_non_contiguous_and_transposed_inputs():
    ref, model = _pair()
    ids = _ids(7, 2).t()  # a transposed view: [2, 7], not contiguous
    assert not ids.is_contiguous()
    _assert_same(_outcome(model, input_ids=ids, labels=ids), _outcome(ref, input_ids=ids, labels=ids))
    x = torch.randn(7, 2, 64, device=DEVICE).transpose(0, 1)  # hidden states in a transposed layout
    norm_ref, norm = ref.model.norm, model.model.norm
    assert_close("transposed norm input", norm(x), norm_ref(x))


def test_empty_batch():
    ref, model = _pair()
    ids = _ids(0, 5)
    want = _outcome(ref, input_ids=ids, labels=ids)
    assert want[0] == "error"  # transformers refuses a batch of 0 sequences (its attention reshape)
    _assert_same(_outcome(model, input_ids=ids, labels=ids), want)


def test_one_token():
    """One token with labels: nothing left after the shift, the loss is NaN in both (0 / 0)."""
    ref, model = _pair()
    ids = _ids(1, 1)
    _assert_same(_outcome(model, input_ids=ids, labels=ids), _outcome(ref, input_ids=ids, labels=ids))


def test_sequences_past_max_position_embeddings():
    ref, model = _pair(max_position_embeddings=8)
    ids = _ids(2, 13)
    _assert_same(_outcome(model, input_ids=ids, labels=ids), _outcome(ref, input_ids=ids, labels=ids))


def test_fp16_overflow_ranges():
    """float16 hidden states near the top of its range: the norms' statistics overflow in float16 but not in the
    float32 HF (and the kernel) compute them in."""
    ref, model = _pair(dtype=torch.float16)
    x = torch.full((2, 5, 64), 6.0e4, dtype=torch.float16, device=DEVICE)
    x[0, :, ::2] = -6.5e4
    want = ref.model.norm(x)
    assert torch.isfinite(want).all()
    assert_close("fp16 norm near overflow", model.model.norm(x), want, torch.float16)
    ids = _ids()
    with torch.no_grad():  # and embeddings scaled to overflow the model's activations: inf / NaN as HF's
        for m in (ref, model):
            m.model.embed_tokens.weight.mul_(3000.0)
    _assert_same(_outcome(model, input_ids=ids, labels=ids), _outcome(ref, input_ids=ids, labels=ids),
                 torch.float16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_as_in_the_reference(bad):
    ref, model = _pair()
    ids = _ids()
    with torch.no_grad():
        for m in (ref, model):
            m.model.embed_tokens.weight[int(ids[0, 3])] = bad  # one token's embedding
    _assert_same(_outcome(model, input_ids=ids, labels=ids), _outcome(ref, input_ids=ids, labels=ids))


def test_all_labels_ignored():
    ref, model = _pair()
    ids = _ids()
    labels = torch.full_like(ids, -100)
    _assert_same(_outcome(model, input_ids=ids, labels=labels), _outcome(ref, input_ids=ids, labels=labels))


@pytest.mark.parametrize("bad_label", [128, 5000, -5])
def test_out_of_range_labels_are_refused_naming_the_input(bad_label):
    ref, model = _pair()
    ids = _ids()
    labels = ids.clone()
    labels[1, 4] = bad_label
    if DEVICE == "cpu":  # on a GPU, HF's cross-entropy fails a device-side assert, which ends the CUDA context
        with pytest.raises(IndexError):  # HF's cross-entropy
            ref(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match=r"labels: values must lie in \[0, 128\) or equal ignore_index=-100"):
        model(input_ids=ids, labels=labels)


def test_kernels_offsets_are_64_bit():
    """Offsets past 2**31 elements (a 16k-token batch of 128k-vocabulary logits is 2.1e9): every kernel that
    scales a program or row index by a stride or a row length does it in int64. Checked on the kernels' source:
    a tensor of 2**31 elements does not fit the CPU test machines, and Triton's interpreter copies whole storages,
    so a strided view of a small storage cannot stand in for one."""
    import inspect

    from sloth_core.kernels import (cross_entropy_kernels, dequant, gated_activation, linear_log_probs, nf4_gemv,
                                    rms_norm_kernels, rope)

    modules = (cross_entropy_kernels, dequant, gated_activation, linear_log_probs, nf4_gemv, rms_norm_kernels, rope)
    kernels = {name: inspect.getsource(obj.fn) for mod in modules for name, obj in vars(mod).items()
               if inspect.isfunction(getattr(obj, "fn", None)) and obj.fn.__module__ == mod.__name__
               and "tl.program_id" in inspect.getsource(obj.fn)}
    assert len(kernels) >= 7, sorted(kernels)  # under the interpreter too (InterpretedFunction keeps ``fn``)
    for name, source in kernels.items():
        assert "tl.int64" in source, f"{name}: offsets in int32"
    # dequant switches to int64 offsets by size (a constexpr): past 2**31 outputs
    from types import SimpleNamespace

    state = SimpleNamespace(blocksize=64, quant_type="nf4", nested=False, dtype=torch.bfloat16)
    _, small = dequant._launch_config(state, 2**20, torch.bfloat16, 0)
    _, large = dequant._launch_config(state, 2**31 + 2**20, torch.bfloat16, 0)
    assert small["INT64"] is False and large["INT64"] is True


def test_device_map_split_across_cpu_and_disk(tmp_path):
    """A model dispatched by a ``device_map`` (accelerate's hooks on its modules): one decoder layer offloaded to
    disk (its weights on the meta device until its hook loads them), the rest on the CPU (on the GPU machine: GPU 0). The offloaded layer's
    modules are skipped (their weights are not there to verify), the others replaced; the numbers are HF's. A split
    across several GPUs needs the GPU machine (the same call with ``device_map="auto"``)."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    on = 0 if DEVICE == "cuda" else "cpu"
    device_map = {"model.embed_tokens": on, "model.layers.0": on, "model.layers.1": "disk", "model.norm": on,
                  "model.rotary_emb": on, "lm_head": on}

    def load():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map, dtype=torch.float32,
                                                     offload_folder=tmp_path / "offload")
        model.config._attn_implementation = "eager"
        return model

    ref, model = load(), load()
    assert ref.hf_device_map["model.layers.1"] == "disk"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sloth_core.SlothCoreWarning)
        sloth_core.optimize(model)
    rows = sloth_core.report(model)
    assert {r.status for r in rows} == {"replaced", "skipped"}
    assert all(r.status == "skipped" for r in rows if r.module.startswith("model.layers.1."))
    ids = _ids()
    _assert_same(_outcome(model, input_ids=ids, labels=ids), _outcome(ref, input_ids=ids, labels=ids))


def _adamw_steps(model, opt, steps, seed):
    losses = []
    for i in range(steps):
        ids = _ids(seed=seed + i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def test_optimize_mid_training_keeps_the_optimizer_state():
    ref = tiny_model("llama", device=DEVICE)
    model = copy.deepcopy(ref)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, model)]
    for m, opt in zip((ref, model), opts):
        _adamw_steps(m, opt, 2, seed=10)
    params_before = [id(p) for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sloth_core.SlothCoreWarning)
        sloth_core.optimize(model)
    assert [id(p) for p in model.parameters()] == params_before  # the optimizer's parameters are the model's
    assert all(opts[1].state[p]["step"] == 2 for p in model.parameters())
    want, got = _adamw_steps(ref, opts[0], 2, seed=20), _adamw_steps(model, opts[1], 2, seed=20)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"loss after optimize, step {i}", g, w, torch.float32, scale=4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(name, p, q, torch.float32, scale=8)


def test_optimize_restore_optimize():
    ref, model = _pair()
    ids = _ids()
    want = _outcome(ref, input_ids=ids, labels=ids)
    for _ in range(2):
        _assert_same(_outcome(model, input_ids=ids, labels=ids), want)
        sloth_core.restore(model)
        assert not sloth_core.is_optimized(model)
        got = _outcome(model, input_ids=ids, labels=ids)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # bit-identical once restored
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sloth_core.SlothCoreWarning)
            sloth_core.optimize(model)
        assert sloth_core.is_optimized(model)


@pytest.mark.parametrize("argv, message", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["demo", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["tune", "--model", "no-such-model", "--seq", "128"], "no-such-model"),
    (["bench", "compare", "/nonexistent/a.json", "/nonexistent/b.json"], "/nonexistent/a.json"),
])
def test_cli_errors_are_one_line_with_exit_status_2(argv, message, capsys):
    from sloth_core.__main__ import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and message in lines[0], err
