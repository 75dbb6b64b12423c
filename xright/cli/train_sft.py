"""Supervised fine-tuning: token-mean NLL of the responses, prompt masked.

    deepspeed --module xright.cli.train_sft --pretrain tiny --save_path ./ckpt/sft
"""

from xright.cli import common, flags, lifecycle
from xright.objectives import SFT


def main(argv=None):
    p = flags.base_parser(__doc__, learning_rate=5e-6, max_epochs=2, wandb_project="openrlhf_train_sft",
                           ckpt_path="./ckpt/checkpoints_sft")
    flags.add_data_flags(p, max_len=2048)
    args = flags.parse(p, argv)
    spec = common.ObjectiveSpec("sft", SFT(), flags.data_spec(args, "sft", name="sft"),
                                args.micro_train_batch_size)
    common.run(args, [spec])


if __name__ == "__main__":
    lifecycle.main_guard(main)
