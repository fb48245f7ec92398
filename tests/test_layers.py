"""The package's import graph: layers only point down, and no module imports itself back.

Every `import` counts, including the lazy ones inside functions: a lazy upward import is still a
dependency that a change on the upper layer can break.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alignprop_ray"

# Lowest first. A unit may import its own modules and any unit of a lower rank, never a unit of the same
# or a higher rank: engine <- train <- sweep, with the CLI on top.
RANKS = {
    "__init__": 0,
    "errors": 0,
    "metrics": 0,
    "presets": 0,
    "problems": 0,
    "fields": 0,
    "files": 0.5,  # reads a user's text file: above errors (its UserError), below prompts and config
    "selection": 0,  # which trial is best: constraints and Pareto fronts (sweep summary, report)
    "compat": 0,
    "console": 0,  # the console filter of train and sweep
    "prompts": 1,
    "rewards": 2,  # pure torch, like the engine, which uses the rewards' protocol
    "engine": 3,
    "toy": 4,  # trains the demo model with the engine
    "config": 4,  # typed experiment; parses truncation (engine) and checks reward specs (rewards)
    "tracking": 4,  # MLflow
    "serving": 4.5,  # Ray Serve: served rewards (their deployments, the pool, the workers' client)
    "train": 5,  # Ray Train: wires config, engine, rewards and tracking
    "report": 5,  # reads MLflow
    "registry": 6,  # registers a run's adapter as an MLflow model (finds runs as report does)
    "sweep": 7,  # Ray Tune: one trial = one train run; registers its best trial
    "cli": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports; `from package import name` counts as the submodule when it is one."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {name for name in found if name in known}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def test_every_unit_has_a_rank():
    assert {unit(m) for m in modules()} <= set(RANKS), "give new packages/modules a rank in RANKS"


def test_imports_only_point_down():
    upward = [
        f"{module} ({unit(module)}, rank {RANKS[unit(module)]}) imports {target} "
        f"({unit(target)}, rank {RANKS[unit(target)]})"
        for module, targets in graph().items()
        for target in targets
        if unit(target) != unit(module) and RANKS[unit(target)] >= RANKS[unit(module)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
