"""`make gpu-check`: the GPU acceptance check, in one go, for the day a CUDA machine is at hand.

    python bench/gpu_check.py [--workdir DIR] [--out FILE]   # CUDA; budget: 8 minutes on one H200/A100-class GPU
    python bench/gpu_check.py --smoke                        # the same code path on CPU, tiny sizes (< 1 minute)

1. tests/test_gpu.py: fp16 loss scaling, peak memory flat in K, and (with 2 GPUs) NCCL across two ranks.
2. Training speed and memory: 20 optimizer steps of the SD 1.5 architecture (random weights, nothing is
   downloaded) at 512 px, T=50 DDIM steps, K ~ U{0..50} drawn per step, fp16 base + fp32 LoRA, batch 2
   (sweeps/sd15_aesthetic.yaml's per-GPU batch), with the speed levers the shipped GPU experiments set
   (model.compile, model.activation_budget_mb: SHIPPED_GPU_EXPERIMENTS); prints peak GPU memory, images/s
   and the first step's time (compilation).
3. bench/gpu.py, sized to fit the budget: ours vs TRL (TRL only where it is installed: `pip install -e
   '.[bench]'`).

Each part runs in a process of its own, and a failed part does not stop the next. Everything lands in one
JSON (default WORKDIR/gpu_check.json) with each part's figures and duration; exit status 1 if a part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import gpu  # noqa: E402  (bench/gpu.py: the random SD 1.5 directory and the step runner)

BUDGET_S = 8 * 60  # the bound for the whole check on one modern GPU

# Part 2 on a GPU, and the same code path on CPU for --smoke. 21 steps: 1 warm-up (cuDNN autotuning, the
# caching allocator filling up) + 20 timed.
TRAIN = {"steps": 50, "k_low": 0, "resolution": 512, "batch": 2, "iters": 20, "warmup": 1}
TRAIN_SMOKE = {"steps": 4, "k_low": 0, "resolution": 64, "batch": 1, "iters": 3, "warmup": 1}


# The experiments shipped for GPUs: part 2 trains with the speed levers they set (the same in all of them).
SHIPPED_GPU_EXPERIMENTS = (
    "sd15_aesthetic",
    "sdxl_aesthetic",
    "sd35_medium_aesthetic",
    "paper_aesthetic",
    "paper_hps",
)  # and sweeps/methods_sd15.yaml, whose base is sd15_aesthetic.yaml


def shipped_levers() -> dict:
    """model.compile and model.activation_budget_mb of the shipped GPU experiments (ValueError if they differ)."""
    import yaml

    found = {}
    for name in SHIPPED_GPU_EXPERIMENTS:
        model = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text()).get("model") or {}
        found[name] = {
            "compile": model.get("compile", False),
            "activation_budget_mb": model.get("activation_budget_mb"),
        }
    if len({json.dumps(levers, sort_keys=True) for levers in found.values()}) != 1:
        raise ValueError(f"the shipped GPU experiments set different speed levers: {found}")
    return next(iter(found.values()))


def lever_options(levers: dict) -> tuple[str, ...]:
    """The levers as options of bench/step_ours.py."""
    options = ("--compile",) if levers["compile"] else ()
    if levers["activation_budget_mb"] is not None:
        options += ("--activation-budget-mb", str(levers["activation_budget_mb"]))
    return options


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/alignprop-gpu-check", help="model directory and raw results")
    p.add_argument("--out", default=None, help="the JSON report (default: WORKDIR/gpu_check.json)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny sizes: checks the code path")
    p.add_argument(
        "--bench-max-batch",
        type=int,
        default=None,
        help="largest batch bench/gpu.py tries (default 4; --smoke 1)",
    )
    p.add_argument("--trl-python", default=sys.executable, help="interpreter that has trl 0.23.1")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs it on CPU",
            file=sys.stderr,
        )
        return 2
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else workdir / "gpu_check.json"
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "smoke": args.smoke,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    start = time.monotonic()
    for name, part in (("tests", run_tests), ("train", run_train), ("bench", run_bench)):
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            report[name] = {"ok": True, **part(args, workdir)}
        except Exception as err:  # the report says what failed; the other parts still run
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[-4000:]}
        report[name]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"[gpu-check] {name}: {summary(name, report[name])}", flush=True)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["within_budget"] = report["seconds"] <= BUDGET_S
    out.write_text(json.dumps(report, indent=1))
    print(f"[gpu-check] {report['seconds']:.0f} s in all (budget {BUDGET_S} s); report: {out}")
    return 0 if all(report[name]["ok"] for name in ("tests", "train", "bench")) else 1


def run_tests(args, workdir: Path) -> dict:
    """tests/test_gpu.py under pytest; counts from its JUnit XML (on CPU every test skips itself)."""
    xml = workdir / "test_gpu.xml"
    xml.unlink(missing_ok=True)  # a report from an earlier run must not stand in for this one
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    proc = subprocess.run(
        [*command, f"--junitxml={xml}"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if not xml.is_file():  # pytest stopped before running anything
        raise RuntimeError(f"pytest exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    if proc.returncode != 0:
        raise RuntimeError(f"pytest exit {proc.returncode} {counts}:\n{proc.stdout[-3000:]}")
    return counts


def run_train(args, workdir: Path) -> dict:
    """Part 2: bench/step_ours.py for warmup + iters optimizer steps; the timed steps give images/s."""
    pipeline, shape, train = train_shape(args, workdir)
    runner = types.SimpleNamespace(workdir=str(workdir), trl_python=args.trl_python)
    levers = shipped_levers()
    result = gpu.run_side(
        "ours",
        runner,
        pipeline,
        train["batch"],
        k_fixed=None,
        k_low=train["k_low"],
        iters=train["iters"],
        warmup=train["warmup"],
        shape=shape,
        extra=lever_options(levers),
    )
    if result.get("oom"):
        raise RuntimeError(f"out of memory at batch {train['batch']}")
    seconds = result["step_s"]["values"]
    return {
        "shape": {**train, "dtype": shape["dtype"], "k_high": shape["steps"]},
        "images_per_s": train["batch"] * len(seconds) / sum(seconds),
        "median_step_s": result["step_s"]["median"],
        "peak_gpu_allocated_mib": result.get("peak_gpu_allocated_mib"),
        "peak_gpu_reserved_mib": result.get("peak_gpu_reserved_mib"),
        "peak_rss_steps_mib": result.get("peak_rss_steps_mib"),  # CPU (--smoke) only
        "ks": result["ks"],
        "unet_calls_per_step": result["unet_calls_per_step"],
        "levers": levers,
        "first_step_s": result["first_step_s"],  # with compile: the compilation
        "kept_calls": result["kept_calls"],  # per step: gradient calls the activation budget kept
    }


def run_bench(args, workdir: Path) -> dict:
    """Part 3: bench/gpu.py (ours vs TRL) at batch 1 and the largest that fits up to --bench-max-batch,
    one run per side and batch."""
    results = workdir / "gpu_bench.json"
    command = [sys.executable, str(HERE / "gpu.py"), "--workdir", str(workdir), "--out", str(results)]
    max_batch = args.bench_max_batch or (1 if args.smoke else 4)
    command += ["--reps", "1", "--max-batch", str(max_batch), "--trl-python", args.trl_python]
    command += ["--smoke"] if args.smoke else []
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/gpu.py exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(results.read_text())


def train_shape(args, workdir: Path) -> tuple[Path, dict, dict]:
    """Part 2's pipeline directory (written once, shared with bench/gpu.py), the run shape bench/gpu.py's
    step runner takes, and part 2's settings."""
    if args.smoke:
        from alignprop_ray.engine.models import save_tiny_model

        pipeline = workdir / "tiny"
        if not (pipeline / "model_index.json").is_file():
            save_tiny_model(pipeline)
        train, device, dtype, threads = TRAIN_SMOKE, "cpu", "float32", 1
    else:
        pipeline = gpu.write_sd15_random(workdir / "sd15-random")
        train, device, dtype, threads = TRAIN, "cuda", "float16", 4
    shape = {"steps": train["steps"], "resolution": train["resolution"], "device": device, "dtype": dtype}
    return pipeline, {**shape, "threads": threads}, train


def summary(name: str, part: dict) -> str:
    if not part["ok"]:  # what failed, and the last line of its traceback
        lines = part["error"].strip().splitlines()
        return "FAILED: " + (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")
    if name == "tests":
        return f"{part['tests']} tests, {part['skipped']} skipped ({part['seconds']:.0f} s)"
    if name == "train":
        memory = part["peak_gpu_allocated_mib"] or part["peak_rss_steps_mib"]
        where = "GPU allocated" if part["peak_gpu_allocated_mib"] else "RSS (CPU)"
        return (
            f"{part['images_per_s']:.2f} images/s, {part['median_step_s']:.2f} s/step (median), peak {where} "
            f"{memory:.0f} MiB, first step {part['first_step_s']:.0f} s, levers {' '.join(lever_options(part['levers']))}"
            f" ({part['seconds']:.0f} s)"
        )
    sides = ", ".join(
        f"{side}: largest batch {batch}" for side, batch in part.get("largest_batch", {}).items()
    )
    return f"{sides or part.get('skipped')}; {part.get('trl', 'TRL compared')} ({part['seconds']:.0f} s)"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
