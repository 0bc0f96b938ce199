#!/usr/bin/env bash
# jaxprune on one GPU, for when a GPU machine is at hand (docs/gpu.md). CI does not run it
# (.ci/run runs scripts/test.sh, on CPU JAX).
#
# In order, stopping at the first failure:
#   1. the CUDA build of JAX (scripts/setup.sh with JAXPRUNE_JAX_EXTRA, default cuda12), and a
#      check that JAX sees a GPU;
#   2. tiny-model tests on the GPU backend (tests/conftest.py: float32 matmuls at `highest`;
#      tests whose meshes need more devices than the machine has skip, saying so);
#   3. the SmolLM2-135M integration tests (marker smollm2);
#   4. `jaxprune prune` at 20% on a synthetic 1.05B LLaMA (jaxprune.io.synthetic, the builder of
#      benchmarks/streaming_memory.py: hidden 2048, FFN 8192, 14 layers, 32/8 heads, SmolLM2's
#      vocabulary), calibrated on WikiText-2 valid; its report.json is printed in part.
#
# Usage:  bash scripts/gpu_check.sh            (WORK=DIR keeps the synthetic model and output;
#         TINY_TESTS="tests/test_x.py ..." chooses other tiny-model files; DATA=PATH the text)
set -euo pipefail
cd "$(dirname "$0")/.."
JAXPRUNE_JAX_EXTRA=${JAXPRUNE_JAX_EXTRA:-cuda12} bash scripts/setup.sh
# shellcheck disable=SC1091
. "${JAXPRUNE_VENV:-.venv}/bin/activate"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
python -c "import jax; d = jax.devices(); print(jax.__version__, d); assert jax.default_backend() == 'gpu', d"

echo "== 1/3 tiny models"
TINY_TESTS=${TINY_TESTS:-"tests/test_precision.py tests/test_models.py tests/test_families.py tests/test_stats.py
  tests/test_reconstruct.py tests/test_step.py tests/test_pipeline.py tests/test_criteria.py tests/test_surgery.py
  tests/test_sharded_solve.py tests/test_mesh.py tests/test_export.py"}
# shellcheck disable=SC2086
python -m pytest -q -p no:cacheprovider -m "not smollm2 and not slow" $TINY_TESTS

echo "== 2/3 SmolLM2-135M"
python -m pytest -q -p no:cacheprovider -m smollm2 tests/test_smollm2.py tests/test_prune_smollm2.py

echo "== 3/3 a synthetic 1B LLaMA"
DATA=${DATA:-../shared/data/wikitext-2/valid.txt}
WORK=${WORK:-$(mktemp -d)}
SRC="$WORK/llama-1b"
[ -f "$SRC/config.json" ] || python -c "
import jaxprune
from jaxprune.io.synthetic import num_params, write_llama
tok = jaxprune.load_tokenizer('smollm2-135m')
cfg = write_llama('$SRC', hidden=2048, ffn=8192, layers=14, heads=32, kv_heads=8, vocab=tok.vocab_size, tokenizer=tok)
print('synthetic LLaMA,', num_params(cfg), 'parameters')"
python -m jaxprune prune "$SRC" --sparsity 0.2 --calib "$DATA" --calib-samples 64 --seq-len 128 \
  --out "$WORK/pruned" --force --no-progress
python -c "
import json
r = json.load(open('$WORK/pruned/report.json'))
print(json.dumps({'params': r['params'], 'seconds': r.get('seconds'), 'compiles': r['passes'].get('compiles'),
                  'matmul_precision': r['config']['matmul_precision']}, indent=1))"
echo "gpu check passed; the synthetic model and its pruned copy are in $WORK"
