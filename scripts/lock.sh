#!/usr/bin/env bash
# Refresh constraints.txt, the lock every install takes its versions from: resolve the newest versions
# pyproject.toml allows into a fresh virtual environment (pip's cache off, as on a new machine), run the
# whole suite there, and write the lock only if it passed. Commit the new lock on its own.
#   scripts/lock.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
export PIP_NO_CACHE_DIR=1
PYTHON="$venv/bin/python" LOCK=none scripts/test.sh "$@"
# torch is pinned by install.sh itself (its CPU build here, a CUDA build where one is installed).
{
    echo "# The versions the whole test suite passed with (scripts/lock.sh writes this file; do not edit)."
    echo "# Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), torch pinned by scripts/install.sh."
    "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^torch=='
} >constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
