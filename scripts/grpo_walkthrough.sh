#!/usr/bin/env bash
# docs/grpo.md "Walkthrough": arithmetic word problems a program checks (scripts/make_arithmetic.py), a short LoRA
# SFT that teaches the answer's form ("Answer: N"), then GRPO on its adapter with the accuracy reward; held-out
# problems answered greedily and scored by the same reward before GRPO (the SFT adapter) and after.
# Every variable can be set from the environment, e.g. SFT_STEPS=5 GRPO_STEPS=2 N_HELDOUT=4 bash scripts/grpo_walkthrough.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-output/grpo_walkthrough}
N_TRAIN=${N_TRAIN:-300}
N_HELDOUT=${N_HELDOUT:-48}
SFT_STEPS=${SFT_STEPS:-40}
GRPO_STEPS=${GRPO_STEPS:-40}
GRPO_LR=${GRPO_LR:-2e-5}
GENERATIONS=${GENERATIONS:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-24}
PYTHON=${PYTHON:-python3}
start=$(date +%s)
bash scripts/get_demo_model.sh
mkdir -p "$WORK"

echo "== 1. data: $N_TRAIN training and $N_HELDOUT held-out problems (other seeds)"
"$PYTHON" scripts/make_arithmetic.py --out "$WORK/train.jsonl" --count "$N_TRAIN" --seed 1
"$PYTHON" scripts/make_arithmetic.py --out "$WORK/heldout.jsonl" --count "$N_HELDOUT" --seed 2

echo "== 2. LoRA SFT, $SFT_STEPS steps: the form of an answer"
"$PYTHON" finetune.py --train_file "$WORK/train.jsonl" --output_dir "$WORK/sft" --max_steps "$SFT_STEPS" \
  --per_device_train_batch_size 8 --learning_rate 1e-3 --lora_rank 16 --lora_alpha 32 --max_seq_length 256 \
  --save_strategy no --logging_steps 10 --report_to none

echo "== 3. held-out answers and rewards after SFT"
"$PYTHON" inference.py --adapter "$WORK/sft" --input_file "$WORK/heldout.jsonl" --output_file "$WORK/sft_heldout.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS" --batch_size 16

echo "== 4. GRPO on the SFT adapter, $GRPO_STEPS steps, accuracy reward, $GENERATIONS completions a prompt"
"$PYTHON" finetune.py --stage grpo --adapter "$WORK/sft" --train_file "$WORK/train.jsonl" --output_dir "$WORK/grpo" \
  --reward_funcs accuracy --max_steps "$GRPO_STEPS" --per_device_train_batch_size "$GENERATIONS" \
  --num_generations "$GENERATIONS" --max_completion_length "$MAX_NEW_TOKENS" --learning_rate "$GRPO_LR" \
  --save_strategy no --report_to none

echo "== 5. held-out answers and rewards after GRPO"
"$PYTHON" inference.py --adapter "$WORK/grpo" --input_file "$WORK/heldout.jsonl" \
  --output_file "$WORK/grpo_heldout.jsonl" --max_new_tokens "$MAX_NEW_TOKENS" --batch_size 16
"$PYTHON" scripts/score_rewards.py --predictions "$WORK/sft_heldout.jsonl" "$WORK/grpo_heldout.jsonl" \
  --reward_funcs accuracy --output "$WORK/rewards.json"
"$PYTHON" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
sft = [json.loads(l) for l in (work / "sft_heldout.jsonl").read_text().splitlines()]
grpo = [json.loads(l) for l in (work / "grpo_heldout.jsonl").read_text().splitlines()]
for a, b in list(zip(sft, grpo))[:6]:
    print(f"- {a['prompt'][-90:]!r}\n  reference {a['reference']!r}\n  SFT  {a['prediction']!r}\n  GRPO {b['prediction']!r}")
PY
echo "done in $(( $(date +%s) - start )) s"
