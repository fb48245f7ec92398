"""Diffusion model parts: load a pipeline of any supported family, or build a family's offline `tiny` preset.

Only the parts AlignProp needs are kept (tokenizers, text encoders, denoiser, VAE, scheduler); safety
checkers, feature extractors and watermarkers are never loaded. The family (engine/families/) is read
from the pipeline directory's `model_index.json`, or given; `tiny` builds the family's miniature (`sd`
unless another family is given).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from alignprop_ray.engine.families import AUTO, get_family
from alignprop_ray.engine.families.base import DiffusionParts
from alignprop_ray.engine.families.registry import SD_SCHEDULE, TINY_FAMILY, check_family
from alignprop_ray.engine.families.tiny import clip_tokenizer, seeded
from alignprop_ray.errors import UserError
from alignprop_ray.presets import TINY, looks_like_path

__all__ = [
    "DTYPES",
    "SD_SCHEDULE",
    "DiffusionParts",
    "build_tiny_parts",
    "clip_tokenizer",
    "compile_denoiser",
    "load_parts",
    "save_tiny_model",
    "seeded",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_parts(
    pretrained: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    family: str = AUTO,
) -> DiffusionParts:
    """Load `tiny`, a hub id, or a local diffusers pipeline directory; frozen, on device, in dtype.

    `family` (sd, sdxl, sd3) must match the pipeline when given; `auto` reads it from model_index.json.
    """
    if pretrained == TINY:
        parts = build_tiny_parts(family=family)
    else:
        parts = _load_pretrained(pretrained, dtype, family)
    return parts.to(device, dtype).freeze()


def build_tiny_parts(seed: int = 0, family: str = AUTO) -> DiffusionParts:
    """The random-init tiny pipeline of `family` (TINY_FAMILY for auto), deterministic in `seed`."""
    return get_family(TINY_FAMILY if family == AUTO else family).build_tiny(seed)


def save_tiny_model(directory: str | os.PathLike, seed: int = 0, family: str = "sd") -> Path:
    """Write a family's tiny preset as a standard diffusers pipeline directory."""
    parts = build_tiny_parts(seed, family)
    parts.family.pipeline(parts).save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def _load_pretrained(pretrained: str, dtype: torch.dtype, family: str) -> DiffusionParts:
    local = Path(pretrained).expanduser()
    if not local.exists() and looks_like_path(pretrained):
        raise UserError(f"model {pretrained}: no such directory (expected a diffusers pipeline directory)")
    if local.exists() and not (local / "model_index.json").is_file():
        raise UserError(f"model {pretrained}: not a diffusers pipeline directory (no model_index.json)")
    source = str(local) if local.exists() else pretrained
    with _not_found_as_user_error(pretrained):
        index = _model_index(source)
    try:
        name = check_family(family, pretrained, index)
    except ValueError as err:
        raise UserError(f"model family {err}" if family != AUTO else f"model {err}") from None
    with _not_found_as_user_error(pretrained):
        return get_family(name).load(source, dtype, index)


@contextmanager
def _not_found_as_user_error(pretrained: str):
    try:
        yield
    except (OSError, ValueError) as err:
        hint = (
            "download it first (e.g. `hf download " + pretrained + "` with network access) "
            "or pass a local diffusers directory"
        )
        raise UserError(
            f"model {pretrained}: weights not found locally and cannot be fetched; {hint} "
            f"({type(err).__name__})"
        ) from None


def _model_index(source: str) -> dict:
    """model_index.json of a local directory, or from the hub (cache first; offline mode is honoured)."""
    local = Path(source) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text(encoding="utf-8"))


def compile_denoiser(denoiser: torch.nn.Module) -> torch.nn.Module:
    """Run the denoiser's forward through torch.compile (model.compile), in place; a second call does nothing.

    Only `forward` is compiled, so module hooks, LoRA scaling and the sampler's checkpoints stay outside the
    compiled graph; a checkpointed call recomputes through the same compiled forward. Compilation happens on
    the first call of each input shape (once per worker, plus a recompile when the batch shape changes, e.g.
    for evaluation). Inductor's on-disk caches (FX graph and AOTAutograd, on by default; directory
    TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_<user>) let a restarted worker on the same machine
    skip code generation; Dynamo's tracing is redone in every process.
    """
    if getattr(denoiser, "_alignprop_compiled", False):
        return denoiser
    denoiser.forward = torch.compile(denoiser.forward)
    denoiser._alignprop_compiled = True
    return denoiser
