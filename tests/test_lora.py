"""Adapters: diffusers format on disk, resume loading, and exact interpolation with `mix`."""

import pytest
import torch
from safetensors.torch import load_file

from alignprop_ray.engine.lora import (
    WEIGHT_NAME,
    attach_lora,
    load_adapter,
    load_adapter_like_diffusers,
    mix_adapters,
    read_adapter,
    save_adapter,
)
from alignprop_ray.engine.models import load_parts
from alignprop_ray.engine.sampler import generate
from alignprop_ray.errors import UserError
from tests.helpers import lora_settings, perturb, sampler_settings

SETTINGS = sampler_settings(steps=5)


def trained_adapter(path, rank, alpha, seed, targets=("to_q", "to_k", "to_v", "to_out.0")):
    parts = load_parts("tiny")
    perturb(
        attach_lora(parts.denoiser, lora_settings(rank=rank, alpha=alpha, target_modules=targets)), seed=seed
    )
    save_adapter(parts.denoiser, path)
    return parts


def sample_with(adapter):
    parts = load_parts("tiny")
    load_adapter_like_diffusers(parts.denoiser, adapter)
    return generate(parts, ["a cat"], [7], SETTINGS)


def delta_weights(adapter):
    """{module: s * B @ A}: the weight update an adapter applies (s = alpha / r)."""
    adapter = read_adapter(adapter)
    state, config = adapter.state, adapter.config
    scale = float(config["lora_alpha"]) / config["r"]
    names = {k.rsplit(".lora_", 1)[0] for k in state}
    return {n: scale * state[f"{n}.lora_B.weight"] @ state[f"{n}.lora_A.weight"] for n in names}


def test_saved_file_is_the_diffusers_format(tmp_path):
    trained_adapter(tmp_path / "a", rank=4, alpha=8, seed=0)
    state = load_file(tmp_path / "a" / WEIGHT_NAME)
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    adapter = read_adapter(tmp_path / "a")
    assert (adapter.config["r"], adapter.config["lora_alpha"]) == (4, 8)
    assert (adapter.prefix, adapter.family) == ("unet", "sd")
    assert not list(tmp_path.joinpath("a").glob(".tmp-*"))  # nothing half-written left behind


@pytest.mark.slow
def test_resume_loading_restores_identical_images(tmp_path):
    original = trained_adapter(tmp_path / "a", rank=4, alpha=8, seed=0)
    expected = generate(original, ["a cat"], [7], SETTINGS)
    parts = load_parts("tiny")
    attach_lora(parts.denoiser, lora_settings(rank=4, alpha=8))
    load_adapter(parts.denoiser, tmp_path / "a")
    assert torch.equal(generate(parts, ["a cat"], [7], SETTINGS), expected)
    assert torch.allclose(sample_with(tmp_path / "a"), expected, atol=1e-5)


def test_resume_refuses_a_different_rank(tmp_path):
    trained_adapter(tmp_path / "a", rank=4, alpha=8, seed=0)
    parts = load_parts("tiny")
    attach_lora(parts.denoiser, lora_settings(rank=8, alpha=8))
    with pytest.raises(UserError, match="rank/alpha"):
        load_adapter(parts.denoiser, tmp_path / "a")


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_mix_endpoints_reproduce_each_adapter(tmp_path, alpha):
    trained_adapter(tmp_path / "a", rank=4, alpha=8, seed=0)
    trained_adapter(tmp_path / "b", rank=2, alpha=2, seed=1)
    mix_adapters(tmp_path / "a", tmp_path / "b", alpha, tmp_path / "mix")
    expected = sample_with(tmp_path / ("a" if alpha == 1.0 else "b"))
    assert (sample_with(tmp_path / "mix") - expected).abs().max() <= 1e-5


def test_mix_interpolates_the_weight_update_exactly(tmp_path):
    trained_adapter(tmp_path / "a", rank=4, alpha=8, seed=0)
    trained_adapter(tmp_path / "b", rank=2, alpha=1, seed=1, targets=("to_q", "to_v"))  # fewer modules
    mix_adapters(tmp_path / "a", tmp_path / "b", 0.3, tmp_path / "mix")
    da, db, dm = (delta_weights(tmp_path / n) for n in ("a", "b", "mix"))
    assert dm.keys() == da.keys() | db.keys()
    for name, mixed in dm.items():
        expected = 0.3 * da.get(name, 0) + 0.7 * db.get(name, 0)
        assert torch.allclose(mixed, expected, atol=1e-6)
    assert read_adapter(tmp_path / "mix").config["r"] == 6


def test_factor_averaging_is_not_the_update_interpolation(tmp_path):
    trained_adapter(tmp_path / "a", rank=4, alpha=4, seed=0)
    trained_adapter(tmp_path / "b", rank=4, alpha=4, seed=1)
    mix_adapters(tmp_path / "a", tmp_path / "b", 0.5, tmp_path / "f", method="factors")
    da, db, df = (delta_weights(tmp_path / n) for n in ("a", "b", "f"))
    name = next(iter(df))
    assert not torch.allclose(df[name], 0.5 * da[name] + 0.5 * db[name], atol=1e-4)


def test_corrupt_or_missing_adapters_are_one_line_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / WEIGHT_NAME).write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(UserError, match="not a readable safetensors file") as err:
        read_adapter(tmp_path / "bad")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no pytorch_lora_weights.safetensors"):
        read_adapter(tmp_path / "missing")
    with pytest.raises(UserError, match="--alpha"):
        mix_adapters(tmp_path / "bad", tmp_path / "bad", 1.5, tmp_path / "out")
