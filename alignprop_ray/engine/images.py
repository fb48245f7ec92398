"""Tensors in [0, 1] to pictures: PIL images (rounded as diffusers rounds) and PNG files."""

from __future__ import annotations

from pathlib import Path

import torch


def write_images(images: torch.Tensor, out: str, grid: bool = False, nrow: int = 1) -> list[Path]:
    """One image -> PNG at `out`; several -> a grid PNG at `out` (grid=True) or numbered PNGs in folder `out`."""
    from torchvision.utils import make_grid

    out_path = Path(out)
    if len(images) == 1 or grid:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        picture = images[0] if len(images) == 1 else make_grid(images, nrow=max(nrow, 1), padding=2)
        to_pil(picture).save(out_path)
        return [out_path]
    out_path.mkdir(parents=True, exist_ok=True)
    paths = [out_path / f"{i:04d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        to_pil(image).save(path)
    return paths


def to_pil(image: torch.Tensor):
    """A [0, 1] (3, H, W) tensor as a PIL image, rounded exactly like diffusers' `numpy_to_pil`."""
    from PIL import Image

    array = (image.detach().float().cpu().permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)
