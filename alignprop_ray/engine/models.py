"""Diffusion model parts: load a Stable Diffusion 1.x/2.x pipeline, or build the offline `tiny` preset.

Only the parts AlignProp needs are kept (tokenizer, text encoder, UNet, VAE, DDIM scheduler); the
safety checker and feature extractor are never loaded.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from alignprop_ray.errors import UserError

TINY = "tiny"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DiffusionParts:
    """The pieces of a Stable Diffusion pipeline used for sampling and training."""

    tokenizer: object  # transformers.CLIPTokenizer
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # diffusers.DDIMScheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionParts:
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device)
            if dtype is not None and module.dtype != dtype:
                if getattr(module, "_keep_in_fp32_modules", None):
                    module.to(dtype=dtype)  # diffusers keeps the named modules in fp32 (and warns)
                else:  # diffusers warns on every cast, even for classes that keep nothing in fp32
                    torch.nn.Module.to(module, dtype=dtype)
        return self

    def freeze(self) -> DiffusionParts:
        for module in (self.text_encoder, self.unet, self.vae):
            module.requires_grad_(False)
            module.eval()
        return self


def load_parts(
    pretrained: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DiffusionParts:
    """Load `tiny`, a hub id, or a local diffusers pipeline directory; frozen, on device, in dtype."""
    parts = build_tiny_parts() if pretrained == TINY else _load_pretrained(pretrained, dtype)
    return parts.to(device, dtype).freeze()


def _load_pretrained(pretrained: str, dtype: torch.dtype) -> DiffusionParts:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(pretrained).expanduser()
    if not local.exists() and looks_like_path(pretrained):
        raise UserError(f"model {pretrained}: no such directory (expected a diffusers pipeline directory)")
    if local.exists() and not (local / "model_index.json").is_file():
        raise UserError(f"model {pretrained}: not a diffusers pipeline directory (no model_index.json)")
    source = str(local) if local.exists() else pretrained
    try:
        return DiffusionParts(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
            scheduler=DDIMScheduler.from_pretrained(source, subfolder="scheduler"),
        )
    except (OSError, ValueError) as err:
        hint = (
            "download it first (e.g. `hf download " + pretrained + "` with network access) "
            "or pass a local diffusers directory"
        )
        raise UserError(
            f"model {pretrained}: weights not found locally and cannot be fetched; {hint} "
            f"({type(err).__name__})"
        ) from None


def looks_like_path(name: str) -> bool:
    """A hub id is `org/name`; anything with more structure, or starting like a path, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


# ---------------------------------------------------------------------------------------------------
# The tiny preset: a real SD-shaped pipeline, random-init from a seed, small enough for CPU tests.
# ---------------------------------------------------------------------------------------------------

TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
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
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    vocab_size=49408,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=32,
)
# Stable Diffusion's own DDPM training schedule; sampling always uses DDIM on top of it.
SD_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_tiny_parts(seed: int = 0) -> DiffusionParts:
    """Random-init tiny UNet/VAE/text encoder (deterministic in `seed`) with the real CLIP tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with seeded(seed):
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    return DiffusionParts(clip_tokenizer(), text_encoder, unet, vae, DDIMScheduler(**SD_SCHEDULE))


def save_tiny_model(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny preset as a standard diffusers StableDiffusionPipeline directory."""
    from diffusers import StableDiffusionPipeline

    parts = build_tiny_parts(seed)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


class seeded:
    """Fork the global torch RNG, seed it, and restore it afterwards (model init uses the global RNG)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def clip_tokenizer(model_max_length: int = 77):
    """The genuine CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships.

    Reproduces the vocabulary layout of `openai/clip-vit-large-patch14`: byte symbols, their `</w>`
    forms, one entry per merge, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
    """
    from transformers import CLIPTokenizer

    merges = _clip_merges()
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
        merges_file.write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
        )
        return CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            model_max_length=model_max_length,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )


def _clip_merges() -> list[tuple[str, ...]]:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # Same slice as CLIP's SimpleTokenizer: skip the header, keep 49152 - 256 - 2 merges.
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))
