"""Start the reward applications a run or sweep needs, wait until they serve, and stop them at the end.

Whoever starts an application stops it: a sweep starts every served reward of its trials before the first
trial and stops them after the last; a trial finds them running and leaves them alone; a single `train`
run starts (and stops) its own. An application another command started is used, never stopped.

Starting waits until every replica the application keeps (min_replicas, at least one) is up: its
runtime_env built, its reward loaded. A failure there (a runtime_env that does not build, weights that do
not load, replicas that find no room within serve.start_timeout_s) is one line naming the reward, before
any trial or MLflow run starts.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from alignprop_ray.errors import UserError
from alignprop_ray.serving.specs import ServedTerm, unique

POLL_S = 0.5

# Ray Serve 2.60 is not thread-safe within a process: `serve.status()` and a deployment's config each build
# a RequestRouterConfig, which registers its module with cloudpickle and unregisters it again
# (ray/serve/config.py, `_serialize_request_router_cls`); a second thread doing the same in between makes
# one of the two unregisters raise "... is not registered for pickle by value" (seen in
# tests/test_reward_service.py, whose watcher thread polls the status while a sweep starts its rewards).
# Our calls into Serve hold this lock.
SERVE_LOCK = threading.Lock()


def serve_status():
    """`serve.status()`, under SERVE_LOCK."""
    from ray import serve

    with SERVE_LOCK:
        return serve.status()


@contextlib.contextmanager
def reward_pool(terms: Sequence[ServedTerm], say: Callable[[str], None] = print) -> Iterator[list[str]]:
    """Run every application of `terms` for the block (the list of those started here): those already
    running are used as they are; those started here are stopped at the end, also on failure."""
    started = start_rewards(terms, say)
    try:
        yield started
    finally:
        stop_rewards(started)


def start_rewards(terms: Sequence[ServedTerm], say: Callable[[str], None] = print) -> list[str]:
    """Start the applications of `terms` that are not running and wait until all serve; the names started.

    UserError (one line naming the reward) if one fails to start; those started here are stopped then.
    """
    from ray import serve

    from alignprop_ray.serving.deployment import reward_application

    terms = unique(terms)
    if not terms:
        return []
    # Handles only, so no HTTP proxy actor on any node. A running Serve (another command's) is joined as it
    # is; the controller stays up after our applications stop (it ends with a private Ray instance).
    with SERVE_LOCK:
        serve.start(proxy_location="Disabled")
    running = set(serve_status().applications)
    started = []
    for term in terms:
        if term.app in running:
            continue
        with SERVE_LOCK:
            serve.run_many(
                [serve.RunTarget(reward_application(term), name=term.app, route_prefix=None)],
                wait_for_applications_running=False,
            )
        started.append(term.app)
        say(f"reward {term.name}: starting Ray Serve application {term.app} ({summary(term)})")
    try:
        for term in terms:
            _wait_until_running(term)
    except BaseException:
        stop_rewards(started)
        raise
    return started


def summary(term: ServedTerm) -> str:
    """`1-2 replicas x {CPU: 1}, batches of up to 8 requests`: for the console."""
    s = term.serve
    replicas = (
        f"{s.min_replicas}-{s.max_replicas}" if s.min_replicas != s.max_replicas else f"{s.max_replicas}"
    )
    env = f", runtime_env {sorted(s.runtime_env.to_ray())}" if s.runtime_env.to_ray() else ""
    each = s.replica_resources() or "no CPU or GPU"
    return f"replicas: {replicas}, each {each}; batches of up to {s.max_batch_size} requests{env}"


def _wait_until_running(term: ServedTerm) -> None:
    deadline = time.monotonic() + term.serve.start_timeout_s
    while True:
        app = serve_status().applications.get(term.app)
        status = str(app.status) if app else "NOT_STARTED"
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            why = _reason(app) if app else "the application disappeared"
            late = (
                "" if status.endswith("DEPLOY_FAILED") else f"not up after {term.serve.start_timeout_s:g} s: "
            )
            raise UserError(f"reward.{term.name}.serve: {term.app} did not start: {late}{why}")
        time.sleep(POLL_S)


def _reason(app) -> str:
    """The first informative line Serve gives for an application that is not running."""
    messages = [*(d.message for d in app.deployments.values()), app.message]  # the deployment's says why
    for message in messages:
        lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
        if lines:
            return _essential(lines)
    return str(app.status)


def _essential(lines: list[str]) -> str:
    """A runtime_env or constructor failure comes with a traceback: its last line says what failed."""
    for line in reversed(lines):
        if "Error" in line or "error" in line or "failed" in line:
            return line[:400]
    return lines[0][:400]


def stop_rewards(apps: Sequence[str]) -> None:
    """Delete the applications `apps` (those this command started); others' stay."""
    if not apps:
        return
    from ray import serve

    for app in apps:
        with SERVE_LOCK, contextlib.suppress(Exception):  # already gone (Serve or Ray shut down)
            serve.delete(app)
