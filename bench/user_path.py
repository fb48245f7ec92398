"""The speed levers through the user path: `alignprop-ray train` (Ray Train, 1 worker, MLflow logging) on the
tiny pipeline at T=20, K=10, batch 2, next to TRL 0.23.1's `AlignPropTrainer.step()` on the same work.

    python bench/user_path.py --pipeline DIR [--reps 2] [--steps 10] [--out FILE]

Each rep runs, in fresh processes one after the other: TRL (bench/step_trl.py), then `alignprop-ray train`
with the defaults, with `model.compile: true`, with `model.activation_budget_mb: auto`, and with both (what
the shipped GPU experiments set). The experiment is section 2's work written as a config: the same pipeline
directory, prompts, saturation reward, LoRA (rank 4, alpha 4, Gaussian init, attention projections), DDIM
eta 0 with guidance 7.5, fixed K, AdamW lr 1e-3 / wd 1e-4, clipping at 1.0, loss scale 1 (TRL's loss is
`10 - mean(reward)`, unscaled); the worker gets both CPUs (torch threads 2), as TRL's process.

A step of a train run is the gap between the MLflow timestamps of consecutive steps (rank 0 stamps a step's
metrics as it ends), so it holds all a step costs through the CLI: generation, backward, the Ray report,
MLflow logging. The first WARMUP steps and the last (which evaluates and checkpoints) are left out. A run's
first step (`perf/step_seconds` of step 1, in the worker) holds compilation and the budget's probe; the
inductor cache is warm or cold as found on the machine (`cache` says which it was for the first compiling
run). Peak memory: the worker's `perf/peak_memory_mb` (peak RSS on CPU), TRL's peak RSS of its steps.
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
from pathlib import Path

import common
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
T, K, BATCH, THREADS = 20, 10, 2, 2
WARMUP = 2  # steps left out before the steady state
SIDES = {  # --set overrides of each side of ours
    "defaults": [],
    "compile": ["model.compile=true"],
    "budget": ["model.activation_budget_mb=auto"],
    "both": ["model.compile=true", "model.activation_budget_mb=auto"],
}


def experiment(pipeline: str, workdir: Path, steps: int) -> dict:
    """Section 2's work (bench/step_ours.py and step_trl.py) as an experiment file."""
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(common.PROMPTS) + "\n")
    return {
        "name": "user-path",
        "model": {
            "pretrained": pipeline,
            "dtype": "float32",
            "lora": {
                "rank": 4,
                "alpha": 4,
                "init": "gaussian",
                "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            },
        },
        "sampling": {"steps": T, "eta": 0.0, "guidance_scale": 7.5},
        "truncation": f"fixed:{K}",
        "reward": {"saturation": 1.0},
        "prompts": {"train": str(prompts), "eval": str(prompts), "eval_seeds": 2},
        "train": {
            "steps": steps,
            "batch_size": BATCH,
            "grad_accum": 1,
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "loss_scale": 1.0,
            "max_grad_norm": 1.0,
            "eval_every": steps,  # evaluation and the checkpoint come after the last step only
            "checkpoint_every": steps,
        },
        "scaling": {"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": THREADS}},
        "tracking": {"experiment": "user-path"},
        "failure": {"max_failures": 0},
    }


def run_ours(side: str, rep: int, config: Path, workdir: Path) -> dict:
    """One `alignprop-ray train` command of `side`; its steady-state step times from MLflow."""
    from mlflow import MlflowClient

    name = f"{side}-{rep}"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    sets = [f"tracking.uri={uri}", f"storage.path={workdir / 'runs'}", *SIDES[side]]
    command = [str(Path(sys.executable).with_name("alignprop-ray")), "train", str(config), "--name", name]
    command += [arg for item in sets for arg in ("--set", item)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a private instance
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("user-path").experiment_id
    (run,) = client.search_runs([experiment_id], f"tags.`alignprop.name` = '{name}'")
    run_id = run.info.run_id

    def history(key: str) -> dict[int, object]:
        return {m.step: m for m in client.get_metric_history(run_id, key)}

    stamps, inside, memory = (
        history("train/loss"),
        history("perf/step_seconds"),
        history("perf/peak_memory_mb"),
    )
    last = max(stamps)
    steady = range(WARMUP + 1, last)  # step s's interval ends when step s is logged
    return {
        "side": side,
        "command_s": time.perf_counter() - started,
        "step_s": common.summary([(stamps[s].timestamp - stamps[s - 1].timestamp) / 1000 for s in steady]),
        "first_step_s": inside[1].value,
        "in_worker_step_s": common.summary([inside[s].value for s in steady]),
        "peak_memory_mib": max(m.value for m in memory.values()),
    }


def run_trl(pipeline: str, trl_python: str, timed: int) -> dict:
    command = [
        trl_python,
        str(HERE / "step_trl.py"),
        "--pipeline",
        pipeline,
        "--steps",
        str(T),
        "--k",
        str(K),
    ]
    command += [
        "--batch",
        str(BATCH),
        "--threads",
        str(THREADS),
        "--warmup",
        str(WARMUP),
        "--iters",
        str(timed),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    return {"side": "trl", "step_s": result["step_s"], "peak_memory_mib": result["peak_rss_steps_mib"]}


def inductor_cache_warm() -> bool:
    """Whether torch's inductor cache (default /tmp/torchinductor_USER) already holds compiled code, so that
    compiling mostly loads it."""
    import getpass

    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor_{getpass.getuser()}"))
    return folder.is_dir() and any(folder.glob("*/*.py"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pipeline", required=True, help="the tiny pipeline directory (alignprop-ray make-tiny-model)"
    )
    p.add_argument("--reps", type=int, default=2)
    p.add_argument(
        "--steps", type=int, default=10, help="optimizer steps per train run (WARMUP and the last untimed)"
    )
    p.add_argument("--trl-python", default=sys.executable)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warm = inductor_cache_warm()
    runs: dict[str, list[dict]] = {side: [] for side in ("trl", *SIDES)}
    with tempfile.TemporaryDirectory(prefix="alignprop-user-path-") as tmp:
        workdir = Path(tmp)
        config = workdir / "experiment.yaml"
        config.write_text(yaml.safe_dump(experiment(str(Path(args.pipeline).resolve()), workdir, args.steps)))
        for rep in range(args.reps):
            runs["trl"].append(run_trl(args.pipeline, args.trl_python, args.steps - 1 - WARMUP))
            for side in SIDES:
                runs[side].append(run_ours(side, rep, config, workdir))
    medians = {side: statistics.median(r["step_s"]["median"] for r in rs) for side, rs in runs.items()}
    result = {
        "config": {"T": T, "K": K, "batch": BATCH, "threads": THREADS, "steps": args.steps, "warmup": WARMUP},
        "cache": "warm" if warm else "cold",
        "runs": runs,
        "median_step_s": medians,
        "ratio_to_trl": {side: medians[side] / medians["trl"] for side in SIDES},
    }
    common.emit(result, args.out)


if __name__ == "__main__":
    main()
