"""Rotary embedding of q and k: the one-launch Triton kernel against a float64 reference and HF's function."""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from sloth_core.autotune import override
from sloth_core.kernels import rope
from sloth_core.tolerances import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Memory layouts of q / k, all read through strides. "bshd": HF's view(B, S, H, D) (transposed for
# unsqueeze_dim=1); "bhsd": the other order; "padded": head rows inside a wider buffer; "strided_d": stride 2 on D.
LAYOUTS = ("bshd", "bhsd", "padded", "strided_d")
# cos / sin: "full" [B, S, D]; "batch1" [1, S, D]; "expanded" [1, S, D].expand(B, ...); "strided_d" stride 2 on D.
TABLES = ("full", "batch1", "expanded", "strided_d")


def forced_blocks(blocks: tuple[int, int] | None):
    """Override the heuristic's (BLOCK_T, BLOCK_H) so several programs share tokens and heads (None: keep it)."""
    if blocks is None:
        return contextlib.nullcontext()
    return override("rope", BLOCK_T=blocks[0], BLOCK_H=blocks[1])


def _in_layout(x_bshd: torch.Tensor, layout: str, unsqueeze_dim: int) -> torch.Tensor:
    """``x`` [B, S, H, D] stored in ``layout``, viewed as HF passes it for ``unsqueeze_dim``."""
    if layout == "bshd":
        t = x_bshd.contiguous()
    elif layout == "bhsd":
        t = x_bshd.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "padded":
        t = torch.cat([x_bshd, torch.zeros_like(x_bshd[..., :3])], dim=-1)[..., : x_bshd.shape[-1]]
    else:
        t = torch.stack([x_bshd, torch.zeros_like(x_bshd)], dim=-1)[..., 0]
    return t.transpose(1, 2) if unsqueeze_dim == 1 else t


def _table(kind: str, batch: int, seq: int, head_dim: int, dtype, gen) -> torch.Tensor:
    rows = batch if kind in ("full", "strided_d") else 1
    t = torch.randn(rows, seq, head_dim, 2, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    t = t[..., 0] if kind == "strided_d" else t[..., 0].contiguous()
    return t.expand(batch, seq, head_dim) if kind == "expanded" else t


def _forward_and_grads(fn, q, k, cos, sin, unsqueeze_dim, dq_embed, dk_embed):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_embed, k_embed = fn(q, k, cos, sin, unsqueeze_dim)
    dq, dk = torch.autograd.grad((q_embed, k_embed), (q, k), (dq_embed, dk_embed))
    return q_embed, k_embed, dq, dk


def _upstream(q_embed_like: torch.Tensor, gen) -> torch.Tensor:
    g = torch.randn(q_embed_like.shape, generator=gen, dtype=torch.float64)
    return g.to(DEVICE, q_embed_like.dtype)


geometry = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "seq": st.integers(1, 9), "n_k_heads": st.integers(1, 4),
    "group": st.integers(1, 3), "head_dim": st.integers(1, 10).map(lambda h: 2 * h)})


