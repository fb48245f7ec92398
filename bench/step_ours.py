"""alignprop_ray's optimizer step on a diffusers pipeline directory: seconds per step, peak RSS, and optionally
the compute floor (a no-grad generation of the same batch) or a per-phase breakdown of one step.

    python bench/step_ours.py --pipeline DIR --steps 20 --k 10 --batch 2 --iters 8 [--floor | --phases]

One process measures one configuration (peak RSS is per process). Prints or writes one JSON object.
"""

from __future__ import annotations

import argparse
import os
import time
import types

import common

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_step_args(
        p,
        k_range_help="draw K per step uniformly from LOW..HIGH instead (the same draws as step_trl.py)",
        dtype_help="frozen base weights (LoRA stays fp32)",
    )
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--no-checkpoint", action="store_true", help="keep every UNet activation of the K steps")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="experiment: UNet and VAE weights in channels_last (not what the engine does today)",
    )
    p.add_argument(
        "--compile", action="store_true", help="model.compile: the UNet's forward through torch.compile"
    )
    p.add_argument(
        "--activation-budget-mb",
        default=None,
        help="model.activation_budget_mb: MiB (or auto) for the activations of the last gradient calls",
    )
    p.add_argument("--floor", action="store_true", help="also time a no-grad generation before each step")
    p.add_argument("--phases", action="store_true", help="break the timed steps down into phases")
    p.add_argument("--profile", action="store_true", help="torch.profiler over the last timed step: top ops")
    return p.parse_args()


def budget_setting(value: str | None) -> float | str | None:
    return value if value in (None, "auto") else float(value)


def reward_fn(images, prompts):
    value = common.saturation(images)
    return types.SimpleNamespace(total=value, terms={"saturation": value})


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    import torch

    from alignprop_ray.engine import sampler as sampler_module
    from alignprop_ray.engine.lora import LoraSettings, attach_lora
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.sampler import SamplerSettings, generate, kept_calls
    from alignprop_ray.engine.step import Learner, OptimSettings, plan_step
    from alignprop_ray.engine.truncation import Truncation

    t_setup = time.perf_counter()
    parts = load_parts(args.pipeline, getattr(torch, args.dtype), args.device)
    if args.channels_last:
        parts.denoiser.to(memory_format=torch.channels_last)
        parts.vae.to(memory_format=torch.channels_last)
    lora = LoraSettings(
        rank=4, alpha=4.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"), init="gaussian"
    )
    params = attach_lora(parts.denoiser, lora, seed=0)
    sampler = SamplerSettings(
        steps=args.steps,
        guidance_scale=args.guidance,
        eta=0.0,
        negative_prompt="",
        checkpoint=not args.no_checkpoint,
        compile=args.compile,
        activation_budget_mb=budget_setting(args.activation_budget_mb),
    )
    # lr/weight decay/clipping/betas as TRL's AlignPropConfig defaults: both sides run the same optimizer.
    # TRL's loss is `10 - mean(reward)`, unscaled: loss_scale 1 gives the very same gradients.
    optim = OptimSettings(
        lr=1e-3,
        weight_decay=1e-4,
        loss_scale=1.0,
        max_grad_norm=1.0,
        betas=(0.9, 0.999),
        eps=1e-8,
        schedule="constant",
        warmup_steps=0,
        total_steps=args.iters,
    )
    learner = Learner(parts, params, reward_fn, sampler, optim, resolution=args.resolution)
    counter = common.UnetCallCounter(parts.denoiser)
    memory = common.DeviceMemory(args.device)
    setup_s = time.perf_counter() - t_setup
    rss_setup = common.status_kib("VmRSS") / 1024
    memory_reset = memory.reset()
    floor_times, calls, phases, ks_drawn, top_ops, all_times = [], [], [], [], [], []
    timer = PhaseTimer(learner, parts) if args.phases else None

    def step(i):
        ks = [common.draw_k(i, args.k, args.k_range)]
        ks_drawn.append(ks[0])
        # prompts and noise seeds from the engine's planner; K as drawn above (the truncation passed is unused)
        batches, _ = plan_step(
            common.PROMPTS,
            Truncation("fixed", k=ks[0]),
            args.steps,
            step=i,
            seed=0,
            batch_size=args.batch,
            grad_accum=1,
        )
        if args.floor:
            memory.sync()
            t0 = time.perf_counter()
            with torch.no_grad(), learner.autocast():
                generate(
                    parts, batches[0].prompts, batches[0].seeds, sampler, k=0, resolution=args.resolution
                )
            memory.sync()
            floor_times.append(time.perf_counter() - t0)
        counter.take()
        memory.sync()
        t0 = time.perf_counter()
        profiler = None
        if args.profile and i == args.warmup + args.iters - 1:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        if timer:
            timer.start()
            # Non-reentrant checkpointing stops a recompute as soon as it has what backward needs, which
            # skips the UNet's forward hook; recompute whole calls here so the recompute can be timed.
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                result = learner.train_step(batches, ks)
        else:
            result = learner.train_step(batches, ks)
        memory.sync()
        seconds = time.perf_counter() - t0
        if profiler is not None:
            profiler.__exit__(None, None, None)
            top_ops.extend(top_operators(profiler))
        if timer:
            phases.append(timer.stop())
        calls.append(counter.take())
        all_times.append(seconds)
        # fp16 loss scaling may skip a step by design, and K=0 has no gradient to apply
        if not result.updated and ks[0] > 0 and not learner.scaler.is_enabled():
            raise RuntimeError(f"step {i} made no update (nonfinite={result.nonfinite})")
        return seconds

    warm = common.WarmupPeak(args.device)

    try:
        times = common.time_steps(step, args.warmup, args.iters, warm.reset)
    except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
        if not common.is_oom(err):
            raise
        common.emit({"side": "ours", "config": vars(args), "oom": True}, args.out)
        return
    # T forwards, plus a recompute in backward for each checkpointed call (K of them, or without
    # checkpointing none; with a budget the last `kept` calls keep their activations), plus the budget's
    # one probe call in the first step.
    probed = next(iter(sampler_module._PROBES.get(parts.denoiser, {}).values()), None)
    kept = [kept_calls(k, sampler, probed) for k in ks_drawn]
    expected = [
        args.steps + (0 if args.no_checkpoint else k - m) + (i == 0 and probed is not None)
        for i, (k, m) in enumerate(zip(ks_drawn, kept, strict=True))
    ]
    if calls != expected:
        raise RuntimeError(f"self-check failed: {calls} UNet calls per step, expected {expected}")
    result = {
        "side": "ours",
        "config": vars(args),
        "threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "step_s": common.summary(times),
        "ks": ks_drawn,
        "unet_calls_per_step": calls,
        "kept_calls": kept,
        "probe_call_mib": probed.call_bytes / 2**20 if probed else None,
        "first_step_s": all_times[0],
        "warmup_s": all_times[: args.warmup],
        "rss_after_setup_mib": rss_setup,
        **warm.report(memory.report(memory_reset)),
        "latent_size": (args.resolution or parts.native_resolution) // parts.vae_scale_factor,
    }
    if args.floor:
        result["floor_gen_s"] = common.summary(floor_times[args.warmup :])
    if timer:
        result["phases_s"] = PhaseTimer.average(phases[args.warmup :])
    if top_ops:
        result["profile_top_ops"] = top_ops
    common.emit(result, args.out)


