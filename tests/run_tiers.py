"""`make test`: the suite as two pytest processes at once, so that the Ray tests' idle time runs the others.

    ray tier   markers ray or own_ray: in the foreground, its output on the terminal as it comes
    rest       every other test but the soak tier: beside it at idle priority, in 2 pytest-xdist workers
               (a test file each at a time) of one torch thread and one Inductor compile thread each; its
               report is printed when both have ended

A tiny Ray run spends its wall time starting processes and waiting on them: on the 2-core box the Ray tests
keep 1.6 cores busy on average (2026-12-07, the busy cores sampled every 5 s), and the other tests' ~680 s
of mostly single-threaded work fits in the rest. The rest tier runs under SCHED_IDLE (nice 19 where that is
refused): it gets a core only when no other process wants it, so the Ray tests' timing, which some of them
assert on, is as if it were not there (1,835 s beside it, 1,828 s alone). Two workers, so that it takes both
cores when the Ray tests leave both idle, and both once they have ended; one torch thread each, in their
subprocesses too: two OpenMP threads of a starved process stall at their barriers (tests/conftest.py,
`one_thread`). The longest file, test_gpu_check.py, goes first, and test_speed_levers.py, which compiles
the same denoiser, last: it finds the kernels in Inductor's cache (tests/conftest.py orders them).

    python tests/run_tiers.py [PYTEST ARGS...]     # both tiers, each given the same extra arguments

Exit status: the ray tier's, else the rest's; 5 (no test collected) only when neither collected a test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

RAY = "(ray or own_ray) and not soak"
REST = "not ray and not own_ray and not soak"
NO_TESTS = 5  # pytest's exit status when the selection is empty
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15"]
REST_WORKERS = ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder"]  # files in collection order


def pytest(marker: str, args: list[str]) -> list[str]:
    return [*PYTEST, "-m", marker, *args]


def at_idle_priority() -> None:
    """In the child before exec: run only on cores nothing else wants."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main(args: list[str]) -> int:
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        rest = subprocess.Popen(
            pytest(REST, [*REST_WORKERS, *args]),
            stdout=log,
            stderr=subprocess.STDOUT,
            # its subprocesses too: a served model's images match the test's own bit for bit only at
            # the same thread count (tests/test_registry.py). Inductor compiles in the test's process, not
            # in a pool of compile workers that each import torch: the same kernels for less CPU (a cold
            # compile in test_speed_levers.py: 164 CPU-seconds against 198, 2026-12-07).
            env={**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"},
            preexec_fn=at_idle_priority,
        )
        print(
            "[make test] the tests without Ray run beside these at idle priority; their report follows",
            flush=True,
        )
        try:
            ray_code = subprocess.call(pytest(RAY, args))
            if rest.poll() is None:
                ended = time.monotonic() - start
                print(
                    f"\n[make test] the Ray tier ended after {ended:.0f} s; waiting for the rest", flush=True
                )
            rest_code = rest.wait()
        finally:
            if rest.poll() is None:
                rest.terminate()
                rest.wait()
        log.seek(0)
        print(f"\n[make test] the tests without Ray:\n{log.read()}", end="", flush=True)
    print(f"[make test] both tiers: {time.monotonic() - start:.0f} s of wall time")
    return exit_status(ray_code, rest_code)


def exit_status(ray: int, rest: int) -> int:
    """The suite's status from its tiers': a failing tier's (the Ray tier's first); an empty tier is no
    failure while the other ran tests (`make test PYTEST_ARGS=tests/test_config.py` has no Ray test)."""
    for code in (ray, rest):
        if code not in (0, NO_TESTS):
            return code
    return NO_TESTS if ray == rest == NO_TESTS else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
