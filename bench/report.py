"""Render bench/results.json as BENCHMARKS.md: verdicts first, then one table per benchmark, machine, commands.

python bench/report.py [bench/results.json] [BENCHMARKS.md]     # re-render without re-measuring
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANALYSIS = HERE / "analysis.md"  # hand-written notes on the last full run (where time goes, missed targets)
T, K = 20, 10
FLOOR_FACTOR = 1 + 3 * K / T  # checkpointed recompute + backward ~ 3 forwards per gradient step


def med(values) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def s(seconds: float) -> str:
    return f"{seconds:.3f} s"


def spread(values, fmt=s) -> str:
    return f"{fmt(min(values))} – {fmt(max(values))}"


def mib(value) -> str:
    return "n/a" if value is None else f"{value:,.0f} MiB"


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not run"}[ok]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- numbers


def floor_numbers(floor: dict) -> dict:
    ratios = [r["step_s"]["median"] / (r["floor_gen_s"]["median"] * FLOOR_FACTOR) for r in floor["runs"]]
    return {"ratio": med(ratios), "ratios": ratios}


def trl_sides(trl: dict) -> tuple[str, ...]:
    """The sides of section 2 in this result: ours, ours with issue 18's levers (when measured), TRL."""
    return ("ours", "ours_levers", "trl") if trl.get("ours_levers") else ("ours", "trl")


def trl_numbers(trl: dict) -> dict:
    sides = trl_sides(trl)
    times = {side: [r["step_s"]["median"] for r in trl[side]] for side in sides}
    ratio = {side: med(times[side]) / med(times["trl"]) for side in sides if side != "trl"}
    paired = {
        side: [a / b for a, b in zip(times[side], times["trl"], strict=True)]
        for side in sides
        if side != "trl"
    }
    mem = {side: med([r["peak_rss_steps_mib"] for r in trl[side]]) for side in sides}
    timed = {side: _median_or_none([r.get("peak_rss_timed_mib") for r in trl[side]]) for side in sides}
    life = {side: med([r["peak_rss_lifetime_mib"] for r in trl[side]]) for side in sides}
    return {
        "ours": times["ours"],
        "trl": times["trl"],
        "ratio": ratio["ours"],
        "ratios": ratio,
        "paired": paired["ours"],
        "paired_by_side": paired,
        "mem": mem,
        "timed": timed,
        "life": life,
    }


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return med(values) if values else None


def memory_numbers(memory: dict, allocator: str) -> dict:
    runs = [r for r in memory["runs"] if r.get("allocator", "default") == allocator]
    by = {(r["config"]["k"], not r["config"]["no_checkpoint"]): r for r in runs}
    ks = sorted({k for k, _ in by})

    def delta(r) -> float:
        return r["peak_rss_steps_mib"] - r["rss_after_setup_mib"]

    def growth(checkpoint: bool, fn) -> float:
        return fn(by[(ks[-1], checkpoint)]) / fn(by[(ks[0], checkpoint)])

    peak = lambda r: r["peak_rss_steps_mib"]  # noqa: E731
    return {
        "by": by,
        "ks": ks,
        "delta": delta,
        "growth_on": growth(True, peak),
        "growth_off": growth(False, peak),
        "delta_growth": {c: growth(c, delta) for c in (True, False)},
    }


ALLOCATORS = {
    "default": "glibc malloc, default settings",
    "mmap128k": "glibc malloc with MALLOC_MMAP_THRESHOLD_=131072 (freed large blocks return to the OS)",
    "jemalloc": "jemalloc 5 (Ray's bundled `ray/core/libjemalloc.so`, via LD_PRELOAD)",
}


def ray_numbers(ray: dict) -> dict:
    inproc = [r["step_s"]["median"] for r in ray["inprocess"]]
    # two in-process copies at once: each process's step median, pooled
    together = [r["step_s"]["median"] for pair in ray.get("inprocess_together", []) for r in pair]
    per_workers = by_workers(ray["ray"])
    what_if = by_workers(ray.get("ray_poll_2.0", []))

    def overhead(groups: dict[int, list[dict]]) -> float | None:
        return med(intervals(groups[1])) / med(inproc) - 1 if 1 in groups else None

    def speedup(groups: dict[int, list[dict]]) -> float | None:
        return images_per_s(groups[2]) / images_per_s(groups[1]) if 1 in groups and 2 in groups else None

    return {
        "inproc": inproc,
        "together": together,
        "ceiling": 2 * med(inproc) / med(together) if together else None,
        "per_workers": per_workers,
        "overhead": overhead(per_workers),
        "speedup": speedup(per_workers),
        "what_if": what_if,
        "overhead_what_if": overhead(what_if),
        "speedup_what_if": speedup(what_if),
    }


