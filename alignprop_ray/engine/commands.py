"""CLI handlers for the engine: `sample`, `mix`, `make-tiny-model`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignprop_ray.errors import UserError


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from alignprop_ray.engine.models import save_tiny_model

    out = save_tiny_model(args.dir, seed=args.seed)
    print(f"wrote the tiny pipeline (seed {args.seed}) to {out}")
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from alignprop_ray.engine.lora import mix_adapters

    out = mix_adapters(args.adapter_a, args.adapter_b, args.alpha, args.out, method=args.method)
    print(
        f"wrote {args.alpha:g} * {args.adapter_a} + {1 - args.alpha:g} * {args.adapter_b} to {out} ({args.method})"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from alignprop_ray.engine.lora import load_adapter_like_diffusers
    from alignprop_ray.engine.models import DTYPES, load_parts
    from alignprop_ray.engine.sampler import SamplerSettings, generate

    _check_sample_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = load_parts(args.model, DTYPES[args.dtype], device)
    if args.adapter:
        load_adapter_like_diffusers(parts.unet, args.adapter)
    settings = SamplerSettings(
        steps=args.steps, guidance_scale=args.guidance, eta=args.eta, negative_prompt=args.negative_prompt
    )
    prompts = [p for p in args.prompt for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(prompts))]
    images = []
    with tqdm(total=len(prompts) * args.steps, desc="sampling", unit="step") as bar:
        for prompt, seed in zip(prompts, seeds, strict=True):
            images.append(
                generate(
                    parts,
                    [prompt],
                    [seed],
                    settings,
                    resolution=args.resolution,
                    on_step=lambda _: bar.update(),
                )
            )
    for path in write_images(torch.cat(images), args.out, grid=args.grid, nrow=args.n):
        print(path)
    return 0


def _check_sample_args(args: argparse.Namespace) -> None:
    checks = {
        "--steps": args.steps >= 1,
        "--n": args.n >= 1,
        "--eta": args.eta >= 0,
        "--resolution": args.resolution is None or (args.resolution > 0 and args.resolution % 8 == 0),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        value = getattr(args, bad[0].lstrip("-"))
        rule = (
            "a positive multiple of 8"
            if bad[0] == "--resolution"
            else "positive"
            if bad[0] != "--eta"
            else ">= 0"
        )
        raise UserError(f"{bad[0]} must be {rule}, got {value}")


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
