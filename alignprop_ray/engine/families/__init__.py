"""Model families: what differs between Stable Diffusion 1.x/2.x (`sd`), SDXL (`sdxl`), SD3/3.5 (`sd3`) and
FLUX.1 (`flux`).

One row per family in engine/families/registry.py (torch-free: the config layer reads it); `get_family`
imports the family's implementation when first asked.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from alignprop_ray.engine.families.registry import AUTO, FAMILIES, family_row, family_rows

if TYPE_CHECKING:
    import torch

    from alignprop_ray.engine.families.base import Family

__all__ = ["AUTO", "FAMILIES", "family_of", "get_family"]


@cache
def get_family(name: str) -> Family:
    """The family named `name` (a row of the registry); ValueError for an unknown name."""
    return family_row(name).load()


def family_of(denoiser: torch.nn.Module) -> Family:
    """The family a denoiser belongs to, read off its class and config (an SDXL UNet is the UNet whose
    added embedding is `text_time`)."""
    for row in family_rows():
        family = get_family(row.name)
        if family.is_denoiser(denoiser):
            return family
    raise ValueError(
        f"{type(denoiser).__name__} is not the denoiser of a known family ({', '.join(FAMILIES)})"
    )
