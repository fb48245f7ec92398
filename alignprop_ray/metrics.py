"""The metric names training logs (alignprop_ray/train/loop.py), for code that must name them without
importing torch: sweep validation checks `tune.metric` against these. Reward terms add
`train/reward/<term>` and `eval/reward/<term>`."""

TRAIN_METRICS = (
    "train/reward",
    "train/loss",
    "train/k",
    "train/grad_norm",
    "train/lr",
    "train/skipped_steps",
    "perf/step_seconds",
    "perf/images_per_second",
    "perf/peak_memory_mb",
)
EVAL_METRICS = ("eval/reward", "eval/diversity", "eval/diversity_across_prompts")
TERM_PREFIXES = ("train/reward/", "eval/reward/")
