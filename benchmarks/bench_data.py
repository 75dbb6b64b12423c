"""Start-up time and peak memory of loading tokenised DPO data: Python lists vs the disk cache.

    python benchmarks/bench_data.py --sizes 2000 20000 60000 [--max_len 1024] [--hh PATH]

Builds pairwise sets of N pairs from the shared HH file (its pairs repeated, each line its own
record), then for each N runs, each in a fresh process: ``lists`` (load_data without a cache, as
every rank does without --data_cache_dir), ``cache-build`` (first run with a cache directory) and
``cache-hit`` (second run). Each process loads the data, builds the DPO loader and draws one
micro-batch of 8, then prints the wall time of that and its peak RSS growth over the imports (the
part the data costs). Tokenizer: the built-in byte-level one.

Measured 2026-12-01 on the 2-core CI-class machine while ~6 other jobs shared it (load average
12-15, so times are slow and noisy; RSS is not), max_len 1024:

    N pairs  mode          examples   time     peak RSS growth
     2000    lists           1754      11.0 s   0.32 GB
     2000    cache-build     1754      11.7 s   0.20 GB
     2000    cache-hit       1754       2.3 s   0.09 GB
    20000    lists          17579      65.3 s   0.32 GB   (before chunked tokenisation: 3.13 GB;
                                                           the code before issue 8's B12: 57 s, 1.18 GB)
    20000    cache-build    17579      93.3 s   0.28 GB
    20000    cache-hit      17579       2.2 s   0.10 GB
    60000    cache-build    52735     320.4 s   0.58 GB
    60000    cache-hit      52735       4.8 s   0.10 GB
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")

CHILD = r"""
import resource, sys, time
from xright.data import CyclingLoader, DataSpec, load_data
from xright.models import load_tokenizer
tok = load_tokenizer("tiny")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
spec = DataSpec(kind="pairwise", dataset=sys.argv[1], prompt_key=None, max_len=int(sys.argv[2]), eval_split="",
                cache_dir=sys.argv[3] or None)
train, _ = load_data(spec, tok, log=lambda m: None)
next(CyclingLoader(train, "pairwise", 8, tok.pad_token_id))
print(len(train), time.perf_counter() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20)
"""


def make_set(n: int, hh: str, out: str) -> str:
    with gzip.open(hh, "rt") as f:
        lines = [line for line in f if line.strip()]
    path = os.path.join(out, f"hh-{n}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            f.write(lines[i % len(lines)])
    return path


def run(path: str, max_len: int, cache: str) -> tuple[int, float, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(max_len), cache], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 60000])
    p.add_argument("--max_len", type=int, default=1024)
    p.add_argument("--hh", default=HH)
    p.add_argument("--skip_lists_above", type=int, default=20000, help="the slow list path only up to this size")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = make_set(n, args.hh, tmp)
            cache = os.path.join(tmp, f"cache-{n}")
            modes = [("lists", "")] if n <= args.skip_lists_above else []
            modes += [("cache-build", cache), ("cache-hit", cache)]
            for mode, c in modes:
                examples, secs, gb = run(path, args.max_len, c)
                rows.append((n, mode, examples, secs, gb))
                print(f"{n:>7} pairs  {mode:<12} {examples:>7} examples  {secs:7.1f} s  peak RSS +{gb:5.2f} GB",
                      flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
