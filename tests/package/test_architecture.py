"""The package's import structure, read from the source (every import, those inside functions included).

- Tiers: a module imports only from its own tier's package or from lower tiers
  (``utils <- ops <- layers <- checkpoint, generation, data <- models <- objectives
  <- training <- cli``); packages of the same tier do not import each other.
- No cycle between modules.
- No module but the package root imports the package root.
"""

import ast
from pathlib import Path

import pytest

import lnlm_ssm

ROOT = Path(lnlm_ssm.__file__).parent

# The top-level package or module of lnlm_ssm -> its tier.
TIERS = {
    "_version": 0,
    "_build": 0,
    "utils": 0,
    "ops": 1,
    "layers": 2,
    # import mamba_ssm / causal_conv1d served by lnlm_ssm.ops
    "compat": 2,
    "checkpoint": 3,
    "generation": 3,
    "data": 3,
    "models": 4,
    "objectives": 5,
    "training": 6,
    "evaluation": 6,
    "cli": 7,
    # Entry points: `python -m lnlm_ssm` and `python -m lnlm_ssm.train` (torchrun's form) run the cli.
    "train": 8,
    "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = ("lnlm_ssm",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> list[tuple[int, str]]:
    """(line, module) for every lnlm_ssm module ``name`` imports, wherever the import statement stands."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "lnlm_ssm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "lnlm_ssm":
                continue
            for alias in node.names:
                # `from pkg import submodule` imports the submodule; `from pkg import name`, pkg itself.
                target = f"{base}.{alias.name}"
                found.append((node.lineno, target if target in MODULES else base))
    return found


def top(name: str) -> str:
    return name.split(".")[1] if name != "lnlm_ssm" else ""


def test_every_module_has_a_tier():
    assert {top(name) for name in MODULES} - {""} <= TIERS.keys()


def test_imports_go_only_downward():
    wrong = []
    for name in MODULES:
        if name == "lnlm_ssm":
            continue
        for line, target in imports_of(name):
            here, there = top(name), top(target)
            if target == "lnlm_ssm":
                wrong.append(f"{name}:{line} imports the package root")
            elif here != there and TIERS[there] >= TIERS[here]:
                wrong.append(f"{name}:{line} (tier {TIERS[here]}) imports {target} (tier {TIERS[there]})")
    assert not wrong, "\n".join(wrong)


def find_cycles(graph: dict[str, list[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in graph.get(name, ()):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycles():
    graph = {name: sorted({target for _, target in imports_of(name) if target != name}) for name in MODULES}
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from lnlm_ssm.models import registry", "lnlm_ssm.models.registry"),
        ("from lnlm_ssm.models import MambaLM", "lnlm_ssm.models"),
        ("from lnlm_ssm import ops", "lnlm_ssm.ops"),
        ("import lnlm_ssm.layers.cache", "lnlm_ssm.layers.cache"),
    ],
)
def test_the_import_reader_resolves_modules_and_names(tmp_path, monkeypatch, source, expected):
    # An import inside a function counts like any other.
    monkeypatch.setitem(MODULES, "lnlm_ssm.models.probe", tmp_path / "probe.py")
    (tmp_path / "probe.py").write_text("def f():\n    " + source + "\n")
    assert imports_of("lnlm_ssm.models.probe") == [(2, expected)]
