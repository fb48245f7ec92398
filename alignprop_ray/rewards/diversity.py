"""Diversity metrics for spotting mode collapse: mean pairwise distances between generated images.

``diversity`` (within prompt) averages, over prompts, the mean distance between images of the same
prompt drawn with different seeds; it falls toward 0 when the model collapses to one image per prompt.
``diversity_across_prompts`` is the mean distance between images of different prompts; it falls when
every prompt yields the same picture.

Feature space: unit CLIP image embeddings when given (distance = cosine distance, 1 - cos, in [0, 2]),
else a pixel fallback (images area-downsampled to 32 x 32; distance = RMS pixel difference in [0, 1]).
The two scales differ, so compare a metric only across runs that use the same space.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PIXEL_SIDE = 32  # coarse enough to ignore sampler noise texture, fine enough to see composition


def diversity(
    images: Tensor,
    group_ids: Sequence[Hashable] | Tensor,
    features: Tensor | None = None,
    *,
    prefix: str = "eval/",
) -> dict[str, float]:
    """``{prefix}diversity`` (within prompt) and ``{prefix}diversity_across_prompts``; NaN where no pair exists.

    ``group_ids[i]`` identifies the prompt of image ``i`` (an index or the prompt text). ``features``
    (B, D), e.g. ``RewardMixture.image_features(images)``, selects the CLIP space; None uses pixels.
    """
    distances = pairwise_distances(images, features)
    codes = _group_codes(group_ids, distances.shape[0], distances.device)
    same = codes[:, None] == codes[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    within = [distances[(same & upper) & (codes[:, None] == g)].mean() for g in codes.unique()]
    within = [d for d in within if not torch.isnan(d)]
    across = distances[~same & upper]
    return {
        f"{prefix}diversity": float(torch.stack(within).mean()) if within else float("nan"),
        f"{prefix}diversity_across_prompts": float(across.mean()) if across.numel() else float("nan"),
    }


@torch.no_grad()
def pairwise_distances(images: Tensor, features: Tensor | None = None) -> Tensor:
    """(B, B) distances: cosine distance between ``features`` if given, else RMS distance of 32x32 pixels."""
    if features is not None:
        unit = F.normalize(features.float(), dim=-1)
        return (1.0 - unit @ unit.T).clamp(min=0.0)
    pixels = F.adaptive_avg_pool2d(images.detach().float(), PIXEL_SIDE).flatten(1)
    return torch.cdist(pixels, pixels) / pixels.shape[1] ** 0.5


def _group_codes(group_ids: Sequence[Hashable] | Tensor, n: int, device: torch.device) -> Tensor:
    ids = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(ids) != n:
        raise ValueError(f"{n} images but {len(ids)} group ids")
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in ids], device=device)
