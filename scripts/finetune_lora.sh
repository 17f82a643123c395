#!/usr/bin/env bash
# LoRA (or QLoRA with QUANTIZATION_BIT=4|8) on any supported format, detected from the data.
# Every variable can be set from the environment: MAX_STEP=30 DATASET_PATH=... bash scripts/finetune_lora.sh
source "$(dirname "$0")/common.sh"
LR=${LR:-2e-4}
LORA_RANK=${LORA_RANK:-8}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-1024}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-4}
GRAD_ACCUMULATION_STEPS=${GRAD_ACCUMULATION_STEPS:-4}
MAX_STEP=${MAX_STEP:-1000}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}
TRAIN_FORMAT=${TRAIN_FORMAT:-auto}
RUN_NAME=${RUN_NAME:-ruozhiba_lora}
DATASET_PATH=${DATASET_PATH:-../shared/data/ruozhiba_qa.json}
OUTPUT_DIR=${OUTPUT_DIR:-output/${RUN_NAME}-${DATESTR}-${LORA_RANK}-${LR}}
require_file "$DATASET_PATH" "Point DATASET_PATH at a data file or folder."
METHOD=lora
[ -n "$QUANTIZATION_BIT" ] && METHOD=qlora

launch --method "$METHOD" --train_format "$TRAIN_FORMAT" --train_file "$DATASET_PATH" \
  --model_name_or_path "$BASE_MODEL_PATH" --output_dir "$OUTPUT_DIR" --max_seq_length "$MAX_SEQ_LEN" \
  --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT" \
  --per_device_train_batch_size "$DEV_BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUMULATION_STEPS" \
  --max_steps "$MAX_STEP" --logging_steps 1 --save_steps "$SAVE_INTERVAL" --learning_rate "$LR" \
  --preprocessing_num_workers 1 ${QUANTIZATION_BIT:+--quantization_bit "$QUANTIZATION_BIT"} "$@"
