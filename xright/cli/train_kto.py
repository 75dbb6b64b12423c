"""KTO (Ethayarajh et al. 2024) on binary feedback (``prompt``, ``completion``, ``label``) or on pairs split into
desirable (chosen) and undesirable (rejected) examples. Its z pairs the examples of a micro-batch: micro batch
size >= 2. OpenRLHF's ``--input_key`` / ``--output_key``, when given, name the prompt and completion fields.

    deepspeed --module xright.cli.train_kto --pretrain tiny --beta 0.1 --save_path ./ckpt/kto
"""

from xright.cli import common, flags, lifecycle


def main(argv=None):
    p = flags.base_parser(__doc__, learning_rate=1e-5, max_epochs=1, wandb_project="openrlhf_train_dpo",
                           ckpt_path="./ckpt/checkpoints_kto")
    flags.add_data_flags(p, max_len=2048)
    flags.add_objective_flags(p, ["kto"])
    p.set_defaults(beta=0.01)  # OpenRLHF's train_kto default
    args = flags.parse(p, argv)
    for flag, key in (("input_key", "prompt_key"), ("output_key", "completion_key")):
        if flag in args.explicit:
            setattr(args, key, getattr(args, flag))
    spec = common.ObjectiveSpec("kto", flags.build_objective(args, "kto"), flags.data_spec(args, "binary", name="kto"),
                                args.micro_train_batch_size)
    common.run(args, [spec])


if __name__ == "__main__":
    lifecycle.main_guard(main)
