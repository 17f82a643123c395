#!/usr/bin/env bash
# README "Preference tuning": ruozhiba pairs (chosen = the reference answer, rejected = the base model's own answer),
# a short LoRA SFT, then DPO on top of its adapter; held-out pairs scored before and after, answers side by side.
#   convert + split 7:3 -> base answers (inference.py) -> pairs (make_preference_pairs.py) -> SFT -> DPO
#   -> score_pairs.py on held-out pairs (base, SFT, DPO) -> SFT and DPO answers to held-out questions
# Every variable can be set from the environment, e.g. N_PAIRS=40 DPO_STEPS=10 bash scripts/preference_walkthrough.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/ruozhiba_qa.json}
WORK=${WORK:-output/preference}
N_PAIRS=${N_PAIRS:-200}        # training questions the base model answers: the pairs
N_HELDOUT=${N_HELDOUT:-40}     # test questions it answers: the held-out pairs
N_TABLE=${N_TABLE:-8}          # held-out questions in the before/after table
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-96}
SFT_STEPS=${SFT_STEPS:-60}
DPO_STEPS=${DPO_STEPS:-50}
DPO_LR=${DPO_LR:-2e-4}
BETA=${BETA:-0.1}
PYTHON=${PYTHON:-python3}
start=$(date +%s)
bash scripts/get_demo_model.sh
if [ ! -f "$DATA" ]; then
  echo "error: $DATA not found (the ruozhiba data; set DATA=...)" >&2
  exit 2
fi
mkdir -p "$WORK"

echo "== 1. data: ruozhiba to OpenAI messages, split 7:3 (seed 42); $N_PAIRS training and $N_HELDOUT test questions"
"$PYTHON" scripts/convert_data.py --input "$DATA" --output_format openai --output "$WORK/ruozhiba.jsonl"
"$PYTHON" scripts/split_data.py --input "$WORK/ruozhiba.jsonl" --train_out "$WORK/train.jsonl" \
  --test_out "$WORK/test.jsonl" --ratio 0.7 --seed 42 --dedup
head -n "$N_PAIRS" "$WORK/train.jsonl" > "$WORK/pair_questions.jsonl"
head -n "$N_HELDOUT" "$WORK/test.jsonl" > "$WORK/heldout.jsonl"

echo "== 2. the base model's own answers (greedy, up to $MAX_NEW_TOKENS tokens): the rejected replies"
"$PYTHON" inference.py --input_file "$WORK/pair_questions.jsonl" --output_file "$WORK/base_train.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS"
"$PYTHON" inference.py --input_file "$WORK/heldout.jsonl" --output_file "$WORK/base_heldout.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS"
"$PYTHON" scripts/make_preference_pairs.py --predictions "$WORK/base_train.jsonl" --output "$WORK/pairs.jsonl"
"$PYTHON" scripts/make_preference_pairs.py --predictions "$WORK/base_heldout.jsonl" --output "$WORK/heldout_pairs.jsonl"

echo "== 3. SFT: LoRA, $SFT_STEPS steps on the training split"
"$PYTHON" finetune.py --method lora --train_file "$WORK/train.jsonl" --output_dir "$WORK/sft" \
  --max_seq_length 512 --per_device_train_batch_size 5 --learning_rate 1e-3 --max_steps "$SFT_STEPS" \
  --lora_rank 16 --lora_alpha 32 --warmup_steps 5 --logging_steps 10 --save_steps "$SFT_STEPS" --seed 42 \
  | grep -v -- ' -> ' | grep -v '^Sanity Check\|Sanity Check$'

echo "== 4. DPO on top of the SFT adapter: $DPO_STEPS steps of 4 pairs, beta $BETA; held-out pairs at the start and end"
"$PYTHON" finetune.py --stage dpo --adapter "$WORK/sft" --train_file "$WORK/pairs.jsonl" \
  --eval_file "$WORK/heldout_pairs.jsonl" --eval_on_start True --eval_steps "$DPO_STEPS" --output_dir "$WORK/dpo" \
  --max_seq_length 512 --per_device_train_batch_size 4 --learning_rate "$DPO_LR" --beta "$BETA" \
  --max_steps "$DPO_STEPS" --warmup_steps 5 --logging_steps 5 --save_steps "$DPO_STEPS" --seed 42 \
  | grep -v -- ' -> ' | grep -v '^Sanity Check\|Sanity Check$'

echo "== 5. held-out pairs: does each model give the reference answer a higher log-probability than the base answer?"
"$PYTHON" scripts/score_pairs.py --pairs "$WORK/heldout_pairs.jsonl" --output "$WORK/scores_base.json"
"$PYTHON" scripts/score_pairs.py --pairs "$WORK/heldout_pairs.jsonl" --adapter "$WORK/sft" \
  --output "$WORK/scores_sft.json"
"$PYTHON" scripts/score_pairs.py --pairs "$WORK/heldout_pairs.jsonl" --adapter "$WORK/dpo" \
  --reference_adapter "$WORK/sft" --beta "$BETA" --output "$WORK/scores_dpo.json"

echo "== 6. answers to $N_TABLE held-out questions: SFT (before DPO) and SFT + DPO (after)"
head -n "$N_TABLE" "$WORK/heldout.jsonl" > "$WORK/table.jsonl"
"$PYTHON" inference.py --adapter "$WORK/sft" --input_file "$WORK/table.jsonl" --output_file "$WORK/sft_answers.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS"
"$PYTHON" inference.py --adapter "$WORK/dpo" --input_file "$WORK/table.jsonl" --output_file "$WORK/dpo_answers.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS"
"$PYTHON" inference.py --compare "$WORK/sft_answers.jsonl" --predictions "$WORK/dpo_answers.jsonl"
echo "loss and rewards: $WORK/dpo/loss.png; the DPO adapter: $WORK/dpo (python inference.py --adapter $WORK/dpo)"
echo "walkthrough took $(( $(date +%s) - start )) s"
