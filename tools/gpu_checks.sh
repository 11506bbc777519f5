#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (a lent GPU's time is short): the CUDA-only tests, the
# attention-kernel benchmark (and, if TILES is set, its launch shapes compared), and the model-step table.
# Each stage has its own time limit and a failing stage does not stop the next. Logs and JSON go to OUTDIR.
# Stages: CUDA tests, attention kernel (+ launch shapes), host cost (HOST_COST_TIMEOUT=0 skips it), recomputed
# layer inputs' memory (RECOMPUTE_TIMEOUT=0 skips it), model step (+ a second model-step run).
#
# Usage: tools/gpu_checks.sh OUTDIR [MODEL_STEP_ARGS...]
#   MODEL_STEP_ARGS default to the whole table (every model, batch 64 and the GPU-bound batch, fp32 and bf16,
#   eager and compiled). Environment:
#   TEST_FILES      the test files (default: every file with CUDA-only tests)
#   TILES           '|'-separated CD_CONVERT_ATTENTION_TILES values compared on TILE_SHAPES (default: none)
#   BIG_MODEL_STEP  arguments of a second model-step run, e.g. a GPU-bound batch (default: none)
#   *_TIMEOUT       each stage's limit in seconds
set -u
out=${1:?usage: tools/gpu_checks.sh OUTDIR [MODEL_STEP_ARGS...]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
started=$SECONDS
stage() { echo "== $1 ($((SECONDS - started))s in)"; }
tests=${TEST_FILES:-tests/test_fused.py tests/test_fused_attention.py tests/test_cuda_graphs.py tests/test_recompute.py tests/test_noise_independence.py tests/test_scale.py}

stage "environment and CUDA tests"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
  "$py" -c "import torch, triton, timm; print('torch', torch.__version__, '| triton', triton.__version__, '| timm', timm.__version__, '| cuda', torch.version.cuda)"
  # shellcheck disable=SC2086  # the list splits on spaces on purpose
  timeout "${TESTS_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider --tb=short --show-capture=no $tests 2>&1 | tail -60
} 2>&1 | tee "$out/tests.txt"

stage "attention kernel"
timeout "${ATTENTION_TIMEOUT:-150}" "$py" -m benchmarks.attention_kernel --repeats 10 --inner 3 \
  --json "$out/attention.json" 2>&1 | tee "$out/attention.txt"

if [ -n "${TILES:-}" ]; then
  stage "attention kernel launch shapes"
  timeout "${TILES_TIMEOUT:-120}" "$py" -m benchmarks.attention_kernel --repeats 10 --inner 3 \
    --shapes "${TILE_SHAPES:-vit_base_b256,lm_d128_causal}" --tiles "$TILES" 2>&1 | tee "$out/tiles.txt"
fi

if [ "${HOST_COST_TIMEOUT:-90}" != 0 ]; then
  stage "host cost"
  timeout "${HOST_COST_TIMEOUT:-90}" "$py" -m benchmarks.host_cost --json "$out/host_cost.json" 2>&1 | tee "$out/host_cost.txt"
fi

if [ "${RECOMPUTE_TIMEOUT:-60}" != 0 ]; then
  stage "recomputed layer inputs: memory"
  timeout "${RECOMPUTE_TIMEOUT:-60}" "$py" -m benchmarks.recompute_memory --device cuda --models resnet50 --batch 64 \
    --img-size 224 --json "$out/recompute_memory.json" 2>&1 | tee "$out/recompute_memory.txt"
fi

stage "model step"
timeout "${MODEL_STEP_TIMEOUT:-420}" "$py" -m benchmarks.model_step --device cuda --json "$out/model_step.json" "$@" \
  2>&1 | tee "$out/model_step.txt"

if [ -n "${BIG_MODEL_STEP:-}" ]; then
  stage "model step, second run"
  # shellcheck disable=SC2086
  timeout "${BIG_TIMEOUT:-120}" "$py" -m benchmarks.model_step --device cuda --json "$out/model_step_big.json" \
    $BIG_MODEL_STEP 2>&1 | tee "$out/model_step_big.txt"
fi
stage done
