"""A run's workers wait for room: their first start as long as it takes, a restart within a limit.

Ray Train V2 reserves a run's workers itself, in a placement group that the run's controller creates.
While the cluster cannot place the group it stays pending, and a pending group is what makes an
autoscaler add nodes. Ray Train gives up on it after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, removes
it, counts a controller failure and, up to FailureConfig.controller_failure_limit times, tries again.
A sweep with more trials than the cluster holds at once needs the trials without room to wait, not to
fail, so `run_training` lets Ray Train try again without limit and `RoomWatch`, in the controller,
bounds the wait itself:

- the first start of the run's workers waits up to failure.wait_for_room_s (default: no limit);
- a restart after a failure (a lost node not yet replaced) waits up to failure.wait_for_workers_s;
- a start whose workers die while starting (not a wait) is tried failure.max_failures more times.

The workers are not reserved in the Tune trial as well (Ray Train V1's pattern, `tune.with_resources`
with the workers' bundles): Train V2 makes its own placement group, so a second reservation would hold
the same resources twice, and trials each holding part of what they need could wait for one another for
ever. Each wait is checked when a try ends (every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S).

A start that waits says so: a line on the console (printed by the controller, which Ray forwards to the
driver) and the tag `alignprop.placement` on the run's MLflow run, "waiting for resources since ..."
until the workers are placed, then "placed after N s".
"""

from __future__ import annotations

import threading
import time

from alignprop_ray.compat import (
    ray_train_controller_callback_bases,
    ray_train_start_failure,
    ray_train_startup_timed_out,
    ray_train_state_name,
)

ControllerCallback, WorkerGroupCallback = ray_train_controller_callback_bases()

PLACEMENT_TAG = "alignprop.placement"
NOTICE_AFTER_S = 10.0  # a group placed on a cluster with room starts its workers well within this
ENDED = ("SHUTTING_DOWN", "ERRORED", "FINISHED", "ABORTED")


class NoRoomError(RuntimeError):
    """The cluster had no room for a run's workers within the wait its settings allow."""


class StartFailedError(RuntimeError):
    """A run's workers died while starting more often than failure.max_failures allows."""