def by_workers(invocations: list[dict]) -> dict[int, list[dict]]:
    """The runs of several `ray_train.py ray` invocations, grouped by worker count."""
    groups: dict[int, list[dict]] = {}
    for invocation in invocations:
        for run in invocation["runs"]:
            groups.setdefault(run["workers"], []).append(run)
    return groups


def intervals(runs: list[dict]) -> list[float]:
    return [r["interval_s"]["median"] for r in runs]


def images_per_s(runs: list[dict]) -> float:
    """Median over runs of each run's images per second."""
    return med([r["images_per_step"] / r["interval_s"]["median"] for r in runs])


USER_SIDES = {
    "defaults": "`alignprop-ray train`, defaults",
    "compile": "... `model.compile: true`",
    "budget": "... `model.activation_budget_mb: auto`",
    "both": "... both (the shipped GPU experiments)",
}


def user_path_numbers(user: dict) -> dict:
    """Per side: run medians of s/step, their median, the ratio to TRL's (and paired per rep), first steps;
    and when each lever pays: compile's extra first-step seconds over the seconds it saves per step."""
    runs = user["runs"]
    times = {side: [r["step_s"]["median"] for r in rs] for side, rs in runs.items()}
    median = {side: med(values) for side, values in times.items()}
    ours = [side for side in USER_SIDES if side in runs]
    first = {side: med([r["first_step_s"] for r in runs[side]]) for side in ours}
    saved = median["defaults"] - median["compile"] if "compile" in median else None
    return {
        "sides": ours,
        "times": times,
        "median": median,
        "ratio": {side: median[side] / median["trl"] for side in ours},
        "paired": {side: [a / b for a, b in zip(times[side], times["trl"], strict=True)] for side in ours},
        "first": first,
        "memory": {side: med([r["peak_memory_mib"] for r in rs]) for side, rs in runs.items()},
        "compile_cost_s": first["compile"] - first["defaults"] if "compile" in first else None,
        "compile_saves_s": saved,
    }


# ----------------------------------------------------------------------------------------------- sections


