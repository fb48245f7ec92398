"""docs/extending.md's no-op method, built in memory from the diff printed there: the new module is executed
as `alignprop_ray.engine.methods.noop` (as if the diff were applied) and the added registry row is
evaluated in the registry's namespace. Configs name it by import path, `method: {name: tests.noop_method:ROW}`
(the registry's plugin form), so Ray workers and spawned processes that validate such a config import this
module and build the same row. tests/test_methods.py adds it to the rows its parametrized tests run on."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from alignprop_ray.engine.methods import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
MODULE = "alignprop_ray.engine.methods.noop"
NAME = f"{__name__}:ROW"  # what a config writes: `method: {name: tests.noop_method:ROW}`


def diff_files(text: str) -> dict[str, list[str]]:
    """The doc's first diff block, split by file: path -> the file's diff lines after its header."""
    block = re.search(r"```diff\n(.*?)```", text, re.DOTALL).group(1)
    files: dict[str, list[str]] = {}
    for line in block.splitlines():
        if line.startswith("diff --git "):
            current = files.setdefault(line.split()[-1].removeprefix("b/"), [])
        elif not line.startswith(("index ", "new file", "--- ", "+++ ")):
            current.append(line)
    return files


def added(lines: list[str]) -> str:
    """The text the diff adds (its `+` lines)."""
    return "\n".join(line[1:] for line in lines if line.startswith("+")) + "\n"


def context(lines: list[str]) -> list[str]:
    """The lines the diff keeps or removes, in order: what the file held around the change."""
    return [line[1:] for line in lines if line[:1] in (" ", "-")]


FILES = diff_files(DOC.read_text(encoding="utf-8"))
if MODULE not in sys.modules:
    module = types.ModuleType(MODULE)
    module.__file__ = str(DOC)
    exec(compile(added(FILES[MODULE.replace(".", "/") + ".py"]), str(DOC), "exec"), module.__dict__)
    sys.modules[MODULE] = module
ROW: registry.MethodRow = eval(  # the added row: `MethodRow(...),`, in the registry's names
    added(FILES["alignprop_ray/engine/methods/registry.py"]).strip().rstrip(","), vars(registry)
)
