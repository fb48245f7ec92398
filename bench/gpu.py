"""GPU section: the SD 1.5 architecture (random weights) at 512 px, T=50, K ~ U{1..50}, ours vs TRL.

    python bench/gpu.py --workdir DIR [--out FILE]      # needs CUDA; otherwise reports "not run"
    python bench/gpu.py --workdir DIR --smoke           # the same code path on CPU with the tiny model

Writes a random-init Stable Diffusion 1.5-shaped diffusers directory (UNet 860M, VAE, CLIP ViT-L text
encoder: time and memory do not depend on the weights), then, alternating the two sides, each in a fresh
process: the largest batch that fits with K=50 (the worst case) by doubling, and s/step, images/s and peak
GPU memory at batch 1 and at that batch. fp16 base weights, fp32 LoRA on both sides. K=0 is left out of
the range because TRL cannot take a step without gradient. Where --trl-python cannot import trl, only our
side runs and the result says so (`trl`). `make gpu-check` (bench/gpu_check.py) runs a shorter version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_RUN = "not run: no GPU on this machine"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="where the random SD 1.5 directory and results go")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, small sizes: checks the code path")
    p.add_argument("--trl-python", default=sys.executable, help="interpreter that has trl 0.23.1")
    p.add_argument("--reps", type=int, default=2, help="alternating runs per side and batch")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the doubling tries (--smoke: 2)")
    p.add_argument("--out", default=None)
    return p.parse_args()


def write_sd15_random(directory: Path) -> Path:
    """A StableDiffusionPipeline directory with SD 1.5's architecture and random weights (fp16 on disk)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from alignprop_ray.engine.families.registry import SD_SCHEDULE
    from alignprop_ray.engine.families.sd import sd_pipeline
    from alignprop_ray.engine.families.tiny import clip_text_config, clip_tokenizer

    if (directory / "model_index.json").is_file():
        return directory
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is much faster on a GPU
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        # CLIP ViT-L/14's text tower (SD 1.5's text encoder)
        text = CLIPTextModel(clip_text_config(768, layers=12, heads=12, intermediate=3072))
    pipe = sd_pipeline(clip_tokenizer(), text, unet, vae, DDIMScheduler(**SD_SCHEDULE))
    pipe.to(torch.float16).save_pretrained(directory, safe_serialization=True)
    return directory


def run_side(
    side: str,
    args,
    pipeline: Path,
    batch: int,
    *,
    k_fixed: int | None,
    iters: int,
    warmup: int,
    shape: dict,
    k_low: int = 1,
    extra: tuple[str, ...] = (),
) -> dict:
    """One fresh process of `side` (ours: step_ours.py, trl: step_trl.py): `iters` timed optimizer steps
    after `warmup`, with K fixed or drawn from k_low..T per step (`extra`: more options of the script); its
    JSON, or {"oom": True}."""
    script = HERE / ("step_ours.py" if side == "ours" else "step_trl.py")
    python = sys.executable if side == "ours" else args.trl_python
    cmd = [
        python,
        str(script),
        "--pipeline",
        str(pipeline),
        "--steps",
        str(shape["steps"]),
        "--batch",
        str(batch),
        "--device",
        shape["device"],
        "--dtype",
        shape["dtype"],
        "--iters",
        str(iters),
        "--warmup",
        str(warmup),
        "--threads",
        str(shape["threads"]),
    ]
    if side == "ours":
        cmd += ["--resolution", str(shape["resolution"])]
    cmd += ["--k", str(k_fixed)] if k_fixed is not None else ["--k-range", str(k_low), str(shape["steps"])]
    cmd += extra
    k = k_fixed if k_fixed is not None else f"{k_low}-{shape['steps']}"
    out = Path(args.workdir) / f"gpu-{side}-{batch}-{k}.json"
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if "out of memory" in proc.stderr.lower():
            return {"side": side, "batch": batch, "oom": True}
        raise RuntimeError(f"{side} batch {batch} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    out.write_text(json.dumps(result, indent=1))
    return {"batch": batch, **result}


def largest_batch(side: str, args, pipeline: Path, shape: dict) -> int:
    """Double the batch with K=T (the most memory) until a step runs out of memory."""
    best, batch = 0, 1
    while batch <= shape["max_batch"]:
        if run_side(side, args, pipeline, batch, k_fixed=shape["steps"], iters=1, warmup=0, shape=shape).get(
            "oom"
        ):
            break
        best, batch = batch, batch * 2
    return best


def trl_missing(python: str) -> str | None:
    """Why TRL's side cannot run with `python` (it cannot import trl), or None if it can."""
    if subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0:
        return None
    return f"not run: {python} cannot import trl (pip install -e '.[bench]')"


def main() -> None:
    args = parse_args()
    import torch

    sys.path.insert(0, str(HERE))
    import common

    if not torch.cuda.is_available() and not args.smoke:
        common.emit({"skipped": NOT_RUN}, args.out)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from alignprop_ray.engine.models import save_tiny_model

        pipeline = workdir / "tiny"
        if not (pipeline / "model_index.json").is_file():
            save_tiny_model(pipeline)
        shape = {
            "steps": 4,
            "resolution": 64,
            "device": "cpu",
            "dtype": "float32",
            "threads": 1,
            "max_batch": min(args.max_batch, 2),
        }
    else:
        pipeline = write_sd15_random(workdir / "sd15-random")
        shape = {
            "steps": 50,
            "resolution": 512,
            "device": "cuda",
            "dtype": "float16",
            "threads": 4,
            "max_batch": args.max_batch,
        }
    trl_note = trl_missing(args.trl_python)
    sides = ("ours",) if trl_note else ("ours", "trl")
    largest = {side: largest_batch(side, args, pipeline, shape) for side in sides}
    batches = sorted({1, *(b for b in largest.values() if b > 0)})
    runs = []
    for batch in batches:
        for _ in range(args.reps):
            for side in sides:
                if batch > largest[side]:
                    continue
                runs.append(
                    run_side(side, args, pipeline, batch, k_fixed=None, iters=3, warmup=1, shape=shape)
                )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke test)"
    common.emit(
        {
            "device": device,
            "shape": shape,
            "largest_batch": largest,
            "runs": runs,
            "torch_cuda": torch.version.cuda,
            "smoke": args.smoke,
            **({"trl": trl_note} if trl_note else {}),
        },
        args.out,
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
