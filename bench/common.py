"""Helpers shared by the benchmark scripts: memory readings, timing summaries, the reward, JSON output.

Imports nothing from alignprop_ray or trl, so both sides of a comparison load exactly the same helper code.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

# Eight short prompts; both sides cycle through the same list (the text length is irrelevant: CLIP pads to 77).
PROMPTS = ["a cat", "a dog", "a horse", "a rabbit", "a fox", "an owl", "a tiger", "a whale"]


def status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: now, VmHWM: peak since start or since reset_peak_rss)."""
    text = open("/proc/self/status", encoding="ascii").read()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), so the next peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def lifetime_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def saturation(images):
    """Mean chroma max(R,G,B) - min(R,G,B) per image, (B,): alignprop_ray's `saturation` reward, same formula."""
    x = images.float()
    return (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2))


class UnetCallCounter:
    """Counts UNet forward calls (a checkpointed call that is recomputed in backward counts twice).

    Used as a self-check that a side does the intended work: one optimizer step with T sampling steps of
    which the last K carry gradient must make exactly T + K UNet calls (T forwards + K recomputes); a side
    that backpropagated through every step would make 2T, one that never backpropagated, T.
    """

    def __init__(self, unet):
        self.calls = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def time_steps(
    step: Callable[[int], float | None],
    warmup: int,
    iters: int,
    after_warmup: Callable[[], None] | None = None,
) -> list[float]:
    """Run `warmup` untimed then `iters` timed calls of step(i); seconds per call.

    A step that returns a number reports its own timing (e.g. to leave out work done before the part
    being measured); otherwise the whole call is timed. `after_warmup` runs between the two (e.g. to
    reset a peak-memory reading, so the timed steps' peak leaves out one-time costs such as compilation).
    """
    for i in range(warmup):
        step(i)
    if after_warmup is not None:
        after_warmup()
    times = []
    for i in range(warmup, warmup + iters):
        t0 = time.perf_counter()
        own = step(i)
        times.append(time.perf_counter() - t0 if own is None else own)
    return times


def summary(values: Sequence[float]) -> dict:
    values = sorted(values)
    return {
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "n": len(values),
        "values": list(values),
    }


def draw_k(i: int, k: int, k_range: Sequence[int] | None) -> int:
    """K for step i: fixed, or uniform on k_range (inclusive) from a stream keyed by i, the same on both sides."""
    if not k_range:
        return k
    import random

    return random.Random(f"bench-k:{i}").randint(k_range[0], k_range[1])


class DeviceMemory:
    """Peak memory of the steps: CUDA allocator peak on a GPU, else peak RSS since `reset`."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset(self) -> bool:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return True
        return reset_peak_rss()

    def report(self, was_reset: bool) -> dict:
        if self.cuda:
            import torch

            return {
                "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
                "peak_rss_lifetime_mib": lifetime_peak_mib(),
            }
        return {
            "peak_rss_steps_mib": status_kib("VmHWM") / 1024 if was_reset else None,
            "peak_rss_lifetime_mib": lifetime_peak_mib(),
        }


class WarmupPeak:
    """On CPU, splits the steps' peak RSS into warm-up (one-time costs: compilation, the budget's probe) and
    timed steps: `reset` after the warm-up keeps the peak so far and restarts VmHWM; `report` adds
    peak_rss_timed_mib and keeps peak_rss_steps_mib the peak of all steps. On a GPU it does nothing."""

    def __init__(self, device: str):
        self.cpu, self.warm_peak = not device.startswith("cuda"), None

    def reset(self) -> None:
        if self.cpu:
            peak = status_kib("VmHWM") / 1024
            self.warm_peak = peak if reset_peak_rss() else None

    def report(self, report: dict) -> dict:
        if self.warm_peak is not None and report.get("peak_rss_steps_mib") is not None:
            timed = status_kib("VmHWM") / 1024
            report["peak_rss_timed_mib"] = timed
            report["peak_rss_steps_mib"] = max(self.warm_peak, timed)
        return report


def is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def emit(result: dict, out: str | None) -> None:
    """Write the result as JSON to `out` (or stdout) for bench/run.py to collect."""
    text = json.dumps(result, indent=1)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")


def add_step_args(p, *, k_range_help: str, dtype_help: str) -> None:
    """The options step_ours.py and step_trl.py share, so both sides of a comparison take the same work."""
    p.add_argument(
        "--pipeline", required=True, help="diffusers pipeline directory (alignprop-ray make-tiny-model)"
    )
    p.add_argument("--steps", type=int, default=20, help="DDIM steps T")
    p.add_argument("--k", type=int, default=10, help="fixed K: trailing steps that carry gradient")
    p.add_argument("--k-range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"), help=k_range_help)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help=dtype_help)
    p.add_argument("--batch", type=int, default=2, help="images per optimizer step")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--threads", type=int, default=env_threads())
    p.add_argument("--out", default=None, help="JSON file (default: stdout)")


def env_threads() -> int:
    return int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
