"""Faults during a training run, injected for real: the storage disk filling up and then the checkpoint
it leaves truncated, the MLflow artifact folder filling up. Each run is `alignprop-ray train` in a
subprocess joined to the session's Ray instance, so its exit status and its last line are what a user sees.
RELIABILITY.md lists each fault with its test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_run
from tests.test_reliability import fill, tmpfs, wait_for

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "sweeps" / "tiny.yaml"
RUN_TIMEOUT_S = 300  # bound on any one training command (~30 s each here)
# The smallest run that has checkpoints to lose: 32 px, 2 DDIM steps, one image, one worker.
SMALL = [
    "model.resolution=32",
    "sampling.steps=2",
    "truncation=fixed:1",
    "train.batch_size=1",
    "scaling.num_workers=1",
    "prompts.train=tiny",
    "prompts.eval=tiny",
    "train.steps=9",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "failure.max_failures=0",
]


def overrides(tmp: Path, *extra: str) -> list[str]:
    return tiny_run(tmp, *SMALL, *extra)


def ray_env(ray_session) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}


def train(tmp: Path, env: dict, name: str, *extra: str, wait: bool = True):
    """`alignprop-ray train` in `tmp`: the finished process, or (wait=False) the running one, whose output
    goes to files (a pipe nobody reads would stall it)."""
    sets = [arg for item in overrides(tmp, *extra) for arg in ("--set", item)]
    command = [sys.executable, "-m", "alignprop_ray.cli", "train", str(TINY), "--name", name, *sets]
    if wait:
        return subprocess.run(
            command, cwd=tmp, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
    with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
        return subprocess.Popen(command, cwd=tmp, env=env, stdout=out, stderr=err)


def finish(process: subprocess.Popen, tmp: Path, name: str) -> subprocess.CompletedProcess:
    """Wait for a `train(..., wait=False)` (bounded: killed after RUN_TIMEOUT_S)."""
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    out, err = (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def checkpoints(run_dir: Path) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints Ray keeps for the run, oldest first."""
    from ray.train import Result

    try:
        kept = Result.from_path(str(run_dir)).best_checkpoints
    except Exception:  # no record yet
        return []
    return sorted((metrics["step"], checkpoint.path) for checkpoint, metrics in kept)


def mlflow_run(tmp: Path, name: str):
    from mlflow import MlflowClient

    from alignprop_ray.tracking import find_run

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    return client, client.get_run(find_run(uri, "tiny", name))


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_complete(client, run_id: str, last: int = 9) -> None:
    """Every step logged exactly once: training metrics at 1..last, evaluations at 0 and every 3."""
    assert steps(client, run_id, "train/loss") == list(range(1, last + 1))
    assert steps(client, run_id, "eval/reward") == list(range(0, last + 1, 3))


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_storage_that_fills_up_ends_the_run_with_one_line_and_the_last_checkpoint_intact(
    ray_session, tmp_path
):
    """The disk fills up after the checkpoints of steps 3 and 6: the run ends with one line and step 6's
    checkpoint intact. Then step 6's checkpoint is cut short (as by a node that died uploading it), and the
    command the line printed resumes all the same: it skips the damaged checkpoint and resumes after step 3."""
    from alignprop_ray.train.checkpoint import read_checkpoint

    env = ray_env(ray_session)
    with tmpfs(tmp_path / "runs", "4m") as storage:
        running = train(tmp_path, env, "full", wait=False)
        wait_for(lambda: len(checkpoints(storage / "full")) == 2, RUN_TIMEOUT_S, "two checkpoints")
        fill(storage)  # the disk fills up between two checkpoints
        failed = finish(running, tmp_path, "full")
        assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
        kept = checkpoints(storage / "full")
        assert [step for step, _ in kept] == [3, 6]
        step, path = kept[-1]
        assert last_line(failed) == (
            f"alignprop-ray train: training failed: could not save the checkpoint of step {step + 3} to "
            f"{storage}: No space left on device; the checkpoints saved before it are intact; resume from "
            f"the checkpoint of step {step} with `alignprop-ray train {TINY} "
            + " ".join(f"--set {item}" for item in overrides(tmp_path))
            + " --name full`"
        )
        assert read_checkpoint(path).progress.step == step  # the last good checkpoint reads whole
        leftovers = {p.name for p in (storage / "full").glob("checkpoint_*") if p.is_dir()} - {
            Path(p).name for _, p in kept
        }
        assert not leftovers, f"a partial checkpoint was left in storage: {leftovers}"
        (storage / "filler").unlink()
        newest = Path(path)  # now a node died uploading it: two files cut short
        for name in ("training_state.pt", "adapter/pytorch_lora_weights.safetensors"):
            (newest / name).write_bytes((newest / name).read_bytes()[:100])
        resumed = train(tmp_path, env, "full")  # what the line says to run
        final = read_checkpoint(checkpoints(storage / "full")[-1][1]).progress.step
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    said = [
        line.split("[alignprop] ", 1)[1] for line in resumed.stdout.splitlines() if "[alignprop] " in line
    ]
    damaged = [line for line in said if line.startswith("damaged checkpoint")]
    assert len(damaged) == 1, said  # one line, naming the checkpoint and its first bad file
    assert damaged[0].startswith(
        f"damaged checkpoint skipped: {newest} (adapter/pytorch_lora_weights.safetensors: 100 bytes of "
    ), damaged
    assert any("resuming after step 3" in line for line in said), said
    client, run = mlflow_run(tmp_path, "full")
    assert run.info.status == "FINISHED"
    assert_complete(client, run.info.run_id)
    assert final == 9


def test_an_artifact_folder_that_fills_up_ends_the_run_with_one_line(ray_session, tmp_path):
    from alignprop_ray.train.checkpoint import read_checkpoint

    env = ray_env(ray_session)
    with tmpfs(tmp_path / "mlartifacts", "4m") as artifacts:  # beside mlflow.db: the experiment's folder
        running = train(tmp_path, env, "full-artifacts", wait=False)
        wait_for(lambda: checkpoints(tmp_path / "runs" / "full-artifacts"), RUN_TIMEOUT_S, "a checkpoint")
        fill(artifacts)  # before the evaluation of step 6 logs its images
        failed = finish(running, tmp_path, "full-artifacts")
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    line = last_line(failed)
    assert line.startswith(
        "alignprop-ray train: training failed: MLflow could not take the run's logs (log_image): "
        "OSError: [Errno 28] No space left on device"
    ), line
    step, path = checkpoints(tmp_path / "runs" / "full-artifacts")[-1]
    assert f"; resume from the checkpoint of step {step} with `alignprop-ray train " in line
    assert read_checkpoint(path).progress.step == step
    client, run = mlflow_run(tmp_path, "full-artifacts")
    assert run.info.status == "FAILED"
    logged = steps(client, run.info.run_id, "train/loss")
    assert logged == list(range(1, len(logged) + 1))  # what was logged before the failure, once each
