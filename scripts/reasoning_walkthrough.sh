#!/usr/bin/env bash
# docs/walkthroughs.md "Reasoning": a reasoning fine-tune of the default model on AdvertiseGen. Each record's
# reasoning lists the attributes the ad must mention (要点：裙、蓝色、…, built from the record's content by
# scripts/format_advertise_gen_reasoning.py), then comes the ad. SmolLM2's template has no place for reasoning, so
# the model is given a hybrid-reasoning one (Qwen3's layout, scripts/make_reasoning_model.py).
#   format (with and without reasoning) -> check_data (what is trained: the think block and the ad)
#   -> LoRA SFT with reasoning, and the same SFT without it (same steps, seed, records)
#   -> dev predictions: base, tuned with reasoning (thinking on, and off), tuned without
#   -> ROUGE/BLEU of the answers (reasoning excluded) and the attributes the reasoning and the answers mention
# Every variable can be set from the environment, e.g. STEPS=4 N_DEV=4 MAX_NEW_TOKENS=16 bash scripts/reasoning_walkthrough.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/AdvertiseGen}
WORK=${WORK:-output/reasoning}
N_TRAIN=${N_TRAIN:-960}              # training records (AdvertiseGen's train.json has 960)
STEPS=${STEPS:-60}
BATCH=${BATCH:-4}                    # examples a step (about 375 tokens each: about 3 rows of 512)
LR=${LR:-1e-3}
N_DEV=${N_DEV:-32}                   # dev records predicted and scored
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}  # the answer's budget
THINK_TOKENS=${THINK_TOKENS:-96}     # added for the reasoning: its block is 24-94 tokens on the first 32 dev records
THINKING_OFF=${THINKING_OFF:-1}      # 1: also predict with the reasoning adapter and thinking off
PREDICT_BATCH=${PREDICT_BATCH:-16}
PYTHON=${PYTHON:-python3}
start=$(date +%s)
bash scripts/get_demo_model.sh
if [ ! -f "$DATA/train.json" ] || [ ! -f "$DATA/dev.json" ]; then
  echo "error: $DATA/train.json or dev.json not found (AdvertiseGen; set DATA=...)" >&2
  exit 2
fi
mkdir -p "$WORK"
OFF='{"enable_thinking": false}'
SANITY='^Sanity Check\|Sanity Check$\| -> '  # the Sanity Check's per-token lines: the trained text is shown instead
say() { echo "$1 ${*:2} [at $(( $(date +%s) - start )) s]"; }

say == "1. the default model's weights with a hybrid-reasoning chat template"
"$PYTHON" scripts/make_reasoning_model.py --out "$WORK/model"

say == "2. data: AdvertiseGen as OpenAI messages, with reasoning (要点：the attribute values) and without"
"$PYTHON" scripts/format_advertise_gen_reasoning.py --path "$DATA/train.json" --out "$WORK/train.jsonl" \
  --no_reasoning_out "$WORK/train_plain.jsonl" --limit "$N_TRAIN"
"$PYTHON" scripts/format_advertise_gen_reasoning.py --path "$DATA/dev.json" --out "$WORK/dev.jsonl" \
  --no_reasoning_out "$WORK/dev_plain.jsonl" --limit "$N_DEV"
head -n 1 "$WORK/train.jsonl"

say == "3. check: what is trained of the first record, with reasoning and without"
for name in train train_plain; do
  "$PYTHON" scripts/check_data.py --model "$WORK/model" --train_file "$WORK/$name.jsonl" --max_seq_length 512 \
    --dump "$WORK/${name}_dump.jsonl" | grep -v -- "$SANITY"
done
"$PYTHON" - "$WORK" <<'PY'
import json, sys
from transformers import AutoTokenizer
work = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{work}/model")
for name in ("train", "train_plain"):
    first = json.loads(open(f"{work}/{name}_dump.jsonl", encoding="utf-8").readline())
    trained = [t for t, label in zip(first["input_ids"], first["labels"]) if label != -100]
    print(f"{name}.jsonl, record {first['record']}, trained: {tok.decode(trained)!r}")
PY

