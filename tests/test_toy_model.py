"""The toy-shapes world behind the demo: the procedural dataset, the committed pipeline, its training script,
and the demo's `hue` reward."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignprop_ray.toy import shapes

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "models" / "toy-shapes"
PALETTE = np.array(list(shapes.COLOURS.values()), dtype=float)


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name closest (Euclidean, 0..255) to an RGB triple."""
    return list(shapes.COLOURS)[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


# --- the dataset --------------------------------------------------------------------------------------


def test_the_dataset_is_a_function_of_its_seed():
    pixels, captions = shapes.make_dataset(16, seed=3)
    again, captions_again = shapes.make_dataset(16, seed=3)
    other, _ = shapes.make_dataset(16, seed=4)
    assert pixels.shape == (16, 3, 64, 64) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, again) and captions == captions_again
    assert not torch.equal(pixels, other)


def test_captions_name_the_colours_in_the_pixels():
    """Inside the shape's inscribed circle the pixels are the caption's shape colour; outside its circumcircle,
    the background colour: both checked against the whole palette, not against the scene's own RGB."""
    size = 64
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    for scene in shapes.sample_scenes(60, seed=1):
        image = shapes.render(scene, size).astype(float)
        dist = np.hypot(xx - scene.cx * size, yy - scene.cy * size) / size
        inside = dist < 0.8 * shapes.inscribed_radius(scene.shape) * scene.radius
        outside = dist > scene.radius + 1.5 / size
        assert inside.sum() >= 8, scene
        assert nearest_colour(image[inside].mean(axis=0)) == scene.colour, scene
        assert nearest_colour(image[outside].mean(axis=0)) == scene.background, scene
        assert (
            scene.caption
            == f"{'an' if scene.colour == 'orange' else 'a'} {scene.colour} {scene.shape} on "
            + (f"{'an' if scene.background == 'orange' else 'a'} {scene.background} background")
        )


def test_shapes_differ_where_their_outlines_differ():
    """Same centre and size: a square covers its corners' region, a circle does not, a triangle leaves the
    bottom corners of its bounding square empty too and fills less area than either."""
    base = dict(
        colour="white", background="black", cx=0.5, cy=0.5, radius=0.3, fill=(255,) * 3, backdrop=(0,) * 3
    )
    area = {s: shapes.render(shapes.Scene(shape=s, **base), 64)[..., 0].mean() / 255 for s in shapes.SHAPES}
    assert area["triangle"] < area["square"] < area["circle"]
    # Within 4%: the rasterizer fills boundary pixels, which adds about half a pixel along the outline.
    assert area["circle"] == pytest.approx(np.pi * 0.3**2, rel=0.04)
    assert area["square"] == pytest.approx(2 * 0.3**2, rel=0.04)
    assert area["triangle"] == pytest.approx(3 * np.sqrt(3) / 4 * 0.3**2, rel=0.04)


def test_demo_prompts_hold_out_the_eval_captions():
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == len(shapes.SHAPES) * 8 * 7
    train, evaluation = shapes.demo_prompts()
    assert (
        len(train) == shapes.DEMO_TRAIN_SIZE
        and set(evaluation) <= set(captions)
        and set(train) <= set(captions)
    )
    assert not set(train) & set(evaluation)
    assert shapes.demo_prompts() == (train, evaluation)


# --- the committed pipeline ---------------------------------------------------------------------------


def test_the_committed_pipeline_loads_like_any_diffusers_pipeline():
    from diffusers import StableDiffusionPipeline

    from alignprop_ray.engine.models import SD_SCHEDULE, load_parts

    parts = load_parts(str(TOY_MODEL))
    assert parts.native_resolution == 64 and parts.vae_scale_factor == 4
    assert {k: parts.scheduler.config[k] for k in SD_SCHEDULE} == SD_SCHEDULE
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL)  # HF_HUB_OFFLINE=1 (conftest): no download
    assert torch.equal(pipe.unet.conv_in.weight, parts.denoiser.conv_in.weight)
    weights = sum(f.stat().st_size for f in TOY_MODEL.rglob("*") if f.is_file())
    assert weights < 20 * 2**20