def summary(res: dict) -> str:
    rows = []
    if "floor" in res:
        f = floor_numbers(res["floor"])
        rows.append(
            [
                "1. step vs compute floor (tiny, T=20, K=10, batch 2)",
                "<= 1.05x",
                f"{f['ratio']:.2f}x",
                verdict(f["ratio"] <= 1.05),
            ]
        )
    if "trl" in res:
        t = trl_numbers(res["trl"])
        rows.append(
            [
                "2a. time per step, ours / TRL 0.23.1",
                "<= 0.85x",
                f"{t['ratio']:.2f}x",
                verdict(t["ratio"] <= 0.85),
            ]
        )
        rows.append(
            [
                "2b. peak RSS during steps, ours vs TRL",
                "no more",
                f"{mib(t['mem']['ours'])} vs {mib(t['mem']['trl'])}",
                verdict(t["mem"]["ours"] <= t["mem"]["trl"]),
            ]
        )
        if "ours_levers" in t["ratios"]:
            rows.append(
                [
                    "2a. the same, with compile + activation budget (issue 18)",
                    "<= 0.85x",
                    f"{t['ratios']['ours_levers']:.2f}x",
                    verdict(t["ratios"]["ours_levers"] <= 0.85),
                ]
            )
            timed = t["timed"]
            if timed.get("ours_levers") is not None and timed.get("trl") is not None:
                rows.append(
                    [
                        "2b. the same: peak RSS during timed steps (after compile), ours vs TRL",
                        "no more",
                        f"{mib(timed['ours_levers'])} vs {mib(timed['trl'])}",
                        verdict(timed["ours_levers"] <= timed["trl"]),
                    ]
                )
            rows.append(
                [
                    "2b. the same: peak RSS of all steps incl. first-step compile, ours vs TRL",
                    "no more",
                    f"{mib(t['mem']['ours_levers'])} vs {mib(t['mem']['trl'])}",
                    verdict(t["mem"]["ours_levers"] <= t["mem"]["trl"]),
                ]
            )
    if "memory" in res:
        short = {"default": "glibc default", "mmap128k": "mmap threshold 128 KiB", "jemalloc": "jemalloc"}
        for allocator, label in short.items():
            if not any(r.get("allocator", "default") == allocator for r in res["memory"]["runs"]):
                continue
            m = memory_numbers(res["memory"], allocator)
            rows.append(
                [
                    f"3a. peak RSS K={m['ks'][-1]} / K={m['ks'][0]}, checkpointing on ({label})",
                    "<= 1.15x",
                    f"{m['growth_on']:.2f}x",
                    verdict(m["growth_on"] <= 1.15),
                ]
            )
            rows.append(
                [
                    f"3b. the same, checkpointing off ({label})",
                    "grows",
                    f"{m['growth_off']:.2f}x",
                    verdict(m["growth_off"] > m["growth_on"]),
                ]
            )
    if "ray" in res:
        r = ray_numbers(res["ray"])
        if r["speedup"] is not None:
            rows.append(
                [
                    "4a. images/s, 2 Ray workers / 1",
                    ">= 1.8x",
                    f"{r['speedup']:.2f}x"
                    + (f" (this machine without Ray: {r['ceiling']:.2f}x)" if r["ceiling"] else ""),
                    verdict(r["speedup"] >= 1.8),
                ]
            )
        if r["overhead"] is not None:
            rows.append(
                [
                    "4b. Ray Train + MLflow per-step overhead vs in-process",
                    "<= 5%",
                    f"{r['overhead'] * 100:+.1f}%",
                    verdict(r["overhead"] <= 0.05),
                ]
            )
    if "user_path" in res:
        u = user_path_numbers(res["user_path"])
        rows.append(
            [
                "6. `alignprop-ray train` (1 Ray worker) / TRL's step, defaults",
                "measured",
                f"{u['ratio']['defaults']:.2f}x",
                "–",
            ]
        )
        if "both" in u["ratio"]:
            rows.append(
                [
                    "6. the same with compile + activation budget (the shipped GPU experiments)",
                    "<= 0.85x",
                    f"{u['ratio']['both']:.2f}x",
                    verdict(u["ratio"]["both"] <= 0.85),
                ]
            )
    if "served_rewards" in res:
        rows += served_verdicts(res["served_rewards"])
    gpu = res.get("gpu", {})
    rows.append(
        [
            "5. GPU: SD 1.5 arch, 512 px, T=50, ours vs TRL",
            "measured",
            gpu.get("skipped", gpu.get("device", "not run")),
            verdict(None if "runs" not in gpu else True),
        ]
    )
    return "## Verdicts\n\n" + table(["benchmark", "target", "measured", "verdict"], rows)


def served_verdicts(served: dict) -> list[list[str]]:
    local, remote, copy = served["local"], served["served"], served["copy"]["copy_rss"] / 2**20
    worst = max(d["max_rel"] for d in remote["equality"].values())
    ratio = remote["step_seconds"]["median"] / local["step_seconds"]["median"]
    return [
        [
            f"7a. reward model copies, {served['trials']}-trial sweep: served vs local",
            "1 vs 4",
            f"{remote['processes']['replica']} vs {local['processes']['workers']} ({mib(copy)} each)",
            verdict(
                remote["processes"]["replica"] == 1 and local["processes"]["workers"] == served["trials"]
            ),
        ],
        [
            "7b. served reward, dR/dpixels, LoRA gradient vs local (float32, largest relative difference)",
            "<= 1e-5",
            f"{worst:.1e}",
            verdict(worst <= 1e-5),
        ],
        ["7c. step time, served / local (4 trials at once)", "measured", f"{ratio:.2f}x", "–"],
    ]


