"""Issue 18's speed levers one at a time: our step with neither, compile only, the activation budget only, both.

    python bench/levers.py --pipeline DIR [--budget-mb 80] [--reps 3] [--iters 6] [--out levers.json]

Each run is a fresh `step_ours.py` process (T=20, K=10, batch 2, as section 2); the four sides alternate
within each rep, so a slow spell of the machine hits all of them. Prints one JSON object: per side the
run medians of s/step, the first step (compilation, the budget's probe), peak RSS of the timed steps, and
the calls the budget kept uncheckpointed. Not part of `make bench`; its numbers are quoted in analysis.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True)
    p.add_argument("--budget-mb", default="80")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sides = {
        "neither": [],
        "compile": ["--compile"],
        "budget": ["--activation-budget-mb", args.budget_mb],
        "both": ["--compile", "--activation-budget-mb", args.budget_mb],
    }
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.reps):
        for side, extra in sides.items():
            cmd = [sys.executable, str(HERE / "step_ours.py"), "--pipeline", args.pipeline]
            cmd += ["--steps", "20", "--k", "10", "--batch", "2", "--threads", str(args.threads)]
            cmd += ["--warmup", str(args.warmup), "--iters", str(args.iters), *extra]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[side].append(json.loads(out))
    summary = {
        side: {
            "step_s": [r["step_s"]["median"] for r in rs],
            "median_step_s": statistics.median(r["step_s"]["median"] for r in rs),
            "first_step_s": [r["first_step_s"] for r in rs],
            "peak_rss_timed_mib": [r.get("peak_rss_timed_mib") for r in rs],
            "kept_calls": rs[0]["kept_calls"][-1],
            "probe_call_mib": rs[0]["probe_call_mib"],
        }
        for side, rs in runs.items()
    }
    text = json.dumps({"budget_mb": args.budget_mb, "sides": summary}, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
