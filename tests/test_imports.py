"""What imports what in xright/ (docs/DESIGN.md §3), read from every import statement of every module with
``ast`` (those inside functions too, since they import as surely, only later): no cycle, no import of a higher
floor, the third-party libraries each imported by one module only; and every module imports in a fresh
interpreter."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "xright"

# docs/DESIGN.md §3, bottom up; a package's modules may import each other
FLOORS = {"xright.losses": 1, "xright.logprobs": 1, "xright.schedules": 1, "xright.sharding": 1,
          "xright.fingerprints": 1, "xright.files": 1, "xright.strategy": 2, "xright.logging": 2, "xright.data": 2,
          "xright.objectives": 3, "xright.models": 3, "xright.trainer": 4, "xright.refcache": 4,
          "xright.generation": 4, "xright.cli": 5}
# documented exceptions: fingerprints.reference reads the tiny model's config at call time
KNOWN_UPWARD = {("xright.fingerprints", "xright.models")}
NEVER = {"xright.objectives": ("xright.data", "xright.cli")}
ONLY = {"deepspeed": "xright.strategy", "peft": "xright.models", "wandb": "xright.logging",
        "torch.utils.tensorboard": "xright.logging"}
KNOWN_CYCLES: list[set] = []


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str, source: str) -> dict[str, int]:
    """Every module ``source`` imports (``from pkg import sub`` names the submodule), with its first line."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .records / from . import store
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            out.setdefault(target, node.lineno)
    return out


def graph(sources: dict[str, str]) -> dict[str, dict[str, int]]:
    return {name: {t: line for t, line in imports(name, src).items() if t in MODULES and t != name}
            for name, src in sources.items()}


def cycles(edges: dict[str, dict[str, int]]) -> list[set]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
            if len(component) > 1:
                out.append(component)

    for v in edges:
        if v not in index:
            visit(v)
    return out


def floor(name: str) -> tuple[int, str]:
    top = [k for k in FLOORS if name == k or name.startswith(k + ".")]
    assert top, f"{name} has no floor: add it to FLOORS here and to docs/DESIGN.md §3"
    return FLOORS[top[0]], top[0]


def violations(edges: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for a, targets in edges.items():
        if a in ("xright", "xright.cli"):
            continue
        (fa, pa) = floor(a)
        for b, line in targets.items():
            fb, pb = floor(b)
            upward = pa != pb and (fb > fa or (fb == fa and fa < 3)) and (a, b) not in KNOWN_UPWARD
            if upward or b.startswith(NEVER.get(a, ("-",))):
                bad.append(f"{a}:{line} imports {b} (floor {fa} -> {fb})")
    return bad


SOURCES = {name: path.read_text() for name, path in MODULES.items()}


def test_no_import_cycle():
    found = cycles(graph(SOURCES))
    assert [c for c in found if c not in KNOWN_CYCLES] == [], found


def test_a_cycle_is_found():
    sources = {**SOURCES, "xright.losses": SOURCES["xright.losses"] + "\ndef f():\n    from xright import trainer\n"}
    assert any({"xright.losses", "xright.trainer"} <= c for c in cycles(graph(sources)))


def test_floors():
    edges = graph(SOURCES)
    assert violations(edges) == []
    sources = {**SOURCES, "xright.objectives": SOURCES["xright.objectives"] + "\nfrom xright.data import collate\n",
               "xright.schedules": SOURCES["xright.schedules"] + "\nfrom xright import logprobs\n"}
    assert len(violations(graph(sources))) == 2


def test_third_party_libraries_have_one_importer_each():
    for name, source in SOURCES.items():
        for target, line in imports(name, source).items():
            for lib, owner in ONLY.items():
                assert not (target == lib or target.startswith(lib + ".")) or name == owner, f"{name}:{line} {target}"


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in MODULES)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
