"""Before/after figure of the demo: the toy model's eval images, then the same prompts and seeds with each
trained adapter, side by side (the README's docs/images/demo_before_after.png).

    python -m alignprop_ray.toy.figure --adapter "uniform:0:10, lr 3e-3=ADAPTER_DIR" \
        --adapter "full, lr 3e-2=ADAPTER_DIR" --out docs/images/demo_before_after.png

ADAPTER_DIR is a trial's `adapter/` (its last Ray checkpoint, or `mlflow artifacts download -r RUN_ID -a adapter`).
Sampling matches the demo's evaluation (sweeps/demo.yaml: 10 steps of the model's scheduler, guidance 5,
eta 0, the eval seeds of the training loop), so each panel is the run's last eval grid.

Base models side by side (docs/images/toy_models.png in docs/model_families.md):

    python -m alignprop_ray.toy.figure --title "toy-shapes (sd: UNet, DDIM)" \
        --also-model "toy-shapes-sd3 (sd3: MMDiT, flow matching)=models/toy-shapes-sd3" --out docs/images/toy_models.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignprop_ray.toy import shapes

EVAL_SEED_BASE = 10_000  # alignprop_ray.train.loop: eval image j of every prompt uses seed 10_000 + j
SCALE = 2  # nearest-neighbour upscaling, so 64 px shapes read at README size


def panel(model: str, adapter: str | None, prompts: list[str], seeds: int, steps: int, guidance: float):
    """(len(prompts) * seeds, 3, H, W) images in [0, 1]: one row per prompt, one column per seed."""
    from alignprop_ray.engine.lora import load_adapter_like_diffusers
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.sampler import SamplerSettings, generate

    parts = load_parts(model)
    if adapter is not None:
        load_adapter_like_diffusers(parts.denoiser, adapter)
    settings = SamplerSettings.for_sampling(steps, guidance)
    rows = [p for p in prompts for _ in range(seeds)]
    with torch.no_grad():
        return generate(parts, rows, [EVAL_SEED_BASE + j for j in range(seeds)] * len(prompts), settings)


def compose(panels: list[tuple[str, torch.Tensor]], prompts: list[str], seeds: int):
    """A PIL image: a title over each panel's grid, prompts down the left."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    from alignprop_ray.engine.images import to_pil

    grids = [to_pil(make_grid(images, nrow=seeds, padding=2, pad_value=1.0)) for _, images in panels]
    grids = [g.resize((g.width * SCALE, g.height * SCALE), Image.Resampling.NEAREST) for g in grids]
    label_w, title_h, gap = 250, 24, 16
    width = label_w + sum(g.width for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, title_h + grids[0].height), "white")
    draw = ImageDraw.Draw(canvas)
    row_h = grids[0].height / len(prompts)
    for i, prompt in enumerate(prompts):
        draw.text((4, title_h + (i + 0.5) * row_h - 6), prompt, fill="black")
    x = label_w
    for (title, _), grid in zip(panels, grids, strict=True):
        draw.text((x + 4, 6), title, fill="black")
        canvas.paste(grid, (x, title_h))
        x += grid.width + gap
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "models" / "toy-shapes"))
    parser.add_argument("--title", default="base model", help="the --model panel's title")
    parser.add_argument("--adapter", action="append", default=[], metavar="TITLE=DIR", help="repeatable")
    parser.add_argument(
        "--also-model",
        action="append",
        default=[],
        metavar="TITLE=DIR",
        help="another base model; repeatable",
    )
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("docs/images/demo_before_after.png"))
    args = parser.parse_args(argv)
    prompts = shapes.demo_prompts()[1]
    sample = lambda model, adapter: panel(model, adapter, prompts, args.seeds, args.steps, args.guidance)  # noqa: E731
    panels = [(args.title, sample(args.model, None))]
    for spec in args.adapter:
        title, _, directory = spec.rpartition("=")
        panels.append((title, sample(args.model, directory)))
    for spec in args.also_model:
        title, _, directory = spec.rpartition("=")
        panels.append((title, sample(directory, None)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    compose(panels, prompts, args.seeds).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
