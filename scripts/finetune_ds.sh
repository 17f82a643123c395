#!/usr/bin/env bash
# Full fine-tuning with DeepSpeed ZeRO-3 on input-output data (ChatGLM3's finetune_ds.sh).
# Every variable can be set from the environment: NUM_GPUS=4 MAX_STEP=30 bash scripts/finetune_ds.sh
source "$(dirname "$0")/common.sh"
LR=${LR:-1e-5}
MAX_SOURCE_LEN=${MAX_SOURCE_LEN:-1024}
MAX_TARGET_LEN=${MAX_TARGET_LEN:-128}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-4}
GRAD_ACCUMULATION_STEPS=${GRAD_ACCUMULATION_STEPS:-1}
MAX_STEP=${MAX_STEP:-500}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero3.json}
RUN_NAME=${RUN_NAME:-advertise_gen_ft}
DATASET_PATH=${DATASET_PATH:-formatted_data/advertise_gen.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-output/${RUN_NAME}-${DATESTR}-${LR}}
require_file "$DATASET_PATH" "Make it with: python scripts/format_advertise_gen.py --path ../shared/data/AdvertiseGen/train.json"

launch --method full --deepspeed "$DS_CONFIG" --train_format input-output --train_file "$DATASET_PATH" \
  --model_name_or_path "$BASE_MODEL_PATH" --output_dir "$OUTPUT_DIR" \
  --max_source_length "$MAX_SOURCE_LEN" --max_target_length "$MAX_TARGET_LEN" \
  --per_device_train_batch_size "$DEV_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUMULATION_STEPS" \
  --max_steps "$MAX_STEP" --logging_steps 1 --save_steps "$SAVE_INTERVAL" --learning_rate "$LR" \
  --preprocessing_num_workers 1 "$@"
