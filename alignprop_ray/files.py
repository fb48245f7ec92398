"""Reading a user's text file (an experiment, a sweep, a prompt list): one line naming the file when it
cannot be read."""

from __future__ import annotations

import os
from pathlib import Path

from alignprop_ray.errors import UserError


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of `path`; UserError `<path>: no such <what>` or `<path>: cannot read this <what>: ...`."""
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read this {what}: {err}") from None
