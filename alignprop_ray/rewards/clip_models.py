"""Frozen CLIP models (open_clip and transformers) behind one interface, and their tiny test presets.

``ClipEncoder.image_embeds`` takes images in [0, 1] through the model's reference preprocessing
(differentiably) to unit-norm float32 embeddings; ``text_embeds`` embeds prompts without gradient and
caches them, since prompts repeat across steps. ``arch: tiny`` builds a seeded random-init miniature
(same code path, no downloads) so learned rewards run offline in tests and end-to-end demos.

open_clip and transformers are imported inside functions: importing either takes seconds, and
validating a config must not pay for that.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignprop_ray.compat import open_clip_register_config
from alignprop_ray.presets import TINY
from alignprop_ray.rewards.preprocess import ClipPreprocess, ResizeMode
from alignprop_ray.rewards.weights import WeightsError, load_state_dict, load_strict

# Registered with open_clip at runtime. embed_dim is 768 like ViT-L/14, so the aesthetic head keeps
# its real shapes; the towers are 2 layers of width 64. image_size 48 makes every test image resample.
TINY_OPEN_CLIP = "alignprop-tiny-clip"
_TINY_OPEN_CLIP_CFG = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_TINY_HF_CLIP = {
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    },
    "vision_config": {
        "image_size": 48,
        "patch_size": 8,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    "projection_dim": 64,
}
_TEXT_CACHE_SIZE = 4096
M = TypeVar("M", bound=nn.Module)

# Reward terms naming the same open_clip model and weights (aesthetic and clip_score both default to
# OpenAI's ViT-L/14: 1.7 GB in fp32) share one frozen copy; it lives as long as some encoder holds it.
_SHARED_OPEN_CLIP: weakref.WeakValueDictionary[tuple, nn.Module] = weakref.WeakValueDictionary()


class ClipEncoder(nn.Module):
    """A frozen CLIP model: images in [0, 1] -> unit image embeddings; prompts -> unit text embeddings."""

    def __init__(self, preprocess: ClipPreprocess, tokenize: Callable[[Sequence[str]], Tensor]):
        super().__init__()
        self.preprocess = preprocess
        self.tokenize = tokenize
        self._text_cache: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32, unit norm; differentiable w.r.t. ``images``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return F.normalize(self.encode_pixels(pixels).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """(B,) prompts -> (B, D) float32, unit norm, no gradient; repeated prompts come from a cache."""
        new = sorted({p for p in prompts if p not in self._text_cache})
        if new:
            if len(self._text_cache) + len(new) > _TEXT_CACHE_SIZE:
                self._text_cache.clear()
            tokens = self.tokenize(new).to(self.device)
            embeds = F.normalize(self.encode_tokens(tokens).float(), dim=-1)
            self._text_cache.update(zip(new, embeds, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    def encode_pixels(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError


class OpenClipEncoder(ClipEncoder):
    def __init__(
        self, model: nn.Module, preprocess: ClipPreprocess, tokenize: Callable[[Sequence[str]], Tensor]
    ):
        super().__init__(preprocess, tokenize)
        self.model = model

    def encode_pixels(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)


class HFClipEncoder(ClipEncoder):
    """A transformers ``CLIPModel``; ``logit_scale`` is the model's learned temperature (already exp'd)."""

    def __init__(
        self, model: nn.Module, preprocess: ClipPreprocess, tokenize: Callable[[Sequence[str]], Tensor]
    ):
        super().__init__(preprocess, tokenize)
        self.model = model

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.detach().float().exp()

    def encode_pixels(self, pixels: Tensor) -> Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        return _pooled(self.model.get_text_features(input_ids=tokens))


def _pooled(out: object) -> Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` is the projected embedding; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output  # type: ignore[attr-defined]


def register_tiny_open_clip() -> str:
    """Add the tiny config to open_clip's model registry (idempotent); returns its name."""
    open_clip_register_config(TINY_OPEN_CLIP, _TINY_OPEN_CLIP_CFG)
    return TINY_OPEN_CLIP


def load_open_clip(
    arch: str,
    checkpoint: Path | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    resize: ResizeMode | None = None,
    seed: int = 0,
    option: str = "path",
) -> OpenClipEncoder:
    """An open_clip model (``arch`` name or ``tiny``) with weights from ``checkpoint``, frozen.

    ``option`` is the spec key that named ``checkpoint``, for error messages.
    ``resize`` overrides the model's resize mode where the reward's reference transform differs (HPSv2).
    Random init (tiny, or no checkpoint) is seeded so every worker holds the same reward model.
    """
    import open_clip

    name = register_tiny_open_clip() if arch == TINY else arch
    weights = (str(checkpoint.resolve()), checkpoint.stat().st_mtime_ns) if checkpoint else ("seed", seed)
    key = (name, weights, str(device), dtype)
    model = _SHARED_OPEN_CLIP.get(key)
    if model is None:
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None, device="cpu")
        if checkpoint is not None:
            state = load_state_dict(option, checkpoint)
            if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
                state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
            load_strict(option, model, state, checkpoint)
        model = _SHARED_OPEN_CLIP[key] = _frozen(model, device, dtype)
    preprocess = _open_clip_preprocess(model.visual.preprocess_cfg, resize)
    return _frozen(OpenClipEncoder(model, preprocess, open_clip.get_tokenizer(name)), device, dtype)


def _open_clip_preprocess(cfg: dict, resize: ResizeMode | None) -> ClipPreprocess:
    """Our tensor transform for open_clip's eval ``preprocess`` (``image_transform``, torchvision rounding).

    open_clip's rare ``longest`` mode (no reward here uses it) is approximated by HPS's ``longest_pad``.
    """
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    modes: dict[str, ResizeMode] = {"shortest": "shortest", "squash": "squash", "longest": "longest_pad"}
    return ClipPreprocess(
        size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        resize=resize or modes[cfg.get("resize_mode", "shortest")],
        interpolation="bilinear"
        if cfg.get("interpolation") == "bilinear"
        else "bicubic",  # 'random': bicubic
        crop_offset="round",
    )


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip warns (root logger) that it loaded no weights; we load them ourselves right after."""
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def load_hf_clip(
    ref: str | None, *, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> HFClipEncoder:
    """A transformers ``CLIPModel`` from a local directory or hub id (``ref``), or the tiny preset if None.

    Preprocessing is the CLIP image processor's (shortest edge to the model's image size, center crop
    with floor offsets, OpenAI mean/std, bicubic), as PickScore's processor (laion/CLIP-ViT-H-14) uses.
    Prompts go through open_clip's tokenizer: the same CLIP BPE vocabulary and start/end tokens as
    transformers' CLIPTokenizer, and the causal text tower reads nothing after the end token, so the
    padding convention does not matter.
    """
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    if ref is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(CLIPConfig(**_TINY_HF_CLIP))
    else:
        try:
            model = CLIPModel.from_pretrained(ref, trust_remote_code=False)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightsError("path", f"cannot load a transformers CLIPModel from {ref}: {first}") from err
    preprocess = ClipPreprocess(size=model.config.vision_config.image_size, crop_offset="floor")
    context = model.config.text_config.max_position_embeddings
    tokenizer = open_clip.SimpleTokenizer(context_length=context)
    return _frozen(HFClipEncoder(model, preprocess, tokenizer), device, dtype)


def _frozen(module: M, device: torch.device, dtype: torch.dtype) -> M:
    return module.to(device=device, dtype=dtype).requires_grad_(False).eval()
