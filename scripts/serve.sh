#!/usr/bin/env bash
# Install leanserve into .venv and serve the embedded default model (CPU when no GPU is present).
# Extra arguments go to `leanserve`, e.g. scripts/serve.sh --port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh runtime
exec .venv/bin/leanserve "$@"
