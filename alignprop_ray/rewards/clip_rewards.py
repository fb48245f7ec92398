"""Prompt-image rewards: similarity of CLIP image and prompt embeddings (HPSv2, PickScore, CLIP score).

Each is ``scale * cos(image_embedding, prompt_embedding)``, computed the way the reference scorer does:
HPSv2 (tgxs002/HPSv2 ``img_score.py``) takes the plain cosine of a fine-tuned open_clip ViT-H-14 after
HPS's own preprocessing (long side to 224, zero-pad to square); PickScore (yuvalkirstain/PickScore)
multiplies the cosine of a fine-tuned transformers CLIP-H by its learned ``logit_scale.exp()``
(about 100); CLIP score is the plain cosine of any open_clip model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignprop_ray.presets import TINY
from alignprop_ray.rewards.base import Reward
from alignprop_ray.rewards.clip_models import ClipEncoder, load_hf_clip, load_open_clip
from alignprop_ray.rewards.options import PICKSCORE_SOURCE, HpsTerm, OpenClipTerm, PickScoreTerm
from alignprop_ray.rewards.weights import resolve_file, resolve_model_dir


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


def _open_clip_encoder(options: OpenClipTerm, device: torch.device, dtype: torch.dtype, **kw) -> ClipEncoder:
    path = None  # tiny without a path: seeded random init
    if options.path or options.arch != TINY:
        path = resolve_file("path", options.path, options.source)
    return load_open_clip(options.arch, path, device=device, dtype=dtype, seed=options.seed, **kw)


def hpsv2(options: HpsTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    return ClipSimilarityReward(_open_clip_encoder(options, device, dtype, resize="longest_pad"))


def clip_score(options: OpenClipTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    return ClipSimilarityReward(_open_clip_encoder(options, device, dtype))


def pickscore(options: PickScoreTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    ref = None if options.arch == TINY else resolve_model_dir("path", options.path, PICKSCORE_SOURCE)
    encoder = load_hf_clip(ref, device=device, dtype=dtype, seed=options.seed)
    return ClipSimilarityReward(encoder, scale=float(encoder.logit_scale))