def served_section(served: dict) -> str:
    local, remote, copy = served["local"], served["served"], served["copy"]
    trials, steps = served["trials"], served["steps"]

    def peak(side: dict, kind: str) -> str:
        return mib(side["peak_rss"][kind] / 2**20) if side["processes"][kind] else "–"

    def steps_of(side: dict) -> str:
        t = side["step_seconds"]
        return f"{t['median']:.2f} s ({t['min']:.2f}-{t['max']:.2f}, {t['n']} steps)"

    rows = [
        [
            "processes holding a reward model",
            str(local["processes"]["workers"]),
            str(remote["processes"]["replica"]),
        ],
        [
            "reward model memory (copies x RSS of one copy)",
            mib(local["processes"]["workers"] * copy["copy_rss"] / 2**20),
            mib(remote["processes"]["replica"] * copy["copy_rss"] / 2**20),
        ],
        ["peak RSS, all Train workers together", peak(local, "workers"), peak(remote, "workers")],
        ["peak RSS, the reward replica", "–", peak(remote, "replica")],
        [
            "peak RSS, workers and replica together",
            mib(local["peak_rss_total"] / 2**20),
            mib(remote["peak_rss_total"] / 2**20),
        ],
        [
            "step time, median (range) over every trial's steps after its first",
            steps_of(local),
            steps_of(remote),
        ],
        [
            "sweep wall time (Tune start to end)",
            f"{local['sweep_seconds']:.0f} s",
            f"{remote['sweep_seconds']:.0f} s",
        ],
        ["trials", ", ".join(local["statuses"]), ", ".join(remote["statuses"])],
    ]
    eq = remote["equality"]
    names = {
        "reward": "reward of 4 images",
        "pixel_gradient": "dR/dpixels of 4 images",
        "lora_gradient": "LoRA gradient of one AlignProp step",
    }
    equal_rows = [
        [names[k], f"{v['max_abs']:.2e}", f"{v['max_rel']:.2e}", f"{v['largest']:.3g}"] for k, v in eq.items()
    ]
    reward = served["reward"]
    return "\n".join(
        [
            "## 7. Served rewards: one replica for a sweep vs a copy per worker",
            "",
            f"`bench/served_rewards.py` (issue 29): {trials} trials at once (a grid over train.lr), each 1 Ray "
            f"Train worker of 1 CPU, {steps} steps of the tiny model at 64 px (T=4, full backprop, batch 2), "
            f"scored by `aesthetic` on open_clip {reward['arch']} at random init ({copy['parameters'] / 1e6:.0f}M "
            "parameters: a real model's size and compute, no download; the score means nothing). Local: every "
            "trial's worker builds the reward. Served: `serve: "
            + json.dumps(served["serve"]).replace('"', "")
            + "`, one Ray Serve replica for all trials. Each side in a fresh private Ray instance of "
            f"{trials + 1} logical CPUs on this 2-core machine, so the trials share the cores: the step times "
            "measure contention as much as the reward. RSS sampled every 0.5 s; the RSS of one copy is what "
            "building the reward adds to a fresh process.",
            "",
            table(["", "local", "served"], rows),
            "",
            "Served vs local, float32 (the replica and this process run the same model on different threads):",
            "",
            table(
                ["", "largest difference", "relative to the largest local value", "largest local value"],
                equal_rows,
            ),
        ]
    )


def floor_section(floor: dict) -> str:
    f = floor_numbers(floor)
    rows = [
        [
            i + 1,
            s(r["step_s"]["median"]),
            s(r["floor_gen_s"]["median"]),
            s(r["floor_gen_s"]["median"] * FLOOR_FACTOR),
            f"{ratio:.3f}x",
            r["unet_calls_per_step"][-1],
        ]
        for i, (r, ratio) in enumerate(zip(floor["runs"], f["ratios"], strict=True))
    ]
    out = [
        "## 1. Ours vs the compute floor",
        "",
        f"Tiny model from `make-tiny-model`, T={T}, K={K} (fixed), batch 2, CFG 7.5, fp32, CPU. Floor = median "
        f"time of a no-grad generation of the same batch x (1 + 3K/T) = x{FLOOR_FACTOR:g}. Each run is a fresh "
        "process that alternates a floor generation and an optimizer step; medians over its timed steps.",
        "",
        table(
            ["run", "s / optimizer step", "no-grad generation", "floor", "step / floor", "UNet calls / step"],
            rows,
        ),
        "",
        f"Median ratio **{f['ratio']:.3f}x** (spread {min(f['ratios']):.3f} – {max(f['ratios']):.3f}). "
        f"UNet calls per step = T + K = {T + K} (self-check: T forwards + K checkpoint recomputes).",
    ]
    phases = floor["phases"].get("phases_s")
    if phases:
        total = phases["total"]
        rows = [
            [name, ms(sec), f"{sec / total * 100:.1f}%"] for name, sec in phases.items() if name != "total"
        ]
        rows.append(["**total** (one step, timed with hooks)", ms(total), "100%"])
        out += [
            "",
            "### Where time goes in one step",
            "",
            "Measured with forward hooks and wrappers around the learner (engine untouched), averaged over "
            "the timed steps of one run; checkpoint early-stop is off in this run so each recompute runs "
            "whole and can be timed. MLflow/Ray logging cost is in section 4.",
            "",
            table(["phase", "time", "share"], rows),
        ]
    ops = floor["phases"].get("profile_top_ops")
    if ops:
        rows = [[f"`{o['op']}`", o["calls"], ms(o["self_s"]), f"{o['share'] * 100:.1f}%"] for o in ops]
        out += [
            "",
            "Top operators by self CPU time in one step (torch.profiler):",
            "",
            table(["operator", "calls", "self time", "share"], rows),
        ]
    return "\n".join(out)


