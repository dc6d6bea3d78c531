"""``torch.compile(model)`` after ``sloth_core.optimize(model)``.

* Dynamo traces an optimized model in one graph: no graph break, and the kernels are in it as the custom ops
  ``torch.ops.sloth_core.*`` (not traced into Triton).
* The compiled model's loss and gradients equal the eager optimized model's and Hugging Face's (``aot_eager``: the
  fake implementations and the autograd formulas of the ops run; inductor needs a C++ compiler on the CPU, so it
  runs in the ``cuda`` test).
* Each op passes ``torch.library.opcheck`` (schema, fake implementation, autograd registration, AOT dispatch).
"""
import warnings

import pytest
import torch

import sloth_core
from sloth_core.kernels.cross_entropy import (cross_entropy, cross_entropy_bwd_op, cross_entropy_fwd_op,
                                              cross_entropy_reference)
from sloth_core.kernels.fused_linear_cross_entropy import (chunked_pass_op, fused_linear_cross_entropy,
                                                           fused_linear_cross_entropy_reference)
from sloth_core.kernels.gated_activation import gated_activation_bwd_op, gated_activation_fwd_op
from sloth_core.kernels.rms_norm_launch import rms_norm_bwd_op, rms_norm_fwd_op
from sloth_core.kernels.rope import rope_op
from sloth_core.tiny import tiny_model
from sloth_core.tolerances import compare
from sloth_core.warning import SlothCoreWarning
from tests.batches import token_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (architecture, LoRA): a plain model runs every kernel pattern (the gated MLP too); under LoRA the LoRA
# patterns step aside for PEFT's traced forwards, and the norms, RoPE and the fused loss keep their kernels
CASES = [("llama", False), ("llama", True), ("gemma2", True)]
OPS = {"rms_norm_fwd", "rope", "fused_linear_cross_entropy_pass"}


def _model(model_type: str, lora: bool, device, dtype=torch.float32):
    model = tiny_model(model_type, dtype=dtype, device=device)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # init_lora_weights=False: B is random too, so every adapter gradient is non-trivial
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                            init_lora_weights=False, task_type="CAUSAL_LM"))


def _step(model, ids, labels):
    """``(loss, {name: grad})`` of one forward and backward (``model`` may be a compiled wrapper)."""
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()
    return loss.detach(), {n: p.grad for n, p in params if p.requires_grad}


def _breaks(explanation) -> str:
    lines = []
    for b in explanation.break_reasons:
        lines.append(b.reason.splitlines()[0])
        lines += [f"    {f.filename}:{f.lineno} {f.name}" for f in b.user_stack[-6:]]
    return "\n".join(lines)


def _targets(gm: torch.fx.GraphModule) -> set[str]:
    """The names of the ``sloth_core`` ops called in ``gm`` and its subgraphs (an autograd function's bodies)."""
    return {str(n.target).split(".")[1] for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function" and str(n.target).startswith("sloth_core.")}


def _recording(backend: str, seen: set):
    inner = torch._dynamo.lookup_backend(backend)

    def compile_fn(gm, example_inputs):
        seen.update(_targets(gm))
        return inner(gm, example_inputs)

    return compile_fn


@pytest.mark.parametrize("model_type, lora", CASES)
def test_dynamo_traces_an_optimized_model_in_one_graph(model_type, lora, device):
    model = sloth_core.optimize(_model(model_type, lora, device))
    ids, labels = token_batch(device)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=labels)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
        f"{explanation.graph_count} graphs, {explanation.graph_break_count} breaks:\n{_breaks(explanation)}"
    called = {str(op).split(".")[1] for ops in explanation.ops_per_graph for op in ops
              if str(op).startswith("sloth_core.")}
    assert {"rms_norm_fwd", "rope"} <= called, called


