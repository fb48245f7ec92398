"""Every model family by name, one row each, readable without torch (the config layer reads it).

A row says what the config layer, the loader and the tests need to know of a family: the diffusers
pipeline class that names it in a `model_index.json` (as diffusers' AUTO_TEXT2IMAGE_PIPELINES_MAPPING
maps a name to a pipeline), the schedulers it samples with, its default LoRA targets, its offline tiny
preset and the dtypes it refuses. What differs in code (prompt encoding, the denoiser call, latent
scaling) is the family's implementation, named by import path (``module:Class``) and imported when the
family is first used (engine/families/base.py `Family` has the interface). A new family is one module
and one row here; docs/extending.md walks through it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

AUTO = "auto"
TINY_FAMILY = "sd"  # the family of `model.pretrained: tiny` with `model.family: auto`
DDIM = "DDIMScheduler"
EULER = "EulerDiscreteScheduler"
FLOW_EULER = "FlowMatchEulerDiscreteScheduler"


@dataclass(frozen=True)
class FamilyRow:
    name: str  # the config's model.family
    summary: str  # what the family is, in one line (docs/model_families.md)
    pipeline_class: str  # the diffusers pipeline: model_index.json `_class_name` of its directories
    implementation: str  # "module:Class", a Family subclass (engine/families/base.py)
    denoiser: str  # unet | transformer: its subfolder, and the prefix of its LoRA keys
    # Scheduler classes sampled with as a pipeline directory ships them; any other class is replaced by the
    # first, built from the directory's scheduler config (SD 1.5 ships PNDM: sampled with DDIM).
    schedulers: tuple[str, ...]
    # The denoiser's attention projections, as diffusers' LoRA training scripts adapt them: the default of
    # model.lora.target_modules.
    lora_targets: tuple[str, ...]
    # The offline `tiny` preset: its scheduler (class, config) and each component's constructor config,
    # read by the implementation's `build_tiny`.
    tiny_scheduler: tuple[str, Mapping[str, Any]]
    tiny: Mapping[str, Mapping[str, Any]]
    refused_dtypes: Mapping[str, str] = field(default_factory=dict)  # model.dtype -> why it is refused
    # Its pipeline decodes a float16 VAE whose config says force_upcast in float32 (StableDiffusionXLPipeline;
    # the SD and SD3 pipelines do not, though AutoencoderKL's config defaults force_upcast to true)
    upcasts_vae: bool = False

    def load(self) -> Any:
        """The family's implementation, a `Family` (engine/families/base.py, which imports this module: no
        annotation here); imports it, and torch, on first use."""
        return _implementation(self.implementation)(self)


@cache
def _implementation(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# --- the rows -------------------------------------------------------------------------------------------

_FAMILIES = "alignprop_ray.engine.families"
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# SD3's joint attention also projects the text stream (diffusers' train_dreambooth_lora_sd3.py).
_JOINT_ATTENTION = (*_ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# train_dreambooth_lora_flux.py's default for FLUX.1: both streams' attention and feed-forward layers; the
# `attn.` prefix also reaches the single-stream blocks' attn.to_{q,k,v}.
_FLUX_TARGETS = (
    *("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"),
    *("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"),
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
)

# Stable Diffusion's own DDPM training schedule (SD 1.x/2.x and SDXL); DDIM samples on top of it.
SD_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# SDXL base's scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
)
SD3_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)  # SD3 Medium's and SD3.5's scheduler config
# The schedulers of FLUX.1-dev (shift 3, dynamic shifting) and FLUX.1-schnell (no shift).
_FLUX_SHIFTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
FLUX_SCHEDULES = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, **_FLUX_SHIFTS),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, **_FLUX_SHIFTS),
}

# The tiny presets: random-init networks at toy width, 32 x 32 latents (64 px), genuine tokenizers
# (engine/families/tiny.py). CLIP text towers are `tiny.clip_text_config(width)`.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    sample_size=64,
)
_TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
_SDXL_WIDTHS = (32, 48)  # CLIP-L, CLIP-G hidden sizes (768, 1280 in SDXL): unequal, so an order slip shows
_SDXL_TIME_EMBED = 8  # addition_time_embed_dim (256 in SDXL)
_SD3_WIDTHS = (32, 48)  # CLIP-L, CLIP-G (768, 1280 in SD3)
_SD3_T5 = 96  # T5 d_model = joint_attention_dim (4096 in SD3); >= the CLIPs' concatenated width
_FLUX_CLIP = 32  # CLIP-L's width (768 in FLUX.1) = the pooled projection's
_FLUX_T5 = 64  # T5's d_model = joint_attention_dim (4096 in FLUX.1)

_ROWS = [
    FamilyRow(
        name="sd",
        summary="Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet, sampled with DDIM (the paper's model)",
        pipeline_class="StableDiffusionPipeline",  # SD 2.x too
        implementation=f"{_FAMILIES}.sd:SD",
        denoiser="unet",
        schedulers=(DDIM,),
        lora_targets=_ATTENTION,
        tiny_scheduler=(DDIM, SD_SCHEDULE),
        tiny={
            "unet": dict(_TINY_UNET, cross_attention_dim=32, attention_head_dim=8),
            "vae": TINY_VAE,
            "text_encoder": dict(width=32),
        },
    ),
    FamilyRow(
        name="sdxl",
        summary="Stable Diffusion XL: two CLIP text encoders, size micro-conditioning, a UNet; Euler or DDIM",
        pipeline_class="StableDiffusionXLPipeline",
        implementation=f"{_FAMILIES}.sdxl:SDXL",
        denoiser="unet",
        schedulers=(EULER, DDIM),
        lora_targets=_ATTENTION,
        tiny_scheduler=(EULER, SDXL_SCHEDULE),
        tiny={
            "unet": dict(
                _TINY_UNET,
                attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 2),
                use_linear_projection=True,
                cross_attention_dim=sum(_SDXL_WIDTHS),
                addition_embed_type="text_time",
                addition_time_embed_dim=_SDXL_TIME_EMBED,
                projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED + _SDXL_WIDTHS[1],
            ),
            "vae": dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True),
            "text_encoder": dict(width=_SDXL_WIDTHS[0]),
            "text_encoder_2": dict(width=_SDXL_WIDTHS[1], act="gelu"),
        },
        upcasts_vae=True,
        refused_dtypes={
            "float16": "SDXL's VAE overflows in float16 (diffusers upcasts it to float32 at every decode); "
            "use bfloat16"
        },
    ),
    FamilyRow(
        name="sd3",
        summary="Stable Diffusion 3/3.5: an MMDiT transformer, CLIP-L + CLIP-G (+ T5), flow-matching Euler",
        pipeline_class="StableDiffusion3Pipeline",
        implementation=f"{_FAMILIES}.sd3:SD3",
        denoiser="transformer",
        schedulers=(FLOW_EULER,),
        lora_targets=_JOINT_ATTENTION,
        tiny_scheduler=(FLOW_EULER, SD3_SCHEDULE),
        tiny={
            "transformer": dict(
                sample_size=32,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=_SD3_T5,
                caption_projection_dim=32,  # = heads x head dim
                pooled_projection_dim=sum(_SD3_WIDTHS),
                pos_embed_max_size=32,
                qk_norm="rms_norm",  # SD3.5's
                dual_attention_layers=(0,),  # SD3.5 Medium's MMDiT-X: a second self-attention in block 0
            ),
            # SD3's 16-channel VAE (no quant convs) with its latent scaling and shift
            "vae": dict(
                TINY_VAE,
                latent_channels=16,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=1.5305,
                shift_factor=0.0609,
            ),
            "text_encoder": dict(width=_SD3_WIDTHS[0]),
            "text_encoder_2": dict(width=_SD3_WIDTHS[1], act="gelu"),
            "text_encoder_3": dict(  # T5 v1.1 (SD3's T5-XXL) at toy width; vocab_size: its tokenizer's
                d_model=_SD3_T5,
                d_kv=16,
                d_ff=2 * _SD3_T5,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
            ),
        },
    ),
    FamilyRow(
        name="flux",
        summary="FLUX.1 [dev]/[schnell]: a guidance-distilled flow-matching MMDiT, CLIP-L (pooled) + T5",
        pipeline_class="FluxPipeline",
        implementation=f"{_FAMILIES}.flux:Flux",
        denoiser="transformer",
        schedulers=(FLOW_EULER,),
        lora_targets=_FLUX_TARGETS,
        tiny_scheduler=(FLOW_EULER, FLUX_SCHEDULES["dev"]),  # [schnell]: `make-tiny-model --variant`
        tiny={
            "transformer": dict(
                patch_size=1,
                in_channels=64,  # packed 2 x 2 patches of the 16-channel latents, as in FLUX.1
                num_layers=1,  # double-stream (MMDiT) blocks: 19 in FLUX.1
                num_single_layers=2,  # single-stream blocks: 38 in FLUX.1
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=_FLUX_T5,
                pooled_projection_dim=_FLUX_CLIP,
                axes_dims_rope=(4, 6, 6),  # rotary dims of (text, row, column): they sum to the head dim
            ),
            # FLUX.1's 16-channel VAE (no quant convs) with its latent scaling and shift
            "vae": dict(
                TINY_VAE,
                latent_channels=16,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=0.3611,
                shift_factor=0.1159,
            ),
            "text_encoder": dict(width=_FLUX_CLIP),
            "text_encoder_2": dict(  # T5 v1.1 (FLUX.1's T5-XXL) at toy width; vocab_size: its tokenizer's
                d_model=_FLUX_T5,
                d_kv=16,
                d_ff=2 * _FLUX_T5,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
            ),
        },
    ),
]
_REGISTRY = {row.name: row for row in _ROWS}
FAMILIES = tuple(_REGISTRY)


def family_rows() -> list[FamilyRow]:
    """Every family's row, in the table's order."""
    return list(_ROWS)


def family_row(name: str) -> FamilyRow:
    """The row of family `name`; ValueError naming the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return _REGISTRY[name]


