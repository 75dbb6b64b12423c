"""A small AST mutation tester for xright's numeric core, run against the fast in-process tests.

    nice -n 10 python benchmarks/mutation.py [--commit HEAD] [--work /tmp/xright-mutation] [--only FILE]

The commit is exported (``git archive``) into a private directory, so the shared working tree is never
touched. One parent process imports torch, xright and pytest once; each mutant runs in a forked child,
which rewrites one operator, constant or comparison in one module, re-executes that module in place
(rebinding the names other modules imported from it) and runs that module's tests with ``pytest -x``.
A mutant is *killed* when a test fails or errors, *timeout* (counted as killed) when the child exceeds
its CPU budget, and *survived* otherwise. Lines no selected test executes are reported separately as
*not covered* (they count as survivors in the score).

Why not mutmut: mutmut 3.8 works with this layout, but on this machine each mutant cost ~10 s of CPU
(most of its 1 500+ mutants timed out or queued behind the shared cores), far over a 25-minute budget.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

TARGETS = {  # module -> the fast tests that exercise it
    "xright/losses.py": ["tests/test_losses.py", "tests/test_objectives_numbers.py"],
    "xright/logprobs.py": ["tests/test_logprobs.py", "tests/test_objectives_numbers.py"],
    "xright/objectives.py": ["tests/test_objectives_numbers.py", "tests/test_objectives.py"],
    "xright/schedules.py": ["tests/test_schedules.py",
                            "tests/test_objectives_numbers.py::test_maxright_never_picks_a_zero_weight_objective"],
    "xright/data/collate.py": ["tests/test_objectives_numbers.py", "tests/test_data.py::test_sft_masks_decode_to_prompt_and_response",
                               "tests/test_data.py::test_pairwise_and_scored_k_major_layout",
                               "tests/test_data.py::test_binary_kl_mismatched_rows",
                               "tests/test_data.py::test_loader_ranks_partition_each_epoch",
                               "tests/test_data.py::test_loader_state_dict_roundtrip",
                               "tests/test_data.py::test_loaders_of_different_lengths_never_stop",
                               "tests/test_data.py::test_loader_too_small",
                               "tests/test_packing.py::test_pack_layout_by_hand",
                               "tests/test_packing.py::test_group_by_length_batches_similar_lengths_in_a_shuffled_order"],
    "xright/data/kinds.py": ["tests/test_objectives_numbers.py", "tests/test_data_kinds.py",
                             "tests/test_data.py::test_sft_masks_decode_to_prompt_and_response",
                             "tests/test_data.py::test_pairwise_and_scored_k_major_layout",
                             "tests/test_data.py::test_binary_kl_mismatched_rows",
                             "tests/test_packing.py::test_pack_layout_by_hand"],
}

SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
        ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
        ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And}


def _docstring_ids(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def mutation_points(tree):
    """(node index in ast.walk order, kind, description) of every mutation of the module."""
    docs = _docstring_ids(tree)
    points = []
    for i, node in enumerate(ast.walk(tree)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP:
            points.append((i, "op", line, f"{type(node.op).__name__} -> {SWAP[type(node.op)].__name__}"))
        elif isinstance(node, ast.BoolOp):
            points.append((i, "op", line, f"{type(node.op).__name__} -> {SWAP[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare):
            for j, op in enumerate(node.ops):
                if type(op) in SWAP:
                    points.append((i, f"cmp{j}", line, f"{type(op).__name__} -> {SWAP[type(op)].__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            points.append((i, "drop_unary", line, f"drop {type(node.op).__name__}"))
        elif isinstance(node, ast.Constant) and id(node) not in docs:
            v = node.value
            if isinstance(v, bool):
                points.append((i, "const", line, f"{v} -> {not v}"))
            elif isinstance(v, (int, float)):
                points.append((i, "const", line, f"{v} -> {v + 1}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "detach", "clamp", "sum", "mean", "float", "transpose", "exp"):
            points.append((i, "drop_call", line, f"drop .{node.func.attr}(…)"))
    return points


class _Apply(ast.NodeTransformer):
    def __init__(self, target: int, kind: str):
        self.target, self.kind, self.i = target, kind, -1
        self.index = {}

    def run(self, tree):
        self.index = {id(n): k for k, n in enumerate(ast.walk(tree))}
        return self.visit(tree)

    def visit(self, node):
        k = self.index.get(id(node))
        node = self.generic_visit(node)
        if k != self.target:
            return node
        if self.kind == "op":
            node.op = SWAP[type(node.op)]()
        elif self.kind.startswith("cmp"):
            j = int(self.kind[3:])
            node.ops[j] = SWAP[type(node.ops[j])]()
        elif self.kind == "drop_unary":
            return node.operand
        elif self.kind == "const":
            node.value = (not node.value) if isinstance(node.value, bool) else node.value + 1
        elif self.kind == "drop_call":
            return node.func.value
        return node


def mutate(source: str, target: int, kind: str) -> str:
    tree = ast.parse(source)
    tree = _Apply(target, kind).run(tree)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def _reexec(modname: str, code: str) -> None:
    """Run mutated source in the module's own namespace and rebind what other modules imported from it."""
    mod = sys.modules[modname]
    old = dict(mod.__dict__)
    exec(compile(code, mod.__file__, "exec"), mod.__dict__)
    changed = {id(v): (v, mod.__dict__[k]) for k, v in old.items() if k in mod.__dict__ and mod.__dict__[k] is not v}
    for other in list(sys.modules.values()):
        d = getattr(other, "__dict__", None)
        if other is mod or not isinstance(d, dict):
            continue
        for k, v in list(d.items()):
            hit = changed.get(id(v))
            if hit is not None and hit[0] is v:
                d[k] = hit[1]


