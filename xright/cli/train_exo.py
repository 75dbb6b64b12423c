"""EXO (Ji et al., ICML 2024): reverse KL from the policy's distribution over K completions to a target, a
preference (``exo-pref``, pairwise data) or rewards (``exo-rw``, scored data: ``prompt``, ``completions`` (K >= 2),
``rewards``); ``dpo-pref`` / ``dpo-rw`` are the forward-KL forms. A prompt's K completions share one forward.

    deepspeed --module xright.cli.train_exo --loss exo-rw --dataset scored.jsonl --save_path ./ckpt/exo
"""

from xright.cli import common, flags, lifecycle
from xright.objectives import EXO_LOSSES


def main(argv=None):
    p = flags.base_parser(__doc__, learning_rate=1e-5, max_epochs=1, wandb_project="xright_train_exo",
                           ckpt_path="./ckpt/checkpoints_exo")
    flags.add_data_flags(p, max_len=512)
    flags.add_objective_flags(p, list(EXO_LOSSES), default="exo-pref")
    args = flags.parse(p, argv)
    objective = flags.build_objective(args, args.loss)
    spec = common.ObjectiveSpec(args.loss, objective, flags.data_spec(args, objective.kind, name=args.loss),
                                args.micro_train_batch_size)
    common.run(args, [spec])


if __name__ == "__main__":
    lifecycle.main_guard(main)
