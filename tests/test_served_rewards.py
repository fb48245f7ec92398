"""Served rewards without Ray: the gradient-through-the-network design, the config, the pool's arithmetic.

The Ray side (deployments, the shared pool of a sweep, a crashed replica) is tests/test_reward_service.py.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from alignprop_ray.cli import main
from alignprop_ray.config import parse_experiment
from alignprop_ray.errors import ConfigError
from alignprop_ray.rewards.mixture import build_reward, build_term
from alignprop_ray.rewards.remote import RemoteReward, score_with_pixel_gradient
from alignprop_ray.rewards.spec import parse_reward_spec
from alignprop_ray.serving.specs import served_terms
from alignprop_ray.sweep import capacity
from alignprop_ray.sweep.capacity import Ceiling, trials_that_fit
from alignprop_ray.sweep.config import parse_sweep
from tests.helpers import tiny_sweep
from tests.test_config import BASE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_AESTHETIC = {"arch": "tiny", "objective": "target", "target": 10.0}


def local_scorer(reward):
    """What a replica does with a request (deployment.RewardServer._score), without the network."""

    def score(images: np.ndarray, prompts: list[str], want_gradient: bool):
        values, grads = score_with_pixel_gradient(reward, torch.from_numpy(images), prompts, want_gradient)
        return values.numpy(), None if grads is None else grads.numpy()

    return score


# --- dR/dpixels through a call: the math ---------------------------------------------------------------


class PerImageNet(torch.nn.Module):
    """A frozen nonlinear reward in float64 (conv, tanh, pooled linear), one image at a time like every
    built-in reward: what gradcheck needs (the library's CLIP preprocessing computes in float32)."""

    differentiable = True

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64))
        self.head = torch.nn.Parameter(torch.randn(4, dtype=torch.float64, generator=gen))
        self.requires_grad_(False)

    def forward(self, images, prompts):
        features = torch.tanh(torch.nn.functional.conv2d(images, self.conv)).pow(2).mean(dim=(2, 3))
        return features @ self.head


def test_remote_gradient_is_the_vector_jacobian_product_by_finite_differences():
    """gradcheck (float64): the worker's backward, grad_r[b] x the server's dr_b/dx_b, is the reward's true
    vector-Jacobian product, for any upstream gradient (gradcheck tries them all)."""
    remote = RemoteReward(local_scorer(PerImageNet()), differentiable=True)
    images = torch.rand(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: remote(x, ["a", "b"]), (images,), eps=1e-6, atol=1e-8)


def test_remote_gradient_of_a_clip_reward_equals_autograd_in_process():
    """The tiny aesthetic (a CLIP tower and head, float32): through the call, the gradient of a weighted
    objective equals autograd through the model in this process (rtol 1e-5: float32, other summation order)."""
    term = parse_reward_spec({"aesthetic": TINY_AESTHETIC})[0]["aesthetic"]
    local = build_term("aesthetic", term, torch.device("cpu"), torch.float32)
    remote = RemoteReward(local_scorer(local), differentiable=True)
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    prompts, upstream = ["a", "b", "c"], torch.tensor([0.3, -2.0, 1.0])
    (through_call,) = torch.autograd.grad((remote(images, prompts) * upstream).sum(), images)
    (in_process,) = torch.autograd.grad((local(images, prompts) * upstream).sum(), images)
    assert through_call.abs().max() > 0
    torch.testing.assert_close(through_call, in_process, rtol=1e-5, atol=1e-9)


def test_no_gradient_is_asked_for_where_none_is_needed():
    """DDPO, evaluation, non-differentiable rewards: the scorer is called without the gradient request."""
    asked = []

    def score(images, prompts, want_gradient):
        asked.append(want_gradient)
        return images.mean(axis=(1, 2, 3)), images if want_gradient else None

    remote = RemoteReward(score, differentiable=True)
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    with torch.no_grad():
        remote(images, ["a", "b"])
    remote(images.detach(), ["a", "b"])
    RemoteReward(score, differentiable=False)(images, ["a", "b"])
    assert asked == [False, False, False]
    remote(images, ["a", "b"]).sum().backward()
    assert asked[-1] is True and images.grad is not None


def test_a_mixture_scores_served_terms_with_the_client_it_is_given():
    """build_reward hands terms with `serve` to the served builder; weight and objective stay the worker's."""
    built = []

    def served(name, term):
        built.append((name, term.serve.max_replicas))
        return RemoteReward(local_scorer(build_term(name, term, torch.device("cpu"), torch.float32)), True)

    spec = {"aesthetic": {**TINY_AESTHETIC, "serve": {"max_replicas": 2}}, "saturation": 0.5}
    mixture = build_reward(spec, device="cpu", dtype=torch.float32, served=served)
    local = build_reward({"aesthetic": TINY_AESTHETIC, "saturation": 0.5}, device="cpu", dtype=torch.float32)
    assert built == [("aesthetic", 2)]
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(mixture(images, ["a", "b"]).total, local(images, ["a", "b"]).total)


