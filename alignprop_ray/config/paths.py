"""Paths and URIs in an experiment config: where relative paths resolve, and what each field accepts.

Input files (prompt files, a local model directory) resolve against the YAML file's directory first, then
the current directory; outputs (the MLflow SQLite file, the Ray storage folder) resolve against the current
directory, where the user runs the command. Both are stored absolute, so Ray workers (whose working
directory Ray changes) never depend on the driver's cwd.

Each resolver raises ValueError with a message that does not repeat the field name (the caller adds it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from alignprop_ray.errors import UserError
from alignprop_ray.presets import TINY, looks_like_path
from alignprop_ray.prompts import builtin_sets, read_prompt_file

# org/name on the Hugging Face hub (or a legacy single name); letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
TRACKING_SCHEMES = ("sqlite", "http", "https", "databricks")
# The SQL databases behind a tracking server (PostgreSQL on clusters, docs/clusters.md): `report` may read
# one directly; training logs through the server.
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs")


@dataclass(frozen=True)
class PathContext:
    """Where relative input paths are looked up: the YAML file's directory first, then the cwd."""

    base_dir: Path | None = None
    cwd: Path = field(default_factory=Path.cwd)

    def search_dirs(self) -> list[Path]:
        dirs = [Path(os.path.abspath(self.base_dir))] if self.base_dir is not None else []
        return dirs + [d for d in [Path(os.path.abspath(self.cwd))] if d not in dirs]

    def find(self, spec: str) -> Path | None:
        """The absolute path of an existing file or directory, or None."""
        path = Path(spec).expanduser()
        if path.is_absolute():
            return path if path.exists() else None
        for folder in self.search_dirs():
            if (folder / path).exists():
                return Path(os.path.abspath(folder / path))
        return None

    def looked_in(self) -> str:
        return " and ".join(str(d) for d in self.search_dirs())


def resolve_pretrained(spec: str, paths: PathContext) -> str:
    """`tiny`, a hub id (kept), or a local diffusers pipeline directory (made absolute)."""
    if spec == TINY:
        return spec
    found = paths.find(spec)
    if found is None and looks_like_path(spec):
        raise ValueError(f"model directory {spec!r} not found (looked in {paths.looked_in()})")
    if found is not None:
        if not (found / "model_index.json").is_file():
            raise ValueError(f"{found} is not a diffusers pipeline directory (no model_index.json)")
        return str(found)
    if not _HUB_ID.fullmatch(spec):
        raise ValueError(f"{spec!r} is not 'tiny', a hub id (org/name) or a local diffusers directory")
    return spec


def resolve_prompts(spec: str, paths: PathContext) -> str:
    """A built-in set name (kept) or a prompt file (made absolute; must hold at least one prompt)."""
    if spec in builtin_sets():
        return spec
    found = paths.find(spec)
    if found is None:
        raise ValueError(
            f"{spec!r} is neither a built-in prompt set ({', '.join(builtin_sets())}) "
            f"nor an existing file (looked in {paths.looked_in()})"
        )
    if not found.is_file():
        raise ValueError(f"{found} is not a file")
    try:
        read_prompt_file(found)
    except UserError as err:
        raise ValueError(str(err)) from None
    return str(found)


def check_tracking_uri(uri: str, databases: bool = False) -> None:
    """Accept sqlite:///PATH, http(s)://HOST, databricks[://PROFILE] and, with `databases`, a SQL database
    URI (postgresql[+driver]://...); reject file stores."""
    scheme = urlparse(uri).scheme
    if databases and scheme.split("+")[0] in DATABASE_SCHEMES:
        return
    if uri == "databricks" or scheme in ("databricks", "http", "https", "sqlite"):
        if scheme in ("http", "https") and not urlparse(uri).netloc:
            raise ValueError(f"{uri!r} has no host (e.g. http://mlflow.example.com:5000)")
        if scheme == "sqlite" and not uri.startswith("sqlite:///"):
            raise ValueError(
                f"{uri!r}: write a SQLite store as sqlite:///relative.db or sqlite:////abs/path.db"
            )
        return
    if scheme in ("", "file") or re.match(r"[A-Za-z]:[\\/]", uri):
        raise ValueError(
            f"{uri!r} is an MLflow file store, which MLflow has deprecated; use sqlite:///mlflow.db "
            "(a SQLite file) or an http(s):// tracking server"
        )
    accepted = TRACKING_SCHEMES + (DATABASE_SCHEMES if databases else ())
    raise ValueError(f"unsupported scheme {scheme!r} in {uri!r} (accepted: {', '.join(accepted)})")


def resolve_tracking_uri(uri: str, paths: PathContext) -> str:
    """Make a relative sqlite:///file.db absolute (against the cwd); other URIs are kept."""
    check_tracking_uri(uri)
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return uri
    file = Path(os.path.abspath(Path(paths.cwd) / uri[len("sqlite:///") :]))
    if not file.parent.is_dir():
        raise ValueError(f"directory {file.parent} for the SQLite store does not exist")
    return f"sqlite:///{file}"


def check_storage_path(path: str) -> None:
    """Accept a local folder or s3://, gs://, gcs://, hdfs:// URIs (what Ray's storage_path takes)."""
    scheme = urlparse(path).scheme
    if "://" in path and scheme not in STORAGE_SCHEMES:
        raise ValueError(
            f"unsupported scheme {scheme!r} in {path!r} (a local folder, or {', '.join(STORAGE_SCHEMES)} URIs)"
        )


def resolve_storage_path(path: str, paths: PathContext) -> str:
    """Make a local storage folder absolute (against the cwd); cloud URIs are kept."""
    check_storage_path(path)
    if "://" in path:
        return path
    return os.path.abspath(Path(paths.cwd) / Path(path).expanduser())
