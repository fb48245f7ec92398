"""`make-tiny-model`, `sample` and `mix` from the command line, including bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from alignprop_ray.cli import main
from alignprop_ray.engine.lora import WEIGHT_NAME, LoraSettings, attach_lora, save_adapter
from alignprop_ray.engine.models import load_parts
from tests.test_sampler import perturb


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
        perturb(attach_lora(parts.unet, LoraSettings(rank=4, alpha=4)))
        adapter = str(save_adapter(parts.unet, tmp_path / "adapter"))
        args += ["--adapter", adapter]
    assert main(args) == 0
    ours = np.asarray(Image.open(tmp_path / "ours.png"))
    theirs = np.asarray(diffusers_pil(tiny_dir, "a watercolor fox", 5, 6, 7.5, adapter))
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0


def test_sample_several_images_as_folder_and_grid(tmp_path):
    base = ["sample", "--model", "tiny", "--prompt", "a", "--prompt", "b", "--n", "2", "--steps", "2"]
    assert main(base + ["--out", str(tmp_path / "many")]) == 0
    assert len(list((tmp_path / "many").glob("*.png"))) == 4
    assert main(base + ["--grid", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 64 * 2


def test_mix_cli_writes_an_adapter(tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        parts = load_parts("tiny")
        perturb(attach_lora(parts.unet, LoraSettings()), seed=seed)
        save_adapter(parts.unet, tmp_path / name)
    assert (
        main(
            ["mix", str(tmp_path / "a"), str(tmp_path / "b"), "--alpha", "0.3", "--out", str(tmp_path / "m")]
        )
        == 0
    )
    assert (tmp_path / "m" / WEIGHT_NAME).is_file()


def bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / WEIGHT_NAME).write_bytes(b"not a safetensors file")
    sample = ["sample", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "x.png")]
    return {
        "negative steps": (sample + ["--steps", "-3"], "--steps must be positive"),
        "missing model path": (
            ["sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", "x.png"],
            "no such directory",
        ),
        "corrupt adapter": (
            sample + ["--steps", "1", "--adapter", str(corrupt)],
            "not a readable safetensors",
        ),
        "mix alpha": (
            ["mix", str(corrupt), str(corrupt), "--alpha", "2", "--out", str(tmp_path / "m")],
            "--alpha",
        ),
        "bad resolution": (sample + ["--resolution", "30"], "multiple of 8"),
        "non-integer steps": (sample + ["--steps", "many"], "invalid int value"),
        "uncached hub id offline": (
            [
                "sample",
                "--model",
                "nobody-here/no-such-model",
                "--prompt",
                "x",
                "--out",
                str(tmp_path / "x.png"),
            ],
            "nobody-here/no-such-model: weights not found",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "negative steps",
        "missing model path",
        "corrupt adapter",
        "mix alpha",
        "bad resolution",
        "non-integer steps",
        "uncached hub id offline",
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    argv, message = bad_inputs(tmp_path)[case]
    proc = subprocess.run(
        [sys.executable, "-m", "alignprop_ray.cli", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "x.png").exists()
