#!/usr/bin/env bash
# The online loop on a CPU — sample from a policy, label the samples with a reward model, train on the
# labels, judge the result — with the built-in tiny GPT-NeoX and the built-in synthetic data.
#
#   examples/scripts/run_online_cpu.sh [OUT_DIR]         # default runs/online
#
# 1. reference: SFT on the chosen answers of the preference data (train_sft_pref);
# 2. two reward models on the built-in pairs (train_rm): the labeller (seed SEED) and a judge trained
#    on other pairs from another seed (JUDGE_SEED), so the judge is not the reward the policies optimised;
# 3. sample K completions for each of PROMPTS training prompts from the reference (batch_inference);
# 4. label them with the labeller: --post_processor exo (K completions + rewards) and iter_dpo (best vs
#    worst);
# 5. train EXO-rw (train_exo --loss exo-rw) and iterative DPO (train_dpo) from the reference on them;
# 6. greedy answers of the reference and both policies to EVAL_PROMPTS held-out prompts, judged against
#    the reference by eval_winrate → OUT/judge/winrate.{md,json,png};
# 7. if DEMO (default runs/demo, from examples/scripts/run_demo_cpu.sh) holds the demo's models: their
#    greedy answers, judged against sequential SFT→DPO → OUT/judge_demo/winrate.{md,json,png}.
# CHAT=1 runs the same loop on conversational data: the built-in pairs written in TRL's conversational layout
# (prompt: a system and a user message; chosen/rejected: one assistant message) under OUT/chat_data, rendered by
# the built-in tokenizer's chat template; the samples keep the messages and the post-processors write
# conversational records (step 7 is skipped).
# Single-process runs with OMP_NUM_THREADS=THREADS; sizes are environment variables (defaults below).
# The results are in docs/online_cpu.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:-${OUT:-runs/online}}
SEED=${SEED:-42}
JUDGE_SEED=${JUDGE_SEED:-7}
REF_STEPS=${REF_STEPS:-150}
RM_STEPS=${RM_STEPS:-40}
PROMPTS=${PROMPTS:-128}
K=${K:-4}
MAX_NEW=${MAX_NEW:-48}
TEMPERATURE=${TEMPERATURE:-1.0}
EPOCHS=${EPOCHS:-2}
LR=${LR:-1e-4}
BETA=${BETA:-0.1}
EVAL_PROMPTS=${EVAL_PROMPTS:-128}
EVAL_MAX_NEW=${EVAL_MAX_NEW:-96}  # the judged answers: room to finish (the built-in answers are < 100 bytes)
DEMO=${DEMO:-runs/demo}
THREADS=${THREADS:-2}
SKIP_DONE=${SKIP_DONE:-0}        # 1: keep the steps an earlier invocation finished (e.g. to retrain with another LR)
CHAT=${CHAT:-0}

export OMP_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LOGS=$OUT/logs
mkdir -p "$LOGS"
START=$SECONDS

step() {  # step NAME MODULE ARGS...: one single-process run, its output in LOGS/NAME.log
    local name=$1 module=$2
    shift 2
    if [[ $SKIP_DONE == 1 && -e $LOGS/$name.done ]]; then
        echo "  [$(( SECONDS - START ))s] $name: kept from an earlier run"
        return
    fi
    rm -f "$LOGS/$name.done"
    echo "  [$(( SECONDS - START ))s] $name: $module $*"
    if ! python -m "xright.cli.$module" "$@" >"$LOGS/$name.log" 2>&1; then
        echo "$name failed; the end of $LOGS/$name.log:" >&2
        tail -n 25 "$LOGS/$name.log" >&2
        exit 1
    fi
    touch "$LOGS/$name.done"
}

DATA=() JUDGE_DATA=() PROMPTS_DATA=()
if [[ $CHAT == 1 ]]; then  # the built-in pairs as conversations: train/test of the labeller's and the judge's draws
    python - "$OUT/chat_data" "$SEED" "$JUDGE_SEED" <<'EOF'