def trl_section(trl: dict) -> str:
    t = trl_numbers(trl)
    levers = " ".join(trl.get("levers", []))
    labels = {
        "ours": "alignprop-ray",
        "ours_levers": f"alignprop-ray, `{levers}`",
        "trl": f"TRL {trl['trl'][0].get('trl_version', '')}",
    }
    rows = []
    for side in trl_sides(trl):
        runs = trl[side]
        medians = [r["step_s"]["median"] for r in runs]
        every = [v for r in runs for v in r["step_s"]["values"]]
        rows.append(
            [
                labels[side],
                s(med(medians)),
                spread(medians),
                spread(every),
                mib(med([r["peak_rss_steps_mib"] for r in runs])),
                mib(t["timed"][side]),
                mib(med([r["peak_rss_lifetime_mib"] for r in runs])),
                mib(med([r["rss_after_setup_mib"] for r in runs])),
                s(med([r["first_step_s"] for r in runs])) if "first_step_s" in runs[0] else "–",
                runs[0]["unet_calls_per_step"][-1],
            ]
        )
    lines = [
        "## 2. Ours vs TRL's AlignPropTrainer",
        "",
        f"Same pipeline directory, T={T}, fixed K={K}, batch 2, CFG 7.5, eta 0, fp32, CPU, LoRA r=4 on the "
        "attention projections, saturation reward, AdamW lr 1e-3 / wd 1e-4, clip 1.0. TRL: "
        f'`truncated_backprop_rand=False, truncated_backprop_timestep={T - K}`, `mixed_precision="no"`, no '
        "trackers, no progress bars, timing `trainer.step()` only. Runs alternate the sides; "
        "each run is a fresh process (model load and warm-up steps excluded).",
        "",
        table(
            [
                "side",
                "median s/step",
                "spread of run medians",
                "all timed steps",
                "peak RSS (steps)",
                "peak RSS (timed steps)",
                "peak RSS (process)",
                "RSS after load",
                "first step",
                "UNet calls / step",
            ],
            rows,
        ),
        "",
        f"Ratio ours / TRL: **{t['ratio']:.3f}x** (paired per rep: "
        f"{', '.join(f'{p:.3f}' for p in t['paired'])}).",
    ]
    if "ours_levers" in t["ratios"]:
        runs = trl["ours_levers"]
        kept = sorted({k for r in runs for k in r.get("kept_calls", [])})
        probe = _median_or_none([r.get("probe_call_mib") for r in runs])
        lines += [
            f"With `{levers}` (issue 18): **{t['ratios']['ours_levers']:.3f}x** (paired per rep: "
            f"{', '.join(f'{p:.3f}' for p in t['paired_by_side']['ours_levers'])}). The probe measured "
            f"{probe:.1f} MiB of activations per UNet call, so the budget kept {', '.join(map(str, kept))} "
            f"of the K={K} gradient calls uncheckpointed; the first step includes compilation (and the probe).",
        ]
    lines += [
        "",
        "Peak RSS (steps) is the high-water mark after the model is loaded (VmHWM reset with "
        "/proc/self/clear_refs), warm-up steps included; peak RSS (timed steps) is reset again after the "
        "warm-up, so it leaves out one-time costs (compilation); peak RSS (process) includes imports and "
        "loading.",
    ]
    return "\n".join(lines)


