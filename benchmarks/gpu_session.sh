#!/usr/bin/env bash
# GPU session on the lent H200: the test suite and the two benchmark reports, each bounded in time.
# Usage (device machine, repo root; bitsandbytes / liger-kernel wheels in .whl/):
#   bash benchmarks/gpu_session.sh tests|train|kernels|sft ...     (one command may run 10 minutes: about
#   tests ~5-6 min in three parts side by side, train (Llama-3-8B LoRA + QLoRA, three providers) 5 min,
#   kernels (688 rows) 5 min,
#   sft (TRL's SFTTrainer, Llama-3-8B QLoRA + LoRA, fixed and varlen, hf_peft vs sloth_core: 12 runs) 4-6 min,
#   memory (8B QLoRA allocated memory over 200 steps, fresh then warm tuning cache) ~4 min, compile ~6 min,
#   fallbacks (LoRA dropout, LLM.int8) ~4 min, tune (the shipped table's four presets) ~1.5 min)
# MEMORY_STEPS / MEMORY_S: the memory stage's steps and time limit (200, 400 s).
# WHEELS="DIR ..." installs the wheels of those folders instead of .whl/ (e.g. a newer transformers beside the
# image's); TAG names the run in the result files; TRAIN_ARGS are added to the train stage (e.g. --provider ...),
# SFT_ARGS to the sft stage (e.g. --steps 6 --varlen-steps 8). The sft stage needs trl and datasets, which the image
# lacks: WHEELS=".whl/common .whl/trl" (trl, datasets, dill, multiprocess; on the image's transformers).
# Everything lands in $OUT: session.log and one results.tgz (the device tool brings back at most 8 files a call).
set -u
OUT=${OUT:-/tmp/out}; RESULTS=/tmp/results; mkdir -p "$OUT" "$RESULTS"
TAG=${TAG:-$(date +%Y%m%d)}
wheels=$(for d in ${WHEELS:-.whl}; do ls "$d"/*.whl 2>/dev/null; done)
if [ -n "$wheels" ]; then
  site=/tmp/site-$TAG  # one folder per run: a warm machine keeps the last run's
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $wheels
  export PYTHONPATH=$site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c 'import torch, triton, transformers, peft; print("versions: torch", torch.__version__, "triton",
  triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name())' \
  | tee -a "$OUT/session.log"
# tests/kernels + autotune; the model-level tests; the trainer, distributed and compile tests: three processes side by
# side on the one GPU (TEST_PART_S bounds each)
TEST_PARTS=("tests/kernels tests/autotune tests/test_bf16_accuracy.py tests/test_inference.py tests/test_coexistence.py"
            "tests/architectures tests/test_checkpointing.py tests/test_checkpointing_matrix.py tests/test_attention_offload.py tests/test_qkv_offload.py tests/test_round_trips.py tests/test_guard.py tests/test_lora_dropout.py tests/test_lora_int8.py tests/test_config_fuzz.py tests/test_bad_inputs.py tests/test_threads.py"
            "tests --ignore=tests/kernels --ignore=tests/autotune --ignore=tests/architectures --ignore=tests/test_bf16_accuracy.py --ignore=tests/test_inference.py --ignore=tests/test_coexistence.py --ignore=tests/test_checkpointing.py --ignore=tests/test_checkpointing_matrix.py --ignore=tests/test_attention_offload.py --ignore=tests/test_qkv_offload.py --ignore=tests/test_round_trips.py --ignore=tests/test_guard.py --ignore=tests/test_lora_dropout.py --ignore=tests/test_lora_int8.py --ignore=tests/test_config_fuzz.py --ignore=tests/test_bad_inputs.py --ignore=tests/test_threads.py")
# run_logged NAME LIMIT CMD...: CMD bounded by LIMIT seconds into $RESULTS/NAME.log, its exit status last;
# report NAME: the log's failures and tail here, the whole log appended to session.log; step: one, then the other
run_logged() { local log=$RESULTS/$1.log limit=$2; shift 2; timeout "$limit" "$@" > "$log" 2>&1
               echo "rc=$?" >> "$log"; }
report() { local log=$RESULTS/$1.log; echo "== $1"; grep -E "^(FAILED|ERROR) " "$log" | head -30
           tail -n "${TAILN:-12}" "$log"; { echo "== $1"; cat "$log"; } >> "$OUT/session.log"; }
step() { run_logged "$@"; report "$1"; }
for stage in "${@:-tests}"; do
  case $stage in
    # the suite in three processes of bounded time, side by side on the one GPU (tiny models: the CPU launches bound
    # them; a CUDA error ends only its part); -v names each result as it comes (a part cut by its timeout still says
    # which tests failed), -rfE lists failures and errors at the end
    tests)   for i in "${!TEST_PARTS[@]}"; do
               # shellcheck disable=SC2086
               run_logged "pytest_${TAG}_part$((i + 1))" "${TEST_PART_S:-420}" python3 -m pytest -p no:cacheprovider \
                 -rfE -o console_output_style=classic -v ${TEST_PARTS[$i]} &
             done
             wait
             for i in "${!TEST_PARTS[@]}"; do TAILN=3 report "pytest_${TAG}_part$((i + 1))"; done ;;
    # heuristic launch configs in the benchmarks (tuning is measured by benchmarks/bench_autotune.py)
    train)   TAILN=14 step train 540 env SLOTH_CORE_AUTOTUNE=0 python3 -m sloth_core bench train --preset llama-3-8b \
               --quant none nf4 --steps 10 --out "$RESULTS" --name "train_llama-3-8b_$TAG" ${TRAIN_ARGS:-} ;;
    # TRL's default config, one fresh model per run; offline (nothing to fetch: the data and tokenizer are made here)
    sft)     TAILN=24 step sft 540 env SLOTH_CORE_AUTOTUNE=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 USE_HUB_KERNELS=NO \
               python3 -m sloth_core bench train --flow sft --preset llama-3-8b --quant nf4 none \
               --workload fixed varlen --out "$RESULTS" --name "train_sft_llama-3-8b_$TAG" ${SFT_ARGS:-} ;;
    kernels) TAILN=4 step kernels 540 env SLOTH_CORE_AUTOTUNE=0 python3 -m sloth_core bench kernels --out "$RESULTS" \
               --name "kernels_$TAG" ;;
    # allocated memory over 200 QLoRA steps with an empty tuning cache (its first step: tuning on first use), then
    # the first steps again on the cache it filled (issue 20, items 3 and 6)
    memory)  cache=$(mktemp -d)
             TAILN=6 step memory_fresh "${MEMORY_S:-400}" env SLOTH_CORE_CACHE_DIR="$cache" \
               python3 benchmarks/check_memory_flat_gpu.py --steps "${MEMORY_STEPS:-200}" \
               --out "$RESULTS/memory_flat_fresh_$TAG.json"
             TAILN=6 step memory_warm 150 env SLOTH_CORE_CACHE_DIR="$cache" python3 benchmarks/check_memory_flat_gpu.py \
               --steps 4 --out "$RESULTS/memory_flat_warm_$TAG.json" ;;
    # torch.compile after optimize: the cuda tests, then compiled vs eager (4 layers of the 8B shape)
    compile) TAILN=4 step compile_tests 150 python3 -m pytest -p no:cacheprovider -rfE -q tests/test_compile.py -m cuda
             TAILN=10 step compile_bench 360 python3 benchmarks/bench_compile.py --preset llama-3-8b --layers 4 \
               --providers sloth_core sloth_core+compile hf_peft hf_peft+compile --out "$RESULTS/compile_$TAG.json" ;;
    # LoRA dropout and LLM.int8 bases: optimized vs PEFT (4 layers of the 8B shape)
    fallbacks) TAILN=10 step fallbacks 300 python3 benchmarks/bench_lora_fallbacks.py --layers 4 \
               --out "$RESULTS/lora_fallbacks_$TAG.json" ;;
    # the shipped tuning table: the four presets at batch 4 x 2048 (copy tuned.json to sloth_core/autotune/shipped/)
    tune)    for m in llama-3-8b qwen3-8b mistral-7b gemma-2-9b; do
               TAILN=2 step "tune_$m" 120 python3 -m sloth_core tune --model "$m" --seq 2048 --batch 4 \
                 --cache-dir "$RESULTS/tuned"
             done ;;
    *) echo "unknown stage $stage (tests, train, kernels, sft, memory, compile, fallbacks, tune)"; exit 2 ;;
  esac
done
tar czf "$OUT/results.tgz" -C "$RESULTS" .
