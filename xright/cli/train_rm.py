"""Reward model: Bradley–Terry on pairwise data, a scalar head read at the last real token. Saved in HF format
(``AutoModelForSequenceClassification``, num_labels=1) with the eval set's score ``mean`` and ``std`` in
config.json (as OpenRLHF) and ``reward_stats.json``. Scores: :func:`xright.objectives.reward_scores`.

    deepspeed --module xright.cli.train_rm --pretrain tiny --save_path ./ckpt/rm
"""

import math

from xright.cli import common, flags, lifecycle
from xright.objectives import RewardModel


def main(argv=None):
    p = flags.base_parser(__doc__, learning_rate=9e-6, max_epochs=1, micro_train_batch_size=1,
                           wandb_project="openrlhf_train_rm", ckpt_path="./ckpt/checkpoints_rm")
    flags.add_data_flags(p, max_len=512)
    p.set_defaults(prompt_key=None)  # OpenRLHF: HH-style pairs by default
    g = p.add_argument_group("reward model")
    g.add_argument("--loss", choices=["sigmoid", "logexp"], default="sigmoid")
    g.add_argument("--margin_loss", action="store_true", default=False,
                   help="subtract each pair's margin (field --margin_key, default 'margin') inside the sigmoid")
    g.add_argument("--compute_fp32_loss", action="store_true", default=False, help="upcast scores to fp32 for the loss")
    g.add_argument("--value_head_prefix", type=str, default="value_head",
                   help="the head is HF's sequence-classification head ('score'), so that "
                        f"AutoModelForSequenceClassification loads it; {flags.COMPAT}")
    args = flags.parse(p, argv)
    if args.margin_loss and not args.margin_key:
        args.margin_key = "margin"
    objective = RewardModel(args.loss, use_margin=args.margin_loss, fp32=args.compute_fp32_loss)
    spec = common.ObjectiveSpec("rm", objective, flags.data_spec(args, "pairwise", name="rm"),
                                args.micro_train_batch_size)

    def stats(trainer):
        """Mean/std of all eval scores (chosen and rejected), stored with the model."""
        ev = trainer.evaluate()
        if "eval/rm/reward_mean" not in ev:
            trainer.s.print("warning: no eval set: reward normalisation statistics not saved")
            return None
        mean = ev["eval/rm/reward_mean"]
        std = math.sqrt(max(ev["eval/rm/reward_sq"] - mean ** 2, 0.0))
        module = trainer.engine.module
        module.config.mean, module.config.std = mean, std  # written into config.json by save_pretrained
        return {"reward_stats.json": {"mean": mean, "std": std, "eval_accuracy": ev["eval/rm/acc"],
                                      "eval_margin": ev["eval/rm/margin"]}}

    common.run(args, [spec], task="reward", extra_save_files=stats)


if __name__ == "__main__":
    lifecycle.main_guard(main)
