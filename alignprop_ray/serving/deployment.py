"""The Ray Serve deployment of one reward: its replicas build the reward model once and score batches.

A request is (images float32 (B, 3, H, W), prompts, whether dR/dpixels is wanted). `@serve.batch` gathers
the requests that arrive together, from any worker of any trial, into one forward pass (and one backward
pass for those that want the gradient); requests of other image sizes go in passes of their own.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
from ray import serve

# Test hook, set through the reward's runtime_env: "<marker file>:<n>" makes a replica exit while it holds
# its n-th request, once (the marker records it), as a crashed replica would (tests/test_reward_service.py).
EXIT_HOOK_ENV = "ALIGNPROP_TEST_REPLICA_EXIT"


HEALTH_CHECK_PERIOD_S = 2.0


class ScoreRequest(NamedTuple):
    images: np.ndarray  # float32 (or float64) (B, 3, H, W) in [0, 1]
    prompts: list[str]
    want_gradient: bool


class RewardServer:
    """One replica: the reward of term (`name`, `term`) on its own CPU threads or GPU share."""

    def __init__(self, name: str, term: dict[str, Any]):
        import ray
        import torch

        from alignprop_ray.rewards.mixture import build_term
        from alignprop_ray.rewards.registry import get_entry

        entry = get_entry(name)
        options = entry.options.model_validate(term)
        serve_options = options.serve
        assigned = ray.get_runtime_context().get_assigned_resources()
        torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))
        gpu = serve_options.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        self.reward = build_term(name, options, self.device, torch.float32)
        self.score_batch.set_max_batch_size(serve_options.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(serve_options.batch_wait_timeout_s)
        self.requests = 0

    async def score(
        self, images: np.ndarray, prompts: list[str], want_gradient: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rewards (B,) of the images and, if wanted, each reward's gradient w.r.t. its image's pixels."""
        self.requests += 1
        _maybe_exit(self.requests)
        return await self.score_batch(ScoreRequest(images, list(prompts), bool(want_gradient)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[ScoreRequest]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            key = (request.images.shape[1:], request.images.dtype.str, request.want_gradient)
            groups.setdefault(key, []).append(i)
        for (_, _, want_gradient), members in groups.items():
            for i, result in zip(
                members, self._score([requests[i] for i in members], want_gradient), strict=True
            ):
                results[i] = result
        return results

    def _score(self, requests: list[ScoreRequest], want_gradient: bool) -> list[tuple]:
        import torch

        from alignprop_ray.rewards.remote import score_with_pixel_gradient

        images = torch.from_numpy(np.concatenate([r.images for r in requests])).to(self.device)
        prompts = [p for r in requests for p in r.prompts]
        values, grads = score_with_pixel_gradient(self.reward, images, prompts, want_gradient)
        sizes = [len(r.prompts) for r in requests]
        values_out = [v.cpu().numpy() for v in values.split(sizes)]
        grads_out = (
            [g.cpu().numpy() for g in grads.split(sizes)] if grads is not None else [None] * len(sizes)
        )
        return list(zip(values_out, grads_out, strict=True))

    def differentiable(self) -> bool:
        return bool(self.reward.differentiable)

    def environment(self, key: str) -> tuple[int, str | None]:
        """(this replica's pid, the value of environment variable `key` here): tests and debugging."""
        return os.getpid(), os.environ.get(key)


def _maybe_exit(request: int) -> None:
    hook = os.environ.get(EXIT_HOOK_ENV)
    if not hook:
        return
    marker, _, at = hook.rpartition(":")
    if request == int(at) and not os.path.exists(marker):
        with open(marker, "w") as record:
            record.write(f"replica {os.getpid()} exited at request {request}\n")
        os._exit(1)


def reward_application(served) -> Any:
    """The bound Serve application of a `ServedTerm`: its replicas' resources, runtime_env and autoscaling."""
    options = served.serve
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus}
    runtime_env = options.runtime_env.to_ray()
    if runtime_env:
        actor_options["runtime_env"] = runtime_env
    deployment = serve.deployment(RewardServer).options(
        name=served.app,
        ray_actor_options=actor_options,
        max_ongoing_requests=options.max_ongoing_requests,
        # Serve's default (10 s) leaves a crashed replica unnoticed for that long while training waits on it
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=5,
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "initial_replicas": max(options.min_replicas, 1),
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        },
    )
    return deployment.bind(served.name, served.term.model_dump(mode="json"))
