"""Which reward terms of an experiment are served, and the Ray Serve application each one maps to (no Ray).

The application's name is a digest of the reward's name, its model options and its serve settings, not of
its weight, objective or target (the worker applies those): two trials that score with the same model
under the same settings name the same application, and so share its replicas.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from alignprop_ray.rewards.options import RewardTerm, ServeOptions
from alignprop_ray.rewards.spec import parse_reward_spec

APP_PREFIX = "alignprop-reward-"
# the MLflow tag of a run (and of a sweep's parent run) that lists its served rewards and their settings
SERVED_TAG = "alignprop.served_rewards"


@dataclass(frozen=True)
class ServedTerm:
    """One served reward: its name in the config, its validated term, and its application."""

    name: str
    term: RewardTerm

    @property
    def serve(self) -> ServeOptions:
        assert self.term.serve is not None
        return self.term.serve

    @property
    def app(self) -> str:
        """`alignprop-reward-<name>-<digest>`: the Serve application (and deployment) name."""
        digest = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{APP_PREFIX}{re.sub(r'[^A-Za-z0-9_-]+', '_', self.name)}-{digest}"

    def holds(self) -> list[dict[str, float]]:
        """The resources of each replica it may run (max_replicas of them), for the sweep's capacity."""
        return [self.serve.replica_resources()] * self.serve.max_replicas

    def describe(self) -> dict[str, Any]:
        """What identifies it: the application's digest, and what the MLflow run records (tag SERVED_TAG)."""
        return {"reward": self.name, "model": self.term.model_options(), "serve": self.serve.model_dump()}


def served_terms(cfg) -> list[ServedTerm]:
    """The served terms of experiment `cfg` (training reward and held-out rewards), one per application."""
    served = []
    for spec in (cfg.reward, cfg.eval.rewards):
        terms, _ = parse_reward_spec(spec, for_training=False) if spec else ({}, [])
        served += [ServedTerm(name, term) for name, term in terms.items() if term.serve is not None]
    return unique(served)


def unique(terms: Iterable[ServedTerm]) -> list[ServedTerm]:
    """One term per application, in first-seen order."""
    found: dict[str, ServedTerm] = {}
    for term in terms:
        found.setdefault(term.app, term)
    return list(found.values())


def served_tag(terms: Iterable[ServedTerm]) -> str:
    """The SERVED_TAG value: {application: {reward, model options, serve settings}} as JSON."""
    return json.dumps({t.app: t.describe() for t in terms}, sort_keys=True)
