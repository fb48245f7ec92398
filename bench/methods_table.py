"""The table of docs/methods.md from a finished `sweeps/methods.yaml` sweep, read from MLflow.

    python bench/methods_table.py --tracking-uri sqlite:///mlflow.db [--experiment methods] [--target 0.3]

Per method (runs grouped by `report.plots.method_label`, mean over seeds): training seconds
(perf/wall_seconds) and images sampled (perf/images_generated) when eval/reward first reached `--target`,
with the runs that never did counted as not reaching it; the final eval/reward, eval/diversity and
eval/vendi. Then each method's time to the target relative to AlignProp's.
"""

from __future__ import annotations

import argparse
import math
import statistics

from alignprop_ray.report.data import load_runs, metric
from alignprop_ray.report.plots import method_labels, method_order, reward_at_cost


def first_reaching(points, target: float) -> float | None:
    """The cost of the first evaluation at or above `target`, or None."""
    hit = points[points["reward"] >= target]
    return None if hit.empty else float(hit["cost"].iloc[0])


def last_value(history, key: str, run_id: str) -> float:
    values = metric(history, key, run_id)
    return float(values.sort_values("step")["value"].iloc[-1]) if not values.empty else math.nan


def mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def table(tracking_uri: str, experiment: str, target: float) -> tuple[list[dict], dict]:
    runs, history = load_runs(tracking_uri, experiment)
    labels = method_labels(runs)
    rows = []
    for label in sorted(set(labels.values()), key=method_order):
        ids = [run_id for run_id, name in labels.items() if name == label]
        seconds = [first_reaching(reward_at_cost(history, i, "perf/wall_seconds"), target) for i in ids]
        images = [first_reaching(reward_at_cost(history, i, "perf/images_generated"), target) for i in ids]
        rows.append(
            {
                "method": label,
                "runs": len(ids),
                "reached": sum(s is not None for s in seconds),
                "seconds": mean(seconds),
                "images": mean(images),
                "base": mean(
                    [
                        float(metric(history, "eval/reward", i).sort_values("step")["value"].iloc[0])
                        for i in ids
                    ]
                ),
                "final": mean([last_value(history, "eval/reward", i) for i in ids]),
                "diversity": mean([last_value(history, "eval/diversity", i) for i in ids]),
                "vendi": mean([last_value(history, "eval/vendi", i) for i in ids]),
                "trained": mean([last_value(history, "perf/wall_seconds", i) for i in ids]),
                "sampled": mean([last_value(history, "perf/images_generated", i) for i in ids]),
            }
        )
    return rows, {"experiment": experiment, "target": target}


def markdown(rows: list[dict], target: float) -> str:
    def num(value: float, fmt: str) -> str:
        return "-" if not math.isfinite(value) else format(value, fmt)

    reference = next((r["seconds"] for r in rows if r["method"] == "alignprop"), math.nan)
    lines = [
        f"| method | runs reaching {target:g} | seconds to {target:g} | images to {target:g} | x AlignProp's time "
        "| base eval/reward | final eval/reward | final eval/diversity | final eval/vendi | seconds trained "
        "| images sampled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        factor = r["seconds"] / reference if math.isfinite(reference) and r["reached"] else math.nan
        lines.append(
            f"| {r['method']} | {r['reached']}/{r['runs']} | {num(r['seconds'], '.1f')} | {num(r['images'], '.0f')} "
            f"| {num(factor, '.2f')} | {num(r['base'], '.3f')} | {num(r['final'], '.3f')} "
            f"| {num(r['diversity'], '.4f')} | {num(r['vendi'], '.2f')} | {num(r['trained'], '.1f')} "
            f"| {num(r['sampled'], '.0f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="methods")
    parser.add_argument("--target", type=float, default=0.3, help="the eval/reward to reach")
    args = parser.parse_args()
    rows, _ = table(args.tracking_uri, args.experiment, args.target)
    print(markdown(rows, args.target))


if __name__ == "__main__":
    main()
