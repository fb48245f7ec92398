"""Training checkpoints: adapter + optimizer + step + RNG states + MLflow run id, in one directory.

Rank 0 writes the directory under a temporary name and renames it when complete; `meta.json` is written
last and lists every other file with its size. Ray Train then copies the directory to storage, in no
particular order, so a node that dies mid-upload (or a disk that fills) can leave any file missing or
short: `read_checkpoint` reads and checks every file before anything is applied, and raises
DamagedCheckpoint for such a folder (the loop then resumes from the checkpoint before it).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alignprop_ray.engine.lora import load_adapter, read_adapter, save_adapter
from alignprop_ray.engine.step import AlignPropLearner

META = "meta.json"
STATE = "training_state.pt"
ADAPTER = "adapter"
UNSENT_LOGS = "unsent_logs"  # rank 0's MLflow calls not yet sent when the checkpoint was written
FILES = "files"  # meta.json key: every other file of the checkpoint -> its size in bytes


class DamagedCheckpoint(Exception):
    """A checkpoint folder that cannot be read whole: a file missing, short or garbled."""


class StorageError(RuntimeError):
    """A checkpoint could not be written: storage.path (or the local temporary folder) is full, read-only
    or gone."""


@dataclass
class Progress:
    step: int  # optimizer steps completed
    run_id: str  # the MLflow run these steps were logged to
    skipped_steps: int = 0  # updates skipped for NaN/inf so far
    nonfinite_in_row: int = 0
    wall_seconds: float = 0.0  # seconds spent in training steps so far (perf/wall_seconds)
    images_generated: int = 0  # denoising chains sampled by all workers so far (perf/images_generated)


@dataclass
class CheckpointContents:
    """A checkpoint read and checked, not yet applied."""

    directory: Path
    progress: Progress
    state: dict[str, Any]  # learner (optimizer, scaler, schedule) and RNG states

    def restore(self, learner: AlignPropLearner) -> Progress:
        """Load adapter, optimizer and RNG states into `learner`; the progress the checkpoint recorded."""
        load_adapter(learner.parts.denoiser, self.directory / ADAPTER)
        learner.load_state_dict(self.state["learner"])
        _restore_rng(self.state["rng"])
        return self.progress


def write_checkpoint(
    learner: AlignPropLearner,
    progress: Progress,
    parent: str | os.PathLike,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint directory inside `parent` and return it; `extras(directory)` may add
    files (rank 0 adds its unsent MLflow calls under UNSENT_LOGS)."""
    final = Path(parent) / f"checkpoint_{progress.step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-checkpoint-"))
    save_adapter(learner.parts.denoiser, tmp / ADAPTER)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"learner": learner.state_dict(), "rng": _rng_to_tensors(rng)}, tmp / STATE)
    if extras:
        extras(tmp)
    files = {
        path.relative_to(tmp).as_posix(): path.stat().st_size for path in tmp.rglob("*") if path.is_file()
    }
    (tmp / META).write_text(json.dumps({**asdict(progress), FILES: dict(sorted(files.items()))}))
    os.replace(tmp, final)
    return final


def read_checkpoint(directory: str | os.PathLike) -> CheckpointContents:
    """Read and check every file of a checkpoint, applying nothing; DamagedCheckpoint names the first bad one.

    Checked: meta.json parses; every file it lists is there at its size (checkpoints written before it
    listed them skip this); the adapter is a whole safetensors file; the training state loads with
    `weights_only=True` and holds the learner and RNG states.
    """
    directory = Path(directory)
    meta = _read(directory / META, lambda path: json.loads(path.read_text()))
    for name, size in meta.pop(FILES, {}).items():
        path = directory / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            raise DamagedCheckpoint(
                f"{name}: " + ("missing" if found is None else f"{found} bytes of {size}")
            )
    progress = _read(directory / META, lambda _: Progress(**meta))
    _read(directory / ADAPTER, read_adapter)
    state = _read(directory / STATE, lambda path: torch.load(path, map_location="cpu", weights_only=True))
    if not isinstance(state, dict) or not {"learner", "rng"} <= state.keys():
        raise DamagedCheckpoint(f"{STATE}: no learner and RNG states in it")
    return CheckpointContents(directory, progress, state)


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(path)
    except Exception as err:  # any reader's error on a file we wrote means the file is not what we wrote
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        raise DamagedCheckpoint(f"{path.name}: {lines[0][:200]}") from err


def _rng_to_tensors(rng: dict) -> dict:
    """Python's RNG state as plain lists, so the file loads with `weights_only=True`."""
    version, internal, gauss = rng["python"]
    return {**rng, "python": [version, list(internal), gauss]}


def _restore_rng(rng: dict) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
