"""Joint SFT + DPO with the ALRIGHT schedule (Fernando et al. 2024); XRIGHT's flags.

    deepspeed --module xright.cli.train_sft_dpo_alright --lambd 0.5 --save_path ./ckpt/alright
"""

from xright.cli import joint, lifecycle


def main(argv=None):
    return joint.main(argv, schedule="alright", description=__doc__)


if __name__ == "__main__":
    lifecycle.main_guard(main)
