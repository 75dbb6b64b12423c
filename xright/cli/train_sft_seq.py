"""Sequential training, SFT phase: trains SFT and evaluates both SFT and DPO (XRIGHT's flags).

    deepspeed --module xright.cli.train_sft_seq --pretrain REF --save_path ./ckpt/seq_sft
"""

from xright.cli import joint, lifecycle


def main(argv=None):
    return joint.seq_main(argv, "sft", __doc__)


if __name__ == "__main__":
    lifecycle.main_guard(main)
