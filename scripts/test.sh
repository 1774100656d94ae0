#!/usr/bin/env bash
# Install leanserve with its dev tools (into .venv, or PYTHON's environment), then lint and run the
# whole test suite. Extra arguments go to pytest, e.g. scripts/test.sh -k kernel
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh dev
python=${PYTHON:-.venv/bin/python}
"$python" -m ruff check .
"$python" -m ruff format --check .
# Two workers: the CI machine has two cores and interpreted Triton kernels are CPU-bound.
exec "$python" -m pytest -n 2 --durations=15 "$@"
