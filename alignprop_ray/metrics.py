"""The metric names training logs (alignprop_ray/train/loop.py), for code that must name them without
importing torch: sweep validation checks `tune.metric` against these. Reward terms add
`train/reward/<term>` and `eval/reward/<term>`; held-out rewards (`eval.rewards`) add
`eval/heldout/<name>`; a training method adds its own, train/<method>/<name> (its row's `metrics`,
engine/methods/registry.py)."""

TRAIN_METRICS = (
    "train/reward",
    # the unscaled objective the method minimized: -reward (+ kl_weight x train/kl) for alignprop, draft,
    # refl; ddpo's PPO surrogate
    # (train.loss_scale scales only what is backpropagated)
    "train/loss",
    "train/k",  # denoising steps per image whose gradient reached LoRA (alignprop, draft: K; refl: 1)
    "train/k0_skipped",  # batches of the step that added no gradient (alignprop drew K=0, method.k0: skip)
    "train/grad_norm",  # of the gradient of loss_scale x loss, before clipping (what max_grad_norm bounds)
    "train/lr",
    "train/skipped_steps",
    "perf/step_seconds",
    # Cumulative, kept across resumes, the same for every method, so rewards plot against time and samples:
    "perf/wall_seconds",  # seconds spent in training steps (evaluation, logging, checkpoints excluded)
    "perf/images_generated",  # denoising chains sampled from fresh noise x_T, all workers (docs/methods.md)
    "perf/images_per_second",
    "perf/peak_memory_mb",
)
EVAL_METRICS = (
    "eval/reward",
    "eval/diversity",
    "eval/diversity_across_prompts",
    "eval/vendi",
    "eval/vendi_across_prompts",
)
TERM_PREFIXES = ("train/reward/", "eval/reward/")
HELDOUT_PREFIX = "eval/heldout/"
# a method that samples its training images at another eta than evaluation (DDPO's method.eta): the trained
# reward of the eval prompts and seeds at that eta as well (and eval/train_eta/reward/<term>)
EVAL_TRAIN_ETA = "eval/train_eta/reward"
# eval.base_fidelity: similarity of each eval image to the base model's (step 0) image of its prompt and seed
BASE_FIDELITY = "eval/base_fidelity"
# train.kl_weight > 0: the KL-to-base term each step added, unweighted (engine/regularizers.py)
KL_TO_BASE = "train/kl"
