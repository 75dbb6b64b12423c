#!/usr/bin/env bash
# The paper's whole pipeline (Fernando et al. 2024) on a CPU, with the built-in tiny GPT-NeoX and the
# built-in synthetic data: no GPU, no download.
#
#   examples/scripts/run_demo_cpu.sh [OUT_DIR]          # default runs/demo
#
# 1. reference: SFT on the preference data's chosen answers (train_sft_pref), as the paper's
#    reference policy; every later run starts from it and uses it as the DPO reference;
# 2. optima: SFT only and DPO only, OPT_STEPS each, from the reference → --sft_opt / --dpo_opt
#    (the best eval loss of each; the ideal point);
# 3. sequential SFT→DPO and DPO→SFT: train_sft_seq / train_dpo_seq, PHASE_STEPS each, the second
#    phase starting from the first one's output (--pretrain) with the reference as --ref_pretrain;
# 4. Mix, ALRIGHT, MAXRIGHT at every λ in LAMBDAS, each with 2 × PHASE_STEPS optimizer steps: the
#    same number of steps as a whole sequential run;
# 5. plot_pareto over all of them → OUT_DIR/pareto.png and OUT_DIR/pareto.md.
#
# Sizes and hyperparameters are environment variables (defaults below). Runs are single-process
# (`python -m`; LAUNCHER=deepspeed uses `deepspeed --num_gpus 1` instead), JOBS at a time with
# OMP_NUM_THREADS=THREADS each. The built-in data: SFT answers small tasks tersely ("reverse 'abc'"
# → "cba"); the preference pairs, on other prompts of the same tasks, prefer a hedged wordy answer
# over the terse one, so DPO pushes against what SFT learns (see xright/data/synthetic.py).
# Time: 19 minutes with the defaults on a 2-core machine that other jobs kept at load ≈ 4; most of it is
# waiting for CPU. Quicker look: PHASE_STEPS=30 REF_STEPS=150 LAMBDAS=0.5. The result is in
# docs/demo_pareto.md. Losses are deterministic for a given SEED and sizes.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:-${OUT:-runs/demo}}
BATCH=${BATCH:-16}                 # examples per micro-batch of both objectives; one micro-batch per step
LR=${LR:-1e-3}                     # every run after the reference
LR_SCHEDULER=${LR_SCHEDULER:-constant}   # as XRIGHT's trainers (the reference uses the default cosine)
BETA=${BETA:-0.1}
REF_STEPS=${REF_STEPS:-250}
REF_LR=${REF_LR:-2e-3}
PHASE_STEPS=${PHASE_STEPS:-60}     # one sequential phase; joint runs get 2 × PHASE_STEPS
OPT_STEPS=${OPT_STEPS:-$((2 * PHASE_STEPS))}   # as the paper: the optimum runs train as long as a joint run
EVAL_STEPS=${EVAL_STEPS:-25}       # (a multiple of it at the last step would evaluate twice there)
MAX_EVAL_STEPS=${MAX_EVAL_STEPS:-10}   # MAXRIGHT: refresh both stale losses every N steps
LAMBDAS=${LAMBDAS:-"0.25 0.5 0.75"}
SEED=${SEED:-42}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
LAUNCHER=${LAUNCHER:-python}       # python | deepspeed
SKIP_DONE=${SKIP_DONE:-0}          # 1: keep runs of an earlier invocation that finished

export OMP_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LOGS=$OUT/logs
mkdir -p "$LOGS"
rm -f "$OUT/.failed"
START=$SECONDS
PORT=$((29600 + RANDOM % 2000))

finished() { [[ -f $1/metrics.jsonl ]] && grep -q '"done": true' "$1/metrics.jsonl"; }

declare -A PID
run() {  # run NAME MODULE ARGS... : in the background, at most JOBS at a time
    local name=$1 module=$2
    shift 2
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
    check
    if [[ $SKIP_DONE == 1 ]] && finished "$OUT/$name"; then
        echo "  [$(( SECONDS - START ))s] $name: kept from an earlier run"
        return
    fi
    local cmd=(python -m "xright.cli.$module")
    if [[ $LAUNCHER == deepspeed ]]; then
        PORT=$((PORT + 1))
        cmd=(deepspeed --num_gpus 1 --master_port "$PORT" --module "xright.cli.$module")
    fi
    echo "  [$(( SECONDS - START ))s] $name: $module $*"
    (
        if ! "${cmd[@]}" --save_path "$OUT/$name" --seed "$SEED" "$@" >"$LOGS/$name.log" 2>&1; then
            echo "run $name failed; the end of $LOGS/$name.log:" >&2
            tail -n 25 "$LOGS/$name.log" >&2
            touch "$OUT/.failed"
            exit 1
        fi
    ) &
    PID[$name]=$!
}

check() {
    if [[ -e $OUT/.failed ]]; then echo "demo: a run failed (logs in $LOGS)" >&2; wait; exit 1; fi
}