# --- the config ----------------------------------------------------------------------------------------


def experiment(reward) -> dict:
    data = copy.deepcopy(BASE)
    data["reward"] = reward
    return data


def served_of(reward):
    return served_terms(parse_experiment(experiment(reward), None, env={}, check_files=False))


def test_same_reward_and_options_name_the_same_deployment():
    base = served_of({"aesthetic": {**TINY_AESTHETIC, "serve": True}})[0]
    reweighted = served_of({"aesthetic": {**TINY_AESTHETIC, "weight": 3.0, "serve": {}}})[0]
    other_model = served_of({"aesthetic": {**TINY_AESTHETIC, "seed": 1, "serve": True}})[0]
    other_serve = served_of({"aesthetic": {**TINY_AESTHETIC, "serve": {"max_batch_size": 2}}})[0]
    assert base.app == reweighted.app  # the worker applies weight, objective and target
    assert len({base.app, other_model.app, other_serve.app}) == 3
    assert base.app.startswith("alignprop-reward-aesthetic-")
    assert served_of({"aesthetic": TINY_AESTHETIC}) == []


@pytest.mark.parametrize(
    ("serve", "expected"),
    [
        ({"min_replicas": -1}, ["reward.aesthetic.serve.min_replicas: must be >= 0 (got -1)"]),
        ({"max_replicas": 0}, ["reward.aesthetic.serve.max_replicas: must be >= 1 (got 0)"]),
        (
            {"min_replicas": 3, "max_replicas": 2},
            ["reward.aesthetic.serve.min_replicas: 3 is above max_replicas (2)"],
        ),
        ({"num_gpus": -0.5}, ["reward.aesthetic.serve.num_gpus: must be >= 0 (got -0.5)"]),
        ({"request_timeout_s": 0}, ["reward.aesthetic.serve.request_timeout_s: must be > 0 (got 0)"]),
        ({"replicas": 2}, ["reward.aesthetic.serve.replicas: unknown field"]),
        (
            {"runtime_env": {"env_vars": {"A": 1}}},
            ["reward.aesthetic.serve.runtime_env.env_vars.A: input should be a valid string"],
        ),
        ({"runtime_env": {"image": "x"}}, ["reward.aesthetic.serve.runtime_env.image: unknown field"]),
    ],
)
def test_bad_serve_settings_one_line_each(serve, expected):
    with pytest.raises(ConfigError) as info:
        parse_experiment(experiment({"aesthetic": {**TINY_AESTHETIC, "serve": serve}}), None, env={})
    assert len(info.value.problems) == len(expected)
    for problem, fragment in zip(info.value.problems, expected, strict=True):
        assert problem.startswith(fragment), problem


def test_serve_settings_by_dotted_key_and_shorthand():
    terms = served_of({"aesthetic": {**TINY_AESTHETIC, "serve": True}, "aesthetic.serve.max_replicas": 3})
    assert terms[0].serve.max_replicas == 3 and terms[0].serve.min_replicas == 1


