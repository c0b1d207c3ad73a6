#!/usr/bin/env bash
# The GPU suite: everything a short GPU lease should measure, in one run that fits 8 minutes from a
# clean checkout, every figure into one results file (default out/gpu_suite/results.md).
#
#   bash bench/gpu_suite.sh [RESULTS_DIR]
#
# 1. setup: tools/setup.sh (the CUDA build of torch where a GPU is), then onnxruntime-gpu and
#    TensorRT's Python wheels where a GPU is and they install (best effort, time-boxed).
# 2. the tests marked gpu (test/test_gpu.py): CUDA estimator in fp16 vs CPU, ONNX Runtime's CUDA
#    and TensorRT providers vs its CPU provider, the torch hand caster on CUDA, EGL on NVIDIA.
# 3. bench/bench_latency.py on CUDA: torch, onnxruntime (best provider), ort-cuda, ort-tensorrt.
# 4. training throughput of the paper-size object net (input 128, VGG widths, feature 1024):
#    bench/bench_train.py, and rendered crops/s (featmap render bench).
# Without a GPU, steps 3-4 are skipped with the reason and step 2's tests skip themselves: the run
# passes on a CPU machine in well under 3 minutes. Exit 1 when any step failed (not skipped).
#
# Knobs (environment): GPU_SUITE_STEP_S (wall limit per step, 150), GPU_SUITE_FRAMES (latency
# frames, 30), GPU_SUITE_TRAIN_STEPS (5), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT_DIR=${1:-out/gpu_suite}
RESULTS=$OUT_DIR/results.md
STEP_S=${GPU_SUITE_STEP_S:-150}
FRAMES=${GPU_SUITE_FRAMES:-30}
TRAIN_STEPS=${GPU_SUITE_TRAIN_STEPS:-5}
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
failed=0
t_start=$(date +%s)

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# step NAME COMMAND...: run under the time limit, record status, time and the output's tail.
step() {
  local name=$1; shift
  local log="$OUT_DIR/$(echo "$name" | tr ' /' '__').log" t0 rc
  echo "gpu_suite: $name" >&2
  t0=$(date +%s)
  timeout --kill-after=10 "$STEP_S" "$@" >"$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then status="ok"; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="FAILED: over ${STEP_S} s"; failed=1
  else status="FAILED: exit $rc"; failed=1; fi
  { echo "## $name: $status (${took} s)"; echo; echo '```'; tail -n 80 "$log"; echo '```'; echo; } >>"$RESULTS"
}

skip() {
  echo "gpu_suite: $1 skipped: $2" >&2
  { echo "## $1: skipped ($2)"; echo; } >>"$RESULTS"
}

{
  echo "# GPU suite results"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- host: $(uname -n), $(nproc --all) CPU cores"
  if have_gpu; then echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
  else echo "- GPU: none (nvidia-smi absent or lists no GPU): the GPU parts are skipped"; fi
  echo
} >"$RESULTS"

install_gpu_extras() {
  set -e
  bash tools/setup.sh
  # onnxruntime-gpu replaces the CPU wheel (both provide the onnxruntime module); back to the CPU
  # wheel if it does not install, so the rest still runs.
  if ! $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    $PY -m pip uninstall -q -y onnxruntime || true
    $PY -m pip install -q onnxruntime-gpu || { echo "onnxruntime-gpu did not install"; $PY -m pip install -q onnxruntime; }
  fi
  $PY -c "import tensorrt" 2>/dev/null || timeout 120 $PY -m pip install -q tensorrt-cu12 \
    || echo "TensorRT wheels did not install: the TensorRT provider will skip"
  $PY -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'| onnxruntime', o.__version__, o.get_available_providers())"
}

# TensorRT's wheels put their libraries in site-packages/tensorrt_libs; onnxruntime finds them there.
trt_libs() { $PY -c "import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))" 2>/dev/null; }

if have_gpu; then
  export -f install_gpu_extras && export PY
  step "setup (torch CUDA, onnxruntime-gpu, TensorRT)" bash -c install_gpu_extras
  libs=$(trt_libs) && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  step "setup" bash tools/setup.sh
fi

step "tests marked gpu" $PY -m pytest -q -rs -m gpu test/test_gpu.py

if have_gpu; then
  step "latency on CUDA (torch, onnxruntime, ort-cuda, ort-tensorrt)" $PY bench/bench_latency.py \
    --devices cuda --presets deploy paper --frames "$FRAMES" --backends torch onnxruntime ort-cuda ort-tensorrt
  step "training throughput, paper-size object net (input 128, VGG, feature 1024)" $PY bench/bench_train.py \
    --presets paper --tasks objects --batches 64 128 --steps "$TRAIN_STEPS" --size 128
  step "rendered crops/s" $PY -m featmap_ros.cli render bench --seconds 10
else
  skip "latency on CUDA" "no NVIDIA GPU"
  skip "training throughput, paper-size object net" "no NVIDIA GPU"
  skip "rendered crops/s on the NVIDIA driver" "no NVIDIA GPU"
fi

echo "total: $(( $(date +%s) - t_start )) s; $([ $failed -eq 0 ] && echo 'every step passed or skipped' || echo 'some step FAILED')" \
  >>"$RESULTS"
echo "gpu_suite: results in $RESULTS" >&2
exit $failed
