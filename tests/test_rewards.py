"""Reward library: registry and specs, gradients, mixtures, reference parity, weight loading, diversity.

Learned rewards run their real code paths on seeded tiny random-init architectures (``arch: tiny``);
nothing here downloads weights.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode

from alignprop_ray.errors import UserError
from alignprop_ray.rewards import available_rewards, parse_reward_spec, validate_reward_spec
from alignprop_ray.rewards.aesthetic import AestheticHead
from alignprop_ray.rewards.diversity import diversity
from alignprop_ray.rewards.mixture import RewardMixture, build_reward
from alignprop_ray.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess
from alignprop_ray.rewards.registry import get_entry

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")
LEARNED = ("aesthetic", "clip_score", "hpsv2", "pickscore")
OFFLINE = ("compressibility", "contrast", "jpeg_compressibility", "saturation", "sharpness")
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


def term_spec(name: str) -> dict:
    return {"arch": "tiny"} if name in LEARNED else {}


@pytest.fixture(scope="module")
def mixture() -> RewardMixture:
    """Every registered reward once; the non-differentiable one at weight 0 (logged, not optimized)."""
    spec = {
        n: {**term_spec(n), "weight": 0.0 if n == "jpeg_compressibility" else 1.0}
        for n in available_rewards()
    }
    return build_reward(spec, device="cpu", dtype=torch.float32)


def drawn_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A real-looking test image: smooth color gradients with hard-edged shapes and lines (PIL, uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 255
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(4, width // 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        ends = [tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2)]
        draw.line(ends, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=3)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.cat([to_tensor(drawn_image(size, size, seed)) for seed in range(batch)])


# ---------------------------------------------------------------- registry and specs


def test_registry_lists_every_reward_sorted():
    names = available_rewards()
    assert names == sorted(names) and set(LEARNED + OFFLINE) <= set(names)
    assert not get_entry("jpeg_compressibility").differentiable
    assert all(get_entry(n).differentiable for n in names if n != "jpeg_compressibility")
    assert all(get_entry(n).summary for n in names)  # one line on what each rewards


@pytest.mark.parametrize(
    "spec",
    [
        {"saturation": 1.0},
        {"saturation": 2, "contrast": {"weight": 0.5}},
        {"aesthetic": {"weight": 1.0, "objective": "target", "target": 10.0, "arch": "tiny"}},
        {"aesthetic": {"arch": "tiny"}, "aesthetic.weight": 0.3},  # a sweep's dotted key
        {"compressibility": None},
        "sharpness",
        {"saturation": 1.0, "jpeg_compressibility": 0.0},  # logged only
    ],
)
def test_valid_specs(spec):
    assert validate_reward_spec(spec) == []


def test_spec_parsing_weights_objectives_and_dotted_overrides():
    terms, problems = parse_reward_spec(
        {"aesthetic.weight": 0.25, "aesthetic": {"weight": 3, "target": 10, "arch": "tiny"}, "saturation": 2}
    )
    assert problems == []
    assert terms["aesthetic"].weight == 0.25  # the dotted key wins over the nested value
    assert (terms["aesthetic"].mode, terms["aesthetic"].target) == ("target", 10.0)
    assert (terms["saturation"].weight, terms["saturation"].mode) == (2.0, "maximize")


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            {"foo": 1.0},
            "reward.foo: unknown reward (valid: aesthetic, clip_score, compressibility, contrast, hpsv2, ",
        ),
        ({"saturation": 0.0, "contrast": 0}, "reward: total weight is zero"),
        ({}, "reward: no reward terms (valid: aesthetic,"),
        ([1, 2], "reward: expected a mapping"),
        (
            {"jpeg_compressibility": 1.0},
            "reward.jpeg_compressibility: not differentiable, cannot be an AlignProp training objective (use it as an eval metric)",
        ),
        ({"saturation": "lots"}, "reward.saturation: expected a weight or a mapping"),
        ({"saturation": {"weight": float("nan")}}, "reward.saturation.weight: must be a finite number"),
        ({"saturation": {"weight": True}}, "reward.saturation.weight: must be a number, not a boolean"),
        (
            {"saturation": {"objective": "target"}},
            "reward.saturation.target: required with objective: target",
        ),
        (
            {"saturation": {"objective": "minimize"}},
            "reward.saturation.objective: must be one of 'maximize' or 'target' (got 'minimize')",
        ),
        (
            {"saturation": {"objective": "maximize", "target": 1}},
            "reward.saturation.target: only used with objective: target",
        ),
        (
            {"saturation": {"gamma": 2}},
            "reward.saturation.gamma: unknown field (valid: weight, objective, target, serve)",
        ),
        (
            {"aesthetic": {"arch": "tiny", "seed": "one"}},
            "reward.aesthetic.seed: input should be a valid integer",
        ),
        (
            {"clip_score": {"arch": "ViT-Q-99", "path": "x.pt"}},
            "reward.clip_score.arch: unknown open_clip architecture",
        ),
        ({"pickscore": {"arch": "clip-g"}}, "reward.pickscore.arch: must be one of 'clip-h' or 'tiny'"),
    ],
)
def test_bad_specs_are_rejected_with_one_line_naming_the_field(spec, expected):
    problems = validate_reward_spec(spec)
    assert any(p.startswith(expected) for p in problems), problems
    assert all("\n" not in p and p.startswith("reward") for p in problems)
    with pytest.raises(UserError) as err:
        build_reward(spec, device="cpu", dtype=torch.float32)
    assert "\n" not in str(err.value) and expected in str(err.value)


def test_non_differentiable_reward_is_fine_as_an_eval_metric():
    assert validate_reward_spec({"jpeg_compressibility": 1.0}, for_training=False) == []
    out = build_reward({"jpeg_compressibility": 1.0}, device="cpu", dtype=torch.float32, for_training=False)(
        images(), PROMPTS
    )
    assert out.total.shape == (2,) and (out.total < 0).all()


@pytest.mark.parametrize(
    "name, files",
    [
        ("aesthetic", ["sac+logos+ava1-l14-linearMSE.pth", "hf://timm/vit_large_patch14_clip_224.openai"]),
        ("hpsv2", ["HPS_v2.1_compressed.pt", "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"]),
        ("pickscore", ["hf://yuvalkirstain/PickScore_v1"]),
        ("clip_score", ["open_clip"]),
    ],
)
def test_missing_weights_name_the_file_and_where_to_get_it(name, files):
    problems = validate_reward_spec({name: 1.0})
    assert problems and all(p.startswith(f"reward.{name}.") for p in problems)
    text = " ".join(problems)
    assert all(f in text for f in files), problems
    missing = validate_reward_spec({name: {"path": "/no/such/weights.pt"}})
    assert any("not found: /no/such/weights.pt" in p for p in missing), missing


def test_uncached_hub_weights_are_reported_when_offline(monkeypatch):
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: True)
    problems = validate_reward_spec({"hpsv2": {"path": "hf://xswu/HPSv2/not-a-real-file-for-tests.pt"}})
    assert problems == [
        "reward.hpsv2.path: hf://xswu/HPSv2/not-a-real-file-for-tests.pt is not in the local Hugging Face cache and "
        "HF_HUB_OFFLINE is set (download it, or point path at a local copy of the HPS v2.1 (or v2) checkpoint "
        "HPS_v2.1_compressed.pt)"
    ]


def test_validation_is_cheap_it_imports_no_model_library():
    code = (
        "import sys; from alignprop_ray.rewards import validate_reward_spec as v; "
        "v({'aesthetic': 1.0, 'hpsv2': {'arch': 'tiny'}, 'pickscore': 1, 'saturation': 1, 'hue': 1}); "
        "print([m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- gradients and mixtures


@pytest.mark.parametrize("name", [n for n in available_rewards() if n != "jpeg_compressibility"])
def test_gradient_reaches_the_images_from_every_differentiable_reward(mixture, name):
    x = images().requires_grad_(True)
    value = mixture.rewards[name](x, PROMPTS)
    assert value.shape == (2,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    value.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(dim=1) > 0).all()  # each image gets its own gradient


def test_jpeg_compressibility_is_true_jpeg_size_without_gradient(mixture):
    reward = mixture.rewards["jpeg_compressibility"]
    flat, noisy = (
        torch.full((1, 3, 64, 64), 0.5),
        torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
    )
    value = reward(torch.cat([flat, noisy]), PROMPTS)
    assert not reward.differentiable and not value.requires_grad
    assert value[0] > value[1] and -value[1] > 5  # noise costs several kB at quality 95; gray almost nothing


def test_mixture_total_is_the_weighted_sum_of_terms_and_terms_are_raw_values():
    spec = {
        "saturation": 0.5,
        "contrast": {"weight": 2.0, "target": 0.4},
        "aesthetic": {"arch": "tiny", "weight": -1.0},
        "jpeg_compressibility": 0.0,
    }
    mix = build_reward(spec, device="cpu", dtype=torch.float32)
    x = images()
    out = mix(x, PROMPTS)
    assert (
        mix.term_names == ["saturation", "contrast", "aesthetic", "jpeg_compressibility"] == list(out.terms)
    )
    for name in mix.term_names:
        torch.testing.assert_close(out.terms[name], mix.rewards[name](x, PROMPTS))
    t = out.terms
    expected = 0.5 * t["saturation"] - 2.0 * (0.4 - t["contrast"]).abs() - t["aesthetic"]
    torch.testing.assert_close(out.total, expected)
    assert out.total.shape == (2,) and mix.differentiable


def test_mixture_is_frozen_and_stays_in_eval_mode(mixture):
    assert not any(p.requires_grad for p in mixture.parameters())
    mixture.train()
    assert not any(m.training for m in mixture.modules())


def test_mixture_rejects_mismatched_prompts(mixture):
    with pytest.raises(ValueError, match="B prompts"):
        mixture(images(), PROMPTS[:1])


def test_tiny_learned_rewards_are_seeded_identically_on_every_build():
    rng_state = torch.random.get_rng_state()
    a = build_reward(
        {"pickscore": {"arch": "tiny"}, "hpsv2": {"arch": "tiny"}}, device="cpu", dtype=torch.float32
    )
    b = build_reward(
        {"pickscore": {"arch": "tiny"}, "hpsv2": {"arch": "tiny"}}, device="cpu", dtype=torch.float32
    )
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is left alone
    x = images()
    torch.testing.assert_close(a(x, PROMPTS).total, b(x, PROMPTS).total, rtol=0, atol=0)


def test_learned_rewards_run_in_the_requested_dtype():
    mix = build_reward(
        {"clip_score": {"arch": "tiny"}, "aesthetic": {"arch": "tiny"}}, device="cpu", dtype=torch.bfloat16
    )
    assert mix.rewards["clip_score"].encoder.dtype == torch.bfloat16
    x = images().requires_grad_(True)
    out = mix(x, PROMPTS)
    out.total.sum().backward()
    assert out.total.dtype == torch.float32 and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- offline rewards


def test_offline_rewards_measure_what_they_say():
    gray = torch.full((1, 3, 32, 32), 0.5)
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    halves = torch.zeros(1, 3, 32, 32)
    halves[..., 16:] = 1.0
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mix = build_reward(
        {n: 1.0 for n in ("saturation", "contrast", "sharpness")}, device="cpu", dtype=torch.float32
    )
    out = mix(torch.cat([gray, red, halves, noise]), ["p"] * 4).terms
    assert out["saturation"].tolist() == pytest.approx([0.0, 1.0, 0.0, out["saturation"][3].item()])
    assert out["contrast"][0] == 0 and out["contrast"][2] == pytest.approx(0.5, abs=0.01)
    assert out["sharpness"][0] == 0 and out["sharpness"][3] > out["sharpness"][2] > 0


def test_compressibility_surrogate_ranks_images_like_true_jpeg_size(mixture):
    gen = torch.Generator().manual_seed(0)
    base = images(1, 64)
    candidates = [
        torch.full_like(base, 0.5),
        base,
        *((base + a * (torch.rand(base.shape, generator=gen) - 0.5)).clamp(0, 1) for a in (0.1, 0.3, 1.0)),
    ]
    batch = torch.cat(candidates)
    surrogate = mixture.rewards["compressibility"](batch, ["p"] * 5)
    jpeg = mixture.rewards["jpeg_compressibility"](batch, ["p"] * 5)
    assert torch.equal(surrogate.argsort(), jpeg.argsort()), (surrogate, jpeg)
    assert (surrogate.diff() < 0).all()  # gray > drawn image > more and more noise


# ---------------------------------------------------------------- reference preprocessing parity

# Tolerance. Our path resizes float images with PIL's kernels, two separable passes clamped to [0, 1]
# like PIL's; PIL also rounds each pass to uint8 (<= 0.5/255 each, the first one spread by the second
# pass's kernel), so pixels may differ by about 1/255 and by ~0.2/255 on average. We allow 1.5/255 max
# and 0.35/255 mean. A one-pixel crop shift or a missing clamp between passes exceeds both (checked
# below). Embeddings: that pixel noise moves unit embeddings of the tiny models by ~5e-4 (relative);
# we allow 5e-3.
PIXEL_MAX, PIXEL_MEAN, EMBED_REL = 1.5 / 255, 0.35 / 255, 5e-3
SIZES = [(64, 64), (100, 132), (512, 384), (30, 41)]  # square, odd crop margin, downscale, upscale


def assert_pixels_close(ours: torch.Tensor, reference: torch.Tensor, std=OPENAI_CLIP_STD):
    diff = (ours - reference).abs() * torch.tensor(std).view(1, 3, 1, 1)  # back to [0, 1] units
    assert diff.max() <= PIXEL_MAX and diff.mean() <= PIXEL_MEAN, (diff.max() * 255, diff.mean() * 255)


def assert_embeddings_close(ours: torch.Tensor, reference: torch.Tensor):
    assert ((ours - reference).norm() / reference.norm()) <= EMBED_REL


def hps_reference_transform(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's eval transform (ResizeMaxSize(size, fill=0), ToTensor, Normalize), reproduced from
    tgxs002/HPSv2 src/open_clip/transform.py since the hpsv2 package is not installed."""
    width, height = image.size
    scale = size / max(width, height)
    if scale != 1.0:
        new = (round(height * scale), round(width * scale))
        image = TF.resize(image, list(new), InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new[0], size - new[1]
        image = TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(TF.to_tensor(image), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[None]


@pytest.mark.parametrize("size", SIZES)
def test_open_clip_preprocessing_and_embeddings_match_open_clips_preprocess(mixture, size):
    import open_clip.transform

    for name in ("aesthetic", "clip_score"):
        encoder = mixture.rewards[name].encoder
        reference_transform = open_clip.transform.image_transform_v2(
            open_clip.transform.PreprocessCfg(**encoder.model.visual.preprocess_cfg), is_train=False
        )
        image = drawn_image(*size)
        reference = reference_transform(image)[None]
        ours = encoder.preprocess(to_tensor(image))
        assert_pixels_close(ours, reference)
        with torch.no_grad():
            ref_embed = torch.nn.functional.normalize(encoder.model.encode_image(reference), dim=-1)
            assert_embeddings_close(encoder.image_embeds(to_tensor(image)), ref_embed)


@pytest.mark.parametrize("size", SIZES)
def test_pickscore_preprocessing_matches_transformers_clip_image_processor(mixture, size):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    encoder = mixture.rewards["pickscore"].encoder
    side = encoder.preprocess.size
    image = drawn_image(*size)
    ours = encoder.preprocess(to_tensor(image))
    # PickScore's processor is laion/CLIP-ViT-H-14's: these settings, at the tiny model's image size.
    for processor_cls in (CLIPImageProcessorPil, CLIPImageProcessor):  # the PIL reference, and v5's default
        processor = processor_cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        reference = processor(images=image, return_tensors="pt").pixel_values
        assert_pixels_close(ours, reference)
    with torch.no_grad():
        ref_embed = torch.nn.functional.normalize(encoder.encode_pixels(reference), dim=-1)
        assert_embeddings_close(encoder.image_embeds(to_tensor(image)), ref_embed)


@pytest.mark.parametrize("size", SIZES)
def test_hpsv2_preprocessing_matches_hps_resize_max_size(mixture, size):
    encoder = mixture.rewards["hpsv2"].encoder
    image = drawn_image(*size)
    assert_pixels_close(
        encoder.preprocess(to_tensor(image)), hps_reference_transform(image, encoder.preprocess.size)
    )


def test_parity_tolerance_catches_a_one_pixel_crop_shift_and_an_unclamped_resize():
    image = drawn_image(100, 132)  # the short side resizes to 48, the long side to 63: an odd margin of 15
    reference = ClipPreprocess(48)(to_tensor(image))
    with pytest.raises(AssertionError):
        assert_pixels_close(ClipPreprocess(48, crop_offset="floor")(to_tensor(image)), reference)
    unclamped = torch.nn.functional.interpolate(
        to_tensor(image), size=(63, 48), mode="bicubic", antialias=True
    )
    unclamped = (unclamped[..., 8:56, :] - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        OPENAI_CLIP_STD
    ).view(1, 3, 1, 1)
    with pytest.raises(AssertionError):
        assert_pixels_close(unclamped, reference)


def test_learned_scores_match_their_reference_scorers(mixture):
    """Each reward equals its reference formula computed from the reference preprocessing."""
    import open_clip
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pil = [drawn_image(64, 64, seed) for seed in range(2)]
    x = torch.cat([to_tensor(p) for p in pil])
    with torch.no_grad():
        # LAION aesthetic: L2-normalized CLIP embedding -> head (simple_inference.py).
        aesthetic = mixture.rewards["aesthetic"]
        transform = open_clip.transform.image_transform_v2(
            open_clip.transform.PreprocessCfg(**aesthetic.encoder.model.visual.preprocess_cfg), is_train=False
        )
        embed = aesthetic.encoder.model.encode_image(torch.stack([transform(p) for p in pil]))
        expected = aesthetic.head(embed / embed.norm(dim=-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(aesthetic(x, PROMPTS), expected, atol=2e-3, rtol=1e-2)

        # HPSv2: diag(image_features @ text_features.T) from model(image, text) (img_score.py).
        hps = mixture.rewards["hpsv2"]
        tokens = open_clip.get_tokenizer("alignprop-tiny-clip")(PROMPTS)
        image_f, text_f, _ = hps.encoder.model(
            torch.cat([hps_reference_transform(p, 48) for p in pil]), tokens
        )
        torch.testing.assert_close(hps(x, PROMPTS), (image_f @ text_f.T).diagonal(), atol=2e-3, rtol=1e-2)

        # PickScore: logit_scale.exp() * cosine, processor pixels (the model card's calc_probs).
        pick = mixture.rewards["pickscore"]
        model = pick.encoder.model
        pixels = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})(
            images=pil, return_tensors="pt"
        ).pixel_values
        image_e = model.get_image_features(pixel_values=pixels).pooler_output
        text_e = model.get_text_features(input_ids=tokens).pooler_output
        image_e, text_e = (
            image_e / image_e.norm(dim=-1, keepdim=True),
            text_e / text_e.norm(dim=-1, keepdim=True),
        )
        expected = model.logit_scale.exp() * (text_e * image_e).sum(-1)
        torch.testing.assert_close(pick(x, PROMPTS), expected, atol=0.2, rtol=1e-2)  # logit scale ~14 here


# ---------------------------------------------------------------- weight loading


ORIGINAL_HEAD_KEYS = {  # sac+logos+ava1-l14-linearMSE.pth
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}


def test_aesthetic_head_has_the_original_state_dict_keys(tmp_path):
    assert {k: tuple(v.shape) for k, v in AestheticHead().state_dict().items()} == ORIGINAL_HEAD_KEYS
    gen = torch.Generator().manual_seed(1)
    state = collections.OrderedDict((k, torch.randn(s, generator=gen)) for k, s in ORIGINAL_HEAD_KEYS.items())
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)  # the released file is a plain OrderedDict of tensors
    reward = build_reward(
        {"aesthetic": {"arch": "tiny", "path": str(path)}}, device="cpu", dtype=torch.float32
    )
    head = reward.rewards["aesthetic"].head
    assert all(torch.equal(head.state_dict()[k], v) for k, v in state.items())
    x = images()
    embed = reward.rewards["aesthetic"].encoder.image_embeds(x)
    torch.testing.assert_close(reward(x, PROMPTS).terms["aesthetic"], head(embed).squeeze(-1))


class Payload:
    """Stands for any pickled object that is not a tensor container."""


def test_weights_with_wrong_keys_or_pickled_objects_are_refused(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, wrong)
    with pytest.raises(
        UserError,
        match=r"^reward\.aesthetic\.path: .*wrong\.pth does not fit AestheticHead: "
        r"missing layers\.0\.bias",
    ):
        build_reward({"aesthetic": {"arch": "tiny", "path": str(wrong)}}, device="cpu", dtype=torch.float32)
    pickled = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": Payload()}}, pickled)  # an arbitrary class: weights_only must refuse it
    with pytest.raises(
        UserError, match=r"^reward\.hpsv2\.path: cannot load .*evil\.pt safely \(weights_only\)"
    ):
        build_reward({"hpsv2": {"arch": "tiny", "path": str(pickled)}}, device="cpu", dtype=torch.float32)


def test_hps_style_checkpoint_loads_into_the_open_clip_model(tmp_path, mixture):
    """HPS checkpoints are {'state_dict': ...} (saved from DDP: 'module.' prefixes); both unwrap."""
    source = mixture.rewards["hpsv2"].encoder.model
    gen = torch.Generator().manual_seed(3)
    state = {
        f"module.{k}": v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in source.state_dict().items()
    }
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    loaded = build_reward({"hpsv2": {"arch": "tiny", "path": str(path)}}, device="cpu", dtype=torch.float32)
    got = loaded.rewards["hpsv2"].encoder.model.state_dict()
    assert all(torch.equal(got[k[len("module.") :]], v) for k, v in state.items())


def test_pickscore_loads_a_transformers_directory_offline(tmp_path, mixture):
    model = mixture.rewards["pickscore"].encoder.model
    model.save_pretrained(tmp_path / "PickScore_v1")
    assert json.loads((tmp_path / "PickScore_v1" / "config.json").read_text())["model_type"] == "clip"
    spec = {"pickscore": {"path": str(tmp_path / "PickScore_v1")}}
    assert validate_reward_spec(spec) == []
    loaded = build_reward(spec, device="cpu", dtype=torch.float32)
    x = images()
    torch.testing.assert_close(loaded(x, PROMPTS).total, mixture.rewards["pickscore"](x, PROMPTS))


# ---------------------------------------------------------------- diversity


def test_diversity_is_zero_for_identical_images_and_clearly_higher_for_noise(mixture):
    same = images(1).repeat(4, 1, 1, 1)
    noise = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    groups = [0, 0, 1, 1]
    for features in (None, mixture.image_features):

        def score(x, features=features):
            return diversity(x, groups, None if features is None else features(x))

        collapsed, varied = score(same), score(noise)
        assert collapsed["eval/diversity"] == pytest.approx(0.0, abs=1e-5)
        assert collapsed["eval/diversity_across_prompts"] == pytest.approx(0.0, abs=1e-5)
        assert varied["eval/diversity"] > 1e-3 and varied["eval/diversity"] > 100 * (
            collapsed["eval/diversity"] + 1e-6
        )
    assert diversity(noise, groups)["eval/diversity"] > 0.1  # RMS pixel distance of independent noise ~0.2


def test_diversity_separates_within_prompt_collapse_from_across_prompts():
    a, b = images(2).split(1)
    collapsed_per_prompt = torch.cat([a, a, b, b])
    metrics = diversity(collapsed_per_prompt, ["fox", "fox", "lighthouse", "lighthouse"], prefix="")
    assert metrics["diversity"] == pytest.approx(0.0, abs=1e-6) and metrics["diversity_across_prompts"] > 0.05


def test_diversity_features_come_from_a_clip_term_or_none(mixture):
    x = images()
    features = mixture.image_features(x)
    assert features.shape == (2, 768) and torch.allclose(features.norm(dim=-1), torch.ones(2))
    assert build_reward({"saturation": 1.0}, device="cpu", dtype=torch.float32).image_features(x) is None
    single = diversity(x, [0, 1])
    assert np.isnan(single["eval/diversity"]) and single["eval/diversity_across_prompts"] > 0
    with pytest.raises(ValueError, match="group ids"):
        diversity(x, [0])


def test_terms_naming_the_same_clip_model_share_one_frozen_copy(monkeypatch):
    import weakref

    from alignprop_ray.rewards import clip_models

    spec = {"aesthetic": {"arch": "tiny"}, "clip_score": {"arch": "tiny"}}
    x = images()

    def values_and_grads(mix, names):
        y = x.clone().requires_grad_(True)
        terms = mix(y, PROMPTS).terms
        return {n: (terms[n], torch.autograd.grad(terms[n].sum(), y, retain_graph=True)[0]) for n in names}

    def fresh_cache():
        monkeypatch.setattr(clip_models, "_SHARED_OPEN_CLIP", weakref.WeakValueDictionary())

    alone = {}
    for name in spec:
        fresh_cache()
        alone |= values_and_grads(build_reward({name: spec[name]}, device="cpu", dtype=torch.float32), [name])
    fresh_cache()
    mix = build_reward(spec, device="cpu", dtype=torch.float32)
    assert mix.rewards["aesthetic"].encoder.model is mix.rewards["clip_score"].encoder.model
    shared = values_and_grads(mix, list(spec))
    for name in spec:  # sharing changes nothing a term computes, gradients included
        torch.testing.assert_close(shared[name], alone[name], rtol=0, atol=0)

    for other in ({"arch": "tiny", "seed": 1}, {"arch": "tiny", "weight": 2.0}):
        got = build_reward({"clip_score": other}, device="cpu", dtype=torch.float32).rewards["clip_score"]
        same = other.get("seed", 0) == 0  # the weight is the mixture's business, not the model's
        assert (got.encoder.model is mix.rewards["clip_score"].encoder.model) == same
    bf16 = build_reward({"clip_score": spec["clip_score"]}, device="cpu", dtype=torch.bfloat16)
    assert bf16.rewards["clip_score"].encoder.model is not mix.rewards["clip_score"].encoder.model
