"""Train the toy-shapes pipeline: a small Stable-Diffusion-shaped latent diffusion model on `shapes` scenes.

    python -m alignprop_ray.toy.train --out models/toy-shapes --seed 0       # `make toy-model`

Two stages, both on CPU, each seeded:

1. VAE (AutoencoderKL, 64 px -> 16 x 16 x 4 latents): L1 reconstruction plus a small KL term, on random
   32 px crops (the VAE has no attention, so it is fully convolutional and crops teach it everything a full
   image would, at a quarter of the cost). Its `scaling_factor` is then set to 1 / std of the latents, as
   SD's 0.18215 was, so the diffusion model sees unit-variance latents.
2. UNet (UNet2DConditionModel with cross-attention) and text encoder (a 2-layer CLIPTextModel over the real
   CLIP tokenizer) trained jointly from scratch: epsilon prediction on SD's DDPM schedule with offset
   noise (see `ToySettings.offset_noise`), captions dropped to "" with probability `caption_dropout` so
   classifier-free guidance works. The saved weights are an exponential moving average of the trained ones.

Both stages use AdamW with a linear warm-up and a cosine decay, and clip the gradient norm.

The output directory is a diffusers `StableDiffusionPipeline` (DDIM scheduler with SD's schedule), plus
`prompts/{train,eval}.txt` for the demo, `training_log.json` (losses, wall time) and `samples.png`.
Same seed and thread count -> the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from alignprop_ray.engine.models import SD_SCHEDULE, clip_tokenizer, seeded
from alignprop_ray.toy import shapes


@dataclass(frozen=True)
class ToySettings:
    """Model sizes and optimization of both stages. Iterations were sized to the 2-core CPU box."""

    resolution: int = 64
    images: int = 20_000  # fixed training set: ~120 images per caption
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: 64 px -> 16 x 16 latents
    vae_iters: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3  # peak; both stages warm up linearly, then decay on a cosine to 0
    kl_weight: float = 1e-4  # per-element KL vs per-pixel L1: latents stay smooth, reconstructions sharp
    unet_channels: tuple[int, ...] = (32, 64, 64)  # 16 -> 8 -> 4; no attention at 16 x 16 (too costly)
    text_width: int = 32  # CLIP hidden size = UNet cross_attention_dim
    unet_iters: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # SD's 10%: the unconditional branch of guidance
    # Offset noise (a per-image, per-channel constant added to the noise). SD's schedule leaves signal at
    # the first DDIM step (sqrt(alpha_bar) = 0.12 at t = 901), and in these flat scenes the latents'
    # channel means (the background colour) vary across images by up to 1.35: without the offset the model
    # reads the background from the mean of the starting noise and ignores the prompt's background word
    # (measured). 0.3 buries that leak under noise the model cannot tell from it.
    offset_noise: float = 0.3
    max_grad_norm: float = 1.0
    log_every: int = 100


# For the test that keeps this script working: same code path, minutes -> a second.
TINY_SETTINGS = ToySettings(
    resolution=32,
    images=16,
    vae_channels=(8, 8),
    vae_iters=2,
    vae_batch=4,
    vae_crop=16,
    unet_channels=(16, 16),
    text_width=16,
    unet_iters=2,
    unet_batch=4,
    warmup=1,
    log_every=1,
)


def build_models(settings: ToySettings, seed: int):
    """Random-init VAE, UNet and CLIP text encoder (deterministic in `seed`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(settings.unet_channels)
    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=settings.vae_channels,
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * len(settings.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(settings.vae_channels),
            norm_num_groups=8,
            sample_size=settings.resolution,
            mid_block_add_attention=False,
        )
        unet = UNet2DConditionModel(
            sample_size=settings.resolution // 2 ** (len(settings.vae_channels) - 1),
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=settings.unet_channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            cross_attention_dim=settings.text_width,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=settings.text_width,
                intermediate_size=4 * settings.text_width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                vocab_size=49408,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                projection_dim=settings.text_width,
            )
        )
    return vae, unet, text_encoder


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


