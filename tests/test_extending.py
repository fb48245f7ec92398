"""docs/extending.md's claim: a new method is one module and one registry row. Its no-op method is built in
memory from the diff printed there (tests/noop_method.py); tests/test_methods.py runs the parametrized
tests of every method row on it, and its 2-worker Ray run is in the sweep there."""

import dataclasses
from pathlib import Path

import pytest

from alignprop_ray.config import load_experiment
from alignprop_ray.engine.methods import get_method, method_rows
from alignprop_ray.errors import ConfigError
from tests import noop_method

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = "alignprop_ray/engine/methods/registry.py"
# The no-op row limited to one family, as Flow-GRPO's row will be (flow-matching models only).
SD3_ONLY = dataclasses.replace(noop_method.ROW, families=("sd3",), limited_because="a test of the flag")


def test_the_docs_diff_is_one_new_module_and_one_row_against_this_tree():
    assert set(noop_method.FILES) == {"alignprop_ray/engine/methods/noop.py", REGISTRY}
    assert not (ROOT / "alignprop_ray" / "engine" / "methods" / "noop.py").exists()  # new
    registry = noop_method.FILES[REGISTRY]
    assert not any(line.startswith("-") for line in registry)  # the row is only added
    kept = noop_method.context(registry)  # the lines around it are the registry's, as they are now
    lines = (ROOT / REGISTRY).read_text().splitlines()
    assert any(lines[i : i + len(kept)] == kept for i in range(len(lines))), kept
    assert noop_method.ROW.name == "noop" and "noop" not in [row.name for row in method_rows()]


def test_the_noop_row_is_a_method_validate_accepts_and_checks():
    name = noop_method.NAME
    sets = [f"method={{name: '{name}'}}", "truncation=null", "reward={jpeg_compressibility: 1.0}"]
    cfg = load_experiment(ROOT / "sweeps" / "tiny.yaml", sets)  # scores only: a non-differentiable reward
    assert cfg.method.name == name and get_method(name).label == "No-op"
    with pytest.raises(ConfigError) as err:
        load_experiment(
            ROOT / "sweeps" / "tiny.yaml", [f"method={{name: '{name}', k: 2}}", "truncation=null"]
        )
    assert err.value.problems == [
        f"method.k: not a setting of method {name} (a setting of draft); {name}'s settings: none"
    ]
    with pytest.raises(ConfigError) as err:
        load_experiment(ROOT / "sweeps" / "tiny.yaml", [f"method={{name: '{name}'}}", "truncation=fixed:2"])
    assert err.value.problems == [
        "truncation: only used with method alignprop; noop backpropagates through no step"
    ]


def test_a_rows_families_flag_refuses_the_others_in_one_line():
    name = f"{__name__}:SD3_ONLY"
    sets = [f"method={{name: '{name}'}}", "truncation=null"]
    with pytest.raises(ConfigError) as err:
        load_experiment(ROOT / "sweeps" / "tiny.yaml", sets)  # the tiny model: sd
    assert err.value.problems == [f"method: {name} trains sd3 models (a test of the flag); this model is sd"]
    assert load_experiment(ROOT / "sweeps" / "tiny.yaml", [*sets, "model.family=sd3"]).method.name == name