after() {  # after NAME...: wait until these runs have finished (the others keep running)
    for name in "$@"; do
        [[ -n ${PID[$name]:-} ]] && { wait "${PID[$name]}" 2>/dev/null || true; }
    done
    check
}

best_eval() {  # best_eval RUN_DIR OBJECTIVE: the lowest eval loss of that objective over the run
    python - "$1" "$2" <<'EOF'
import json, sys
key = f"eval/{sys.argv[2]}/loss"
with open(sys.argv[1] + "/metrics.jsonl") as f:
    values = [r[key] for r in map(json.loads, filter(str.strip, f)) if key in r]
print(f"{min(values):.4f}")
EOF
}

REF=$OUT/ref
# the flags every run after the reference shares; every run uses the reference as DPO reference.
# --train_batch_size as XRIGHT means it: loader batches per step over all processes (1 process here)
COMMON=(--ref_pretrain "$REF" --train_batch_size 1 --sft_micro_train_batch_size "$BATCH"
        --rlhf_micro_train_batch_size "$BATCH" --learning_rate "$LR" --lr_scheduler "$LR_SCHEDULER"
        --beta "$BETA" --eval_steps "$EVAL_STEPS" --logging_steps 1)
JOINT_STEPS=$((2 * PHASE_STEPS))

echo "1/5 reference: SFT on the chosen answers of the preference data ($REF_STEPS steps)"
run ref train_sft_pref --train_batch_size 1 --rlhf_micro_train_batch_size "$BATCH" \
    --max_steps "$REF_STEPS" --learning_rate "$REF_LR" --eval_steps "$REF_STEPS"
after ref

# JOBS runs at a time, in this order; a run that needs another one's result waits for it ("after")
echo "2/5 optima ($OPT_STEPS steps each)"
run opt_sft train_sft_seq --pretrain "$REF" "${COMMON[@]}" --max_steps "$OPT_STEPS"
run opt_dpo train_dpo_seq --pretrain "$REF" "${COMMON[@]}" --max_steps "$OPT_STEPS"
echo "3/5 sequential SFT→DPO and DPO→SFT, phase 1 ($PHASE_STEPS steps each)"
run seq_sft train_sft_seq --pretrain "$REF" "${COMMON[@]}" --max_steps "$PHASE_STEPS"
run seq_dpo train_dpo_seq --pretrain "$REF" "${COMMON[@]}" --max_steps "$PHASE_STEPS"
echo "4/5 Mix and ALRIGHT, λ ∈ {$LAMBDAS} ($JOINT_STEPS steps each)"
for l in $LAMBDAS; do
    run "mix_$l" train_sft_dpo_mix --pretrain "$REF" "${COMMON[@]}" --lambd "$l" --max_steps "$JOINT_STEPS"
    run "alright_$l" train_sft_dpo_alright --pretrain "$REF" "${COMMON[@]}" --lambd "$l" --max_steps "$JOINT_STEPS"
done
echo "3/5 sequential, phase 2 (from phase 1's model; the reference stays the DPO reference)"
after seq_sft
run seq_sft_dpo train_dpo_seq --pretrain "$OUT/seq_sft" "${COMMON[@]}" --max_steps "$PHASE_STEPS"
after seq_dpo
run seq_dpo_sft train_sft_seq --pretrain "$OUT/seq_dpo" "${COMMON[@]}" --max_steps "$PHASE_STEPS"
after opt_sft opt_dpo
SFT_OPT=$(best_eval "$OUT/opt_sft" sft)
DPO_OPT=$(best_eval "$OUT/opt_dpo" dpo)
echo "   ideal point: --sft_opt $SFT_OPT --dpo_opt $DPO_OPT"
echo "4/5 MAXRIGHT, λ ∈ {$LAMBDAS} ($JOINT_STEPS steps each, stale losses refreshed every $MAX_EVAL_STEPS)"
for l in $LAMBDAS; do
    # --eps 0: don't stop early near the optimum (it is the single-objective runs' best)
    run "maxright_$l" train_sft_dpo_maxright --pretrain "$REF" "${COMMON[@]}" --lambd "$l" \
        --max_steps "$JOINT_STEPS" --sft_opt "$SFT_OPT" --dpo_opt "$DPO_OPT" --max_eval_steps "$MAX_EVAL_STEPS" --eps 0
done
wait
check

echo "5/5 the picture"
runs=(opt_sft opt_dpo seq_sft seq_sft_dpo seq_dpo seq_dpo_sft)
for l in $LAMBDAS; do runs+=("mix_$l" "alright_$l" "maxright_$l"); done
python -m xright.cli.plot_pareto "${runs[@]/#/$OUT/}" --out "$OUT" --sft_opt "$SFT_OPT" --dpo_opt "$DPO_OPT" --inset \
    --title "tiny GPT-NeoX, built-in data: sequential $PHASE_STEPS+$PHASE_STEPS steps, joint $JOINT_STEPS steps"
echo "demo done in $(( SECONDS - START )) s: $OUT/pareto.png, $OUT/pareto.md"
