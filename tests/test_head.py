"""What each running trial keeps on the head node: its driver and its Ray Train controller load no model
code (torch, diffusers, transformers, peft, open_clip, the engine's torch modules); only the workers do.

Checked in fresh interpreters without Ray running: the driver's path up to the trainer it hands Ray, and
what the controller unpickles (the run's callbacks, its backend, the workers' entry point). The memory
this saves is measured, not asserted: bench/head_memory.py, docs/clusters.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_PACKAGES = ("torch", "diffusers", "transformers", "peft", "open_clip")

# The engine modules that validating a config imports (name tables, torch-free): the driver must load
# the config, so these are allowed; any other engine module is model code.
CONFIG_ENGINE = """
import json, sys
import alignprop_ray.config, alignprop_ray.sweep.config
print(json.dumps(sorted(m for m in sys.modules if m.startswith("alignprop_ray.engine"))))
"""

DRIVER = """
import json, sys
from alignprop_ray.sweep.config import load_sweep
import alignprop_ray.sweep.trial
from alignprop_ray.train import launch
sweep = load_sweep(sys.argv[1], ["tracking.uri=sqlite:///" + sys.argv[2] + "/m.db", "storage.path=" + sys.argv[2]])
trainer = launch.build_trainer(sweep.experiment({}), "run", {"run_id": "r"}, [])
print(json.dumps(sorted(sys.modules)))
"""

PICKLE_CONTROLLER_INPUTS = """
import sys, cloudpickle
from alignprop_ray.config import load_experiment
from alignprop_ray.sweep.trial import EvalReportCallback
from alignprop_ray.train import launch
cfg = load_experiment(sys.argv[1], ["tracking.uri=sqlite:///" + sys.argv[2] + "/m.db", "storage.path=" + sys.argv[2]])
trainer = launch.build_trainer(cfg, "run", {"run_id": "r"}, [])
callback = EvalReportCallback.__new__(EvalReportCallback)  # made in a Tune session only
sys.stdout.buffer.write(cloudpickle.dumps(
    [trainer.run_config.callbacks, callback, trainer.backend_config, launch.worker_main]
))
"""

UNPICKLE = """
import json, pickle, sys
pickle.loads(sys.stdin.buffer.read())
print(json.dumps(sorted(sys.modules)))
"""


def python(code: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], input=stdin, capture_output=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done


def model_code(modules: list[str], allowed: set[str]) -> list[str]:
    return [
        m
        for m in modules
        if m.split(".")[0] in MODEL_PACKAGES or (m.startswith("alignprop_ray.engine") and m not in allowed)
    ]


@pytest.mark.slow  # four interpreters that import Ray and torch: about 30 s on a quiet 2-core machine
def test_a_trials_driver_and_its_controller_load_no_model_code(tmp_path):
    allowed = set(json.loads(python(CONFIG_ENGINE).stdout))
    driver = json.loads(python(DRIVER, str(ROOT / "sweeps" / "smoke.yaml"), str(tmp_path)).stdout)
    assert "alignprop_ray.train.launch" in driver and "alignprop_ray.train.backend" in driver
    assert not model_code(driver, allowed), model_code(driver, allowed)
    sent = python(PICKLE_CONTROLLER_INPUTS, str(ROOT / "sweeps" / "tiny.yaml"), str(tmp_path)).stdout
    controller = json.loads(python(UNPICKLE, stdin=sent).stdout)
    assert "alignprop_ray.train.placement" in controller and "alignprop_ray.sweep.trial" in controller
    assert "alignprop_ray.train.backend" in controller
    assert not model_code(controller, allowed), model_code(controller, allowed)
