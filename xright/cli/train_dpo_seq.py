"""Sequential training, DPO phase: trains DPO and evaluates both SFT and DPO (XRIGHT's flags).

    deepspeed --module xright.cli.train_dpo_seq --pretrain ./ckpt/seq_sft --save_path ./ckpt/seq_sft_dpo
"""

from xright.cli import common, joint


def main(argv=None):
    argv = common.sys.argv[1:] if argv is None else argv
    return joint.main(["--train_only", "dpo", *argv], schedule="sequential", description=__doc__,
                      learning_rate=5e-6, max_epochs=2, lr_scheduler="cosine_with_min_lr", wandb_project="xright_sft_seq",
                      ckpt_path="./ckpt/checkpoints_sft")


if __name__ == "__main__":
    common.main_guard(main)