class RoomWatch(ControllerCallback, WorkerGroupCallback):
    """Bounds and shows a run's waits for room for its workers (this module's docstring)."""

    def __init__(
        self,
        run_name: str,
        *,
        wait_for_room_s: float | None,
        wait_for_workers_s: float | None,
        max_start_failures: int,
        tracking: tuple[str, str] | None = None,
        notice_after_s: float = NOTICE_AFTER_S,
    ):
        self.run_name, self.tracking, self.notice_after_s = run_name, tracking, notice_after_s
        self.wait_for_room_s, self.wait_for_workers_s = wait_for_room_s, wait_for_workers_s
        self.max_start_failures = max_start_failures  # -1: no limit
        self._started = False  # a worker group of this run has trained (so a start now is a restart)
        self._phase_start: float | None = None  # monotonic time the current start began
        self._start_failures = 0
        self._shape: tuple[int, dict[str, float]] = (0, {})  # workers, resources of each
        self._timer: threading.Timer | None = None
        self._waiting = False  # the wait was announced
        self._lock: threading.Lock | None = None  # made in the controller (a lock does not pickle)

    # --- Train controller hooks --------------------------------------------------------------------

    def after_controller_state_update(self, previous_state, current_state) -> None:
        state, before = ray_train_state_name(current_state), ray_train_state_name(previous_state)
        if state == "SCHEDULING" and before != "RESCHEDULING":  # a start begins (first, or a restart)
            self._phase_start = time.monotonic()
        elif state == "RESCHEDULING":  # a try ended without workers: Ray will try again unless we stop it
            self._check(ray_train_start_failure(current_state))
        elif state == "RUNNING":
            self._started = True
        elif state in ENDED and self._lock is not None:
            with self._lock:
                self._disarm()

    def before_worker_group_start(self, worker_group_context) -> None:
        self._shape = (worker_group_context.num_workers, dict(worker_group_context.resources_per_worker))
        self._lock = self._lock or threading.Lock()
        with self._lock:
            if self._timer is None:
                self._arm()

    def before_init_train_context(self, workers) -> dict:
        """The workers exist, so the cluster placed them: end the wait."""
        with self._lock:
            self._disarm()
            waited, self._waiting = self._waiting, False
        if waited:
            after = f"{time.monotonic() - (self._phase_start or time.monotonic()):.0f} s"
            self._say(f"workers placed after {after}", f"placed after {after}")
        return {}

    # --- the limits ---------------------------------------------------------------------------------

    def _check(self, failure: BaseException | None) -> None:
        """After a failed try: raise (ending the run) once its start has waited or failed too long."""
        if failure is None or not ray_train_startup_timed_out(failure):
            self._start_failures += 1
            if 0 <= self.max_start_failures < self._start_failures:
                raise StartFailedError(
                    f"the run's workers failed to start {self._start_failures} times "
                    f"(failure.max_failures: {self.max_start_failures}): {failure}"
                )
            return
        setting, limit = self._limit()
        waited = time.monotonic() - (self._phase_start or time.monotonic())
        if limit is not None and waited >= limit:
            why = "a lost node not replaced, or too few resources" if self._started else f"{limit:g} s"
            raise NoRoomError(
                f"the cluster had no room for the run's {self._shape[0]} workers within {setting} ({why})"
            )

    def _limit(self) -> tuple[str, float | None]:
        if self._started:
            return "failure.wait_for_workers_s", self.wait_for_workers_s
        return "failure.wait_for_room_s", self.wait_for_room_s

    # --- showing the wait ---------------------------------------------------------------------------

    def _arm(self) -> None:
        self._timer = threading.Timer(self.notice_after_s, self._notice)
        self._timer.daemon = True
        self._timer.start()

    def _disarm(self) -> None:
        """Stop the notice timer (callers hold the lock, or run before any timer)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _notice(self) -> None:
        """Runs in the timer's thread while the controller waits for the placement group."""
        pending = self._pending_group_like_ours()
        with self._lock:
            if self._timer is None or self._waiting:  # placed meanwhile, or announced already
                return
            if not pending:  # placed; its workers are slow to start: look again later
                self._arm()
                return
            self._waiting = True
        workers, each = self._shape
        setting, limit = self._limit()
        restart = " to restart" if self._started else ""
        bound = "no limit" if limit is None else f"{limit:g} s"
        since = time.strftime("%H:%M:%S", time.localtime())
        self._say(
            f"waiting for resources{restart}: the cluster has no room yet for {workers} worker(s) x {each}; "
            f"they start when room frees up or a node joins ({setting}: {bound})",
            f"waiting for resources{restart} since {since}: {workers} worker(s) x {each}",
        )

    def _pending_group_like_ours(self) -> bool:
        """Whether a placement group of this run's shape waits in the cluster (Ray's table names no
        creator, so another run of the same shape counts too: that one waits for the same room)."""
        import ray.util

        workers, each = self._shape
        try:
            groups = ray.util.placement_group_table().values()
        except Exception:  # the GCS is busy: say it waits, as it most likely does
            return True
        for group in groups:
            bundles = list(group.get("bundles", {}).values())
            if group.get("state") == "PENDING" and len(bundles) == workers:
                if all({k: float(v) for k, v in b.items()} == each for b in bundles):
                    return True
        return False

    def _say(self, line: str, tag: str) -> None:
        print(f"[run {self.run_name}] {line}", flush=True)
        if self.tracking:
            threading.Thread(target=_set_tag, args=(*self.tracking, tag), daemon=True).start()


def _set_tag(uri: str, run_id: str, value: str) -> None:
    """Best effort: the wait is also on the console, and an unreachable store must not stop the run."""
    from alignprop_ray import tracking

    try:
        tracking.client(uri).set_tag(run_id, PLACEMENT_TAG, value)
    except Exception as err:  # noqa: BLE001
        print(f"(could not tag the MLflow run with its wait: {err})", flush=True)