import json, os, sys
from xright.data.synthetic import preference_records
for seed in sys.argv[2:]:
    os.makedirs(f"{sys.argv[1]}/{seed}", exist_ok=True)
    for split, pool in (("train", "train"), ("test", "eval")):
        with open(f"{sys.argv[1]}/{seed}/{split}.jsonl", "w") as f:
            for r in preference_records(2000, int(seed), pool):
                answers = {k: [{"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}
                f.write(json.dumps({"prompt": [{"role": "system", "content": "Answer briefly."},
                                               {"role": "user", "content": r["prompt"]}], **answers}) + "\n")
EOF
    DATA=(--dataset "$OUT/chat_data/$SEED" --prompt_key prompt)
    JUDGE_DATA=(--dataset "$OUT/chat_data/$JUDGE_SEED" --prompt_key prompt)
    PROMPTS_DATA=(--dataset "$OUT/chat_data/$SEED" --input_key prompt)
fi

REF=$OUT/ref
TRAIN=(--zero_stage 0 --lr_scheduler constant --eval_split "" --logging_steps 1 --seed "$SEED" --ckpt_path "$OUT/ckpt")
echo "1/6 reference ($REF_STEPS steps)"
step ref train_sft_pref --save_path "$REF" --train_batch_size 1 --rlhf_micro_train_batch_size 16 \
    --max_steps "$REF_STEPS" --learning_rate 2e-3 --eval_steps "$REF_STEPS" --seed "$SEED" "${DATA[@]}"
echo "2/6 reward models: labeller and judge ($RM_STEPS steps each)"
RM=(--train_batch_size 16 --micro_train_batch_size 16 --max_steps "$RM_STEPS" --learning_rate 1e-3
    --lr_scheduler constant --eval_steps "$RM_STEPS")
step rm train_rm --save_path "$OUT/rm" "${RM[@]}" --seed "$SEED" "${DATA[@]}"
step judge_rm train_rm --save_path "$OUT/judge_rm" "${RM[@]}" --seed "$JUDGE_SEED" "${JUDGE_DATA[@]}"
echo "3/6 sample K=$K completions for $PROMPTS prompts from the reference"
step sample batch_inference --eval_task generate --pretrain "$REF" --max_samples "$PROMPTS" --best_of_n "$K" \
    --max_new_tokens "$MAX_NEW" --temperature "$TEMPERATURE" --micro_batch_size 32 --seed "$SEED" \
    --output_path "$OUT/samples.jsonl" "${PROMPTS_DATA[@]}"
echo "4/6 label them with the labelling reward model"
for proc in exo iter_dpo; do
    step "label_$proc" batch_inference --eval_task rm --pretrain "$OUT/rm" --dataset "$OUT/samples.jsonl" \
        --post_processor "$proc" --output_path "$OUT/$proc.jsonl"
done
echo "5/6 train EXO-rw and iterative DPO from the reference"
step exo_rw train_exo --loss exo-rw --pretrain "$REF" --dataset "$OUT/exo.jsonl" --save_path "$OUT/exo_rw" \
    "${TRAIN[@]}" --train_batch_size 8 --micro_train_batch_size 8 --max_epochs "$EPOCHS" --learning_rate "$LR" \
    --beta "$BETA"
step iter_dpo train_dpo --pretrain "$REF" --dataset "$OUT/iter_dpo.jsonl" --save_path "$OUT/iter_dpo" \
    "${TRAIN[@]}" --train_batch_size 8 --micro_train_batch_size 8 --max_epochs "$EPOCHS" --learning_rate "$LR" \
    --beta "$BETA"
echo "6/6 greedy answers to $EVAL_PROMPTS held-out prompts, judged against the reference"
GEN=(--eval_task generate --dataset_split test --max_samples "$EVAL_PROMPTS" --max_new_tokens "$EVAL_MAX_NEW"
     --greedy_sampling --micro_batch_size 32 "${PROMPTS_DATA[@]}")
for m in ref exo_rw iter_dpo; do
    step "answers_$m" batch_inference "${GEN[@]}" --pretrain "$OUT/$m" --output_path "$OUT/answers_$m.jsonl"
done
step judge eval_winrate --reward_pretrain "$OUT/judge_rm" --baseline "$OUT/answers_ref.jsonl" \
    --baseline_name reference --candidates "$OUT/answers_exo_rw.jsonl,$OUT/answers_iter_dpo.jsonl" \
    --names exo-rw,iter-dpo --output_dir "$OUT/judge"
cat "$OUT/judge/winrate.md"

DEMO_RUNS=(alright_0.5 maxright_0.5 mix_0.5 seq_dpo_sft)
if [[ $CHAT == 1 ]]; then
    :  # the demo's models were trained on plain prompts
elif [[ -f $DEMO/seq_sft_dpo/config.json ]]; then
    echo "7/7 the demo's models ($DEMO), judged against sequential SFT→DPO"
    names=() files=()
    for m in seq_sft_dpo "${DEMO_RUNS[@]}"; do
        [[ -f $DEMO/$m/config.json ]] || continue
        step "answers_demo_$m" batch_inference "${GEN[@]}" --pretrain "$DEMO/$m" --output_path "$OUT/demo_$m.jsonl"
        [[ $m == seq_sft_dpo ]] || { names+=("$m"); files+=("$OUT/demo_$m.jsonl"); }
    done
    step judge_demo eval_winrate --reward_pretrain "$OUT/judge_rm" --baseline "$OUT/demo_seq_sft_dpo.jsonl" \
        --baseline_name "sequential SFT→DPO" --candidates "$(IFS=,; echo "${files[*]}")" \
        --names "$(IFS=,; echo "${names[*]}")" --output_dir "$OUT/judge_demo"
    cat "$OUT/judge_demo/winrate.md"
else
    echo "(no demo models in $DEMO: run examples/scripts/run_demo_cpu.sh first to judge them too)"
fi
echo "online loop done in $(( SECONDS - START )) s"
