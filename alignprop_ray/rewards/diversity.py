"""Diversity metrics for spotting mode collapse, in a feature space the eval config fixes (``eval.diversity``).

Every eval image has its own seed; image j of prompt i is the (i, j) cell of a prompts x seeds grid.

Within a prompt (the images of one prompt), averaged over prompts:
  ``diversity``: mean pairwise distance; falls toward 0 when the model collapses to one image per prompt.
  ``vendi``: the Vendi score, an effective number of distinct images, from 1 (all alike) to the number of
  images per prompt.
Across prompts (the j-th image of every prompt, no two on the same noise):
  ``diversity_across_prompts``: mean distance between images of different prompts; falls when every prompt
  yields the same picture.
  ``vendi_across_prompts``: the Vendi score of {image j of every prompt}, averaged over j: from 1 to the
  number of prompts.

Vendi score (Friedman & Dieng, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning", TMLR
2023): ``exp(-sum_i l_i log l_i)`` over the eigenvalues l_i of K / n, where K is the n x n cosine-similarity
matrix of the items' features (positive semi-definite, ones on the diagonal). It equals n for n orthogonal
items, 1 for n identical ones, and m for m equal-sized groups of identical, mutually orthogonal items.

Feature spaces: ``clip``, unit CLIP image embeddings (distance ``1 - cos`` in [0, 2]); ``pixels``, images
area-downsampled to 32 x 32 (distance: RMS pixel difference in [0, 1]; the Vendi kernel is the cosine of the
pixel vectors, the reference implementation's pixel kernel). Compare a metric only across runs that use the
same space; the space is an eval setting, never the training reward's, so runs with different rewards do.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PIXEL_SIDE = 32  # coarse enough to ignore sampler noise texture, fine enough to see composition

Features = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [0, 1] -> (B, D)


def diversity(
    images: Tensor,
    group_ids: Sequence[Hashable] | Tensor,
    features: Tensor | None = None,
    *,
    prefix: str = "eval/",
) -> dict[str, float]:
    """``{prefix}diversity``, ``{prefix}diversity_across_prompts``, ``{prefix}vendi`` and
    ``{prefix}vendi_across_prompts``; NaN where no pair exists.

    ``group_ids[i]`` identifies the prompt of image ``i`` (an index or the prompt text); the j-th image of
    each group is its j-th seed. ``features`` (B, D) selects a feature space (e.g. CLIP embeddings from
    `clip_features`); None uses pixels.
    """
    distances = pairwise_distances(images, features)
    similarity = cosine_similarity(images, features)
    codes = _group_codes(group_ids, distances.shape[0], distances.device)
    columns = _positions_in_group(codes)
    same = codes[:, None] == codes[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    within = [distances[(same & upper) & (codes[:, None] == g)].mean() for g in codes.unique()]
    within = [d for d in within if not torch.isnan(d)]
    across = distances[~same & upper]
    return {
        f"{prefix}diversity": float(torch.stack(within).mean()) if within else float("nan"),
        f"{prefix}diversity_across_prompts": float(across.mean()) if across.numel() else float("nan"),
        f"{prefix}vendi": _mean_vendi(similarity, codes),
        f"{prefix}vendi_across_prompts": _mean_vendi(similarity, columns),
    }


def vendi_score(similarity: Tensor) -> float:
    """The Vendi score of n items from their n x n similarity matrix (PSD, ones on the diagonal)."""
    n = similarity.shape[0]
    eigenvalues = torch.linalg.eigvalsh(similarity.double() / n)
    p = eigenvalues[eigenvalues > 0]  # 0 log 0 = 0; round-off makes some of the zeros slightly negative
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def pairwise_distances(images: Tensor, features: Tensor | None = None) -> Tensor:
    """(B, B) distances: cosine distance between ``features`` if given, else RMS distance of 32x32 pixels."""
    if features is not None:
        unit = F.normalize(features.float(), dim=-1)
        return (1.0 - unit @ unit.T).clamp(min=0.0)
    pixels = pixel_features(images)
    return torch.cdist(pixels, pixels) / pixels.shape[1] ** 0.5


@torch.no_grad()
def cosine_similarity(images: Tensor, features: Tensor | None = None) -> Tensor:
    """(B, B) cosine similarities of ``features`` if given, else of the 32x32 pixel vectors."""
    unit = F.normalize((features if features is not None else pixel_features(images)).double(), dim=-1)
    return unit @ unit.T


def clip_features(
    arch: str, path: str | None, *, seed: int = 0, device: torch.device | str = "cpu"
) -> Features:
    """The `clip` feature space: unit image embeddings of an open_clip model (`arch`, weights `path`), loaded
    as a clip_score reward loads it (shared with any reward term on the same model and weights).

    Raises WeightsError for weights that cannot be found or fetched.
    """
    from alignprop_ray.rewards.clip_rewards import clip_score
    from alignprop_ray.rewards.options import OpenClipTerm

    term = OpenClipTerm(arch=arch, path=path, seed=seed)
    scorer = clip_score(term, device=torch.device(device), dtype=torch.float32)
    return torch.no_grad()(scorer.image_features)


def pixel_features(images: Tensor) -> Tensor:
    """The `pixels` feature space: images area-downsampled to 32 x 32, flattened (B, 3 x 32 x 32)."""
    return F.adaptive_avg_pool2d(images.detach().float(), PIXEL_SIDE).flatten(1)


def _mean_vendi(similarity: Tensor, groups: Tensor) -> float:
    """The Vendi score of each group of two or more items, averaged; NaN without such a group."""
    scores = [vendi_score(similarity[m][:, m]) for g in groups.unique() if (m := groups == g).sum() > 1]
    return sum(scores) / len(scores) if scores else float("nan")


def _positions_in_group(codes: Tensor) -> Tensor:
    """For each item, how many items of its group come before it (its seed's column in the grid)."""
    return torch.tensor([int((codes[:i] == code).sum()) for i, code in enumerate(codes)], device=codes.device)


def _group_codes(group_ids: Sequence[Hashable] | Tensor, n: int, device: torch.device) -> Tensor:
    ids = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(ids) != n:
        raise ValueError(f"{n} images but {len(ids)} group ids")
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in ids], device=device)