def run_child(modname: str, code: str | None, tests: list[str], cpu_s: int) -> int:
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            import pytest

            if code is not None:
                _reexec(modname, code)
            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests])
        except BaseException:
            rc = 99
        os._exit(int(rc))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="HEAD")
    ap.add_argument("--work", default="/tmp/xright-mutation")
    ap.add_argument("--only", default=None, help="one target file (default: all)")
    ap.add_argument("--sample", type=int, default=0,
                    help="test a seeded random sample of this many mutants per file (0: all of them)")
    ap.add_argument("--cpu", type=int, default=20, help="CPU seconds per mutant before it counts as a timeout")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sha = subprocess.check_output(["git", "-C", root, "rev-parse", args.commit], text=True).strip()
    subprocess.run(f"rm -rf {args.work} && mkdir -p {args.work} && git -C {root} archive {sha} | tar -x -C {args.work}",
                   shell=True, check=True)
    os.chdir(args.work)
    sys.path[:0] = [args.work, os.path.join(args.work, "tests")]
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    import torch  # noqa: F401  (imported once, before the forks)
    import xright.objectives, xright.schedules, xright.data.collate, xright.logprobs, xright.losses  # noqa
    import xright.data.kinds  # noqa: F401
    assert xright.losses.__file__.startswith(args.work), xright.losses.__file__
    import pytest

    targets = {args.only: TARGETS[args.only]} if args.only else TARGETS
    # import the test modules in the parent, so each child only runs them
    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sorted({t for ts in targets.values() for t in ts})])
    print(f"mutation testing {sha} in {args.work}", flush=True)
    report = {"commit": sha, "files": {}}
    start = time.time()
    for path, tests in targets.items():
        modname = path[:-3].replace("/", ".")
        source = open(path).read()
        t0 = time.process_time()
        base = run_child(modname, None, tests, args.cpu)
        if base != 0:
            raise SystemExit(f"{path}: the tests fail before mutation (exit {base}): {tests}")
        points = mutation_points(ast.parse(source))
        total_points = len(points)
        if args.sample and args.sample < len(points):
            import random

            points = sorted(random.Random(f"mutation/{path}").sample(points, args.sample))
        stats = {"killed": 0, "timeout": 0, "survived": 0, "invalid": 0}
        survivors = []
        for idx, kind, line, what in points:
            try:
                code = mutate(source, idx, kind)
                compile(code, path, "exec")
            except Exception:
                stats["invalid"] += 1
                continue
            rc = run_child(modname, code, tests, args.cpu)
            print(f"  {path}:{line} {what}: {'survived' if rc == 0 else 'killed' if rc > 0 else 'timeout'}", flush=True)
            if rc == 0:
                stats["survived"] += 1
                survivors.append({"line": line, "mutation": what, "code": source.splitlines()[line - 1].strip()})
            elif rc in (-signal.SIGXCPU, -signal.SIGKILL):
                stats["timeout"] += 1
            else:
                stats["killed"] += 1
        n = stats["killed"] + stats["timeout"] + stats["survived"]
        report["files"][path] = {**stats, "mutants": n, "of": total_points, "score": (stats["killed"] + stats["timeout"]) / max(n, 1),
                                 "survivors": survivors}
        print(f"{path}: {n} mutants (of {total_points}), killed {stats['killed']}, timeout {stats['timeout']}, survived "
              f"{stats['survived']} ({100 * (n - stats['survived']) / max(n, 1):.1f} %)", flush=True)
        for s in survivors:
            print(f"    survived line {s['line']}: {s['mutation']}: {s['code']}", flush=True)
    tot = {k: sum(f[k] for f in report["files"].values()) for k in ("killed", "timeout", "survived", "mutants")}
    report["total"] = tot
    report["wall_s"] = round(time.time() - start, 1)
    print(f"total: {tot['mutants']} mutants, {tot['killed'] + tot['timeout']} killed "
          f"({100 * (tot['killed'] + tot['timeout']) / max(tot['mutants'], 1):.1f} %), {tot['survived']} survived; "
          f"{report['wall_s']} s", flush=True)
    with open(os.path.join(args.work, "mutation_report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
