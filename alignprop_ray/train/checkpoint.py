"""Training checkpoints: adapter + optimizer + step + RNG states + MLflow run id, in one directory; reported
to Ray Train with a step's metrics, and restored from when a run resumes.

Rank 0 writes the directory under a temporary name and renames it when complete; `meta.json` is written
last and lists every other file with its size. Ray Train then copies the directory to storage, in no
particular order, so a node that dies mid-upload (or a disk that fills) can leave any file missing or
short: `read_checkpoint` reads and checks every file before anything is applied, and raises
DamagedCheckpoint for such a folder (the loop then resumes from the checkpoint before it).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import posixpath
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alignprop_ray.engine.distributed import gather_objects, world
from alignprop_ray.engine.lora import load_adapter, read_adapter, save_adapter
from alignprop_ray.engine.step import Learner
from alignprop_ray.train import base_fidelity

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

    def restore(self, learner: Learner) -> Progress:
        """Load adapter, optimizer and RNG states into `learner` (with an EMA, its trained weights replace
        the adapter's, which are the average); the progress the checkpoint recorded."""
        load_adapter(learner.parts.denoiser, self.directory / ADAPTER)
        learner.load_state_dict(self.state["learner"])
        _restore_rng(self.state["rng"])
        return self.progress


def write_checkpoint(
    learner: Learner,
    progress: Progress,
    parent: str | os.PathLike,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint directory inside `parent` and return it; `extras(directory)` may add
    files (rank 0 adds its unsent MLflow calls under UNSENT_LOGS)."""
    final = Path(parent) / f"checkpoint_{progress.step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-checkpoint-"))
    with learner.evaluation_weights():  # with train.ema_decay: the EMA; the trained weights go in STATE
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


# --- in a Ray Train worker: report a checkpoint with each step's metrics, and resume from one ------------

# A report's count of the run's steps, read by the sweep's stoppers (sweep/stoppers.py TOTAL_STEPS): a run
# its time budget ends early reports it at its last step, so Tune sees that step as the last, not a cut.
TOTAL_STEPS = "total_steps"


def report_step(
    learner: Learner, progress: Progress, metrics: dict, cfg, rank: int, logger, last: bool
) -> None:
    """Report every step (all ranks: it is a barrier); attach a checkpoint every checkpoint_every steps.

    The checkpoint carries rank 0's MLflow calls not yet sent (written, not waited for: training does not
    wait on MLflow), so a restart from it loses none of the logs of the steps it covers. A checkpoint that
    cannot be written ends the run with a StorageError, its partial copy in storage removed.
    """
    import ray.train

    metrics = {**metrics, "step": progress.step}
    if last and progress.step < cfg.train.steps:  # ended by train.max_wall_seconds: this is the last step
        metrics[TOTAL_STEPS] = progress.step
    due = progress.step % cfg.train.checkpoint_every == 0 or last
    if not due:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as parent:
        checkpoint, name = None, None
        if rank == 0:  # every worker holds the same adapter: one copy is enough
            extras = functools.partial(_checkpoint_extras, logger=logger)
            try:
                directory = write_checkpoint(learner, progress, parent, extras)
            except OSError as err:
                raise _storage_error(err, progress, "a local temporary folder") from err
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            # Ray's own names are timestamps; the step first tells a reader which is which.
            name = f"checkpoint_{progress.step:07d}_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
        try:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        except OSError as err:
            if name:
                _remove_from_storage(cfg.storage.path, name)
            raise _storage_error(err, progress, cfg.storage.path) from err


def _storage_error(err: OSError, progress: Progress, where: str) -> StorageError:
    reason = os.strerror(err.errno) if err.errno else str(err)
    return StorageError(
        f"could not save the checkpoint of step {progress.step} to {where}: {reason}; "
        "the checkpoints saved before it are intact"
    )


def _remove_from_storage(storage_path: str, checkpoint_name: str) -> None:
    """Delete what a failed upload left of a checkpoint (it was never registered; on a full disk the room
    helps the rerun): `<storage.path>/<run name>/<checkpoint_name>`, Ray's documented layout."""
    import pyarrow.fs
    import ray.train

    with contextlib.suppress(Exception):  # nothing was written, or the storage is gone: nothing to clean
        if "://" in storage_path:
            filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        else:
            filesystem, root = pyarrow.fs.LocalFileSystem(), os.path.abspath(storage_path)
        run = ray.train.get_context().get_experiment_name()
        filesystem.delete_dir(posixpath.join(root, run, checkpoint_name))


def _checkpoint_extras(directory: Path, logger) -> None:
    """What a checkpoint carries besides the training state: rank 0's unsent MLflow calls, the step-0
    reference of eval.base_fidelity."""
    if logger:
        logger.save_unsent(directory / UNSENT_LOGS)
    base_fidelity.save_reference(directory)


def restore(checkpoint, learner: Learner, logger, run_id: str, say: Callable[[str], None]) -> Progress:
    """Resume from the newest intact checkpoint: the one Ray hands, or if that one is damaged (a node died
    while writing or uploading it), the newest intact one the run keeps; each damaged one is named in one
    line (`say`, on rank 0). None intact (or none at all): step 0. Rank 0 queues the MLflow calls the
    checkpoint carried."""
    from alignprop_ray.tracking import read_unsent

    rank = world()[0]
    progress = Progress(step=0, run_id=run_id)
    base_fidelity.forget()
    for candidate in _newest_first(checkpoint, say):
        try:
            with candidate.as_directory() as directory:
                contents = read_checkpoint(directory)
                unsent = Path(directory) / UNSENT_LOGS
                try:
                    read_unsent(unsent)
                except ValueError as err:
                    raise DamagedCheckpoint(f"{UNSENT_LOGS}/{err}") from err
                try:
                    reference = base_fidelity.read_reference(Path(directory))
                except ValueError as err:
                    raise DamagedCheckpoint(str(err)) from err
                progress = contents.restore(learner)
                base_fidelity.keep(reference)
                if logger:
                    logger.resend(unsent)
            break
        except DamagedCheckpoint as err:
            if rank == 0:
                say(f"damaged checkpoint skipped: {candidate.path} ({err})")
    else:
        if checkpoint is not None and rank == 0:
            say("no intact checkpoint left: training starts over from step 0")
    steps = gather_objects(progress.step)
    if len(set(steps)) != 1:  # a download that failed on one node only: the ranks would train apart
        raise RuntimeError(f"workers restored different checkpoints (steps by rank: {steps})")
    return progress


def _newest_first(checkpoint, say: Callable[[str], None]):
    """`checkpoint` (the newest, as Ray hands it), then the run's other kept checkpoints, newest first."""
    if checkpoint is None:
        return
    yield checkpoint
    from ray.train import Result

    run_dir = posixpath.dirname(checkpoint.path.rstrip("/"))  # <storage.path>/<run name>/checkpoint_*
    try:
        kept = Result.from_path(run_dir, storage_filesystem=checkpoint.filesystem).best_checkpoints
    except Exception as err:  # Ray's own record of the run is unreadable: nothing older to offer
        say(f"cannot list the older checkpoints of {run_dir}: {err}")
        return
    for older, _ in sorted(kept, key=lambda pair: pair[1].get("step", -1), reverse=True):
        if older.path != checkpoint.path:
            yield older
