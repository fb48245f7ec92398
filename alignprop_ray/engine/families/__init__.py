"""Model families: what differs between Stable Diffusion 1.x/2.x (`sd`), SDXL (`sdxl`), SD3/3.5 (`sd3`) and
FLUX.1 (`flux`).

Importing this package does not import torch (the config layer reads the names); `get_family` imports
the family's module when first asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignprop_ray.engine.families.names import AUTO, FAMILIES, LORA_TARGETS, PIPELINE_FAMILIES

if TYPE_CHECKING:
    import torch

    from alignprop_ray.engine.families.base import Family

__all__ = ["AUTO", "FAMILIES", "LORA_TARGETS", "PIPELINE_FAMILIES", "family_of", "get_family"]


def get_family(name: str) -> Family:
    """The family named `name` (sd, sdxl, sd3, flux)."""
    if name == "sd":
        from alignprop_ray.engine.families.sd import SD

        return SD()
    if name == "sdxl":
        from alignprop_ray.engine.families.sdxl import SDXL

        return SDXL()
    if name == "sd3":
        from alignprop_ray.engine.families.sd3 import SD3

        return SD3()
    if name == "flux":
        from alignprop_ray.engine.families.flux import Flux

        return Flux()
    raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")


def family_of(denoiser: torch.nn.Module) -> Family:
    """The family a denoiser belongs to, read off its class and config (an SDXL UNet is the UNet whose
    added embedding is `text_time`)."""
    for name in FAMILIES:
        family = get_family(name)
        if family.is_denoiser(denoiser):
            return family
    raise ValueError(
        f"{type(denoiser).__name__} is not the denoiser of a known family ({', '.join(FAMILIES)})"
    )
