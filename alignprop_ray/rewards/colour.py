"""Colour rewards: how far an image's colours lean toward a target hue (offline, differentiable).

``hue`` scores each pixel's chroma c = (Cb - 1/2, Cr - 1/2) in the JPEG (BT.601) CbCr plane against the
unit chroma direction u of a target colour, and averages over pixels:

    r = mean_pixels( c . u - |c . u_perp| )

The first term rewards chroma toward the hue, the second penalizes chroma off it, so among all colours the
target hue at full chroma scores highest (about 0.3 to 0.5, depending on the hue), grays score 0 and
other hues less. A projection alone would be maximized by an RGB cube corner, not by the hue asked for.
Every pixel counts equally, so the reward cannot be met by changing a few of them: the whole image has to
move toward the hue, which makes it a plain-to-see demo objective (and, maximized without restraint, a
flat field of the target colour: the mode collapse the diversity metrics are there to catch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignprop_ray.rewards.base import Reward
from alignprop_ray.rewards.options import CBCR, HueTerm, parse_colour


def chroma_direction(rgb: tuple[int, int, int]) -> Tensor:
    """The unit (Cb, Cr) direction of an RGB colour; ValueError for a gray, which has no hue."""
    chroma = torch.tensor(CBCR, dtype=torch.float64) @ torch.tensor(rgb, dtype=torch.float64)
    if chroma.norm() < 1e-6:
        raise ValueError(f"{rgb} is a gray: it has no hue")
    return chroma / chroma.norm()


class Hue(Reward):
    """Mean chroma toward a target hue minus chroma off it: highest for the hue itself, 0 for grays."""

    def __init__(self, rgb: tuple[int, int, int]):
        super().__init__()
        u = chroma_direction(rgb)
        basis = torch.stack([u, torch.stack([-u[1], u[0]])])  # rows: along the hue, perpendicular to it
        # RGB -> (along, across) chroma in one matrix (the +1/2 offsets of Cb and Cr cancel).
        self.register_buffer("rgb_to_hue", (basis @ torch.tensor(CBCR, dtype=torch.float64)).float(), False)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        along, across = torch.einsum("oc,bchw->obhw", self.rgb_to_hue, images.float())
        return (along - across.abs()).mean(dim=(1, 2))


def hue(term: HueTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    return Hue(parse_colour(term.colour)).to(device)
