"""Pairwise preference optimisation: DPO (conservative with --label_smoothing), IPO, SLiC, SimPO.

    deepspeed --module xright.cli.train_dpo --pretrain tiny --loss dpo --beta 0.1 --save_path ./ckpt/dpo
"""

from xright.cli import common
from xright.objectives import PAIR_LOSSES, Pairwise, PrefParams
from xright.schedules import Single


def add_pair_loss_flags(p):
    p.add_argument("--loss", choices=sorted(PAIR_LOSSES), default="dpo")
    p.add_argument("--slic_delta", type=float, default=1.0, help="SLiC hinge margin δ")
    p.add_argument("--slic_lambda", type=float, default=0.0, help="SLiC weight of the chosen NLL regulariser")
    p.add_argument("--simpo_gamma", type=float, default=0.5, help="SimPO target margin γ (use --beta ≈ 2)")


def pair_objective(args):
    loss = "ipo" if args.ipo else args.loss
    return Pairwise(loss, PrefParams(
        beta=args.beta, label_smoothing=args.label_smoothing,
        ipo_average=args.ipo_average, slic_delta=args.slic_delta, slic_lambda=args.slic_lambda,
        simpo_gamma=args.simpo_gamma))


def main(argv=None):
    p = common.base_parser(__doc__, learning_rate=1e-5, max_epochs=1, wandb_project="openrlhf_train_dpo",
                           ckpt_path="./ckpt/checkpoints_dpo")
    common.add_data_flags(p, max_len=512, kind="pairwise")
    common.add_pref_flags(p)
    add_pair_loss_flags(p)
    args = common.parse(p, argv)
    objective = pair_objective(args)
    spec = common.ObjectiveSpec(objective.loss, objective, common.data_spec(args, "pairwise", name=objective.loss),
                                args.micro_train_batch_size)
    common.run(args, [spec], lambda total, per_epoch, tasks: Single(objective.loss))


if __name__ == "__main__":
    common.main_guard(main)
