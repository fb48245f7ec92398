"""`make gpu-check` (bench/gpu_check.py) on CPU: --smoke runs its three parts on the tiny model, the same
code path as on a GPU, and writes the report a GPU run writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import GPU_CHECK as SCRIPT
from tests.helpers import gpu_check_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gpu-check")
    out = workdir / "report.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--workdir", str(workdir), "--out", str(out)]
    # a hang guard: at idle priority beside the Ray tests (make test) the smoke run took up to 590 s
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow  # the smoke run takes about a minute
def test_every_part_ran(smoke):
    report, _ = smoke
    assert report["smoke"] is True
    assert all(report[part]["ok"] for part in ("tests", "train", "bench")), report
    tests = report["tests"]
    assert tests["tests"] >= 3 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]  # each test skips itself without CUDA


@pytest.mark.slow  # the smoke run takes about a minute
def test_the_training_run_did_the_work_it_reports(smoke):
    report, stdout = smoke
    train = report["train"]
    steps, (warmup, iters) = train["shape"]["steps"], (train["shape"]["warmup"], train["shape"]["iters"])
    assert len(train["ks"]) == warmup + iters and all(0 <= k <= steps for k in train["ks"])
    # T forward UNet calls per step, plus a recompute in backward for each of the last K calls the activation
    # budget did not keep, plus the budget's probe in the first step: gradient reached the last K steps only
    assert train["levers"] == shipped_levers() and train["levers"]["activation_budget_mb"] is not None
    expected = [
        steps + k - kept + (i == 0)
        for i, (k, kept) in enumerate(zip(train["ks"], train["kept_calls"], strict=True))
    ]
    assert train["unet_calls_per_step"] == expected
    assert any(train["kept_calls"]) and train["first_step_s"] > 0
    assert train["images_per_s"] > 0 and train["median_step_s"] > 0
    assert (train["peak_gpu_allocated_mib"] or train["peak_rss_steps_mib"]) > 0
    line = next(line for line in stdout.splitlines() if line.startswith("[gpu-check] train: "))
    assert "images/s" in line and "MiB" in line


def shipped_levers() -> dict:
    return gpu_check_script().shipped_levers()


def test_the_shipped_gpu_experiments_turn_both_speed_levers_on(hub_reachable):
    """What `make gpu-check` trains with (part 2) is what the GPU experiments set, and they validate."""
    from alignprop_ray.config import load_experiment
    from alignprop_ray.sweep.protocol import load_comparison

    assert shipped_levers() == {"compile": True, "activation_budget_mb": "auto"}
    for name in ("sd15_aesthetic", "sdxl_aesthetic", "sd35_medium_aesthetic", "paper_aesthetic", "paper_hps"):
        model = load_experiment(ROOT / "sweeps" / f"{name}.yaml").model
        assert (model.compile, model.activation_budget_mb) == (True, "auto"), name
    model = load_comparison(ROOT / "sweeps" / "methods_sd15.yaml").selection_sweep(0).reference.model
    assert (model.compile, model.activation_budget_mb) == (True, "auto")


@pytest.mark.slow  # the smoke run takes about a minute
def test_the_benchmark_ran_our_side_and_says_what_it_left_out(smoke):
    bench = smoke[0]["bench"]
    assert bench["largest_batch"]["ours"] >= 1
    assert {run["side"] for run in bench["runs"]} == set(bench["largest_batch"])
    assert ("trl" in bench["largest_batch"]) != ("trl" in bench), bench  # TRL compared, or a note why not


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs it on CPU"
    ]