def top_operators(profiler, n: int = 12) -> list[dict]:
    """The operators with the most self CPU time in the profiled step (a profiled step runs a little slower)."""
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:n]
    ]


class PhaseTimer:
    """Splits learner.train_step into phases by timing hooks; the engine itself is not modified.

    UNet calls are told apart by grad mode and by whether they run inside the backward pass (the
    checkpoint recompute); the VAE decoder by a hook on its forward; reward, backward and the optimizer
    (gradient clipping + AdamW) by wrapping the learner's methods on this instance.
    """

    def __init__(self, learner, parts):
        self.learner, self.in_backward = learner, False
        self.acc: dict[str, float] = {}
        self._t: dict[str, float] = {}
        for name, module in (("unet", parts.denoiser), ("decode", parts.vae.decoder)):
            module.register_forward_pre_hook(self._pre(name))
            module.register_forward_hook(self._post(name))
        learner.reward = self._wrap("reward", learner.reward)
        learner._backward = self._wrap("backward", learner._backward, backward=True)
        learner._finish_step = self._wrap("optimizer", learner._finish_step)

    def _pre(self, name):
        def hook(module, args):
            self._t[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            import torch

            seconds = time.perf_counter() - self._t.pop(name)
            if name == "unet":
                if self.in_backward:
                    phase = "backward: UNet recompute (K calls)"
                elif torch.is_grad_enabled():
                    phase = "sampling: UNet, gradient tail (K calls, checkpointed)"
                else:
                    phase = "sampling: UNet, no-grad prefix (T-K calls)"
            elif self.in_backward:
                phase = "backward: VAE decoder recompute"
            else:
                phase = "sampling: VAE decode"
            self.acc[phase] = self.acc.get(phase, 0.0) + seconds

        return hook

    def _wrap(self, name, fn, backward=False):
        def wrapped(*args, **kwargs):
            self.in_backward = backward
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - t0
                self.in_backward = False

        return wrapped

    def start(self):
        self.acc, self.t0 = {}, time.perf_counter()

    def stop(self) -> dict[str, float]:
        total = time.perf_counter() - self.t0
        acc = dict(self.acc)
        recompute = acc.get("backward: UNet recompute (K calls)", 0.0) + acc.get(
            "backward: VAE decoder recompute", 0.0
        )
        acc["backward: gradients (autograd, excluding recompute)"] = acc.pop("backward", 0.0) - recompute
        acc["reward"] = acc.pop("reward", 0.0)
        acc["optimizer: grad clip + AdamW"] = acc.pop("optimizer", 0.0)
        acc["sampling: other (text encoder, scheduler, latents)"] = total - sum(acc.values())
        acc["total"] = total
        return acc

    @staticmethod
    def average(runs: list[dict[str, float]]) -> dict[str, float]:
        keys = {k for r in runs for k in r}
        return {k: sum(r.get(k, 0.0) for r in runs) / len(runs) for k in sorted(keys)}


if __name__ == "__main__":
    main()
