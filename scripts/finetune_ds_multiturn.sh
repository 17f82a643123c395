#!/usr/bin/env bash
# Full fine-tuning with DeepSpeed ZeRO-3 on multi-turn data (ChatGLM3's finetune_ds_multiturn.sh).
# Every variable can be set from the environment: NUM_GPUS=4 MAX_STEP=30 DATASET_PATH=... bash scripts/finetune_ds_multiturn.sh
source "$(dirname "$0")/common.sh"
LR=${LR:-1e-5}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-2048}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-4}
GRAD_ACCUMULATION_STEPS=${GRAD_ACCUMULATION_STEPS:-1}
MAX_STEP=${MAX_STEP:-500}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero3.json}
RUN_NAME=${RUN_NAME:-tool_alpaca_ft}
DATASET_PATH=${DATASET_PATH:-formatted_data/tool_alpaca.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-output/${RUN_NAME}-${DATESTR}-${LR}}
require_file "$DATASET_PATH" "Make it with: python scripts/format_tool_alpaca.py --path ToolAlpaca/data/train_data.json"

launch --method full --deepspeed "$DS_CONFIG" --train_format multi-turn --train_file "$DATASET_PATH" \
  --model_name_or_path "$BASE_MODEL_PATH" --output_dir "$OUTPUT_DIR" --max_seq_length "$MAX_SEQ_LEN" \
  --per_device_train_batch_size "$DEV_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUMULATION_STEPS" \
  --max_steps "$MAX_STEP" --logging_steps 1 --save_steps "$SAVE_INTERVAL" --learning_rate "$LR" \
  --preprocessing_num_workers 1 "$@"
