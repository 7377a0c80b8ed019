#!/usr/bin/env bash
# Prepare a GPU machine for tools/gpu/acceptance.py: Transformer Engine and megatron-core.
#
#   bash tools/gpu/setup.sh [WHEEL_DIR]
#
# Where both already import (a GPU node running containers/llmjp.def), it prints their
# versions and changes nothing. Otherwise it installs them into the python3 on PATH (or
# $PYTHON) from WHEEL_DIR only (default: $LLMJP_WHEELS, else shared/wheels in this checkout),
# with no network access:
#
#   megatron_core-0.16.1-cp312-cp312-manylinux*.whl      megatron-core (installed --no-deps)
#   transformer_engine-2.10.0-py3-none-any.whl           TE's top-level package
#   transformer_engine_cu13-2.10.0-*.whl                 TE's core library for CUDA 13
#                                                        (transformer_engine_cu12 for a
#                                                        torch built with CUDA 12)
#   transformer_engine_torch-2.10.0.tar.gz               TE's PyTorch extension, a source
#                                                        distribution built here against the
#                                                        installed torch (nvcc, cuDNN headers
#                                                        from the nvidia-cudnn wheel, cmake,
#                                                        ninja, pybind11; minutes on 16 cores)
#   the wheels of any of their dependencies this python lacks (pip names them when one is
#   missing; e.g. pydantic and its pydantic_core, nvdlfw_inspect, importlib_metadata)
#
# Environment: NVTE_CUDA_ARCHS (default: the GPU's compute capability, e.g. 90), MAX_JOBS
# (default: the CPU count), CUDNN_PATH (default: the nvidia-cudnn wheel's folder), PYTHON.
# Exit status: 0 ready, 1 an install failed, 2 wheels missing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${1:-${LLMJP_WHEELS:-$REPO/shared/wheels}}"
TE_VERSION=2.10.0
MCORE_VERSION=0.16.1

ready() {
    "$PY" - <<'EOF'
import importlib.metadata as md
import transformer_engine.pytorch  # noqa: F401  (first: where it is missing, fail fast)
import megatron.core  # noqa: F401
print(f"megatron-core {md.version('megatron-core')}, transformer_engine "
      f"{md.version('transformer_engine')}: ready")
EOF
}

if ready 2>/dev/null; then
    exit 0
fi

if [ ! -d "$WHEELS" ]; then
    echo "setup.sh: $WHEELS is not a directory; put the wheels listed at the top of" \
        "tools/gpu/setup.sh there (or pass the directory as the first argument)" >&2
    exit 2
fi

CUDA_MAJOR="$("$PY" -c 'import torch; print((torch.version.cuda or "").split(".")[0])')"
if [ -z "$CUDA_MAJOR" ]; then
    echo "setup.sh: $PY's torch has no CUDA build" >&2
    exit 2
fi
missing=()
for pattern in "megatron_core-$MCORE_VERSION-*.whl" "transformer_engine-$TE_VERSION-*.whl" \
    "transformer_engine_cu$CUDA_MAJOR-$TE_VERSION-*.whl" \
    "transformer_engine_torch-$TE_VERSION.tar.gz"; do
    compgen -G "$WHEELS/$pattern" >/dev/null || missing+=("$pattern")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup.sh: missing in $WHEELS: ${missing[*]}" >&2
    exit 2
fi

if [ -z "${NVTE_CUDA_ARCHS:-}" ]; then
    NVTE_CUDA_ARCHS="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")' 2>/dev/null || echo 90)"
fi
export NVTE_CUDA_ARCHS NVTE_FRAMEWORK=pytorch MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# cuDNN headers and libraries from the nvidia-cudnn wheel, where no system cuDNN is set.
if [ -z "${CUDNN_PATH:-}" ]; then
    CUDNN_PATH="$("$PY" -c 'import nvidia.cudnn as c; print(list(c.__path__)[0])' 2>/dev/null || true)"
    if [ -n "$CUDNN_PATH" ]; then export CUDNN_PATH; else unset CUDNN_PATH; fi
fi
PIP=("$PY" -m pip install --no-index --find-links "$WHEELS" --no-cache-dir)

set -x
"${PIP[@]}" --no-deps "megatron-core==$MCORE_VERSION"
# TE builds its PyTorch extension against the torch already installed: no build isolation.
"${PIP[@]}" --no-build-isolation "transformer_engine[pytorch,core_cu$CUDA_MAJOR]==$TE_VERSION"
set +x

if ! ready; then
    echo "setup.sh: installed, but transformer_engine.pytorch or megatron.core does not import" >&2
    exit 1
fi
