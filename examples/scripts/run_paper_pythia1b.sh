#!/usr/bin/env bash
# Pythia-1b runs of Fernando et al. 2024 on 2 GPUs (the paper's setting), with xright:
#
#   examples/scripts/run_paper_pythia1b.sh                  # every stage
#   examples/scripts/run_paper_pythia1b.sh optima           # or some of: optima seq_sft_dpo seq_dpo_sft joint plot
#   REF_KIND=sft examples/scripts/run_paper_pythia1b.sh joint plot
#   DRY_RUN=1 examples/scripts/run_paper_pythia1b.sh        # print the commands only
#
# Hyperparameters from the paper's scripts (github.com/heshandevaka/XRIGHT, examples/scripts/
# run_sft_dpo_optim_pythia1b.sh, run_sft_dpo_seq_pythia1b.sh, run_dpo_sft_seq_pythia1b.sh,
# run_moo_{sft,pref}_ref_training_pythia1b.sh). Differences from them are explained in paper_lib.sh.
cd "$(dirname "$0")/../.."
source examples/scripts/paper_lib.sh

MODEL_TAG=pythia-1b
BASE=${BASE:-EleutherAI/pythia-1b}
SFT_DATASET=${SFT_DATASET:-vicgalle/alpaca-gpt4}
RLHF_DATASET=${RLHF_DATASET:-Dahoas/rm-hh-rlhf}
GPUS=${GPUS:-2}
LAUNCH=${LAUNCH_CMD:-deepspeed --num_gpus $GPUS}
BETA=0.1
LR=5e-5
MAX_LEN=2048
SFT_MAX_SAMPLES=24000
RLHF_MAX_SAMPLES=8000
SFT_MICRO=12
RLHF_MICRO=4
TRAIN_BATCH=${TRAIN_BATCH:-$GPUS}   # as the paper: one loader batch per GPU per optimizer step
LORA_RANK=32
LORA_ALPHA=32
TARGET_MODULES=query_key_value
OPT_EPOCHS=6              # optimum (single-objective) runs
EPOCHS=6                  # sequential: na DPO epochs + (6 − na) SFT epochs; joint: 6 epochs
NA_SET=${NA_SET:-"1 2 3 4 5"}
LAMBD_SET=${LAMBD_SET:-"0.01 0.25 0.5 0.75 0.99"}
MAX_EVAL_STEPS=10
REF_KIND=${REF_KIND:-pref}  # pref: reference = SFT on the chosen answers (run_moo_pref_ref_*); sft: the SFT optimum
# optima and reference Pareto fronts the paper measured (replace them with your optima runs' final losses)
SFT_OPT=${SFT_OPT:-1.4980}
if [[ $REF_KIND == pref ]]; then
    DPO_OPT=${DPO_OPT:-0.0647}
    REF_PARETO_SFT=${REF_PARETO_SFT:-"1.8898 1.631 1.5889 1.5474 1.4998"}
    REF_PARETO_DPO=${REF_PARETO_DPO:-"0.0659 0.1753 0.3331 0.5559 1.0433"}
else
    DPO_OPT=${DPO_OPT:-0.0522}
    REF_PARETO_SFT=${REF_PARETO_SFT:-"1.9052 1.6325 1.5878 1.5462 1.5171"}
    REF_PARETO_DPO=${REF_PARETO_DPO:-"0.0540 0.1403 0.2612 0.4300 0.6591"}
fi

main "$@"
