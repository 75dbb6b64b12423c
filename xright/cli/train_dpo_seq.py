"""Sequential training, DPO phase: trains DPO and evaluates both SFT and DPO (XRIGHT's flags)."""

from xright.cli import joint, lifecycle


def main(argv=None):
    return joint.seq_main(argv, "dpo", __doc__)


if __name__ == "__main__":
    lifecycle.main_guard(main)
