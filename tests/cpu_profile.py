"""Where `make test`'s CPU time goes, test by test: a pytest plugin, and a summary of what it recorded.

    make test-profile                       # make test with the plugin in both tiers, then the summary
    python tests/cpu_profile.py [DIR]       # the summary of a recorded run (DIR: cpu-profile/)

A Ray test's work runs in processes pytest did not start and never reaps (the Ray instance's, Train workers),
so its CPU time is the machine's (busy time in /proc/stat, every process) over the test, less what the other
tier's pytest process and its subprocesses used meanwhile (sampled every second): the figure assumes nothing
else runs on the machine. A test of the other tier is the CPU time of its process and its subprocesses. Setup
and teardown count with the test that ran them (a module fixture with the module's first test).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

DIR_ENV = "CPU_PROFILE_DIR"
DEFAULT_DIR = "cpu-profile"
TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU-seconds every core of the machine has spent busy (not idle, not waiting on I/O) since boot."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


def own_cpu_s() -> float:
    """CPU-seconds of this process and its subprocesses: those it has waited for (their time reaches it only
    then) and those still running, with whatever children they waited for in turn."""
    import psutil

    mine, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = mine.ru_utime + mine.ru_stime + reaped.ru_utime + reaped.ru_stime
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


class Recorder:
    """One JSON line per test ({test, t0, t1, busy, own}) in DIR/<tier>.jsonl, and with `sample` one a second
    ({t, own}): the rest tier's, which the Ray tier's figures subtract (walking the Ray tier's own process
    tree every second, the Ray instance's processes among them, would cost CPU of its own)."""

    def __init__(self, path: Path, sample: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out = path.open("w")
        self._lock = threading.Lock()
        if sample:
            threading.Thread(target=self._sample, daemon=True).start()

    def write(self, record: dict) -> None:
        with self._lock:
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()

    def _sample(self) -> None:
        while True:
            self.write({"t": time.time(), "own": own_cpu_s()})
            time.sleep(1.0)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        t0, busy0, own0 = time.time(), machine_busy_s(), own_cpu_s()
        yield
        busy, own = machine_busy_s() - busy0, own_cpu_s() - own0
        self.write({"test": item.nodeid, "t0": t0, "t1": time.time(), "busy": busy, "own": own})


def pytest_configure(config):
    from tests.run_tiers import RAY

    tier = "ray" if config.getoption("-m") == RAY else "rest"  # tests/run_tiers.py's two selections
    directory = Path(os.environ.get(DIR_ENV, DEFAULT_DIR))
    # The rest tier runs in pytest-xdist workers: each writes its tests to a file of its own, and their
    # controller, whose subprocesses they are, samples the tier's CPU (rest.jsonl). Without xdist one
    # process does both.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    name = f"{tier}.{worker}" if worker else tier
    recorder = Recorder(directory / f"{name}.jsonl", sample=tier == "rest" and not worker)
    config.pluginmanager.register(recorder, "cpu_profile_recorder")


# --- the summary ------------------------------------------------------------------------------------------


def read(directory: Path, tier: str) -> tuple[list[dict], list[dict]]:
    """A tier's test records and CPU samples, from its file and its xdist workers' (`<tier>.gw0.jsonl`)."""
    tests, samples = [], []
    for path in sorted(directory.glob(f"{tier}*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            (tests if "test" in record else samples).append(record)
    return tests, sorted(samples, key=lambda sample: sample["t"])


def cpu_at(samples: list[dict], when: float) -> float:
    """The sampled process's CPU-seconds at `when`, interpolated between its samples."""
    times = [s["t"] for s in samples]
    i = bisect.bisect_left(times, when)
    if i == 0 or i == len(samples):
        return samples[min(i, len(samples) - 1)]["own"]
    a, b = samples[i - 1], samples[i]
    return a["own"] + (when - a["t"]) / (b["t"] - a["t"]) * (b["own"] - a["own"])


def summary(directory: Path, top: int = 20) -> str:
    ray_tests, _ = read(directory, "ray")
    rest_tests, rest_samples = read(directory, "rest")
    rows = {"ray": [], "rest": [(t["own"], t["t1"] - t["t0"], t["test"]) for t in rest_tests]}
    for t in ray_tests:
        other = cpu_at(rest_samples, t["t1"]) - cpu_at(rest_samples, t["t0"]) if rest_samples else 0.0
        rows["ray"].append((t["busy"] - other, t["t1"] - t["t0"], t["test"]))
    lines = []
    for tier, found in rows.items():
        if not found:
            continue
        lines.append(f"{tier} tier: {len(found)} tests, {sum(r[0] for r in found):,.0f} CPU-s")
        files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for cpu, wall, test in found:
            file = files[test.split("::")[0]]
            file[0] += cpu
            file[1] += wall
        lines.append("  CPU-s   wall-s  file")
        for name, (cpu, wall) in sorted(files.items(), key=lambda item: -item[1][0])[:top]:
            lines.append(f"  {cpu:6.0f}  {wall:7.0f}  {name}")
        lines.append("  CPU-s   wall-s  test")
        for cpu, wall, test in sorted(found, reverse=True)[:top]:
            lines.append(f"  {cpu:6.0f}  {wall:7.0f}  {test}")
    return "\n".join(lines) if lines else f"no profile under {directory}"


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(DIR_ENV, DEFAULT_DIR))))
