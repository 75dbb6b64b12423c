# Shared by run_paper_pythia1b.sh and run_paper_llama3_8b.sh (source it; don't run it).
#
# The runs of Fernando et al. 2024 ("Mitigating Forgetting in LLM Supervised Fine-Tuning and Preference
# Learning") with xright's CLIs, following the paper's scripts (github.com/heshandevaka/XRIGHT,
# examples/scripts/*.sh). The model script sets the hyperparameters; these functions run the stages:
#
#   optima      SFT-only model (the "SFT reference"), SFT on the chosen answers of the preference data
#               (the "preference reference"), DPO-only models from both references
#   seq_sft_dpo sequential SFT→DPO for every split in NA_SET (DPO epochs na, SFT epochs EPOCHS − na)
#   seq_dpo_sft sequential DPO→SFT for every split in NA_SET
#   joint       Mix, ALRIGHT and MAXRIGHT for every λ in LAMBD_SET, with the reference REF_KIND
#   plot        plot_pareto over everything above (loss space + table)
#
# Batch sizes are the paper's: xright's CLIs named after XRIGHT's count --train_batch_size as XRIGHT does
# (loader batches: TRAIN_BATCH = number of GPUs is one loader batch of SFT_MICRO or RLHF_MICRO examples
# per GPU per optimizer step; see README, "Coming from XRIGHT"). Every run prints its batch geometry.
#
# Where xright differs from XRIGHT and the scripts therefore differ from the paper's:
#  * Learning-rate schedule. XRIGHT's trainers use a constant learning rate whatever --lr_scheduler
#    says; xright honours the flag, so the scripts pass --lr_scheduler constant (LR_SCHEDULER).
#  * XRIGHT's SFT-on-chosen trainer (train_sft_pref) also trains on the prompt tokens; xright's masks
#    them (the paper describes SFT on the chosen responses).

set -euo pipefail

: "${LAUNCH:=deepspeed}"            # e.g. LAUNCH="deepspeed --num_gpus 4" or "deepspeed --hostfile hosts"
: "${CKPT:=./checkpoint}"
: "${LR_SCHEDULER:=constant}"
: "${WANDB:=True}"                  # --use_wandb value; set WANDB= to turn wandb off
: "${EVAL_STEPS:=100}"
: "${SEED:=42}"
[[ -v EXTRA_FLAGS ]] || EXTRA_FLAGS=()   # more flags for every run, e.g. (--gradient_checkpointing)

ckpt() { echo "$CKPT/$MODEL_TAG-beta=$BETA-learning_rate=$LR-$1"; }

# flags every run shares (model, LoRA, DeepSpeed, optimisation, logging)
base_flags() {
    local flags=(
        --save_steps -1 --logging_steps 1 --eval_steps "$EVAL_STEPS" --seed "$SEED"
        --train_batch_size "$TRAIN_BATCH" --learning_rate "$LR" --lr_scheduler "$LR_SCHEDULER"
        --bf16 --flash_attn --zero_stage 2
        --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --target_modules $TARGET_MODULES
        "${EXTRA_FLAGS[@]}"
    )
    [[ -n $WANDB ]] && flags+=(--use_wandb "$WANDB")
    printf '%s\n' "${flags[@]}"
}

# data flags of the two-objective CLIs (train_sft_seq, train_dpo_seq, train_sft_dpo_*). alpaca-gpt4 has
# no test split: OpenRLHF 0.3.6 then evaluates on the first 3 % of train, which is what "dummy" asks for.
joint_flags() {
    printf '%s\n' \
        --sft_dataset "$SFT_DATASET" --sft_max_samples "$SFT_MAX_SAMPLES" --sft_max_len "$MAX_LEN" \
        --sft_micro_train_batch_size "$SFT_MICRO" --sft_eval_split dummy \
        --rlhf_dataset "$RLHF_DATASET" --rlhf_max_samples "$RLHF_MAX_SAMPLES" --rlhf_max_len "$MAX_LEN" \
        --rlhf_micro_train_batch_size "$RLHF_MICRO" --rlhf_eval_split dummy --beta "$BETA"
}

run() {  # run MODULE ARGS...  (train_sft_pref takes its own data flags)
    local module=$1 flags
    shift
    mapfile -t flags < <(base_flags; [[ $module == train_sft_pref ]] || joint_flags)
    echo "+ $LAUNCH --module xright.cli.$module $(printf '%q ' "${flags[@]}" "$@")"
    [[ -n ${DRY_RUN:-} ]] || $LAUNCH --module "xright.cli.$module" "${flags[@]}" "$@"
}

stage_optima() {
    # SFT only, from the base model: the SFT optimum and the "SFT reference" of the joint runs
    run train_sft_seq --pretrain "$BASE" --max_epochs "$OPT_EPOCHS" --save_path "$(ckpt epoch=$OPT_EPOCHS-sft-optim)"
    # SFT on the chosen answers of the preference data: the "preference reference"
    run train_sft_pref --pretrain "$BASE" --max_epochs "$OPT_EPOCHS" --save_path "$(ckpt epoch=$OPT_EPOCHS-sft-pref-optim)" \
        --dataset "$RLHF_DATASET" --max_samples "$SFT_MAX_SAMPLES" --max_len "$MAX_LEN" --eval_split dummy \
        --rlhf_micro_train_batch_size $((SFT_MICRO / 2))   # as the paper's script
    # DPO only, with either reference: the DPO optimum
    for ref in sft pref; do
        local refdir
        refdir=$(ckpt "epoch=$OPT_EPOCHS-$([[ $ref == sft ]] && echo sft || echo sft-pref)-optim")
        run train_dpo_seq --pretrain "$BASE" --ref_pretrain "$refdir" --max_epochs "$OPT_EPOCHS" \
            --save_path "$(ckpt epoch=$OPT_EPOCHS-dpo-$ref-ref-optim)"
    done
}