say == "4. LoRA SFT with reasoning, then without: $STEPS steps of $BATCH records each, seed 42"
for run in reasoning plain; do
  train=$WORK/train.jsonl
  [ "$run" = plain ] && train=$WORK/train_plain.jsonl
  "$PYTHON" finetune.py --model_name_or_path "$WORK/model" --method lora --train_file "$train" \
    --output_dir "$WORK/$run" --max_seq_length 512 --per_device_train_batch_size "$BATCH" --learning_rate "$LR" \
    --max_steps "$STEPS" --lora_rank 16 --lora_alpha 32 --warmup_steps "$(( STEPS < 20 ? 0 : 5 ))" \
    --logging_steps "$(( STEPS < 20 ? 1 : 10 ))" --save_strategy no --report_to none --seed 42 \
    | grep -v -- "$SANITY"
done

say == "5. $N_DEV dev records, greedy; answers scored without their reasoning"
say -- "base (its own layout: no think block in the prompt), $MAX_NEW_TOKENS tokens"
"$PYTHON" inference.py --model "$WORK/model" --input_file "$WORK/dev.jsonl" --output_file "$WORK/base.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS" --batch_size "$PREDICT_BATCH" --eval
say -- "tuned with reasoning, thinking on: $MAX_NEW_TOKENS + $THINK_TOKENS tokens for the reasoning"
"$PYTHON" inference.py --adapter "$WORK/reasoning" --input_file "$WORK/dev.jsonl" \
  --output_file "$WORK/reasoning.jsonl" --max_new_tokens "$(( MAX_NEW_TOKENS + THINK_TOKENS ))" \
  --batch_size "$PREDICT_BATCH" --eval --score_reasoning
runs=(--run "base=$WORK/base.jsonl" --run "reasoning=$WORK/reasoning.jsonl")
if [ "$THINKING_OFF" = 1 ]; then
  say -- "tuned with reasoning, thinking off (the empty think block in the prompt), $MAX_NEW_TOKENS tokens"
  "$PYTHON" inference.py --adapter "$WORK/reasoning" --chat_template_kwargs "$OFF" --input_file "$WORK/dev.jsonl" \
    --output_file "$WORK/reasoning_off.jsonl" --max_new_tokens "$MAX_NEW_TOKENS" --batch_size "$PREDICT_BATCH" --eval
  runs+=(--run "reasoning-off=$WORK/reasoning_off.jsonl")
fi
# trained on empty think blocks: the prompt holds the one it was trained to write, so the answer gets the budget
say -- "tuned without reasoning (the empty think block in the prompt), $MAX_NEW_TOKENS tokens"
"$PYTHON" inference.py --adapter "$WORK/plain" --chat_template_kwargs "$OFF" --input_file "$WORK/dev_plain.jsonl" \
  --output_file "$WORK/plain.jsonl" --max_new_tokens "$MAX_NEW_TOKENS" --batch_size "$PREDICT_BATCH" --eval
runs+=(--run "plain=$WORK/plain.jsonl")

say == "6. side by side (answer scores from --eval; then the answers cut to $MAX_NEW_TOKENS tokens)"
"$PYTHON" scripts/score_attributes.py "${runs[@]}" --cut_tokens "$MAX_NEW_TOKENS" --tokenizer "$WORK/model" \
  --output "$WORK/scores.json"
"$PYTHON" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = {n: [json.loads(l) for l in (work / f"{n}.jsonl").read_text(encoding="utf-8").splitlines()]
        for n in ("base", "reasoning", "plain")}
for i in range(min(2, len(rows["base"]))):
    print(f"- {rows['base'][i]['prompt'].split('user')[-1].split('<|im_end|>')[0].strip()}")
    print(f"  reference  {rows['base'][i]['reference'][:90]!r}")
    print(f"  base       {rows['base'][i]['answer'][:90]!r}")
    print(f"  reasoning  thinking {rows['reasoning'][i]['reasoning']!r}")
    print(f"             answer   {rows['reasoning'][i]['answer'][:90]!r}")
    print(f"  plain      {rows['plain'][i]['answer'][:90]!r}")
PY
echo "adapters: $WORK/reasoning, $WORK/plain (python inference.py --adapter $WORK/reasoning --prompt '类型#裙*颜色#蓝色')"
echo "walkthrough took $(( $(date +%s) - start )) s"
