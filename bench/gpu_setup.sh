#!/usr/bin/env bash
# Set up a bare CUDA machine for the GPU benchmark, then run the given Python script with its args:
#   bash bench/gpu_setup.sh bench/bench_gpu.py        (what `make bench-gpu` runs)
#
# 1. a virtual environment in $VENV (default .venv-gpu) from $PYTHON (default python3); where the
#    python lacks the venv module, its own environment is used instead;
# 2. torch $TORCH_VERSION with CUDA: kept if it already sees the GPU; else the PyPI wheel; else the
#    newest of PyTorch's CUDA builds ($CUDA_BUILDS) that the driver supports (nvidia-smi's
#    "CUDA Version"), each checked with torch.cuda.is_available();
# 3. this project, `pip install -e .` (torch already satisfied; DeepSpeed's CUDA ops are not built:
#    the trainer needs none of them, and pip-only images have no nvcc).
# DRY_RUN=1 prints the steps it would take (the CUDA builds in the order it would try them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CUDA_BUILDS=${CUDA_BUILDS:-"cu130 cu129 cu128 cu126 cu124"}
INDEX=${INDEX:-https://download.pytorch.org/whl}

die() { echo "gpu_setup.sh: $*" >&2; exit 1; }
command -v nvidia-smi >/dev/null || die "no nvidia-smi: this needs an NVIDIA GPU and driver (on a CPU: python bench/bench_gpu.py --dry-run)"
driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -1)
[ -n "$driver_cuda" ] || die "nvidia-smi does not report a CUDA version; is the driver loaded?"
candidates=()
for build in $CUDA_BUILDS; do
  [ "${build#cu}" -le "$driver_cuda" ] && candidates+=("$build")
done
echo "driver supports CUDA ${driver_cuda:0:-1}.${driver_cuda: -1}; CUDA builds to try after PyPI's: ${candidates[*]:-none}"

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "would: $PYTHON -m venv $VENV; pip install torch==$TORCH_VERSION, else from $INDEX/{$(IFS=,; echo "${candidates[*]}")}; pip install -e .; run $*"
  exit 0
fi

if "$PYTHON" -m venv "$VENV" 2>/dev/null; then
  PY="$VENV/bin/python"
else
  rm -rf "$VENV"
  echo "gpu_setup.sh: $PYTHON has no venv module; installing into its own environment"
  PY="$PYTHON"
fi
"$PY" -m pip install -q --upgrade pip

sees_gpu() { "$PY" -c "import torch, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION') and torch.cuda.is_available()))" 2>/dev/null; }
if ! sees_gpu; then
  "$PY" -m pip install -q "torch==$TORCH_VERSION" || true
  for build in "${candidates[@]}"; do
    sees_gpu && break
    echo "torch from PyPI does not see the GPU; trying $INDEX/$build"
    "$PY" -m pip install -q --force-reinstall "torch==$TORCH_VERSION" --index-url "$INDEX/$build" || true
  done
  sees_gpu || die "no build of torch $TORCH_VERSION sees the GPU (driver CUDA $driver_cuda); install one by hand, then rerun"
fi
DS_BUILD_OPS=0 "$PY" -m pip install -q -e .
"$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}')"
[ $# -eq 0 ] || exec "$PY" "$@"
