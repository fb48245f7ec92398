"""Offline rewards: image statistics that need no weights, computed in float32 on the images' device.

They are cheap, deterministic objectives for smoke tests and real objectives of their own (the paper's
compressibility experiments). All but ``jpeg_compressibility`` are differentiable; pure pixel statistics
are easy to hack (noise raises sharpness, a flat image maximizes compressibility), which is why the
diversity metrics exist.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from alignprop_ray.rewards.base import Reward, luma
from alignprop_ray.rewards.options import RewardTerm

JPEG_QUALITY = 95  # DDPO's JPEG-size reward uses quality 95; the surrogate uses the same tables

# ITU T.81 Annex K example quantization tables (quality 50), one row of 8 per vertical frequency v.
# fmt: off
_LUMA_Q50 = [
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
]
_CHROMA_Q50 = [
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    *[99] * 32,
]
# fmt: on


class Saturation(Reward):
    """Mean chroma, max(R, G, B) - min(R, G, B), in [0, 1]: vivid colors score high, grays score 0.

    Chroma rather than HSV saturation ((max - min) / max) because the latter's gradient explodes on
    near-black pixels.
    """

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        x = images.float()
        return (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2))


class Contrast(Reward):
    """Standard deviation of luma over the image, in [0, 0.5]: global tonal contrast."""

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return luma(images.float()).flatten(1).std(dim=1)


class Sharpness(Reward):
    """Mean absolute Laplacian of luma (3x3 kernel, interior pixels): local edge energy. Noise also scores."""

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        y = luma(images.float()).unsqueeze(1)
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=y.device)
        return F.conv2d(y, kernel.view(1, 1, 3, 3)).abs().mean(dim=(1, 2, 3))


class CompressibilitySurrogate(Reward):
    """Differentiable stand-in for JPEG size: minus the estimated bits per AC coefficient, higher = smaller file.

    JPEG spends bits on the nonzero quantized AC coefficients of 8x8 block DCTs, roughly log2 of their
    magnitude. We compute ``-mean(log2(1 + |C / Q|))`` over the AC coefficients of Y (full resolution)
    and of Cb, Cr (2x2-averaged, as 4:2:0 subsampling), with C the orthonormal block DCT of values in
    0..255 (JPEG's DCT) and Q the quality-95 tables. It ranks images like ``jpeg_compressibility``.
    """

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        ycc = _ycbcr(images.float()) * 255.0
        luma_q, chroma_q = (_quant_table_cpu(t).to(images.device) for t in ("luma", "chroma"))
        chroma = F.avg_pool2d(ycc[:, 1:], 2) if min(ycc.shape[-2:]) >= 16 else ycc[:, 1:]
        bits_y = _ac_bits(ycc[:, :1], luma_q)
        bits_c = _ac_bits(chroma, chroma_q)
        n_y, n_c = ycc[:, :1].numel(), chroma.numel()  # weigh the channels by their coefficient counts
        return -(bits_y * n_y + bits_c * n_c) / (n_y + n_c)


class JpegCompressibility(Reward):
    """Minus the JPEG file size in kB at quality 95 (DDPO's compressibility reward). Not differentiable."""

    differentiable = False

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        sizes = [_jpeg_bytes(p.permute(1, 2, 0).cpu().numpy()) / 1000.0 for p in pixels]
        return -torch.tensor(sizes, device=images.device, dtype=torch.float32)


def _jpeg_bytes(hwc: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(hwc).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell()


def _ycbcr(images: Tensor) -> Tensor:
    """RGB in [0, 1] -> JFIF YCbCr in [0, 1] (chroma centered at 0.5), (B, 3, H, W)."""
    m = torch.tensor(
        [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
        device=images.device,
    )
    offset = torch.tensor([0.0, 0.5, 0.5], device=images.device).view(1, 3, 1, 1)
    return torch.einsum("oc,bchw->bohw", m, images) + offset


@cache
def _dct_matrix_cpu() -> Tensor:
    """Orthonormal 8-point DCT-II matrix D, so a block's 2-D DCT is D @ X @ D.T (equal to JPEG's FDCT)."""
    k = torch.arange(8).view(8, 1).double()
    n = torch.arange(8).view(1, 8).double()
    d = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.float()


@cache
def _quant_table_cpu(kind: str) -> Tensor:
    """libjpeg's quality scaling of the Annex K table: scale = 200 - 2 q for q >= 50, steps clipped to >= 1."""
    base = torch.tensor(_LUMA_Q50 if kind == "luma" else _CHROMA_Q50, dtype=torch.float32).view(8, 8)
    scale = 200 - 2 * JPEG_QUALITY
    return ((base * scale + 50) // 100).clamp(min=1)


def _ac_bits(channels: Tensor, q: Tensor) -> Tensor:
    """Mean log2(1 + |C / Q|) over AC coefficients of the 8x8 blocks of (B, C, H, W) -> (B,).

    Edges are padded by replication to a multiple of 8, as JPEG encoders do.
    """
    h, w = channels.shape[-2:]
    x = F.pad(channels, (0, -w % 8, 0, -h % 8), mode="replicate") - 128.0
    b, c, hp, wp = x.shape
    blocks = x.view(b, c, hp // 8, 8, wp // 8, 8).permute(0, 1, 2, 4, 3, 5)  # (..., 8 rows, 8 cols)
    d = _dct_matrix_cpu().to(x.device)
    coeffs = d @ blocks @ d.T
    bits = torch.log2(1.0 + (coeffs / q).abs()).flatten(-2)[..., 1:]  # drop DC: it is coded differentially
    return bits.mean(dim=tuple(range(1, bits.ndim)))


# The factories, by the names alignprop_ray/rewards/registry.py gives them.
def saturation(term: RewardTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    return Saturation()


def contrast(term: RewardTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    return Contrast()


def sharpness(term: RewardTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    return Sharpness()


def compressibility(term: RewardTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    return CompressibilitySurrogate()


def jpeg_compressibility(term: RewardTerm, *, device: torch.device, dtype: torch.dtype) -> Reward:
    return JpegCompressibility()
