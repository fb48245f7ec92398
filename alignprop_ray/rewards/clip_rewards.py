"""Prompt-image rewards: similarity of CLIP image and prompt embeddings (HPSv2, PickScore, CLIP score).

Each is ``scale * cos(image_embedding, prompt_embedding)``, computed the way the reference scorer does:
HPSv2 (tgxs002/HPSv2 ``img_score.py``) takes the plain cosine of a fine-tuned open_clip ViT-H-14 after
HPS's own preprocessing (long side to 224, zero-pad to square); PickScore (yuvalkirstain/PickScore)
multiplies the cosine of a fine-tuned transformers CLIP-H by its learned ``logit_scale.exp()``
(about 100); CLIP score is the plain cosine of any open_clip model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from alignprop_ray.rewards.base import Reward
from alignprop_ray.rewards.clip_models import ClipEncoder, load_hf_clip, load_open_clip, open_clip_arch_exists
from alignprop_ray.rewards.registry import TINY, RewardOptions, register_reward
from alignprop_ray.rewards.weights import (
    HUB_PREFIX,
    WeightsSource,
    check_ref,
    resolve_file,
    resolve_model_dir,
)

HPS_SOURCE = WeightsSource(
    "the HPS v2.1 (or v2) checkpoint HPS_v2.1_compressed.pt", "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"
)
PICKSCORE_SOURCE = WeightsSource("the PickScore_v1 model directory", "hf://yuvalkirstain/PickScore_v1")
CLIP_SOURCE = WeightsSource(
    "an open_clip checkpoint for the chosen arch",
    "the open_clip pretrained list, e.g. "
    "hf://timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors",
)


class ClipSimilarityReward(Reward):
    """``scale`` times the cosine of each image's and its prompt's CLIP embeddings."""

    def __init__(self, encoder: ClipEncoder, scale: float = 1.0):
        super().__init__()
        self.encoder, self.scale = encoder, scale

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        image = self.encoder.image_embeds(images)
        text = self.encoder.text_embeds(prompts).to(image.device)
        return self.scale * (image * text).sum(dim=-1)

    def image_features(self, images: Tensor) -> Tensor:
        return self.encoder.image_embeds(images)


@dataclass(frozen=True)
class OpenClipOptions(RewardOptions):
    path: str | None = None  # open_clip checkpoint (local path or hf:// ref); not needed with arch: tiny
    arch: str = "ViT-L-14-quickgelu"  # any open_clip model name, or `tiny` for offline tests
    seed: int = 0  # random init with arch: tiny

    source: ClassVar[WeightsSource] = CLIP_SOURCE  # for messages about a missing `path`

    def check(self) -> list[str]:
        if self.arch == TINY:
            return check_ref("path", self.path, self.source) if self.path else []
        if not open_clip_arch_exists(self.arch):
            return [f"arch: unknown open_clip architecture {self.arch!r} (or 'tiny')"]
        return check_ref("path", self.path, self.source)


@dataclass(frozen=True)
class HpsOptions(OpenClipOptions):
    arch: str = "ViT-H-14"  # HPS v2 and v2.1 fine-tune open_clip ViT-H-14 (laion2B); `tiny` for tests

    source: ClassVar[WeightsSource] = HPS_SOURCE


@dataclass(frozen=True)
class PickScoreOptions(RewardOptions):
    # PickScore_v1 directory (config.json + weights), or hf://yuvalkirstain/PickScore_v1
    path: str | None = None
    arch: str = "clip-h"  # `tiny`: seeded random-init transformers CLIP for offline tests
    seed: int = 0

    def check(self) -> list[str]:
        if self.arch not in ("clip-h", TINY):
            return [f"arch: expected clip-h or tiny, got {self.arch!r}"]
        if self.arch == TINY:
            return []
        return check_ref("path", self.path, PICKSCORE_SOURCE, is_dir=not _is_hub(self.path))


def _is_hub(ref: str | None) -> bool:
    return ref is not None and ref.startswith(HUB_PREFIX)


def _open_clip_encoder(
    options: OpenClipOptions, device: torch.device, dtype: torch.dtype, **kw
) -> ClipEncoder:
    path = None  # tiny without a path: seeded random init
    if options.path or options.arch != TINY:
        path = resolve_file("path", options.path, options.source)
    return load_open_clip(options.arch, path, device=device, dtype=dtype, seed=options.seed, **kw)


@register_reward("hpsv2", options=HpsOptions)
def hpsv2(options: HpsOptions, *, device: torch.device, dtype: torch.dtype) -> Reward:
    """HPS v2 / v2.1 human preference score: how much people would prefer the image for its prompt (learned)."""
    return ClipSimilarityReward(_open_clip_encoder(options, device, dtype, resize="longest_pad"))


@register_reward("clip_score", options=OpenClipOptions)
def clip_score(options: OpenClipOptions, *, device: torch.device, dtype: torch.dtype) -> Reward:
    """Cosine of CLIP image and prompt embeddings: text-image alignment with any open_clip model (learned)."""
    return ClipSimilarityReward(_open_clip_encoder(options, device, dtype))


@register_reward("pickscore", options=PickScoreOptions)
def pickscore(options: PickScoreOptions, *, device: torch.device, dtype: torch.dtype) -> Reward:
    """PickScore: Pick-a-Pic human preference for the image given its prompt, logit-scaled (learned)."""
    ref = None if options.arch == TINY else resolve_model_dir("path", options.path, PICKSCORE_SOURCE)
    encoder = load_hf_clip(ref, device=device, dtype=dtype, seed=options.seed)
    return ClipSimilarityReward(encoder, scale=float(encoder.logit_scale))