@given(geo=geometry, dtype=st.sampled_from(KERNEL_DTYPES), fp32_tables=st.booleans(),
       unsqueeze_dim=st.sampled_from([1, 2]), q_layout=st.sampled_from(LAYOUTS), k_layout=st.sampled_from(LAYOUTS),
       cos_kind=st.sampled_from(TABLES), sin_kind=st.sampled_from(TABLES),
       blocks=st.sampled_from([None, (2, 1), (1, 2), (4, 2)]), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_float64_reference(geo, dtype, fp32_tables, unsqueeze_dim, q_layout, k_layout,
                                          cos_kind, sin_kind, blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, seq, head_dim = geo["batch"], geo["seq"], geo["head_dim"]
    n_k_heads = geo["n_k_heads"]
    n_q_heads = n_k_heads * geo["group"]
    q_bshd, k_bshd = (torch.randn(batch, seq, h, head_dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
                      for h in (n_q_heads, n_k_heads))
    q, k = _in_layout(q_bshd, q_layout, unsqueeze_dim), _in_layout(k_bshd, k_layout, unsqueeze_dim)
    table_dtype = torch.float32 if fp32_tables else dtype
    cos = _table(cos_kind, batch, seq, head_dim, table_dtype, gen)  # independent halves: c1 != c2
    sin = _table(sin_kind, batch, seq, head_dim, table_dtype, gen)
    out_dtype = torch.promote_types(dtype, table_dtype)
    dq_embed = _upstream(torch.empty_like(q, dtype=out_dtype), gen)
    dk_embed = _upstream(torch.empty_like(k, dtype=out_dtype), gen)
    assert rope.rope_supported(q, k, cos, sin, unsqueeze_dim) is None

    with forced_blocks(blocks):
        got = _forward_and_grads(rope.apply_rope, q, k, cos, sin, unsqueeze_dim, dq_embed, dk_embed)
    expected = _forward_and_grads(rope.rope_reference, q.double(), k.double(), cos.double(), sin.double(),
                                  unsqueeze_dim, dq_embed.double(), dk_embed.double())
    for name, actual, exp, want_dtype in zip(("q_embed", "k_embed", "dq", "dk"), got, expected,
                                             (out_dtype, out_dtype, dtype, dtype)):
        assert actual.dtype == want_dtype and actual.shape == exp.shape, name
        assert_close(name, actual, exp, dtype=want_dtype)


def _llama_inputs(batch, seq, n_q_heads, n_k_heads, head_dim, dtype, gen):
    """q, k as HF's attention makes them (projection -> view -> transpose) and cos, sin from LlamaRotaryEmbedding."""
    config = LlamaConfig(hidden_size=n_q_heads * head_dim, num_attention_heads=n_q_heads,
                         num_key_value_heads=n_k_heads, head_dim=head_dim, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    q_proj, k_proj = (torch.randn(batch, seq, h * head_dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
                      for h in (n_q_heads, n_k_heads))
    q = q_proj.view(batch, seq, n_q_heads, head_dim).transpose(1, 2)
    k = k_proj.view(batch, seq, n_k_heads, head_dim).transpose(1, 2)
    positions = torch.randint(0, 64, (batch, seq), generator=gen).to(DEVICE)
    cos, sin = rotary(q_proj, positions)
    return q, k, cos, sin


@given(geo=geometry, dtype=st.sampled_from(KERNEL_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_hf_apply_rotary_pos_emb(geo, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n_q_heads = geo["n_k_heads"] * geo["group"]
    q, k, cos, sin = _llama_inputs(geo["batch"], geo["seq"], n_q_heads, geo["n_k_heads"], geo["head_dim"],
                                   dtype, gen)
    assert cos.dtype == dtype
    dq_embed, dk_embed = _upstream(q, gen), _upstream(k, gen)
    got = _forward_and_grads(rope.apply_rope, q, k, cos, sin, 1, dq_embed, dk_embed)
    assert type(got[0].grad_fn).__name__ == "_RopeFunctionBackward", "Triton path was not taken"
    expected = _forward_and_grads(apply_rotary_pos_emb, q, k, cos, sin, 1, dq_embed, dk_embed)
    for name, actual, exp in zip(("q_embed", "k_embed", "dq", "dk"), got, expected):
        assert_close(f"{name} vs HF", actual, exp, dtype=dtype)


def test_outputs_and_input_grads_keep_hf_memory_layout():
    """HF's transposed q/k views give outputs in the same (transposed) layout; ours must too, and the gradients
    reaching the projections then need no copy (the view's backward is a view)."""
    gen = torch.Generator().manual_seed(0)
    q, k, cos, sin = _llama_inputs(2, 5, 4, 2, 8, torch.float32, gen)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    ours, hf = rope.apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
    assert type(ours[0].grad_fn).__name__ == "_RopeFunctionBackward", "Triton path was not taken"
    for a, b in zip(ours, hf):
        assert a.stride() == b.stride() and a.transpose(1, 2).is_contiguous()
    dq, dk = torch.autograd.grad(ours, (q, k), (torch.ones_like(ours[0]), torch.ones_like(ours[1])))
    assert dq.stride() == ours[0].stride() and dk.stride() == ours[1].stride()
    assert dq.transpose(1, 2).is_contiguous()


def test_reference_is_hf_in_float64():
    gen = torch.Generator().manual_seed(0)
    q, k, cos, sin = _llama_inputs(2, 5, 4, 2, 6, torch.float64, gen)
    for got, exp in zip(rope.rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, exp)


def test_float64_takes_reference_path(monkeypatch):
    def no_kernel(*args):
        raise AssertionError("the Triton path was taken for float64")

    monkeypatch.setattr(rope._RopeFunction, "apply", no_kernel)
    gen = torch.Generator().manual_seed(1)
    q, k, cos, sin = _llama_inputs(2, 3, 4, 2, 8, torch.float64, gen)
    dq_embed, dk_embed = _upstream(q, gen), _upstream(k, gen)
    got = _forward_and_grads(rope.apply_rope, q, k, cos, sin, 1, dq_embed, dk_embed)
    expected = _forward_and_grads(rope.rope_reference, q, k, cos, sin, 1, dq_embed, dk_embed)
    for name, a, e in zip(("q_embed", "k_embed", "dq", "dk"), got, expected):
        assert torch.equal(a, e), name


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_cos_requiring_grad_takes_reference_path_with_right_grads(dtype):
    gen = torch.Generator().manual_seed(2)
    q, k, cos, sin = _llama_inputs(2, 4, 4, 2, 6, dtype, gen)
    cos, sin = cos.detach().requires_grad_(), sin.detach()
    assert "grad" in rope.rope_supported(q, k, cos, sin, 1)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_embed, k_embed = rope.apply_rope(q, k, cos, sin)
    dq_embed, dk_embed = _upstream(q_embed, gen), _upstream(k_embed, gen)
    grads = torch.autograd.grad((q_embed, k_embed), (q, k, cos), (dq_embed, dk_embed))

    q64, k64, cos64 = (t.detach().double().requires_grad_() for t in (q, k, cos))
    q64_embed, k64_embed = rope.rope_reference(q64, k64, cos64, sin.double())
    expected = torch.autograd.grad((q64_embed, k64_embed), (q64, k64, cos64), (dq_embed.double(), dk_embed.double()))
    assert_close("q_embed", q_embed, q64_embed, dtype=dtype)
    assert_close("k_embed", k_embed, k64_embed, dtype=dtype)
    # d cos sums over heads (and rounds in the dtype), hence the wider scale.
    for name, g, e in zip(("dq", "dk", "dcos"), grads, expected):
        assert_close(name, g, e, dtype=dtype, scale=1.0 if name != "dcos" else 4.0)


def test_unused_k_embed_gives_zero_dk():
    gen = torch.Generator().manual_seed(3)
    q, k, cos, sin = _llama_inputs(1, 3, 2, 1, 4, torch.float32, gen)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_embed, _ = rope.apply_rope(q, k, cos, sin)
    dq, dk = torch.autograd.grad(q_embed.sum(), (q, k))
    assert torch.equal(dk, torch.zeros_like(k))
    assert_close("dq", dq, torch.autograd.grad(rope.rope_reference(q, k, cos, sin)[0].sum(), q)[0])


def _unsupported_cases():
    """(name, q, k, cos, sin, unsqueeze_dim): inputs HF accepts but the Triton path leaves to the reference."""
    gen = torch.Generator().manual_seed(4)
    q, k, cos, sin = _llama_inputs(2, 3, 4, 2, 6, torch.float32, gen)
    odd_q, odd_k = torch.randn(2, 4, 3, 5, generator=gen).to(DEVICE), torch.randn(2, 2, 3, 5, generator=gen).to(DEVICE)
    odd_table = torch.randn(2, 3, 5, generator=gen).to(DEVICE)
    return [
        ("odd head_dim", odd_q, odd_k, odd_table, odd_table, 1),
        ("negative unsqueeze_dim", q, k, cos, sin, -3),
        ("cos broadcast over seq", q, k, cos[:, :1], sin[:, :1], 1),
        ("2-D cos", q[:1], k[:1], cos[0], sin[0], 0),
        ("3-D q", q[0], k[0], cos[0], sin[0], 0),
    ]


@pytest.mark.parametrize("case", range(5))
def test_unsupported_inputs_take_reference_path(case):
    name, q, k, cos, sin, unsqueeze_dim = _unsupported_cases()[case]
    assert rope.rope_supported(q, k, cos, sin, unsqueeze_dim) is not None, name
    got = rope.apply_rope(q, k, cos, sin, unsqueeze_dim)
    for a, e in zip(got, apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)):
        assert torch.equal(a, e), name


def test_wrong_shapes_raise():
    gen = torch.Generator().manual_seed(5)
    q, k, cos, sin = _llama_inputs(2, 3, 4, 2, 6, torch.float32, gen)
    with pytest.raises(ValueError, match="q of shape"):
        rope.apply_rope(q[:, :, :2], k[:, :, :2], cos, sin)  # seq 2 vs cos seq 3
    with pytest.raises(ValueError, match="k of shape"):
        rope.apply_rope(q, k[..., :4], cos, sin)  # head_dim 4 vs 6
    with pytest.raises(ValueError, match="out of range"):
        rope.apply_rope(q, k, cos, sin, unsqueeze_dim=4)
