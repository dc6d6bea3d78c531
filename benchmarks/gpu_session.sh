#!/usr/bin/env bash
# One H200 session: the GPU test suite, then the benchmarks, each bounded in time; everything lands in $OUT.
# Usage (device machine, repo root): bash benchmarks/gpu_session.sh   (wheels for bitsandbytes/liger in .whl/)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch,triton,transformers,peft;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"
# One log for all steps: the device tool brings back at most 8 files a call (the JSONs + this log).
step() { local name=$1 limit=$2 log=$OUT/$1.log; shift 2; echo "== $name"; timeout "$limit" "$@" > "$log" 2>&1
         echo "rc=$?" >> "$log"; tail -n "${TAILN:-12}" "$log"; { echo "== $name"; cat "$log"; } >> "$OUT/session.log"; rm -f "$log"; }
TAILN=4 step pytest 200 python3 -m pytest -q -p no:cacheprovider
step dequant 60 python3 benchmarks/bench_dequant.py --out "$OUT/dequant.json"
TAILN=16 step loss 90 python3 benchmarks/bench_loss.py --models llama3 --tokens 4096 8192 --chunk-tokens 512 1024 --out "$OUT/loss.json"
export SLOTH_CORE_AUTOTUNE=0  # heuristic launch configs in the training steps (tuning is measured separately)
TAILN=9 step train_lora 150 python3 benchmarks/bench_train_step.py --steps 8 --sloth-checkpointing offload --out "$OUT/train_lora.json"
TAILN=9 step train_qlora 170 python3 benchmarks/bench_train_step.py --steps 8 --quant nf4 --sloth-checkpointing offload --out "$OUT/train_qlora.json"
unset SLOTH_CORE_AUTOTUNE
TAILN=14 step autotune 80 python3 benchmarks/bench_autotune.py --tokens 8192 --rounds 2 --out "$OUT/autotune.json"