# --- which family a pipeline directory holds ------------------------------------------------------------


def family_of_index(model_index: dict, where: str) -> str:
    """The family of a pipeline from its model_index.json; ValueError naming `where` if unsupported."""
    name = model_index.get("_class_name")
    found = [row.name for row in _ROWS if row.pipeline_class == name]
    if not found:
        supported = ", ".join(f"{row.pipeline_class} ({row.name})" for row in _ROWS)
        raise ValueError(f"{where} holds a {name or 'pipeline without _class_name'}; supported: {supported}")
    return found[0]


def local_model_index(pretrained: str) -> dict | None:
    """model_index.json of a local pipeline directory, or of a hub id already in the local HF cache.

    Never touches the network; None when the index is not on this machine.
    """
    path = Path(pretrained).expanduser() / "model_index.json"
    if not path.is_file():
        path = _cached_hub_file(pretrained, "model_index.json")
    return _read_json(path) if path is not None else None


def local_scheduler_class(pretrained: str) -> str | None:
    """The scheduler class a local pipeline directory ships (its scheduler_config.json), or None."""
    config = _read_json(Path(pretrained).expanduser() / "scheduler" / "scheduler_config.json")
    return config.get("_class_name") if config else None


def _read_json(path: Path) -> dict | None:
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
    """The family a model is used as: `family` unless `auto`, else the one its model_index.json names.

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
