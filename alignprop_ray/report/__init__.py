"""Compare training runs from MLflow: tidy tables (`load_runs`), plots, and `alignprop-ray report`.

runs, history = load_runs("sqlite:///mlflow.db", "smoke")   # one row per run / per logged value
write_report("sqlite:///mlflow.db", "smoke", "report/")     # PNGs + index.html
"""

from alignprop_ray.report.data import load_runs, resolve_experiment, summary_table, varying_params
from alignprop_ray.report.page import cmd_report, write_report
from alignprop_ray.report.plots import (
    plot_heldout_rewards,
    plot_k_histograms,
    plot_reward_curves,
    plot_reward_terms,
    plot_reward_vs_diversity,
)

__all__ = [
    "cmd_report",
    "load_runs",
    "plot_heldout_rewards",
    "plot_k_histograms",
    "plot_reward_curves",
    "plot_reward_terms",
    "plot_reward_vs_diversity",
    "resolve_experiment",
    "summary_table",
    "varying_params",
    "write_report",
]
