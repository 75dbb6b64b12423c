"""Sequential training, DPO phase: trains DPO and evaluates both SFT and DPO (XRIGHT's flags).

    deepspeed --module xright.cli.train_dpo_seq --pretrain ./ckpt/seq_sft --save_path ./ckpt/seq_sft_dpo
"""

from xright.cli import common, joint

if __name__ == "__main__":
    common.main_guard(lambda: joint.main(["--train_only", "dpo", *common.sys.argv[1:]], schedule="sequential",
                                         description=__doc__, learning_rate=5e-6, max_epochs=2,
                                         lr_scheduler="cosine_with_min_lr", wandb_project="xright_sft_seq",
                                         ckpt_path="./ckpt/checkpoints_sft"))