reference() {  # reference KIND: the DPO reference model, KIND = sft (the SFT optimum) | pref (SFT on chosen)
    ckpt "epoch=$OPT_EPOCHS-$([[ $1 == sft ]] && echo sft || echo sft-pref)-optim"
}

# The paper pairs SFT→DPO with the SFT-optimum reference and DPO→SFT with the preference reference
# (run_sft_dpo_seq_* / run_dpo_sft_seq_*); SEQ_SFT_DPO_REF / SEQ_DPO_SFT_REF change that.
stage_seq_sft_dpo() {
    local ref=${SEQ_SFT_DPO_REF:-sft}
    for na in $NA_SET; do
        local first second
        first=$(ckpt "$ref-ref-seq-sft-na-$((EPOCHS - na))")
        second=$(ckpt "$ref-ref-seq-sft-dpo-na-$na")
        run train_sft_seq --pretrain "$BASE" --ref_pretrain "$(reference "$ref")" --max_epochs $((EPOCHS - na)) \
            --save_path "$first"
        run train_dpo_seq --pretrain "$first" --ref_pretrain "$(reference "$ref")" --max_epochs "$na" \
            --save_path "$second"
    done
}

stage_seq_dpo_sft() {
    local ref=${SEQ_DPO_SFT_REF:-pref}
    for na in $NA_SET; do
        local first second
        first=$(ckpt "$ref-ref-seq-dpo-na-$na")
        second=$(ckpt "$ref-ref-seq-dpo-sft-na-$((EPOCHS - na))")
        run train_dpo_seq --pretrain "$BASE" --ref_pretrain "$(reference "$ref")" --max_epochs "$na" --save_path "$first"
        run train_sft_seq --pretrain "$first" --ref_pretrain "$(reference "$ref")" --max_epochs $((EPOCHS - na)) \
            --save_path "$second"
    done
}

stage_joint() {
    for lambd in $LAMBD_SET; do
        local opt=(--lambd "$lambd" --sft_opt "$SFT_OPT" --dpo_opt "$DPO_OPT" --pretrain "$BASE"
                   --ref_pretrain "$(reference "$REF_KIND")" --max_epochs "$EPOCHS")
        # ALRIGHT runs without a reference front (as in the paper's scripts); Mix and MAXRIGHT stop
        # early once they dominate a point of it
        run train_sft_dpo_alright "${opt[@]}" --ref_pareto_sft "" --ref_pareto_dpo "" \
            --save_path "$(ckpt "$REF_KIND-ref-sft_dpo_alright-lambd-$lambd")"
        run train_sft_dpo_maxright "${opt[@]}" --ref_pareto_sft "$REF_PARETO_SFT" --ref_pareto_dpo "$REF_PARETO_DPO" \
            --max_eval_steps "$MAX_EVAL_STEPS" --save_path "$(ckpt "$REF_KIND-ref-sft_dpo_maxright-lambd-$lambd")"
        run train_sft_dpo_mix "${opt[@]}" --ref_pareto_sft "$REF_PARETO_SFT" --ref_pareto_dpo "$REF_PARETO_DPO" \
            --save_path "$(ckpt "$REF_KIND-ref-sft_dpo_mix-lambd-$lambd")"
    done
}

stage_plot() {
    local runs=()
    for d in "$(ckpt epoch=$OPT_EPOCHS-sft-optim)" "$(ckpt epoch=$OPT_EPOCHS-dpo-$REF_KIND-ref-optim)"; do
        [[ -f $d/metrics.jsonl ]] && runs+=("$d")
    done
    # the runs that used the REF_KIND reference: its sequential runs (either order) and joint runs
    for d in "$(ckpt "$REF_KIND-ref-")"{seq-,sft_dpo_}*; do
        [[ -f $d/metrics.jsonl ]] && runs+=("$d")
    done
    if [[ ${#runs[@]} -eq 0 ]]; then echo "plot: no finished runs under $CKPT" >&2; return; fi
    python -m xright.cli.plot_pareto "${runs[@]}" --out "$CKPT/$MODEL_TAG-pareto-$REF_KIND-ref" \
        --sft_opt "$SFT_OPT" --dpo_opt "$DPO_OPT" --title "$MODEL_TAG: final eval losses ($REF_KIND reference)"
}

main() {  # main [STAGE...]: the stages to run, in order (default: all)
    local stages=("$@")
    [[ ${#stages[@]} -gt 0 ]] || stages=(optima seq_sft_dpo seq_dpo_sft joint plot)
    for s in "${stages[@]}"; do
        declare -F "stage_$s" >/dev/null || { echo "unknown stage $s (optima seq_sft_dpo seq_dpo_sft joint plot)" >&2; exit 2; }
        echo "=== $MODEL_TAG: $s"
        "stage_$s"
    done
}
