"""Train a toy-shapes pipeline: a small latent diffusion model of one family, from scratch, on `shapes` scenes.

    python -m alignprop_ray.toy.train --family sd --seed 0      # `make toy-model`: models/toy-shapes
    python -m alignprop_ray.toy.train --family sd3 --seed 0     # `make toy-model FAMILY=sd3`: models/toy-shapes-sd3

Two stages, both on CPU, each seeded, the same for every family; what differs (networks, latent
normalization, conditioning, noising and target, scheduler) is the family's recipe (toy/recipes.py, toy/sd3.py):

1. VAE (AutoencoderKL, 64 px -> 16 x 16 latents; 4 channels for sd, 16 for sd3): L1 reconstruction plus a
   small KL term, on random 32 px crops (the VAE has no attention, so it is fully convolutional and crops
   teach it everything a full image would, at a quarter of the cost). Its latent scaling (and for sd3 its
   shift) is then set from the training set's latents, so the denoiser sees zero-mean unit-variance latents.
2. Denoiser and text encoder(s) trained jointly from scratch: sd, epsilon prediction on SD's DDPM schedule
   with offset noise; sd3, SD3's rectified-flow velocity loss. Captions are dropped to "" with probability
   `caption_dropout` so classifier-free guidance works. The saved weights are an exponential moving average.

Both stages use AdamW with a linear warm-up and a cosine decay, and clip the gradient norm.

The output directory is the family's diffusers pipeline (written by the family's `pipeline()`), plus
`prompts/{train,eval}.txt` for the demo, `training_log.json` (losses, wall and CPU time) and `samples.png`.
Same seed and thread count -> the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from alignprop_ray.toy import shapes
from alignprop_ray.toy.recipes import SDToy, ToyModels, ToySettings
from alignprop_ray.toy.sd3 import SD3Toy

# Each family's recipe, and where `make toy-model FAMILY=...` writes its toy.
RECIPES: dict[str, type[ToySettings]] = {"sd": SDToy, "sd3": SD3Toy}
OUTPUTS = {"sd": Path("models/toy-shapes"), "sd3": Path("models/toy-shapes-sd3")}


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (the VAE's input range)."""
    return pixels.float() / 127.5 - 1.0


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` iterations, then a cosine from the peak lr to 0 at `total`."""

    def factor(it: int) -> float:
        return min(1.0, (it + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae, pixels: torch.Tensor, settings: ToySettings, gen: torch.Generator, log) -> None:
    """Stage 1, in place: L1 reconstruction of random crops + kl_weight x the per-element KL."""
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine(opt, settings.warmup, settings.vae_iters)
    grid = 2 ** (len(settings.vae_channels) - 1)
    vae.train()
    for it in range(1, settings.vae_iters + 1):
        x = random_crops(pixels, settings.vae_batch, settings.vae_crop, grid, gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + settings.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), settings.max_grad_norm)
        opt.step()
        schedule.step()
        if it % settings.log_every == 0 or it == settings.vae_iters:
            log("vae", it, l1=l1.item(), kl=kl.item())
    vae.eval()


def random_crops(
    pixels: torch.Tensor, batch: int, crop: int, grid: int, gen: torch.Generator
) -> torch.Tensor:
    """`batch` random images, each cropped at a random offset on the latent grid (multiples of `grid` px)."""
    index = torch.randint(len(pixels), (batch,), generator=gen)
    side = pixels.shape[-1]
    cells = (side - crop) // grid + 1
    ys, xs = (torch.randint(cells, (batch,), generator=gen) * grid for _ in range(2))
    crops = [pixels[i, :, y : y + crop, x : x + crop] for i, y, x in zip(index, ys, xs, strict=True)]
    return to_unit_range(torch.stack(crops))


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of every image, unscaled (the diffusion stage multiplies by scaling_factor)."""
    chunks = [
        vae.encode(to_unit_range(pixels[i : i + batch])).latent_dist.mean
        for i in range(0, len(pixels), batch)
    ]
    return torch.cat(chunks)


def train_denoiser(
    settings: ToySettings, models: ToyModels, latents, captions, gen: torch.Generator, log
) -> ToyModels:
    """Stage 2: the denoiser and text encoders, jointly, on the recipe's loss; returns their EMA copies."""
    from alignprop_ray.engine.families.base import Conditioning

    vocabulary = sorted(set(captions)) + [""]  # the last one is the dropped caption
    tokens = settings.tokenize(models, vocabulary)
    caption_ids = torch.tensor([vocabulary.index(c) for c in captions])
    modules = torch.nn.ModuleList([models.denoiser, *models.text_encoders])
    ema = copy.deepcopy(modules).requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=settings.denoiser_lr, weight_decay=0.0)
    schedule = warmup_cosine(opt, settings.warmup, settings.denoiser_iters)
    family = settings.pipeline_family
    modules.train()
    with settings.training(models.denoiser):
        for it in range(1, settings.denoiser_iters + 1):
            index = torch.randint(len(latents), (settings.denoiser_batch,), generator=gen)
            dropped = torch.rand(settings.denoiser_batch, generator=gen) < settings.caption_dropout
            ids = torch.where(dropped, len(vocabulary) - 1, caption_ids[index])
            noisy, t, target = settings.noise(latents[index], gen)
            cond = settings.condition(models, [ids_of[ids] for ids_of in tokens])
            pred = family.denoise(models.denoiser, noisy, t, Conditioning(cond.tensors, guided=False))
            loss = F.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(modules.parameters(), settings.max_grad_norm)
            opt.step()
            schedule.step()
            with torch.no_grad():
                # Warm-up as diffusers' EMAModel: early on, average over the iterations so far, not over init.
                decay = min(settings.ema_decay, (1 + it) / (10 + it))
                torch._foreach_lerp_(list(ema.parameters()), list(modules.parameters()), 1 - decay)
            if it % settings.log_every == 0 or it == settings.denoiser_iters:
                log(family.denoiser_name, it, mse=loss.item())
    denoiser, *text_encoders = (module.eval() for module in ema)
    return ToyModels(models.tokenizers, text_encoders, denoiser, models.vae)


def write_prompts(out: Path) -> None:
    train, evaluation = shapes.demo_prompts()
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    header = "# Captions of the toy-shapes grammar (alignprop_ray/toy/shapes.py); {} for the demo.\n"
    (folder / "train.txt").write_text(header.format("AlignProp training prompts") + "\n".join(train) + "\n")
    (folder / "eval.txt").write_text(header.format("held-out eval prompts") + "\n".join(evaluation) + "\n")


def sample_grid(model: Path, prompts: list[str], seeds: int, path: Path) -> None:
    """The saved pipeline as the engine loads it: one row per prompt, one column per seed, 20 steps of its
    scheduler, guidance 5."""
    from torchvision.utils import save_image

    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.sampler import SamplerSettings, generate

    parts = load_parts(str(model))
    settings = SamplerSettings.for_sampling(steps=20, guidance_scale=5.0)
    rows = [p for p in prompts for _ in range(seeds)]
    images = generate(parts, rows, list(range(seeds)) * len(prompts), settings)
    save_image(images, path, nrow=seeds, padding=2)


def train(out: Path, seed: int, settings: ToySettings) -> dict:
    """Both stages, then write the pipeline, prompts, log and sample grid into `out`; the log as a dict.

    The log keeps wall seconds and this process's CPU seconds (on a shared box the CPU time is the cost)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    history: list[dict] = []

    def clocks() -> dict:
        return {
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
        }

    def log(stage: str, it: int, **values: float) -> None:
        entry = {"stage": stage, "iter": it, **clocks(), **values}
        history.append(entry)
        print(
            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
            flush=True,
        )

    gen = torch.Generator().manual_seed(seed)
    pixels, captions = shapes.make_dataset(settings.images, seed, settings.resolution)
    models = settings.build(seed)
    train_vae(models.vae, pixels, settings, gen, log)
    latents = settings.normalize_latents(models.vae, encode_latents(models.vae, pixels))
    vae_clocks = clocks()
    models = train_denoiser(settings, models, latents, captions, gen, log)
    out.mkdir(parents=True, exist_ok=True)
    parts = settings.parts(models)
    parts.family.pipeline(parts).save_pretrained(out, safe_serialization=True)
    write_prompts(out)
    named = [("vae", models.vae), (parts.family.denoiser_name, models.denoiser)]
    named += [(f"text_encoder{f'_{i + 1}' if i else ''}", m) for i, m in enumerate(models.text_encoders)]
    summary = {
        "family": settings.family,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": asdict(settings),
        "parameters": {name: count(m) for name, m in named},
        "vae_scaling_factor": models.vae.config.scaling_factor,
        "vae_shift_factor": models.vae.config.shift_factor,
        "seconds": {"vae": vae_clocks["seconds"], "total": clocks()["seconds"]},
        "cpu_seconds": {"vae": vae_clocks["cpu_seconds"], "total": clocks()["cpu_seconds"]},
        "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    sample_grid(out, shapes.demo_prompts()[1], 6, out / "samples.png")
    return summary


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(RECIPES), default="sd")
    parser.add_argument(
        "--out", type=Path, help="default: models/toy-shapes (sd), models/toy-shapes-sd3 (sd3)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (part of what fixes the weights)"
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long run of tiny models (tests)")
    parser.add_argument("--vae-iters", type=int)
    parser.add_argument("--denoiser-iters", type=int)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = RECIPES[args.family]()
    settings = settings.tiny() if args.tiny else settings
    overrides = {"vae_iters": args.vae_iters, "denoiser_iters": args.denoiser_iters}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or OUTPUTS[args.family]
    summary = train(out, args.seed, settings)
    print(f"wrote {out} in {summary['cpu_seconds']['total']:.0f} CPU s ({summary['parameters']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
