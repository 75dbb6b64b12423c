"""Joint SFT + DPO with the MAXRIGHT schedule (Fernando et al. 2024); XRIGHT's flags."""

from xright.cli import joint, lifecycle


def main(argv=None):
    return joint.main(argv, schedule="maxright", description=__doc__)


if __name__ == "__main__":
    lifecycle.main_guard(main)
