"""What train.kl_weight and train.ema_decay cost per optimizer step (engine/regularizers.py).

    python bench/regularizers.py [--reps 3] [--threads 1] [--out regularizers.json]

The demo's work (sweeps/demo.yaml: models/toy-shapes, 64 px, T = 10 DDIM steps, batch 2, LoRA rank 4, the
hue reward, lr 1e-2) with K = 1 and K = T (full), each with neither regularizer, with the KL term, and with the EMA.
One learner per side, all in this process; within each rep the sides alternate, so a slow spell of the
machine hits all of them. Prints one JSON object: per K and side the median and range of s/step over the
reps (after one untimed warm-up step each), and the KL side's median ratio to the plain one. Not part of
`make bench`; docs/overoptimization.md quotes it with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"plain": [], "kl": ["train.kl_weight=0.5"], "ema": ["train.ema_decay=0.9"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from alignprop_ray.sweep.config import load_sweep
    from alignprop_ray.train.build import build_learner, plan_training_step

    torch.set_num_threads(args.threads)
    demo = load_sweep(ROOT / "sweeps" / "demo.yaml")
    prompts = (ROOT / "models/toy-shapes/prompts/train.txt").read_text().split("\n")
    prompts = [line for line in prompts if line.strip()]
    result = {"threads": args.threads, "reps": args.reps, "load_average_start": os.getloadavg()[0]}
    for truncation in ("fixed:1", "full"):
        learners, cfgs, times = {}, {}, {side: [] for side in SIDES}
        for side, sets in SIDES.items():
            cfgs[side] = demo.experiment({"truncation": truncation, "train.lr": 1e-2}, sets)
            learners[side] = build_learner(cfgs[side], torch.device("cpu"))
            learners[side].train_step(*plan_training_step(cfgs[side], prompts, 0))  # warm-up
        for rep in range(args.reps):
            for side, learner in learners.items():
                plan = plan_training_step(cfgs[side], prompts, rep + 1)
                start = time.perf_counter()
                learner.train_step(*plan)
                times[side].append(time.perf_counter() - start)
        result[truncation] = {
            side: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
            for side, t in times.items()
        }
        result[truncation]["kl_over_plain"] = statistics.median(times["kl"]) / statistics.median(
            times["plain"]
        )
    result["load_average_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
