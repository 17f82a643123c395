#!/usr/bin/env bash
# README command 1: a real fine-tune of the default model on real data, from nothing, on a CPU.
#   install what is missing -> get SmolLM2-135M-Instruct -> ruozhiba (alpaca) to OpenAI messages -> 7:3 split
#   -> LoRA fine-tune -> base and tuned answers on held-out questions -> before/after table, ROUGE/BLEU, loss.png
# Every variable can be set from the environment, e.g. STEPS=40 N_HELDOUT=4 bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/ruozhiba_qa.json}
WORK=${WORK:-output/quickstart}
STEPS=${STEPS:-120}
BATCH=${BATCH:-5}  # examples a step: 2 packed rows of up to 512 tokens (about 2.3 ruozhiba examples each)
LR=${LR:-1e-3}
N_HELDOUT=${N_HELDOUT:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-96}
PYTHON=${PYTHON:-python3}
start=$(date +%s)

bash scripts/install.sh
bash scripts/get_demo_model.sh
if [ ! -f "$DATA" ]; then
  echo "error: $DATA not found (the ruozhiba data; set DATA=...)" >&2
  exit 2
fi
mkdir -p "$WORK"

echo "== 1. data: convert ruozhiba to OpenAI messages, split 7:3 (seed 42), hold out $N_HELDOUT test questions"
"$PYTHON" scripts/convert_data.py --input "$DATA" --output_format openai --output "$WORK/ruozhiba.jsonl"
"$PYTHON" scripts/split_data.py --input "$WORK/ruozhiba.jsonl" --train_out "$WORK/train.jsonl" \
  --test_out "$WORK/test.jsonl" --ratio 0.7 --seed 42 --dedup
head -n "$N_HELDOUT" "$WORK/test.jsonl" > "$WORK/heldout.jsonl"
head -n 2 "$WORK/heldout.jsonl" > "$WORK/sample_prompts.jsonl"  # answered while training, at every save

echo "== 2. LoRA fine-tune: $STEPS steps of $BATCH examples, packed (the Sanity Check shows what is trained)"
"$PYTHON" finetune.py --method lora --train_file "$WORK/train.jsonl" --output_dir "$WORK/lora" \
  --max_seq_length 512 --per_device_train_batch_size "$BATCH" --learning_rate "$LR" --max_steps "$STEPS" \
  --lora_rank 16 --lora_alpha 32 --warmup_steps 10 --logging_steps "$(( STEPS < 20 ? 1 : 10 ))" --seed 42 \
  --save_steps "$(( STEPS < 3 ? STEPS : STEPS / 3 ))" --sample_prompts "$WORK/sample_prompts.jsonl" \
  --sample_max_new_tokens 48

echo "== 3. answers of the base model and of the tuned one on the held-out questions (greedy)"
"$PYTHON" inference.py --input_file "$WORK/heldout.jsonl" --output_file "$WORK/base.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS"
"$PYTHON" inference.py --adapter "$WORK/lora" --input_file "$WORK/heldout.jsonl" --output_file "$WORK/tuned.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS"

echo "== 4. before / after"
"$PYTHON" inference.py --compare "$WORK/base.jsonl" --predictions "$WORK/tuned.jsonl"
echo "loss curve: $WORK/lora/loss.png"
echo "adapter: $WORK/lora   (chat with it: python inference.py --adapter $WORK/lora)"
echo "export it for llama.cpp / Ollama: python scripts/export_gguf.py $WORK/lora $WORK/ruozhiba.gguf"
echo "quickstart took $(( $(date +%s) - start )) s"
