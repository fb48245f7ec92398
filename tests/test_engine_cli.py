"""`make-tiny-model`, `sample` and `mix` from the command line (bad input: test_bad_input.py)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignprop_ray.cli import main
from alignprop_ray.engine.lora import WEIGHT_NAME, attach_lora, save_adapter
from alignprop_ray.engine.models import load_parts
from tests.helpers import lora_settings, perturb

PIPELINES = {
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


def diffusers_pil(model_dir, prompt, seed, steps, guidance, adapter=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapter:
        pipe.load_lora_weights(adapter)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]


def test_make_tiny_model_is_a_diffusers_pipeline_and_deterministic(tmp_path):
    from diffusers import StableDiffusionPipeline

    assert main(["make-tiny-model", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["make-tiny-model", str(tmp_path / "b"), "--seed", "3"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    for part in ("unet", "vae", "text_encoder"):
        a = next((tmp_path / "a" / part).glob("*.safetensors")).read_bytes()
        assert a == next((tmp_path / "b" / part).glob("*.safetensors")).read_bytes()


@pytest.mark.parametrize("with_adapter", [False, True])
def test_sample_png_equals_diffusers_png(tiny_dir, tmp_path, with_adapter):
    args = [
        "sample",
        "--model",
        str(tiny_dir),
        "--prompt",
        "a watercolor fox",
        "--seed",
        "5",
        "--steps",
        "6",
        "--guidance",
        "7.5",
        "--eta",
        "0",
        "--out",
        str(tmp_path / "ours.png"),
    ]
    adapter = None
    if with_adapter:
        parts = load_parts(str(tiny_dir))
        perturb(attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4)))
        adapter = str(save_adapter(parts.denoiser, tmp_path / "adapter"))
        args += ["--adapter", adapter]
    assert main(args) == 0
    ours = np.asarray(Image.open(tmp_path / "ours.png"))
    theirs = np.asarray(diffusers_pil(tiny_dir, "a watercolor fox", 5, 6, 7.5, adapter))
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """`make-tiny-model --family F` for the families beyond SD 1.x/2.x, once per module."""
    dirs = {}
    for family in PIPELINES:
        dirs[family] = tmp_path_factory.mktemp(family) / "pipe"
        assert main(["make-tiny-model", "--family", family, str(dirs[family])]) == 0
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("with_adapter", [False, True])
@pytest.mark.parametrize("family", list(PIPELINES))
def test_sample_png_equals_the_familys_diffusers_png(family_dirs, tmp_path, family, with_adapter):
    from tests.helpers import diffusers_pipeline

    model = family_dirs[family]
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == PIPELINES[family]
    args = ["sample", "--model", str(model), "--prompt", "a watercolor fox", "--seed", "5"]
    args += ["--steps", "4", "--guidance", "6", "--resolution", "32", "--out", str(tmp_path / "ours.png")]
    pipe = diffusers_pipeline(model)
    if with_adapter:
        parts = load_parts(str(model))
        perturb(attach_lora(parts.denoiser, lora_settings(rank=4, alpha=4)), scale=0.1)
        args += ["--adapter", str(save_adapter(parts.denoiser, tmp_path / "adapter"))]
        pipe.load_lora_weights(tmp_path / "adapter")
    assert main(args) == 0
    ours = np.asarray(Image.open(tmp_path / "ours.png"))
    generator = torch.Generator().manual_seed(5)
    theirs = pipe(
        "a watercolor fox", num_inference_steps=4, guidance_scale=6, height=32, width=32, generator=generator
    )
    assert ours.shape == (32, 32, 3)
    assert np.abs(ours.astype(int) - np.asarray(theirs.images[0]).astype(int)).max() == 0


def test_sample_several_images_as_folder_and_grid(tmp_path):
    base = ["sample", "--model", "tiny", "--prompt", "a", "--prompt", "b", "--n", "2", "--steps", "2"]
    assert main(base + ["--out", str(tmp_path / "many")]) == 0
    assert len(list((tmp_path / "many").glob("*.png"))) == 4
    assert main(base + ["--grid", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 64 * 2


def test_mix_cli_writes_an_adapter(tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        parts = load_parts("tiny")
        perturb(attach_lora(parts.denoiser, lora_settings()), seed=seed)
        save_adapter(parts.denoiser, tmp_path / name)
    assert (
        main(
            ["mix", str(tmp_path / "a"), str(tmp_path / "b"), "--alpha", "0.3", "--out", str(tmp_path / "m")]
        )
        == 0
    )
    assert (tmp_path / "m" / WEIGHT_NAME).is_file()
