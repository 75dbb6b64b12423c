"""SFT on the chosen responses of preference data, prompt masked: the paper's reference policy.

(XRIGHT's version of this trainer also trains on the prompt tokens; this one masks them.)

    deepspeed --module xright.cli.train_sft_pref --dataset pairs.jsonl --save_path ./ckpt/ref
"""

from xright.cli import common, flags, lifecycle
from xright.objectives import SFT


def main(argv=None):
    # as XRIGHT's: --train_batch_size counts loader batches of --rlhf_micro_train_batch_size examples
    p = flags.base_parser(__doc__, batch_meaning="xright", learning_rate=5e-6, max_epochs=2, micro_train_batch_size=1,
                           wandb_project="xright_sft_pref", ckpt_path="./ckpt/checkpoints_sft")
    flags.add_data_flags(p, max_len=2048)
    p.add_argument("--rlhf_micro_train_batch_size", type=int, default=8, help="examples per rank per loader batch")
    args = flags.parse(p, argv)
    spec = common.ObjectiveSpec("sft", SFT(), flags.data_spec(args, "sft", name="sft", sft_from_chosen=True),
                                args.rlhf_micro_train_batch_size)
    common.run(args, [spec])


if __name__ == "__main__":
    lifecycle.main_guard(main)
