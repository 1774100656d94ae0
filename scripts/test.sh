#!/usr/bin/env bash
# Install leanserve with its dev tools into .venv, then lint and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k kernel
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers: the CI machine has two cores and interpreted Triton kernels are CPU-bound.
exec .venv/bin/python -m pytest -n 2 --durations=15 "$@"
