"""EXO (Ji et al., ICML 2024): reverse KL from the policy's distribution over K completions to a
target — a preference (``exo-pref``, pairwise data, K = 2) or rewards (``exo-rw``, scored data:
``prompt``, ``completions`` (K >= 2), ``rewards`` (K)); ``dpo-pref`` / ``dpo-rw`` are the forward-KL
forms. All K completions of a prompt go through one forward and are never split across micro-batches.

    deepspeed --module xright.cli.train_exo --loss exo-rw --dataset scored.jsonl --save_path ./ckpt/exo
"""

from xright.cli import common
from xright.objectives import EXO_LOSSES
from xright.schedules import Single


def main(argv=None):
    p = common.base_parser(__doc__, learning_rate=1e-5, max_epochs=1, wandb_project="xright_train_exo",
                           ckpt_path="./ckpt/checkpoints_exo")
    common.add_data_flags(p, max_len=512)
    common.add_objective_flags(p, list(EXO_LOSSES), default="exo-pref")
    args = common.parse(p, argv)
    objective = common.build_objective(args, args.loss)
    spec = common.ObjectiveSpec(args.loss, objective, common.data_spec(args, objective.kind, name=args.loss),
                                args.micro_train_batch_size)
    common.run(args, [spec], lambda total, per_epoch, tasks: Single(args.loss))


if __name__ == "__main__":
    common.main_guard(main)