@pytest.mark.parametrize(
    ("reward", "expected"),
    [
        ({"nonesuch": {"serve": True}}, "reward.nonesuch: unknown reward"),
        (
            {"aesthetic": {**TINY_AESTHETIC, "serve": {"max_replicas": -2}}},
            "reward.aesthetic.serve.max_replicas: must be >= 1",
        ),
    ],
)
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_bad_served_reward_exits_2_before_anything_starts(
    reward, expected, command, tmp_path, monkeypatch, capsys
):
    """One line, exit 2, and no Ray: the commands that would start it are tripwires."""
    import yaml

    from alignprop_ray.train import launch

    def tripwire(*_, **__):
        raise AssertionError("Ray was started for a config that does not validate")

    monkeypatch.setattr(launch, "connect_ray", tripwire)
    monkeypatch.setattr(launch, "run_training", tripwire)
    monkeypatch.chdir(tmp_path)
    data = (
        experiment(reward)
        if command == "train"
        else tiny_sweep({"train.lr": {"grid": [0.01]}}, base={"reward": reward})
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main([command, "c.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "mlflow.db").exists()


def test_aesthetic_at_random_init_builds_a_real_size_model_without_weights():
    """init: random (the benchmark's ViT-B-32 aesthetic): no file is needed or loaded; with a path it is an
    error rather than silently unused."""
    terms, problems = parse_reward_spec({"aesthetic": {"arch": "ViT-B-32", "init": "random"}})
    assert problems == []
    _, problems = parse_reward_spec({"aesthetic": {"arch": "ViT-B-32", "init": "random", "path": "x.pth"}})
    assert problems == ["reward.aesthetic.path: not loaded with init: random"]


# --- sweeps: one pool, listed values, capacity ---------------------------------------------------------


def test_a_sweep_starts_one_deployment_per_distinct_served_reward(tmp_path):
    served = {"aesthetic": {**TINY_AESTHETIC, "serve": True}}
    same = parse_sweep(
        tiny_sweep(
            {"train.lr": {"grid": [0.01, 0.02]}, "reward.aesthetic.weight": {"uniform": [0.5, 2]}},
            base={"reward": served},
            tune={"algorithm": "random"},
        ),
        tmp_path,
        env={},
    )
    assert len(same.served_terms()) == 1  # lr and weight: every trial shares one
    seeds = parse_sweep(
        tiny_sweep({"reward.aesthetic.seed": {"grid": [0, 1, 1]}}, base={"reward": served}), tmp_path, env={}
    )
    assert len(seeds.served_terms()) == 2  # one per model


def test_a_served_reward_option_is_searched_over_listed_values(tmp_path):
    served = {"aesthetic": {**TINY_AESTHETIC, "serve": {}}}
    with pytest.raises(ConfigError) as info:
        parse_sweep(
            tiny_sweep(
                {"reward.aesthetic.serve.batch_wait_timeout_s": {"uniform": [0.0, 0.1]}},
                base={"reward": served},
                tune={"algorithm": "random"},
            ),
            tmp_path,
            env={},
        )
    assert info.value.problems == [
        "space.reward.aesthetic.serve.batch_wait_timeout_s: changes a served reward, so it takes listed "
        "values (grid or choice), not uniform: the sweep starts each deployment before its first trial"
    ]


def test_replicas_are_placed_before_trials_are_counted():
    """A CPU-only head and up to 3 added GPU nodes; a trial is 1 worker x {CPU: 4, GPU: 1}. A replica takes
    room where the scheduler finds it first: the head if it fits there, else an added node (two half-GPU
    replicas share one), and that node holds no trial any more."""
    gpu_node = {"CPU": 8, "GPU": 1}
    ceiling = Ceiling([{"CPU": 8}], [(gpu_node, 3)], "test")
    worker = {"CPU": 4, "GPU": 1}
    assert trials_that_fit(ceiling, worker, 1) == 3
    half = capacity.reserve(ceiling, [{"CPU": 1, "GPU": 0.5}] * 2)  # two replicas share one GPU node
    assert trials_that_fit(half, worker, 1) == 2
    cpu_only = capacity.reserve(ceiling, [{"CPU": 4}])  # fits on the head: no GPU node is taken
    assert trials_that_fit(cpu_only, worker, 1) == 3
    assert trials_that_fit(capacity.reserve(Ceiling([{"CPU": 2}], [], "t"), [{"CPU": 1}]), {"CPU": 1}, 1) == 1
    assert "less the reward replicas' {'CPU': 2.0, 'GPU': 1.0}" in half.source
    unbounded = capacity.reserve(Ceiling([], [(gpu_node, math.inf)], "t"), [{"GPU": 1}])
    assert trials_that_fit(unbounded, worker, 1) == math.inf


def test_a_train_run_starts_its_served_rewards_before_its_mlflow_run_and_stops_them(monkeypatch, tmp_path):
    """`train` alone: Ray, then the deployments (waited for), then the MLflow run; stopped after, also when
    the run fails. A reward that cannot start leaves no MLflow run."""
    import contextlib

    from alignprop_ray.errors import UserError
    from alignprop_ray.serving import pool
    from alignprop_ray.train import launch

    events, failing = [], []

    @contextlib.contextmanager
    def reward_pool(terms, say=print):
        if failing:
            raise UserError("reward.aesthetic.serve: did not start")
        events.append(("start", [t.name for t in terms]))
        try:
            yield []
        finally:
            events.append("stop")

    def run(cfg, name, served, *rest):
        events.append(("run", [t.name for t in served]))
        raise RuntimeError("the run failed")

    monkeypatch.setattr(pool, "reward_pool", reward_pool)
    monkeypatch.setattr(launch, "connect_ray", lambda: events.append("ray"))
    monkeypatch.setattr(launch, "_run_training", run)
    data = experiment({"aesthetic": {**TINY_AESTHETIC, "serve": True}})
    data["storage"] = {"path": str(tmp_path)}
    cfg = parse_experiment(data, None, env={})
    with pytest.raises(RuntimeError, match="the run failed"):
        launch.run_training(cfg, "n")
    assert events == ["ray", ("start", ["aesthetic"]), ("run", ["aesthetic"]), "stop"]
    failing.append(True)
    events.clear()
    with pytest.raises(UserError, match="did not start"):
        launch.run_training(cfg, "n")
    assert events == ["ray"]  # no run


def test_calls_into_serve_from_two_threads_never_overlap(monkeypatch):
    """Serve's status and deploy calls are not thread-safe within a process (serving/pool.py, SERVE_LOCK):
    ours take turns."""
    import threading
    import time

    from ray import serve

    from alignprop_ray.serving import pool

    inside, most = [0], [0]

    def status():
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.01)
        inside[0] -= 1
        return "status"

    monkeypatch.setattr(serve, "status", status)
    threads = [threading.Thread(target=lambda: [pool.serve_status() for _ in range(5)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
