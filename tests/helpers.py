"""Helpers shared by several test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import multiprocessing
import os
import signal
import socket
import subprocess
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serving(command: list[str], ready_url: str, log: Path, timeout: float, env=None) -> Iterator[None]:
    """Run a server `command` (in a process group of its own, output to `log`) for the block, once
    `ready_url` answers; a server that exits or stays silent for `timeout` s fails the test with its log.
    The whole group is stopped at the end (SIGTERM, then SIGKILL after 30 s)."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while not answers(ready_url):
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _rank_main(target: Callable, rank: int, port: int, args: tuple, results) -> None:
    try:
        results.put((rank, None, target(rank, port, *args)))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))


def run_ranks(target: Callable, world_size: int, *args, timeout: float = 240.0) -> list:
    """Run `target(rank, port, *args)` in `world_size` spawned processes; their return values by rank.

    `port` is a free loopback port for `init_process_group(init_method=f"tcp://127.0.0.1:{port}")`.
    A rank that raises fails the caller with its traceback; no wait is longer than `timeout`.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(target, rank, port, args, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = sorted((results.get(timeout=timeout) for _ in processes), key=lambda o: o[0])
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [error for _, error, _ in outcomes if error]
    if errors:
        raise AssertionError(f"a rank failed:\n{errors[0]}")
    return [value for _, _, value in outcomes]


# --- the engine on the tiny model --------------------------------------------------------------------

TRAIN_PROMPTS = ["a cat", "a dog", "a red car"]


def engine_defaults():
    """(LoraSettings, SamplerSettings, OptimSettings) of an experiment that sets nothing: the schema's
    defaults, mapped as training maps them. Tests change fields with `dataclasses.replace`."""
    from alignprop_ray.config import ExperimentConfig
    from alignprop_ray.train.build import engine_settings

    return engine_settings(ExperimentConfig(reward={"saturation": 1.0}))


def lora_settings(**changes):
    return dataclasses.replace(engine_defaults()[0], **changes)


def sampler_settings(**changes):
    return dataclasses.replace(engine_defaults()[1], **changes)


def optim_settings(**changes):
    return dataclasses.replace(engine_defaults()[2], **changes)


def perturb(params, scale: float = 0.05, seed: int = 0) -> None:
    """Give a freshly attached adapter (B = 0) a non-zero update, so it changes the images and gradients
    reach both LoRA factors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def diffusers_pipeline(directory):
    """The diffusers pipeline of a tiny pipeline directory (its model_index.json's class), sampling with the
    scheduler our loader picks: the directory's if its family samples with it, else the family's first."""
    import json

    import diffusers

    from alignprop_ray.engine.families.registry import family_of_index, family_row

    index = json.loads((Path(directory) / "model_index.json").read_text())
    cls = index["_class_name"]
    extra = {"add_watermarker": False} if cls == "StableDiffusionXLPipeline" else {}
    if index.get("text_encoder_3") == [None, None]:  # diffusers reloads its own T5-less save only so
        extra.update(text_encoder_3=None, tokenizer_3=None)
    pipe = getattr(diffusers, cls).from_pretrained(directory, **extra)
    schedulers = family_row(family_of_index(index, str(directory))).schedulers
    if type(pipe.scheduler).__name__ not in schedulers:
        pipe.scheduler = getattr(diffusers, schedulers[0]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_change(directory, adapter, steps: int = 4, resolution: int = 32) -> float:
    """How far an adapter moves the image plain diffusers draws (the pipeline at `directory` with and
    without `pipe.load_lora_weights(adapter)`, same prompt and seed): the largest pixel difference, in [0, 1].
    An adapter that was never trained (LoRA B = 0) gives 0."""

    def draw(pipe):
        return pipe(
            ["a red car"],
            num_inference_steps=steps,
            height=resolution,
            width=resolution,
            generator=[torch.Generator().manual_seed(0)],
            output_type="pt",
        ).images

    pipe = diffusers_pipeline(directory)
    base = draw(pipe)
    pipe.load_lora_weights(adapter)
    return float((draw(pipe) - base).abs().max())


class BrightnessReward:
    """Mean pixel value: the simplest differentiable reward (engine tests must not depend on the library)."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]):
        from alignprop_ray.rewards.base import RewardOutput

        value = images.mean(dim=(1, 2, 3))
        return RewardOutput(value, {"brightness": value})

    def image_features(self, images: torch.Tensor) -> None:
        return None


brightness_reward = BrightnessReward()


def tiny_learner(reward, lr: float = 1e-2, dtype: torch.dtype = torch.float32, **optim):
    """A learner on the tiny pipeline: LoRA rank 4, 32 px, 6 DDIM steps with CFG 5."""
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.step import Learner

    parts = load_parts("tiny", dtype=dtype)
    params = attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4))
    sampler = sampler_settings(steps=6, guidance_scale=5.0)
    return Learner(parts, params, reward, sampler, optim_settings(lr=lr, **optim), resolution=32)


def train_steps(learner, steps: int, truncation: str = "uniform:1:6", grad_accum: int = 1) -> list:
    """`steps` optimizer steps on TRAIN_PROMPTS (batch 2, seed 0); their StepResults."""
    from alignprop_ray.engine.step import plan_step
    from alignprop_ray.engine.truncation import parse_truncation

    results = []
    for step in range(steps):
        batches, ks = plan_step(
            TRAIN_PROMPTS,
            parse_truncation(truncation),
            learner.sampler.steps,
            step=step,
            seed=0,
            batch_size=2,
            grad_accum=grad_accum,
        )
        results.append(learner.train_step(batches, ks))
    return results


# --- runs and sweeps on the tiny model ------------------------------------------------------------------


def tiny_run(tmp: str | Path, *extra: str) -> list[str]:
    """`--set` items that log a run (or a sweep's trials) under `tmp`: its MLflow store and Ray storage."""
    return [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"storage.path={tmp}/runs", *extra]


# The base of a small sweep on the tiny model: one CPU worker per trial, a second or two per step.
TINY_SWEEP_BASE = {
    "model": {"pretrained": "tiny", "resolution": 32},  # 16 x 16 latents: a third of 64 px's step
    "sampling": {"steps": 4},
    "truncation": "full",
    "reward": {"saturation": 1.0},
    "prompts": {"train": "tiny", "eval": "tiny", "eval_seeds": 2},
    "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2},
    "scaling": {"num_workers": 1, "use_gpu": False},
}


def tiny_sweep(space: dict, *, base: dict | None = None, **sections) -> dict:
    """A grid sweep over `space` from TINY_SWEEP_BASE: each section of `base` is merged into the base's
    (`reward`, a mapping of terms, is replaced; a key set to None is removed); `sections` (name, tune, stop)
    are the sweep's own."""
    merged = copy.deepcopy(TINY_SWEEP_BASE)
    for key, value in (base or {}).items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "reward":
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return {"base": merged, "space": space, "tune": {"algorithm": "grid"}, **sections}


def assert_resumes_exactly(cfg, tmp: Path, before: int = 1) -> None:
    """A learner of experiment `cfg` takes `before` steps, writes a checkpoint and takes one more; a fresh
    learner (as a restarted worker builds it) restores the checkpoint and takes that step too: the same
    adapter bit for bit, the same method state and the same EMA of the weights (train.ema_decay). (A DDPO round's samples are not in the checkpoint:
    `before` is then its length, so the checkpoint falls between rounds.)"""
    from alignprop_ray.train.build import build_learner, plan_training_step
    from alignprop_ray.train.checkpoint import Progress, read_checkpoint, write_checkpoint

    def step(learner, index: int) -> None:
        learner.train_step(*plan_training_step(cfg, TRAIN_PROMPTS, index))

    straight = build_learner(cfg, torch.device("cpu"), TRAIN_PROMPTS)
    for index in range(before):
        step(straight, index)
    directory = write_checkpoint(straight, Progress(step=before, run_id="r"), tmp)
    step(straight, before)
    resumed = build_learner(cfg, torch.device("cpu"), TRAIN_PROMPTS)
    assert read_checkpoint(directory).restore(resumed).step == before
    step(resumed, before)
    assert all(torch.equal(a, b) for a, b in zip(straight.params, resumed.params, strict=True))
    assert resumed.state_dict()["method"] == straight.state_dict()["method"]
    assert (resumed.ema is None) == (straight.ema is None)
    if straight.ema is not None:
        assert resumed.ema.updates == straight.ema.updates
        assert all(torch.equal(a, b) for a, b in zip(straight.ema.weights, resumed.ema.weights, strict=True))


def most_at_once(windows) -> int:
    """The most windows that overlap at one moment."""
    windows = list(windows)
    edges = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows])
    running = most = 0
    for _, change in edges:  # at equal times an end (-1) sorts first: touching windows do not overlap
        running += change
        most = max(most, running)
    return most


