"""Joint SFT + DPO with the MAXRIGHT schedule (Fernando et al. 2024); XRIGHT's flags.

    deepspeed --module xright.cli.train_sft_dpo_maxright --lambd 0.5 --save_path ./ckpt/maxright
"""

from xright.cli import joint, lifecycle


def main(argv=None):
    return joint.main(argv, schedule="maxright", description=__doc__)


if __name__ == "__main__":
    lifecycle.main_guard(main)