@pytest.mark.parametrize("model_type, lora", CASES)
def test_compiled_loss_and_gradients_equal_eager_and_hf(model_type, lora, device):
    ref = _model(model_type, lora, device)
    eager = sloth_core.optimize(_model(model_type, lora, device))
    seen: set[str] = set()
    torch._dynamo.reset()
    compiled = torch.compile(sloth_core.optimize(_model(model_type, lora, device)),
                             backend=_recording("aot_eager", seen))
    ids, labels = token_batch(device)
    loss_c, grads_c = _step(compiled, ids, labels)
    loss_e, grads_e = _step(eager, ids, labels)
    loss_r, grads_r = _step(ref, ids, labels)
    assert OPS | ({"gated_activation_fwd"} if not lora else set()) <= seen, seen
    for name, expected in [("eager optimized", (loss_e, grads_e)), ("Hugging Face", (loss_r, grads_r))]:
        assert compare(loss_c, expected[0]) is None, f"loss vs {name}: {loss_c.item()} vs {expected[0].item()}"
        assert grads_c.keys() == expected[1].keys()
        bad = {n: why for n in grads_c if (why := compare(grads_c[n], expected[1][n])) is not None}
        assert not bad, f"gradients vs {name}: {bad}"


def test_compiled_checkpointed_model_warns_that_offloading_is_eager_only(device):
    ref = _model("llama", True, device)
    torch._dynamo.reset()
    compiled = torch.compile(sloth_core.optimize(_model("llama", True, device), gradient_checkpointing="offload"),
                             backend="aot_eager")
    ids, labels = token_batch(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_c, grads_c = _step(compiled, ids, labels)
    assert any(issubclass(w.category, SlothCoreWarning) and "under torch.compile" in str(w.message) for w in caught)
    loss_r, grads_r = _step(ref, ids, labels)
    assert compare(loss_c, loss_r) is None, (loss_c.item(), loss_r.item())
    bad = {n: why for n in grads_c if (why := compare(grads_c[n], grads_r[n])) is not None}
    assert not bad, bad


# ------------------------------------------------------------------------------------------------ opcheck
def _op_cases(device):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    x, w = randn(3, 5, 16, grad=True), randn(16, grad=True)
    out, rstd = rms_norm_fwd_op(x.detach(), w.detach(), 1e-6, 0.0, False)
    yield rms_norm_fwd_op, (x, w, 1e-6, 1.0, True)
    yield rms_norm_fwd_op, (x[:, 1:].transpose(0, 1), w, 1e-6, 0.0, False)  # a strided view
    yield rms_norm_bwd_op, (randn(3, 5, 16), x.detach(), w.detach(), rstd, 0.0, False, True, True)
    yield rms_norm_bwd_op, (randn(3, 5, 16), x.detach(), w.detach(), rstd, 0.0, False, True, False)
    q = randn(2, 6, 4, 8).transpose(1, 2).requires_grad_(True)  # HF's [B, H, S, D] view of [B, S, H, D]
    k = randn(2, 6, 2, 8).transpose(1, 2).requires_grad_(True)
    cos, sin = randn(1, 6, 8), randn(1, 6, 8)
    yield rope_op, (q, k, cos, sin, 1, torch.float32, torch.float32, False)
    yield rope_op, (q, k, cos, sin, 1, torch.float32, torch.float32, True)
    gate, up = randn(4, 24, grad=True), randn(4, 24, grad=True)
    yield gated_activation_fwd_op, (gate, up, "silu")
    yield gated_activation_fwd_op, (gate, up, "gelu_tanh")
    yield gated_activation_bwd_op, (randn(4, 24), gate.detach(), up.detach(), "silu")
    hidden, weight, bias = randn(7, 16), randn(40, 16), randn(40)
    labels = torch.tensor([3, -100, 0, 39, 7, 7, -100], device=device)
    row_weight = torch.full((1,), 0.2, device=device)
    yield chunked_pass_op, (hidden, weight, bias, labels, -100, 30.0, None, row_weight, True, True, True)
    yield chunked_pass_op, (hidden, weight, None, labels, -100, None, 0.5, None, False, False, False)
    logits = randn(7, 40, grad=True)
    loss_rows, stats = cross_entropy_fwd_op(logits.detach(), labels, -100, None, None)
    yield cross_entropy_fwd_op, (logits, labels, -100, 30.0, 2.0)
    yield cross_entropy_bwd_op, (logits.detach(), labels, stats, randn(7), -100, None, None)


def test_custom_ops_pass_opcheck(device):
    for op, args in _op_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compiled_losses_and_gradients_equal_the_references(reduction, device):
    """The stand-alone losses under compile, every reduction, soft-capping, ignored labels, a trainable head with
    a bias (the model tests cover ``mean`` through the causal-LM loss)."""
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*s, generator=g).to(device) for s in ((9, 16), (40, 16), (40,)))
    labels = torch.randint(0, 40, (9,), generator=g).to(device)
    labels[2] = -100

    def losses(fce, ce, hidden, weight, bias):
        a = fce(hidden, weight, labels, bias, softcap=30.0, reduction=reduction)
        b = ce(hidden @ weight.t(), labels, softcap=30.0, reduction=reduction)
        return (a.sum() + 2 * b.sum()) if reduction != "none" else (a * labels.float().cos()).sum() + b.sum()

    def grads(fn, *args):
        leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
        out = fn(*args, *leaves)
        out.backward()
        return [out.detach()] + [t.grad for t in leaves]

    torch._dynamo.reset()
    compiled = torch.compile(losses, backend="aot_eager", fullgraph=True)
    got = grads(compiled, fused_linear_cross_entropy, cross_entropy)
    want = grads(losses, fused_linear_cross_entropy_reference, cross_entropy_reference)
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, want):
        assert compare(a, b) is None, f"{name}: {compare(a, b)}"


