"""Sequential training, SFT phase: trains SFT and evaluates both SFT and DPO (XRIGHT's flags)."""

from xright.cli import joint, lifecycle


def main(argv=None):
    return joint.seq_main(argv, "sft", __doc__)


if __name__ == "__main__":
    lifecycle.main_guard(main)
