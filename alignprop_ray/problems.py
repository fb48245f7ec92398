"""Turn pydantic validation errors into one-line problems that start with the dotted field name."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind a field annotation (also inside Optional / Annotated), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            model = section_model(arg)
            if model is not None:
                return model
    return None


def fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the section at `loc` (a path of field names) in `model`, or None if not a section."""
    for part in loc:
        field = model.model_fields.get(str(part))
        model = section_model(field.annotation) if field else None
        if model is None:
            return None
    return list(model.model_fields)


def unknown_field(dotted: str, valid: list[str] | None, origin: str = "") -> str:
    """`train.lrr: unknown field (did you mean train.lr?) (valid: ...)`."""
    name = dotted.rsplit(".", 1)[-1]
    parent = dotted[: -len(name)]
    text = f"{dotted}: unknown field{origin}"
    if valid:
        close = difflib.get_close_matches(name, valid, n=1)
        if close:
            text += f"; did you mean {parent}{close[0]}?"
        text += f" (valid: {', '.join(valid)})"
    return text


def format_validation_error(
    err: ValidationError, prefix: tuple[str, ...], root: type[BaseModel], label: tuple[str, ...] = ()
) -> list[str]:
    """One line per pydantic error; `prefix` is the loc of what was validated inside `root`, and `label`
    names where `root` itself sits (printed, e.g. `reward.aesthetic`, but not looked up in `root`)."""
    lines = []
    for error in err.errors(include_url=False):
        loc = prefix + tuple(str(part) for part in error["loc"])
        dotted = ".".join(label + loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(unknown_field(dotted, fields_at(root, loc[:-1])))
        else:
            lines.append(f"{dotted}: {_message(error)}")
    return [" ".join(line.split()) for line in lines]


def _message(error: dict[str, Any]) -> str:
    kind, ctx, got = error["type"], error.get("ctx") or {}, _short(error.get("input"))
    if kind == "missing":
        return "required"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {_number(ctx[key])} (got {got})"
    if kind == "multiple_of":
        return f"must be a multiple of {_number(ctx['multiple_of'])} (got {got})"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']} (got {got})"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    message = error["msg"][:1].lower() + error["msg"][1:]
    return f"{message} (got {got})"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
