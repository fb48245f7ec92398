"""Run every benchmark, each measurement in a fresh process, and write BENCHMARKS.md and bench/results.json.

    python bench/run.py --pipeline DIR [--trl-python PY] [--quick]

Environment: BENCH_REPS (alternating runs per side, default 5), BENCH_ITERS (timed steps per run,
default 8), BENCH_THREADS (torch threads for the single-process benchmarks, default: all cores),
BENCH_BUDGET_MB (model.activation_budget_mb of the levers-on side of section 2, default 80).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ("floor", "trl", "memory", "ray", "user_path", "gpu")
OWN_SCRIPTS = ("served_rewards",)  # bench/served_rewards.py --out bench/results.json


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pipeline", required=True, help="the tiny pipeline directory (alignprop-ray make-tiny-model)"
    )
    p.add_argument("--trl-python", default=sys.executable, help="interpreter with trl 0.23.1 installed")
    p.add_argument("--workdir", default="/tmp/alignprop-bench", help="scratch space (GPU model, raw JSON)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--quick", action="store_true", help="1 rep, 2 steps: checks that everything runs")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--results", default=str(HERE / "results.json"))
    return p.parse_args()


def shown(cmd: list[str]) -> str:
    return " ".join(Path(c).name if c.endswith((".py", "python", "python3")) else c for c in cmd)


def run_json(
    cmd: list[str], timeout: float = 1800, extra_env: dict | None = None, quiet: bool = False
) -> dict:
    """Run one measurement process (with `extra_env` added to the environment); its stdout ends with
    one JSON object."""
    if not quiet:
        prefix = "".join(f"{k}={v} " for k, v in (extra_env or {}).items())
        print("  $", prefix + shown(cmd), flush=True)
    env = {**os.environ, **extra_env} if extra_env else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def run_json_together(cmds: list[list[str]]) -> list[dict]:
    """Run measurement processes at the same time (each as `run_json`)."""
    print("  $", " & ".join(shown(cmd) for cmd in cmds), flush=True)
    with ThreadPoolExecutor(len(cmds)) as pool:
        return list(pool.map(lambda cmd: run_json(cmd, quiet=True), cmds))


def allocator_envs() -> dict[str, dict]:
    """Allocator settings for the memory benchmark, as environment additions."""
    import ray

    envs = {"default": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
    jemalloc = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    if jemalloc.is_file():
        envs["jemalloc"] = {"LD_PRELOAD": str(jemalloc)}
    return envs


class Bench:
    def __init__(self, args):
        self.args = args
        quick = args.quick
        self.reps = 1 if quick else int(os.environ.get("BENCH_REPS", 5))
        self.iters = 2 if quick else int(os.environ.get("BENCH_ITERS", 8))
        self.warmup = 1 if quick else 2
        self.threads = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
        self.py = sys.executable
        # Issue 18's levers: model.compile and model.activation_budget_mb. The budget is what TRL's peak RSS
        # leaves over ours on this pipeline (~100 MiB: two UNet calls' 38 MiB), so that side stays within TRL's.
        budget = os.environ.get("BENCH_BUDGET_MB", "80")
        self.levers = ("--compile", "--activation-budget-mb", budget)

    def step_cmd(self, side: str, *extra: str) -> list[str]:
        python = self.py if side == "ours" else self.args.trl_python
        script = HERE / f"step_{side}.py"
        return [
            python,
            str(script),
            "--pipeline",
            self.args.pipeline,
            "--steps",
            "20",
            "--k",
            "10",
            "--batch",
            "2",
            "--threads",
            str(self.threads),
            "--warmup",
            str(self.warmup),
            "--iters",
            str(self.iters),
            *extra,
        ]

    def floor(self) -> dict:
        """Ours vs the compute floor; then one step broken into phases, and a profile."""
        runs = [run_json(self.step_cmd("ours", "--floor")) for _ in range(1 if self.args.quick else 3)]
        phases = run_json(self.step_cmd("ours", "--phases"))
        profile = run_json(self.step_cmd("ours", "--profile"))
        phases["profile_top_ops"] = profile["profile_top_ops"]
        return {"runs": runs, "phases": phases}

    def trl(self) -> dict:
        """Ours (issue 18's speed levers off, then on) and TRL alternating, each run a fresh process."""
        ours, levers, trl = [], [], []
        for _ in range(self.reps):
            ours.append(run_json(self.step_cmd("ours")))
            levers.append(run_json(self.step_cmd("ours", *self.levers)))
            trl.append(run_json(self.step_cmd("trl")))
        return {"ours": ours, "ours_levers": levers, "trl": trl, "levers": list(self.levers)}

    def memory(self) -> dict:
        """Peak RSS per (K, checkpointing, allocator) at resolution 128 (64x64 latents), one fresh process each.

        Each cell runs under each allocator setting: glibc malloc as configured by default; glibc with
        its mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so that freed large blocks go back to
        the OS and RSS follows the memory actually in use instead of what the allocator keeps after frees;
        and jemalloc (the copy Ray ships, preloaded), where it exists.
        """
        runs = []
        for k in (1, 5, 10, 20):
            for checkpoint in (True, False):
                for allocator, extra_env in allocator_envs().items():
                    cmd = [
                        self.py,
                        str(HERE / "step_ours.py"),
                        "--pipeline",
                        self.args.pipeline,
                        "--steps",
                        "20",
                        "--k",
                        str(k),
                        "--batch",
                        "2",
                        "--resolution",
                        "128",
                        "--threads",
                        str(self.threads),
                        "--warmup",
                        "1",
                        "--iters",
                        "1",
                    ] + ([] if checkpoint else ["--no-checkpoint"])
                    runs.append({"allocator": allocator, **run_json(cmd, extra_env=extra_env)})
        return {"runs": runs}

    def ray(self) -> dict:
        """In-process (alone, then two copies at once) and Ray (1 and 2 workers), alternating; the
        worker-count order flips each rep. Two in-process copies at once, without Ray, are the
        machine's own ceiling for 2 workers.

        Then one run with Ray's default controller poll of 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
        instead of the 0.1 s that `run_training` sets: what the per-step report wait costs without it.
        """
        steps = "6" if self.args.quick else "16"
        script = str(HERE / "ray_train.py")
        inprocess_cmd = [self.py, script, "inprocess", "--steps", steps]
        inprocess, together, ray_runs = [], [], []
        for rep in range(1 if self.args.quick else 2):
            inprocess.append(run_json(inprocess_cmd))
            together.append(run_json_together([inprocess_cmd, inprocess_cmd]))
            order = ["1", "2"] if rep % 2 == 0 else ["2", "1"]
            ray_runs.append(run_json([self.py, script, "ray", "--steps", steps, "--workers", *order]))
        what_if = run_json(
            [self.py, script, "ray", "--steps", steps, "--workers", "1", "2", "--poll-interval", "2.0"]
        )
        return {
            "inprocess": inprocess,
            "inprocess_together": together,
            "ray": ray_runs,
            "ray_poll_2.0": [what_if],
        }

    def user_path(self) -> dict:
        """`alignprop-ray train` (1 Ray worker) with issue 18's levers off and on, next to TRL's step."""
        command = [self.py, str(HERE / "user_path.py"), "--pipeline", self.args.pipeline]
        command += ["--trl-python", self.args.trl_python, "--reps", "1" if self.args.quick else "2"]
        return run_json(command + ["--steps", "5" if self.args.quick else "10"], timeout=3600)

    def gpu(self) -> dict:
        return run_json(
            [
                self.py,
                str(HERE / "gpu.py"),
                "--workdir",
                str(Path(self.args.workdir) / "gpu"),
                "--trl-python",
                self.args.trl_python,
            ],
            timeout=3 * 3600,
        )


def machine() -> dict:
    info = {
        "cpu": "unknown",
        "cores": os.cpu_count(),
        "ram_gib": None,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    for line in open("/proc/meminfo", encoding="ascii"):
        if line.startswith("MemTotal"):
            info["ram_gib"] = int(line.split()[1]) / 2**20
    return info


def versions(trl_python: str) -> dict:
    import importlib.metadata as md

    names = ["torch", "diffusers", "transformers", "peft", "accelerate", "ray", "mlflow"]
    out = {n: md.version(n) for n in names}
    code = "import importlib.metadata as m; print(m.version('trl'))"
    out["trl"] = (
        subprocess.run([trl_python, "-c", code], capture_output=True, text=True).stdout.strip() or "missing"
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    out["alignprop-ray"] = commit.stdout.strip() or "unknown"
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def loadavg() -> str:
    return " ".join(open("/proc/loadavg", encoding="ascii").read().split()[:3])


def main() -> None:
    args = parse_args()
    bench = Bench(args)
    results = {
        "started": utc_now(),
        "load_start": loadavg(),
        "machine": machine(),
        "versions": versions(args.trl_python),
        "threads": bench.threads,
        "reps": bench.reps,
        "iters": bench.iters,
        "warmup": bench.warmup,
        "quick": args.quick,
    }
    previous = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    t0 = time.perf_counter()
    for section in SECTIONS:
        if section in args.only:
            print(f"[bench] {section} (load {loadavg()})", flush=True)
            started, when, load = time.perf_counter(), utc_now(), loadavg()
            results[section] = getattr(bench, section)()
            results[section].update(
                seconds=time.perf_counter() - started, started=when, load_start=load, load_end=loadavg()
            )
        elif section in previous:  # keep the last measurement of sections not rerun, with its date and load
            results[section] = previous[section]
            for key, top in (("started", "started"), ("load_start", "load_start"), ("load_end", "load_end")):
                results[section].setdefault(key, previous.get(top, "?"))
    for section in OWN_SCRIPTS:  # measured by scripts of their own (under the Ray lock): kept as they are
        if section in previous:
            results[section] = previous[section]
    results["load_end"] = loadavg()
    results["minutes"] = (time.perf_counter() - t0) / 60
    Path(args.results).write_text(json.dumps(results, indent=1))
    Path(args.markdown).write_text(report.render(results))
    print(
        f"[bench] wrote {args.markdown} and {args.results} in {results['minutes']:.1f} min; "
        f"load {results['load_start']} -> {results['load_end']}"
    )


if __name__ == "__main__":
    main()