def test_pass_op_refuses_labels_outside_the_vocabulary(device):
    hidden, weight = torch.randn(2, 8, device=device), torch.randn(5, 8, device=device)
    with pytest.raises(ValueError, match="labels: values must lie in"):
        chunked_pass_op(hidden, weight, None, torch.tensor([1, 5], device=device), -100, None, None, None,
                        False, False, False)


# ------------------------------------------------------------------------------------------------ GPU: inductor
@pytest.mark.cuda
@pytest.mark.parametrize("lora", [False, True])
def test_inductor_compiled_bf16_model_matches_eager_on_the_gpu(lora):
    device = torch.device("cuda")
    model = sloth_core.optimize(_model("llama", lora, device, torch.bfloat16))
    ids, labels = token_batch(device)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=labels)
    assert explanation.graph_break_count == 0, _breaks(explanation)
    eager = sloth_core.optimize(_model("llama", lora, device, torch.bfloat16))
    seen: set[str] = set()
    torch._dynamo.reset()
    compiled = torch.compile(sloth_core.optimize(_model("llama", lora, device, torch.bfloat16)),
                             backend=_recording("inductor", seen))
    for _ in range(2):  # the second call runs the compiled graph without tracing
        for m in (compiled, eager):
            getattr(m, "_orig_mod", m).zero_grad(set_to_none=True)
        loss_c, grads_c = _step(compiled, ids, labels)
        loss_e, grads_e = _step(eager, ids, labels)
        assert OPS <= seen, seen
        # bf16 bounds: inductor fuses the code around the kernels its own way, and under LoRA the compiled model
        # runs PEFT's forwards (fp32 adapter products) where the eager one runs the fused bf16 LoRA functions
        assert compare(loss_c, loss_e, torch.bfloat16) is None, (loss_c.item(), loss_e.item())
        bad = {n: why for n in grads_c if (why := compare(grads_c[n], grads_e[n], torch.bfloat16, 2.0)) is not None}
        assert not bad, bad


def test_a_model_optimized_in_eval_mode_compiles_for_training_in_one_graph_and_says_lora_is_peft(device):
    """``from_pretrained`` returns eval mode: the first training-mode call is a setting the LoRA patterns' guard has
    not seen. Under compile they step aside (nothing to verify), so the trace has no break, and one warning says
    the graph computes PEFT's LoRA forwards."""
    model = _model("llama", True, device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sloth_core.optimize(model)
    model.train()
    ids, labels = token_batch(device)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        explanation = torch._dynamo.explain(model)(input_ids=ids, labels=labels)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), _breaks(explanation)
    assert any("LoRA patterns" in str(w.message) and "PEFT's forwards" in str(w.message) for w in seen)
