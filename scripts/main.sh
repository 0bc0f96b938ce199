#!/usr/bin/env bash
# The main job: sets everything up, prunes the built-in SmolLM2-135M by 20% of
# its block parameters (calibrated on WikiText-2 valid, joined by 64 windows of
# text the model writes itself) with jaxprune's default
# preset, `recommended` (docs/results.md; no recipe flags needed), and reports
# dense vs pruned perplexity on WikiText-2 test, parameters and time. The pruned model,
# report.json and progress.jsonl go to runs/smollm2-20 (replaced on each run).
# Extra arguments go to `jaxprune prune`, e.g. `bash scripts/main.sh --calib selfgen`
# (the data-free preset) or `bash scripts/main.sh --preset paper` (the paper's method).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${JAXPRUNE_VENV:-.venv}/bin/activate"
DATA=${JAXPRUNE_DATA:-../shared/data/wikitext-2}
exec jaxprune prune smollm2-135m --sparsity 0.2 \
  --calib "$DATA/valid.txt" --eval-text "$DATA/test.txt" \
  --out runs/smollm2-20 --force "$@"
