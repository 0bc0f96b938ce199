#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (unit and SmolLM2 integration).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not smollm2"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${JAXPRUNE_VENV:-.venv}/bin/activate"
# Whole test files go to a worker (--dist loadfile): a file's module-scoped fixtures
# (SmolLM2 in JAX and PyTorch, exports) are built once, and a worker holds one file's at a time.
# Files are handed out in collection order (--no-loadscope-reorder): tests/conftest.py puts
# the costliest first, so that no worker is left alone with a long file at the end.
# The 30 slowest steps close the log: what to look at when the run nears its 30 minutes.
exec python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=30 "$@"