def memory_section(memory: dict) -> str:
    out = [
        "## 3. Memory vs K",
        "",
        "Tiny model at resolution 128 ({n}x{n} latents), T={T}, batch 2, CFG, fp32, CPU; one fresh process per "
        "cell, one warm-up step + one step; peak RSS from the load onwards, and that peak minus the RSS right "
        "after loading (what the steps themselves add). Every cell is measured under each allocator setting.",
    ]
    latent = None
    for allocator, label in ALLOCATORS.items():
        if not any(r.get("allocator", "default") == allocator for r in memory["runs"]):
            continue
        m = memory_numbers(memory, allocator)
        rows = []
        for k in m["ks"]:
            on, off = m["by"][(k, True)], m["by"][(k, False)]
            latent = on["latent_size"]
            rows.append(
                [
                    k,
                    mib(on["peak_rss_steps_mib"]),
                    mib(m["delta"](on)),
                    s(on["step_s"]["median"]),
                    mib(off["peak_rss_steps_mib"]),
                    mib(m["delta"](off)),
                    s(off["step_s"]["median"]),
                ]
            )
        out += [
            "",
            f"**{label}**",
            "",
            table(
                [
                    "K",
                    "checkpointing: peak RSS",
                    "added by steps",
                    "s/step",
                    "no checkpointing: peak RSS",
                    "added by steps",
                    "s/step",
                ],
                rows,
            ),
            "",
            f"K={m['ks'][-1]} / K={m['ks'][0]}: with checkpointing **{m['growth_on']:.2f}x** peak RSS "
            f"({m['delta_growth'][True]:.2f}x of what the steps add); without **{m['growth_off']:.2f}x** "
            f"({m['delta_growth'][False]:.2f}x).",
        ]
    out[2] = out[2].format(n=latent, T=T)
    return "\n".join(out)


def ray_section(ray: dict) -> str:
    r = ray_numbers(ray)
    images = ray["inprocess"][0]["images_per_step"]

    def inprocess_row(label: str, copies: int, times: list[float]) -> list:
        per_step = copies * images
        return [label, copies, per_step, s(med(times)), spread(times), f"{per_step / med(times):.2f}", "–"]

    def ray_row(label: str, workers: int, runs: list[dict]) -> list:
        steps = intervals(runs)
        train_step = s(med([x["train_step_s"]["median"] for x in runs]))
        return [
            label,
            workers,
            runs[0]["images_per_step"],
            s(med(steps)),
            spread(steps),
            f"{images_per_s(runs):.2f}",
            train_step,
        ]

    rows = [inprocess_row("in-process (engine only, 1 thread)", 1, r["inproc"])]
    if r["together"]:
        rows.append(inprocess_row("in-process, 2 copies at once (no Ray)", 2, r["together"]))
    for workers, runs in sorted(r["per_workers"].items()):
        rows.append(ray_row(f"Ray Train + MLflow, {workers} worker(s)", workers, runs))
    for workers, runs in sorted(r["what_if"].items()):
        rows.append(
            ray_row(f"what-if: Ray's default 2 s controller poll, {workers} worker(s)", workers, runs)
        )
    cfg = ray["inprocess"][0]["config"]
    lines = [
        "## 4. Ray: scaling and overhead",
        "",
        f"`sweeps/tiny.yaml` (T=10, 64 px, batch 2 per worker) with K fixed at {cfg['k']}, {cfg['steps']} steps, "
        "1 CPU / 1 thread per worker, a local Ray instance with 2 CPUs, MLflow on SQLite. A Ray step is the "
        "gap between rank 0's MLflow timestamps of consecutive steps (everything a step costs: generation, "
        "backward, gradient all-reduce, metrics, MLflow logging, Ray report); steps 1-2 and the last "
        "(evaluation, checkpoint) are left out. In-process: the same learner and batches, `train_step` only.",
        "",
        table(
            [
                "mode",
                "workers",
                "images / step",
                "median s/step",
                "spread of run medians",
                "images/s",
                "in-worker train_step",
            ],
            rows,
        ),
    ]
    if r["speedup"] is not None:
        lines += ["", f"2 workers / 1 worker: **{r['speedup']:.2f}x** images/s."]
    if r["ceiling"] is not None:
        lines += [
            f"Two in-process copies at once / one alone, no Ray: {r['ceiling']:.2f}x images/s "
            "(what this machine allows two 1-thread processes)."
        ]
    if r["overhead"] is not None:
        lines += [f"Ray Train + MLflow vs in-process, 1 worker: **{r['overhead'] * 100:+.1f}%** per step."]
    if r["overhead_what_if"] is not None:
        lines += [
            f"With Ray's default `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2` instead of our 0.1 s (one run): "
            f"**{r['overhead_what_if'] * 100:+.1f}%** per step, 2 workers / 1: {r['speedup_what_if']:.2f}x."
        ]
    return "\n".join(lines)


