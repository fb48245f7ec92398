"""What each running trial of a sweep keeps in memory on the node that runs the sweep (the head).

    python bench/head_memory.py [--trials 2] [--steps 40] [--out head_memory.json]

Runs `alignprop-ray sweep sweeps/smoke.yaml` reduced to `--trials` trials of the tiny model, all at once,
on a private Ray instance (RAY_ADDRESS unset), and samples every process of that instance once a second:
the sweep command starts Ray, so every Ray process is one of its descendants. Each process is named by
the title Ray gives it (`ray::ImplicitFunc.train`: a trial's driver; `ray::TrainController.run`: its
Train controller; `ray::<Actor>`: any other actor; `ray::RayTrainWorker`: a Train worker, which runs on
a GPU node on a cluster, so it is not counted as head memory) and its unique memory (USS: the pages no
other process shares, what ending it would free) is read from /proc/PID/smaps.

The figure per trial: for each kind of process that the sweep runs once per trial (as many of them as
trials), the median of their peak USS, summed. Kinds with one process for the whole sweep (the sweep
driver, Ray's own daemons, idle workers) are listed apart. Run it under `flock /tmp/alignprop-ray.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
WORKER = "ray::RayTrainWorker"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=2, help="trials, all running at once (1 CPU worker each)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per trial")
    p.add_argument("--out", default=None, help="write the readings here as JSON")
    return p.parse_args()


def sweep_command(workdir: Path, trials: int, steps: int) -> list[str]:
    sets = {
        "name": "head-memory",
        "tracking.uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "storage.path": str(workdir / "runs"),
        "space.truncation": "{grid: [full]}",
        "space.train.lr": "{grid: [" + ", ".join(f"{1e-3 * (i + 1):.4f}" for i in range(trials)) + "]}",
        "tune.max_concurrent_trials": trials,
        "train.steps": steps,
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "sampling.steps": 4,
        "stop.collapse": "null",
    }
    command = [sys.executable, "-m", "alignprop_ray.cli", "sweep", str(ROOT / "sweeps" / "smoke.yaml")]
    return command + [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def kind(process: psutil.Process, sweep_pid: int) -> str | None:
    """What the process is: Ray's process title for Ray workers and actors, else its program."""
    if process.pid == sweep_pid:
        return "sweep driver (alignprop-ray sweep)"
    try:
        command = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    title = command[0] if command else ""
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]  # ray::TrainController.run -> ray::TrainController
    program = " ".join(Path(part).name for part in command[:3])
    for daemon in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor", "runtime_env", "mlflow"):
        if daemon in program:
            return f"Ray daemon: {daemon}" if daemon != "mlflow" else "MLflow server"
    return program[:60] or "?"


def sample(sweep: psutil.Process) -> dict[int, tuple[str, float]]:
    """pid -> (kind, USS MiB) of the sweep command and all its descendants, now."""
    out = {}
    for process in [sweep, *sweep.children(recursive=True)]:
        name = kind(process, sweep.pid)
        try:
            uss = process.memory_full_info().uss / MIB
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if name:
            out[process.pid] = (name, uss)
    return out


def measure(trials: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="head-memory-") as tmp:
        workdir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env.setdefault("HF_HUB_OFFLINE", "1")
        log = open(workdir / "sweep.log", "w")
        started = time.monotonic()
        sweep = subprocess.Popen(
            sweep_command(workdir, trials, steps), cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        peaks: dict[int, tuple[str, float]] = {}
        most_workers = 0
        parent = psutil.Process(sweep.pid)
        while sweep.poll() is None:
            with_workers = sample(parent)
            workers = sum(name == WORKER for name, _ in with_workers.values())
            most_workers = max(most_workers, workers)
            if workers == trials:  # every trial training: the steady state a sweep spends its time in
                for pid, (name, uss) in with_workers.items():
                    peaks[pid] = (name, max(uss, peaks.get(pid, (name, 0.0))[1]))
            time.sleep(1.0)
        log.close()
        output = (workdir / "sweep.log").read_text()
        if sweep.returncode != 0 or most_workers < trials:
            sys.exit(f"the sweep failed or its trials never ran together:\n{output[-4000:]}")
        return summarize(peaks, trials, time.monotonic() - started)


def summarize(peaks: dict[int, tuple[str, float]], trials: int, wall_s: float) -> dict:
    by_kind: dict[str, list[float]] = defaultdict(list)
    for name, uss in peaks.values():
        by_kind[name].append(uss)
    rows = []
    for name, values in sorted(by_kind.items(), key=lambda item: -sum(item[1])):
        per_trial = name != WORKER and name.startswith("ray::") and len(values) % trials == 0
        per_trial = per_trial and name != "ray::IDLE"
        rows.append(
            {
                "process": name,
                "count": len(values),
                "uss_mib_each": round(statistics.median(values), 1),
                "per_trial": per_trial,
            }
        )
    per_trial_mib = sum(r["uss_mib_each"] * r["count"] / trials for r in rows if r["per_trial"])
    shared_mib = sum(
        r["uss_mib_each"] * r["count"] for r in rows if not r["per_trial"] and r["process"] != WORKER
    )
    return {
        "trials": trials,
        "wall_s": round(wall_s, 1),
        "per_trial_mib": round(per_trial_mib, 1),
        "shared_mib": round(shared_mib, 1),
        "processes": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['trials']} trials at once, {result['wall_s']:.0f} s; USS per running trial on the head: "
        f"{result['per_trial_mib']:.0f} MiB (+ {result['shared_mib']:.0f} MiB for the sweep as a whole)",
        "",
        "| process | count | USS MiB each | per trial |",
        "| --- | --- | --- | --- |",
    ]
    for row in result["processes"]:
        each = f"{row['uss_mib_each']:.0f}"
        lines.append(
            f"| `{row['process']}` | {row['count']} | {each} | {'yes' if row['per_trial'] else ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    result = measure(args.trials, args.steps)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
