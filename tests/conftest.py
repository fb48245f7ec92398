"""Shared fixtures. Everything runs offline on the tiny model; one Ray instance serves the whole session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny preset written as a diffusers pipeline directory (once per session)."""
    from alignprop_ray.engine.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box two OpenMP threads
    competing with other processes' tests stall at barriers (measured: one 8-step run took 2 s with one
    thread and 9 to 74 s with two). A module opts in with `pytestmark = pytest.mark.usefixtures(...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_parts():
    from alignprop_ray.engine.models import load_parts

    return load_parts("tiny")


TRAIN_PROMPTS = ["a cat", "a dog", "a red car"]


def tiny_learner(reward, lr: float = 1e-2, dtype: torch.dtype = torch.float32):
    """A learner on the tiny pipeline: LoRA rank 4, 32 px, 6 DDIM steps with CFG 5."""
    from alignprop_ray.engine.lora import LoraSettings, attach_lora
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.sampler import SamplerSettings
    from alignprop_ray.engine.step import AlignPropLearner, OptimSettings

    parts = load_parts("tiny", dtype=dtype)
    params = attach_lora(parts.unet, LoraSettings(rank=4, alpha=4))
    sampler = SamplerSettings(steps=6, guidance_scale=5.0)
    return AlignPropLearner(parts, params, reward, sampler, OptimSettings(lr=lr), resolution=32)


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


def brightness_reward(images, prompts):
    """Mean pixel value: the simplest differentiable reward (engine tests must not depend on the library)."""
    value = images.mean(dim=(1, 2, 3))
    return types.SimpleNamespace(total=value, terms={"brightness": value})


def pytest_collection_modifyitems(config, items):
    """Tests that start their own Ray instances run first, while no shared instance is up: a command
    looking for a cluster to join must not find the session's (and 2 cores cannot host both)."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is None)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (starting Ray costs 10-20 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
