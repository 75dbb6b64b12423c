"""EXO (Ji et al., ICML 2024): reverse KL from the policy's distribution over K completions to a
target — a preference (``exo-pref``, pairwise data, K = 2) or rewards (``exo-rw``, scored data:
``prompt``, ``completions`` (K >= 2), ``rewards`` (K)); ``dpo-pref`` / ``dpo-rw`` are the forward-KL
forms. All K completions of a prompt go through one forward and are never split across micro-batches.

    deepspeed --module xright.cli.train_exo --loss exo-rw --dataset scored.jsonl --save_path ./ckpt/exo
"""

from xright.cli import common
from xright.objectives import EXO, EXO_LOSSES
from xright.schedules import Single


def add_exo_flags(p):
    g = p.add_argument_group("EXO")
    g.add_argument("--beta_r", type=float, default=1.0, help="reward temperature β_r of the *-rw target softmax(r/β_r)")
    g.add_argument("--exo_epsilon", type=float, default=None,
                   help="*-pref target [1−ε, ε]; default: the EXO reference code's log-weight −10 for the "
                        "rejected answer (p ≈ [1−4.5e-5, 4.5e-5]); TRL's exo_pair uses ε = 1e-3")


def main(argv=None):
    p = common.base_parser(__doc__, learning_rate=1e-5, max_epochs=1, wandb_project="xright_train_exo",
                           ckpt_path="./ckpt/checkpoints_exo")
    common.add_data_flags(p, max_len=512)
    p.add_argument("--loss", choices=sorted(EXO_LOSSES), default="exo-pref")
    p.add_argument("--beta", type=float, default=0.1, help="policy temperature β_π")
    p.add_argument("--ref_pretrain", type=str, default=None, help="reference model; default: --pretrain")
    add_exo_flags(p)
    args = common.parse(p, argv)
    try:
        objective = EXO(args.loss, args.beta, args.beta_r, args.exo_epsilon)
    except ValueError as e:
        raise common.UsageError(str(e)) from None
    spec = common.ObjectiveSpec(args.loss, objective, common.data_spec(args, objective.kind, name=args.loss),
                                args.micro_train_batch_size)
    common.run(args, [spec], lambda total, per_epoch, tasks: Single(args.loss))


if __name__ == "__main__":
    common.main_guard(main)
