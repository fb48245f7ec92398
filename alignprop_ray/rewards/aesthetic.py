"""The LAION aesthetic predictor v2: an MLP on L2-normalized OpenAI CLIP ViT-L/14 image embeddings.

Reference: christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``: CLIP's own
preprocess, ``encode_image``, L2 normalization, then the head in float32. The score is roughly a 1-10
rating; AlignProp's aesthetic objective is the ``target`` form ``-|10 - score|``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from alignprop_ray.presets import TINY
from alignprop_ray.rewards.base import Reward
from alignprop_ray.rewards.clip_models import OpenClipEncoder, load_open_clip
from alignprop_ray.rewards.options import CLIP_L14_SOURCE, HEAD_SOURCE, AestheticTerm
from alignprop_ray.rewards.weights import load_state_dict, load_strict, resolve_file


class AestheticHead(nn.Module):
    """The predictor's MLP, 768 -> 1024 -> 128 -> 64 -> 16 -> 1, with the original state-dict keys.

    Layer indices follow the original ``nn.Sequential`` (dropouts included; no activations), so the
    released file loads as is: ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


class AestheticReward(Reward):
    """Predicted LAION aesthetic rating (about 1-10) of each image; prompts are ignored."""

    def __init__(self, encoder: OpenClipEncoder, head: AestheticHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.head(self.encoder.image_embeds(images)).squeeze(-1).float()

    def image_features(self, images: Tensor) -> Tensor:
        return self.encoder.image_embeds(images)


def aesthetic(options: AestheticTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    seeded = options.arch == TINY or options.init == "random"
    clip_file = None if seeded else resolve_file("clip_path", options.clip_path, CLIP_L14_SOURCE)
    encoder = load_open_clip(
        options.arch, clip_file, device=device, dtype=dtype, seed=options.seed, option="clip_path"
    )
    head = _load_head(options, input_size=encoder.model.visual.output_dim)
    # The reference runs the head in float32 on normalized embeddings; it is 0.9M parameters.
    return AestheticReward(encoder, head.to(device).requires_grad_(False).eval())


def _load_head(options: AestheticTerm, input_size: int) -> AestheticHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        head = AestheticHead(input_size)
    if options.path or (options.arch != TINY and options.init == "pretrained"):
        path = resolve_file("path", options.path, HEAD_SOURCE)
        load_strict("path", head, load_state_dict("path", path), path)
    return head
