"""What identifies a model family, without importing torch (the config layer reads this at validation).

A family is named by the diffusers pipeline class in a pipeline directory's `model_index.json`
(`_class_name`). Its default LoRA targets are listed here and nowhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

AUTO = "auto"
FAMILIES = ("sd", "sdxl", "sd3", "flux")

# model_index.json `_class_name` -> family. SD 2.x uses StableDiffusionPipeline too.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}

# The attention projections of the denoiser, as diffusers' LoRA training scripts adapt them
# (train_text_to_image_lora*.py for the UNets, train_dreambooth_lora_sd3.py for the MMDiT, whose joint
# attention also projects the text stream: add_{q,k,v}_proj, to_add_out; train_dreambooth_lora_flux.py's
# default for FLUX.1, which adds both streams' feed-forward layers and reaches the single-stream blocks'
# attn.to_{q,k,v} too).
LORA_TARGETS = {
    "sd": ("to_q", "to_k", "to_v", "to_out.0"),
    "sdxl": ("to_q", "to_k", "to_v", "to_out.0"),
    "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "flux": (
        *("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"),
        *("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"),
        *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    ),
}


def family_of_index(model_index: dict, where: str) -> str:
    """The family of a pipeline from its model_index.json; ValueError naming `where` if unsupported."""
    name = model_index.get("_class_name")
    if name not in PIPELINE_FAMILIES:
        supported = ", ".join(f"{cls} ({fam})" for cls, fam in PIPELINE_FAMILIES.items())
        raise ValueError(f"{where} holds a {name or 'pipeline without _class_name'}; supported: {supported}")
    return PIPELINE_FAMILIES[name]


def local_model_index(pretrained: str) -> dict | None:
    """model_index.json of a local pipeline directory, or of a hub id already in the local HF cache.

    Never touches the network; None when the index is not on this machine.
    """
    path = Path(pretrained).expanduser() / "model_index.json"
    if not path.is_file():
        path = _cached_hub_file(pretrained, "model_index.json")
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # not a valid repo id: nothing cached under it
        return None
    return Path(found) if isinstance(found, str) else None


def check_family(family: str, pretrained: str, model_index: dict | None) -> str:
    """The family a model is used as: `family` unless `auto`, else the detected one (`sd` for tiny).

    Raises ValueError when an explicit family contradicts the pipeline's model_index.json. Returns
    `auto` when nothing on this machine tells (a hub id not downloaded yet).
    """
    detected = family_of_index(model_index, pretrained) if model_index is not None else None
    if family == AUTO:
        return detected or AUTO
    if detected is not None and detected != family:
        raise ValueError(
            f"{family} does not match {pretrained}, which holds a {model_index['_class_name']} "
            f"(family {detected}); use {detected} or auto"
        )
    return family
