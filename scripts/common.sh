# Sourced by the finetune_*.sh scripts: the launcher and the defaults they share.
# NUM_GPUS (or NPROC) processes via torchrun; with no GPU they run on the CPU over gloo, so any script can be
# tried anywhere. Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as torchrun expects.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-${NUM_GPUS:-1}}
NNODES=${NNODES:-1}
BASE_MODEL_PATH=${BASE_MODEL_PATH:-models/SmolLM2-135M-Instruct}
DATESTR=$(date +%Y%m%d-%H%M%S)

if [ "$BASE_MODEL_PATH" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$BASE_MODEL_PATH/config.json" ]; then
  echo "using the default model $BASE_MODEL_PATH: preparing it first (scripts/get_demo_model.sh)"
  bash scripts/get_demo_model.sh
fi

require_file() {
  if [ ! -e "$1" ]; then
    echo "error: $1 does not exist. $2" >&2
    exit 2
  fi
}

# launch ARGS...: finetune.py under torchrun (also for one process: DeepSpeed needs its environment).
launch() {
  local log_dir=$OUTPUT_DIR
  mkdir -p "$log_dir"
  if [ "$NNODES" -gt 1 ]; then
    set -- --nnodes="$NNODES" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
      --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$NPROC" finetune.py "$@"
  else
    set -- --standalone --nnodes=1 --nproc_per_node="$NPROC" finetune.py "$@"
  fi
  echo "+ torchrun $*" | tee "$log_dir/train.log"
  "$PYTHON" -m torch.distributed.run "$@" 2>&1 | tee -a "$log_dir/train.log"
}
