#!/usr/bin/env bash
# The GPU checks of the project in one command, for a GPU machine with no network: the CUDA
# paths of the tests (nvJPEG decode, half precision, torch.compile), then label_gpu.py with
# its figures as JSON. Everything it writes goes under ${OUT:-/tmp/gpu-check}. It fits one
# 10-minute call: the tests get TESTS_TIMEOUT s, the benchmark BENCH_TIMEOUT s, and the
# benchmark's JSON holds every figure measured before a timeout.
#
#   bash ../shared/device/make-bundle.sh      # here, once: what a bare GPU machine lacks
#   source .device-bundle/install.sh && bash benchmarks/gpu_check.sh    # there
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out"
# Not from the checkout: Ray puts the driver's working directory first on its workers' path,
# where the checkout's fiqa/ (without fiqa.cluster, fiqa.models, ...) would shadow the package.
[ -n "${FIQA_REAL_FACES:-}" ] && FIQA_REAL_FACES=$(realpath "$FIQA_REAL_FACES") && export FIQA_REAL_FACES
cd "$out" || exit 1
nvidia-smi --query-gpu=name,driver_version,compute_mode,memory.total --format=csv | tee gpu.txt
# -P: the installed package, not the checkout (its folders map onto fiqa.* only when installed).
# FIQA_REAL_FACES: a folder of real-face shards for the tests (else they make synthetic faces).
timeout "${TESTS_TIMEOUT:-150}" python3 -P -m pytest -q -p no:cacheprovider -p no:warnings \
  --rootdir "$root" -c "$root/pyproject.toml" \
  "$root/tests/test_device_decode.py" "$root/tests/test_scorer_precision.py" -s 2>&1 \
  | tail -n 40 | tee tests.txt
timeout "${BENCH_TIMEOUT:-400}" python3 "$root/benchmarks/label_gpu.py" --json label_gpu.json \
  "$@" 2>&1 | grep -v -e "core_worker.cc" -e "streaming_executor" -e "Token authentication" \
  | tee label_gpu.txt