def train_unet(
    unet, text_encoder, tokenizer, latents, captions, settings: ToySettings, gen: torch.Generator, log
):
    """Epsilon-prediction training of UNet + text encoder; returns their EMA copies."""
    import copy

    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"})
    vocabulary = sorted(set(captions)) + [""]  # the last one is the dropped caption
    tokens = tokenizer(
        vocabulary,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    caption_ids = torch.tensor([vocabulary.index(c) for c in captions])
    modules = torch.nn.ModuleList([unet, text_encoder])
    ema = copy.deepcopy(modules).requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=settings.unet_lr, weight_decay=0.0)
    schedule = warmup_cosine(opt, settings.warmup, settings.unet_iters)
    modules.train()
    for it in range(1, settings.unet_iters + 1):
        index = torch.randint(len(latents), (settings.unet_batch,), generator=gen)
        dropped = torch.rand(settings.unet_batch, generator=gen) < settings.caption_dropout
        ids = torch.where(dropped, len(vocabulary) - 1, caption_ids[index])
        x0 = latents[index]
        offset = torch.randn(*x0.shape[:2], 1, 1, generator=gen)
        noise = torch.randn(x0.shape, generator=gen) + settings.offset_noise * offset
        t = torch.randint(noise_schedule.config.num_train_timesteps, (settings.unet_batch,), generator=gen)
        cond = text_encoder(tokens[ids])[0]
        pred = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), settings.max_grad_norm)
        opt.step()
        schedule.step()
        with torch.no_grad():
            # Warm-up as diffusers' EMAModel: early on, average over the iterations so far, not over init.
            decay = min(settings.ema_decay, (1 + it) / (10 + it))
            torch._foreach_lerp_(list(ema.parameters()), list(modules.parameters()), 1 - decay)
        if it % settings.log_every == 0 or it == settings.unet_iters:
            log("unet", it, mse=loss.item())
    ema_unet, ema_text = ema
    return ema_unet.eval(), ema_text.eval()


def save_pipeline(vae, unet, text_encoder, out: Path) -> None:
    """A diffusers StableDiffusionPipeline directory: the real CLIP tokenizer and SD's DDIM schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out, safe_serialization=True)


def write_prompts(out: Path) -> None:
    train, evaluation = shapes.demo_prompts()
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    header = "# Captions of the toy-shapes grammar (alignprop_ray/toy/shapes.py); {} for the demo.\n"
    (folder / "train.txt").write_text(header.format("AlignProp training prompts") + "\n".join(train) + "\n")
    (folder / "eval.txt").write_text(header.format("held-out eval prompts") + "\n".join(evaluation) + "\n")


def sample_grid(model: Path, prompts: list[str], seeds: int, path: Path) -> None:
    """The saved pipeline as the engine loads it: one row per prompt, one column per seed, 20 DDIM steps."""
    from torchvision.utils import save_image

    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.sampler import SamplerSettings, generate

    parts = load_parts(str(model))
    settings = SamplerSettings.for_sampling(steps=20, guidance_scale=5.0)
    rows = [p for p in prompts for _ in range(seeds)]
    images = generate(parts, rows, list(range(seeds)) * len(prompts), settings)
    save_image(images, path, nrow=seeds, padding=2)


def train(out: Path, seed: int, settings: ToySettings) -> dict:
    """Both stages, then write the pipeline, prompts, log and sample grid into `out`; the log as a dict."""
    started = time.perf_counter()
    history: list[dict] = []

    def log(stage: str, it: int, **values: float) -> None:
        entry = {"stage": stage, "iter": it, "seconds": round(time.perf_counter() - started, 1), **values}
        history.append(entry)
        print(
            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
            flush=True,
        )

    gen = torch.Generator().manual_seed(seed)
    pixels, captions = shapes.make_dataset(settings.images, seed, settings.resolution)
    vae, unet, text_encoder = build_models(settings, seed)
    train_vae(vae, pixels, settings, gen, log)
    latents = encode_latents(vae, pixels)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    vae_seconds = time.perf_counter() - started
    unet, text_encoder = train_unet(
        unet, text_encoder, clip_tokenizer(), latents, captions, settings, gen, log
    )
    out.mkdir(parents=True, exist_ok=True)
    save_pipeline(vae, unet, text_encoder, out)
    write_prompts(out)
    summary = {
        "seed": seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": asdict(settings),
        "parameters": {
            name: count(m) for name, m in [("vae", vae), ("unet", unet), ("text_encoder", text_encoder)]
        },
        "vae_scaling_factor": vae.config.scaling_factor,
        "seconds": {"vae": round(vae_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    sample_grid(out, shapes.demo_prompts()[1], 6, out / "samples.png")
    return summary


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/toy-shapes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (part of what fixes the weights)"
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long run of tiny models (tests)")
    parser.add_argument("--vae-iters", type=int)
    parser.add_argument("--unet-iters", type=int)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = TINY_SETTINGS if args.tiny else ToySettings()
    overrides = {"vae_iters": args.vae_iters, "unet_iters": args.unet_iters}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    summary = train(args.out, args.seed, settings)
    print(f"wrote {args.out} in {summary['seconds']['total']:.0f} s ({summary['parameters']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
