"""SFT + preference training in one run under any schedule, with the paper's (XRIGHT's) flags and defaults.

λ (``--lambd``) weighs the preference objective: w_dpo = λ, w_sft = 1 − λ (Fernando et al. 2024). The paper's
CLIs (``train_sft_dpo_alright``, ``_maxright``, ``_mix``, ``train_sft_seq``, ``train_dpo_seq``) are presets of
:func:`main`; the schedule flags and the joint epoch are :mod:`xright.cli.train_joint`'s.

    deepspeed --module xright.cli.train_sft_dpo_alright --lambd 0.5 --save_path ./ckpt/alright
"""

from __future__ import annotations

from xright.cli import common, flags, lifecycle, train_joint
from xright.cli.lifecycle import UsageError
from xright.objectives import SFT, pairwise_losses
from xright.schedules import SCHEDULES, Stopping, paper_weights

PREF = "dpo"  # the preference objective's name in metrics (eval/dpo/loss), as in the paper's code


def parser(description: str, schedule: str | None, **defaults):
    # the seq CLIs override some of these defaults; no --micro_train_batch_size: DeepSpeed's micro batch is 1
    defaults = {"learning_rate": 1e-5, "max_epochs": 1, "wandb_project": "xright_maxright",
                "ckpt_path": "./ckpt/checkpoints_dpo", "micro_train_batch_size": 1, **defaults}
    p = flags.base_parser(description, batch_meaning="xright")
    flags.add_data_flags(p, "sft_", max_len=2048)
    flags.add_data_flags(p, "rlhf_", max_len=512, keys=False)
    p.add_argument("--sft_tokenizer_chat_template", dest="tokenizer_chat_template", type=str, default=None)
    p.add_argument("--sft_micro_train_batch_size", type=int, default=8, help="SFT examples per rank per loader batch")
    p.add_argument("--rlhf_micro_train_batch_size", type=int, default=8,
                   help="preference pairs per rank per loader batch")
    # XRIGHT's seq CLIs also spell the preference flags --rlhf_beta, --rlhf_ipo, --rlhf_label_smoothing
    flags.add_objective_flags(p, pairwise_losses(), default="dpo", alias="rlhf_",
                               aliased=("beta", "ipo", "label_smoothing"))
    g = train_joint.add_schedule_flags(p, schedule, default="alright", choices=set(SCHEDULES) - {"single"},
                                       order=f"sft,{PREF}")
    g.add_argument("--lambd", type=float, default=0.5, help="weight of the preference objective (1 − λ for SFT)")
    g.add_argument("--sft_opt", type=float, default=0.0, help="optimal SFT loss L*_sft (MAXRIGHT, ideal distance)")
    g.add_argument("--dpo_opt", type=float, default=0.0, help="optimal preference loss L*_dpo")
    g.add_argument("--ideal_dist", type=float, default=0.0, help=f"the ideal distance is logged; {flags.COMPAT}")
    g.add_argument("--ref_pareto_sft", type=str, default="",
                   help="SFT losses of a reference front, separated by spaces or commas")
    g.add_argument("--ref_pareto_dpo", type=str, default="", help="matching preference losses; dominating a point stops")
    p.set_defaults(**defaults)  # after every flag (a seq CLI's --train_only)
    return p


def _front(args) -> dict:
    if not args.ref_pareto_sft and not args.ref_pareto_dpo:
        return {}
    try:  # XRIGHT's scripts separate the points by spaces ('1.9052 1.6325 ...'); commas work too
        sft, pref = ([float(x) for x in t.replace(",", " ").split()] for t in (args.ref_pareto_sft,
                                                                               args.ref_pareto_dpo))
    except ValueError as e:
        raise UsageError(f"--ref_pareto_sft/--ref_pareto_dpo must be numbers separated by commas or spaces: {e}") from e
    if len(sft) != len(pref):
        raise UsageError(f"--ref_pareto_sft has {len(sft)} points, --ref_pareto_dpo {len(pref)}")
    return {"sft": sft, PREF: pref}


def main(argv=None, schedule: str | None = None, description: str = __doc__, **defaults):
    args = flags.parse(parser(description, schedule, **defaults), argv)
    if not 0.0 <= args.lambd <= 1.0:
        raise UsageError(f"--lambd must be in [0, 1], got {args.lambd}")
    pairs = flags.data_spec(args, "pairwise", "rlhf_", name=PREF)
    specs = [common.ObjectiveSpec("sft", SFT(), flags.data_spec(args, "sft", "sft_", name="sft"),
                                  args.sft_micro_train_batch_size, args.sft_opt),
             common.ObjectiveSpec(PREF, flags.build_objective(args), pairs, args.rlhf_micro_train_batch_size,
                                  args.dpo_opt)]
    if args.train_only and args.train_only not in ("sft", PREF):
        raise UsageError(f"--train_only must be sft or {PREF}")
    train_joint.run(args, specs, paper_weights(args.lambd, sft="sft", pref=PREF),
                    Stopping(args.eps, at_optimum=bool(args.sft_opt or args.dpo_opt), front=_front(args)))


def seq_main(argv, only: str, description: str):
    """XRIGHT's train_sft_seq / train_dpo_seq: train ``only``, evaluate both, with their defaults."""
    return main(argv, schedule="sequential", description=description, train_only=only, learning_rate=5e-6,
                max_epochs=2, wandb_project="xright_sft_seq", ckpt_path="./ckpt/checkpoints_sft")


if __name__ == "__main__":
    lifecycle.main_guard(main)
