"""TRL 0.23.1's AlignPropTrainer doing the same optimizer step as bench/step_ours.py: seconds per step, peak RSS.

    python bench/step_trl.py --pipeline DIR --steps 20 --k 10 --batch 2 --iters 8

Configured for the same work as ours: fp32 (mixed_precision="no"), LoRA r=4/alpha=4 on the attention
projections (TRL's hard-coded adapter, the same as ours), DDIM eta=0, guidance 7.5, fixed truncation
(truncated_backprop_rand=False, truncated_backprop_timestep=T-K: the last K steps carry gradient), every
UNet call checkpointed (TRL always checkpoints), the same saturation reward, AdamW lr 1e-3 / wd 1e-4,
clip 1.0, no trackers, no checkpoint saving (epoch 0), no progress bars. Timed: `trainer.step(...)` only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import warnings

import common

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_step_args(
        p,
        k_range_help="draw K per step uniformly from LOW..HIGH (LOW >= 1: TRL cannot take a step with K=0)",
        dtype_help="frozen base weights, via TRL's mixed_precision (no / fp16 / bf16)",
    )
    p.add_argument("--workdir", default=None, help="accelerate project dir (default: a temp dir)")
    return p.parse_args()


MIXED_PRECISION = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}


def build_trainer(args, workdir: str):
    """An AlignPropTrainer on `args.pipeline` doing fixed-K truncated backprop with the saturation reward."""
    from accelerate import PartialState
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    # trl 0.23.1 logs through accelerate's logger before it creates its Accelerator (when the directory has
    # no LoRA weights), which raises unless the accelerate state exists: create it first.
    PartialState()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    pipeline = DefaultDDPOStableDiffusionPipeline(args.pipeline, use_lora=True)
    config = AlignPropConfig(
        mixed_precision=MIXED_PRECISION[args.dtype],
        sample_num_steps=args.steps,
        sample_eta=0.0,
        sample_guidance_scale=args.guidance,
        train_batch_size=args.batch,
        train_gradient_accumulation_steps=1,
        truncated_backprop_rand=False,
        truncated_backprop_timestep=args.steps - args.k,
        train_learning_rate=1e-3,
        train_adam_weight_decay=1e-4,
        train_max_grad_norm=1.0,
        log_with=None,
        log_image_freq=10**9,
        save_freq=10**9,
        project_kwargs={"project_dir": workdir},
        accelerator_kwargs={"cpu": args.device == "cpu"},
    )
    prompts = itertools.cycle(common.PROMPTS)

    def reward(images, prompts, metadata):
        return common.saturation(images), {}

    trainer = AlignPropTrainer(config, reward, lambda: (next(prompts), {}), pipeline)
    pipeline.set_progress_bar_config(disable=True)
    return trainer


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    import tempfile

    import torch

    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args, args.workdir or tmp)
        unet = trainer.sd_pipeline.unet
        counter = common.UnetCallCounter(unet)
        lora = [p for p in unet.parameters() if p.requires_grad]
        memory = common.DeviceMemory(args.device)
        setup_s = time.perf_counter() - t_setup
        rss_setup = common.status_kib("VmRSS") / 1024
        memory_reset = memory.reset()
        calls, ks_drawn = [], []

        def step(i):
            k = common.draw_k(i, args.k, args.k_range)
            ks_drawn.append(k)
            trainer.config.truncated_backprop_timestep = args.steps - k  # read at every generation
            before = [p.detach().clone() for p in lora[:4]]
            counter.take()
            memory.sync()
            t0 = time.perf_counter()
            trainer.step(0, i)  # epoch 0: TRL saves a checkpoint only when epoch != 0
            memory.sync()
            seconds = time.perf_counter() - t0
            calls.append(counter.take())
            if args.dtype == "float32" and all(
                torch.equal(a, p) for a, p in zip(before, lora[:4], strict=True)
            ):
                raise RuntimeError(f"step {i}: TRL made no update")
            return seconds

        warm = common.WarmupPeak(args.device)

        try:
            times = common.time_steps(step, args.warmup, args.iters, warm.reset)
        except RuntimeError as err:
            if not common.is_oom(err):
                raise
            common.emit({"side": "trl", "config": vars(args), "oom": True}, args.out)
            return
    expected = [args.steps + k for k in ks_drawn]  # T forwards + K checkpoint recomputes
    if calls != expected:
        raise RuntimeError(f"self-check failed: {calls} UNet calls per step, expected {expected}")
    import trl

    common.emit(
        {
            "side": "trl",
            "trl_version": trl.__version__,
            "config": vars(args),
            "threads": torch.get_num_threads(),
            "setup_s": setup_s,
            "step_s": common.summary(times),
            "ks": ks_drawn,
            "unet_calls_per_step": calls,
            "rss_after_setup_mib": rss_setup,
            **warm.report(memory.report(memory_reset)),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
