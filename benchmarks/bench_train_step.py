"""End-to-end LoRA training steps: HF + PEFT vs sloth_core on the same random model, in one run.

The model is built once (random weights, real shapes from a config); the baseline runs first, then the same model
is optimized and run again from the same LoRA initialization, then restored. Prints a table and writes JSON with the
per-step losses, tokens/s (median of warm steps) and peak memory.

    python benchmarks/bench_train_step.py --preset llama-3-8b --batch 4 --seq 2048 --steps 12
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

PRESETS = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       rms_norm_eps=1e-5, max_position_embeddings=8192),
    "tiny-llama": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(preset: str, layers: int | None, quant: str = "none"):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(PRESETS[preset])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    if quant == "nf4":
        quantize_nf4(model)
    return model


def quantize_nf4(model, device="cuda") -> None:
    """Replace the decoder's projections by bitsandbytes NF4 double-quant ``Linear4bit`` layers (bf16 compute), as
    ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True))`` would, without a save/load round trip of a random checkpoint."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                lin = getattr(parent, name, None)
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")._quantize(device)
                setattr(parent, name, q)
                del lin
    model.is_loaded_in_4bit = True  # as from_pretrained sets it: PEFT then wraps the layers with its bnb LoRA class
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_steps(model, ids, steps: int, lr: float = 1e-4):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(out.loss.item())
    warm = sorted(times[min(4, steps - 1):])
    return {"step_s_median": warm[len(warm) // 2], "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "losses": losses, "times": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--quant", choices=("none", "nf4"), default="none", help="nf4: QLoRA on a bitsandbytes NF4 base")
    ap.add_argument("--sloth-checkpointing", choices=("hf", "on", "offload"), default="hf",
                    help="checkpointing in the sloth_core run: HF's (as the baseline), or optimize()'s on/offload")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_step: needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    from peft import LoraConfig, get_peft_model
    from tabulate import tabulate

    import sloth_core
    from sloth_core.bench.env import environment

    model = build(args.preset, args.layers, args.quant)
    model.train()
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).cuda()

    results = {}
    results["hf_peft"] = run_steps(model, ids, args.steps)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in lora0:
                p.copy_(lora0[n])
    t = time.perf_counter()
    options = {} if args.sloth_checkpointing == "hf" else {"gradient_checkpointing": args.sloth_checkpointing}
    sloth_core.optimize(model, **options)
    opt_s = time.perf_counter() - t
    replaced = sum(r.status == "replaced" for r in sloth_core.report(model))
    skipped = [r for r in sloth_core.report(model) if r.status == "skipped"]
    results["sloth_core"] = run_steps(model, ids, args.steps)
    results["sloth_core"]["optimize_s"] = opt_s
    sloth_core.restore(model)

    tokens = args.batch * args.seq
    base = results["hf_peft"]
    rows = []
    for name, r in results.items():
        r["tokens_per_s"] = tokens / r["step_s_median"]
        rows.append((name, f"{r['tokens_per_s']:.0f}", f"{base['step_s_median'] / r['step_s_median']:.2f}x",
                     f"{r['peak_GiB']:.2f}", f"{r['peak_GiB'] / base['peak_GiB']:.2f}x",
                     " ".join(f"{x:.4f}" for x in r["losses"][:3])))
    pairs = list(zip(base["losses"], results["sloth_core"]["losses"]))
    d_loss = max(abs(a - b) / abs(a) for a, b in pairs)
    d_first = abs(pairs[0][0] - pairs[0][1]) / abs(pairs[0][0])
    env = environment()
    print(f"\n{args.preset} ({args.layers or 'all'} layers), {'QLoRA nf4' if args.quant == 'nf4' else 'bf16 LoRA'} r={args.rank} on {','.join(TARGETS)}, batch "
          f"{args.batch} x {args.seq}, checkpointing {'off' if args.no_checkpointing else 'on'}; {env['gpu']}")
    print(f"optimize(): {replaced} modules replaced, {len(skipped)} skipped, {opt_s:.2f} s")
    for r in skipped[:10]:
        print(f"  skipped {r.module} {r.pattern}: {r.detail}")
    print(tabulate(rows, headers=("setup", "tokens/s", "speedup", "peak GiB", "memory", "first losses"),
                   tablefmt="github"))
    print(f"step-1 loss (same weights) relative difference: {d_first:.2e}; max over {args.steps} steps: {d_loss:.2e}")
    out = args.out or os.path.join("benchmarks", "results",
                                   f"train_step_{args.preset}_{args.quant}_{time.strftime('%Y%m%d')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"env": env, "args": vars(args), "results": results, "max_rel_loss_diff": d_loss,
                   "first_step_rel_loss_diff": d_first}, f, indent=1)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
