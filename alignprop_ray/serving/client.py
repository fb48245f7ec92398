"""The worker's side of a served reward: a RemoteReward that calls the reward's Serve application.

A request never hangs: it waits serve.request_timeout_s at most. A request that fails (its replica died,
it timed out) is tried once more, after a line on the worker's console: Serve restarts a dead replica, and
the retry waits for it in the handle's queue. A second failure ends the step with one line naming the
reward (RewardServiceError).
"""

from __future__ import annotations

import sys

import numpy as np

from alignprop_ray.rewards.options import RewardTerm
from alignprop_ray.rewards.registry import get_entry
from alignprop_ray.rewards.remote import RemoteReward
from alignprop_ray.serving.specs import ServedTerm


class RewardServiceError(RuntimeError):
    """A served reward failed twice in a row for one request (the message names it)."""


class ServeScorer:
    """Calls `score` on the application of `served` (a `Scorer` for RemoteReward); counts its retries."""

    def __init__(self, served: ServedTerm):
        self.served = served
        self.retries = 0
        self._handle = None

    def __call__(self, images: np.ndarray, prompts: list[str], want_gradient: bool):
        try:
            return self._request(images, prompts, want_gradient)
        except Exception as first:
            self.retries += 1
            _say(
                f"reward {self.served.name}: request to {self.served.app} failed ({_one_line(first)}); retrying once"
            )
        try:
            return self._request(images, prompts, want_gradient)
        except Exception as second:
            raise RewardServiceError(
                f"served reward {self.served.name} ({self.served.app}) failed twice: {_one_line(second)}"
            ) from second

    def _request(self, images: np.ndarray, prompts: list[str], want_gradient: bool):
        response = self.handle.score.remote(images, prompts, want_gradient)
        try:
            return response.result(timeout_s=self.served.serve.request_timeout_s)
        except TimeoutError:
            response.cancel()
            raise TimeoutError(
                f"no answer within serve.request_timeout_s={self.served.serve.request_timeout_s:g}"
            ) from None

    def ask_differentiable(self) -> bool:
        timeout = self.served.serve.request_timeout_s
        return bool(self.handle.differentiable.remote().result(timeout_s=timeout))

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_app_handle(self.served.app)
        return self._handle

    def __getstate__(self) -> dict:  # a handle is not for pickling; the next call gets a fresh one
        return {**self.__dict__, "_handle": None}


def served_reward(name: str, term: RewardTerm) -> RemoteReward:
    """The reward of a served term, as the worker's mixture holds it: no weights, one request per call."""
    scorer = ServeScorer(ServedTerm(name, term))
    entry = get_entry(name)
    # a plugin is only imported where it runs: its replicas say whether it proved differentiable
    differentiable = scorer.ask_differentiable() if entry.plugin else entry.differentiable
    return RemoteReward(scorer, differentiable=differentiable)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


def _say(line: str) -> None:
    sys.stdout.write(f"[alignprop] {line}\n")
    sys.stdout.flush()
