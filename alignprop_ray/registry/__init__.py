"""`alignprop-ray register`: a trained adapter in MLflow's Model Registry, as a model that draws images.

    training run (or a sweep's parent run: its best trial) -> its adapter/ artifact + the base model and
      sampler settings it trained with -> pyfunc model (model.py's ImageModel, the adapter, this package's
      code) logged as a LoggedModel of the run -> a new version of registered model NAME

Served with `mlflow models serve -m models:/NAME/VERSION --env-manager local`, it answers rows of `prompt`
(params: optional `seed`, `steps`, `guidance`) with one base64 PNG each (model.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import tempfile
import warnings
from importlib import metadata as dist_metadata
from pathlib import Path

from alignprop_ray.errors import UserError
from alignprop_ray.registry.model import ADAPTER, ImageModelSettings

MODEL_NAME_FORBIDDEN = ("/", ":")  # MLflow's rule for registered model names
# What loading and sampling import, pinned to the versions installed when the model is registered: what
# another environment needs (`--env-manager virtualenv`). The package itself travels with the model.
SERVING_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "safetensors",
    "huggingface_hub",
    "accelerate",
    "pillow",
    "numpy",
    "pandas",
    "mlflow",
)
SERVING_PORT = 5001  # in the printed command: `mlflow ui` takes 5000


def check_model_name(name: str) -> str:
    if not name.strip() or any(c in name for c in MODEL_NAME_FORBIDDEN):
        raise UserError(f"model name {name!r}: give a non-empty name without '/' or ':'")
    return name


def cmd_register(args: argparse.Namespace) -> int:
    register(args.tracking_uri, args.run, check_model_name(args.name))
    return 0


def register(tracking_uri: str | None, run_id: str, name: str, say=print):
    """Register the adapter of training run `run_id` (a sweep's parent run: its best trial) as a new version
    of model `name`; the ModelVersion. UserError, before anything is written, if the run has no adapter."""
    from alignprop_ray.report.data import open_store, resolve_uri

    check_model_name(name)
    uri = resolve_uri(tracking_uri)
    client = open_store(uri)
    run = _training_run(client, uri, run_id)
    settings = ImageModelSettings.from_run_params(run.data.params, run.info.run_id)
    with tempfile.TemporaryDirectory() as tmp, _quiet_mlflow():
        adapter = _download_adapter(client, run.info.run_id, tmp)
        version = _log_and_register(uri, run, adapter, settings, name)
    source = f"run {run.info.run_id} ({run.info.run_name})"
    client.update_model_version(
        name, version.version, description=f"LoRA adapter of {source} on {settings.base_model}"
    )
    say(f"registered models:/{name}/{version.version}: the adapter of {source}, base {settings.base_model}")
    for line in serving_hint(uri, name, version.version):
        say(line)
    return version


def _training_run(client, uri: str, run_id: str):
    """The run with the adapter: `run_id`, or the best trial of the sweep whose parent run it is."""
    from mlflow.exceptions import MlflowException

    from alignprop_ray.tracking import KIND_TAG

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id!r} in {uri}") from None
    if run.data.tags.get(KIND_TAG) != "sweep":
        return run
    from alignprop_ray.tracking import BEST_RUN_TAG

    best = run.data.tags.get(BEST_RUN_TAG)
    if not best:
        raise UserError(f"run {run_id} is sweep {run.info.run_name!r}, which has no best trial (yet)")
    return client.get_run(best)


def _download_adapter(client, run_id: str, into: str) -> Path:
    from alignprop_ray.engine.lora import WEIGHT_NAME

    names = {Path(item.path).name for item in client.list_artifacts(run_id, ADAPTER)}
    if WEIGHT_NAME not in names:
        raise UserError(f"run {run_id} has no {ADAPTER}/{WEIGHT_NAME} artifact: did it finish training?")
    return Path(client.download_artifacts(run_id, ADAPTER, into))


def _log_and_register(uri: str, run, adapter: Path, settings: ImageModelSettings, name: str):
    """The pyfunc model, logged as a LoggedModel of the run (the run is not reopened: its status and times
    stay those of its training), then registered as a new version of `name`."""
    with _global_tracking_uri(uri):
        return _log_model(uri, run, adapter, settings, name)


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's fluent API (log_model, registration) reads its global URI: set it for the block only.
    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which a later command of this process
    (or its subprocesses) would take for the user's choice."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None unsets both MLflow's global and the variable


def _log_model(uri: str, run, adapter: Path, settings: ImageModelSettings, name: str):
    import mlflow

    import alignprop_ray
    from alignprop_ray.registry import served
    from alignprop_ray.registry.model import signature

    logged = mlflow.initialize_logged_model(
        name="image_model", source_run_id=run.info.run_id, experiment_id=run.info.experiment_id
    )
    info = mlflow.pyfunc.log_model(
        name="image_model",
        python_model=served.__file__,  # models-from-code: no pickle
        artifacts={ADAPTER: str(adapter)},
        code_paths=[str(Path(alignprop_ray.__file__).parent)],
        signature=signature(settings),
        metadata={**settings.as_dict(), "source_run_id": run.info.run_id},
        model_config=settings.as_dict(),
        pip_requirements=_pinned(SERVING_PACKAGES),
        model_id=logged.model_id,
        registered_model_name=name,
    )
    return mlflow.MlflowClient(uri).get_model_version(name, str(info.registered_model_version))


@contextlib.contextmanager
def _quiet_mlflow():
    """Without MLflow's download bars and its advice for models without an input example or type hints:
    this one has an explicit signature, and an input example would make MLflow draw an image while logging."""
    from alignprop_ray.report.data import env_defaults

    with env_defaults(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(input example|type hints)", category=UserWarning)
        yield


def _pinned(packages: tuple[str, ...]) -> list[str]:
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={dist_metadata.version(package)}")
        except dist_metadata.PackageNotFoundError:
            continue  # optional at run time (accelerate): the environment that serves may add it
    return pins


def serving_hint(uri: str, name: str, version: str) -> list[str]:
    request = json.dumps({"dataframe_records": [{"prompt": "a photo of a cat"}], "params": {"seed": 0}})
    port = SERVING_PORT
    return [
        f"  serve it:  MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow models serve -m models:/{name}/{version} "
        f"--env-manager local --host 127.0.0.1 --port {port}",
        f"  ask it:    curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' "
        f'-d {shlex.quote(request)}  # -> {{"predictions": [{{"image": BASE64_PNG}}]}}',
    ]


__all__ = ["check_model_name", "cmd_register", "register"]
