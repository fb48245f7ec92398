"""Training checkpoints: adapter + optimizer + step + RNG states + MLflow run id, in one directory.

Rank 0 writes the directory under a temporary name and renames it when complete; `meta.json` is
written last, so a directory without it is incomplete and is refused on load.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignprop_ray.engine.lora import load_adapter, save_adapter
from alignprop_ray.engine.step import AlignPropLearner

META = "meta.json"
STATE = "training_state.pt"
ADAPTER = "adapter"


@dataclass
class Progress:
    step: int  # optimizer steps completed
    run_id: str  # the MLflow run these steps were logged to
    skipped_steps: int = 0  # updates skipped for NaN/inf so far
    nonfinite_in_row: int = 0


def write_checkpoint(learner: AlignPropLearner, progress: Progress, parent: str | os.PathLike) -> Path:
    """Write a complete checkpoint directory inside `parent` and return it."""
    final = Path(parent) / f"checkpoint_{progress.step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-checkpoint-"))
    save_adapter(learner.parts.unet, tmp / ADAPTER)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"learner": learner.state_dict(), "rng": _rng_to_tensors(rng)}, tmp / STATE)
    (tmp / META).write_text(json.dumps(asdict(progress)))
    os.replace(tmp, final)
    return final


def read_checkpoint(directory: str | os.PathLike, learner: AlignPropLearner) -> Progress:
    """Restore adapter, optimizer and RNG states into `learner`; return the progress it recorded."""
    directory = Path(directory)
    if not (directory / META).is_file():
        raise RuntimeError(f"checkpoint {directory} is incomplete (no {META})")
    load_adapter(learner.parts.unet, directory / ADAPTER)
    state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    learner.load_state_dict(state["learner"])
    _restore_rng(state["rng"])
    return Progress(**json.loads((directory / META).read_text()))


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
