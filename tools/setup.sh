#!/usr/bin/env bash
# Install everything featmap_ros needs off-ROS, idempotently: system libraries for headless
# OpenGL (EGL), the right PyTorch build for this machine, then this package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}

# Headless rendering: Mesa's EGL (llvmpipe on CPU machines); the NVIDIA driver brings its own.
apt_pkgs=(libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libopengl0)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# PyTorch: an unpinned `torch` pulls a multi-GB CUDA build. Pin the CPU build unless a GPU is here.
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of PyTorch"
    $PY -m pip install -q torch
  else
    echo "setup: no GPU, installing the CPU build torch==${TORCH_CPU_VERSION}"
    $PY -m pip install -q "torch==${TORCH_CPU_VERSION}"
  fi
fi

if ! $PY -c "import featmap_ros, moderngl, mcap_ros2, tensorboard, ruff, onnx, onnxruntime, onnxscript" 2>/dev/null \
   || [ "$($PY -m pip show featmap_ros 2>/dev/null | grep -c '^Location')" = 0 ]; then
  echo "setup: installing featmap_ros and its Python dependencies"
  $PY -m pip install -q -e '.[render,train,test]'
fi
echo "setup: done ($($PY -c 'import torch, onnxruntime as ort; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu", "| onnxruntime", ort.__version__, ",".join(ort.get_available_providers()))'))"