def test_the_committed_prompt_files_are_the_demo_prompts():
    from alignprop_ray.prompts import read_prompt_file

    train, evaluation = shapes.demo_prompts()
    assert read_prompt_file(TOY_MODEL / "prompts" / "train.txt") == train
    assert read_prompt_file(TOY_MODEL / "prompts" / "eval.txt") == evaluation


SCENES = [  # (shape colour, background): every colour word at least once, each hue in both roles
    ("white", "red"),
    ("blue", "yellow"),
    ("red", "green"),
    ("yellow", "blue"),
    ("green", "purple"),
    ("orange", "black"),
    ("purple", "white"),
    ("black", "orange"),
]


def test_the_model_paints_the_colours_it_is_asked_for():
    """One circle per scene, 10 DDIM steps as in the demo: the image border is nearest (in the palette) to the
    background word, and the pixels that stand out from the border to the shape's colour word. A random-init
    model gets each right with chance 1/8."""
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.sampler import SamplerSettings, generate

    prompts = [shapes.caption("circle", colour, background) for colour, background in SCENES]
    settings = SamplerSettings.for_sampling(steps=10, guidance_scale=5.0)
    images = generate(load_parts(str(TOY_MODEL)), prompts, [0] * len(prompts), settings).numpy() * 255
    border = np.ones((64, 64), dtype=bool)
    border[3:-3, 3:-3] = False
    for (colour, background), image in zip(SCENES, images.transpose(0, 2, 3, 1), strict=True):
        backdrop = image[border].mean(axis=0)
        shape = np.linalg.norm(image - backdrop, axis=-1) > 80  # far from the background in RGB
        assert nearest_colour(backdrop) == background
        assert shape.sum() > 40, f"no shape drawn for {colour} on {background}"
        assert nearest_colour(image[shape].mean(axis=0)) == colour, (colour, background)


# --- the training script ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_training_script_writes_a_loadable_pipeline_deterministically(tmp_path):
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.toy.train import main

    for name in ("a", "b"):
        assert main(["--out", str(tmp_path / name), "--tiny", "--seed", "5"]) == 0
    parts = load_parts(str(tmp_path / "a"))
    assert parts.native_resolution == 32 and parts.vae.config.scaling_factor != 1.0
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert [h["stage"] for h in log["history"]] == ["vae", "vae", "unet", "unet"]
    assert (tmp_path / "a" / "samples.png").is_file()
    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()


# --- the demo's reward --------------------------------------------------------------------------------


def flat(*rgbs) -> torch.Tensor:
    return torch.tensor(np.array(rgbs), dtype=torch.float32).view(-1, 3, 1, 1).expand(-1, 3, 8, 8)


def test_hue_scores_the_target_hue_highest_and_grays_zero():
    from alignprop_ray.rewards.mixture import build_reward
    from alignprop_ray.rewards.options import NAMED_COLOURS

    for name in NAMED_COLOURS:
        reward = build_reward({"hue": {"colour": name}}, device="cpu", dtype=torch.float32)
        hues = [np.array(c) / 255 for c in NAMED_COLOURS.values()]
        scores = reward(flat(*hues), [""] * len(hues)).total
        assert list(NAMED_COLOURS)[int(scores.argmax())] == name
        assert reward(flat((0.5, 0.5, 0.5), (1, 1, 1)), ["", ""]).total.abs().max() < 1e-6


def test_hue_is_differentiable_and_validated():
    from alignprop_ray.rewards import validate_reward_spec
    from alignprop_ray.rewards.mixture import build_reward

    reward = build_reward({"hue": {"colour": "#ff8000"}}, device="cpu", dtype=torch.float32)
    images = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    reward(images, ["", ""]).total.sum().backward()
    assert images.grad.abs().sum() > 0
    assert validate_reward_spec({"hue": {"colour": "grey"}})[0].startswith("reward.hue.colour: 'grey' is not")
    assert validate_reward_spec({"hue": {"colour": "#808080"}}) == [
        "reward.hue.colour: (128, 128, 128) is a gray: it has no hue"
    ]