def user_path_section(user: dict) -> str:
    u = user_path_numbers(user)
    config = user["config"]
    labels = {"trl": "TRL 0.23.1 `AlignPropTrainer.step()`", **USER_SIDES}
    rows = []
    for side in ("trl", *u["sides"]):
        runs = user["runs"][side]
        every = [v for r in runs for v in r["step_s"]["values"]]
        rows.append(
            [
                labels[side],
                s(u["median"][side]),
                spread(u["times"][side]),
                spread(every),
                "1"
                if side == "trl"
                else f"{u['ratio'][side]:.2f}x ({', '.join(f'{p:.2f}' for p in u['paired'][side])})",
                "–" if side == "trl" else s(u["first"][side]),
                mib(u["memory"][side]),
            ]
        )
    lines = [
        "## 6. The user path: `alignprop-ray train` vs TRL's step, with the speed levers off and on",
        "",
        f"`bench/user_path.py`: section 2's work (tiny pipeline, T={config['T']}, fixed K={config['K']}, batch "
        f"{config['batch']}, {config['threads']} torch threads on both sides) as an experiment file, trained by "
        "`alignprop-ray train` with 1 Ray worker: a step is the gap between consecutive steps' MLflow timestamps "
        "(generation, backward, the Ray report, MLflow logging), steps 1-"
        f"{config['warmup']} and the last left out, {config['steps']} steps per run. TRL: `bench/step_trl.py`, "
        f"{config['warmup']} warm-up steps. {len(user['runs']['trl'])} reps, each a fresh process per side, "
        f"in the order of the table; the inductor cache was {user['cache']} at the start.",
        "",
        table(
            [
                "side",
                "median s/step",
                "spread of run medians",
                "all timed steps",
                "/ TRL (paired per rep)",
                "first step (in the worker)",
                "peak memory",
            ],
            rows,
        ),
        "",
        "First step: `perf/step_seconds` of step 1, which holds compilation and the budget's probe. Peak "
        "memory: the worker's `perf/peak_memory_mb` (peak RSS), TRL's peak RSS during its steps.",
    ]
    if u["compile_saves_s"] is not None:
        cost, saved = u["compile_cost_s"], u["compile_saves_s"]
        pays = f"pays for itself after about {cost / saved:.0f} steps" if saved > 0 else "does not pay here"
        lines += [
            "",
            f"Compile alone: {cost:.1f} s more in the first step, {saved * 1000:.0f} ms less per step: it {pays} "
            "(per worker process, with the cache as it was).",
        ]
    return "\n".join(lines)


def gpu_section(gpu: dict) -> str:
    head = "## 5. GPU: SD 1.5 architecture, 512 px, T=50, K ~ U{1..50}"
    if "runs" not in gpu:
        return f"{head}\n\n{gpu.get('skipped', 'not run')}. Run `bash bench/run.sh` on a CUDA machine to fill it."
    rows = []
    for r in gpu["runs"]:
        if r.get("oom"):
            rows.append([r["side"], r["batch"], "OOM", "", "", ""])
            continue
        step = r["step_s"]["median"]
        rows.append(
            [
                r["side"],
                r["batch"],
                s(step),
                f"{r['batch'] / step:.2f}",
                mib(r.get("peak_gpu_allocated_mib")),
                mib(r.get("peak_gpu_reserved_mib")),
            ]
        )
    return "\n".join(
        [
            head,
            "",
            f"{gpu['device']}; random weights, fp16 base + fp32 LoRA on both sides; largest batch with K=50 (by "
            f"doubling): {gpu['largest_batch']}. Alternating fresh processes; 1 warm-up + 3 timed steps each.",
            "",
            table(["side", "batch", "median s/step", "images/s", "peak allocated", "peak reserved"], rows),
        ]
    )


