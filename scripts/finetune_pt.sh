#!/usr/bin/env bash
# P-Tuning v2 on input-output data (ChatGLM3's finetune_pt.sh). Every variable can be set from the environment:
#   MAX_STEP=30 bash scripts/finetune_pt.sh
source "$(dirname "$0")/common.sh"
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
MAX_SOURCE_LEN=${MAX_SOURCE_LEN:-1024}
MAX_TARGET_LEN=${MAX_TARGET_LEN:-128}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-1}
GRAD_ACCUMULATION_STEPS=${GRAD_ACCUMULATION_STEPS:-16}
MAX_STEP=${MAX_STEP:-1000}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}
RUN_NAME=${RUN_NAME:-advertise_gen_pt}
DATASET_PATH=${DATASET_PATH:-formatted_data/advertise_gen.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-output/${RUN_NAME}-${DATESTR}-${PRE_SEQ_LEN}-${LR}}
require_file "$DATASET_PATH" "Make it with: python scripts/format_advertise_gen.py --path ../shared/data/AdvertiseGen/train.json"

launch --method ptuning --train_format input-output --train_file "$DATASET_PATH" \
  --model_name_or_path "$BASE_MODEL_PATH" --output_dir "$OUTPUT_DIR" \
  --max_source_length "$MAX_SOURCE_LEN" --max_target_length "$MAX_TARGET_LEN" \
  --per_device_train_batch_size "$DEV_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUMULATION_STEPS" \
  --max_steps "$MAX_STEP" --logging_steps 1 --save_steps "$SAVE_INTERVAL" --learning_rate "$LR" \
  --pre_seq_len "$PRE_SEQ_LEN" --preprocessing_num_workers 1 \
  ${QUANTIZATION_BIT:+--quantization_bit "$QUANTIZATION_BIT"} "$@"
