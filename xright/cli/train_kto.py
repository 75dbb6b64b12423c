"""KTO on binary feedback (``prompt``, ``completion``, ``label``) or on pairs unpaired into
desirable (chosen) and undesirable (rejected) examples (Ethayarajh et al. 2024).

z comes from mismatched pairs (x_i, y_{i+1}) of each micro-batch, so the micro batch size must be
at least 2 (1 is refused before training). OpenRLHF's ``--input_key`` / ``--output_key``, when
given, name the prompt and completion fields.

    deepspeed --module xright.cli.train_kto --pretrain tiny --beta 0.1 --save_path ./ckpt/kto
"""

import os

from xright.cli import common
from xright.objectives import KTO
from xright.schedules import Single


def add_kto_flags(p):
    g = p.add_argument_group("KTO")
    g.add_argument("--desirable_loss_weight", type=float, default=1.0, help="λ_D")
    g.add_argument("--undesirable_loss_weight", type=float, default=1.0, help="λ_U")


def warn_balance(examples, args) -> None:
    """The KTO paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3]; say so (rank 0) when outside."""
    n_d = sum(bool(e["label"]) for e in examples)
    n_u = len(examples) - n_d
    num, den = args.desirable_loss_weight * n_d, args.undesirable_loss_weight * n_u
    ratio = num / den if den else float("inf")
    if not 1.0 <= ratio <= 4 / 3 and os.environ.get("RANK", "0") == "0":
        print(f"warning: KTO: λ_D·n_D / (λ_U·n_U) = {args.desirable_loss_weight}·{n_d} / "
            f"({args.undesirable_loss_weight}·{n_u}) = {ratio:.3f} is outside [1, 4/3], the range the KTO paper "
            "advises; adjust --desirable_loss_weight / --undesirable_loss_weight", flush=True)


def main(argv=None):
    p = common.base_parser(__doc__, learning_rate=1e-5, max_epochs=1, wandb_project="openrlhf_train_dpo",
                           ckpt_path="./ckpt/checkpoints_kto")
    common.add_data_flags(p, max_len=2048, kind="binary")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--ref_pretrain", type=str, default=None, help="reference model; default: --pretrain")
    add_kto_flags(p)
    args = common.parse(p, argv)
    for flag, key in (("input_key", "prompt_key"), ("output_key", "completion_key")):
        if flag in args.explicit:
            setattr(args, key, getattr(args, flag))
    objective = KTO(args.beta, args.desirable_loss_weight, args.undesirable_loss_weight)
    spec = common.ObjectiveSpec("kto", objective, common.data_spec(args, "binary", name="kto"),
                                args.micro_train_batch_size)

    def schedule(total, per_epoch, tasks):  # the data is loaded by now: check the class balance
        warn_balance(tasks["kto"].loader.examples, args)
        return Single("kto")

    common.run(args, [spec], schedule)


if __name__ == "__main__":
    common.main_guard(main)