_TINY_SD3: list[Path] = []


def load_shipped_sweep(path: Path):
    """The sweep a shipped sweep file runs; for a comparison file (`alignprop-ray compare`), its first method's
    selection round (every round asks for the same resources). A comparison on a toy model that is not
    committed yet (models/toy-shapes-sd3) is read with a tiny model of its family in that model's place."""
    from alignprop_ray.config import read_yaml
    from alignprop_ray.sweep.config import load_sweep
    from alignprop_ray.sweep.protocol import is_comparison, load_comparison

    data = read_yaml(path)
    if not is_comparison(data):
        return load_sweep(path, env={})
    base = data.get("base")
    model = (base.get("model") or {}) if isinstance(base, dict) else {}
    overrides = []
    if (
        str(model.get("pretrained", "")).endswith("toy-shapes-sd3")
        and not (path.parent / model["pretrained"]).is_dir()
    ):
        if not _TINY_SD3:
            import tempfile

            from alignprop_ray.engine.models import save_tiny_model

            _TINY_SD3.append(save_tiny_model(Path(tempfile.mkdtemp()) / "sd3", family="sd3"))
        overrides = [f"base.model.pretrained={_TINY_SD3[0]}"]
    return load_comparison(path, overrides, env={}).selection_sweep(0)


GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@functools.cache
def gpu_check_script():
    """bench/gpu_check.py (`make gpu-check`) as a module: its shipped levers and run shapes."""
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
