#!/bin/bash
# The CUDA WKV6 kernels' two forms (per-step and chunk-parallel, forward
# and backward) on one GPU, in one device call: builds both bindings'
# libraries, runs the GPU tests of tests/test_wkv6_cuda.py on JAX and
# torch, compute-sanitizer (memcheck; racecheck on the parallel form),
# times step vs parallel (forward, forward+backward) with fla's
# chunk_rwkv6 in the same process, and profiles the parallel forward's
# three kernels with Nsight Compute; the "model" stage (not in "all": a
# call of its own) times prefill and a training step of a random 1.6B in
# each form (benchmarks/train_step_gpu.py). Logs go to $OUT (default
# /tmp/wkv_forms_gpu).
#
# Usage, from the repository root on the GPU machine, with the wheels of
# ../shared/device/wheels.sh in .whl:
#   bash benchmarks/wkv_forms_gpu.sh [all|test|bench|sanitize|profile|model]
set -u
STAGE=${1:-all}
OUT=${OUT:-/tmp/wkv_forms_gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1 || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$(date +%s)
stamp() { echo "[$1: $(( $(date +%s) - T0 )) s]"; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader

# Both libraries at once (one nvcc each).
KERAS_BACKEND=torch python3 benchmarks/wkv_cuda_gpu.py --profile-case 1,64,1,64 &
KERAS_BACKEND=jax python3 -c "import sys; sys.path.insert(0, '.'); \
import torch; from keras_rwkv.ops.wkv6.cuda import jax_binding; \
jax_binding.load('%d%d' % torch.cuda.get_device_capability())"
wait
stamp build

if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
  K="parallel or matches_reference or bfloat16 or launch_shape or split_over"
  for backend in jax torch; do
    KERAS_BACKEND=$backend timeout 240 python3 -m pytest -q -x \
      -p no:cacheprovider -n 0 tests/test_wkv6_cuda.py -k "$K" 2>&1 \
      | tail -12 | tee "$OUT/test_$backend.txt"
    stamp "tests $backend"
  done
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  timeout 300 python3 benchmarks/wkv_cuda_gpu.py --bench --impls fla \
    --forms step,parallel --segments auto \
    --shapes "8,4096,32,64;1,16384,32,64;1,1024,32,64" 2>&1 \
    | grep -v Warning | tee "$OUT/bench.txt" | tail -40
  stamp bench
fi
if [ "$STAGE" = all ] || [ "$STAGE" = sanitize ]; then
  timeout 200 compute-sanitizer --tool memcheck \
    python3 benchmarks/wkv_cuda_gpu.py --sanitize-case 2>&1 \
    | tail -4 | tee "$OUT/memcheck.txt"
  for shape in 1,137,2,64 1,77,1,128; do
    KERAS_RWKV_WKV6_FORM=parallel timeout 150 compute-sanitizer \
      --tool racecheck python3 benchmarks/wkv_cuda_gpu.py \
      --profile-case $shape 2>&1 | tail -3 | tee -a "$OUT/racecheck.txt"
  done
  stamp sanitize
fi
if [ "$STAGE" = all ] || [ "$STAGE" = profile ]; then
  METRICS=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
  METRICS=$METRICS,dram__throughput.avg.pct_of_peak_sustained_elapsed
  METRICS=$METRICS,launch__registers_per_thread,smsp__inst_executed.sum
  METRICS=$METRICS,sm__warps_active.avg.pct_of_peak_sustained_active
  METRICS=$METRICS,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum
  KERAS_RWKV_WKV6_FORM=parallel timeout 200 ncu --clock-control none \
    -k "regex:chunk_terms|pass_states|chunk_outputs" --launch-skip 3 --launch-count 3 --metrics "$METRICS" \
    python3 benchmarks/wkv_cuda_gpu.py --profile-case 8,4096,32,64 2>&1 \
    | grep -E "par::|_kernel|gpu__|sm__|dram__|launch__|smsp__|l1tex" \
    | tee "$OUT/ncu.txt"
  stamp profile
fi
if [ "$STAGE" = model ]; then
  (cd benchmarks && timeout 470 python3 train_step_gpu.py --curve-steps 0 \
    --forms step,parallel 2>&1 | grep -E "^\||^#|failed" \
    | tee "$OUT/model.txt")
  stamp model
fi
