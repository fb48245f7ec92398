"""CLI handlers for the engine: `sample`, `mix`, `make-tiny-model`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignprop_ray.errors import UserError


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from alignprop_ray.engine.models import save_tiny_model

    _check_seeds(args.seed, 1)
    _check_out_dir(Path(args.dir), "dir")
    out = save_tiny_model(args.dir, seed=args.seed, family=args.family)
    print(f"wrote the tiny {args.family} pipeline (seed {args.seed}) to {out}")
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from alignprop_ray.engine.lora import mix_adapters

    _check_out_dir(Path(args.out), "--out")
    out = mix_adapters(args.adapter_a, args.adapter_b, args.alpha, args.out, method=args.method)
    print(
        f"wrote {args.alpha:g} * {args.adapter_a} + {1 - args.alpha:g} * {args.adapter_b} to {out} ({args.method})"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from alignprop_ray.engine.images import write_images
    from alignprop_ray.engine.lora import load_adapter_like_diffusers
    from alignprop_ray.engine.models import DTYPES, load_parts
    from alignprop_ray.engine.sampler import SamplerSettings, check_settings, generate

    _check_sample_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = load_parts(args.model, DTYPES[args.dtype], device, family=args.family)
    if args.adapter:
        load_adapter_like_diffusers(parts.denoiser, args.adapter)
    settings = SamplerSettings.for_sampling(args.steps, args.guidance, args.eta, args.negative_prompt)
    check_settings(parts, settings)  # before the progress bar starts: the error is then one line
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
    """--steps, --guidance, --eta and --resolution are checked by the parser (the config fields' rules)."""
    if args.n < 1:
        raise UserError(f"--n must be positive, got {args.n}")
    count = len(args.prompt) * args.n
    _check_seeds(args.seed, count)
    out = Path(args.out)
    if count == 1 or args.grid:  # one PNG at --out (engine/images.py:write_images)
        from PIL import Image

        if out.is_dir():
            raise UserError(f"--out {out} is a directory; give an image path (e.g. {out / 'image.png'})")
        if out.suffix.lower() not in Image.registered_extensions():
            raise UserError(f"--out {out}: give an image file name (.png, .jpg, ...)")
    elif out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; {count} images need a folder (or --grid)")
    _check_no_file_above(out, "--out")


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _check_seeds(seed: int, count: int) -> None:
    """`seed` .. `seed + count - 1` must all be seeds torch takes."""
    low, high = SEED_RANGE
    if not low <= seed <= high - (count - 1):
        raise UserError(f"--seed must be in [-2**63, 2**64 - {count}], got {seed}")


def _check_out_dir(path: Path, option: str) -> None:
    """An output folder must be a folder or creatable: not a file, nor below one."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a directory")
    _check_no_file_above(path, option)


def _check_no_file_above(path: Path, option: str) -> None:
    for part in path.parents:
        if part.exists():
            if not part.is_dir():
                raise UserError(f"{option} {path}: {part} is a file, not a directory")
            return
