"""Differentiable CLIP preprocessing that reproduces each model's reference PIL transform on tensors.

The reference transforms (open_clip's ``preprocess``, transformers' ``CLIPImageProcessor``, HPSv2's
``ResizeMaxSize``) take a uint8 PIL image through: resize with PIL's filter, crop or pad to a square,
scale to [0, 1], normalize. We do the same on float images in [0, 1] with autograd intact:

* resize: ``F.interpolate(..., antialias=True)``. With antialiasing, torch uses PIL's resampling kernels
  (bicubic a = -0.5, support widened by the downscale factor), so up- and downsampling match PIL.
  PIL resizes in two passes, horizontal then vertical, each clipped to uint8, so we run the same two
  1-D passes and clamp to [0, 1] after each. Without the clamp between passes, bicubic overshoot at hard
  edges differs by up to ~20/255 from PIL; with it, only PIL's uint8 rounding remains (about 1/255).
* crop offsets round like the reference: torchvision ``round((h - s) / 2)``, transformers ``(h - s) // 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["shortest", "longest_pad", "squash"]


@dataclass(frozen=True)
class ClipPreprocess:
    """Images in [0, 1] (B, 3, H, W), any size -> normalized float32 model input (B, 3, size, size).

    ``resize`` modes: ``shortest`` (short side to ``size`` then center crop: open_clip, CLIP, PickScore),
    ``longest_pad`` (long side to ``size`` then zero-pad to square: HPSv2's ``ResizeMaxSize``), ``squash``.
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize: ResizeMode = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    crop_offset: Literal["round", "floor"] = "round"  # torchvision rounds; transformers floors

    def __call__(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.resize == "shortest":
            x = center_crop(
                self._resize(x, shortest_side_size(x.shape[-2:], self.size)), self.size, self.crop_offset
            )
        elif self.resize == "longest_pad":
            x = self._longest_pad(x)
        else:
            x = self._resize(x, (self.size, self.size))
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """PIL's separable resize: width pass, then height pass, each clipped; a pass is skipped if unneeded."""
        h, w = x.shape[-2:]
        for target in ((h, size[1]), size):
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(
                    x, size=target, mode=self.interpolation, align_corners=False, antialias=True
                )
                x = x.clamp(0.0, 1.0)
        return x

    def _longest_pad(self, x: Tensor) -> Tensor:
        """HPSv2: scale so the long side is ``size`` (sides rounded), then zero-pad, extra pixel right/bottom."""
        h, w = x.shape[-2:]
        scale = self.size / max(h, w)
        if scale == 1.0:
            return x
        nh, nw = round(h * scale), round(w * scale)
        x = self._resize(x, (nh, nw))
        ph, pw = self.size - nh, self.size - nw
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)


def shortest_side_size(hw: torch.Size | tuple[int, int], size: int) -> tuple[int, int]:
    """Output (h, w) of torchvision's ``Resize(size)`` and transformers' ``shortest_edge``: long side truncated."""
    h, w = int(hw[0]), int(hw[1])
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def center_crop(x: Tensor, size: int, offset: Literal["round", "floor"] = "round") -> Tensor:
    """Crop the central ``size`` x ``size`` square; ``offset`` picks the reference's rounding of odd margins."""
    h, w = x.shape[-2:]

    def start(extent: int) -> int:
        margin = extent - size
        return int(round(margin / 2.0)) if offset == "round" else margin // 2

    top, left = start(h), start(w)
    return x[..., top : top + size, left : left + size]
