"""No more trials train at once than the sweep's concurrency, also after `--resume`.

Tune holds new trials back to the concurrency (the searcher's `max_concurrent`), but a restored sweep
re-queues its unfinished and errored trials as PENDING and starts every one that the cluster's resources
allow (Ray Tune 2.60, ray-project/ray#40652). Our trials ask Tune for almost nothing (their Train workers
hold the CPUs and GPUs), so that is all of them at once. So each trial takes a slot from the sweep's
`TrialSlots` actor before it trains and gives it back when it ends; a trial without a slot waits (it says
so on the console), first come first served.

A trial that dies without giving its slot back (its process killed) loses it LEASE_S after its last
renewal: a holder renews every RENEW_S from a thread of its own. The actor lives on the sweep driver's
node and ends with the driver; a resumed sweep starts a new one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

LEASE_S = 30.0  # a slot (or a place in the queue) not renewed for this long is free again
RENEW_S = 5.0
POLL_S = 1.0  # how often a waiting trial asks again


class TrialSlots:
    """`limit` slots handed out first come first served, by trial id (a Ray actor: `start_slots`)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held: dict[str, float] = {}  # trial id -> last renewal (monotonic)
        self.waiting: dict[str, float] = {}  # trial id -> last request, in order of first request

    def take(self, trial_id: str) -> bool:
        """Whether `trial_id` holds a slot now (taking one if it is its turn); renews a held one."""
        now = time.monotonic()
        self._expire(now)
        if trial_id in self.held:
            self.held[trial_id] = now
            return True
        self.waiting[trial_id] = now  # keeps its place in the queue if it had one
        free = self.limit - len(self.held)
        if trial_id in list(self.waiting)[: max(free, 0)]:
            del self.waiting[trial_id]
            self.held[trial_id] = now
            return True
        return False

    def give_back(self, trial_id: str) -> None:
        self.held.pop(trial_id, None)
        self.waiting.pop(trial_id, None)

    def holders(self) -> list[str]:
        self._expire(time.monotonic())
        return sorted(self.held)

    def _expire(self, now: float) -> None:
        for table in (self.held, self.waiting):
            for trial_id in [t for t, seen in table.items() if now - seen > LEASE_S]:
                del table[trial_id]


def start_slots(limit: int):
    """A TrialSlots actor on this process's node (it ends with the sweep driver that owns it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(TrialSlots).options(scheduling_strategy=here).remote(limit)


@contextlib.contextmanager
def trial_slot(slots, trial_id: str, limit: int, say: Callable[[str], None] = print) -> Iterator[None]:
    """Hold one of the sweep's slots for the block: wait for it first, renew it meanwhile, give it back."""
    import ray

    if not ray.get(slots.take.remote(trial_id)):
        say(f"[trial {trial_id}] waiting for a slot: {limit} trial(s) train at once")
        while not ray.get(slots.take.remote(trial_id)):
            time.sleep(POLL_S)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(slots, trial_id, stop), daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):  # the actor ends with the driver: nothing left to give back
            ray.get(slots.give_back.remote(trial_id), timeout=10)


def _renew(slots, trial_id: str, stop: threading.Event) -> None:
    import ray

    while not stop.wait(RENEW_S):
        with contextlib.suppress(Exception):
            ray.get(slots.take.remote(trial_id), timeout=RENEW_S)
