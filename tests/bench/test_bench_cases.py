"""The benchmark cases (:mod:`sloth_core.bench.cases`): the model flavours, the registry and the work models
(bytes and FLOP a call, checked by hand). The cases run end to end in ``test_bench_kernels.py``."""
import pytest

from sloth_core.autotune.presets import PRESETS, ModelShape
from sloth_core.bench import cases as C
from sloth_core.bench import cases_base as CB
from sloth_core.bench import cases_work as CW
from sloth_core.bench import args as cli_args

TINY = ModelShape("tiny", 64, 128, 4, 2, 16, 256)  # hidden a multiple of 64: bitsandbytes' CPU path needs it
GEMMA = ModelShape("gemma-2-tiny", 64, 128, 4, 2, 16, 256, activation="gelu_tanh")


def test_gemma_flavour():
    gemma, llama = CB.bench_model(GEMMA), CB.bench_model(TINY)
    assert (gemma.norm, gemma.softcap, gemma.hf_act) == ("gemma", 30.0, "gelu_pytorch_tanh")
    assert (llama.norm, llama.softcap, llama.hf_act) == ("llama", None, "silu")
    assert CB.bench_model(PRESETS["gemma-2-9b"]).softcap == 30.0
    assert CB.bench_model(gemma) is gemma


def test_registry_has_every_kernel():
    assert set(C.CASES) == {*cli_args.KERNELS, "lora_nf4"}
    assert all(case.name == name for name, case in C.CASES.items())
    assert C.CASES["dequant"].token_free and C.CASES["dequant"].modes == ("fwd",)


# ---------------------------------------------------------------------------------------------- work models
# Known shape: Llama-3-8B (hidden 4096, intermediate 14336, 32/8 heads x 128, vocab 128256) at 8192 tokens.


def test_bytes_models_by_hand():
    assert CW.rms_norm_bytes(8192, 4096, "fwd") == 134_225_920  # (2*8192*4096 + 4096) * 2
    assert CW.rms_norm_bytes(8192, 4096, "fwd_bwd") == 335_560_704  # (5*8192*4096 + 2*4096) * 2
    assert CW.gated_activation_bytes(8192, 14336, "fwd") == 704_643_072  # 3*8192*14336 * 2
    assert CW.gated_activation_bytes(8192, 14336, "fwd_bwd") == 1_879_048_192  # 8*8192*14336 * 2
    assert CW.rope_bytes(8192, 32, 8, 128, "fwd") == 168_820_736  # 2*8192*40*128*2 + 2*2048*128*2
    assert CW.rope_bytes(8192, 32, 8, 128, "fwd_bwd") == 337_641_472
    assert CW.rope_bytes(100, 32, 8, 128, "fwd") == 2_099_200  # one sequence of 100: 2*100*40*128*2 + 2*100*128*2
    assert CW.cross_entropy_bytes(8192, 128256, "fwd") == 2_101_411_840  # 8192*128256*2 + 8*8192
    assert CW.cross_entropy_bytes(8192, 128256, "fwd_bwd") == 4_202_758_144  # 2*8192*128256*2 + 8*8192
    # 14336 x 4096 NF4: 29360128 code bytes + 917504 absmax codes + 4*3584 second-level scales + 2n output
    assert CW.dequant_bytes(14336 * 4096) == 147_732_480


def test_flop_models_by_hand():
    assert CW.linear_ce_flops(8192, 128256, 4096, "fwd") == 8_607_114_461_184  # 2*8192*128256*4096
    assert CW.linear_ce_flops(8192, 128256, 4096, "fwd_bwd") == 17_214_228_922_368
    # 6*8192*4096*14336 = 2_886_218_022_912 and 6*8192*16*(4096 + 14336) = 14_495_514_624
    assert CW.lora_mlp_flops(8192, 4096, 14336, 16, "fwd") == 2_900_713_537_536
    # 12*8192*4096*14336 = 5_772_436_045_824 and 18*8192*16*(4096 + 14336) = 43_486_543_872
    assert CW.lora_mlp_flops(8192, 4096, 14336, 16, "fwd_bwd") == 5_815_922_589_696


def test_cases_use_the_models():
    llama = CB.bench_model(PRESETS["llama-3-8b"])
    assert C.CASES["rms_norm"].work(llama, 8192, "fwd") == CW.Work("gbps", 134_225_920)
    assert C.CASES["fused_linear_cross_entropy"].work(llama, 8192, "fwd").amount == 8_607_114_461_184
    assert C.CASES["lora_nf4"].work(llama, 8192, "fwd_bwd") == C.CASES["lora"].work(llama, 8192, "fwd_bwd")
    assert CW.Work("gbps", 2e9).rate(1.0) == pytest.approx(2000.0)  # 2 GB in 1 ms
    assert CW.Work("tflops", 1e12).rate(2.0) == pytest.approx(500.0)  # 1 TFLOP in 2 ms
