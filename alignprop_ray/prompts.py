"""Prompt sets: the built-in lists in ``alignprop_ray/prompts/<name>.txt``, or a text file of your own.

A prompt file holds one prompt per line; blank lines and lines starting with ``#`` are ignored, and a
file with no prompt left is an error. Built-in sets:

- ``animals``: the 45 common animals that DDPO and AlignProp train on;
- ``eval_animals``: held-out animals (none of them in ``animals``) for evaluation;
- ``tiny``: four short prompts for CPU tests.

Prompt files are read on the driver (``load_prompts``) and the prompt lists are passed to the Ray workers,
so a worker on another node never needs the file.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from alignprop_ray.errors import UserError
from alignprop_ray.files import read_text


def builtin_sets() -> list[str]:
    """Names of the built-in prompt sets, sorted."""
    folder = resources.files("alignprop_ray").joinpath("prompts")
    return sorted(entry.name[: -len(".txt")] for entry in folder.iterdir() if entry.name.endswith(".txt"))


def parse_prompt_lines(text: str) -> list[str]:
    """Prompts in a file's text: one per line, stripped; blank lines and ``#`` comment lines dropped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts in a text file. Raises UserError if it is missing, unreadable or has no prompt."""
    path = Path(path).expanduser()
    prompts = parse_prompt_lines(read_text(path, "prompt file"))
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts (blank lines and # comments are ignored)")
    return prompts


def load_prompts(spec: str) -> list[str]:
    """The prompts of a built-in set name (``animals``) or of a text file path (read here, on the driver)."""
    if spec in builtin_sets():
        text = resources.files("alignprop_ray").joinpath("prompts", f"{spec}.txt").read_text(encoding="utf-8")
        return parse_prompt_lines(text)
    return read_prompt_file(spec)
