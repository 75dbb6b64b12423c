"""Pairwise preference optimisation: DPO (conservative with --label_smoothing), IPO, SLiC, SimPO.

    deepspeed --module xright.cli.train_dpo --pretrain tiny --loss dpo --beta 0.1 --save_path ./ckpt/dpo
"""

from xright.cli import common, flags, lifecycle
from xright.objectives import pairwise_losses


def main(argv=None):
    p = flags.base_parser(__doc__, learning_rate=1e-5, max_epochs=1, wandb_project="openrlhf_train_dpo",
                           ckpt_path="./ckpt/checkpoints_dpo")
    flags.add_data_flags(p, max_len=512)
    flags.add_objective_flags(p, pairwise_losses(), default="dpo")
    args = flags.parse(p, argv)
    objective = flags.build_objective(args)
    spec = common.ObjectiveSpec(objective.loss, objective, flags.data_spec(args, "pairwise", name=objective.loss),
                                args.micro_train_batch_size)
    common.run(args, [spec])


if __name__ == "__main__":
    lifecycle.main_guard(main)