def machine_section(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    return "\n".join(
        [
            "## Machine, versions, date",
            "",
            f"- Last invocation: {res['started']}, {res.get('minutes', 0):.0f} min"
            + (" (**--quick**: a smoke run, not a measurement)" if res.get("quick") else "")
            + "; each section states when it was measured and the load average around it",
            f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']:.1f} GiB; Linux {m['kernel']}; "
            f"Python {m['python']}",
            f"- Load average (1/5/15 min) at the start of the last invocation: {res['load_start']}; "
            f"at its end: {res.get('load_end', '?')} (the benchmark's own processes run 2 threads, so a load "
            "near 2 during a section is the benchmark itself)",
            f"- torch threads (sections 1-3): {res['threads']}; {res['reps']} alternating runs per side, "
            f"{res['warmup']} warm-up + {res['iters']} timed steps per run",
            "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        ]
    )


COMMANDS = """## Reproduce

```bash
make bench                        # = bash bench/run.sh: venv + trl 0.23.1, tiny pipeline, every section
bash bench/run.sh --quick         # 1 run, 2 steps each: checks the scripts, numbers are meaningless
bash bench/run.sh --only trl      # one section (floor, trl, memory, ray, user_path, gpu); others keep theirs
BENCH_REPS=7 BENCH_ITERS=10 bash bench/run.sh
# single measurements (each prints JSON):
.venv/bin/python bench/step_ours.py --pipeline /tmp/alignprop-bench/tiny --steps 20 --k 10 --batch 2 --floor
.venv/bin/python bench/step_trl.py  --pipeline /tmp/alignprop-bench/tiny --steps 20 --k 10 --batch 2
.venv/bin/python bench/step_ours.py --pipeline /tmp/alignprop-bench/tiny --resolution 128 --k 20 --no-checkpoint
.venv/bin/python bench/step_ours.py --pipeline /tmp/alignprop-bench/tiny --compile --activation-budget-mb 80
BENCH_BUDGET_MB=80 bash bench/run.sh --only trl   # section 2 with issue 18's levers off and on
.venv/bin/python bench/levers.py --pipeline /tmp/alignprop-bench/tiny  # the levers one at a time
.venv/bin/python bench/ray_train.py ray --workers 1 2
.venv/bin/python bench/user_path.py --pipeline /tmp/alignprop-bench/tiny   # alignprop-ray train vs TRL, levers
.venv/bin/python bench/gpu.py --workdir /tmp/alignprop-bench/gpu        # CUDA only
flock /tmp/alignprop-ray.lock .venv/bin/python bench/served_rewards.py --out bench/results.json  # section 7
python bench/report.py            # re-render this file from bench/results.json
```

Raw numbers of this run: `bench/results.json`. Measure on a quiet machine: other processes on the same
cores move every number here."""


def measured(section: dict) -> str:
    if "started" not in section:
        return ""
    return (
        f"\n\n*Measured {section['started']}; load average at start {section.get('load_start', '?')}, "
        f"at end {section.get('load_end', '?')}.*"
    )


def render(res: dict) -> str:
    parts = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run.sh`); every number below comes from the run described under "
        "*Machine*. Targets are from issue 7.",
        "",
        summary(res),
    ]
    if ANALYSIS.is_file():
        parts += ["", ANALYSIS.read_text().strip()]
    for name, fn in (
        ("floor", floor_section),
        ("trl", trl_section),
        ("memory", memory_section),
        ("ray", ray_section),
    ):
        if name in res:
            parts += ["", fn(res[name]) + measured(res[name])]
    parts += ["", gpu_section(res.get("gpu", {}))]
    if "user_path" in res:
        parts += ["", user_path_section(res["user_path"]) + measured(res["user_path"])]
    if "served_rewards" in res:
        parts += ["", served_section(res["served_rewards"]) + measured(res["served_rewards"])]
    parts += ["", machine_section(res), "", COMMANDS, ""]
    return "\n".join(parts)


if __name__ == "__main__":
    results = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "results.json")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else HERE.parent / "BENCHMARKS.md")
    out.write_text(render(json.loads(results.read_text())))
