"""`alignprop-ray register`: a run's adapter in MLflow's Model Registry, served by `mlflow models serve`.

The reference is `alignprop-ray sample`: for the same base model, adapter, prompt, seed, steps and guidance
the served model must answer the very PNG that `sample` writes. The runs are made as training makes them
(params from the experiment config, the adapter under `adapter/`), with an adapter of random weights so
that it visibly changes the image. Every wait on the server is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from alignprop_ray import cli, tracking
from tests.helpers import free_port, lora_settings, serving

pytestmark = pytest.mark.slow

SAMPLING = {"steps": 3, "guidance_scale": 4.0}  # the runs' sampler settings: the model's defaults
SERVE_TIMEOUT_S = 300  # imports torch and diffusers, then builds the model: ~30 s idle, minutes under load


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_dir):
    """A store with training runs on the tiny model, by name (`tiny`) and as a pipeline directory, each with
    the same adapter (also returned as a folder) and sampler settings."""
    from alignprop_ray.config import ExperimentConfig
    from alignprop_ray.engine.lora import attach_lora, save_adapter
    from alignprop_ray.engine.models import load_parts

    tmp = tmp_path_factory.mktemp("registry")
    parts = load_parts("tiny")
    generator = torch.Generator().manual_seed(1)
    for param in attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4)):
        param.data = 0.3 * torch.randn(param.shape, generator=generator)  # B starts at 0: no change at all
    adapter = save_adapter(parts.denoiser, tmp / "adapter")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    runs = {}
    for name, base in (("by-name", "tiny"), ("by-dir", str(tiny_dir))):
        cfg = ExperimentConfig(
            model={"pretrained": base, "resolution": 64}, sampling=SAMPLING, reward={"saturation": 1.0}
        )
        runs[name], _ = tracking.start_run(uri, "registry", name, cfg.flat_params(), cfg.to_yaml())
        tracking.client(uri).log_artifacts(runs[name], str(adapter), "adapter")
        tracking.end_run(uri, runs[name])
    return uri, runs, Path(adapter), tmp


def sample_pngs(
    model: str, adapter: Path | None, prompts: list[str], seed: int, steps: int, guidance: float, out: Path
):
    """The bytes of the PNGs that `alignprop-ray sample` writes, one per prompt (prompt i: seed + i)."""
    args = [
        "sample",
        "--model",
        model,
        "--seed",
        str(seed),
        "--steps",
        str(steps),
        "--guidance",
        str(guidance),
    ]
    args += [arg for prompt in prompts for arg in ("--prompt", prompt)]
    args += ["--resolution", "64", "--device", "cpu", "--out", str(out)]
    assert cli.main(args + (["--adapter", str(adapter)] if adapter else [])) == 0
    return (
        [out.read_bytes()] if len(prompts) == 1 else [path.read_bytes() for path in sorted(out.glob("*.png"))]
    )


def register(uri: str, run_id: str, name: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["register", "--run", run_id, "--name", name, "--tracking-uri", uri])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextlib.contextmanager
def served(uri: str, model: str, log: Path):
    """`mlflow models serve` of `model` on a free loopback port, as the registration prints it; its URL."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # it execs `uvicorn`
    }
    command = ["mlflow", "models", "serve", "-m", model, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with serving(command, f"{url}/ping", log, SERVE_TIMEOUT_S, env):
        yield url


def invoke(url: str, prompts: list[str], params: dict | None = None) -> tuple[int, dict]:
    body = {"dataframe_records": [{"prompt": prompt} for prompt in prompts], "params": params or {}}
    request = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def images(answer) -> list[bytes]:
    return [base64.b64decode(item["image"]) for item in answer["predictions"]]


def test_served_model_answers_the_pngs_that_sample_writes(store, tiny_dir, capsys):
    uri, runs, adapter, tmp = store
    code, out, _ = register(uri, runs["by-dir"], "cats-dir", capsys)
    assert code == 0, out
    assert out.startswith(f"registered models:/cats-dir/1: the adapter of run {runs['by-dir']} (by-dir)")
    assert "mlflow models serve -m models:/cats-dir/1 --env-manager local" in out
    prompts, params = ["a cat", "a dog"], {"seed": 3, "steps": 2, "guidance": 6.0}
    with served(uri, "models:/cats-dir/1", tmp / "serve.log") as url:
        given = invoke(url, prompts, params)
        defaults = invoke(url, ["a dog"])  # seed 0 and the run's sampler settings
        bad = invoke(url, ["a cat"], {"steps": 0})
    assert given[0] == 200 and defaults[0] == 200, (given, defaults)
    model = str(tiny_dir)
    expected = sample_pngs(model, adapter, prompts, 3, 2, 6.0, tmp / "given")
    assert expected[0].startswith(b"\x89PNG") and images(given[1]) == expected
    steps, guidance = SAMPLING["steps"], SAMPLING["guidance_scale"]
    assert images(defaults[1]) == sample_pngs(model, adapter, ["a dog"], 0, steps, guidance, tmp / "dog.png")
    # the adapter is in the served model, not just the base
    assert sample_pngs(model, None, prompts, 3, 2, 6.0, tmp / "base") != expected
    assert bad[0] == 400 and "steps must be >= 1, got 0" in bad[1]["message"]


def test_tiny_by_name_from_a_sweeps_parent_run(store, capsys):
    """A sweep's parent run stands for its best trial; the model is loaded in-process (mlflow.pyfunc)."""
    import mlflow
    import pandas as pd

    from alignprop_ray.sweep.tracking import BEST_RUN_TAG
    from alignprop_ray.tracking import KIND_TAG

    uri, runs, adapter, tmp = store
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(uri, "registry")
    tags = {KIND_TAG: "sweep", BEST_RUN_TAG: runs["by-name"]}
    parent = client.create_run(experiment, run_name="sweep", tags=tags)
    code, out, _ = register(uri, parent.info.run_id, "cats", capsys)
    assert code == 0, out
    version = client.get_model_version("cats", "1")
    assert version.run_id == runs["by-name"]
    mlflow.set_tracking_uri(uri)  # `register` sets MLflow's global URI for its own calls only
    info = mlflow.models.get_model_info(f"models:/cats/{version.version}")
    assert info.metadata == {
        "base_model": "tiny",
        "family": "auto",
        "dtype": "float32",
        "resolution": 64,
        "steps": SAMPLING["steps"],
        "guidance": SAMPLING["guidance_scale"],
        "eta": 0.0,
        "negative_prompt": "",
        "seed": 0,
        "source_run_id": runs["by-name"],
    }
    model = mlflow.pyfunc.load_model(f"models:/cats/{version.version}")
    answer = model.predict(pd.DataFrame({"prompt": ["a red car"]}), params={"seed": 5})
    steps, guidance = SAMPLING["steps"], SAMPLING["guidance_scale"]
    expected = sample_pngs("tiny", adapter, ["a red car"], 5, steps, guidance, tmp / "car.png")
    assert [base64.b64decode(image) for image in answer["image"]] == expected


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown run", "no run 'nope' in sqlite:///"),
        ("no adapter", "has no adapter/pytorch_lora_weights.safetensors artifact: did it finish training?"),
        ("not ours", "has no model.pretrained param: not a training run of alignprop-ray"),
        ("bad name", "model name 'a/b': give a non-empty name without '/' or ':'"),
        ("sweep without best", "is sweep 'unfinished', which has no best trial (yet)"),
    ],
)
def test_register_refuses_in_one_line_and_writes_nothing(store, capsys, case, expected):
    from alignprop_ray.config import ExperimentConfig
    from alignprop_ray.tracking import KIND_TAG

    uri, runs, *_ = store
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(uri, "registry")
    name, run_id = "refused", runs["by-name"]
    if case == "unknown run":
        run_id = "nope"
    elif case == "no adapter":
        cfg = ExperimentConfig(model={"pretrained": "tiny"}, reward={"saturation": 1.0})
        run_id, _ = tracking.start_run(uri, "registry", "no-adapter", cfg.flat_params(), cfg.to_yaml())
    elif case == "not ours":
        run_id = client.create_run(experiment, run_name="other").info.run_id
        client.log_artifacts(run_id, str(store[2]), "adapter")
    elif case == "bad name":
        name = "a/b"
    else:
        run_id = client.create_run(experiment, run_name="unfinished", tags={KIND_TAG: "sweep"}).info.run_id
    versions = len(client.search_model_versions())
    code, out, err = register(uri, run_id, name, capsys)
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignprop-ray register: error: "), lines
    assert expected in lines[0]
    assert len(client.search_model_versions()) == versions
    assert not client.search_registered_models("name = 'refused'")
