"""``deepspeed --num_gpus 2 tests/zero12_ranks.py``: ZeRO-1 and ZeRO-2 in fp32 with xright's lighter optimizer
(``strategy._lighten_zero12``) against DeepSpeed's own path, on every rank: parameters bit for bit and gradient
norms after 3 steps of 2 micro-batches (different data per rank, clipping on, small buckets so that parameters
straddle the two ranks' partitions and reductions run during the backward). Prints one JSON line per rank."""

import json

import torch
import torch.distributed as dist

from xright import strategy as S
from xright.models import load_model


def run(stage: int, light: bool):
    lighten = S._lighten_zero12
    if not light:
        S._lighten_zero12 = lambda optimizer: None
    try:
        st = S.Strategy()
        st.configure(S.DSOptions(zero_stage=stage, train_batch_size=8, micro_train_batch_size=2))
        st.ds_config["zero_optimization"]["reduce_bucket_size"] = 50000
        model = load_model("tiny", seed=3)
        engine = st.prepare(model, st.optimizer(model, 1e-2, (0.9, 0.95), 0.1), None)
    finally:
        S._lighten_zero12 = lighten
    g, norms = torch.Generator().manual_seed(100 + dist.get_rank()), []
    for micro in range(6):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        if micro % 2:
            norms.append(float(engine.get_global_grad_norm()))
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    S.release_engines()
    return params, norms


if __name__ == "__main__":
    report = {}
    for stage in (1, 2):
        (ours, ours_norms), (theirs, their_norms) = run(stage, True), run(stage, False)
        report[stage] = {"equal": [n for n in ours if torch.equal(ours[n], theirs[n])], "of": len(ours),
                         "norms": [ours_norms, their_norms]}
    print("RESULT " + json.dumps({"rank": dist.get_rank(), "report": report}), flush=True)
    S.close_process_group()
